"""The one scoring engine: judged labels in, per-concept metrics and summaries out (DESIGN §6).

``compare``, ``audit``, the demo, ``sweep`` and the benchmarks all score through
:func:`score_judged` (per prompt, then :func:`summarize`), so a key such as ``mean_dev_seen_ci`` has
one meaning everywhere. Missing values are ``None`` (strict JSON), never NaN. The schema is in
docs/metrics.md.

Intervals. A deviation ``|p̂ − q|`` folds at 0, so a percentile bootstrap of it puts the estimate on
the lower edge for a balanced concept (e.g. 0.004 [0.004, 0.100]). Here every interval is derived
from intervals on the shares themselves: an exact (Clopper–Pearson) interval per class (Bonferroni over
the classes when there are more than two; with two, one interval fixes both shares: ``share_box`` of
:mod:`fairtune.eval._stats`, which holds every interval and goal check), and each metric's
interval is its range over that box of shares. Where the target lies inside the box the deviation's
lower bound is 0. The interval of a mean over ``C`` concepts is the mean of the per-concept bounds
at level ``alpha / C`` (simultaneous, so it covers at least ``1 − alpha``). tests/test_scoring.py
checks the coverage by simulation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from ._metrics import (
    KL_EPS,
    deviation,
    entry_target,
    fairness_discrepancy,
    fidelity,
    frechet_distance,
    kl_divergence,
    noise_floor,
    proportions,
    shen_bias,
)
from ._stats import ALPHA, half_width, resample_counts, share_box

ROLES = ("seen", "named", "heldout", "paraphrase", "explicit")
METRICS = ("dev", "fd", "kl", "bias")


def _dist(q: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Distance from each ``q`` to its interval (0 inside)."""
    return np.maximum(np.maximum(lo - q, q - hi), 0.0)


