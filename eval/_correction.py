"""Measuring with imperfect judges: error correction of judged shares, judge agreement, change score.

Pure functions over numpy arrays of class indices (``-1`` = the judge could not place the image).

- **Judge-error correction** (as CLEAM, Teo et al., ICCV 2023): a judge with confusion matrix ``C``
  (``C[i, j]`` = P(judged j | true i), measured on labelled held-out images, with a column for
  "undetermined") turns true shares ``p`` into expected judged shares ``C^T p``. The corrected share
  solves ``C^T p = p_judged`` by least squares over the probability simplex. Its interval is a
  bootstrap over both the generated images' judged labels and the calibration set, so it carries
  the calibration's own uncertainty (resampled, and read off as a percentile interval, by the
  bootstrap of :mod:`fairtune.eval._stats`). Where the judge cannot tell some classes apart (``C``
  loses rank: a constant judge, two classes judged alike), the judged shares fit a whole set of true
  shares, and each replicate contributes that set's bounds instead of one arbitrary point: a judge
  that carries no information gives ``[0, 1]``. :func:`judge_quality` says when a judge is near
  chance.
- **Agreement of two judges**: raw agreement and Cohen's kappa on images both could place.
- **Same-seed change score**: mean feature distance between the base model's and the adapter's image
  generated from the same noise and prompt ("how much did debiasing change each picture").
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from ._metrics import entry_target
from ._stats import bootstrap_means, bootstrap_shares, percentile_interval, resample_shares

UNDETERMINED = -1


def _labels(x, name: str, n_classes: int) -> np.ndarray:
    a = np.asarray(x, dtype=np.int64).ravel()
    bad = (a < UNDETERMINED) | (a >= n_classes)
    if bad.any():
        raise ValueError(
            f"{name}: label {int(a[bad][0])} outside 0..{n_classes - 1} (or -1 for undetermined)"
        )
    return a


def confusion_matrix(true, judged, n_classes: int) -> np.ndarray:
    """Row-normalised confusion of a judge on labelled images.

    Args:
        true: ``(n,)`` true class per image, in ``0..K-1``.
        judged: ``(n,)`` judged class per image, ``-1`` where the judge could not place it.
        n_classes: ``K``.

    Returns:
        ``(K, K + 1)``: row ``i`` is P(judged j | true i) for ``j < K`` and, in the last column,
        P(undetermined | true i).

    Raises:
        ValueError: a true label is undetermined or out of range, the lengths differ, or a class has
            no calibration image (its row cannot be measured).
    """
    t = _labels(true, "true", n_classes)
    j = _labels(judged, "judged", n_classes)
    if len(t) != len(j):
        raise ValueError(f"true ({len(t)}) and judged ({len(j)}) labels differ in length")
    if (t < 0).any():
        raise ValueError("true labels of the calibration set must all be known (no -1)")
    counts = np.zeros((n_classes, n_classes + 1))
    np.add.at(counts, (t, np.where(j < 0, n_classes, j)), 1.0)
    rows = counts.sum(1, keepdims=True)
    if (rows == 0).any():
        missing = [int(i) for i in np.flatnonzero(rows[:, 0] == 0)]
        raise ValueError(f"no calibration image of class(es) {missing}: the confusion cannot be measured")
    return counts / rows


def judged_shares(judged, n_classes: int) -> np.ndarray:
    """``(K + 1,)`` shares of each judged class and, last, of undetermined images (sums to 1)."""
    j = _labels(judged, "judged", n_classes)
    if len(j) == 0:
        raise ValueError("no judged images")
    return np.bincount(np.where(j < 0, n_classes, j), minlength=n_classes + 1) / len(j)


def solve_shares(confusion: np.ndarray, judged: np.ndarray) -> np.ndarray:
    """The true-class shares ``p`` on the simplex that best explain ``judged`` (least squares).

    Args:
        confusion: ``(K, K + 1)`` (or ``(K, K)``) row-stochastic confusion matrix.
        judged: Judged shares, same length as a row of ``confusion``.

    Returns:
        ``(K,)`` non-negative shares summing to 1: the exact inverse when it lies on the simplex,
        else the constrained least-squares solution.
    """
    from scipy.optimize import nnls

    c = np.asarray(confusion, dtype=np.float64)
    b = np.asarray(judged, dtype=np.float64)
    if c.shape[1] != b.shape[0]:
        raise ValueError(f"confusion has {c.shape[1]} judged columns, judged shares have {b.shape[0]}")
    k = c.shape[0]
    # min ||C^T p - b||^2 subject to p >= 0 and sum p = 1 (the sum enforced by a heavy extra row).
    w = 1e3
    a = np.vstack([c.T, w * np.ones((1, k))])
    rhs = np.concatenate([b, [w]])
    p, _ = nnls(a, rhs)
    s = p.sum()
    return p / s if s > 0 else np.full(k, 1.0 / k)


def _degenerate(confusion: np.ndarray) -> bool:
    """Whether ``C^T p`` fails to pin ``p`` down on the simplex (some direction with zero sum is
    judged the same: ``[C^T; 1]`` has rank below ``K``)."""
    k = confusion.shape[0]
    a = np.vstack([confusion.T, np.ones((1, k))])
    return int(np.linalg.matrix_rank(a, tol=1e-9)) < k


def share_bounds(confusion: np.ndarray, judged: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per class, the least and greatest true share among every ``p`` on the simplex that explains
    ``judged`` as well as the least-squares solution does (its identified set).

    Args:
        confusion: ``(K, K + 1)`` row-stochastic confusion matrix.
        judged: ``(K + 1,)`` judged shares.

    Returns:
        ``(low, high)``, each ``(K,)``; equal to the solution itself where ``C`` has full rank, and
        ``[0, 1]`` per class for a judge that calls every image the same.
    """
    from scipy.optimize import linprog

    c = np.asarray(confusion, dtype=np.float64)
    p = solve_shares(c, judged)
    if not _degenerate(c):
        return p, p.copy()
    k = c.shape[0]
    a_eq = np.vstack([c.T, np.ones((1, k))])
    b_eq = np.concatenate([c.T @ p, [1.0]])
    low, high = p.copy(), p.copy()
    for i in range(k):
        for sign, out in ((1.0, low), (-1.0, high)):
            cost = np.zeros(k)
            cost[i] = sign
            res = linprog(cost, A_eq=a_eq, b_eq=b_eq, bounds=[(0, None)] * k, method="highs")
            if res.status == 0:
                out[i] = float(np.clip(res.x[i], 0.0, 1.0))
    return low, high


