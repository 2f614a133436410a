"""Judged shares against a target: the two primitives every audit and score is built on.

They live below ``models`` so that the training audit (``fairtune.train``) and the scoring engine
(``fairtune.eval``) count labels and gaps with the same code.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def share_vector(x: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    """``x`` as a float vector over at least two classes (``ValueError`` naming ``name`` otherwise)."""
    v = np.asarray(x, dtype=np.float64)
    if v.ndim != 1 or v.size < 2:
        raise ValueError(f"{name} must be a 1-D vector over at least two classes, got shape {v.shape}")
    return v


def share_pair(p_hat, target) -> tuple[np.ndarray, np.ndarray]:
    """Judged shares and target as vectors over the same classes."""
    p, q = share_vector(p_hat, "p_hat"), share_vector(target, "target")
    if p.shape != q.shape:
        raise ValueError(f"p_hat has {p.size} classes but target has {q.size}")
    return p, q


def proportions(labels: Sequence[int] | np.ndarray, *, num_classes: int) -> tuple[np.ndarray, int, int]:
    """Judged class proportions.

    Returns:
        ``(p_hat, n, undetermined)``: proportions over the placed images, how many were placed,
        how many were not (label -1). ``p_hat`` is all-NaN when no image was placed.
    """
    y = np.asarray(labels, dtype=np.int64)
    if np.any((y < -1) | (y >= num_classes)):
        raise ValueError(f"labels must be in [-1, {num_classes - 1}], got {sorted(set(y.tolist()))}")
    placed = y[y >= 0]
    counts = np.bincount(placed, minlength=num_classes).astype(np.float64)
    n = int(placed.size)
    p = counts / n if n else np.full(num_classes, np.nan)
    return p, n, int(y.size - n)


def deviation(p_hat, *, target) -> float:
    """``max_k |p̂_k − q_k|``: the largest gap of any class from its target share."""
    p, q = share_pair(p_hat, target)
    return float(np.max(np.abs(p - q)))