def _far(q: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return np.maximum(np.abs(lo - q), np.abs(hi - q))


def metric_intervals(
    counts: Sequence[int], target: Sequence[float], *, alpha: float = ALPHA
) -> dict[str, tuple[float, float] | None]:
    """Intervals of deviation, fairness discrepancy, KL and Shen's bias: each metric's range over
    the simultaneous box of class shares (:func:`share_box`). ``None`` when no image was placed."""
    c = np.asarray(counts, dtype=np.float64)
    if c.sum() <= 0:
        return {f"{m}_ci": None for m in METRICS}
    q = np.asarray(target, dtype=np.float64)
    lo, hi = share_box(c, alpha=alpha)
    near, far = _dist(q, lo, hi), _far(q, lo, hi)
    out = {
        "dev_ci": (float(near.max()), float(far.max())),
        "fd_ci": (float(np.sqrt((near**2).sum())), float(np.sqrt((far**2).sum()))),
    }
    # KL is a sum of convex per-class terms of the smoothed share: its range over the box is the sum
    # of each term's range over its interval (read on a fine grid), floored at 0.
    k = q.size
    qs = (1 - KL_EPS) * q + KL_EPS / k
    grid = lo[:, None] + (hi - lo)[:, None] * np.linspace(0, 1, 257)[None]
    ps = (1 - KL_EPS) * grid + KL_EPS / k
    terms = ps * np.log(ps / qs[:, None])
    out["kl_ci"] = (max(float(terms.min(1).sum()), 0.0), float(terms.max(1).sum()))
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
    a = np.array([lo[i] - hi[j] for i, j in pairs])
    b = np.array([hi[i] - lo[j] for i, j in pairs])
    pair_lo = np.where((a <= 0) & (b >= 0), 0.0, np.minimum(np.abs(a), np.abs(b)))
    out["bias_ci"] = (float(pair_lo.mean()), float(np.maximum(np.abs(a), np.abs(b)).mean()))
    return out


def score_concept(
    labels: Sequence[int] | np.ndarray,
    *,
    target: Sequence[float],
    concept: str = "",
    alpha: float = ALPHA,
) -> dict:
    """All fairness metrics of one concept's judged labels (``-1`` undetermined) against its target.

    Returns:
        ``concept``, ``p_hat`` (shares over placed images), ``counts``, ``target``, ``n`` (placed),
        ``undetermined``, ``dev``/``fd``/``kl``/``bias`` and their ``*_ci``, ``noise_floor`` (per class
        ``sqrt(q(1−q)/n)``); ``None`` where no image was placed.
    """
    k = len(target)
    p, n, und = proportions(labels, num_classes=k)
    y = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(y[y >= 0], minlength=k)
    values = {
        "dev": deviation(p, target=target) if n else None,
        "fd": fairness_discrepancy(p, target=target) if n else None,
        "kl": kl_divergence(p, target=target) if n else None,
        "bias": shen_bias(p) if n else None,
    }
    return {
        "concept": concept,
        "p_hat": [float(x) if n else None for x in p],
        "counts": counts.tolist(),
        "target": [float(x) for x in target],
        "n": n,
        "undetermined": und,
        **values,
        **metric_intervals(counts, target, alpha=alpha),
        "noise_floor": noise_floor(target, n=n).tolist(),
    }


def _mean(values: Sequence[float | None]) -> float | None:
    v = [x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(np.mean(v)) if v else None


def mean_interval(
    records: Sequence[Mapping], *, metric: str = "dev", alpha: float = ALPHA
) -> tuple[float, float] | None:
    """Simultaneous interval of the mean of ``metric`` over concepts: each concept's interval at
    level ``alpha / C``, then the mean of the lower and of the upper bounds."""
    scored = [r for r in records if r.get("n")]
    if not scored:
        return None
    bounds = [
        metric_intervals(r["counts"], r["target"], alpha=alpha / len(scored))[f"{metric}_ci"] for r in scored
    ]
    return float(np.mean([b[0] for b in bounds])), float(np.mean([b[1] for b in bounds]))


def summarize(per_concept: Mapping[str, Mapping], *, alpha: float = ALPHA) -> dict:
    """A method's summary from its per-prompt records (each with ``role``, ``dev`` ... as
    :func:`score_concept` writes them, plus ``fidelity``).

    Keys: per role ``mean_dev_<role>``, ``worst_dev_<role>``, ``mean_dev_<role>_ci`` and its
    ``_halfwidth``; ``explicit_kept`` (share of explicit prompts' images judged in the class they
    name, mean over those prompts; ``None`` without any); ``mean_fd_seen``, ``mean_kl_seen``,
    ``mean_bias_seen``; ``fidelity`` (mean over prompts with a concept judge); ``undetermined``,
    ``n_images``, ``undetermined_rate``.
    """
    out: dict = {}
    for role in ROLES:
        recs = [r for r in per_concept.values() if r.get("role") == role]
        devs = [r["dev"] for r in recs if r["dev"] is not None]
        out[f"mean_dev_{role}"] = _mean(devs)
        out[f"worst_dev_{role}"] = float(max(devs)) if devs else None
        ci = mean_interval(recs, alpha=alpha) if recs else None
        out[f"mean_dev_{role}_ci"] = list(ci) if ci is not None else None
        out[f"mean_dev_{role}_ci_halfwidth"] = half_width(ci)
    # Explicit prompts kept: the share of their images judged in the class they name (1 − their dev).
    explicit = [
        r["dev"] for r in per_concept.values() if r.get("role") == "explicit" and r["dev"] is not None
    ]
    out["explicit_kept"] = 1.0 - float(np.mean(explicit)) if explicit else None
    seen = [r for r in per_concept.values() if r.get("role") == "seen"]
    for m in ("fd", "kl", "bias"):
        out[f"mean_{m}_seen"] = _mean([r[m] for r in seen])
    out["fidelity"] = _mean([r.get("fidelity") for r in per_concept.values()])
    und = int(sum(r["undetermined"] for r in per_concept.values()))
    n_images = int(sum(r["n"] + r["undetermined"] for r in per_concept.values()))
    out.update(undetermined=und, n_images=n_images, undetermined_rate=und / max(n_images, 1))
    return out


def score_judged(
    judged: Mapping[str, np.ndarray | None],
    entries: Sequence,
    *,
    n_per_prompt: int,
    target_of: Callable[[str], Sequence[float]],
    classes: Sequence[str],
    concept_index: Callable[[str], int | None] = lambda c: None,
    reference_features: np.ndarray | None = None,
    frechet_roles: Sequence[str] = ("seen", "heldout"),
    drawn: Sequence[str] | None = None,
    alpha: float = ALPHA,
) -> dict:
    """Score one method's judged images, prompt by prompt, and summarise them.

    Args:
        judged: ``attribute`` labels (``-1`` undetermined), ``concept`` labels or ``None``,
            ``features`` for the Fréchet distance or ``None``; prompt-major, ``n_per_prompt`` each.
        entries: The prompts (objects with ``key``, ``group``, ``role``, ``concept``, ``prompt``).
        n_per_prompt: Images per prompt.
        target_of: The target vector of a concept.
        classes: The attribute's class names (label ``k`` is ``classes[k]``).
        concept_index: A concept's label in the concept judge's classes (``None``: not judged).
        reference_features: Features of real images (``None``: no Fréchet distance).
        frechet_roles: Prompt roles whose images enter the Fréchet distance.
        drawn: For the inference-time baselines, the class drawn for each image.
        alpha: 1 − the coverage of every interval.

    Returns:
        ``{"per_concept": {key: record}, "summary": {...}}`` (see :func:`summarize`; plus
        ``frechet`` and, with ``drawn``, ``follows_drawn_class``).
    """
    attr, conc, feats = judged["attribute"], judged.get("concept"), judged.get("features")
    classes = list(classes)
    per_concept: dict[str, dict] = {}
    for b, e in enumerate(entries):
        sl = slice(b * n_per_prompt, (b + 1) * n_per_prompt)
        r = score_concept(
            attr[sl], target=entry_target(e, target_of, classes), concept=e.concept, alpha=alpha
        )
        r.update(key=e.key, group=e.group, role=e.role, prompt=e.prompt, classes=classes)
        ci = concept_index(e.concept)
        r["fidelity"] = (
            fidelity(conc[sl], expected=np.full(n_per_prompt, ci))
            if conc is not None and ci is not None
            else None
        )
        if drawn is not None:
            d = np.array([classes.index(c) for c in drawn[sl]])
            r["drawn_share"] = (np.bincount(d, minlength=len(classes)) / len(d)).tolist()
            # Of the images the judge placed, the share whose judged class is the class drawn for it.
            placed = attr[sl] >= 0
            r["follows_drawn_class"] = float(np.mean(attr[sl][placed] == d[placed])) if placed.any() else None
        per_concept[e.key] = r
    summary = summarize(per_concept, alpha=alpha)
    summary["frechet"] = None
    if feats is not None and reference_features is not None:
        blocks = [b for b, e in enumerate(entries) if e.role in frechet_roles]
        rows = np.array([b * n_per_prompt + i for b in blocks for i in range(n_per_prompt)], dtype=np.int64)
        if len(rows) >= 2 and len(reference_features) >= 2:
            summary["frechet"] = frechet_distance(feats[rows], reference_features)
    if drawn is not None:
        summary["follows_drawn_class"] = _mean([r["follows_drawn_class"] for r in per_concept.values()])
    return {"per_concept": per_concept, "summary": summary}


# Summary figures whose sampling spread :func:`sampling_sd` reports (the rest are counts, intervals or
# derived from these).
SAMPLED = (
    *(f"{s}_dev_{role}" for role in ROLES if role != "explicit" for s in ("mean", "worst")),
    "explicit_kept",
    "fidelity",
    "frechet",
    "undetermined_rate",
)


def sampling_sd(
    judged: Mapping[str, np.ndarray | None],
    entries: Sequence,
    *,
    n_per_prompt: int,
    n_boot: int = 100,
    seed: int = 0,
    drawn: Sequence[str] | None = None,
    **score_kw,
) -> dict[str, float]:
    """How much each summary figure of one run moves with the sampling of its images: the standard
    deviation of :func:`score_judged`'s summary over ``n_boot`` resamples of the run, each made within
    every cell of images (a prompt, or a prompt's images of one drawn class where classes were drawn
    per image, so a stratified draw stays stratified):

    - the attribute labels of a cell are drawn again from its judged shares with half an image added
      to every outcome (the classes and "undetermined"; Jeffreys' prior), so a cell where every image
      landed in its class still has the chance of a miss that its images cannot rule out;
    - the concept labels and the features (fidelity, the Fréchet distance) come from half of the
      cell's images drawn without replacement, each taken twice: the half-sample's spread is the full
      sample's for a mean (the finite-population correction halves its variance), and no image is
      repeated more than twice, which a bootstrap with replacement does and which inflates a Fréchet
      distance.

    A figure measured over seeds varies with the training seed and with the images: the spread over
    a handful of seeds that share their generation seeds can miss the second part (a column every seed
    scores 0.000 has a zero-width interval, yet one image more or less moves it). Adding this
    within-run variance to the prediction interval of a newcomer's run
    (:func:`fairtune.eval.prediction_interval`) accounts for it.

    Args:
        judged: What :func:`score_judged` takes (``attribute``, ``concept``, ``features``).
        entries: The prompts.
        n_per_prompt: Images per prompt.
        n_boot: Resamples.
        seed: Seed of the resampling.
        drawn: The class drawn for each image, or ``None``.
        **score_kw: The rest of :func:`score_judged`'s arguments (``target_of``, ``classes``, ...).

    Returns:
        Figure name to its standard deviation over the resamples, for the figures of :data:`SAMPLED`
        the summary has (``None`` values skipped).
    """
    if n_boot < 2:
        raise ValueError(f"sampling_sd needs n_boot >= 2, got {n_boot}")
    rng = np.random.default_rng(seed)
    cells: list[np.ndarray] = []
    for b in range(len(entries)):
        rows = np.arange(b * n_per_prompt, (b + 1) * n_per_prompt)
        if drawn is None:
            cells.append(rows)
        else:
            keys = np.array([drawn[i] for i in rows])
            cells += [rows[keys == k] for k in dict.fromkeys(keys.tolist())]
    attr = np.asarray(judged["attribute"], dtype=np.int64)
    k = len(score_kw["classes"])
    # Per cell, the outcomes -1 (undetermined), 0 .. k-1, smoothed by half an image each.
    smoothed = [(np.bincount(attr[c] + 1, minlength=k + 1) + 0.5) / (len(c) + 0.5 * (k + 1)) for c in cells]
    others = {key: judged.get(key) for key in ("concept", "features")}
    others = {key: None if v is None else np.asarray(v) for key, v in others.items()}
    values: dict[str, list[float]] = {key: [] for key in SAMPLED}
    for _ in range(n_boot):
        labels = np.empty_like(attr)
        idx = np.empty(len(attr), dtype=np.int64)
        for c, p in zip(cells, smoothed):
            labels[c] = np.repeat(np.arange(-1, k), resample_counts(len(c), p, rng))
            half = rng.choice(c, size=(len(c) + 1) // 2, replace=False)
            idx[c] = np.repeat(half, 2)[: len(c)]
        rep = {"attribute": labels, **{key: None if v is None else v[idx] for key, v in others.items()}}
        summary = score_judged(rep, entries, n_per_prompt=n_per_prompt, drawn=drawn, **score_kw)["summary"]
        for key in SAMPLED:
            if summary.get(key) is not None:
                values[key].append(float(summary[key]))
    return {key: float(np.std(v, ddof=1)) for key, v in values.items() if len(v) >= 2}
