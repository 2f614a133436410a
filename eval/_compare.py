"""``compare`` and ``audit``: every method on the same prompts, seeds and judges.

For each method (the base model, LoRA adapters, Fair Diffusion, prompt augmentation) the comparison
generates ``n_per_prompt`` images for every prompt, image ``i`` of every prompt from seed ``seed + i``
(:meth:`~fairtune.models.Backbone.initial_noise`), judges them, scores them with the one scoring engine
(:mod:`fairtune.eval._scoring`) and writes ``metrics.json`` (schema: docs/metrics.md) and a report
(``report.md`` and a self-contained ``report.html``, see :mod:`fairtune.eval._report`).

``audit`` is the one-model case: one pipeline (a model folder, optionally with an adapter), the same
metrics and report.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from fairtune.data import Target, TargetConfig, atomic_path, atomic_write_json, atomic_write_text
from fairtune.models import (
    BACKBONE_FILE,
    LORA_WEIGHT_NAME,
    Backbone,
    BackboneConfig,
    add_audit_to_model_card,
    audit_section,
    resolve_shipped,
)

from ._config import (
    ROLES,
    CompareConfig,
    JudgeConfig,
    MethodConfig,
    PromptEntry,
    _check_baseline_classes,
    load_prompt_file,
    prompt_entries,
    validate_methods,
)
from ._correction import change_scores, confusion_matrix, judge_quality, score_measurement
from ._generation import GenerationConfig, MethodImages, generate_method, images_fingerprint, method_backbone
from ._panel import JudgePanel, build_judges, build_target
from ._scoring import sampling_sd, score_judged


def judge_method(
    result: MethodImages,
    entries: Sequence[PromptEntry],
    *,
    panel: JudgePanel,
    target: Target,
    n_per_prompt: int,
    frechet_roles: Sequence[str] = ("seen", "heldout"),
    progress: bool = True,
    desc: str = "judge",
    correction_boot: int = 1000,
    sampling_boot: int = 0,
) -> dict:
    """Judge one method's images and score them with the scoring engine (:func:`score_judged`),
    adding the method's cost (UNet evaluations and seconds per image) and, where the panel has them,
    judge-corrected shares and two-judge agreement (:func:`score_measurement`); the change-score
    features ride along under ``change_features`` (``None`` without)."""
    judged = panel.judge(result.images, desc=desc, progress=progress)
    score_kw = dict(
        n_per_prompt=n_per_prompt,
        target_of=target.proportions,
        classes=target.groups,
        concept_index=panel.concept_index,
        reference_features=panel.reference_features(progress=progress),
        frechet_roles=frechet_roles,
        drawn=result.drawn,
    )
    scored = score_judged(judged, entries, **score_kw)
    if sampling_boot:  # each figure's spread over resamples of this run's images
        scored["summary"]["sampling_sd"] = sampling_sd(judged, entries, n_boot=sampling_boot, **score_kw)
    cal = panel.calibration_labels(progress=progress)
    if cal is not None or judged.get("second") is not None:
        extra = score_measurement(
            judged["attribute"], entries, n_per_prompt=n_per_prompt, n_classes=len(target.groups),
            target_of=target.proportions, classes=target.groups,
            calibration=None if cal is None else (cal["true"], cal["first"]),
            second=judged.get("second"), n_boot=correction_boot,
        )  # fmt: skip
        for key, rec in extra["per_concept"].items():
            scored["per_concept"][key].update(rec)
        scored["summary"].update(extra["summary"])
    scored["change_features"] = judged.get("change")
    n_images = len(result.images)
    scored["summary"].update(
        unet_evals_per_image=result.unet_rows / max(n_images, 1),
        unet_evals_per_image_formula=result.unet_evals_formula,
        unet_calls=result.unet_calls,
        seconds=result.seconds,
        sec_per_image=result.seconds / max(n_images, 1),
    )
    return scored


def _jsonable(x):
    """NaN/inf to None, tuples to lists, numpy scalars to Python (``metrics.json`` stays strict JSON)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(float(x)) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, Path):
        return str(x)
    return x


