"""Measure the shipped biased base model (issue 3): per-digit red share, fidelity, skew amplification.

    python benchmarks/base_model.py [--n 128] [--guidance 2.0] [--extra_guidance '[1.0, 4.0]']

Writes benchmarks/results/base_model.{json,md} and a sample grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from _common import DATA_SKEW, RESULTS, ensure_assets, reference_images, save_grid, write_results
from fairtune.colored_digits import evaluate_backbone_on_digits
from fairtune.eval import GenerationConfig
from fairtune.models import Backbone, BackboneConfig


def measure(bb, judges, n, guidance, ref):
    out = evaluate_backbone_on_digits(
        bb, judges, generation=GenerationConfig(n_per_prompt=n, guidance_scale=guidance), reference=ref
    )
    red = [out["per_concept"][f"digit {d}"]["p_hat"][0] for d in range(10)]
    return out, red


@dataclass
class Options:
    """Options of the base-model benchmark.

    Attributes:
        model: Tiny backbone (folder or shipped name).
        n: Images per digit.
        guidance: The judging guidance scale.
        extra_guidance: Other guidance scales to measure too.
    """

    model: str = "colored-digits-16"
    n: int = 128
    guidance: float = 2.0
    extra_guidance: list[float] = field(default_factory=lambda: [1.0, 4.0])


def main() -> None:
    from jsonargparse import CLI

    args = CLI(Options, as_positional=False)
    judges = ensure_assets()
    ref = reference_images()
    bb = Backbone.from_config(BackboneConfig(kind="tiny", pretrained=args.model))
    runs = {}
    for g in [args.guidance, *args.extra_guidance]:
        out, red = measure(bb, judges, args.n, g, ref)
        if g == args.guidance:
            save_grid(out["images"][:: args.n // 8][:80], RESULTS / "base_model_samples.png", per_row=8)
        gen_gap = np.abs(np.array(red) - 0.5)
        data_gap = np.abs(np.array(DATA_SKEW) - 0.5)
        runs[str(g)] = {
            "red_share": red,
            "fidelity_per_digit": [out["per_concept"][f"digit {d}"]["fidelity"] for d in range(10)],
            "fidelity": out["summary"]["fidelity"],
            "frechet": out["summary"]["frechet"],
            "undetermined": out["summary"]["undetermined"],
            "corr_with_data_skew": float(np.corrcoef(red, DATA_SKEW)[0, 1]),
            "mean_abs_red_minus_half_0to7": float(gen_gap[:8].mean()),
            "mean_abs_red_minus_half_all": float(gen_gap.mean()),
            "amplification_mean": float((gen_gap - data_gap).mean()),
            "sec_per_image": out["summary"]["sec_per_image"],
        }
    main_run = runs[str(args.guidance)]
    lines = [
        f"# Base model `{args.model}` (N={args.n} per digit, 25 DDIM steps, hue judge)",
        "",
        "| guidance | "
        + " | ".join(f"d{d}" for d in range(10))
        + " | corr | mean\\|r-.5\\| 0-7 | ampl. | fidelity | FD |",
        "|---|" + "---|" * 10 + "---|---|---|---|---|",
        "| data | "
        + " | ".join(f"{s:.2f}" for s in DATA_SKEW)
        + " | 1 | "
        + f"{np.abs(np.array(DATA_SKEW[:8]) - 0.5).mean():.3f} | 0 | | |",
    ]
    for g, r in runs.items():
        lines.append(
            f"| {g} | "
            + " | ".join(f"{s:.2f}" for s in r["red_share"])
            + f" | {r['corr_with_data_skew']:.3f} | {r['mean_abs_red_minus_half_0to7']:.3f}"
            + f" | {r['amplification_mean']:+.3f} | {r['fidelity']:.3f} | {r['frechet']:.2f} |"
        )
    lines += [
        "",
        f"Judging guidance fixed at {args.guidance}. Goals: fidelity ≥ 0.90 "
        f"({main_run['fidelity']:.3f}), correlation with the data's skew ≥ 0.8 "
        f"({main_run['corr_with_data_skew']:.3f}), mean |red − 0.5| over digits 0–7 ≥ 0.25 "
        f"({main_run['mean_abs_red_minus_half_0to7']:.3f}). Amplification = mean over digits of "
        "|generated red share − 0.5| − |data red share − 0.5|.",
    ]
    write_results(
        "base_model",
        {
            "model": args.model,
            "n": args.n,
            "judge_guidance": args.guidance,
            "data_red_share": DATA_SKEW,
            "by_guidance": runs,
        },
        "\n".join(lines) + "\n",
    )


if __name__ == "__main__":
    main()
