"""Fairness, fidelity and quality metrics (DESIGN §6), keyword-only and sklearn-shaped.

Conventions: ``p_hat`` and ``target`` are proportion vectors over the same classes; judged labels
are class indices with ``-1`` for images the judge cannot place (counted, reported, and left out of
``p_hat``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from fairtune.data import deviation, proportions, share_pair, share_vector  # noqa: F401 - the facade re-exports the first two

KL_EPS = 1e-3
"""Smoothing for :func:`kl_divergence`: p and q are mixed with ``eps`` of the uniform vector."""


def fairness_discrepancy(p_hat, *, target) -> float:
    """``||p̂ − q||_2`` (Choi et al., 2020)."""
    p, q = share_pair(p_hat, target)
    return float(np.linalg.norm(p - q))


def kl_divergence(p_hat, *, target, eps: float = KL_EPS) -> float:
    """``KL(p̃ || q̃)`` in nats, where ``x̃ = (1 − eps)·x + eps/K`` keeps empty classes finite."""
    p, q = share_pair(p_hat, target)
    k = p.size
    p = (1 - eps) * p + eps / k
    q = (1 - eps) * q + eps / k
    return float(np.sum(p * np.log(p / q)))


def shen_bias(p_hat) -> float:
    """Shen et al.'s bias against a uniform target: ``mean_{i<j} |p̂_i − p̂_j|`` (2|p̂ − ½| for K=2)."""
    p = share_vector(p_hat, "p_hat")
    gaps = [abs(p[i] - p[j]) for i in range(p.size) for j in range(i + 1, p.size)]
    return float(np.mean(gaps))


def noise_floor(target, *, n: int) -> np.ndarray:
    """Per class, the sampling standard deviation ``sqrt(q(1−q)/N)`` of a perfectly fair model."""
    q = share_vector(target, "target")
    return np.sqrt(q * (1 - q) / max(n, 1))


def fidelity(predicted: Sequence[int] | np.ndarray, *, expected: Sequence[int] | np.ndarray) -> float:
    """Share of images whose concept the judge recognises (prediction equals the prompted concept)."""
    a, b = np.asarray(predicted), np.asarray(expected)
    if a.shape != b.shape:
        raise ValueError(f"predicted has shape {a.shape} but expected has {b.shape}")
    return float(np.mean(a == b)) if a.size else math.nan


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (FID's formula).

    ``||μ_a − μ_b||² + Tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^{1/2})``.
    """
    from scipy import linalg

    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must be (N, D) with equal D, got {a.shape} and {b.shape}")
    if min(len(a), len(b)) < 2:
        raise ValueError("each feature set needs at least two samples")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # scipy >= 1.16 deprecated (and later removed) sqrtm's ``disp``; the plain call works in every
    # version (older ones return the matrix alone when disp is left at its default).
    covmean = linalg.sqrtm(s_a @ s_b)
    if not np.isfinite(covmean).all():
        # Near-singular product: regularise as the reference FID code does.
        off = np.eye(s_a.shape[0]) * 1e-6
        covmean = linalg.sqrtm((s_a + off) @ (s_b + off))
    covmean = np.real(covmean)
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(covmean))


def entry_target(entry, target_of, classes) -> list[float]:
    """The target of one prompt: for an explicit prompt (``entry.names`` set), the class it names;
    else its concept's (``target_of(entry.concept)``).

    Raises:
        ValueError: An explicit prompt names a class that is not one of ``classes``.
    """
    names = getattr(entry, "names", None)
    if names is None:
        return list(target_of(entry.concept))
    if names not in classes:
        raise ValueError(f"prompt {entry.key!r} names class {names!r}, which is not one of {list(classes)}")
    return [float(c == names) for c in classes]
