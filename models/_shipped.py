"""Folders by name: what installed packages register under the ``fairtune.checkpoints`` entry point
(no torch: light commands resolve them too). The core ships no weights; the embedded benchmark
registers its base models (``colored-digits-16``) and the tiny backbone's text encoder
(``all-MiniLM-L6-v2``) exactly as a user's package would (pyproject.toml)."""

from __future__ import annotations

from pathlib import Path

CHECKPOINT_GROUP = "fairtune.checkpoints"


def registered() -> dict[str, object]:
    """Name -> entry point of every folder registered under ``fairtune.checkpoints``."""
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=CHECKPOINT_GROUP)}


def resolve_shipped(path: str) -> Path:
    """``path`` itself if it exists, else the folder an installed package registers under that name
    (an entry point ``name = "module:function"`` in the ``fairtune.checkpoints`` group; the function
    returns the folder), else ``path`` unchanged (the caller says it is missing)."""
    p = Path(path)
    if p.exists():
        return p
    ep = registered().get(str(path))
    if ep is None:
        return p
    try:
        return Path(ep.load()())
    except Exception as e:  # name the registration: its own traceback says little about where it came from
        raise ImportError(f"the {CHECKPOINT_GROUP} entry {ep.name} ({ep.value}) did not load: {e}") from e
