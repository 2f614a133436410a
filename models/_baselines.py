"""Inference-time baselines (DESIGN §5): Fair Diffusion (semantic guidance); prompt augmentation is in
``_prompt_augmentation``.

- **Fair Diffusion** (Friedrich et al. 2023) steers each image with SEGA's semantic guidance (Brack et al.
  2023): toward the edit prompt of a class drawn for that image from the target mix, and away from
  every other class's edit prompt. :class:`SemanticGuidance` is the guidance math of diffusers'
  (deprecated) ``SemanticStableDiffusionPipeline``, reproduced operation for operation, and shared by
  :func:`fair_diffusion_sample` (any :class:`~fairtune.models.Backbone`, with or without a LoRA adapter
  on its UNet) and :class:`FairDiffusionPipeline` (a ``StableDiffusionPipeline``, so
  ``load_lora_weights`` works on it). Cost: ``2 + K`` UNet evaluations per step instead of 2.
- **Prompt augmentation**: the attribute word of a class drawn per image is written into the prompt
  (``"a handwritten digit 3"`` -> ``"a red handwritten digit 3"``). Cost: that of the base model.

Both draw classes with :func:`draw_classes`, so for the same prompts, target, assignment and seed they
assign the same class to each image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from diffusers import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput

from ._prompt_augmentation import _check_assignment, _check_prompts, _check_target, draw_classes


def _per_concept(name: str, value, n: int, *, allow_none: bool = False) -> list:
    """A scalar or a list of ``n`` values, as a list of ``n`` values."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} values but there are {n} edit prompts")
    for v in values:
        if v is None and allow_none:
            continue
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise ValueError(f"{name} must hold finite numbers, got {value!r}")
    return values