def judge_quality(true, judged, n_classes: int) -> dict:
    """How much a judge knows, from its labels on calibration images.

    Returns:
        ``accuracy``; ``balanced_accuracy`` (mean recall over classes, undetermined counted wrong);
        ``chance`` (``1 / K``); ``informative``: ``False`` when the balanced accuracy is within 0.1
        of chance, or the confusion cannot separate the classes (the corrected shares then span what
        the data allow, up to ``[0, 1]``).
    """
    ct = _labels(true, "calibration_true", n_classes)
    cj = _labels(judged, "calibration_judged", n_classes)
    conf = confusion_matrix(ct, cj, n_classes)
    balanced = float(np.mean(np.diag(conf[:, :n_classes])))
    chance = 1.0 / n_classes
    return {
        "accuracy": float(np.mean(ct == cj)),
        "balanced_accuracy": balanced,
        "chance": chance,
        "informative": bool(balanced >= chance + 0.1 and not _degenerate(conf)),
    }


def corrected_shares(
    judged,
    calibration_true,
    calibration_judged,
    n_classes: int,
    *,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    target=None,
    confusion_boot: np.ndarray | None = None,
) -> dict:
    """Judged shares corrected for the judge's own error, with a bootstrap interval.

    Args:
        judged: ``(N,)`` the judge's labels on generated images (``-1`` = undetermined).
        calibration_true: ``(M,)`` true labels of held-out labelled images.
        calibration_judged: ``(M,)`` the same judge's labels on them.
        n_classes: ``K``.
        n_boot: Bootstrap replicates; each resamples the generated labels and, per true class,
            the calibration images, and re-solves.
        level: Interval coverage.
        seed: Seed of the bootstrap.
        target: ``(K,)`` target mix; with it, ``dev`` (``max_k |p_k − q_k|`` of the corrected shares)
            and its percentile interval ``dev_low``/``dev_high`` are added.
        confusion_boot: ``(n_boot, K, K + 1)`` resampled confusion matrices to reuse (see
            :func:`bootstrap_confusions`; e.g. one set for every prompt of a comparison).

    Returns:
        ``judged``: ``(K,)`` raw judged shares among all images (undetermined included in the
        denominator); ``undetermined``: the undetermined rate; ``corrected``: ``(K,)`` corrected
        true-class shares; ``low``/``high``: ``(K,)`` percentile interval (of each replicate's
        identified set where the judge cannot tell classes apart); ``identified``: whether the
        observed confusion pins the shares down to one point; ``confusion``:
        ``(K, K + 1)``; ``n``, ``n_calibration``.
    """
    j = _labels(judged, "judged", n_classes)
    ct = _labels(calibration_true, "calibration_true", n_classes)
    cj = _labels(calibration_judged, "calibration_judged", n_classes)
    conf = confusion_matrix(ct, cj, n_classes)
    b = judged_shares(j, n_classes)
    point = solve_shares(conf, b)
    rng = np.random.default_rng(seed)
    c_boot = (
        confusion_boot if confusion_boot is not None else bootstrap_confusions(ct, cj, n_classes, n_boot, rng)
    )
    if c_boot.shape != (n_boot, n_classes, n_classes + 1):
        raise ValueError(
            f"confusion_boot has shape {c_boot.shape}, expected {(n_boot, n_classes, n_classes + 1)}"
        )
    b_boot = resample_shares(b, len(j), n_boot, rng)
    # Each replicate gives the bounds of the shares it cannot tell apart (one point where the
    # confusion has full rank); replicates that repeat a degenerate (C, b) are solved once.
    lows, highs = np.empty((n_boot, n_classes)), np.empty((n_boot, n_classes))
    solved: dict = {}
    for r in range(n_boot):
        if _degenerate(c_boot[r]):
            key = (np.round(c_boot[r], 9).tobytes(), np.round(b_boot[r], 9).tobytes())
            if key not in solved:
                solved[key] = share_bounds(c_boot[r], b_boot[r])
            lows[r], highs[r] = solved[key]
        else:
            lows[r] = highs[r] = solve_shares(c_boot[r], b_boot[r])
    point_low, point_high = share_bounds(conf, b)
    extra = {}
    if target is not None:
        q = np.asarray(target, dtype=np.float64)
        # over a box of shares: the least dev is the farthest class's distance to its range, the
        # greatest the farthest end (exact for two classes, conservative beyond)
        dev_lo = np.maximum(np.maximum(lows - q, q - highs), 0.0).max(1)
        dev_hi = np.maximum(np.abs(lows - q), np.abs(highs - q)).max(1)
        dev_low, dev_high = percentile_interval(dev_lo, dev_hi, level=level)
        extra = {
            "dev": float(np.abs(point - q).max()),
            "dev_low": float(dev_low),
            "dev_high": float(dev_high),
        }
    low, high = percentile_interval(lows, highs, level=level, axis=0)
    return {
        **extra,
        "judged": b[:n_classes],
        "undetermined": float(b[n_classes]),
        "corrected": point,
        "low": np.minimum(low, point_low),
        "high": np.maximum(high, point_high),
        "identified": not _degenerate(conf),
        "confusion": conf,
        "n": int(len(j)),
        "n_calibration": int(len(ct)),
    }