def compare_methods(
    config: CompareConfig,
    *,
    backbone: Backbone | None = None,
    progress: bool = True,
    cache_dir: str | Path | None = None,
    keep_going: bool = False,
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Generate and judge every method of ``config``; write nothing.

    Everything is checked before any model is loaded: method names and kinds, adapter files,
    prompts, judges, the target and the baselines' classes.

    Args:
        config: The comparison.
        backbone: An already loaded base backbone to reuse (e.g. by a demo that just trained
            adapters); it is never changed (adapter methods run on a copy of its UNet). ``None``:
            load ``config.backbone``.
        progress: Show progress bars (generation and judging).
        cache_dir: Write each method's results there as it finishes (``methods/<name>.json`` and its
            images), keyed by a hash of everything that makes them; a method found there with the
            same key is not generated again (a restarted comparison resumes).
        keep_going: A method that fails is recorded as failed (``failed``, ``error``) and the others
            go on; ``False``: the error propagates.

    Returns:
        The metrics (what ``metrics.json`` holds) and, per method, its images (prompt-major,
        ``n_per_prompt`` per prompt, in [0, 1]); a failed method has no images.

    Raises:
        ValueError: An unknown method kind, duplicate method names, no prompts, a target that does
            not fit the judges, and so on, naming the problem.
        FileNotFoundError: A missing adapter, judges folder or reference folder.
    """
    validate_methods(config.methods)
    entries = prompt_entries(config.prompts)
    gen = config.generation
    if gen.n_per_prompt < 1 or gen.steps < 1 or (gen.batch_size is not None and gen.batch_size < 1):
        raise ValueError(f"generation needs n_per_prompt, steps and batch_size >= 1, got {gen}")
    bb_cfg = config.backbone if backbone is None else backbone.config
    image_size = backbone.image_size if backbone is not None else _expected_image_size(bb_cfg)
    panel = build_judges(config.judges, image_size=image_size)
    target = build_target(config.target, panel)
    _check_baseline_classes(config.methods, target.groups)
    if backbone is None:
        backbone = Backbone.from_config(copy.deepcopy(config.backbone))
    if panel.image_size is not None and backbone.image_size != panel.image_size:
        raise ValueError(
            f"the judges expect {panel.image_size}x{panel.image_size} images but the backbone generates "
            f"{backbone.image_size}x{backbone.image_size}"
        )

    methods_out: dict[str, dict] = {}
    images_by_method: dict[str, torch.Tensor] = {}
    change_feats: dict[str, np.ndarray | None] = {}
    for m in config.methods:
        key = method_key(config, m, bb_cfg)
        cached = _load_method(cache_dir, m.name, key) if cache_dir is not None else None
        if cached is not None:  # finished by an earlier start of the same comparison
            methods_out[m.name], images_by_method[m.name], change_feats[m.name] = cached
            continue
        try:
            bb = method_backbone(backbone, m)
            res = generate_method(bb, m, entries, generation=gen, target=target, progress=progress)
            del bb  # with an adapter: the UNet copy carrying it
            judged = judge_method(
                res,
                entries,
                panel=panel,
                target=target,
                n_per_prompt=gen.n_per_prompt,
                frechet_roles=config.frechet_roles,
                progress=progress,
                desc=f"judge {m.name}",
                correction_boot=config.judges.correction_boot,
                sampling_boot=config.sampling_boot,
            )
            change_feats[m.name] = judged.pop("change_features")
        except Exception as e:  # one bad method costs only itself; the report says why it failed
            if not keep_going:
                raise
            error = f"{type(e).__name__}: {e}".strip().splitlines()[0]
            print(f"compare: method {m.name!r} failed: {error}", file=sys.stderr)
            methods_out[m.name] = {"kind": m.kind, "adapter": m.adapter, "failed": True, "error": error}
            continue
        adapters = {"class_adapters": dict(m.class_adapters)} if m.class_adapters else {}
        if m.adapter_scale != 1.0:  # recorded where it is not the adapters as trained
            adapters["adapter_scale"] = m.adapter_scale
        fingerprint = images_fingerprint(res.images)
        methods_out[m.name] = _jsonable(
            {"kind": m.kind, "adapter": m.adapter, **adapters, "images_sha256": fingerprint, **judged}
        )
        images_by_method[m.name] = res.images
        if cache_dir is not None:
            _save_method(cache_dir, m.name, key, methods_out[m.name], res.images, change_feats[m.name])

    measurement = add_change_scores(methods_out, change_feats, config.methods)
    cal = panel.calibration_labels(progress=progress)
    if cal is not None:
        k = len(target.groups)
        second = cal["second"]
        quality = judge_quality(cal["true"], cal["first"], k)
        measurement["calibration"] = {
            "n": int(len(cal["true"])),
            "confusion_first": confusion_matrix(cal["true"], cal["first"], k).tolist(),
            "accuracy_first": float(np.mean(cal["true"] == cal["first"])),
            "balanced_accuracy_first": quality["balanced_accuracy"],
            "informative_first": quality["informative"],
            "confusion_second": None if second is None else confusion_matrix(cal["true"], second, k).tolist(),
            "accuracy_second": None if second is None else float(np.mean(cal["true"] == second)),
        }
    if panel.second_fn is not None:
        measurement["second_judge"] = panel.second_description

    metrics = _jsonable(
        {
            "title": config.title,
            "attribute": panel.attribute,
            "classes": list(target.groups),
            "target": {"default": target.default, "per_concept": target.per_concept},
            "judges": panel.description,
            "backbone": asdict(bb_cfg),
            "image_size": backbone.image_size,
            "generation": asdict(gen),
            "interval": "exact-box, 95%",
            "frechet_roles": list(config.frechet_roles),
            "prompts": [asdict(e) for e in entries],
            "methods": methods_out,
            "measurement": measurement,
            "config": asdict(config),
        }
    )
    return metrics, images_by_method


def method_key(config: CompareConfig, method: MethodConfig, backbone: BackboneConfig) -> str:
    """A hash of everything a method's results depend on: the method (its adapter's bytes and scale),
    the base model, the prompts, the judges, the target and the generation settings."""
    adapter = None if method.adapter is None else _adapter_sha256(method.adapter)
    described = asdict(method)
    for k in ("class_adapters", "mix"):  # absent before class adapters existed: earlier caches stay valid
        if described[k] is None:
            del described[k]
    if not described["route_named"]:  # as before it existed
        del described["route_named"]
    if method.class_adapters is not None:
        described["class_adapters_sha256"] = {c: _adapter_sha256(d) for c, d in method.class_adapters.items()}
    if described["adapter_scale"] == 1.0:  # as before the scale existed: earlier caches stay valid
        del described["adapter_scale"]
    parts = {
        "method": described,
        "adapter_sha256": adapter,
        # how prompts are encoded (cached or not), not what is generated: earlier caches stay valid
        "backbone": {k: v for k, v in asdict(backbone).items() if k != "prompt_cache"},
        "prompts": [asdict(g) for g in config.prompts],
        "judges": asdict(config.judges),
        "target": asdict(config.target),
        "generation": asdict(config.generation),
        "frechet_roles": list(config.frechet_roles),
    }
    if config.sampling_boot:  # absent before it existed: earlier caches stay valid
        parts["sampling_boot"] = [config.sampling_boot, "jeffreys+half"]  # and how it resamples
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _adapter_sha256(folder: str | Path) -> str:
    f = Path(folder) / LORA_WEIGHT_NAME
    return hashlib.sha256(f.read_bytes()).hexdigest() if f.is_file() else "missing"


def _method_paths(cache_dir: str | Path, name: str) -> tuple[Path, Path]:
    d = Path(cache_dir) / "methods"
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return d / f"{safe}.json", d / f"{safe}.images.safetensors"


def _save_method(
    cache_dir, name: str, key: str, result: dict, images: torch.Tensor, features: np.ndarray | None
) -> None:
    from safetensors.torch import save_file

    js, im = _method_paths(cache_dir, name)
    q = (images.detach().cpu().float().clamp(0, 1) * 255).round().to(torch.uint8).contiguous()
    tensors = {"images": q}
    if features is not None:
        tensors["change_features"] = torch.as_tensor(np.ascontiguousarray(features))
    with atomic_path(im) as tmp:
        save_file(tensors, str(tmp))
    # written last: its presence means both files are whole
    atomic_write_text(js, json.dumps({"key": key, "result": result}, allow_nan=False))


def _load_method(cache_dir, name: str, key: str) -> tuple[dict, torch.Tensor, np.ndarray | None] | None:
    from safetensors.torch import load_file

    js, im = _method_paths(cache_dir, name)
    try:
        saved = json.loads(js.read_text())
        if saved.get("key") != key:
            return None
        tensors = load_file(str(im))
    except Exception:  # absent, or cut short by a kill: generate again
        return None
    feats = tensors["change_features"].numpy() if "change_features" in tensors else None
    return saved["result"], tensors["images"].float() / 255.0, feats


def add_change_scores(
    methods_out: dict[str, dict], features: Mapping[str, np.ndarray | None], methods: Sequence[MethodConfig]
) -> dict:
    """Same-seed change score of every method against the ``base`` method (into each summary as
    ``change_score`` and ``change_score_ci``); returns what ``metrics["measurement"]`` records."""
    base = next((m.name for m in methods if m.kind == "base"), None)
    feats = {n: f for n, f in features.items() if f is not None}
    for m in methods_out.values():
        if m.get("failed"):
            continue
        m["summary"].setdefault("change_score", None)
        m["summary"].setdefault("change_score_ci", None)
    if base is None or base not in feats or len(feats) < 2:
        return {"change_base": None}
    for name, r in change_scores(feats, base=base).items():
        methods_out[name]["summary"]["change_score"] = r["mean"]
        methods_out[name]["summary"]["change_score_ci"] = [r["low"], r["high"]]
    methods_out[base]["summary"]["change_score"] = 0.0
    return {"change_base": base, "change_metric": "cosine distance (1 - cos) of paired image embeddings"}


def write_metrics(metrics: Mapping, out: str | Path) -> Path:
    """Write ``out/metrics.json`` atomically (strict JSON: NaN becomes null)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "metrics.json", _jsonable(dict(metrics)), indent=2, allow_nan=False)
    return out / "metrics.json"


