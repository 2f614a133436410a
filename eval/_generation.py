"""Generation for judging: every method on the same prompts and seeds (image ``i`` of every prompt
starts from the noise of seed ``seed + i``), its UNet evaluations counted and its time measured."""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from fairtune.data import Target
from fairtune.models import (
    Backbone,
    ClassAdapterMix,
    adapter_copy,
    augment_prompts,
    draw_classes,
    fair_diffusion_sample,
    unet_evals_per_image,
)

if TYPE_CHECKING:
    from ._config import MethodConfig, PromptEntry


@dataclass
class GenerationConfig:
    """How images are generated for judging.

    Attributes:
        n_per_prompt: Images per prompt (N ≥ 256 for a ±0.03 interval on a share; ≥ 128 at least).
        steps: DDIM steps.
        guidance_scale: Classifier-free guidance; judge at ≤ 2 (higher scales shift the palette).
        seed: Image ``i`` of each prompt starts from the noise of seed ``seed + i``.
        batch_size: Images per UNet batch; ``None``: the backbone's choice
            (:meth:`~fairtune.models.Backbone.sampling_batch_size`: 64 on a CPU, 512 on a GPU).
    """

    n_per_prompt: int = 128
    steps: int = 25
    guidance_scale: float = 2.0
    seed: int = 0
    batch_size: int | None = None


def generate(
    sample_fn: Callable[..., torch.Tensor],
    prompts: Sequence[str],
    cfg: GenerationConfig,
) -> tuple[torch.Tensor, float]:
    """``n_per_prompt`` images for each prompt (prompt-major order) and the seconds it took.

    Args:
        sample_fn: ``sample_fn(prompts, seeds=..., steps=..., guidance_scale=..., batch_size=...)``,
            e.g. ``Backbone.sample``.
        prompts: The prompts.
        cfg: Generation settings.
    """
    all_prompts = [p for p in prompts for _ in range(cfg.n_per_prompt)]
    seeds = [cfg.seed + i for _ in prompts for i in range(cfg.n_per_prompt)]
    t0 = time.perf_counter()
    images = sample_fn(
        all_prompts,
        seeds=seeds,
        steps=cfg.steps,
        guidance_scale=cfg.guidance_scale,
        batch_size=cfg.batch_size,
    )
    return images, time.perf_counter() - t0


class UNetCounter:
    """Counts the forward calls of one or several UNets and the batch rows they run (forward hooks),
    and advances a progress bar by the rows as they finish; ``rows / images`` is the UNet evaluations
    spent per image."""

    def __init__(self, unet: torch.nn.Module | Sequence[torch.nn.Module], bar=None) -> None:
        self.unets = [unet] if isinstance(unet, torch.nn.Module) else list(unet)
        self.bar = bar
        self.calls = self.rows = 0
        self._handles: list = []

    def _hook(self, module, args, kwargs, output) -> None:
        x = args[0] if args else kwargs["sample"]
        n = int(x.shape[0])
        self.calls += 1
        self.rows += n
        if self.bar is not None:
            self.bar.update(n)

    def __enter__(self) -> UNetCounter:
        self._handles = [u.register_forward_hook(self._hook, with_kwargs=True) for u in self.unets]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()


@dataclass
class MethodImages:
    """What one method generated.

    Attributes:
        images: ``(len(entries) * n_per_prompt, 3, H, W)`` in [0, 1], prompt-major.
        prompts: The prompt each image was generated from (augmented prompts for prompt augmentation).
        drawn: The class drawn for each image (the two inference-time baselines), else ``None``.
        seconds: Wall time of the generation.
        unet_calls: UNet forward calls.
        unet_rows: Batch rows over those calls (UNet evaluations).
        unet_evals_formula: UNet evaluations per image that the method's formula gives.
    """

    images: torch.Tensor
    prompts: list[str]
    drawn: list[str] | None
    seconds: float
    unet_calls: int
    unet_rows: int
    unet_evals_formula: int


def method_backbone(base: Backbone, method: MethodConfig) -> Backbone:
    """The backbone a method samples from: ``base`` itself, or (with an adapter) a backbone sharing
    ``base``'s text encoder, VAE and prompt cache around a copy of its UNet carrying the adapter, so
    ``base`` is never changed."""
    if method.adapter is None:
        return base
    return adapter_copy(base, method.adapter, fuse=method.fuse, scale=method.adapter_scale)


