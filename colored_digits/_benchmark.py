"""ColoredDigits-Bias evaluation of one backbone: neutral prompts per digit, the benchmark's judges,
and the comparison's own per-method path (:func:`~fairtune.eval.generate_method`, then
:func:`~fairtune.eval.judge_method` and its scoring engine). Used by the sweep's judge function and the
benchmarks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from fairtune.data import GROUP_SEP, AttributeSpec, Target, TargetConfig
from fairtune.eval import (
    GenerationConfig,
    JudgePanel,
    MethodConfig,
    MethodImages,
    PromptEntry,
    PromptGroup,
    generate_method,
    judge_method,
    load_reference_images,
    method_backbone,
    prompt_grid,
)
from fairtune.models import (
    LORA_WEIGHT_NAME,
    Backbone,
    BackboneConfig,
    TinyUNetConfig,
    load_adapter,
)

from ._data import concept_name
from ._judges import Judges, load_judges
from ._panel import colored_digits_panel


def colored_digits_prompts(
    *,
    seen: Sequence[int] = tuple(range(8)),
    heldout: Sequence[int] = (8, 9),
    paraphrase: Sequence[int] = (1, 3, 5, 7),
    paraphrase_template: str = "a drawing of the number {value}",
) -> list[PromptGroup]:
    """The ColoredDigits-Bias prompt groups: neutral prompts of seen and held-out digits, and a
    paraphrase the training never saw."""
    groups = [
        PromptGroup("seen", "seen", "a handwritten digit {value}", list(seen), "digit {value}"),
        PromptGroup("heldout", "heldout", "a handwritten digit {value}", list(heldout), "digit {value}"),
        PromptGroup("paraphrase", "paraphrase", paraphrase_template, list(paraphrase), "digit {value}"),
    ]
    return [g for g in groups if g.values]


def digit_entries(digits: Sequence[int], seen: Sequence[int], prompt: str) -> list[PromptEntry]:
    """One prompt per digit, keyed by its concept (``digit 3``), role ``seen`` or ``heldout``."""
    return [
        PromptEntry(
            key=concept_name(d),
            group="",
            role="seen" if d in seen else "heldout",
            concept=concept_name(d),
            prompt=prompt.format(d=d),
        )
        for d in digits
    ]


def _as_target(
    target: Target | Sequence[float] | Mapping[str, Sequence[float]],
    panel: JudgePanel,
    concepts: Sequence[str] = (),
) -> Target:
    """A target given as one vector over the panel's classes, or one per concept (``"digit 3"``), as the
    :class:`~fairtune.data.Target` the comparison's path scores against (a mapping must name every one
    of ``concepts``)."""
    if isinstance(target, Target):
        return target
    classes = list(panel.classes)
    # a joint panel ("color+background") judges groups "red+dark": each attribute's classes, in order
    names = panel.attribute.split(GROUP_SEP)
    spec = {a: list(dict.fromkeys(g.split(GROUP_SEP)[i] for g in classes)) for i, a in enumerate(names)}
    per = dict(target) if isinstance(target, Mapping) else {}
    for where, v in [("target", target)] if not per else per.items():
        if len(v) != len(classes):
            raise ValueError(f"{where}: {len(v)} proportions for the panel's {len(classes)} groups {classes}")
    missing = [c for c in concepts if per and c not in per]
    if missing:
        raise ValueError(f"the target names no proportions for {missing}")
    first = next(iter(per.values())) if per else target
    cfg = TargetConfig(
        attributes=names,
        proportions=dict(zip(classes, map(float, first))),
        per_concept={c: dict(zip(classes, map(float, v))) for c, v in per.items()} or None,
    )
    out = Target(cfg, AttributeSpec(spec))
    if list(out.groups) != classes:
        raise ValueError(f"the panel's groups {classes} are not the product of {spec} in order")
    return out


def _panel(judges: Judges | JudgePanel, color_judge: str, reference: torch.Tensor | None) -> JudgePanel:
    if isinstance(judges, JudgePanel):
        return judges
    return colored_digits_panel(judges, color_judge=color_judge, reference=reference)


_COST = ("unet_evals_per_image", "unet_evals_per_image_formula", "unet_calls", "seconds", "sec_per_image")


def judge_digit_images(
    images: torch.Tensor,
    *,
    digits: Sequence[int],
    n_per_prompt: int,
    judges: Judges | JudgePanel,
    target: Target | Sequence[float] | Mapping[str, Sequence[float]],
    color_judge: str = "hue",
    reference: torch.Tensor | None = None,
    seen: Sequence[int] = tuple(range(8)),
    prompt: str = "a handwritten digit {d}",
) -> dict:
    """Per-digit colour metrics, fidelity and (with ``reference``) the Fréchet distance of images
    generated elsewhere, scored by :func:`~fairtune.eval.judge_method` (without its cost figures: no
    generation was timed here).

    Args:
        images: ``len(digits) * n_per_prompt`` images in digit-major order.
        digits: The digit of each block of images.
        n_per_prompt: Images per digit.
        judges: The ColoredDigits-Bias judges (or a panel built from them).
        target: The colour target: a :class:`~fairtune.data.Target`, one vector, or one per concept
            (``"digit 3"``).
        color_judge: ``hue`` or ``cnn``.
        reference: Held-out real images for the Fréchet distance.
        seen: Digits trained on; the rest count as held-out concepts.
        prompt: The neutral prompt (recorded with each concept).
    """
    panel = _panel(judges, color_judge, reference)
    entries = digit_entries(digits, seen, prompt)
    res = MethodImages(images, [e.prompt for e in entries for _ in range(n_per_prompt)], None, 0.0, 0, 0, 0)
    tgt = _as_target(target, panel, [e.concept for e in entries])
    out = judge_method(res, entries, panel=panel, target=tgt, n_per_prompt=n_per_prompt,
                       progress=False)  # fmt: skip
    for k in _COST:
        out["summary"].pop(k, None)
    return out


def evaluate_backbone_on_digits(
    backbone,
    judges: Judges | JudgePanel,
    *,
    digits: Sequence[int] = tuple(range(10)),
    seen: Sequence[int] = tuple(range(8)),
    target: Target | Sequence[float] | Mapping[str, Sequence[float]] = (0.5, 0.5),
    generation: GenerationConfig | None = None,
    reference: torch.Tensor | None = None,
    prompt: str = "a handwritten digit {d}",
    color_judge: str = "hue",
    method: MethodConfig | None = None,
) -> dict:
    """Generate ``n_per_prompt`` images per digit from a neutral prompt, judge and score them: the
    comparison's per-method path (:func:`~fairtune.eval.generate_method`, then
    :func:`~fairtune.eval.judge_method`), so the figures, their cost (UNet evaluations and seconds per
    image) included, are those ``fairtune compare`` gives the same method.

    Args:
        method: What generates (``None``: ``backbone`` as it is, kind ``base``); kind
            ``class_adapters`` draws each image's adapter from the target's mix.
    """
    gen = generation or GenerationConfig()
    panel = _panel(judges, color_judge, reference)
    entries = digit_entries(digits, seen, prompt)
    tgt = _as_target(target, panel, [e.concept for e in entries])
    method = method or MethodConfig("run")
    res = generate_method(
        method_backbone(backbone, method), method, entries, generation=gen, target=tgt, progress=False
    )
    out = judge_method(res, entries, panel=panel, target=tgt, n_per_prompt=gen.n_per_prompt, progress=False)
    out["generation"] = asdict(gen)
    out["images"] = res.images
    return out


def load_benchmark_judges(judges: str | Path, data: str | Path, *, n_reference: int = 2000, seed: int = 0):
    """The benchmark's judges and its held-out real images (the Fréchet reference): the one way the
    sweep, the demo and the benchmarks load them."""
    j = load_judges(judges)
    ref = load_reference_images(data, n=n_reference, image_size=j.report.get("image_size"), seed=seed)
    return j, ref


@lru_cache(maxsize=4)
def _cached_judges(path: str) -> Judges:
    return load_judges(path)


@lru_cache(maxsize=4)
def _cached_reference(path: str, n: int, image_size: int | None) -> torch.Tensor:
    p = Path(path)
    return load_reference_images(p.parent if p.name == "table" else p, n=n, image_size=image_size)


def judge_colored_digits(
    run_dir: Path,
    config: dict,
    *,
    judges: str = "runs/judges/colored-digits-16",
    n_per_prompt: int = 128,
    steps: int = 25,
    guidance_scale: float = 2.0,
    seed: int = 0,
    batch_size: int | None = None,
    digits: list[int] | None = None,
    prompt: str = "a handwritten digit {d}",
    color_judge: str = "hue",
    reference: str | None = None,
    reference_n: int = 2000,
    sample_grid: bool = False,
    paraphrase: str | None = None,
    paraphrase_digits: list[int] | None = None,
    explicit: str | None = None,
    explicit_n: int = 32,
    device: Literal["auto", "cpu", "cuda"] = "cpu",
    class_adapters: Mapping[str, str | Path] | None = None,
    adapter_scale: float = 1.0,
) -> dict[str, float]:
    """Judge a run on ColoredDigits-Bias: the base model (``model.backbone`` of the run's resolved
    config) with the run's adapter fused in (or as it is, for a run that trains nothing),
    ``n_per_prompt`` images per digit from a neutral prompt, scored against the run's own target
    (``data.target``); digits in ``data.concepts`` count as seen, the others as held out.

    Args:
        run_dir: The run folder (``adapter/`` or ``model/``, ``config.yaml``).
        config: The run's resolved config.
        judges: Folder written by ``fairtune judges train``.
        n_per_prompt: Images per digit (≥ 128 for a usable interval; see DESIGN §10).
        steps: DDIM steps.
        guidance_scale: Judging guidance (≤ 2, DESIGN §10).
        seed: Image i of every prompt starts from seed ``seed + i``.
        batch_size: Images per UNet batch (default: the backbone's choice).
        digits: Digits to judge (default 0-9).
        prompt: Neutral prompt template.
        color_judge: ``hue`` or ``cnn``.
        reference: A ColoredDigits data folder (or its ``table``) whose held-out split is the real
            reference for the Fréchet distance; ``None`` skips it.
        reference_n: Real images in the reference.
        sample_grid: Also write ``run_dir/samples.png`` (8 images per digit).
        paraphrase: A wording the training never saw (``"a drawing of the number {d}"``): its
            images of ``paraphrase_digits`` (default the seen digits) score ``mean_dev_paraphrase``
            and ``worst_dev_paraphrase``, same seeds and target.
        paraphrase_digits: Digits prompted with ``paraphrase``.
        explicit: A prompt naming the class (``"a {cls} handwritten digit {d}"``): for every seen
            digit and target class, ``explicit_n`` images; ``explicit_follow`` is the share judged as
            the named class (a single-attribute target only), ``explicit_follow_min`` the lowest
            prompt's.
        explicit_n: Images per explicit prompt.
        device: Where to generate and judge (``auto``: a GPU where there is one).
        class_adapters: Judge, instead of the run's own adapter, the base model with one adapter
            folder per class (:class:`~fairtune.models.ClassAdapterMix`), each image drawn from the
            run's target proportions (stratified per prompt); ``run_dir`` then only receives the grid.
        adapter_scale: The weight every judged adapter is fused at (1: as trained).

    Returns:
        Flat metrics: the scoring engine's summary (``mean_dev_seen``, ``worst_dev_seen``,
        ``mean_dev_heldout``, split into ``mean_dev_named`` (held-out digits the training named
        without images, in ``model.fairness.concepts`` or ``model.distill.concepts``) and
        ``mean_dev_unnamed`` (never named), ``fidelity``, ``frechet``, ...) and every target
        group's share per digit (``red_share_d3``, ``green+dark_share_d3`` for a joint target).
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    run_dir = Path(run_dir)
    bcfg = dict(config["model"]["backbone"])
    if isinstance(bcfg.get("unet"), dict):
        bcfg["unet"] = TinyUNetConfig(**bcfg["unet"])
    data = config.get("data") or {}
    target = Target(
        TargetConfig(**(data.get("target") or {})),
        AttributeSpec(data.get("attributes") or {"color": ["red", "blue"]}),
    )
    if (
        adapter_scale != 1.0
        and class_adapters is None
        and not (run_dir / "adapter" / LORA_WEIGHT_NAME).is_file()
    ):
        raise ValueError(f"{run_dir}: adapter_scale={adapter_scale} but no adapter to scale")
    method = None
    if class_adapters is not None:
        if len(target.attributes) != 1 or target.config.per_concept:
            raise ValueError("class_adapters: one attribute and one mix for every concept only")
        # each image's adapter drawn from the target's mix, stratified per prompt, as compare draws it
        method = MethodConfig(
            "run", kind="class_adapters", class_adapters={c: str(d) for c, d in class_adapters.items()},
            adapter_scale=adapter_scale,
        )  # fmt: skip
        bb = Backbone.from_config(BackboneConfig(**bcfg))
    elif (run_dir / "adapter" / LORA_WEIGHT_NAME).is_file():
        if bcfg.get("pretrained") is None:
            raise ValueError(
                f"{run_dir}: the run trained an adapter on a randomly initialised UNet "
                "(model.backbone.pretrained: null); judging needs the base it was trained on"
            )
        bb = Backbone.from_config(BackboneConfig(**bcfg))
        load_adapter(bb, run_dir / "adapter", fuse=True, scale=adapter_scale)
    elif (run_dir / "model").is_dir():
        bb = Backbone.from_config(BackboneConfig(**{**bcfg, "pretrained": str(run_dir / "model")}))
    elif bcfg.get("pretrained") is not None:  # nothing trained: the base model as it is
        bb = Backbone.from_config(BackboneConfig(**bcfg))
    else:
        raise ValueError(f"{run_dir}: no adapter/ or model/ to judge, and no pretrained base in its config")
    jd = _cached_judges(str(Path(judges).resolve()))
    if jd.groups(target.attributes) != list(target.groups):
        raise ValueError(
            f"the judges score {target.attributes} groups {jd.groups(target.attributes)} "
            f"but the run's target groups are {target.groups}"
        )
    digits = list(range(10)) if digits is None else list(digits)
    concepts = data.get("concepts")
    seen = [d for d in digits if concepts is None or f"digit {d}" in concepts]
    # Held-out digits the training named without images (the prompts of lever 3 or of the
    # distillation) and those it never named: two roles, reported apart.
    model_cfg = config.get("model") or {}
    named_concepts = {
        c for key in ("fairness", "distill") for c in ((model_cfg.get(key) or {}).get("concepts") or [])
    }
    named = [d for d in digits if d not in seen and f"digit {d}" in named_concepts]
    ref = (
        _cached_reference(str(Path(reference).resolve()), reference_n, jd.report.get("image_size"))
        if reference
        else None
    )
    bb.to(device)
    panel = colored_digits_panel(jd, color_judge=color_judge, reference=ref, attributes=target.attributes)
    gen = GenerationConfig(
        n_per_prompt=n_per_prompt,
        steps=steps,
        guidance_scale=guidance_scale,
        seed=seed,
        batch_size=batch_size,
    )
    ev = evaluate_backbone_on_digits(
        bb, panel, digits=digits, seen=seen, target=target, generation=gen, reference=ref, prompt=prompt,
        color_judge=color_judge, method=method,
    )  # fmt: skip
    out = {
        k: float(v)
        for k, v in ev["summary"].items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    if paraphrase:
        pd = list(seen if paraphrase_digits is None else paraphrase_digits)
        para = evaluate_backbone_on_digits(
            bb, panel, digits=pd, seen=pd, target=target, generation=gen, reference=None, prompt=paraphrase,
            color_judge=color_judge, method=method,
        )["summary"]  # fmt: skip
        out["mean_dev_paraphrase"] = float(para["mean_dev_seen"])
        out["worst_dev_paraphrase"] = float(para["worst_dev_seen"])
        out["undetermined"] += para["undetermined"]
        out["n_images"] += para["n_images"]
        out["undetermined_rate"] = out["undetermined"] / max(out["n_images"], 1)
    if explicit and len(target.attributes) == 1:
        follow = explicit_follow(
            bb, panel, explicit, seen, list(target.groups), n=explicit_n, seed=seed, steps=steps,
            guidance_scale=guidance_scale, batch_size=batch_size, method=method, target=target,
        )  # fmt: skip
        out["explicit_follow"] = float(np.mean(list(follow.values())))
        out["explicit_follow_min"] = float(min(follow.values()))
    for role, ds in (("named", named), ("unnamed", [d for d in digits if d not in seen and d not in named])):
        devs = [ev["per_concept"][f"digit {d}"]["dev"] for d in ds]
        devs = [v for v in devs if v is not None]
        if devs:
            out[f"mean_dev_{role}"] = float(np.mean(devs))
    for d in digits:
        for gi, group in enumerate(target.groups):
            share = ev["per_concept"][f"digit {d}"]["p_hat"][gi]
            out[f"{group}_share_d{d}"] = float("nan") if share is None else float(share)
    if sample_grid:  # the first 8 images of every digit, upscaled 3x, to look at
        from PIL import Image

        grid = prompt_grid(ev["images"], n_prompts=len(digits), n_per_prompt=n_per_prompt, columns=8)
        h, w = grid.shape[:2]
        Image.fromarray(grid).resize((w * 3, h * 3), Image.NEAREST).save(run_dir / "samples.png")
    return out


def explicit_follow(
    backbone,
    panel: JudgePanel,
    template: str,
    digits: Sequence[int],
    classes: Sequence[str],
    *,
    n: int = 32,
    seed: int = 0,
    steps: int = 25,
    guidance_scale: float = 2.0,
    batch_size: int | None = None,
    method: MethodConfig | None = None,
    target: Target | None = None,
) -> dict[str, float]:
    """Whether prompts that name a class keep it: for each digit and class, ``n`` images of
    ``template.format(cls=..., d=...)`` (generated by ``method`` as the comparison generates it:
    ``None``, ``backbone`` as it is) and the share the judge places in that class (undetermined
    images count as not following). Keyed ``"<cls> digit <d>"``. ``target``: what ``method`` draws from
    (``class_adapters``); ``None``: uniform over ``classes``."""
    entries = [
        PromptEntry(key=f"{c} digit {d}", group="explicit", role="explicit", concept=concept_name(d),
                    prompt=template.format(cls=c, d=d), names=c)
        for d in digits for c in classes
    ]  # fmt: skip
    gen = GenerationConfig(
        n_per_prompt=n, steps=steps, guidance_scale=guidance_scale, seed=seed, batch_size=batch_size
    )
    if target is None:
        target = _as_target([1 / len(classes)] * len(classes), panel)
    method = method or MethodConfig("run")
    res = generate_method(
        method_backbone(backbone, method), method, entries, generation=gen, target=target, progress=False
    )
    labels = np.asarray(panel.attribute_labels(res.images, desc="explicit")).reshape(len(entries), n)
    idx = [ci for _ in digits for ci in range(len(classes))]
    return {e.key: float((row == ci).mean()) for e, row, ci in zip(entries, labels, idx)}


__all__ = [
    "colored_digits_prompts",
    "explicit_follow",
    "judge_colored_digits",
    "digit_entries",
    "evaluate_backbone_on_digits",
    "judge_digit_images",
    "load_benchmark_judges",
]