def write_images(images_by_method: Mapping[str, torch.Tensor], metrics: Mapping, out: str | Path) -> Path:
    """Every image as a PNG, ``out/images/<k>/<prompt index>/<image index>.png`` (``k``: the method's
    position in ``metrics['methods']``), so a review page can show and flag single images."""
    from PIL import Image

    root = Path(out) / "images"
    n = int(metrics["generation"]["n_per_prompt"])
    for k, name in enumerate(metrics["methods"]):
        if name not in images_by_method:  # a failed method has no images
            continue
        x = (images_by_method[name].clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
        for j in range(len(x)):
            path = root / str(k) / f"{j // n:03d}" / f"{j % n:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(x[j]).save(path)
    return root


def run_comparison(
    config: CompareConfig,
    out: str | Path,
    *,
    backbone: Backbone | None = None,
    progress: bool = True,
    report: bool = True,
    save_images: bool = False,
) -> dict:
    """Generate, judge and report every method of ``config`` into ``out``; print the summary table.

    Args:
        config: The comparison.
        out: Output folder: ``metrics.json``, ``report.md`` (PNGs beside it), ``report.html``.
        backbone: An already loaded base backbone to reuse; never changed (see :func:`compare_methods`).
        progress: Show progress bars (generation and judging).
        report: Write the report and print the summary table (``metrics.json`` is always written).
        save_images: Also write every image (:func:`write_images`), for ``fairtune review``.

    Returns:
        The metrics written to ``metrics.json``.

    Raises:
        ValueError: An unknown method kind, duplicate method names, no prompts, a target that does
            not fit the judges, and so on, naming the problem.
        FileNotFoundError: A missing adapter, judges folder or reference folder.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"out={str(out)!r} exists and is not a folder")
    metrics, images = compare_methods(
        config, backbone=backbone, progress=progress, cache_dir=out, keep_going=True
    )
    write_metrics(metrics, out)
    if save_images:
        write_images(images, metrics, out)
    if report and any(not m.get("failed") for m in metrics["methods"].values()):
        from ._report import summary_markdown, write_report

        write_report(metrics, images, out, grid_columns=config.grid_columns)
        print(summary_markdown(metrics))
        print(f"wrote {out / 'metrics.json'}, {out / 'report.md'}, {out / 'report.html'}", file=sys.stderr)
    # The figures just measured, as a model-card section: beside the report, or (asked for) in the
    # adapter's own card. An adapter folder is an input: a comparison does not rewrite it unasked.
    for m in config.methods:
        if metrics["methods"][m.name].get("failed"):
            continue
        if m.kind == "adapter" and m.adapter is not None:
            command = f"see {out / 'metrics.json'}"
            try:
                if config.update_model_card:
                    card = add_audit_to_model_card(m.adapter, metrics, method=m.name, command=command)
                else:
                    card = out / f"model_card_{m.name}.md"
                    atomic_write_text(card, audit_section(metrics, method=m.name, command=command) + "\n")
                if card is not None:
                    print(f"{m.name}: model-card section written to {card}", file=sys.stderr)
            except OSError as exc:
                print(f"could not write the model-card section of {m.name}: {exc}", file=sys.stderr)
    failed = {n: m["error"] for n, m in metrics["methods"].items() if m.get("failed")}
    if failed:
        why = "; ".join(f"{n}: {e}" for n, e in failed.items())
        raise RuntimeError(
            f"{len(failed)} of {len(metrics['methods'])} methods failed ({why}); the others are in "
            f"{out / 'metrics.json'}"
        )
    return metrics


def _expected_image_size(cfg: BackboneConfig) -> int | None:
    """The image side a backbone config will generate, when it can be read without loading it."""
    if cfg.kind != "tiny":
        return None
    if cfg.pretrained is None:
        return cfg.unet.sample_size
    unet_cfg = resolve_shipped(cfg.pretrained) / "unet" / "config.json"
    if unet_cfg.exists():
        return int(json.loads(unet_cfg.read_text()).get("sample_size", 0)) or None
    return None


def backbone_for_model(model: str, *, kind: Literal["auto", "tiny", "sd"] = "auto") -> BackboneConfig:
    """A backbone config for a model folder: a Stable Diffusion folder (``model_index.json``), a tiny
    backbone (``fairtune_backbone.json``) or the name of a shipped checkpoint.

    Raises:
        FileNotFoundError: ``kind='auto'`` and ``model`` is neither.
    """
    if kind == "auto":
        p = resolve_shipped(model)
        if (p / "model_index.json").is_file():
            kind = "sd"
        elif (p / BACKBONE_FILE).is_file():
            kind = "tiny"
        else:
            raise FileNotFoundError(
                f"model {model!r} is neither a Stable Diffusion folder (model_index.json), a fairtune tiny "
                f"backbone ({BACKBONE_FILE}) nor a shipped checkpoint; for a hub id pass --kind sd"
            )
    return BackboneConfig(kind=kind, pretrained=model)


def audit(
    *,
    model: str,
    prompts: Path,
    out: Path,
    adapter: Path | None = None,
    fuse: bool = True,
    kind: Literal["auto", "tiny", "sd"] = "auto",
    judges: JudgeConfig = JudgeConfig(),
    target: TargetConfig = TargetConfig(),
    generation: GenerationConfig = GenerationConfig(),
    grid_columns: int = 8,
    name: str | None = None,
    progress: bool = True,
    backbone: Backbone | None = None,
    save_images: bool = True,
    update_model_card: bool = False,
) -> dict:
    """Audit one model (optionally with a LoRA adapter): generate for PROMPTS, judge, and write
    OUT/metrics.json, OUT/report.md and OUT/report.html.

    Args:
        model: A Stable Diffusion folder, a tiny backbone folder or a shipped checkpoint name.
        prompts: A text file (one prompt per line) or YAML/JSON (prompts, prompt groups, or
            concept -> prompt).
        out: Output folder.
        adapter: A folder with pytorch_lora_weights.safetensors.
        fuse: Merge the adapter into the UNet weights.
        kind: Backbone kind; ``auto`` reads it from the folder.
        judges: The judges (ColoredDigits-Bias judges, or any attribute classifier).
        target: The target attribute mix.
        generation: Images per prompt, DDIM steps, guidance scale, first seed, batch size.
        grid_columns: Images per prompt in the grid.
        name: The method's name in the report (default ``model`` or ``model+adapter``).
        progress: Show progress bars.
        backbone: The model, already loaded (``model`` then only names it in the report).
        save_images: Write every image to OUT/images/ (what ``fairtune review`` shows).
        update_model_card: Also write the figures into the adapter's own model card (by default
            they go to OUT/model_card_<name>.md and the adapter folder is not touched).

    Returns:
        The metrics written to ``metrics.json``.
    """
    method = MethodConfig(
        name=name or ("model+adapter" if adapter is not None else "model"),
        kind="adapter" if adapter is not None else "base",
        adapter=str(adapter) if adapter is not None else None,
        fuse=fuse,
    )
    groups = load_prompt_file(prompts)
    cfg = CompareConfig(
        methods=[method],
        prompts=groups,
        backbone=backbone.config if backbone is not None else backbone_for_model(model, kind=kind),
        judges=judges,
        target=target,
        generation=generation,
        grid_columns=grid_columns,
        frechet_roles=list(ROLES),
        title=f"fairtune audit: {model}" + (f" + {adapter}" if adapter is not None else ""),
        update_model_card=update_model_card,
    )
    return run_comparison(cfg, out, backbone=backbone, progress=progress, save_images=save_images)