def generate_method(
    backbone: Backbone,
    method: MethodConfig,
    entries: Sequence[PromptEntry],
    *,
    generation: GenerationConfig,
    target: Target,
    progress: bool = True,
) -> MethodImages:
    """Generate ``n_per_prompt`` images per prompt with one method (image ``i`` of each prompt from
    seed ``generation.seed + i``), counting UNet evaluations and timing it.

    Args:
        backbone: The backbone the method samples from (see :func:`method_backbone`).
        method: The method.
        entries: The prompts.
        generation: Generation settings.
        target: The target (drawn per image by the inference-time baselines, per concept).
        progress: Show a progress bar.
    """
    gen = generation
    n = gen.n_per_prompt
    prompts = [e.prompt for e in entries for _ in range(n)]
    seeds = [gen.seed + i for _ in entries for i in range(n)]
    concepts = [e.concept for e in entries for _ in range(n)]
    n_edits = len(method.fair_diffusion.edit_prompts) if method.fair_diffusion is not None else 0
    formula = unet_evals_per_image(method.kind, steps=gen.steps, n_edits=n_edits)
    # Warm up outside the timing (first-call allocations), and encode the neutral prompts, so no
    # method pays for work another method already did.
    backbone.encode_prompts(list(dict.fromkeys([*prompts, ""])))
    backbone.sample(prompts[:1], seeds=seeds[:1], steps=1, guidance_scale=gen.guidance_scale, batch_size=1)

    # The baselines draw a class per image from the target of its concept: one call per distinct target.
    parts: dict[tuple[float, ...], list[int]] = {}
    for i, c in enumerate(concepts):
        parts.setdefault(tuple(target.proportions(c)), []).append(i)

    used_prompts = list(prompts)
    drawn: list[str] | None = None if method.kind in ("base", "adapter") else [""] * len(prompts)
    images = None
    mixer = (
        ClassAdapterMix(backbone, method.class_adapters, fuse=method.fuse, scale=method.adapter_scale)
        if method.kind == "class_adapters"
        else None
    )
    bar = tqdm(
        total=len(prompts) * formula, desc=f"generate {method.name}", unit="eval", disable=not progress,
        unit_scale=True,
    )  # fmt: skip
    unets = [bb.unet for bb in mixer.backbones.values()] if mixer is not None else backbone.unet
    with UNetCounter(unets, bar) as counter:
        t0 = time.perf_counter()
        if method.kind in ("base", "adapter"):
            images = backbone.sample(
                prompts, seeds=seeds, steps=gen.steps, guidance_scale=gen.guidance_scale,
                batch_size=gen.batch_size,
            )  # fmt: skip
        elif mixer is not None:
            drawn = mix_classes(method, entries, target, n)
            images = mixer.sample(
                prompts, seeds=seeds, classes=drawn, steps=gen.steps, guidance_scale=gen.guidance_scale,
                batch_size=gen.batch_size,
            )  # fmt: skip
        else:
            chunks = {}
            for q, idx in parts.items():
                tq = dict(zip(target.groups, q))
                ps, ss = [prompts[i] for i in idx], [seeds[i] for i in idx]
                if method.kind == "prompt_augmentation":
                    aug, cls = augment_prompts(ps, config=method.prompt_augmentation, target=tq)
                    x = backbone.sample(
                        aug, seeds=ss, steps=gen.steps, guidance_scale=gen.guidance_scale,
                        batch_size=gen.batch_size,
                    )  # fmt: skip
                    for i, p in zip(idx, aug):
                        used_prompts[i] = p
                else:
                    x, cls = fair_diffusion_sample(
                        backbone, ps, seeds=ss, config=method.fair_diffusion, target=tq, steps=gen.steps,
                        guidance_scale=gen.guidance_scale, batch_size=gen.batch_size,
                    )  # fmt: skip
                for i, c in zip(idx, cls):
                    drawn[i] = c
                chunks[q] = x
            images = torch.empty((len(prompts), *next(iter(chunks.values())).shape[1:]))
            for q, idx in parts.items():
                images[idx] = chunks[q]
        seconds = time.perf_counter() - t0
    bar.close()
    return MethodImages(
        images=images.cpu(),
        prompts=used_prompts,
        drawn=drawn,
        seconds=seconds,
        unet_calls=counter.calls,
        unet_rows=counter.rows,
        unet_evals_formula=formula,
    )


def mix_classes(method: MethodConfig, entries: Sequence[PromptEntry], target: Target, n: int) -> list[str]:
    """The class (adapter) of each image of a ``class_adapters`` method: per prompt, ``n`` images drawn
    stratified from its concept's mix (``method.mix[concept]``, else ``method.mix["*"]``, else the
    target's proportions), in a random order seeded by the prompt, so the same request and seeds always
    give the same images. With ``method.route_named``, a prompt naming exactly one class (an explicit
    group's ``names``, else its name as a word in the prompt: :func:`named_class`) draws that class for
    all its images."""
    mix = method.mix or {}
    out: list[str] = []
    for e in entries:
        named = (e.names or named_class(e.prompt, target.groups)) if method.route_named else None
        if named is not None:  # the prompt asks for a class: its adapter, whatever the mix
            out += [named] * n
            continue
        w = mix.get(e.concept, mix.get("*"))
        if w is None:
            w = dict(zip(target.groups, target.proportions(e.concept)))
        w = {c: float(w[c]) for c in target.groups}
        out += draw_classes([e.prompt] * n, target=w, assignment="stratified", seed=0)
    return out


def named_class(prompt: str, classes: Sequence[str]) -> str | None:
    """The one class whose name ``prompt`` contains as a word (case-insensitive), else ``None`` (no
    class named, or more than one)."""
    text = prompt.lower()
    hits = [c for c in classes if re.search(rf"(?<![\w-]){re.escape(c.lower())}(?![\w-])", text)]
    return hits[0] if len(hits) == 1 else None


def images_fingerprint(images: torch.Tensor) -> str:
    """SHA-256 of the images quantised to 8 bits: equal for the same images, e.g. the same seeds."""
    q = (images.detach().cpu().float().clamp(0, 1) * 255).round().to(torch.uint8).contiguous()
    return hashlib.sha256(q.numpy().tobytes()).hexdigest()
