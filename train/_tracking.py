"""``image_grid``: images as one grid array (used by :class:`fairtune.train.SampleGrid`).

The loggers, redaction and the tracking callbacks live in ``_loggers`` and ``_monitors``; this module
keeps ``image_grid`` until it is folded into the shared utility module.
"""

from __future__ import annotations

import numpy as np
import torch


def image_grid(images: torch.Tensor, per_row: int) -> np.ndarray:
    """``(N, 3, H, W)`` images in [0, 1] to one ``(rows*H, per_row*W, 3)`` uint8 grid (white padding)."""
    x = (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    n, h, w, _ = x.shape
    rows = -(-n // per_row)
    grid = np.full((rows * h, per_row * w, 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, per_row)
        grid[r * h : (r + 1) * h, c * w : (c + 1) * w] = x[i]
    return grid
