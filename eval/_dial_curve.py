"""The fairness dial's curve: per concept, the judged class shares at each adapter scale, and the
scale at which a concept reaches a requested share (see :mod:`fairtune.eval._dial`).

The shares and their intervals come from the per-prompt records of the scoring engine
(:mod:`fairtune.eval._scoring`): its counts, and the exact interval on a share
(:func:`share_box` of :mod:`fairtune.eval._stats`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ._stats import share_box

DEFAULT_SCALES = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25]
ALL_CONCEPTS = "*"
INTERVAL = "exact (Clopper-Pearson) 95% per class share; Bonferroni over classes when there are more than two"


def concept_shares(metrics: Mapping, method: str) -> dict[str, dict]:
    """Per concept, a method's judged class shares and their intervals, from ``metrics``' per-prompt
    records (the counts of every prompt of the concept pooled: usually one prompt per concept).

    Returns:
        ``{concept: {"prompts", "target", "n", "undetermined", "share", "low", "high"}}``; the last
        three map each class to a number (``None`` where no image was placed).
    """
    classes = list(metrics["classes"])
    out: dict[str, dict] = {}
    for key, r in metrics["methods"][method]["per_concept"].items():
        rec = out.setdefault(
            r["concept"],
            {"prompts": [], "target": dict(zip(classes, r["target"])), "counts": np.zeros(len(classes)),
             "undetermined": 0},
        )  # fmt: skip
        rec["prompts"].append(key)
        rec["counts"] += np.asarray(r["counts"], dtype=np.float64)
        rec["undetermined"] += int(r["undetermined"])
    for rec in out.values():
        counts = rec.pop("counts")
        n = int(counts.sum())
        rec["n"] = n
        if n:
            lo, hi = share_box(counts.astype(np.int64))
            rec["share"] = {c: float(x) for c, x in zip(classes, counts / n)}
            rec["low"] = {c: float(x) for c, x in zip(classes, lo)}
            rec["high"] = {c: float(x) for c, x in zip(classes, hi)}
        else:
            rec["share"] = rec["low"] = rec["high"] = {c: None for c in classes}
    return out


def curve_from_metrics(metrics: Mapping, scales_by_method: Mapping[str, float]) -> dict:
    """The dial curve (what ``dial.json`` holds) from a comparison's metrics whose methods are one
    adapter at several scales."""
    names = sorted(scales_by_method, key=lambda n: scales_by_method[n])
    scales = [float(scales_by_method[n]) for n in names]
    classes = list(metrics["classes"])
    per_method = {n: concept_shares(metrics, n) for n in names}
    concepts: dict[str, dict] = {}
    for concept, first in per_method[names[0]].items():
        recs = [per_method[n][concept] for n in names]
        concepts[concept] = {
            "prompts": first["prompts"],
            "target": first["target"],
            "n": [r["n"] for r in recs],
            "undetermined": [r["undetermined"] for r in recs],
            "classes": {c: {k: [r[k][c] for r in recs] for k in ("share", "low", "high")} for c in classes},
        }
    return {
        "attribute": metrics["attribute"],
        "classes": classes,
        "scales": scales,
        "methods": names,
        "interval": INTERVAL,
        "judges": metrics.get("judges"),
        "generation": metrics.get("generation"),
        "concepts": concepts,
    }


def scale_for(curve: Mapping, concept: str, cls: str, share: float) -> float:
    """The adapter scale at which ``concept``'s measured ``cls`` share reaches ``share``.

    Linear interpolation between the measured scales; where the curve crosses ``share`` more than
    once, the crossing at the smallest scale (the least change from the base model).

    Raises:
        ValueError: An unknown concept or class, a share outside [0, 1], or a share the measured
            scales do not reach (the message names the concept and the reachable range).
    """
    concepts = curve["concepts"]
    if concept not in concepts:
        raise ValueError(f"unknown concept {concept!r}; the dial measured {sorted(concepts)}")
    if cls not in curve["classes"]:
        raise ValueError(
            f"concept {concept!r}: unknown class {cls!r}; the judged classes: {curve['classes']}"
        )
    share = float(share)
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"concept {concept!r}: a requested {cls} share must be in [0, 1], got {share}")
    points = [
        (float(s), float(p))
        for s, p in zip(curve["scales"], concepts[concept]["classes"][cls]["share"])
        if p is not None
    ]
    if not points:
        raise ValueError(f"concept {concept!r}: no image was placed at any scale, so no scale can be read")
    for (s0, p0), (s1, p1) in zip(points, points[1:]):
        if min(p0, p1) <= share <= max(p0, p1):
            return s0 if p1 == p0 else s0 + (share - p0) / (p1 - p0) * (s1 - s0)
    if len(points) == 1 and points[0][1] == share:
        return points[0][0]
    lo, hi = min(p for _, p in points), max(p for _, p in points)
    raise ValueError(
        f"concept {concept!r}: a {cls} share of {share:.3f} is outside what scales {points[0][0]:g} to "
        f"{points[-1][0]:g} reach ({cls} share {lo:.3f} to {hi:.3f}); measure more scales (--scales) "
        "or request a share in that range"
    )


def requested_concepts(request: Mapping[str, object], concepts: Sequence[str]):
    """``(concept, key, asked)`` for each of ``concepts`` the request covers, in their order: ``key`` is
    the concept or ``"*"`` (the entry that asked), ``asked`` what it asked.

    Raises:
        ValueError: An empty request or one naming an unknown concept.
    """
    concepts = list(concepts)
    if not request:
        raise ValueError('request is empty: give {concept: {class: share}}, e.g. {"digit 0": {"red": 0.7}}')
    unknown = [c for c in request if c != ALL_CONCEPTS and c not in concepts]
    if unknown:
        raise ValueError(f"request names unknown concept(s) {unknown}; the prompts' concepts: {concepts}")
    for concept in concepts:
        asked = request.get(concept, request.get(ALL_CONCEPTS))
        if asked is not None:
            yield concept, (concept if concept in request else ALL_CONCEPTS), asked


def expand_request(
    request: Mapping[str, Mapping[str, float]], concepts: Sequence[str], classes: Sequence[str] | None = None
) -> dict[str, tuple[str, float]]:
    """A request per concept, checked: ``{concept: {class: share}}``, with ``"*"`` for every concept
    not named otherwise; one class per concept (one scale sets one share).

    Returns:
        ``{concept: (class, share)}`` in the order of ``concepts``.

    Raises:
        ValueError: An unknown concept or class, no class or several for a concept, a share outside
            [0, 1], or an empty request.
    """
    out: dict[str, tuple[str, float]] = {}
    for concept, name, asked in requested_concepts(request, concepts):
        if not isinstance(asked, Mapping) or len(asked) != 1:
            raise ValueError(
                f"request[{name!r}] must name one class and its share (one scale sets one share), "
                f'e.g. {{"red": 0.7}}; got {asked!r}'
            )
        ((cls, share),) = asked.items()
        if classes is not None and cls not in classes:
            raise ValueError(f"request[{name!r}]: unknown class {cls!r}; the judged classes: {list(classes)}")
        if not isinstance(share, (int, float)) or not 0.0 <= float(share) <= 1.0:
            raise ValueError(f"request[{name!r}][{cls!r}] must be a share in [0, 1], got {share!r}")
        out[concept] = (str(cls), float(share))
    return out


def scales_for(curve: Mapping, request: Mapping[str, Mapping[str, float]]) -> dict[str, dict]:
    """:func:`scale_for` for every concept of a request (``"*"``: every measured concept).

    Returns:
        ``{concept: {"class", "requested", "scale"}}``.
    """
    asked = expand_request(request, list(curve["concepts"]), curve["classes"])
    return {
        c: {"class": cls, "requested": share, "scale": scale_for(curve, c, cls, share)}
        for c, (cls, share) in asked.items()
    }


def _cell(share, low, high) -> str:
    return "n/a" if share is None else f"{share:.2f} [{low:.2f}, {high:.2f}]"


def curve_markdown(curve: Mapping) -> str:
    """The curve as a markdown table: per concept, the first class's share (all classes' with more
    than two) [95% interval] at each scale, and the target."""
    classes = curve["classes"]
    shown = classes[:1] if len(classes) == 2 else classes
    header = ["concept", "class", "target", *(f"scale {s:g}" for s in curve["scales"])]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for concept, rec in curve["concepts"].items():
        for c in shown:
            v = rec["classes"][c]
            cells = [_cell(p, lo, hi) for p, lo, hi in zip(v["share"], v["low"], v["high"])]
            lines.append(f"| {concept} | {c} | {rec['target'][c]:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_dial(curve: Mapping, path: Path) -> Path:
    """One panel per concept: judged share against adapter scale (95% band), the target dashed."""
    from matplotlib.figure import Figure

    from ._report import _class_colors

    classes = curve["classes"]
    shown = classes[:1] if len(classes) == 2 else classes
    colors = _class_colors(classes)
    concepts = list(curve["concepts"])
    ncols = min(4, len(concepts))
    nrows = math.ceil(len(concepts) / ncols)
    fig = Figure(figsize=(3.0 * ncols, 2.5 * nrows + 0.5))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    x = np.asarray(curve["scales"], dtype=np.float64)
    for ax, concept in zip(axes.flat, concepts):
        rec = curve["concepts"][concept]
        for c in shown:
            k = classes.index(c)
            v = rec["classes"][c]
            nan = lambda xs: np.array([np.nan if e is None else e for e in xs], dtype=np.float64)  # noqa: E731
            ax.fill_between(x, nan(v["low"]), nan(v["high"]), color=colors[k], alpha=0.2, linewidth=0)
            ax.plot(x, nan(v["share"]), "o-", color=colors[k], label=c, markersize=3)
            ax.axhline(rec["target"][c], color=colors[k], linestyle="--", linewidth=1)
        ax.set_ylim(0, 1)
        ax.set_title(concept, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("adapter scale", fontsize=7)
    for ax in list(axes.flat)[len(concepts) :]:
        ax.axis("off")
    what = f"{shown[0]} share" if len(shown) == 1 else "class shares"
    fig.suptitle(f"judged {what} vs adapter scale (95% band; target dashed)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def request_markdown(result: Mapping) -> str:
    """The request check as a markdown table, with the mean |landed − requested| below it."""
    lines = [
        "| concept | class | requested | scale | landed [95% CI] | abs(landed − requested) |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        err = "n/a" if r["abs_error"] is None else f"{r['abs_error']:.3f}"
        lines.append(
            f"| {r['concept']} | {r['class']} | {r['requested']:.2f} | {r['scale']:.3f} | "
            f"{_cell(r['landed'], r['low'], r['high'])} | {err} |"
        )
    mean = result.get("mean_abs_error")
    lines += ["", f"Mean abs(landed − requested): {'n/a' if mean is None else f'{mean:.3f}'}"]
    return "\n".join(lines)