def bootstrap_confusions(true, judged, n_classes: int, n_boot: int, rng) -> np.ndarray:
    """``(n_boot, K, K + 1)`` confusion matrices of calibration sets resampled within each true class."""
    ct = _labels(true, "calibration_true", n_classes)
    cj = _labels(judged, "calibration_judged", n_classes)
    confusion_matrix(ct, cj, n_classes)  # validates: every class present, no unknown true label
    cj_col = np.where(cj < 0, n_classes, cj)
    rows = [bootstrap_shares(cj_col[ct == k], n_classes + 1, n_boot, rng) for k in range(n_classes)]
    return np.stack(rows, axis=1)


def judge_agreement(a, b, n_classes: int) -> dict:
    """How well two judges agree on the same images.

    Args:
        a: ``(N,)`` labels of judge A (``-1`` = undetermined).
        b: ``(N,)`` labels of judge B on the same images.
        n_classes: ``K``.

    Returns:
        ``agreement``: share of images both placed on which they agree; ``kappa``: Cohen's kappa on
        those images (agreement beyond chance; ``nan`` when chance agreement is 1); ``n_both``:
        images both placed; ``undetermined_a``/``undetermined_b``: each judge's undetermined rate;
        ``agreement_all``: agreement over all images, undetermined counted as its own label.
    """
    x = _labels(a, "a", n_classes)
    y = _labels(b, "b", n_classes)
    if len(x) != len(y):
        raise ValueError(f"the judges labelled different numbers of images ({len(x)} vs {len(y)})")
    if len(x) == 0:
        raise ValueError("no images")
    both = (x >= 0) & (y >= 0)
    out = {
        "n": int(len(x)),
        "n_both": int(both.sum()),
        "undetermined_a": float((x < 0).mean()),
        "undetermined_b": float((y < 0).mean()),
        "agreement_all": float((x == y).mean()),
        "agreement": float("nan"),
        "kappa": float("nan"),
    }
    if not both.any():
        return out
    xb, yb = x[both], y[both]
    po = float((xb == yb).mean())
    pe = float(
        (np.bincount(xb, minlength=n_classes) / len(xb)) @ (np.bincount(yb, minlength=n_classes) / len(yb))
    )
    out["agreement"] = po
    out["kappa"] = (po - pe) / (1 - pe) if pe < 1 - 1e-12 else float("nan")
    return out


