"""Issue 24's diagnosis of the class-adapter pair's residual: how often each adapter turns its own ink
where it never trained, against the scale it is fused at.

The pair draws half the images of every prompt from each adapter, so its red share is
``(r_red + (1 - b_blue)) / 2`` (``r_red``: the red adapter's red share, ``b_blue``: the blue adapter's
blue share) and its deviation from 50/50 is half the difference of the two adapters' misses. Per
adapter and scale, this measures the share of its own ink on the benchmark's wording never trained
("a drawing of the number {d}", digits 1, 3, 5, 7) and on the never-named digit 9, judged by hue, and
the pair's deviation those shares imply. Seeds 0 to N-1 of every prompt, for both adapters (the pair
itself gives each image to one adapter only). The judge is the benchmark panel's hue judge
(``HueJudge.for_colors``); an image it cannot place counts as a miss of the adapter's own ink.

    python benchmarks/pair_scale.py --spec benchmarks/specs/class_adapters_datafree_wordings.yaml --seed 3
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from mix_dial import adapters_of

from _common import ROOT, cell, ensure_assets, write_results
from fairtune.colored_digits import HueJudge
from fairtune.models import Backbone, BackboneConfig, adapter_copy


@dataclass
class Options:
    """Options of the scale probe.

    Attributes:
        spec: The sweep spec that trained the pair (one arm per ink, named after it).
        seed: Which training seed's adapters (runs/bench/runs/<hash>).
        scales: Scales each adapter is fused at.
        paraphrase: The wording never trained, ``{d}`` the digit.
        paraphrase_digits: Digits prompted with it.
        unnamed: Digits never named in training, prompted with ``neutral``.
        neutral: The neutral wording.
        n_per_prompt: Images per prompt and adapter (seeds 0 to N-1).
        steps: DDIM steps.
        guidance_scale: Classifier-free guidance.
        name: Result file name.
        threads: Torch threads.
        runs_dir: The sweep folder the spec's runs trained into.
    """

    spec: Path = ROOT / "benchmarks" / "specs" / "class_adapters_datafree_wordings.yaml"
    seed: int = 3
    scales: list[float] = field(default_factory=lambda: [1.0, 1.25, 1.5, 2.0])
    paraphrase: str = "a drawing of the number {d}"
    paraphrase_digits: list[int] = field(default_factory=lambda: [1, 3, 5, 7])
    unnamed: list[int] = field(default_factory=lambda: [9])
    neutral: str = "a handwritten digit {d}"
    n_per_prompt: int = 64
    steps: int = 15
    guidance_scale: float = 2.0
    name: str = "pair_scale"
    threads: int = 2
    runs_dir: Path = ROOT / "runs" / "bench"


def run(args: Options) -> dict:
    torch.set_num_threads(args.threads)
    ensure_assets()
    adapters, _ = adapters_of(args)  # the spec's runs at args.seed, as the any-mix benchmark finds them
    classes = sorted(adapters)
    if len(classes) != 2:
        sys.exit(f"pair_scale: a pair of two class adapters, got arms {classes}")
    prompts = [args.paraphrase.format(d=d) for d in args.paraphrase_digits]
    prompts += [args.neutral.format(d=d) for d in args.unnamed]
    n = args.n_per_prompt
    judge = HueJudge.for_colors(classes)
    base = Backbone.from_config(BackboneConfig(kind="tiny", pretrained="colored-digits-16"))
    rows, t0 = [], time.perf_counter()
    for scale in args.scales:
        own: dict[str, list[float]] = {}
        for k, cls in enumerate(classes):
            bb = adapter_copy(base, adapters[cls], fuse=True, scale=scale)
            x = bb.sample(
                [p for p in prompts for _ in range(n)], seeds=[i for _ in prompts for i in range(n)],
                steps=args.steps, guidance_scale=args.guidance_scale,
            )  # fmt: skip
            own[cls] = (judge.predict(x).view(len(prompts), n) == k).float().mean(1).tolist()
        for i, prompt in enumerate(prompts):
            # half the images from each adapter: the share of class 0 the pair would give
            share0 = (own[classes[0]][i] + (1 - own[classes[1]][i])) / 2
            rows.append({"scale": scale, "prompt": prompt, **{f"own_{c}": own[c][i] for c in classes},
                         "pair_dev": abs(share0 - 0.5)})  # fmt: skip
        print(f"scale {scale}: done", file=sys.stderr)
    opts = {k: (str(Path(v).resolve().relative_to(ROOT)) if isinstance(v, Path) else v)
            for k, v in asdict(args).items()}  # fmt: skip
    return {"options": opts, "classes": classes, "rows": rows, "seconds": time.perf_counter() - t0}


def markdown(p: dict) -> str:
    o, classes = p["options"], p["classes"]
    lines = [
        f"# The pair's residual against the adapters' scale (`{o['spec']}`, seed {o['seed']})",
        "",
        f"Each adapter alone, fused at each scale; its own ink's share on {o['n_per_prompt']} images per "
        f"prompt (seeds 0-{o['n_per_prompt'] - 1}), {o['steps']} DDIM steps, guidance {o['guidance_scale']}, "
        "hue judge. pair dev: |share − 0.5| the pair would give drawing half the images from each. "
        f"Command: `python benchmarks/pair_scale.py --spec {o['spec']} --seed {o['seed']}`.",
        "",
        "| scale | prompt | " + " | ".join(f"{c} adapter: {c}" for c in classes) + " | pair dev |",
        "|---|---|" + "---|" * (len(classes) + 1),
    ]
    for r in p["rows"]:
        own = " | ".join(cell(r[f"own_{c}"]) for c in classes)
        lines.append(f"| {r['scale']:g} | {r['prompt']} | {own} | {cell(r['pair_dev'])} |")
    lines += ["", "Mean pair dev per scale (over the prompts above):", ""]
    for s in o["scales"]:
        devs = [r["pair_dev"] for r in p["rows"] if r["scale"] == s]
        lines.append(f"- {s:g}: {cell(sum(devs) / len(devs))}")
    return "\n".join(lines) + "\n"


def main() -> None:
    from jsonargparse import CLI

    args = CLI(Options, as_positional=False)
    payload = run(args)
    write_results(args.name, payload, markdown(payload))


if __name__ == "__main__":
    main()
