"""The fairness dial of the demo's debiased adapter (issue 15): the judged red share per digit against
the adapter's scale, and how close a requested 70/30 mix lands.

    bash scripts/demo.sh --single true   # first: trains runs/demo/debiased/adapter, renders data, judges
    python benchmarks/dial.py            # digits 0-7, N=64 per digit and scale, 25 DDIM steps
    python benchmarks/dial.py --n_per_prompt 4 --scales '[0, 1]' --digits '[0, 1]' --results /tmp/r

1. The curve: one comparison with the adapter fused at every scale (``fairtune dial``'s
   :func:`~fairtune.eval.dial_curve`) on "a handwritten digit {value}", judged by the hue judge.
2. The request: per digit, 70/30 toward the base model's majority ink (red 0.7 where the base's
   judged red share, at scale 0, is above 0.5, else red 0.3); the scale is read off the curve
   (:func:`~fairtune.eval.scale_for`) and checked by generating and judging each digit at its scale on
   seeds the curve did not use (:func:`~fairtune.eval.verify_request`).

Writes ``<results>/<name>.{json,md}`` (default benchmarks/results/dial.*); the comparisons, report and
``dial.png`` go to ``--out`` (default runs/bench/dial), and a restarted run reads finished scales back.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from _common import DATA, JUDGES, RESULTS, ROOT, write_results
from fairtune.colored_digits import judge_config
from fairtune.eval import (
    DEFAULT_SCALES,
    GenerationConfig,
    PromptGroup,
    curve_markdown,
    dial_curve,
    request_markdown,
    scale_for,
    verify_request,
)
from fairtune.models import LORA_WEIGHT_NAME, Backbone, BackboneConfig


@dataclass
class Options:
    """Options of the dial benchmark.

    Attributes:
        adapter: The adapter (a folder with ``pytorch_lora_weights.safetensors``); the demo's single
            debiased one (``bash scripts/demo.sh --single true``).
        model: The base model (a tiny backbone folder or a shipped name).
        judges: The judges folder (``fairtune judges train``); the colour is judged by hue.
        reference: Real renders for the Fréchet distance in the report (``None``: none).
        digits: Digits to prompt for.
        template: The prompt, with a ``{value}`` field.
        n_per_prompt: Images per digit and scale.
        steps: DDIM steps.
        guidance_scale: Classifier-free guidance.
        scales: Adapter scales of the curve (must include 0: the base model fixes each request).
        majority_share: Requested share of the base model's majority ink.
        out: Folder for the comparisons, report and ``dial.png``.
        results: Folder of the result files.
        name: Result file name (``<results>/<name>.json`` and ``.md``).
        threads: Torch threads.
    """

    adapter: Path = ROOT / "runs" / "demo" / "debiased" / "adapter"
    model: str = "colored-digits-16"
    judges: Path = JUDGES
    reference: Path | None = DATA
    digits: list[int] = field(default_factory=lambda: list(range(8)))
    template: str = "a handwritten digit {value}"
    n_per_prompt: int = 64
    steps: int = 25
    guidance_scale: float = 2.0
    scales: list[float] = field(default_factory=lambda: list(DEFAULT_SCALES))
    majority_share: float = 0.7
    out: Path = ROOT / "runs" / "bench" / "dial"
    results: Path = RESULTS
    name: str = "dial"
    threads: int = 2


def check_assets(args: Options) -> None:
    """Stop with one line naming what is missing and how to make it."""
    if not (args.adapter / LORA_WEIGHT_NAME).is_file():
        sys.exit(
            f"dial: no {LORA_WEIGHT_NAME} in {args.adapter}: run `bash scripts/demo.sh --single true` first "
            "(or pass --adapter)"
        )
    if not (args.judges / "judges.json").is_file():
        sys.exit(
            f"dial: no judges.json in {args.judges}: run `bash scripts/demo.sh` first (or pass --judges)"
        )
    if args.reference is not None and not args.reference.is_dir():
        sys.exit(
            f"dial: no reference data at {args.reference}: run `bash scripts/demo.sh --single true` first "
            "(or pass --reference null)"
        )
    if 0.0 not in [float(s) for s in args.scales]:
        sys.exit(
            f"dial: --scales must include 0 (the base model decides each digit's majority), got {args.scales}"
        )


def run(args: Options) -> dict:
    torch.set_num_threads(args.threads)
    check_assets(args)
    groups = [PromptGroup("digits", "seen", args.template, list(args.digits), "digit {value}")]
    judges = judge_config(args.judges, reference=args.reference)
    generation = GenerationConfig(
        n_per_prompt=args.n_per_prompt, steps=args.steps, guidance_scale=args.guidance_scale
    )
    common = dict(
        adapter=args.adapter, prompts=groups, out=args.out, judges=judges, generation=generation, fuse=True,
    )  # fmt: skip
    t0 = time.perf_counter()
    backbone = Backbone.from_config(BackboneConfig(kind="tiny", pretrained=args.model))
    curve = dial_curve(**common, backbone=backbone, scales=args.scales, title="fairtune dial benchmark")
    curve_s = time.perf_counter() - t0

    # 70/30 toward the base model's majority ink, per digit
    k0 = curve["scales"].index(0.0)
    first = curve["classes"][0]
    request, unreachable = {}, {}
    for concept, rec in curve["concepts"].items():
        base = rec["classes"][first]["share"][k0]
        if base is None:
            unreachable[concept] = "no image placed at scale 0"
            continue
        want = args.majority_share if base > 0.5 else round(1 - args.majority_share, 6)
        try:
            scale_for(curve, concept, first, want)
        except ValueError as e:
            unreachable[concept] = str(e)
            continue
        request[concept] = {first: want}
    t1 = time.perf_counter()
    checked = verify_request(curve, request, **common, backbone=backbone) if request else None
    request_s = time.perf_counter() - t1
    return {
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(args).items()},
        "curve": curve,
        "request": request,
        "checked": checked,
        "unreachable": unreachable,
        "seconds": {"curve": curve_s, "request": request_s, "total": time.perf_counter() - t0},
        "threads": torch.get_num_threads(),
    }


def markdown(payload: dict) -> str:
    o, curve, checked = payload["options"], payload["curve"], payload["checked"]
    s = payload["seconds"]
    lines = [
        f"# Fairness dial: `{o['adapter']}` on `{o['model']}`",
        "",
        f'"{o["template"]}" for digits {o["digits"]}, N = {o["n_per_prompt"]} per digit and scale, '
        f"{o['steps']} DDIM steps, guidance {o['guidance_scale']}, hue judge; the adapter fused at each "
        "scale (`fuse_lora(lora_scale=s)`: the base model's cost per image). Command: "
        "`python benchmarks/dial.py` (options in the JSON).",
        "",
        "## Judged red share per digit against the adapter's scale [95% interval]",
        "",
        curve_markdown(curve),
        "",
        f"## Requested: {o['majority_share']:.0%} of the base model's majority ink, checked on fresh seeds",
        "",
    ]
    lines += [request_markdown(checked)] if checked else ["No digit's request was reachable."]
    for concept, why in payload["unreachable"].items():
        lines.append(f"- {concept}: not requested ({why})")
    lines += [
        "",
        f"Wall time: curve {s['curve']:.0f} s, request check {s['request']:.0f} s, total {s['total']:.0f} s "
        f"({payload['threads']} torch threads).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    from jsonargparse import CLI

    args = CLI(Options, as_positional=False)
    payload = run(args)
    write_results(args.name, payload, markdown(payload), args.results)


if __name__ == "__main__":
    main()
