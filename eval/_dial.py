"""A fairness dial after deployment: the judged attribute mix as a function of the adapter's scale.

A LoRA adapter is applied with a weight (diffusers' ``set_adapters(..., adapter_weights=s)`` or
``fuse_lora(lora_scale=s)``): 0 is the base model, 1 the adapter as trained. :func:`dial_curve`
measures, in one comparison (one adapter method per scale, the same prompts, seeds and judges), each
concept's judged class shares at every scale, with their exact 95% intervals (from the per-prompt
counts of the scoring engine, :func:`~fairtune.eval.share_box`), and writes ``dial.json``, ``dial.png``
and a section of ``report.md``. :func:`scale_for` reads off the measured curve the scale at which a
concept reaches a requested share (linear interpolation between measured scales), and
:func:`verify_request` generates and judges each concept at its scale, on fresh seeds, to report where
the request landed. A fused adapter at any scale costs what the base model costs per image.
"""

from __future__ import annotations

import copy
import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import numpy as np

from fairtune.data import TargetConfig, atomic_write_text
from fairtune.models import Backbone, BackboneConfig

from ._compare import _jsonable, backbone_for_model, compare_methods, write_metrics
from ._config import (
    ROLES,
    CompareConfig,
    JudgeConfig,
    MethodConfig,
    PromptGroup,
    groups_for,
    load_prompt_file,
    prompt_entries,
)
from ._dial_curve import (
    DEFAULT_SCALES,
    INTERVAL,
    concept_shares,
    curve_from_metrics,
    curve_markdown,
    expand_request,
    plot_dial,
    request_markdown,
    scales_for,
)
from ._generation import GenerationConfig
from ._panel import build_judges


def scale_name(scale: float, prefix: str = "scale") -> str:
    """The method name of an adapter scale in the dial's comparison, e.g. ``scale_0.25``."""
    return f"{prefix}_{scale:.2f}" if prefix == "scale" else f"{prefix}_{scale:.4f}"


def _check_scales(scales: Sequence[float]) -> list[float]:
    scales = [float(s) for s in scales]
    if not scales:
        raise ValueError("scales is empty: give at least two adapter scales, e.g. [0, 0.5, 1]")
    bad = [s for s in scales if not math.isfinite(s)]
    if bad:
        raise ValueError(f"scales must be finite numbers, got {bad}")
    names = [scale_name(s) for s in scales]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"scales must differ in their first two decimals, repeated: {dup}")
    return sorted(scales)


def _append_report(out: Path, title: str, body: str) -> None:
    """Add (or replace) a ``## title`` section at the end of ``out/report.md``."""
    path = out / "report.md"
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    marker = f"\n## {title}\n"
    if marker in text:
        text = text[: text.index(marker)]
    atomic_write_text(path, text.rstrip("\n") + "\n" + marker + "\n" + body.rstrip("\n") + "\n")


