"""Per-image inference cost of each method (DESIGN §5): base, LoRA adapter (unfused and fused), prompt
augmentation and Fair Diffusion, on the shipped tiny backbone and on a tiny Stable Diffusion.

    python benchmarks/inference_cost.py [--n 32] [--steps 25] [--repeats 2] [--batch_size 64] [--threads 1]

UNet evaluations are counted by a forward hook on the UNet (images through it, divided by images
generated) and checked against ``unet_evals_per_image``; seconds per image are the minimum over
``--repeats`` timed runs (methods interleaved within each repeat), all at the same batch size.
Writes benchmarks/results/inference_cost.{json,md}.
"""

from __future__ import annotations

import copy
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from _common import write_results
from fairtune.colored_digits import neutral_prompt
from fairtune.models import (
    Backbone,
    BackboneConfig,
    FairDiffusionConfig,
    LoraConfig,
    PromptAugmentationConfig,
    attach_lora,
    augment_prompts,
    fair_diffusion_sample,
    load_adapter,
    make_tiny_stable_diffusion,
    save_lora,
    unet_evals_per_image,
)

METHODS = [
    "base",
    "adapter (LoRA, unfused)",
    "adapter (LoRA, fused)",
    "prompt augmentation",
    "Fair Diffusion",
]
FORMULA = {
    "base": "base",
    "adapter (LoRA, unfused)": "adapter",
    "adapter (LoRA, fused)": "adapter",
    "prompt augmentation": "prompt_augmentation",
    "Fair Diffusion": "fair_diffusion",
}


class UNetCounter:
    """Counts images passed through a UNet (the batch size of every forward call)."""

    def __init__(self, unet) -> None:
        self.images = 0
        self.calls = 0
        self._handle = unet.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs) -> None:
        sample = args[0] if args else kwargs["sample"]
        self.images += int(sample.shape[0])
        self.calls += 1

    def remove(self) -> None:
        self._handle.remove()


def with_unet(bb: Backbone, unet) -> Backbone:
    """A backbone sharing ``bb``'s text encoder, tokenizer, scheduler and VAE, with its own UNet."""
    return Backbone(bb.config, unet, bb.text_encoder, bb.tokenizer, bb.noise_scheduler, vae=bb.vae)


def adapter_backbones(bb: Backbone, workdir: Path, seed: int = 0) -> tuple[Backbone, Backbone]:
    """The same random-but-nonzero LoRA adapter (the default target modules, rank 8), saved in
    diffusers' format and loaded back through ``load_adapter`` unfused and fused."""
    trained = copy.deepcopy(bb.unet)
    attach_lora(trained, LoraConfig())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    save_lora(trained, workdir / "adapter")
    unfused = load_adapter(with_unet(bb, copy.deepcopy(bb.unet)), workdir / "adapter")
    fused = load_adapter(with_unet(bb, copy.deepcopy(bb.unet)), workdir / "adapter", fuse=True)
    return unfused, fused


def measure_backbone(name: str, bb: Backbone, workdir: Path, args, *, prompts, classes) -> dict:
    """Count and time every method on one backbone."""
    unfused, fused = adapter_backbones(bb, workdir)
    seeds = list(range(len(prompts)))
    target = {c: 1 / len(classes) for c in classes}
    fd_cfg = FairDiffusionConfig(edit_prompts=classes, assignment="stratified")
    pa_cfg = PromptAugmentationConfig(words={c: c for c in classes}, assignment="stratified")
    kw = dict(steps=args.steps, guidance_scale=args.guidance, batch_size=args.batch_size)

    def run(method: str):
        if method == "base":
            return bb.sample(prompts, seeds=seeds, **kw), bb
        if method == "adapter (LoRA, unfused)":
            return unfused.sample(prompts, seeds=seeds, **kw), unfused
        if method == "adapter (LoRA, fused)":
            return fused.sample(prompts, seeds=seeds, **kw), fused
        if method == "prompt augmentation":
            augmented, _ = augment_prompts(prompts, config=pa_cfg, target=target)
            return bb.sample(augmented, seeds=seeds, **kw), bb
        images, _ = fair_diffusion_sample(bb, prompts, seeds=seeds, config=fd_cfg, target=target, **kw)
        return images, bb

    rows: dict[str, dict] = {m: {"seconds": []} for m in METHODS}
    images: dict[str, torch.Tensor] = {}
    for rep in range(args.repeats):
        for m in METHODS:
            backbone = {"adapter (LoRA, unfused)": unfused, "adapter (LoRA, fused)": fused}.get(m, bb)
            counter = UNetCounter(backbone.unet)
            t0 = time.perf_counter()
            try:
                out, _ = run(m)
            finally:
                counter.remove()
            rows[m]["seconds"].append(time.perf_counter() - t0)
            rows[m]["unet_evals_per_image"] = counter.images / len(prompts)
            rows[m]["unet_calls"] = counter.calls
            if rep == 0:
                images[m] = out
    n_edits = len(classes)
    base_s = min(rows["base"]["seconds"]) / len(prompts)
    base_e = rows["base"]["unet_evals_per_image"]
    for m, r in rows.items():
        formula = unet_evals_per_image(FORMULA[m], steps=args.steps, n_edits=n_edits)
        if r["unet_evals_per_image"] != formula:
            raise RuntimeError(
                f"{name}/{m}: counted {r['unet_evals_per_image']} UNet evaluations per image, "
                f"formula says {formula}"
            )
        r["formula_evals_per_image"] = formula
        r["sec_per_image"] = min(r["seconds"]) / len(prompts)
        r["evals_vs_base"] = r["unet_evals_per_image"] / base_e
        r["time_vs_base"] = r["sec_per_image"] / base_s
    fuse_gap = (images["adapter (LoRA, fused)"] - images["adapter (LoRA, unfused)"]).abs().max().item()
    adapter_effect = (images["adapter (LoRA, unfused)"] - images["base"]).abs().max().item()
    return {
        "backbone": name,
        "image_size": bb.image_size,
        "unet_parameters": sum(p.numel() for p in bb.unet.parameters()),
        "classes": classes,
        "prompts": sorted(set(prompts)),
        "methods": rows,
        "fused_vs_unfused_max_abs_diff": fuse_gap,
        "adapter_vs_base_max_abs_diff": adapter_effect,
    }


