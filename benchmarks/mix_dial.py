"""Any mix after deployment (issue 27): two class adapters (benchmarks/specs/class_adapters.yaml, each
the demo's arm trained toward one ink alone), drawn per image in solved shares, asked for red shares
0.1, 0.3, 0.5, 0.7 and 0.9 on every digit (blue 0.9 ... 0.1: every share of each class).

    python benchmarks/arms.py benchmarks/specs/class_adapters.yaml --workers 2   # first: the adapters
    python benchmarks/mix_dial.py
    python benchmarks/mix_dial.py --n_per_prompt 8 --requests '[0.5]' --results /tmp/r   # a quick look

1. Endpoints: the base model and each adapter alone (``fairtune dial --class_adapters``' first step,
   :func:`~fairtune.eval._mix.mix_endpoints`) on "a handwritten digit {d}" for digits 0-9 (0-7 trained
   with data, 8 named in training without data, 9 never named) and on explicit prompts ("a red
   handwritten digit {d}", "a blue ...") for the explicit column, seeds 0 to N-1.
2. Each request: the share of images each adapter draws, solved per digit from the endpoints
   (:func:`~fairtune.eval._mix.mix_for`), then every digit generated with its mix through the
   comparison's ``class_adapters`` method and judged, on seeds N to 2N-1 (never the endpoints').

Writes ``<results>/<name>.{json,md}`` (default benchmarks/results/mix_dial.*); comparisons are cached
in ``--out`` (a restarted run reads finished ones back).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from _common import DATA, JUDGES, RESULTS, ROOT, write_results
from fairtune.cli import load_spec, read_status
from fairtune.colored_digits import judge_config
from fairtune.data import format_number as _f
from fairtune.eval import (
    GenerationConfig,
    PromptGroup,
    mix_endpoints,
    mix_markdown,
    neutral_shares,
    plot_requests,
    verify_mix,
)
from fairtune.models import LORA_WEIGHT_NAME, Backbone, BackboneConfig


@dataclass
class Options:
    """Options of the any-mix benchmark.

    Attributes:
        spec: The sweep spec that trained the class adapters (one arm per class, named after it).
        seed: Which training seed's adapters.
        model: The base model.
        judges: The judges folder; the colour is judged by hue.
        reference: Real renders for the Fréchet distance (``None``: none).
        requests: Requested shares (every digit at once, one check each): of red with two classes;
            with more, each share of every class in turn, the others splitting the rest equally.
        explicit_digits: Digits of the explicit prompts (endpoints only: each adapter alone).
        include_base: Also generate the base model with the endpoints (its red share, quality).
        adapter_scale: The scale every adapter is fused at, for the endpoints and the mixes.
        route_named: Prompts naming one ink come from that ink's adapter alone, whatever the mix
            (``MethodConfig.route_named``; ``fairtune dial``'s default): each request then also
            generates the explicit prompts, and its explicit kept is measured. Results: ``_routed``.
        n_per_prompt: Images per prompt.
        steps: DDIM steps.
        guidance_scale: Classifier-free guidance.
        out: Folder of the comparisons.
        results: Folder of the result files.
        name: Result file name.
        threads: Torch threads.
        runs_dir: The sweep folder the spec's runs trained into (``runs/<hash>/adapter``).
        kind: The base model's backbone kind (``sd`` for ColoredDigits-SD).

    ColoredDigits-SD (the SD pair that also learns from its ink's data, seed 0, fused at 1.5 as its
    comparison draws it)::

        python benchmarks/mix_dial.py --spec benchmarks/specs/colored_digits_sd_pair_data.yaml \\
          --runs_dir runs/colored-digits-sd32-pair --kind sd --model colored-digits-sd32 \\
          --judges runs/colored-digits-sd32/judges --reference runs/data/colored-digits-32 \\
          --adapter_scale 1.5 --out runs/bench/mix_dial_sd --name mix_dial_sd

    Three inks (benchmarks/specs/class_adapters_k3bg.yaml, on the three-ink base model)::

        python benchmarks/mix_dial.py --spec benchmarks/specs/class_adapters_k3bg.yaml \\
          --model colored-digits-16-k3bg --judges runs/judges/colored-digits-16-k3bg \\
          --reference runs/data/colored-digits-16-k3bg --adapter_scale 1.5 --route_named true \\
          --out runs/bench/mix_dial_k3bg --name mix_dial_k3bg
    """

    spec: Path = ROOT / "benchmarks" / "specs" / "class_adapters.yaml"
    seed: int = 0
    model: str = "colored-digits-16"
    judges: Path = JUDGES
    reference: Path | None = DATA
    requests: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])
    explicit_digits: list[int] = field(default_factory=lambda: [5, 9])
    include_base: bool = False
    adapter_scale: float = 1.0
    route_named: bool = False
    n_per_prompt: int = 128
    steps: int = 15
    guidance_scale: float = 2.0
    out: Path = ROOT / "runs" / "bench" / "mix_dial"
    results: Path = RESULTS
    name: str = "mix_dial"
    threads: int = 2
    runs_dir: Path = ROOT / "runs" / "bench"
    kind: Literal["tiny", "sd"] = "tiny"


ROLES = [("seen", list(range(8))), ("named", [8]), ("heldout", [9])]


def adapters_of(args: Options) -> tuple[dict[str, str], dict[str, float | None]]:
    """Class -> adapter folder of the spec's runs at ``args.seed``, and each run's training seconds."""
    spec = load_spec(args.spec)
    adapters, seconds = {}, {}
    for run in spec.runs:
        if run.seed != args.seed:
            continue
        folder = Path(args.runs_dir) / "runs" / run.hash
        if not (folder / "adapter" / LORA_WEIGHT_NAME).is_file():
            sys.exit(f"mix_dial: arm {run.arm!r} is not trained: python benchmarks/arms.py {args.spec}")
        adapters[run.arm] = str(folder / "adapter")
        seconds[run.arm] = (read_status(folder).get("metrics") or {}).get("train_seconds")
    return adapters, seconds


def run(args: Options) -> dict:
    torch.set_num_threads(args.threads)
    adapters, train_s = adapters_of(args)
    neutral = [
        PromptGroup(role, role, "a handwritten digit {value}", digits, "digit {value}")
        for role, digits in ROLES
    ]
    explicit = [
        PromptGroup(
            f"explicit_{c}", "explicit", f"a {c} handwritten digit {{value}}", list(args.explicit_digits),
            "digit {value}", names=c,
        )
        for c in adapters
    ]  # fmt: skip
    judges = judge_config(args.judges, reference=args.reference)
    gen = GenerationConfig(
        n_per_prompt=args.n_per_prompt, steps=args.steps, guidance_scale=args.guidance_scale
    )
    backbone = Backbone.from_config(BackboneConfig(kind=args.kind, pretrained=args.model))
    t0 = time.perf_counter()
    ends = mix_endpoints(
        class_adapters=adapters, prompts=neutral + explicit, out=args.out, backbone=backbone, judges=judges,
        generation=gen, include_base=args.include_base, adapter_scale=args.adapter_scale,
    )  # fmt: skip
    seconds = {"endpoints": time.perf_counter() - t0}
    checks = {}
    for key, focal, share, request in requests_of(ends["classes"], args.requests):
        t1 = time.perf_counter()
        checks[key] = verify_mix(
            ends, {"*": request}, prompts=neutral + (explicit if args.route_named else []),
            out=args.out, backbone=backbone, judges=judges, generation=gen,
            name=f"request_{focal}_{share:.2f}" + ("_routed" if args.route_named else ""),
            route_named=args.route_named,
        )  # fmt: skip
        checks[key]["request"] = request
        seconds[f"request {key}"] = time.perf_counter() - t1
    return {
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(args).items()},
        "adapters": adapters,
        "train_seconds": train_s,
        "endpoints": ends,
        "checks": checks,
        "summary": error_summary(checks),
        "seconds": seconds,
        "threads": torch.get_num_threads(),
    }


def requests_of(classes: list[str], shares: list[float]) -> list[tuple[str, str, float, dict[str, float]]]:
    """The requests checked: ``(key, focal class, share, {class: share})``. Two classes: each share
    of the first class (the other is the rest; key ``"0.10"``). More: each share of every class in
    turn, the other classes splitting the rest equally (key ``"red 0.10"``), so every class is asked
    for every share."""
    if len(classes) == 2:
        return [(f"{s:.2f}", classes[0], s, {classes[0]: s}) for s in shares]
    out = []
    for c in classes:
        for s in shares:
            rest = (1.0 - s) / (len(classes) - 1)
            out.append((f"{c} {s:.2f}", c, s, {k: (s if k == c else rest) for k in classes}))
    return out


def _request_label(check: dict, key: str) -> str:
    """``red 0.10`` (two classes) or ``red 0.10, blue 0.45, green 0.45``."""
    request = check.get("request")
    if not request:  # results written before requests were kept: two classes, red first
        return f"red {key}" if " " not in key else key
    return ", ".join(f"{c} {s:.2f}" for c, s in request.items())


def error_summary(checks: dict) -> dict:
    """Mean and worst |landed − requested| over the requests: on the digits trained with data and named
    (seen + named) and on the never-named digit (heldout), apart."""
    out = {}
    for part, roles in (("seen_named", {"seen", "named"}), ("heldout", {"heldout"})):
        errs = [r["abs_error"] for c in checks.values() for r in c["rows"] if r["role"] in roles]
        errs = [e for e in errs if e is not None]
        out[part] = {"mean_abs_error": float(np.mean(errs)) if errs else None,
                     "worst_abs_error": float(np.max(errs)) if errs else None, "n": len(errs)}  # fmt: skip
    return out


def markdown(p: dict) -> str:
    o, ends, s = p["options"], p["endpoints"], p["summary"]
    spec = Path(o["spec"]).resolve().relative_to(ROOT)
    classes = ends["classes"]
    routed = o.get("route_named", False)
    lines = [
        "# Any mix after deployment: class adapters drawn per image",
        "",
        f"Adapters: `{spec}` (seed {o['seed']}), one per ink, each trained toward that ink alone (the "
        f"spec says how), fused at scale {o.get('adapter_scale', 1.0):g}. "
        f'"a handwritten digit {{d}}", N = {o["n_per_prompt"]} per digit, '
        f"{o['steps']} DDIM steps, "
        f"guidance {o['guidance_scale']}, hue judge. Endpoints on seeds 0-{o['n_per_prompt'] - 1}; each "
        f"request checked on seeds {o['n_per_prompt']}-{2 * o['n_per_prompt'] - 1}"
        + (f"; model `{o['model']}`" if o.get("kind", "tiny") != "tiny" else "")
        + ". Command: `python benchmarks/mix_dial.py` (options in the JSON).",
        "",
        "## Requested against landed (mean and worst |landed − requested| over all requests)",
        "",
        "| digits | mean abs error | worst abs error | rows |",
        "|---|---|---|---|",
        f"| 0-8 (trained with data, and named without data) | {_f(s['seen_named']['mean_abs_error'])} | "
        f"{_f(s['seen_named']['worst_abs_error'])} | {s['seen_named']['n']} |",
        f"| 9 (never named) | {_f(s['heldout']['mean_abs_error'])} | {_f(s['heldout']['worst_abs_error'])} | "
        f"{s['heldout']['n']} |",
        "",
        *((f"![requested against landed per digit]({p['plot']})", "") if p.get("plot") else ()),
        "## Each adapter alone (endpoints): "
        + (f"{classes[0]} share per digit" if len(classes) == 2 else "its own ink's share per digit"),
        "",
    ]
    base = _base_shares(p) if p["options"]["include_base"] else None
    base_head = "base" if len(classes) == 2 else f"base ({'/'.join(classes)})"
    lines += [
        "| digit | " + " | ".join(f"{c} adapter" for c in classes) + (f" | {base_head} |" if base else " |"),
        "|---|" + "---|" * (len(classes) + (1 if base else 0)),
    ]
    for concept, rec in ends["concepts"].items():
        cells = [_f(rec["share"][c][classes[0] if len(classes) == 2 else c], 2) for c in ends["adapters"]]
        if base:
            cells.append(base.get(concept, ""))
        lines.append(f"| {concept} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| method | explicit kept | fidelity | Fréchet | UNet evals / image |",
        "|---|---|---|---|---|",
    ]
    for name, m in ends["metrics"].items():
        lines.append(
            f"| {name} (alone) | {_f(m['explicit_kept'])} | {_f(m['fidelity'])} | {_f(m['frechet'], 1)} | "
            f"{_f(m['unet_evals_per_image'], 0)} |"
        )
    for share, c in p["checks"].items():
        m = c["metrics"]
        lines.append(
            f"| mix, {_request_label(c, share)} | {_f(m['explicit_kept']) if routed else 'n/a'} | "
            f"{_f(m['fidelity'])} | "
            f"{_f(m['frechet'], 1)} | {_f(m['unet_evals_per_image'], 0)} |"
        )
    fid = _endpoint_fidelity(p)
    methods = [m for m in ends["metrics"] if m in fid]
    if methods:
        lines += [
            "",
            "Fidelity per prompt, each alone (endpoints): the share of images the digit judge reads as "
            "the prompt's digit. The base model's rows of explicit prompts show how well it draws each "
            "ink itself.",
            "",
            "| prompt | " + " | ".join(methods) + " |",
            "|---|" + "---|" * len(methods),
        ]
        for key in fid[methods[0]]:
            group, concept = key.split("/", 1)
            named = group.removeprefix("explicit_")
            prompt = f"a {named} … {concept}" if group.startswith("explicit_") else f"{concept} ({group})"
            lines.append(f"| {prompt} | " + " | ".join(_f(fid[m].get(key), 2) for m in methods) + " |")
    lines += [
        "",
        "Each request routes every prompt that names an ink to that ink's adapter alone, whatever the mix "
        "(`route_named`), and generates the explicit prompts too: its explicit kept is measured; its "
        "Fréchet distance is over the neutral prompts."
        if routed
        else "Explicit prompts go through whichever adapter an image draws, so a mix keeps them at least as "
        "well as its worse adapter alone.",
        "",
    ]
    for share, c in p["checks"].items():
        lines += [f"## Request: {_request_label(c, share)} on every digit", "", mix_markdown(c), ""]
    t = p["train_seconds"]
    lines += [
        "Training: " + ", ".join(f"{c} adapter {_f(x, 0)} s" for c, x in t.items())
        + " (each at its spec's step budget, on a machine other jobs may have shared). Wall time here: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in p["seconds"].items())
        + f" ({p['threads']} torch threads).",
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def _endpoints_comparison(p: dict) -> dict | None:
    """The endpoints' comparison (``<out>/metrics.json``), or ``None`` where it is gone."""
    path = Path(p["options"]["out"]) / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _endpoint_fidelity(p: dict) -> dict[str, dict[str, float | None]]:
    """Per endpoint method, each prompt's fidelity (``"seen/digit 0"``, ``"explicit_blue/digit 5"``),
    read from the endpoints' comparison, or from the payload where it is stored (``endpoint_fidelity``)."""
    if "endpoint_fidelity" not in p:
        metrics = _endpoints_comparison(p)
        if metrics is None:  # a payload rendered before the table existed, its comparison gone
            return {}
        p["endpoint_fidelity"] = {
            m: {k: r.get("fidelity") for k, r in v["per_concept"].items()}
            for m, v in metrics["methods"].items()
        }
    return p["endpoint_fidelity"]


def _base_shares(p: dict) -> dict[str, str]:
    """Per concept, the base model's cell: its first class's share (two classes) or every class's,
    ``0.70/0.15/0.15`` in the classes' order. Read from the endpoints' comparison, or from the payload
    where an earlier rendering stored it (``base_shares``)."""
    if "base_shares" not in p:
        metrics = _endpoints_comparison(p)
        if metrics is None:
            raise FileNotFoundError(f"mix_dial: no endpoints' comparison in {p['options']['out']}")
        p["base_shares"] = {c: r["share"] for c, r in neutral_shares(metrics, "base").items()}
    classes = p["endpoints"]["classes"]
    shown = classes[:1] if len(classes) == 2 else classes
    return {c: "/".join(_f(s[k], 2) for k in shown) if s else "" for c, s in p["base_shares"].items()}


def result_name(args: Options) -> str:
    """``name``, ``_x<scale>`` for a scale other than 1, ``_routed`` with ``route_named``."""
    return (
        args.name
        + ("" if args.adapter_scale == 1.0 else f"_x{args.adapter_scale:g}")
        + ("_routed" if args.route_named else "")
    )


def main() -> None:
    from jsonargparse import CLI

    args = CLI(Options, as_positional=False)
    payload = run(args)
    name = result_name(args)
    rows = [r for c in payload["checks"].values() for r in c["rows"]]
    if rows:
        payload["plot"] = plot_requests(rows, Path(args.results) / f"{name}.png").name
    write_results(name, payload, markdown(payload), args.results)


if __name__ == "__main__":
    main()
