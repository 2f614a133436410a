"""Generate images per prompt from fixed seeds, judge them, and summarise per concept (DESIGN §6).

Every method is judged on the same prompts and the same seeds: image ``i`` of every prompt starts
from the noise of seed ``seed + i``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ._judges import Judges
from ._metrics import concept_metrics, fidelity, frechet_distance


@dataclass
class GenerationConfig:
    """How images are generated for judging.

    Attributes:
        n_per_prompt: Images per prompt (N ≥ 256 for a ±0.03 interval on a share; ≥ 128 at least).
        steps: DDIM steps.
        guidance_scale: Classifier-free guidance; judge at ≤ 2 (higher scales shift the palette).
        seed: Image ``i`` of each prompt starts from the noise of seed ``seed + i``.
        batch_size: Images per UNet batch (large batches are much cheaper per image on a CPU).
    """

    n_per_prompt: int = 128
    steps: int = 25
    guidance_scale: float = 2.0
    seed: int = 0
    batch_size: int = 512


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


def judge_digit_images(
    images: torch.Tensor,
    *,
    digits: Sequence[int],
    n_per_prompt: int,
    judges: Judges,
    target: Sequence[float] | dict[str, Sequence[float]],
    color_judge: str = "hue",
    reference: torch.Tensor | None = None,
    seen: Sequence[int] = tuple(range(8)),
    n_boot: int = 1000,
) -> dict:
    """Per-digit colour metrics, fidelity and (optionally) the Fréchet distance to real images.

    Args:
        images: ``len(digits) * n_per_prompt`` images in digit-major order.
        digits: The digit of each block of images.
        n_per_prompt: Images per digit.
        judges: The ColoredDigits-Bias judges.
        target: The colour target, one vector or per concept (``"digit 3"``).
        color_judge: ``hue`` or ``cnn``.
        reference: Held-out real images for the Fréchet distance.
        seen: Digits trained on; the rest count as held-out concepts.
    """
    colors = judges.color(images, judge=color_judge).numpy()
    pred_digit = judges.digit(images).numpy()
    per_concept = {}
    for b, d in enumerate(digits):
        sl = slice(b * n_per_prompt, (b + 1) * n_per_prompt)
        concept = f"digit {d}"
        q = target[concept] if isinstance(target, dict) else target
        r = concept_metrics(colors[sl], target=q, concept=concept, n_boot=n_boot, seed=b).to_dict()
        r["fidelity"] = fidelity(pred_digit[sl], expected=np.full(n_per_prompt, d))
        per_concept[concept] = r
    seen_c = [f"digit {d}" for d in digits if d in seen]
    held_c = [f"digit {d}" for d in digits if d not in seen]

    def mean(keys, field):
        vals = [per_concept[k][field] for k in keys if not math.isnan(per_concept[k][field])]
        return float(np.mean(vals)) if vals else math.nan

    summary = {
        "mean_dev_seen": mean(seen_c, "dev"),
        "worst_dev_seen": max((per_concept[k]["dev"] for k in seen_c), default=math.nan),
        "mean_dev_heldout": mean(held_c, "dev"),
        "worst_dev_heldout": max((per_concept[k]["dev"] for k in held_c), default=math.nan),
        "fidelity": float(np.mean([per_concept[k]["fidelity"] for k in per_concept])),
        "undetermined": int(sum(per_concept[k]["undetermined"] for k in per_concept)),
    }
    # Interval of the mean deviation over seen concepts: mean of per-concept bootstrap bounds is
    # conservative; report the half-width so the N-per-prompt choice can be checked against ±0.03.
    if seen_c:
        lo = np.mean([per_concept[k]["dev_ci"][0] for k in seen_c])
        hi = np.mean([per_concept[k]["dev_ci"][1] for k in seen_c])
        summary["mean_dev_seen_ci"] = [float(lo), float(hi)]
    if reference is not None:
        summary["frechet"] = frechet_distance(
            judges.features(images).numpy(), judges.features(reference).numpy()
        )
    return {"per_concept": per_concept, "summary": summary}


def evaluate_backbone_on_digits(
    backbone,
    judges: Judges,
    *,
    digits: Sequence[int] = tuple(range(10)),
    seen: Sequence[int] = tuple(range(8)),
    target: Sequence[float] | dict[str, Sequence[float]] = (0.5, 0.5),
    generation: GenerationConfig | None = None,
    reference: torch.Tensor | None = None,
    prompt: str = "a handwritten digit {d}",
    color_judge: str = "hue",
) -> dict:
    """Generate ``n_per_prompt`` images per digit from a neutral prompt and judge them."""
    gen = generation or GenerationConfig()
    prompts = [prompt.format(d=d) for d in digits]
    images, seconds = generate(backbone.sample, prompts, gen)
    out = judge_digit_images(
        images,
        digits=digits,
        n_per_prompt=gen.n_per_prompt,
        judges=judges,
        target=target,
        color_judge=color_judge,
        reference=reference,
        seen=seen,
    )
    out["summary"]["sec_per_image"] = seconds / len(images)
    out["generation"] = asdict(gen)
    out["images"] = images
    return out