class SemanticGuidance:
    """SEGA's semantic guidance as diffusers' ``SemanticStableDiffusionPipeline`` computes it.

    Per denoising step, each edit direction is ``(edit estimate - unconditional estimate)``, negated
    where reversed, times its edit guidance scale; only entries at or above the ``edit_threshold``
    quantile of its magnitude (per image and channel) are kept. The kept directions are mixed by their
    weights, momentum (``edit_momentum_scale``, ``edit_mom_beta``) is added, and the result is added to
    classifier-free guidance once every edit's warm-up is over (while only some are, the warmed-up ones
    are added with their weights normalised, without momentum), until its cool-down step.

    Generalises diffusers in one way: the reverse flag may differ per image (``(K, B)``), which is how
    Fair Diffusion pushes each image toward its own class. One instance holds the momentum of one
    sampling run; build a new one per run.

    Args:
        n_edits: Number of edit prompts ``K``.
        guidance_scale: Classifier-free guidance scale.
        reverse: Whether each edit pushes away from its prompt: a bool, ``K`` bools, or a bool tensor
            ``(K,)`` or ``(K, B)`` (per edit and image).
        edit_guidance_scale: Scale of each edit direction (one value or ``K``).
        edit_warmup_steps: Steps (per edit) before the edit is applied; momentum builds meanwhile.
        edit_cooldown_steps: Step (per edit) from which the edit is no longer applied; ``None``: never.
        edit_threshold: Quantile of an edit direction's magnitude below which it is zeroed (per edit).
        edit_momentum_scale: Weight of the momentum added to the edit guidance.
        edit_mom_beta: Share of the previous momentum kept at each step.
        edit_weights: Relative weight of each edit; ``None``: all 1.
    """

    def __init__(
        self,
        n_edits: int,
        *,
        guidance_scale: float,
        reverse: bool | Sequence[bool] | torch.Tensor = False,
        edit_guidance_scale: float | Sequence[float] = 4.0,
        edit_warmup_steps: int | Sequence[int] = 5,
        edit_cooldown_steps: int | None | Sequence[int | None] = None,
        edit_threshold: float | Sequence[float] = 0.95,
        edit_momentum_scale: float = 0.5,
        edit_mom_beta: float = 0.6,
        edit_weights: Sequence[float] | None = None,
    ) -> None:
        if n_edits < 0:
            raise ValueError(f"n_edits must be >= 0, got {n_edits}")
        self.n_edits = n_edits
        self.guidance_scale = float(guidance_scale)
        self.edit_guidance_scale = _per_concept("edit_guidance_scale", edit_guidance_scale, n_edits)
        self.edit_warmup_steps = _per_concept("edit_warmup_steps", edit_warmup_steps, n_edits)
        self.edit_cooldown_steps = _per_concept(
            "edit_cooldown_steps", edit_cooldown_steps, n_edits, allow_none=True
        )
        self.edit_threshold = _per_concept("edit_threshold", edit_threshold, n_edits)
        if any(not 0.0 <= q <= 1.0 for q in self.edit_threshold):
            raise ValueError(f"edit_threshold must be in [0, 1], got {edit_threshold!r}")
        self.edit_weights = (
            [1.0] * n_edits if not edit_weights else _per_concept("edit_weights", edit_weights, n_edits)
        )
        self.edit_momentum_scale = float(edit_momentum_scale)
        self.edit_mom_beta = float(edit_mom_beta)
        rev = torch.as_tensor(reverse, dtype=torch.bool)
        if rev.ndim == 0:
            rev = rev.expand(n_edits)
        if rev.ndim not in (1, 2) or rev.shape[0] != n_edits:
            raise ValueError(
                f"reverse must be a bool, {n_edits} bools or a (K, B) bool tensor with K={n_edits}, "
                f"got shape {tuple(rev.shape)}"
            )
        self.reverse = rev
        self.momentum: torch.Tensor | None = None

    def _sign(self, c: int, like: torch.Tensor) -> torch.Tensor | float:
        """+1 / -1 for edit ``c``: a float, or ``(B, 1, 1, 1)`` when the flags differ per image."""
        r = self.reverse[c]
        if r.ndim == 0:
            return -1.0 if bool(r) else 1.0
        if r.shape[0] != like.shape[0]:
            raise ValueError(f"reverse has flags for {r.shape[0]} images but the batch has {like.shape[0]}")
        sign = 1.0 - 2.0 * r.to(device=like.device, dtype=like.dtype)
        return sign.view(-1, *([1] * (like.ndim - 1)))

    def __call__(
        self,
        step: int,
        noise_pred_uncond: torch.Tensor,
        noise_pred_text: torch.Tensor,
        noise_pred_edits: Sequence[torch.Tensor] = (),
        *,
        sem_guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The guided noise prediction of step ``step`` (0-based); updates the momentum.

        Args:
            step: Index of the denoising step.
            noise_pred_uncond: Unconditional estimate ``(B, C, H, W)``.
            noise_pred_text: Conditional estimate ``(B, C, H, W)``.
            noise_pred_edits: ``K`` estimates ``(B, C, H, W)``, one per edit prompt.
            sem_guidance: Pre-computed guidance added on top (diffusers' ``sem_guidance[step]``).
        """
        if len(noise_pred_edits) != self.n_edits:
            raise ValueError(f"got {len(noise_pred_edits)} edit estimates for {self.n_edits} edit prompts")
        i = step
        device = noise_pred_uncond.device
        noise_guidance = self.guidance_scale * (noise_pred_text - noise_pred_uncond)
        if self.momentum is None:
            self.momentum = torch.zeros_like(noise_guidance)
        if self.n_edits:
            k = self.n_edits
            concept_weights = torch.zeros(
                (k, noise_guidance.shape[0]), device=device, dtype=noise_guidance.dtype
            )
            noise_guidance_edit = torch.zeros(
                (k, *noise_guidance.shape), device=device, dtype=noise_guidance.dtype
            )
            warmup_inds = []
            for c, noise_pred_edit in enumerate(noise_pred_edits):
                cooldown = self.edit_cooldown_steps[c]
                if i >= self.edit_warmup_steps[c]:
                    warmup_inds.append(c)
                if cooldown is not None and i >= cooldown:
                    continue  # this edit's direction and weight stay zero
                edit = (noise_pred_edit - noise_pred_uncond) * self._sign(c, noise_pred_edit)
                concept_weights[c, :] = self.edit_weights[c]
                edit = edit * self.edit_guidance_scale[c]
                # per image and channel: keep entries at or above the threshold quantile of |edit|
                # (torch.quantile needs float32); at threshold 0 that quantile is the minimum and
                # every entry is kept, so the sort is skipped
                if self.edit_threshold[c] > 0:
                    tmp = torch.quantile(
                        edit.abs().flatten(start_dim=2).to(torch.float32), self.edit_threshold[c], dim=2
                    ).to(edit.dtype)
                    edit = torch.where(edit.abs() >= tmp[:, :, None, None], edit, torch.zeros_like(edit))
                noise_guidance_edit[c] = edit
            warm = torch.tensor(warmup_inds, dtype=torch.long, device=device)
            if k > warm.shape[0] > 0:
                # some edits warmed up: add those, weights normalised over them, without momentum
                w = torch.index_select(concept_weights, 0, warm)
                w = torch.where(w < 0, torch.zeros_like(w), w)
                w = torch.nan_to_num(w / w.sum(dim=0))  # diffusers leaves NaN when all weights are 0
                partial = torch.einsum("cb,cbijk->bijk", w, torch.index_select(noise_guidance_edit, 0, warm))
                noise_guidance = noise_guidance + partial
            concept_weights = torch.where(
                concept_weights < 0, torch.zeros_like(concept_weights), concept_weights
            )
            concept_weights = torch.nan_to_num(concept_weights)
            edit_total = torch.einsum("cb,cbijk->bijk", concept_weights, noise_guidance_edit)
            edit_total = edit_total.to(self.momentum.device)
            edit_total = edit_total + self.edit_momentum_scale * self.momentum
            self.momentum = self.edit_mom_beta * self.momentum + (1 - self.edit_mom_beta) * edit_total
            if warm.shape[0] == k:
                noise_guidance = noise_guidance + edit_total
        if sem_guidance is not None:
            noise_guidance = noise_guidance + sem_guidance.to(device)
        return noise_pred_uncond + noise_guidance


def _guided_loop(
    unet,
    scheduler,
    latents: torch.Tensor,
    *,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    edits: torch.Tensor | None,
    guidance: SemanticGuidance | None,
    step_kwargs: dict | None = None,
    sem_guidance: Sequence[torch.Tensor] | None = None,
    progress=None,
) -> torch.Tensor:
    """Denoise ``latents`` over ``scheduler.timesteps`` (already set): one UNet call per step on
    ``[uncond, cond, edit_1, ..., edit_K]`` (each a block of B), guided by ``guidance``.

    ``edits`` is ``(K * B, L, D)``, edit-major (edit 1 for every image, then edit 2, ...). Without
    ``uncond`` the UNet runs on ``cond`` alone (no guidance).
    """
    step_kwargs = step_kwargs or {}
    timesteps = scheduler.timesteps
    if uncond is None:
        ctx, n_chunks = cond, 1
    else:
        parts = [uncond, cond] + ([edits] if edits is not None else [])
        ctx = torch.cat(parts)
        n_chunks = ctx.shape[0] // latents.shape[0]
    for i, t in enumerate(progress(timesteps) if progress is not None else timesteps):
        inp = torch.cat([latents] * n_chunks) if n_chunks > 1 else latents
        inp = scheduler.scale_model_input(inp, t)
        noise_pred = unet(inp, t, encoder_hidden_states=ctx).sample
        if uncond is not None:
            out = noise_pred.chunk(n_chunks)
            noise_pred = guidance(
                i, out[0], out[1], out[2:], sem_guidance=None if sem_guidance is None else sem_guidance[i]
            )
        latents = scheduler.step(noise_pred, t, latents, **step_kwargs).prev_sample
    return latents


# ------------------------------------------------------------------------------------ Fair Diffusion
@dataclass
class FairDiffusionConfig:
    """Fair Diffusion on a backbone: per image, SEGA toward the drawn class's edit prompt and away
    from every other class's. Defaults are those of the Fair Diffusion paper's code.

    Attributes:
        edit_prompts: Attribute class -> edit prompt (e.g. ``{"red": "red", "blue": "blue"}``); the
            order is the order of the edits (and of ``edit_weights``).
        edit_guidance_scale: Scale of every edit direction.
        edit_warmup_steps: Denoising steps before the edits are applied (momentum builds meanwhile).
        edit_cooldown_steps: Step from which the edits stop; ``None``: they never stop.
        edit_threshold: Quantile of an edit direction's magnitude (per image and channel) below which
            it is zeroed; 0.95 keeps the largest 5%.
        edit_momentum_scale: Weight of the momentum added to the edit guidance.
        edit_mom_beta: Share of the previous momentum kept at each step.
        edit_weights: Relative weight of each edit prompt (``len(edit_prompts)`` values); ``None``: all 1.
        assignment: How classes are drawn per image from the target mix (see :func:`draw_classes`).
        seed: Seed of the class draw.
    """

    edit_prompts: dict[str, str]
    edit_guidance_scale: float = 4.0
    edit_warmup_steps: int = 5
    edit_cooldown_steps: int | None = None
    edit_threshold: float = 0.95
    edit_momentum_scale: float = 0.5
    edit_mom_beta: float = 0.6
    edit_weights: list[float] | None = None
    assignment: Literal["random", "stratified"] = "random"
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.edit_prompts, dict) or not self.edit_prompts:
            raise ValueError(
                f"edit_prompts must be a non-empty dict class -> prompt, got {self.edit_prompts!r}"
            )
        for k, v in self.edit_prompts.items():
            if not isinstance(k, str) or not k or not isinstance(v, str) or not v.strip():
                raise ValueError(f"edit_prompts needs non-empty class names and prompts, got {k!r}: {v!r}")
        if self.edit_warmup_steps < 0:
            raise ValueError(f"edit_warmup_steps must be >= 0, got {self.edit_warmup_steps}")
        if self.edit_cooldown_steps is not None and self.edit_cooldown_steps < 0:
            raise ValueError(f"edit_cooldown_steps must be >= 0 or None, got {self.edit_cooldown_steps}")
        if not 0.0 <= self.edit_threshold <= 1.0:
            raise ValueError(f"edit_threshold must be in [0, 1], got {self.edit_threshold}")
        if not 0.0 <= self.edit_mom_beta <= 1.0:
            raise ValueError(f"edit_mom_beta must be in [0, 1], got {self.edit_mom_beta}")
        if not math.isfinite(self.edit_guidance_scale) or not math.isfinite(self.edit_momentum_scale):
            raise ValueError("edit_guidance_scale and edit_momentum_scale must be finite")
        if self.edit_weights is not None:
            if len(self.edit_weights) != len(self.edit_prompts):
                raise ValueError(
                    f"edit_weights has {len(self.edit_weights)} values for "
                    f"{len(self.edit_prompts)} edit prompts"
                )
            if any(not math.isfinite(w) or w < 0 for w in self.edit_weights):
                raise ValueError(f"edit_weights must be finite and >= 0, got {self.edit_weights}")
        _check_assignment(self.assignment)

    def guidance(self, *, guidance_scale: float, reverse: torch.Tensor) -> SemanticGuidance:
        """The :class:`SemanticGuidance` of one sampling run with these parameters."""
        return SemanticGuidance(
            len(self.edit_prompts),
            guidance_scale=guidance_scale,
            reverse=reverse,
            edit_guidance_scale=self.edit_guidance_scale,
            edit_warmup_steps=self.edit_warmup_steps,
            edit_cooldown_steps=self.edit_cooldown_steps,
            edit_threshold=self.edit_threshold,
            edit_momentum_scale=self.edit_momentum_scale,
            edit_mom_beta=self.edit_mom_beta,
            edit_weights=self.edit_weights,
        )


@torch.no_grad()
def fair_diffusion_sample(
    backbone,
    prompts: list[str],
    *,
    seeds: list[int],
    config: FairDiffusionConfig,
    target: dict[str, float],
    steps: int = 25,
    guidance_scale: float = 2.0,
    batch_size: int | None = None,
) -> tuple[torch.Tensor, list[str]]:
    """Fair Diffusion samples from a :class:`~fairtune.models.Backbone` (``tiny`` or ``sd``).

    Follows :meth:`Backbone.sample`: DDIM from ``backbone.sampling_scheduler()``, classifier-free
    guidance with the unconditional estimate first, image i from ``backbone.initial_noise([seeds[i]])``
    (so it depends on its seed and drawn class alone). Per image a class is drawn from ``target``
    (:func:`draw_classes` with the prompts as group keys); SEGA pushes toward that class's edit prompt
    and away from every other class's, batched as one UNet call per step on
    ``[uncond, cond, edit_1, ..., edit_K]``. Runs on whatever ``backbone.unet`` is, including a UNet
    carrying a LoRA adapter (:func:`~fairtune.models.attach_lora`, :func:`~fairtune.models.load_adapter`).

    Args:
        backbone: The model to sample from.
        prompts: One prompt per image.
        seeds: One seed per image.
        config: Edit prompts and SEGA parameters.
        target: Class -> probability; its classes must be those of ``config.edit_prompts``.
        steps: DDIM steps.
        guidance_scale: Classifier-free guidance scale.
        batch_size: Images per UNet batch (the UNet sees ``(2 + K) * batch_size``); default
            ``backbone.sampling_batch_size(2 + K)``.

    Returns:
        Images ``(B, 3, H, W)`` in [0, 1] on the CPU, and the class drawn for each image.

    Raises:
        ValueError: On mismatched prompts/seeds, empty prompts, or a target that is not a probability
            over the edit prompts' classes.
    """
    _check_prompts(prompts, seeds)
    _check_target(target, classes=list(config.edit_prompts), what="edit_prompts")
    if batch_size is None:
        batch_size = backbone.sampling_batch_size(2 + len(config.edit_prompts))
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got steps={steps}, batch_size={batch_size}")
    classes = draw_classes(list(prompts), target=target, assignment=config.assignment, seed=config.seed)
    names = list(config.edit_prompts)
    edit_states = backbone.encode_prompts([config.edit_prompts[k] for k in names])  # (K, L, D)
    device = next(backbone.unet.parameters()).device
    was_training = backbone.unet.training
    backbone.unet.eval()
    out = []
    try:
        for s in range(0, len(prompts), batch_size):
            chunk, cls = list(prompts[s : s + batch_size]), classes[s : s + batch_size]
            b = len(chunk)
            reverse = torch.tensor([[c != k for c in cls] for k in names], dtype=torch.bool)  # (K, b)
            sched = backbone.sampling_scheduler()
            sched.set_timesteps(steps)
            lat = backbone.initial_noise(list(seeds[s : s + batch_size])).to(device) * sched.init_noise_sigma
            lat = _guided_loop(
                backbone.unet,
                sched,
                lat,
                cond=backbone.encode_prompts(chunk),
                uncond=backbone.encode_prompts([""] * b),
                edits=edit_states.repeat_interleave(b, dim=0),
                guidance=config.guidance(guidance_scale=guidance_scale, reverse=reverse),
            )
            out.append(backbone.to_pixels(lat).cpu())
    finally:
        backbone.unet.train(was_training)
    return torch.cat(out), classes


class FairDiffusionPipeline(StableDiffusionPipeline):
    """Stable Diffusion with SEGA semantic guidance, the guidance Fair Diffusion uses.

    The ``editing_*`` / ``edit_*`` arguments are those of diffusers' deprecated
    ``SemanticStableDiffusionPipeline`` and give the same images for the same inputs; unlike it, this
    is a ``StableDiffusionPipeline``, so ``load_lora_weights`` (e.g. a fairtune adapter) works::

        pipe = FairDiffusionPipeline.from_pretrained("path/to/sd-1.5", safety_checker=None)
        pipe.load_lora_weights("runs/my-run/adapter")
        images = pipe("a photo of a doctor", editing_prompt=["female person", "male person"],
                      reverse_editing_direction=[False, True]).images

    Differences from diffusers' pipeline: the ``edit_*`` defaults are the Fair Diffusion paper's
    (scale 4, warm-up 5, threshold 0.95, momentum 0.5 / 0.6), not SEGA's; with edit prompts and
    ``guidance_scale <= 1`` the edits still apply (diffusers silently drops them);
    ``editing_prompt_embeddings`` ``(K, L, D)`` are laid out per edit for every image (diffusers
    interleaves them wrongly for more than one prompt); cool-down steps may be ``None`` per edit;
    ``reverse_editing_direction`` may also be a ``(K, batch)`` bool tensor, one flag per edit and image.
    """

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        *,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        editing_prompt: str | list[str] | None = None,
        editing_prompt_embeddings: torch.Tensor | None = None,
        reverse_editing_direction: bool | list[bool] | torch.Tensor = False,
        edit_guidance_scale: float | list[float] = 4.0,
        edit_warmup_steps: int | list[int] = 5,
        edit_cooldown_steps: int | list[int | None] | None = None,
        edit_threshold: float | list[float] = 0.95,
        edit_momentum_scale: float = 0.5,
        edit_mom_beta: float = 0.6,
        edit_weights: list[float] | None = None,
        sem_guidance: list[torch.Tensor] | None = None,
    ):
        """Generate images with semantic guidance.

        Args:
            prompt: Prompt(s).
            height: Image height in pixels; default the UNet's sample size times the VAE's factor.
            width: Image width in pixels; same default.
            num_inference_steps: Denoising steps.
            guidance_scale: Classifier-free guidance scale.
            negative_prompt: Replaces the empty unconditional prompt.
            num_images_per_prompt: Images per prompt.
            eta: DDIM's eta (other schedulers ignore it).
            generator: Random generator(s) of the initial latents (and of stochastic schedulers).
            latents: Initial latents instead of drawing them.
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``.
            return_dict: Return a ``StableDiffusionPipelineOutput`` rather than a tuple.
            editing_prompt: Edit prompt(s); ``None`` (and no embeddings) disables semantic guidance.
            editing_prompt_embeddings: Pre-computed edit embeddings ``(K, L, D)`` instead of prompts.
            reverse_editing_direction: Per edit (or per edit and image, ``(K, batch)``): push away
                from the edit prompt instead of toward it.
            edit_guidance_scale: Scale of each edit direction (one value or one per edit).
            edit_warmup_steps: Steps before each edit is applied; momentum builds meanwhile.
            edit_cooldown_steps: Step from which each edit stops; ``None``: never.
            edit_threshold: Quantile of an edit's magnitude below which it is zeroed (per edit).
            edit_momentum_scale: Weight of the momentum added to the edit guidance.
            edit_mom_beta: Share of the previous momentum kept at each step.
            edit_weights: Relative weight of each edit; ``None``: all 1.
            sem_guidance: Pre-computed guidance per step, added on top.

        Returns:
            ``StableDiffusionPipelineOutput(images, nsfw_content_detected)``, or that as a tuple.
        """
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        self.check_inputs(prompt, height, width, None, negative_prompt)
        batch_size = 1 if isinstance(prompt, str) else len(prompt)
        n_images = batch_size * num_images_per_prompt
        device = self._execution_device
        if sem_guidance is not None and len(sem_guidance) < num_inference_steps:
            raise ValueError(
                f"sem_guidance has {len(sem_guidance)} tensors for {num_inference_steps} inference steps"
            )

        if isinstance(editing_prompt, str):
            editing_prompt = [editing_prompt]
        if editing_prompt:
            edit_states, _ = self.encode_prompt(editing_prompt, device, 1, False)
        elif editing_prompt_embeddings is not None:
            if editing_prompt_embeddings.ndim != 3:
                raise ValueError(
                    "editing_prompt_embeddings must be (K, L, D), got shape "
                    f"{tuple(editing_prompt_embeddings.shape)}"
                )
            edit_states = editing_prompt_embeddings.to(device=device, dtype=self.text_encoder.dtype)
        else:
            edit_states = None
        n_edits = 0 if edit_states is None else edit_states.shape[0]
        guided = guidance_scale > 1.0 or n_edits > 0

        cond, uncond = self.encode_prompt(prompt, device, num_images_per_prompt, guided, negative_prompt)
        edits = None if edit_states is None else edit_states.repeat_interleave(n_images, dim=0)
        guidance = None
        if guided:
            guidance = SemanticGuidance(
                n_edits,
                guidance_scale=guidance_scale,
                reverse=reverse_editing_direction,
                edit_guidance_scale=edit_guidance_scale,
                edit_warmup_steps=edit_warmup_steps,
                edit_cooldown_steps=edit_cooldown_steps,
                edit_threshold=edit_threshold,
                edit_momentum_scale=edit_momentum_scale,
                edit_mom_beta=edit_mom_beta,
                edit_weights=edit_weights,
            )

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        latents = self.prepare_latents(
            n_images, self.unet.config.in_channels, height, width, cond.dtype, device, generator, latents
        )
        latents = _guided_loop(
            self.unet,
            self.scheduler,
            latents,
            cond=cond,
            uncond=uncond if guided else None,
            edits=edits,
            guidance=guidance,
            step_kwargs=self.prepare_extra_step_kwargs(generator, eta),
            sem_guidance=sem_guidance,
            progress=self.progress_bar,
        )

        if output_type == "latent":
            image, has_nsfw = latents, None
        else:
            image = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
            image, has_nsfw = self.run_safety_checker(image, device, cond.dtype)
        denormalize = [True] * image.shape[0] if has_nsfw is None else [not x for x in has_nsfw]
        image = self.image_processor.postprocess(image, output_type=output_type, do_denormalize=denormalize)
        self.maybe_free_model_hooks()
        if not return_dict:
            return image, has_nsfw
        return StableDiffusionPipelineOutput(images=image, nsfw_content_detected=has_nsfw)
