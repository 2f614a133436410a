"""Any mix after deployment with class adapters: measure what each class's adapter gives alone, solve
per concept for the share of images each adapter should draw so the judged mix is the one requested,
and check it on fresh seeds.

With adapter ``k`` alone a concept's judged shares are ``A[k]`` (a row of the concept's endpoint
matrix); drawing adapter ``k`` for a share ``w_k`` of the images gives ``w @ A`` in expectation, linear
in ``w``. :func:`mix_for` solves ``w @ A = requested`` on the simplex (non-negative least squares with
the sum held at 1): exact wherever the request lies inside what the adapters reach, else the nearest
reachable mix (flagged). The check (:func:`verify_mix`) generates every concept with its ``w`` through
the comparison's ``class_adapters`` method (the same generator a user runs) on seeds the endpoints did
not use.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from fairtune.data import TargetConfig, atomic_write_text

from ._compare import _jsonable, compare_methods, write_metrics
from ._config import ROLES, CompareConfig, JudgeConfig, MethodConfig, PromptGroup, groups_for
from ._dial_curve import INTERVAL, concept_shares, requested_concepts
from ._generation import GenerationConfig

QUALITY = ("explicit_kept", "fidelity", "frechet", "unet_evals_per_image", "sec_per_image")
"""A method's figures besides its shares that the mix's results carry."""

REACH_TOLERANCE = 1e-3
"""A request counts as reachable when the solved mix meets it within this (on every class)."""


def expand_mix_request(
    request: Mapping[str, Mapping[str, float]], concepts: Sequence[str], classes: Sequence[str]
) -> dict[str, dict[str, float]]:
    """A mix request per concept, checked and completed: ``{concept: {class: share}}`` with ``"*"``
    for every concept not named otherwise. With two classes one share is enough (the other is the
    rest); with more, every class's share is given and they sum to 1.

    Raises:
        ValueError: An empty request, an unknown concept or class, a share outside [0, 1], a mix
            that does not sum to 1, or an incomplete one.
    """
    classes = list(classes)
    out: dict[str, dict[str, float]] = {}
    for concept, name, asked in requested_concepts(request, concepts):
        if not isinstance(asked, Mapping) or not asked:
            raise ValueError(
                f'request[{name!r}] must map classes to shares, e.g. {{"red": 0.7}}; got {asked!r}'
            )
        bad = [c for c in asked if c not in classes]
        if bad:
            raise ValueError(f"request[{name!r}]: unknown class(es) {bad}; the judged classes: {classes}")
        for c, s in asked.items():
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 <= float(s) <= 1.0:
                raise ValueError(f"request[{name!r}][{c!r}] must be a share in [0, 1], got {s!r}")
        shares = {c: float(s) for c, s in asked.items()}
        if len(shares) == len(classes) - 1 == 1:
            (rest,) = [c for c in classes if c not in shares]
            shares[rest] = 1.0 - sum(shares.values())
        if len(shares) != len(classes) or abs(sum(shares.values()) - 1.0) > 1e-6:
            raise ValueError(
                f"request[{name!r}] must give every class's share summing to 1 (with two classes one "
                f"share is enough); got {asked!r} for classes {classes}"
            )
        out[concept] = {c: shares[c] for c in classes}
    return out


def mix_for(endpoints: np.ndarray, requested: np.ndarray) -> tuple[np.ndarray, bool]:
    """The share of images each class adapter draws so the expected judged mix is ``requested``.

    Args:
        endpoints: ``(K, K)``: row ``k`` is the concept's judged class shares with adapter ``k`` alone.
        requested: ``(K,)``: the requested class shares (summing to 1).

    Returns:
        ``w`` (``(K,)``, non-negative, summing to 1) and whether ``w @ endpoints`` meets the request
        within :data:`REACH_TOLERANCE` (else ``w`` gives the nearest mix the adapters reach).
    """
    from scipy.optimize import nnls

    a = np.asarray(endpoints, dtype=np.float64)
    p = np.asarray(requested, dtype=np.float64)
    k = a.shape[0]
    if a.shape != (k, k) or p.shape != (k,):
        raise ValueError(f"endpoints must be (K, K) and requested (K,), got {a.shape} and {p.shape}")
    # The sum-to-one row weighted far above the others: a least-squares solution on the simplex.
    big = 1e3
    w, _ = nnls(np.vstack([a.T, big * np.ones((1, k))]), np.concatenate([p, [big]]))
    w = w / w.sum()
    return w, bool(np.max(np.abs(w @ a - p)) <= REACH_TOLERANCE)


def mix_endpoints(
    *,
    class_adapters: Mapping[str, str | Path],
    prompts: Sequence[PromptGroup],
    out: str | Path,
    backbone,
    judges: JudgeConfig = JudgeConfig(),
    target: TargetConfig = TargetConfig(),
    generation: GenerationConfig = GenerationConfig(),
    include_base: bool = False,
    progress: bool = True,
    adapter_scale: float = 1.0,
) -> dict:
    """One comparison with each class adapter alone (methods ``class_<cls>``) on the same prompts,
    seeds and judges; writes OUT/metrics.json, the report and OUT/mix.json (per concept, each
    adapter's judged shares and their intervals). ``include_base`` adds the base model (method
    ``base``) for its quality figures. ``adapter_scale``: every adapter fused at that scale (the mix
    drawn later fuses them at the same one).

    Returns:
        What ``mix.json`` holds: ``classes``, ``adapters`` and per concept ``shares`` / ``low`` /
        ``high`` (``{adapter class: {class: share}}``) and ``n`` (images placed per adapter).
    """
    from ._report import write_report

    methods = [
        MethodConfig(f"class_{c}", kind="adapter", adapter=str(d), adapter_scale=adapter_scale)
        for c, d in class_adapters.items()
    ]
    if include_base:
        methods.insert(0, MethodConfig("base"))
    cfg = CompareConfig(
        methods=methods, prompts=list(prompts), backbone=backbone.config, judges=judges, target=target,
        generation=generation, frechet_roles=list(ROLES), title="fairtune dial: class adapters alone",
    )  # fmt: skip
    out = Path(out)
    metrics, images = compare_methods(cfg, backbone=backbone, progress=progress, cache_dir=out)
    write_metrics(metrics, out)
    write_report(metrics, images, out)
    per = {c: neutral_shares(metrics, f"class_{c}") for c in class_adapters}
    concepts = {}
    for concept in per[next(iter(per))]:
        concepts[concept] = {
            key: {c: per[c][concept][key] for c in class_adapters} for key in ("share", "low", "high", "n")
        }
    result = {
        "classes": list(metrics["classes"]),
        "adapters": {c: str(d) for c, d in class_adapters.items()},
        "adapter_scale": adapter_scale,
        "generation": asdict(generation),
        "interval": INTERVAL,
        "concepts": concepts,
        "metrics": {
            m.name: {k: metrics["methods"][m.name]["summary"].get(k) for k in QUALITY} for m in methods
        },
    }
    atomic_write_text(out / "mix.json", json.dumps(_jsonable(result), indent=2, allow_nan=False))
    return result


def endpoint_matrix(endpoints: Mapping, concept: str) -> np.ndarray | None:
    """``(K, K)``: row ``k`` the concept's shares with class ``k``'s adapter alone; ``None`` where an
    adapter placed no image."""
    rec, classes = endpoints["concepts"][concept], endpoints["classes"]
    rows = []
    for k in endpoints["adapters"]:
        s = rec["share"][k]
        if s is None or any(s[c] is None for c in classes):
            return None
        rows.append([s[c] for c in classes])
    return np.asarray(rows, dtype=np.float64)


def mixes_for(endpoints: Mapping, request: Mapping[str, Mapping[str, float]]) -> dict[str, dict]:
    """Per requested concept: ``requested`` and ``mix`` (``{class: share}``, the adapters' draw, in the
    adapters' order) and ``reachable``."""
    classes = endpoints["classes"]
    asked = expand_mix_request(request, list(endpoints["concepts"]), classes)
    out = {}
    for concept, shares in asked.items():
        a = endpoint_matrix(endpoints, concept)
        if a is None:
            raise ValueError(f"concept {concept!r}: an adapter placed no image, so no mix can be solved")
        w, ok = mix_for(a, np.array([shares[c] for c in classes]))
        out[concept] = {
            "requested": shares,
            "mix": {c: float(x) for c, x in zip(endpoints["adapters"], w)},
            "expected": {c: float(x) for c, x in zip(classes, w @ a)},
            "reachable": ok,
        }
    return out


def verify_mix(
    endpoints: Mapping,
    request: Mapping[str, Mapping[str, float]],
    *,
    prompts: Sequence[PromptGroup],
    out: str | Path,
    backbone,
    judges: JudgeConfig = JudgeConfig(),
    target: TargetConfig = TargetConfig(),
    generation: GenerationConfig = GenerationConfig(),
    seed: int | None = None,
    name: str = "mix",
    route_named: bool = False,
    progress: bool = True,
) -> dict:
    """Solve each requested concept's mix (:func:`mixes_for`), generate every concept with it through
    one ``class_adapters`` method on fresh seeds, judge, and write ``OUT/<name>.json``.

    Args:
        endpoints: What :func:`mix_endpoints` returned.
        request: ``{concept: {class: share}}`` (``"*"``: every concept).
        prompts: The prompt groups (explicit groups too: generated with their concept's mix, or
            with ``route_named`` by the adapter of the class they name).
        out: Output folder (comparisons cached in ``out/<name>/``).
        backbone: The base model.
        judges: The judges the endpoints were measured with.
        target: The target.
        generation: Generation settings; its seed is replaced by ``seed``.
        seed: First seed of the check (``None``: ``generation.seed + generation.n_per_prompt``).
        name: The method's name and the result file's stem.
        route_named: Prompts naming exactly one class come from that class's adapter alone
            (``MethodConfig.route_named``); ``explicit_kept`` then measures the request's explicit
            prompts.
        progress: Show progress bars.

    Returns:
        ``rows`` (concept, class, requested, mix, expected, landed, low, high, n, abs_error,
        reachable), ``mean_abs_error``, ``worst_abs_error``, and the method's metrics (``metrics``:
        explicit kept, fidelity, Fréchet, UNet evaluations per image).
    """
    found = mixes_for(endpoints, request)
    gen = copy.deepcopy(generation)
    gen.seed = generation.seed + generation.n_per_prompt if seed is None else seed
    classes = endpoints["classes"]
    method = MethodConfig(
        name, kind="class_adapters", class_adapters=dict(endpoints["adapters"]),
        mix={c: r["mix"] for c, r in found.items()}, adapter_scale=endpoints.get("adapter_scale", 1.0),
        route_named=route_named,
    )  # fmt: skip
    cfg = CompareConfig(
        methods=[method], prompts=groups_for(prompts, set(found)), backbone=backbone.config, judges=judges,
        target=target, generation=gen,
        # routed, the explicit prompts are each one class's images: the distance is the neutral prompts'
        frechet_roles=[r for r in ROLES if not (route_named and r == "explicit")],
    )  # fmt: skip
    out = Path(out)
    metrics, _ = compare_methods(cfg, backbone=backbone, progress=progress, cache_dir=out / name)
    write_metrics(metrics, out / name)
    m = metrics["methods"][name]
    roles = {e["concept"]: e["role"] for e in metrics["prompts"] if e["role"] != "explicit"}
    landed = neutral_shares(metrics, name)
    rows = []
    shown = classes[:1] if len(classes) == 2 else classes
    for concept, r in found.items():
        got = landed.get(concept)
        for c in shown:
            share = None if got is None else got["share"][c]
            rows.append({
                "concept": concept, "role": roles.get(concept), "class": c, "requested": r["requested"][c],
                "mix": r["mix"], "expected": r["expected"][c], "landed": share,
                "low": None if got is None else got["low"][c],
                "high": None if got is None else got["high"][c],
                "n": None if got is None else got["n"], "reachable": r["reachable"],
                "abs_error": None if share is None else abs(share - r["requested"][c]),
            })  # fmt: skip
    errors = [r["abs_error"] for r in rows if r["abs_error"] is not None]
    result = {
        "adapters": dict(endpoints["adapters"]),
        "generation": asdict(gen),
        "interval": INTERVAL,
        "rows": rows,
        "mean_abs_error": float(np.mean(errors)) if errors else None,
        "worst_abs_error": float(np.max(errors)) if errors else None,
        "metrics": {k: m["summary"].get(k) for k in QUALITY},
    }
    atomic_write_text(out / f"{name}.json", json.dumps(_jsonable(result), indent=2, allow_nan=False))
    return result


def neutral_shares(metrics: Mapping, method: str) -> dict[str, dict]:
    """:func:`concept_shares` over the neutral prompts only (explicit prompts have their own target)."""
    cut = copy.deepcopy(metrics)
    per = cut["methods"][method]["per_concept"]
    cut["methods"][method]["per_concept"] = {k: r for k, r in per.items() if r.get("role") != "explicit"}
    return concept_shares(cut, method)


def plot_requests(rows: Sequence[Mapping], path: Path, *, title: str | None = None) -> Path:
    """One panel per concept: each requested share (x) against the share that landed (y, its 95%
    interval as a bar), a colour per class, the diagonal dotted (landed = requested). ``rows``:
    :func:`verify_mix`'s, of one request or of several.

    Raises:
        ValueError: No rows.
    """
    from matplotlib.figure import Figure

    if not rows:
        raise ValueError("plot_requests: no rows to plot")

    from ._report import _class_colors

    concepts = list(dict.fromkeys(r["concept"] for r in rows))
    classes = list(dict.fromkeys(r["class"] for r in rows))
    colors = _class_colors(classes)
    ncols = min(5, len(concepts))
    nrows = math.ceil(len(concepts) / ncols)
    fig = Figure(figsize=(2.6 * ncols, 2.4 * nrows + 0.5))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax, concept in zip(axes.flat, concepts):
        ax.plot([0, 1], [0, 1], ":", color="grey", linewidth=1)
        for k, c in enumerate(classes):
            pts = [r for r in rows if r["concept"] == concept and r["class"] == c and r["landed"] is not None]
            if not pts:
                continue
            x = np.array([r["requested"] for r in pts])
            y = np.array([r["landed"] for r in pts])
            err = np.array([[r["landed"] - r["low"] for r in pts], [r["high"] - r["landed"] for r in pts]])
            ax.errorbar(x, y, yerr=err, fmt="o", color=colors[k], label=c, markersize=3, capsize=2)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(concept, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("requested", fontsize=7)
        ax.set_ylabel("landed", fontsize=7)
    for ax in list(axes.flat)[len(concepts) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6, loc="upper left")
    title = title or "requested against landed share (95% interval; dotted: landed = requested)"
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return Path(path)


def mix_markdown(result: Mapping) -> str:
    """The check as a markdown table, with the mean and worst |landed − requested| below it."""
    lines = [
        "| concept | role | class | requested | adapters' draw | expected | landed [95% CI] | abs error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        draw = ", ".join(f"{c} {w:.2f}" for c, w in r["mix"].items())
        cell = "n/a" if r["landed"] is None else f"{r['landed']:.2f} [{r['low']:.2f}, {r['high']:.2f}]"
        err = "n/a" if r["abs_error"] is None else f"{r['abs_error']:.3f}"
        reach = "" if r["reachable"] else " (out of reach)"
        lines.append(
            f"| {r['concept']} | {r['role']} | {r['class']} | {r['requested']:.2f} | {draw}{reach} | "
            f"{r['expected']:.2f} | {cell} | {err} |"
        )
    f = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
    lines += [
        "",
        f"Mean abs(landed − requested): {f(result['mean_abs_error'])}; worst {f(result['worst_abs_error'])}",
    ]
    return "\n".join(lines)


def print_mix(found: Mapping[str, dict], file=None) -> None:
    for concept, r in found.items():
        draw = ", ".join(f"{c} adapter {w:.3f}" for c, w in r["mix"].items())
        note = "" if r["reachable"] else " (out of reach: the nearest mix the adapters give)"
        print(f"{concept}: {draw}{note}", file=file)
