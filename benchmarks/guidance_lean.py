"""Issue 24, diagnosis: is an adapter's residual lean in its guidance direction?

    python benchmarks/guidance_lean.py --spec benchmarks/specs/distill_split.yaml --arm split

For each finished seed of an arm, the red share of a few digits is judged (hue judge, N images per
digit, the judge's seeds) at guidance 1, 2 and 3, and once at guidance 2 with the empty prompt's
prediction taken from the base model (adapter off for that half of classifier-free guidance). Guidance
1 is the neutral prompt's own distribution; a share that moves with the guidance scale sits in the
guidance direction (neutral minus empty prompt), and if the base's empty prompt brings it back, the
adapter's empty-prompt prediction is what drifted.
Writes ``benchmarks/results/guidance_lean_<arm>.{json,md}``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from _common import ensure_assets, write_results
from fairtune.models import Backbone, BackboneConfig, load_adapter
from fairtune.train._fairness import _adapters_disabled

DIGITS = [0, 2, 5, 7]
GUIDANCE = [1.0, 2.0, 3.0]
N, STEPS = 128, 15


@torch.no_grad()
def shares(bb: Backbone, judges, digit: int, guidance: float, base_uncond: bool, batch: int = 64) -> float:
    """Red share of ``N`` neutral-prompt images of ``digit`` (image i from seed i, as the judge draws)."""
    classes = judges.groups(["color"])
    labels = []
    for i in range(0, N, batch):
        seeds = list(range(i, min(i + batch, N)))
        sched = bb.sampling_scheduler()
        sched.set_timesteps(STEPS)
        lat = bb.initial_noise(seeds) * sched.init_noise_sigma
        cond = bb.encode_prompts([f"a handwritten digit {digit}"] * len(seeds))
        unc = bb.encode_prompts([""] * len(seeds))
        for t in sched.timesteps:
            e_c = bb.unet(lat, t, encoder_hidden_states=cond).sample
            if base_uncond:
                with _adapters_disabled(bb.unet):
                    e_u = bb.unet(lat, t, encoder_hidden_states=unc).sample
            else:
                e_u = bb.unet(lat, t, encoder_hidden_states=unc).sample
            lat = sched.step(e_u + guidance * (e_c - e_u), t, lat).prev_sample
        labels.append(torch.as_tensor(judges.label(bb.to_pixels(lat), ["color"], judge="hue")))
    return float((torch.cat(labels) == classes.index("red")).float().mean())


def main(spec: Path, arm: str, seeds: list[int] | None = None, digits: list[int] | None = None) -> dict:
    """Judge the finished seeds of ``arm`` in ``spec`` (runs under runs/bench, shared by hash).

    Args:
        spec: A sweep spec whose runs are finished.
        arm: The arm to look at.
        seeds: Its seeds to judge (default: every finished one).
        digits: Digits judged (default 0, 2, 5, 7).
    """
    from noise_floor import OUT, seed_metrics

    from fairtune.cli import load_spec

    torch.set_num_threads(2)
    judges = ensure_assets()
    runs = seed_metrics(load_spec(spec), OUT).get(arm, {})
    runs = {s: r for s, r in runs.items() if seeds is None or s in seeds}
    digits = DIGITS if digits is None else list(digits)
    if not runs:
        raise SystemExit(f"{spec}: no finished run of arm {arm!r}")
    rows: dict[str, dict] = {}
    for seed, r in sorted(runs.items()):
        run_dir = Path(r["run"])
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        bb = Backbone.from_config(BackboneConfig(**cfg["model"]["backbone"]))
        load_adapter(bb, run_dir / "adapter", fuse=False)  # unfused: the base's empty prompt needs it off
        bb.unet.eval()
        row = {}
        for d in digits:
            row[f"digit {d}"] = {f"g{g:g}": shares(bb, judges, d, g, False) for g in GUIDANCE}
            row[f"digit {d}"]["g2, base empty prompt"] = shares(bb, judges, d, 2.0, True)
            print(f"seed {seed} digit {d}: {row[f'digit {d}']}", flush=True)
        rows[str(seed)] = row
    cols = [f"g{g:g}" for g in GUIDANCE] + ["g2, base empty prompt"]
    lines = [
        f"# guidance_lean: `{arm}` of `{spec}`: red share against the guidance scale "
        f"({N} images per digit, {STEPS} DDIM steps, hue judge; target 0.5)",
        "",
        "| seed | digit | " + " | ".join(cols) + " |",
        "|---|---|" + "---|" * len(cols),
    ]
    for seed, row in rows.items():
        for concept, vals in row.items():
            lines.append(f"| {seed} | {concept} | " + " | ".join(f"{vals[c]:.2f}" for c in cols) + " |")
    lines += [
        "",
        "g1 = the neutral prompt alone; the columns to its right add classifier-free guidance. The last "
        "column takes the empty prompt's prediction from the base model (adapter off for that half).",
    ]
    payload = {"spec": str(spec), "arm": arm, "n": N, "steps": STEPS, "digits": digits, "seeds": rows}
    write_results(f"guidance_lean_{arm}", payload, "\n".join(lines) + "\n")
    return payload


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main, as_positional=False)
