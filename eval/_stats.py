"""Every interval and goal check of fairtune, in one place.

- **Binomial shares**: :func:`exact_interval` (Clopper–Pearson, the scoring engine's),
  :func:`share_box` (simultaneous exact intervals on every class share), and two approximations kept
  to show where they fail: :func:`wilson_interval` and :func:`wald_interval`.
- **Over seeds**: :func:`t_interval` (Student-t interval of the mean), :func:`seed_summary` (mean,
  interval, count and values of one metric over seeds) and :func:`prediction_interval` (where one more
  seed's run falls).
- **Bootstrap** (the judge-error correction's and the change score's): :func:`bootstrap_shares`
  (label shares of sets resampled with replacement), :func:`resample_shares` (the same from the shares
  alone, multinomial), :func:`bootstrap_means` and :func:`percentile_interval`.
- **Goals**: a :class:`Goal` is a metric, a comparator (``<=`` or ``>=``), a bound and optionally a
  bound on the half-width of the metric's interval; :func:`check_goal` says whether a value meets it.

Missing values are ``None``; ``nan`` inputs are dropped or reported as not measured, never compared.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Literal

import numpy as np

ALPHA = 0.05


# -- binomial shares -------------------------------------------------------------------------------


def wilson_interval(count: np.ndarray, n: int, *, alpha: float = ALPHA) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval of binomial proportions ``count / n`` (elementwise), level ``1 − alpha``.

    Shorter than the exact interval, but its coverage dips below the nominal level for some shares
    (e.g. 0.93 at p = 0.9, N = 128); the engine uses :func:`exact_interval`."""
    z = NormalDist().inv_cdf(1 - alpha / 2)
    x = np.asarray(count, dtype=np.float64)
    denom = n + z * z
    centre = (x + z * z / 2) / denom
    half = z / denom * np.sqrt(x * (n - x) / n + z * z / 4)
    return np.clip(centre - half, 0, 1), np.clip(centre + half, 0, 1)


def wald_interval(share, n: int, *, z: float = 1.96):
    """The textbook normal-approximation interval ``share ± z·√(share(1 − share)/n)`` (elementwise,
    not clipped to [0, 1]); its coverage falls short near 0 and 1 and under judge error."""
    half = z * np.sqrt(share * (1 - share) / n)
    return share - half, share + half


def exact_interval(count: np.ndarray, n: int, *, alpha: float = ALPHA) -> tuple[np.ndarray, np.ndarray]:
    """Clopper–Pearson (exact) interval of binomial proportions ``count / n``: coverage at least
    ``1 − alpha`` for every true share."""
    from scipy.stats import beta

    x = np.asarray(count, dtype=np.float64)
    lo = np.where(x > 0, beta.ppf(alpha / 2, np.maximum(x, 1e-12), n - x + 1), 0.0)
    hi = np.where(x < n, beta.ppf(1 - alpha / 2, x + 1, np.maximum(n - x, 1e-12)), 1.0)
    return np.nan_to_num(lo, nan=0.0), np.nan_to_num(hi, nan=1.0)


def share_box(counts: Sequence[int], *, alpha: float = ALPHA) -> tuple[np.ndarray, np.ndarray]:
    """Simultaneous intervals on every class share: exact per class, Bonferroni over classes (K > 2)."""
    c = np.asarray(counts, dtype=np.float64)
    k = c.size
    return exact_interval(c, int(c.sum()), alpha=alpha if k == 2 else alpha / k)


# -- over seeds ------------------------------------------------------------------------------------


