"""Lever 3: the fairness-penalised loss (DESIGN §4.3).

Every k steps the model generates images for neutral prompts of the training concepts through a
short differentiable sampling path, a frozen attribute classifier scores them, and the loss pulls
each concept's attribute distribution toward its target, plus a preservation term that keeps the
output close to the frozen base model (the same UNet with the adapter disabled).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from fairtune.data import read_prompt_pairs
from fairtune.models import ClassifierConfig, load_classifier

from ._preservation import PreservationConfig, PreservationFeatures


@dataclass
class FairnessConfig:
    """The fairness-penalised loss (lever 3).

    Attributes:
        weight: λ after the ramp.
        start_step: No fairness loss before this step (let the adapter settle on the data first).
        ramp_steps: λ then ramps linearly from 0 to ``weight`` over these steps.
        every_k_steps: Compute it every k optimizer steps (its cost is amortised over k).
        concepts: Concepts to generate for; ``None``: the data module's concepts.
        extra_prompts_file: A prompt file (``fairtune flag export``, or any file ``fairtune audit
            --prompts`` reads): each of its (concept, prompt) pairs joins the pool the loss draws from,
            the prompt used as written and the target its concept's. Prompts need no images.
        prompt: Neutral prompt template, ``{concept}`` filled in (the recipe's: ColoredDigits'
            ``"a handwritten {concept}"``, the occupations' ``"a photo of the face of a {concept}, a
            person"``); by default the concept itself.
        concepts_per_step: Concepts drawn per fairness step.
        samples_per_concept: Images per concept per fairness step (align per concept, and with
            enough samples that a concept's mean is not just 0, ½ or 1).
        path: ``ddim``: ``ddim_steps`` differentiable DDIM steps; ``full_chain``: every step of a
            ``full_chain_steps`` chain differentiable (Shen et al.); ``one_step``: no-grad DDIM down
            to ``one_step_t``, then one differentiable x0 estimate.
        ddim_steps: Steps of the short path.
        full_chain_steps: Steps of the full chain.
        one_step_t: Timestep of the one-step x0 estimate.
        detach_inputs: Feed the UNet each step's input detached (Shen et al.'s adjusted direct
            fine-tuning): no gradient through the UNet's Jacobian, while the linear DDIM update keeps
            every step's output on the loss's gradient path.
        gradient_checkpointing: Recompute UNet activations in the backward pass (memory for time).
        guidance_scale: Classifier-free guidance of the generated batch (as at judging).
        alignment: ``ot``: optimal-transport assignment of each concept's samples to target classes
            and cross-entropy to them (Shen et al., ICLR 2024); ``kl``: KL from the concept's mean
            prediction to the target.
        ot_threshold: ``ot`` only: a sample already in its assigned class with this confidence adds
            no loss.
        preservation_weight: Weight of the distance between features of the output and of the
            adapter-disabled output from the same noise and prompt; it ramps with λ.
        preservation: The feature space of that term (``latent``, ``pixels``, ``clip`` or any module;
            ColoredDigits' configs set its ink map, stroke without colour).
        classifier: The frozen classifier, set by the recipe (module, init args, weights; a module
            that loads its own weights, such as ``fairtune.models.CLIPZeroShotClassifier``, needs none).
    """

    weight: float = 0.5
    start_step: int = 100
    ramp_steps: int = 200
    every_k_steps: int = 4
    concepts: list[str] | None = None
    extra_prompts_file: str | None = None
    prompt: str = "{concept}"
    extra_templates: list[str] = field(default_factory=list)
    concepts_per_step: int = 4
    samples_per_concept: int = 16
    path: Literal["ddim", "full_chain", "one_step"] = "ddim"
    ddim_steps: int = 4
    full_chain_steps: int = 25
    one_step_t: int = 500
    detach_inputs: bool = True
    gradient_checkpointing: bool = False
    guidance_scale: float = 2.0
    alignment: Literal["ot", "kl"] = "ot"
    ot_threshold: float = 0.8
    preservation_weight: float = 1.0
    preservation: PreservationConfig = field(default_factory=PreservationConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)

    def lam(self, step: int) -> float:
        if step < self.start_step:
            return 0.0
        if self.ramp_steps <= 0:
            return self.weight
        return self.weight * min(1.0, (step - self.start_step + 1) / self.ramp_steps)

    def active(self, step: int) -> bool:
        return step >= self.start_step and step % self.every_k_steps == 0


def ot_assignment(probs: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Assign each sample to a target class so class counts follow ``target`` (largest-remainder
    rounding) and the total −log-probability is minimal (an exact OT / assignment problem).

    Args:
        probs: ``(n, K)`` predicted class probabilities.
        target: ``(K,)`` target proportions.

    Returns:
        ``(n,)`` assigned class per sample.
    """
    from scipy.optimize import linear_sum_assignment

    n, k = probs.shape
    exact = np.asarray(target, dtype=np.float64) * n
    counts = np.floor(exact).astype(int)
    counts[np.argsort(-(exact - counts))[: n - counts.sum()]] += 1
    slots = np.repeat(np.arange(k), counts)  # n class slots
    cost = -np.log(np.clip(probs, 1e-8, 1.0))[:, slots]
    rows, cols = linear_sum_assignment(cost)
    out = np.empty(n, dtype=np.int64)
    out[rows] = slots[cols]
    return out


def alignment_loss(
    probs: torch.Tensor,
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    method: Literal["ot", "kl"],
    threshold: float = 0.8,
) -> torch.Tensor:
    """Distributional alignment of one concept's samples to its target mix."""
    if method == "kl":
        mean = probs.mean(0).clamp_min(1e-8)
        return (mean * (mean.log() - target.clamp_min(1e-8).log())).sum()
    assigned = torch.from_numpy(ot_assignment(probs.detach().cpu().numpy(), target.cpu().numpy())).to(
        probs.device
    )
    conf = probs.gather(1, assigned[:, None])[:, 0]
    settled = (probs.argmax(1) == assigned) & (conf >= threshold)
    ce = F.cross_entropy(logits, assigned, reduction="none")
    return (ce * (~settled)).sum() / len(ce)


def _ddim_step(sched, out: torch.Tensor, t: int, t_prev: int, x: torch.Tensor):
    """One deterministic DDIM step (eta 0), written out so it stays differentiable: (x_prev, x0).

    ``out`` is the UNet's (guided) prediction: noise, or velocity for a v-prediction model. As in
    diffusers' ``DDIMScheduler.step`` (defaults): with ``clip_sample`` the x0 estimate is clipped (the
    noise estimate is kept), and ``t_prev < 0`` means the final step (alpha 1).
    """
    ac = sched.alphas_cumprod.to(x.device)
    a_t = ac[t]
    a_prev = ac[t_prev] if t_prev >= 0 else torch.tensor(1.0, device=x.device)
    kind = sched.config.prediction_type
    if kind == "v_prediction":
        x0 = a_t.sqrt() * x - (1 - a_t).sqrt() * out
        eps = a_t.sqrt() * out + (1 - a_t).sqrt() * x
    elif kind == "epsilon":
        eps = out
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    else:
        raise ValueError(f"the fairness path supports epsilon and v_prediction, not {kind!r}")
    if getattr(sched.config, "clip_sample", False):
        r = sched.config.clip_sample_range
        x0 = x0.clamp(-r, r)
    return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps, x0


def sampling_timesteps(sched, n_steps: int) -> list[int]:
    """The timesteps diffusers' DDIM sampler visits in ``n_steps`` steps (same spacing as judging)."""
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler.from_config(sched.config)
    ddim.set_timesteps(n_steps)
    return [int(t) for t in ddim.timesteps]


class FairnessLoss(nn.Module):
    """Computes lever 3's loss terms for a step, given the backbone (whose UNet carries the LoRA)."""

    def __init__(self, cfg: FairnessConfig) -> None:
        super().__init__()
        self.cfg = cfg
        for i, t in enumerate([cfg.prompt, *cfg.extra_templates]):
            if "{concept}" not in t:
                key = "prompt" if i == 0 else f"extra_templates[{i - 1}]"
                raise ValueError(f"model.fairness.{key}={t!r} has no {{concept}} field")
        self.classifier = load_classifier(cfg.classifier, what="model.fairness.classifier")
        self.preservation = PreservationFeatures(cfg.preservation) if cfg.preservation_weight > 0 else None
        self.extra: list[tuple[str, str]] = (
            read_prompt_pairs(cfg.extra_prompts_file) if cfg.extra_prompts_file else []
        )

    def pool(self) -> list[tuple[str, str]]:
        """(concept, prompt) pairs a step draws from: the concepts' neutral prompts in every template,
        then the extras."""
        templates = [self.cfg.prompt, *self.cfg.extra_templates]
        return [(c, t.format(concept=c)) for t in templates for c in self.cfg.concepts or []] + self.extra

    def _eps(self, unet, x, t, ctx, guidance):
        inp = torch.cat([x, x])
        tt = torch.full((inp.shape[0],), int(t), device=x.device, dtype=torch.long)

        def call(inp, tt, ctx):
            return unet(inp, tt, encoder_hidden_states=ctx).sample

        if self.cfg.gradient_checkpointing and torch.is_grad_enabled():
            out = checkpoint(call, inp, tt, ctx, use_reentrant=False)
        else:
            out = call(inp, tt, ctx)
        e_u, e_c = out.chunk(2)
        return e_u + guidance * (e_c - e_u)

    def generate(self, backbone, prompts: list[str], noise: torch.Tensor) -> torch.Tensor:
        """x0 estimates (UNet space) through the configured differentiable path."""
        cfg = self.cfg
        sched = backbone.noise_scheduler
        ctx = torch.cat([backbone.encode_prompts([""] * len(prompts)), backbone.encode_prompts(prompts)])
        unet = backbone.unet
        n_steps = cfg.full_chain_steps if cfg.path == "full_chain" else cfg.ddim_steps
        # The sampler's own timesteps: starting at t=999 instead (alpha_bar ~ 1e-9 on a cosine
        # schedule) blows the x0 estimate up by ~1e4 and the clamped images carry no gradient.
        ts = sampling_timesteps(sched, n_steps)
        prev = ts[1:] + [-1]
        x = noise
        if cfg.path == "one_step":
            with torch.no_grad():
                for t, t_prev in zip(ts, prev):
                    if t <= cfg.one_step_t:
                        break
                    eps = self._eps(unet, x, t, ctx, cfg.guidance_scale)
                    x, _ = _ddim_step(sched, eps, t, max(t_prev, cfg.one_step_t), x)
            eps = self._eps(unet, x, cfg.one_step_t, ctx, cfg.guidance_scale)
            _, x0 = _ddim_step(sched, eps, cfg.one_step_t, -1, x)
            return x0
        x0 = x
        for t, t_prev in zip(ts, prev):
            # Adjusted direct fine-tuning (Shen et al.): the UNet reads a detached input, so no
            # gradient flows through its Jacobian, but the DDIM update stays linear in x, so the
            # loss still reaches every step's output, including the high-noise steps where the
            # attribute is decided. (Detaching x itself would leave only the last step trained.)
            inp = x.detach() if cfg.detach_inputs else x
            eps = self._eps(unet, inp, t, ctx, cfg.guidance_scale)
            x, x0 = _ddim_step(sched, eps, t, t_prev, x)
        return x0

    def forward(
        self,
        backbone,
        concepts: list[str],
        targets: torch.Tensor,
        generator: torch.Generator,
        prompts: list[str] | None = None,
    ) -> dict:
        """Loss terms for ``concepts`` (each with ``samples_per_concept`` images) and their targets
        ``(len(concepts), K)``; ``prompts``: one per concept (default: the neutral template)."""
        cfg = self.cfg
        m = cfg.samples_per_concept
        if prompts is None:
            prompts = [cfg.prompt.format(concept=c) for c in concepts]
        prompts = [p for p in prompts for _ in range(m)]
        shape = (len(prompts), backbone.latent_channels, backbone.latent_size, backbone.latent_size)
        device = next(backbone.unet.parameters()).device
        noise = torch.randn(shape, generator=generator).to(device)
        x0 = self.generate(backbone, prompts, noise)
        x_in = backbone.to_pixels(x0) if cfg.classifier.input == "pixels" else x0
        logits = self.classifier(x_in) / cfg.classifier.temperature
        probs = logits.softmax(-1)
        align = torch.stack(
            [
                alignment_loss(
                    probs[i * m : (i + 1) * m],
                    logits[i * m : (i + 1) * m],
                    targets[i].to(device),
                    method=cfg.alignment,
                    threshold=cfg.ot_threshold,
                )
                for i in range(len(concepts))
            ]
        ).mean()
        preserve = x0.sum() * 0.0
        if self.preservation is not None:
            with torch.no_grad(), _adapters_disabled(backbone.unet):
                ref = self.generate(backbone, prompts, noise)
            # Compared in the recipe's feature space (e.g. CLIP embeddings for photos; ColoredDigits'
            # ink map, where shape, placement and contrast are kept and the ink's colour is free).
            with torch.no_grad():
                ref_feats = self.preservation(ref, backbone)
            preserve = self.preservation.loss(self.preservation(x0, backbone), ref_feats)
        share = probs.detach().view(len(concepts), m, -1).mean(1)
        return {"align": align, "preserve": preserve, "share": share}


class _adapters_disabled:
    """Run the UNet as the frozen base model (peft adapters off), without a second copy."""

    def __init__(self, unet) -> None:
        self.unet = unet
        self.has = bool(getattr(unet, "_hf_peft_config_loaded", False))

    def __enter__(self):
        if self.has:
            self.unet.disable_adapters()

    def __exit__(self, *exc):
        if self.has:
            self.unet.enable_adapters()
