"""Lever 1, data-free form: the base model's own attribute-explicit generations, distilled into the
adapter for the neutral prompt.

The base model already draws each class on request ("a red handwritten digit 7"), even where its
neutral prompt almost never does. So, per concept and class, it generates a bank of images once
(adapter off, fixed seeds); every step then noises bank images drawn in the *target* mix and trains
the adapter's neutral-prompt prediction to equal the base model's prediction for the explicit
prompt of the image's class, on the same noisy input:

    || eps_adapter(x_t, t, "a handwritten digit 7") - eps_base(x_t, t, "a <class> handwritten digit 7") ||²

The minimiser is E[eps_base(x_t, t, class) | x_t] with the class drawn from the target: the score of
the base model's class-conditional distributions mixed in the target proportions, i.e. prompt
augmentation folded into the weights (one prompt, the base model's cost per image). It needs only
prompts, so it reaches concepts without training images; the explicit and empty prompts are held at
the base model's prediction on the same inputs, so "a blue ..." keeps meaning blue.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ._fairness import _adapters_disabled

log = logging.getLogger(__name__)


@dataclass
class DistillConfig:
    """Distilling the base model's class-explicit generations into the neutral prompt.

    Attributes:
        weight: Weight of the distillation loss (added to the diffusion loss on the data).
        concepts: Concepts to distil; ``None``: the data module's concepts. Concepts without any
            training image work too (the bank is generated).
        prompt: Neutral template, ``{concept}`` filled in (ColoredDigits: ``"a handwritten
            {concept}"``).
        extra_templates: More neutral wordings, each trained to the same target (wordings never
            trained are the paraphrase test; do not list those).
        explicit: Class-explicit template with ``{cls}`` and ``{concept}`` (``"a {cls} handwritten
            {concept}"``).
        words: Class name to the word written for it (default: the class name); a joint group
            ``"red+dark"`` is written word by word, space-separated.
        images_per_class: Bank images the base model generates per (concept, group).
        sampling_steps: DDIM steps of the bank's generations.
        guidance_scale: Classifier-free guidance of the bank's generations.
        batch_size: Distillation examples per step.
        timesteps: Training timesteps drawn uniformly from ``[lo, hi)``.
        hold_explicit: Also hold the adapter's explicit-prompt prediction at the base model's.
        hold_uncond: Also hold the adapter's empty-prompt prediction (classifier-free guidance's
            other half) at the base model's.
    """

    weight: float = 1.0
    concepts: list[str] | None = None
    prompt: str = "{concept}"
    extra_templates: list[str] = field(default_factory=list)
    explicit: str = "{cls} {concept}"
    words: dict[str, str] = field(default_factory=dict)
    images_per_class: int = 64
    sampling_steps: int = 15
    guidance_scale: float = 2.0
    batch_size: int = 32
    timesteps: tuple[int, int] = (0, 1000)
    hold_explicit: bool = True
    hold_uncond: bool = True

    def validate(self) -> None:
        for i, t in enumerate([self.prompt, *self.extra_templates]):
            if "{concept}" not in t:
                key = "prompt" if i == 0 else f"extra_templates[{i - 1}]"
                raise ValueError(f"model.distill.{key}={t!r} has no {{concept}} field")
        if "{concept}" not in self.explicit or "{cls}" not in self.explicit:
            raise ValueError(f"model.distill.explicit={self.explicit!r} needs {{cls}} and {{concept}} fields")
        if self.weight < 0:
            raise ValueError(f"model.distill.weight must be >= 0, got {self.weight}")
        for key in ("images_per_class", "sampling_steps", "batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"model.distill.{key} must be >= 1, got {getattr(self, key)}")
        lo, hi = self.timesteps
        if not 0 <= lo < hi:
            raise ValueError(
                f"model.distill.timesteps must be [lo, hi) with 0 <= lo < hi, got {self.timesteps}"
            )

    def group_words(self, group: str, sep: str = "+") -> str:
        return " ".join(self.words.get(c, c) for c in group.split(sep))


class DistillLoss:
    """The bank of base-model generations and the per-step distillation loss."""

    def __init__(self, cfg: DistillConfig, seed: int = 0) -> None:
        cfg.validate()
        self.cfg = cfg
        self.seed = seed
        self.bank: torch.Tensor | None = None  # (concepts, groups, n, C, h, w) in UNet space

    @torch.no_grad()
    def build_bank(self, backbone, groups: list[str]) -> None:
        """Generate ``images_per_class`` base-model images per (concept, group), adapter off, from seeds
        that depend on the training seed alone (a resumed run rebuilds the same bank)."""
        cfg = self.cfg
        n = cfg.images_per_class
        prompts, seeds = [], []
        for ci, concept in enumerate(cfg.concepts):
            for gi, group in enumerate(groups):
                text = cfg.explicit.format(cls=cfg.group_words(group), concept=concept)
                prompts += [text] * n
                base = ((self.seed * 1009 + ci) * 97 + gi) * 100_000
                seeds += [base + i for i in range(n)]
        log.info(
            "distill: generating %d base-model images (%d concepts x %d groups)",
            len(prompts),
            len(cfg.concepts),
            len(groups),
        )
        with _adapters_disabled(backbone.unet):
            images = backbone.sample(
                prompts, seeds=seeds, steps=cfg.sampling_steps, guidance_scale=cfg.guidance_scale
            )
        device = next(backbone.unet.parameters()).device
        lat = backbone.to_latents(images.to(device) * 2 - 1)
        self.bank = lat.view(len(cfg.concepts), len(groups), n, *lat.shape[1:])

    def draw(self, target, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``n`` (concept, group, bank image) indices: concepts uniform, groups in the concept's target
        mix, images uniform."""
        n_c = len(self.cfg.concepts)
        n_i = self.cfg.images_per_class
        ci = torch.randint(0, n_c, (n,), generator=g)
        probs = torch.tensor([target.proportions(self.cfg.concepts[i]) for i in ci.tolist()])
        gi = torch.multinomial(probs, 1, generator=g)[:, 0]
        ii = torch.randint(0, n_i, (n,), generator=g)
        return ci, gi, ii

    def __call__(self, backbone, target, g: torch.Generator) -> dict:
        """The step's loss: the neutral prompt toward the base model's explicit prediction, with
        classes drawn in the target mix; the explicit and empty prompts held at the base's."""
        cfg = self.cfg
        if self.bank is None:
            self.build_bank(backbone, target.groups)
        b = cfg.batch_size
        device = self.bank.device
        ci, gi, ii = self.draw(target, b, g)
        x0 = self.bank[ci.to(device), gi.to(device), ii.to(device)]
        noise = torch.randn(x0.shape, generator=g).to(x0)
        lo, hi = cfg.timesteps
        hi = min(hi, backbone.noise_scheduler.config.num_train_timesteps)
        t = torch.randint(lo, hi, (b,), generator=g).to(device)
        x_t = backbone.noise_scheduler.add_noise(x0, noise, t)
        templates = [cfg.prompt, *cfg.extra_templates]
        ti = torch.randint(0, len(templates), (b,), generator=g).tolist()
        concepts = [cfg.concepts[i] for i in ci.tolist()]
        neutral = [templates[k].format(concept=c) for k, c in zip(ti, concepts)]
        explicit = [
            cfg.explicit.format(cls=cfg.group_words(target.groups[k]), concept=c)
            for k, c in zip(gi.tolist(), concepts)
        ]
        # The teacher: the same UNet with the adapter off, on the explicit (and empty) prompts.
        teacher_prompts = explicit + ([""] * b if cfg.hold_uncond else [])
        reps = len(teacher_prompts) // b
        with torch.no_grad(), _adapters_disabled(backbone.unet):
            ctx_t = backbone.encode_prompts(teacher_prompts)
            teacher = backbone.unet(
                x_t.repeat(reps, 1, 1, 1), t.repeat(reps), encoder_hidden_states=ctx_t
            ).sample
        t_explicit = teacher[:b]
        student_prompts = (
            neutral + (explicit if cfg.hold_explicit else []) + ([""] * b if cfg.hold_uncond else [])
        )
        reps = len(student_prompts) // b
        ctx_s = backbone.encode_prompts(student_prompts)
        student = backbone.unet(x_t.repeat(reps, 1, 1, 1), t.repeat(reps), encoder_hidden_states=ctx_s).sample
        targets = [t_explicit]
        if cfg.hold_explicit:
            targets.append(t_explicit)
        if cfg.hold_uncond:
            targets.append(teacher[b:])
        target_all = torch.cat(targets)
        per_row = F.mse_loss(student.float(), target_all.float(), reduction="none").mean(dim=(1, 2, 3))
        distill = per_row[:b].mean()
        hold = per_row[b:].mean() if reps > 1 else distill * 0.0
        return {"distill": distill, "hold": hold, "loss": cfg.weight * (per_row.mean())}