def dial_curve(
    *,
    adapter: str | Path,
    prompts: Sequence[PromptGroup],
    out: str | Path,
    scales: Sequence[float] = DEFAULT_SCALES,
    backbone_config: BackboneConfig | None = None,
    backbone: Backbone | None = None,
    judges: JudgeConfig = JudgeConfig(),
    target: TargetConfig = TargetConfig(),
    generation: GenerationConfig = GenerationConfig(),
    fuse: bool = True,
    grid_columns: int = 8,
    title: str = "fairtune dial",
    progress: bool = True,
) -> dict:
    """Measure the dial: one comparison with the adapter at every scale (methods ``scale_0.00``, ...)
    on the same prompts, seeds and judges; write OUT/metrics.json, the report, OUT/dial.json,
    OUT/dial.png and a "Fairness dial" section of OUT/report.md. A method finished by an earlier
    start is read back from OUT/methods/ (its cache key holds the scale).

    Args:
        adapter: A folder with ``pytorch_lora_weights.safetensors``.
        prompts: The prompt groups (one prompt per concept, usually neutral ones).
        out: Output folder.
        scales: Adapter scales to measure (0: the base model; 1: as trained).
        backbone_config: The base model (``None``: ``backbone``'s).
        backbone: The base model, already loaded (never changed).
        judges: The judges.
        target: The target mix (drawn dashed; the dial itself has no target).
        generation: Images per prompt, DDIM steps, guidance, first seed, batch size.
        fuse: Fuse the adapter at its scale (``fuse_lora(lora_scale=...)``) or set its weight unfused.
        grid_columns: Images per prompt in each grid of the report.
        title: Title of the report.
        progress: Show progress bars.

    Returns:
        The curve (what ``dial.json`` holds).
    """
    from ._report import summary_markdown, write_report

    if backbone_config is None and backbone is None:
        raise ValueError("dial_curve needs backbone_config or backbone")
    scales = _check_scales(scales)
    methods = [
        MethodConfig(scale_name(s), kind="adapter", adapter=str(adapter), fuse=fuse, adapter_scale=s)
        for s in scales
    ]
    cfg = CompareConfig(
        methods=methods,
        prompts=list(prompts),
        backbone=backbone_config if backbone_config is not None else backbone.config,
        judges=judges,
        target=target,
        generation=generation,
        grid_columns=grid_columns,
        frechet_roles=list(ROLES),
        title=title,
    )
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"out={str(out)!r} exists and is not a folder")
    metrics, images = compare_methods(cfg, backbone=backbone, progress=progress, cache_dir=out)
    write_metrics(metrics, out)
    write_report(metrics, images, out, grid_columns=grid_columns)
    curve = curve_from_metrics(metrics, {m.name: m.adapter_scale for m in methods})
    curve.update(adapter=str(adapter), fuse=fuse, title=title)
    atomic_write_text(out / "dial.json", json.dumps(_jsonable(curve), indent=2, allow_nan=False))
    plot_dial(curve, out / "dial.png")
    table = curve_markdown(curve)
    _append_report(
        out,
        "Fairness dial",
        f"The judged {curve['attribute']} mix against the adapter's scale (0: the base model, 1: the "
        f"adapter as trained), {generation.n_per_prompt} images per prompt from the same seeds at every "
        f"scale; intervals: {INTERVAL}. Figures: `dial.json`.\n\n![dial](dial.png)\n\n{table}\n",
    )
    print(summary_markdown(metrics))
    print(table)
    print(f"wrote {out / 'dial.json'}, {out / 'dial.png'}, {out / 'report.md'}", file=sys.stderr)
    return curve


def verify_request(
    curve: Mapping,
    request: Mapping[str, Mapping[str, float]],
    *,
    adapter: str | Path,
    prompts: Sequence[PromptGroup],
    out: str | Path,
    backbone_config: BackboneConfig | None = None,
    backbone: Backbone | None = None,
    judges: JudgeConfig = JudgeConfig(),
    target: TargetConfig = TargetConfig(),
    generation: GenerationConfig = GenerationConfig(),
    fuse: bool = True,
    seed: int | None = None,
    progress: bool = True,
) -> dict:
    """Find each requested concept's scale on the curve (:func:`scales_for`), then generate and judge
    the concept at that scale (one comparison per distinct scale, holding only its concepts' prompts)
    and write OUT/request.json and a "Requested mixes" section of OUT/report.md.

    Args:
        curve: What :func:`dial_curve` returned.
        request: ``{concept: {class: share}}`` (``"*"``: every concept).
        adapter: The adapter the curve was measured with.
        prompts: The prompt groups the curve was measured on.
        out: Output folder (the comparisons are cached in ``out/request/``).
        backbone_config: The base model (``None``: ``backbone``'s).
        backbone: The base model, already loaded.
        judges: The judges the curve was measured with.
        target: The target.
        generation: Generation settings; its seed is replaced by ``seed``.
        fuse: Fuse the adapter at its scale.
        seed: First seed of the check (``None``: ``generation.seed + generation.n_per_prompt``, seeds
            the curve did not use, so the check is out of sample).
        progress: Show progress bars.

    Returns:
        What ``request.json`` holds: ``rows`` (concept, class, requested, scale, landed, low, high,
        n, abs_error) and ``mean_abs_error``.
    """
    found = scales_for(curve, request)
    gen = copy.deepcopy(generation)
    gen.seed = generation.seed + generation.n_per_prompt if seed is None else seed
    by_scale: dict[float, list[str]] = {}
    for concept, r in found.items():
        r["scale"] = round(r["scale"], 4)
        by_scale.setdefault(r["scale"], []).append(concept)
    out = Path(out)
    landed: dict[str, dict] = {}
    for scale, concepts in by_scale.items():
        groups = groups_for(prompts, set(concepts))
        name = scale_name(scale, prefix="request")
        cfg = CompareConfig(
            methods=[MethodConfig(name, "adapter", str(adapter), fuse=fuse, adapter_scale=scale)],
            prompts=groups,
            backbone=backbone_config if backbone_config is not None else backbone.config,
            judges=judges,
            target=target,
            generation=gen,
            frechet_roles=list(ROLES),
        )
        metrics, _ = compare_methods(cfg, backbone=backbone, progress=progress, cache_dir=out / "request")
        shares = concept_shares(metrics, name)
        for c in concepts:
            landed[c] = shares[c]
    rows = []
    for concept, r in found.items():
        got, cls = landed[concept], r["class"]
        share = got["share"][cls]
        rows.append(
            {
                "concept": concept,
                "class": cls,
                "requested": r["requested"],
                "scale": r["scale"],
                "landed": share,
                "low": got["low"][cls],
                "high": got["high"][cls],
                "n": got["n"],
                "abs_error": None if share is None else abs(share - r["requested"]),
            }
        )
    errors = [r["abs_error"] for r in rows if r["abs_error"] is not None]
    result = {
        "adapter": str(adapter),
        "fuse": fuse,
        "generation": asdict(gen),
        "interval": INTERVAL,
        "rows": rows,
        "mean_abs_error": float(np.mean(errors)) if errors else None,
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "request.json", json.dumps(_jsonable(result), indent=2, allow_nan=False))
    table = request_markdown(result)
    _append_report(
        out,
        "Requested mixes",
        f"Each concept generated at the scale read off the dial for its requested share, "
        f"{gen.n_per_prompt} images from seed {gen.seed} on (fresh seeds unless set). Figures: "
        f"`request.json`.\n\n{table}\n",
    )
    print(table)
    print(f"wrote {out / 'request.json'}", file=sys.stderr)
    return result