@dataclass
class Options:
    """Options of the inference-cost benchmark.

    Attributes:
        model: Tiny backbone (folder or shipped name).
        n: Images per method and repeat.
        steps: DDIM steps.
        guidance: Classifier-free guidance scale.
        batch_size: Images per UNet batch.
        repeats: Timed repeats (the minimum is reported).
        threads: torch threads (2 on 2 busy shared cores ran 7-10x slower).
    """

    model: str = "colored-digits-16"
    n: int = 32
    steps: int = 25
    guidance: float = 2.0
    batch_size: int = 64
    repeats: int = 2
    threads: int = 1


def main() -> None:
    from jsonargparse import CLI

    args = CLI(Options, as_positional=False)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="inference-cost-") as tmp:
        tmp = Path(tmp)
        tiny = Backbone.from_config(BackboneConfig(kind="tiny", pretrained=args.model))
        results.append(
            measure_backbone(
                f"tiny `{args.model}`",
                tiny,
                tmp / "tiny",
                args,
                prompts=[neutral_prompt(i % 10) for i in range(args.n)],
                classes={"red": "red", "blue": "blue"},
            )
        )
        sd = Backbone.from_config(
            BackboneConfig(kind="sd", pretrained=str(make_tiny_stable_diffusion(tmp / "sd-model")))
        )
        results.append(
            measure_backbone(
                "tiny Stable Diffusion",
                sd,
                tmp / "sd",
                args,
                prompts=[f"a photo of a {o}" for o in ("doctor", "nurse", "firefighter", "teacher")]
                * (args.n // 4)
                + ["a photo of a doctor"] * (args.n % 4),
                classes={"female": "female person", "male": "male person"},
            )
        )
    total = time.perf_counter() - t_start

    lines = [
        f"# Inference cost per image (N={args.n}, {args.steps} DDIM steps, guidance {args.guidance}, "
        f"batch {args.batch_size}, min of {args.repeats} runs, {args.threads} CPU threads)",
        "",
        "| backbone | method | UNet evals / image | × base | s / image | × base |",
        "|---|---|---|---|---|---|",
    ]
    for res in results:
        for m, r in res["methods"].items():
            lines.append(
                f"| {res['backbone']} | {m} | {r['unet_evals_per_image']:.0f} | {r['evals_vs_base']:.2f} "
                f"| {r['sec_per_image'] * 1000:.1f} ms | {r['time_vs_base']:.2f} |"
            )
    lines += [
        "",
        "UNet evaluations: images through the UNet (forward hook), per generated image; they equal "
        "`unet_evals_per_image` (base, adapter, prompt augmentation 2 × steps; Fair Diffusion with "
        "K = 2 edit prompts (2 + K) × steps). The adapter is a random rank-8 LoRA on the default "
        "target modules, saved in diffusers' format and loaded with `load_adapter` (fused: "
        "`fuse_lora`); fused and unfused images differ by at most "
        + ", ".join(f"{r['fused_vs_unfused_max_abs_diff']:.1e} ({r['backbone']})" for r in results)
        + ". Fair Diffusion edit prompts: red/blue (tiny), female person/male person (SD); "
        "the tiny SD has a 16×16 image (8×8 latent). Wall times on a shared 2-core machine with one "
        "torch thread (two threads on the two busy cores ran 7-10× slower and erratically); "
        f"whole run {total:.0f} s.",
    ]
    payload = {
        "n": args.n,
        "steps": args.steps,
        "guidance_scale": args.guidance,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "threads": args.threads,
        "total_seconds": total,
        "results": results,
    }
    write_results("inference_cost", payload, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
