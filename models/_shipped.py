"""The checkpoints shipped inside the package, by name (no torch: light commands resolve them too)."""

from __future__ import annotations

from pathlib import Path

SHIPPED = Path(__file__).resolve().parent / "checkpoints"


def resolve_shipped(path: str) -> Path:
    """``path`` itself if it exists, else the checkpoint of that name shipped with fairtune
    (``fairtune/models/checkpoints/<name>``, e.g. ``colored-digits-16``)."""
    p = Path(path)
    if not p.exists() and (SHIPPED / path).is_dir():
        return SHIPPED / path
    return p