def dial(
    *,
    model: str,
    adapter: Path | None = None,
    prompts: Path,
    out: Path,
    class_adapters: dict[str, Path] | None = None,
    adapter_scale: float = 1.0,
    route_named: bool = True,
    scales: list[float] = DEFAULT_SCALES,
    request: dict[str, dict[str, float]] | None = None,
    fuse: bool = True,
    kind: Literal["auto", "tiny", "sd"] = "auto",
    judges: JudgeConfig = JudgeConfig(),
    target: TargetConfig = TargetConfig(),
    generation: GenerationConfig = GenerationConfig(),
    verify_seed: int | None = None,
    grid_columns: int = 8,
    progress: bool = True,
    backbone: Backbone | None = None,
) -> dict:
    """The judged mix per concept against the adapter's scale; with --request, the scale per concept.
    With --class_adapters (one adapter per class, each trained toward that class alone), any mix.

    Writes OUT/dial.json, OUT/dial.png and OUT/report.md (a comparison with the adapter at every
    scale); with REQUEST, prints the scale per concept read off the curve and checks it by generating
    and judging each concept at its scale on fresh seeds (OUT/request.json, a table).

    With CLASS_ADAPTERS instead of ADAPTER: each adapter alone is measured (OUT/mix.json), and with
    REQUEST the share of images each adapter draws per concept is solved from those measurements,
    printed, and checked on fresh seeds (OUT/request.json, a table): any share between what the
    adapters give alone, at the base model's cost per image (docs/dial.md, "Any mix").

    Args:
        model: A Stable Diffusion folder, a tiny backbone folder or a shipped checkpoint name.
        adapter: A folder with pytorch_lora_weights.safetensors (the scale dial).
        prompts: A text file (one prompt per line) or YAML/JSON (prompts, prompt groups, or
            concept -> prompt).
        out: Output folder.
        class_adapters: Class to adapter folder, one per judged class, each trained toward its class
            alone (instead of ``adapter``), e.g. '{"red": "runs/red/adapter", "blue": "runs/blue/adapter"}'.
        adapter_scale: With ``class_adapters``: the scale every one is fused at, measured and drawn
            (above 1, wordings and concepts they never trained on follow their class further).
        route_named: With ``class_adapters`` and a request: a prompt that names exactly one class
            ("a red ...") is generated by that class's adapter alone, whatever the mix asked for.
        scales: Adapter scales to measure (0: the base model, 1: as trained, above 1 extrapolates).
        request: Shares to reach, {concept: {class: share}} (one class per concept; "*" for every
            concept), e.g. '{"digit 0": {"red": 0.7}}'; with class adapters and more than two classes,
            every class's share.
        fuse: Fuse the adapter at its scale (the base model's cost per image).
        kind: Backbone kind; ``auto`` reads it from the folder.
        judges: The judges.
        target: The target attribute mix (drawn dashed).
        generation: Images per prompt, DDIM steps, guidance scale, first seed, batch size.
        verify_seed: First seed of the request's check (default: seeds the curve did not use).
        grid_columns: Images per prompt in each grid of the report.
        progress: Show progress bars.
        backbone: The model, already loaded (``model`` then only names it in the report).

    Returns:
        ``{"curve": ..., "request": ...}`` (``request`` is ``None`` without a request).
    """
    from fairtune.models import LORA_WEIGHT_NAME

    groups = load_prompt_file(prompts)
    concepts = list(dict.fromkeys(e.concept for e in prompt_entries(groups)))
    if (adapter is None) == (class_adapters is None):
        raise ValueError("dial: give --adapter (the scale dial) or --class_adapters (any mix), one of them")
    if adapter_scale != 1.0 and class_adapters is None:
        raise ValueError("dial: --adapter_scale scales --class_adapters; the scale dial measures --scales")
    if class_adapters is not None:
        return _class_adapter_dial(
            model=model, class_adapters=class_adapters, adapter_scale=adapter_scale, route_named=route_named,
            groups=groups,
            concepts=concepts, out=out,
            request=request, kind=kind, judges=judges, target=target, generation=generation,
            verify_seed=verify_seed, progress=progress, backbone=backbone,
        )  # fmt: skip
    _check_scales(scales)
    if not (Path(adapter) / LORA_WEIGHT_NAME).is_file():
        raise FileNotFoundError(f"adapter={str(adapter)!r} has no {LORA_WEIGHT_NAME}")
    if request is not None:  # checked before any generation, against the judges' classes
        expand_request(request, concepts)
        expand_request(request, concepts, build_judges(_no_reference(judges)).classes)
    bb_cfg = backbone.config if backbone is not None else backbone_for_model(model, kind=kind)
    if backbone is None:
        backbone = Backbone.from_config(copy.deepcopy(bb_cfg))
    common = dict(
        adapter=adapter, prompts=groups, out=out, backbone=backbone, judges=judges, target=target,
        generation=generation, fuse=fuse, progress=progress,
    )  # fmt: skip
    curve = dial_curve(
        **common, scales=scales, grid_columns=grid_columns, title=f"fairtune dial: {model} + {adapter}"
    )
    if request is None:
        return {"curve": curve, "request": None}
    for concept, r in scales_for(curve, request).items():
        print(f"{concept}: {r['class']} {r['requested']:.2f} at adapter scale {r['scale']:.3f}")
    return {"curve": curve, "request": verify_request(curve, request, **common, seed=verify_seed)}