def change_score(
    base,
    adapter,
    *,
    metric: Literal["cosine", "l2"] = "cosine",
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict:
    """Same-seed change score: how far each adapter image moved from the base model's image made from
    the same noise and prompt, in a feature space (e.g. CLIP image embeddings).

    Args:
        base: ``(N, D)`` features of the base model's images.
        adapter: ``(N, D)`` features of the adapter's images, row ``i`` from the same seed as ``base[i]``.
        metric: ``cosine`` (1 − cosine similarity, in [0, 2]) or ``l2`` (Euclidean distance).
        n_boot: Bootstrap replicates of the mean (over image pairs).
        level: Interval coverage.
        seed: Seed of the bootstrap.

    Returns:
        ``mean``, ``low``, ``high`` (bootstrap interval of the mean), ``median``, ``n``, ``metric``
        and ``per_image`` (``(N,)`` distances).
    """
    x = np.asarray(base, dtype=np.float64)
    y = np.asarray(adapter, dtype=np.float64)
    if x.ndim != 2 or x.shape != y.shape:
        raise ValueError(f"base {x.shape} and adapter {y.shape} features must be the same (N, D) shape")
    if len(x) == 0:
        raise ValueError("no image pairs")
    if metric == "cosine":
        nx = np.linalg.norm(x, axis=1).clip(1e-12)
        ny = np.linalg.norm(y, axis=1).clip(1e-12)
        d = np.clip(1.0 - (x * y).sum(1) / (nx * ny), 0.0, 2.0)  # rounding can dip below 0
    elif metric == "l2":
        d = np.linalg.norm(x - y, axis=1)
    else:
        raise ValueError(f"metric must be 'cosine' or 'l2', not {metric!r}")
    low, high = percentile_interval(bootstrap_means(d, n_boot, np.random.default_rng(seed)), level=level)
    return {
        "metric": metric,
        "mean": float(d.mean()),
        "low": float(low),
        "high": float(high),
        "median": float(np.median(d)),
        "n": int(len(d)),
        "per_image": d,
    }


def score_measurement(
    labels,
    entries,
    *,
    n_per_prompt: int,
    n_classes: int,
    target_of,
    calibration: tuple | None = None,
    second=None,
    n_boot: int = 1000,
    seed: int = 0,
    classes=None,
) -> dict:
    """What an imperfect judge adds to one method's scores, prompt by prompt and in summary.

    Args:
        labels: ``(P * n_per_prompt,)`` the judge's labels, prompt-major (``-1`` undetermined).
        entries: The prompts (objects with ``key`` and ``role`` and ``concept``), in that order.
        n_per_prompt: Images per prompt.
        n_classes: ``K``.
        target_of: The target vector of a concept.
        calibration: ``(true, judged)`` labels of the same judge on labelled held-out images; with it,
            per prompt ``corrected`` shares, their interval and the corrected ``dev``.
        second: A second judge's labels on the same images; with it, per prompt and overall
            agreement and Cohen's kappa.
        n_boot: Bootstrap replicates of the corrected intervals.
        seed: Seed of the bootstraps.
        classes: The class names; with them an explicit prompt (``entry.names``) is scored against
            the class it names.

    Returns:
        ``{"per_concept": {key: {...}}, "summary": {...}}``: per prompt ``corrected``,
        ``corrected_low``, ``corrected_high``, ``dev_corrected`` (+ ``_low``/``_high``),
        ``agreement``, ``kappa``; summary ``mean_dev_corrected_<role>``, ``agreement``, ``kappa``,
        ``undetermined_rate_second``, ``calibration_accuracy``, ``calibration_balanced_accuracy``,
        ``judge_informative`` (see :func:`judge_quality`) and ``n_calibration``.
    """
    y = np.asarray(labels, dtype=np.int64)
    y2 = None if second is None else np.asarray(second, dtype=np.int64)
    c_boot = None
    if calibration is not None:  # one set of resampled confusions, shared by every prompt
        c_boot = bootstrap_confusions(
            calibration[0], calibration[1], n_classes, n_boot, np.random.default_rng(seed)
        )
    per: dict = {}
    for b, e in enumerate(entries):
        sl = slice(b * n_per_prompt, (b + 1) * n_per_prompt)
        r: dict = {}
        if calibration is not None:
            c = corrected_shares(
                y[sl], calibration[0], calibration[1], n_classes,
                n_boot=n_boot, seed=seed + b + 1, confusion_boot=c_boot,
                target=entry_target(e, target_of, classes) if classes is not None else target_of(e.concept),
            )  # fmt: skip
            r.update(
                corrected=c["corrected"].tolist(),
                corrected_low=c["low"].tolist(),
                corrected_high=c["high"].tolist(),
                dev_corrected=c["dev"],
                dev_corrected_low=c["dev_low"],
                dev_corrected_high=c["dev_high"],
            )
        if y2 is not None:
            a = judge_agreement(y[sl], y2[sl], n_classes)
            r.update(agreement=a["agreement"], kappa=a["kappa"], undetermined_second=a["undetermined_b"])
        per[e.key] = r
    summary: dict = {}
    if calibration is not None:
        quality = judge_quality(calibration[0], calibration[1], n_classes)
        summary["calibration_accuracy"] = quality["accuracy"]
        summary["calibration_balanced_accuracy"] = quality["balanced_accuracy"]
        summary["judge_informative"] = quality["informative"]
        summary["n_calibration"] = int(len(calibration[0]))
        for role in ("seen", "named", "heldout", "paraphrase", "explicit"):
            devs = [per[e.key]["dev_corrected"] for e in entries if e.role == role]
            summary[f"mean_dev_corrected_{role}"] = float(np.mean(devs)) if devs else None
    if y2 is not None:
        a = judge_agreement(y, y2, n_classes)
        kappa = None if np.isnan(a["kappa"]) else a["kappa"]
        agreement = None if np.isnan(a["agreement"]) else a["agreement"]
        summary.update(agreement=agreement, kappa=kappa, undetermined_rate_second=a["undetermined_b"])
        for r in per.values():
            for k in ("agreement", "kappa"):
                if isinstance(r.get(k), float) and np.isnan(r[k]):
                    r[k] = None
    return {"per_concept": per, "summary": summary}


def change_scores(features: dict, *, base: str, **kwargs) -> dict:
    """Same-seed change score of every method against ``base`` (methods whose images come from the
    same seeds and prompts, in the same order).

    Args:
        features: Method name to ``(N, D)`` features of its images.
        base: The reference method's name.
        **kwargs: Passed to :func:`change_score` (``metric``, ``n_boot``, ``seed``).

    Returns:
        Method name to the change score dict (without ``per_image``); ``base`` itself is skipped.
    """
    if base not in features:
        raise ValueError(f"change score: base method {base!r} not among {list(features)}")
    out = {}
    for name, f in features.items():
        if name == base:
            continue
        r = change_score(features[base], f, **kwargs)
        r.pop("per_image")
        out[name] = r
    return out
