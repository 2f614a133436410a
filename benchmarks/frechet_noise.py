"""How much the benchmark's Fréchet distance moves by chance alone (issue 24's diagnosis).

    python benchmarks/frechet_noise.py                       # real renders and the base model (~10 min idle)
    python benchmarks/frechet_noise.py --offsets '[]'        # real renders only (~1 min)

Every Fréchet figure of the benchmark compares 1280 generated images (128 per digit) with 2000 held-out
real renders (the judges' features). Two sources of chance, measured here with nothing trained:

1. Real against real: random draws of 1280 held-out renders, none of them in the reference (the
   floor a perfect generator would score, and its spread).
2. The base model on other image seeds: "a handwritten digit {d}", digits 0-9, N = 128, 15 DDIM steps,
   guidance 2 (the judge's settings), image seeds ``offset`` to ``offset + 127`` for each offset; the
   committed base row uses offset 0.

Writes benchmarks/results/frechet_noise.{json,md}.
"""

from __future__ import annotations

import numpy as np
import torch

from _common import DATA, JUDGES, write_results
from fairtune.colored_digits import colored_digits_panel, evaluate_backbone_on_digits, load_benchmark_judges
from fairtune.data import load_table
from fairtune.eval import GenerationConfig, frechet_distance
from fairtune.eval._panel import images_from_table


def main(offsets: list[int] | None = None, draws: int = 5, n: int = 1280, threads: int = 2) -> dict:
    """Measure both sources and write the results.

    Args:
        offsets: Image-seed offsets of the base model's runs (``[]``: real renders only).
        draws: Random draws of ``n`` real renders.
        n: Images per draw (the benchmark's 10 digits x 128).
        threads: Torch threads.
    """
    torch.set_num_threads(threads)
    offsets = [0, 128, 256, 384] if offsets is None else offsets
    judges, ref = load_benchmark_judges(JUDGES, DATA)
    panel = colored_digits_panel(judges, reference=ref)
    ref_features = panel.reference_features(progress=False)
    held = load_table(str(DATA / "table"), split="heldout")
    # the reference is load_reference_images' seeded draw of 2000: the rest were never in it
    outside = sorted(np.random.default_rng(0).permutation(len(held))[len(ref) :].tolist())
    with torch.no_grad():
        feats = panel.judge(images_from_table(held.select(outside)), progress=False)["features"]
    real = []
    for k in range(draws):
        pick = np.random.default_rng(100 + k).choice(len(feats), size=min(n, len(feats)), replace=False)
        real.append(frechet_distance(feats[pick], ref_features))
    base = {}
    if offsets:
        from fairtune.models import Backbone, BackboneConfig

        backbone = Backbone.from_config(BackboneConfig(kind="tiny", pretrained="colored-digits-16"))
        for off in offsets:
            gen = GenerationConfig(n_per_prompt=128, steps=15, guidance_scale=2.0, seed=off)
            ev = evaluate_backbone_on_digits(backbone, panel, generation=gen, reference=ref)
            base[str(off)] = float(ev["summary"]["frechet"])
            print(f"base model, image seeds {off}-{off + 127}: Fréchet {base[str(off)]:.1f}", flush=True)

    def stats(xs: list[float]) -> dict:
        return {
            "values": xs,
            "mean": float(np.mean(xs)),
            "sd": float(np.std(xs, ddof=1)) if len(xs) > 1 else None,
        }

    payload = {
        "n": n,
        "reference": len(ref),
        "real_vs_reference": stats(real),
        "base_by_image_seeds": {"offsets": base, **(stats(list(base.values())) if base else {})},
    }
    r = payload["real_vs_reference"]
    lines = [
        "# Fréchet distance by chance alone",
        "",
        f"{n} images against the {len(ref)}-render reference (the judges' features), nothing trained. "
        "Command: `python benchmarks/frechet_noise.py`.",
        "",
        "| what | Fréchet values | mean | sd |",
        "|---|---|---|---|",
        f"| real held-out renders outside the reference, {draws} draws | "
        + ", ".join(f"{v:.1f}" for v in real)
        + f" | {r['mean']:.1f} | {r['sd']:.1f} |",
    ]
    if base:
        b = payload["base_by_image_seeds"]
        lines.append(
            "| base model, image seeds offset … offset + 127 (offsets "
            + ", ".join(base)
            + ") | "
            + ", ".join(f"{v:.1f}" for v in base.values())
            + f" | {b['mean']:.1f} | {b['sd']:.1f} |"
        )
    lines += [
        "",
        "The committed rows (base 50.6, the adapters' Fréchet) each use image seeds 0-127: a difference "
        "between two methods within about two of these standard deviations is not a measured difference.",
    ]
    write_results("frechet_noise", payload, "\n".join(lines) + "\n")
    return payload


if __name__ == "__main__":
    from jsonargparse import auto_cli

    auto_cli(main)
