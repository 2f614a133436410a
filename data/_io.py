"""Small shared utilities: atomic writes, image grids and number formatting.

Atomic writes: every file that matters is written to a temporary file in its own folder and renamed
into place, so a reader (or a resumed job) sees the old file or the new one, never half of one.
Nothing here imports torch or numpy at module level (the light commands import this module).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import torch


def _created_mode(base: int) -> int:
    """``base`` less the process umask: the mode ``open`` or ``mkdir`` gives a new file or folder
    (``mkstemp`` and ``mkdtemp`` give 0o600 and 0o700, which would hide results from a cluster's group)."""
    mask = os.umask(0)
    os.umask(mask)
    return base & ~mask


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed onto ``path`` when the block ends
    without an error, removed when it raises.

    Example:
        >>> with atomic_path(out / "grid.png") as tmp:  # doctest: +SKIP
        ...     image.save(tmp, format="PNG")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if tmp.exists():
            os.chmod(tmp, _created_mode(0o666))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """A temporary folder beside ``path`` to write a whole folder into (a model's ``save_pretrained``);
    it replaces ``path`` when the block ends without an error and is removed when it raises, so a
    killed write never leaves a half-written folder at ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        yield tmp
        os.chmod(tmp, _created_mode(0o777))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str, *, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically (parent folders created)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding=encoding)


def atomic_write_json(path: str | Path, obj, **dumps_kwargs) -> None:
    """Write ``json.dumps(obj, **dumps_kwargs)`` to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, **dumps_kwargs))


def image_grid(images: torch.Tensor, per_row: int, *, rows: int | None = None, gap: int = 0) -> np.ndarray:
    """Lay images out row-major in one uint8 array (cells left without an image stay white).

    Args:
        images: ``(N, 3, H, W)`` in [0, 1] (any device; clamped, scaled to 0-255 and rounded).
        per_row: Images per row.
        rows: Rows of the grid (default: as many as the images fill).
        gap: White pixels between cells and around the grid.

    Returns:
        ``(rows * (H + gap) + gap, per_row * (W + gap) + gap, 3)`` uint8; image ``i`` is in row
        ``i // per_row``, column ``i % per_row``.
    """
    import numpy as np
    import torch

    x = (images.detach().cpu().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    n, h, w = x.shape[:3]
    if rows is None:
        rows = -(-n // per_row)
    grid = np.full((rows * (h + gap) + gap, per_row * (w + gap) + gap, 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, per_row)
        top, left = gap + r * (h + gap), gap + c * (w + gap)
        grid[top : top + h, left : left + w] = x[i]
    return grid


def format_number(x, digits: int = 3, *, missing: str = "n/a") -> str:
    """``x`` with ``digits`` decimals for tables and reports; ``missing`` for ``None`` or a float NaN.

    Example:
        >>> format_number(0.07389), format_number(None), format_number(float("nan"), 2, missing="")
        ('0.074', 'n/a', '')
    """
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return missing
    return f"{x:.{digits}f}"
