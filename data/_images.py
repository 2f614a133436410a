"""Image tensors from tables."""

from __future__ import annotations

import numpy as np
import torch


def images_from_table(table) -> torch.Tensor:
    """A ``datasets`` table's ``image`` column as a ``(N, 3, H, W)`` float tensor in [0, 1]."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in table["image"]])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0