def t_interval(values: Sequence[float | None], confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean and the two ends of the Student-t interval of the mean (``nan`` ends for fewer than 2;
    ``None`` and ``nan`` values are dropped)."""
    from scipy import stats

    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if len(x) == 0:
        return math.nan, math.nan, math.nan
    mean = float(x.mean())
    if len(x) < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + confidence / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return mean, mean - half, mean + half


def half_width(ci: Sequence[float] | None) -> float | None:
    """Half the width of an interval ``[low, high]`` (``None`` without one)."""
    return None if ci is None else (ci[1] - ci[0]) / 2


def prediction_interval(summary: Mapping, sampling_sd: float | None = None) -> list[float] | None:
    """The 95% prediction interval of one more run (a newcomer's seed) under the Student-t model of a
    :func:`seed_summary`: ``mean ± t·sd·√(1 + 1/n)``, the interval of the mean (``ci``) widened by
    ``√(n + 1)``. With ``sampling_sd`` (``s``: the spread one run's figure has from the sampling of its
    images alone, e.g. the root mean square over seeds of :func:`fairtune.eval.sampling_sd`), the two
    parts add in quadrature: ``mean ± √((t·sd·√(1 + 1/n))² + (z·s)²)``, ``z`` the normal quantile (``s``
    comes from many resamples, not from the ``n`` seeds). ``None`` where the summary has no interval
    (fewer than two values)."""
    if summary.get("ci") is None:
        return None
    half = half_width(summary["ci"]) * math.sqrt(summary["n"] + 1)
    if sampling_sd:
        from scipy import stats

        z = float(stats.norm.ppf(1 - ALPHA / 2))
        half = math.sqrt(half**2 + (z * sampling_sd) ** 2)
    return [summary["mean"] - half, summary["mean"] + half]


def seed_summary(
    values: Sequence[float | None],
    *,
    prediction: bool = False,
    sampling_sd: float | None = None,
    bounds: tuple[float, float] | None = None,
) -> dict:
    """One metric over seeds: ``mean``, its 95% Student-t interval ``ci`` (``None`` with one value),
    ``n`` and the ``values`` (``None`` and ``nan`` dropped); with ``prediction``, also ``range``
    (:func:`prediction_interval`, widened by ``sampling_sd``, kept as ``sampling_sd``, and clipped to
    the metric's ``bounds``, e.g. ``(0, 1)`` for a share)."""
    v = [float(x) for x in values if x is not None and not math.isnan(float(x))]
    if not v:
        out = {"mean": None, "ci": None, "n": 0, "values": []}
    elif len(v) == 1:
        out = {"mean": v[0], "ci": None, "n": 1, "values": v}
    else:
        mean, lo, hi = t_interval(v)
        out = {"mean": mean, "ci": [lo, hi], "n": len(v), "values": v}
    if prediction:
        out["range"] = prediction_interval(out, sampling_sd)
        if out["range"] is not None and bounds is not None:
            out["range"] = [max(out["range"][0], bounds[0]), min(out["range"][1], bounds[1])]
        if sampling_sd is not None:
            out["sampling_sd"] = float(sampling_sd)
    return out


# -- bootstrap -------------------------------------------------------------------------------------


def bootstrap_shares(labels, n_levels: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``(n_boot, n_levels)``: the share of each level ``0 .. n_levels − 1`` in ``n_boot`` resamples
    (with replacement, same size) of ``labels``."""
    x = np.asarray(labels)
    draw = x[rng.integers(0, len(x), size=(n_boot, len(x)))]
    return np.stack([np.bincount(d, minlength=n_levels) for d in draw]) / len(x)


def resample_shares(shares, n: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``(n_boot, K)``: the shares of ``n_boot`` sets of ``n`` labels drawn with the given ``shares``
    (the bootstrap of a labelled set from its shares alone)."""
    return rng.multinomial(n, shares, size=n_boot) / n


def resample_counts(n: int, shares, rng: np.random.Generator) -> np.ndarray:
    """The class counts of one set of ``n`` labels drawn with the given ``shares`` (one parametric
    resample of a labelled set)."""
    return rng.multinomial(n, shares)


def bootstrap_means(values, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``(n_boot,)`` means of resamples (with replacement, same size) of ``values``."""
    d = np.asarray(values)
    return d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(1)


def percentile_interval(low_samples, high_samples=None, *, level: float = 0.95, axis: int | None = None):
    """Percentile bootstrap interval at coverage ``level``: the ``(1 − level)/2`` quantile of
    ``low_samples`` and the ``1 − (1 − level)/2`` quantile of ``high_samples`` (``low_samples`` when
    not given; two arrays where each replicate gives a range rather than a point)."""
    alpha = (1 - level) / 2
    high = low_samples if high_samples is None else high_samples
    return np.quantile(low_samples, alpha, axis=axis), np.quantile(high, 1 - alpha, axis=axis)


# -- goals -----------------------------------------------------------------------------------------

_SYMBOL = {"<=": "≤", ">=": "≥"}


@dataclass(frozen=True)
class Goal:
    """A goal on one metric: ``metric op bound`` and, with ``max_halfwidth``, the half-width of the
    metric's interval at most that.

    Attributes:
        metric: The metric's key.
        op: ``"<="`` (at most ``bound``) or ``">="`` (at least ``bound``).
        bound: The bound.
        max_halfwidth: A bound on the interval's half-width (``None``: none).
    """

    metric: str
    op: Literal["<=", ">="]
    bound: float
    max_halfwidth: float | None = None

    def __post_init__(self):
        if self.op not in _SYMBOL:
            raise ValueError(f"goal on {self.metric}: op must be '<=' or '>=', not {self.op!r}")

    @classmethod
    def from_mapping(cls, goal: Mapping) -> Goal:
        """A goal written ``{metric, max | min[, max_halfwidth]}`` (a sweep spec's ``goals:`` entry)."""
        op, bound = ("<=", goal["max"]) if "max" in goal else (">=", goal["min"])
        return cls(goal["metric"], op, bound, goal.get("max_halfwidth"))

    @property
    def text(self) -> str:
        """``≤ 0.04`` / ``≥ 0.98``."""
        return f"{_SYMBOL[self.op]} {self.bound}"


def _missing(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def check_goal(goal: Goal, value: float | None, halfwidth: float | None = None) -> dict:
    """Whether ``value`` (and, for a goal with ``max_halfwidth``, its interval's ``halfwidth``) meets
    ``goal``.

    Returns:
        ``met``: the value against the bound (``None``: not measured, ``value`` missing or ``nan``);
        ``missed_by``: 0 when met, else ``|value − bound|`` (``None`` when not measured);
        ``halfwidth_met``: the half-width against ``max_halfwidth`` (``None`` without that bound or
        without an interval); ``all_met``: every part of the goal met (``None`` if any is unmeasured).
    """
    if _missing(value):
        met, missed = None, None
    else:
        met = bool(value <= goal.bound if goal.op == "<=" else value >= goal.bound)
        missed = 0.0 if met else abs(value - goal.bound)
    hw_met = None
    if goal.max_halfwidth is not None and not _missing(halfwidth):
        hw_met = bool(halfwidth <= goal.max_halfwidth)
    parts = [met] + ([hw_met] if goal.max_halfwidth is not None else [])
    all_met = None if any(p is None for p in parts) else all(parts)
    return {"met": met, "missed_by": missed, "halfwidth_met": hw_met, "all_met": all_met}


def check_goals(goals: Sequence[Mapping], means: Mapping[str, Mapping[str, float | None]]) -> list[dict]:
    """Goals written as a sweep spec writes them against arms' values: each goal
    ``{arm, metric, max | min[, relative_to[, as: ratio]]}`` is checked (:func:`check_goal`) on
    ``means[arm][metric]``, or with ``relative_to`` on ``arm − reference`` (``as: ratio``: ``arm /
    reference``).

    Returns:
        Per goal: the goal's fields, ``value`` (what was checked: the difference or ratio where a
        reference is named; ``None`` where a value is missing), ``met`` and ``missed_by``.
    """
    out = []
    for g in goals:
        m = g["metric"]
        v = (means.get(g["arm"]) or {}).get(m)
        ref_arm = g.get("relative_to")
        if ref_arm is not None and not _missing(v):
            ref = (means.get(ref_arm) or {}).get(m)
            ratio = g.get("as", "difference") == "ratio"
            v = None if _missing(ref) or (ratio and ref == 0) else (v / ref if ratio else v - ref)
        c = check_goal(Goal.from_mapping(g), v)
        out.append({**g, "value": v, "met": c["met"], "missed_by": c["missed_by"]})
    return out