def _class_adapter_dial(
    *,
    model,
    class_adapters,
    adapter_scale,
    route_named,
    groups,
    concepts,
    out,
    request,
    kind,
    judges,
    target,
    generation,
    verify_seed,
    progress,
    backbone,
) -> dict:
    from fairtune.models import LORA_WEIGHT_NAME

    from ._mix import (
        expand_mix_request,
        mix_endpoints,
        mix_markdown,
        mixes_for,
        plot_requests,
        print_mix,
        verify_mix,
    )

    for c, d in class_adapters.items():
        if not (Path(d) / LORA_WEIGHT_NAME).is_file():
            raise FileNotFoundError(f"class_adapters[{c!r}] = {str(d)!r} has no {LORA_WEIGHT_NAME}")
    classes = build_judges(_no_reference(judges)).classes
    if set(class_adapters) != set(classes):
        raise ValueError(
            f"class_adapters names {sorted(class_adapters)} but the judged classes are {classes}"
        )
    if request is not None:  # checked before any generation
        expand_mix_request(request, concepts, classes)
    if backbone is None:
        backbone = Backbone.from_config(copy.deepcopy(backbone_for_model(model, kind=kind)))
    adapters = {c: str(class_adapters[c]) for c in classes}
    common = dict(prompts=groups, out=out, backbone=backbone, judges=judges, target=target, progress=progress)
    endpoints = mix_endpoints(
        class_adapters=adapters, generation=generation, adapter_scale=adapter_scale, **common
    )
    if request is None:
        return {"endpoints": endpoints, "request": None}
    print_mix(mixes_for(endpoints, request))
    result = verify_mix(
        endpoints, request, generation=generation, seed=verify_seed, name="request", route_named=route_named,
        **common,
    )  # fmt: skip
    table = mix_markdown(result)
    plot_requests(result["rows"], Path(out) / "request.png")
    _append_report(
        Path(out),
        "Requested mixes (class adapters)",
        f"Each concept generated with its class adapters drawn in the solved shares, "
        f"{generation.n_per_prompt} images per prompt from seed {result['generation']['seed']} on (fresh "
        f"seeds unless set). Figures: `request.json`.\n\n![requested mixes](request.png)\n\n{table}\n",
    )
    print(table)
    return {"endpoints": endpoints, "request": result}


def _no_reference(judges: JudgeConfig) -> JudgeConfig:
    """The judges without their Fréchet reference and calibration images (only their classes needed)."""
    j = copy.deepcopy(judges)
    j.reference = None
    j.calibration = None
    return j
