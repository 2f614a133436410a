"""Issue 24, diagnosis: at which denoising steps the shipped base model decides the ink.

    python benchmarks/ink_decision.py

For a digit, sampling starts from the prompt that names the ink against the digit's skew ("a blue
handwritten digit 1", "a red handwritten digit 7") for the first k of the 15 DDIM steps, then goes on
with the neutral prompt ("a handwritten digit 1"). The judged share of the named ink as a function
of k says how many steps (and which timesteps) fix it: where the share reaches the explicit prompt's,
the rest of the chain no longer changes the ink. A fix that acts on the ink must act on those steps.
Writes ``benchmarks/results/ink_decision.{json,md}``.
"""

from __future__ import annotations

import torch

from _common import JUDGES, ensure_assets, write_results
from fairtune.models import Backbone, BackboneConfig

CASES = [(1, "blue"), (7, "red")]  # (digit, the ink its neutral prompt rarely draws)
SWITCH = [0, 1, 2, 3, 4, 5, 6, 8, 10, 15]
N, STEPS, GUIDANCE = 128, 15, 2.0


@torch.no_grad()
def switched(bb: Backbone, first: str, then: str, k: int, seeds: list[int]) -> torch.Tensor:
    """Images from ``first`` for the first ``k`` DDIM steps, then ``then``."""
    sched = bb.sampling_scheduler()
    sched.set_timesteps(STEPS)
    lat = bb.initial_noise(seeds) * sched.init_noise_sigma
    n = len(seeds)
    ctx = {p: torch.cat([bb.encode_prompts([""] * n), bb.encode_prompts([p] * n)]) for p in (first, then)}
    for i, t in enumerate(sched.timesteps):
        e_u, e_c = bb.unet(
            torch.cat([lat, lat]), t, encoder_hidden_states=ctx[first if i < k else then]
        ).sample.chunk(2)
        lat = sched.step(e_u + GUIDANCE * (e_c - e_u), t, lat).prev_sample
    return bb.to_pixels(lat)


def main() -> dict:
    judges = ensure_assets()
    bb = Backbone.from_config(BackboneConfig(kind="tiny", pretrained="colored-digits-16"))
    bb.unet.eval()
    sched = bb.sampling_scheduler()
    sched.set_timesteps(STEPS)
    timesteps = [int(t) for t in sched.timesteps]
    classes = judges.groups(["color"])
    rows = {}
    for digit, ink in CASES:
        named, neutral = f"a {ink} handwritten digit {digit}", f"a handwritten digit {digit}"
        shares = {}
        for k in SWITCH:
            images = switched(bb, named, neutral, k, list(range(N)))
            labels = torch.as_tensor(judges.label(images, ["color"], judge="hue"))
            shares[k] = float((labels == classes.index(ink)).float().mean())
        rows[f"digit {digit}, {ink}"] = shares
    lines = [
        f"# ink_decision: when the base model fixes the ink ({N} images per point, {STEPS} DDIM steps, "
        f"guidance {GUIDANCE}, hue judge)",
        "",
        "Share of images in the named ink when the first k steps use the explicit prompt and the rest "
        "the neutral one (k = 0: neutral throughout; k = 15: explicit throughout).",
        "",
        "| case | " + " | ".join(f"k={k} (t≥{timesteps[k - 1]})" if k else "k=0" for k in SWITCH) + " |",
        "|---|" + "---|" * len(SWITCH),
    ]
    for case, shares in rows.items():
        lines.append(f"| {case} | " + " | ".join(f"{shares[k]:.2f}" for k in SWITCH) + " |")
    lines += [
        "",
        f"DDIM timesteps visited: {timesteps}.",
        "",
        "Command: `python benchmarks/ink_decision.py`.",
    ]
    payload = {"timesteps": timesteps, "switch_steps": SWITCH, "n": N, "shares": rows, "judges": str(JUDGES)}
    write_results("ink_decision", payload, "\n".join(lines) + "\n")
    return payload


if __name__ == "__main__":
    main()
