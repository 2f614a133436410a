"""Judge-error correction on a judge made deliberately noisy (ColoredDigits-Bias), and its coverage.

    .venv/bin/python benchmarks/noisy_judge.py          # ~1 min on 2 CPU cores

1. ColoredDigits renders with a known red share are judged by the exact hue judge, then its calls are
   flipped with a known confusion (the "noisy judge"). The confusion is *measured* on separate
   labelled renders (as a user would on held-out labelled images); the corrected share and its
   bootstrap interval are compared with the truth, for several true shares.
2. Coverage of the corrected 95 % interval by simulation (new generated and calibration sets per
   trial), beside the raw judged share's plain binomial interval.

Writes benchmarks/results/noisy_judge.json and .md.
"""

from __future__ import annotations

import numpy as np
import torch

from _common import write_results
from fairtune.colored_digits import BACKGROUND, INK, HueJudge, render
from fairtune.eval import corrected_shares, judged_shares, wald_interval

FLIP = np.array([[0.90, 0.10, 0.00], [0.35, 0.60, 0.05]])  # noisy call | hue call (red, blue, undet.)


def noisy(labels: np.ndarray, rng) -> np.ndarray:
    out = np.array([rng.choice(3, p=FLIP[t]) for t in labels])
    return np.where(out == 2, -1, out)


def renders(colors: list[str], rng) -> torch.Tensor:
    from sklearn.datasets import load_digits

    d = load_digits()
    idx = rng.integers(0, len(d.images), size=len(colors))
    gray = (d.images[idx] / 16.0).astype(np.float32)
    ink = np.array([INK[c] for c in colors])
    bg = np.array([BACKGROUND["light"]] * len(colors))
    return torch.from_numpy(render(gray, ink, bg, size=16, rng=rng)).permute(0, 3, 1, 2)


def main() -> None:
    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    hue = HueJudge.for_colors(["red", "blue"])
    cal_colors = ["red"] * 300 + ["blue"] * 300
    cal_true = np.array([0 if c == "red" else 1 for c in cal_colors])
    cal_hue = hue.predict(renders(cal_colors, rng)).numpy()
    hue_exact = float((cal_hue == cal_true).mean())
    cal_noisy = noisy(cal_hue, rng)
    demo = []
    for share in (0.1, 0.25, 0.5, 0.75):
        n_red = int(round(share * 1000))
        colors = ["red"] * n_red + ["blue"] * (1000 - n_red)
        judged = noisy(hue.predict(renders(colors, rng)).numpy(), rng)
        out = corrected_shares(judged, cal_true, cal_noisy, 2, n_boot=1000, seed=1)
        demo.append(
            {
                "true_red": share,
                "judged_red": float(out["judged"][0]),
                "undetermined": out["undetermined"],
                "corrected_red": float(out["corrected"][0]),
                "low": float(out["low"][0]),
                "high": float(out["high"][0]),
            }
        )

    # coverage by simulation (no images: labels drawn from the same confusion)
    conf = np.array([[0.85, 0.10, 0.05], [0.30, 0.65, 0.05]])
    p_red, trials, n_gen, n_cal = 0.3, 400, 300, 300
    hit_corr = hit_raw = 0
    widths = []
    for t in range(trials):
        true_gen = (rng.random(n_gen) >= p_red).astype(int)
        gen = np.array([rng.choice(3, p=conf[k]) for k in true_gen])
        true_cal = np.repeat([0, 1], n_cal // 2)
        cal = np.array([rng.choice(3, p=conf[k]) for k in true_cal])
        gen, cal = np.where(gen == 2, -1, gen), np.where(cal == 2, -1, cal)
        out = corrected_shares(gen, true_cal, cal, 2, n_boot=300, seed=t)
        hit_corr += out["low"][0] <= p_red <= out["high"][0]
        widths.append(out["high"][0] - out["low"][0])
        raw = judged_shares(gen, 2)[0]
        low, high = wald_interval(raw, n_gen)
        hit_raw += low <= p_red <= high
    coverage = {
        "true_red": p_red,
        "trials": trials,
        "n_generated": n_gen,
        "n_calibration": n_cal,
        "corrected_coverage": hit_corr / trials,
        "corrected_mean_width": float(np.mean(widths)),
        "raw_binomial_coverage": hit_raw / trials,
    }
    md = [
        "# Judge-error correction on a deliberately noisy judge",
        "",
        "Command: `.venv/bin/python benchmarks/noisy_judge.py`",
        "",
        f"ColoredDigits renders (16x16, light background), 1,000 per row; the hue judge (exact on "
        f"renders: {hue_exact:.3f} on the calibration set) made noisy: red calls kept 90 % / flipped 10 %; "
        "blue calls kept 60 %, flipped 35 %, undetermined 5 %. Confusion measured on 600 labelled "
        "renders (300 per colour); 1,000 bootstrap resamples of both sets.",
        "",
        "| true red share | judged (noisy) | undetermined | corrected | 95 % interval |",
        "|---|---|---|---|---|",
    ]
    for r in demo:
        md.append(
            f"| {r['true_red']:.2f} | {r['judged_red']:.3f} | {r['undetermined']:.3f} | "
            f"{r['corrected_red']:.3f} | [{r['low']:.3f}, {r['high']:.3f}] |"
        )
    md += [
        "",
        f"Coverage by simulation ({trials} trials, true red share {p_red}, {n_gen} generated and "
        f"{n_cal} calibration labels per trial, confusion red→(0.85, 0.10, 0.05), "
        f"blue→(0.30, 0.65, 0.05)): corrected 95 % interval covered the truth in "
        f"{coverage['corrected_coverage']:.3f} of trials "
        f"(mean width {coverage['corrected_mean_width']:.3f}); "
        f"the raw judged share's binomial interval in {coverage['raw_binomial_coverage']:.3f}.",
        "",
    ]
    write_results("noisy_judge", {"hue_exact_on_calibration": hue_exact, "demo": demo,
                                  "coverage": coverage}, "\n".join(md))  # fmt: skip


if __name__ == "__main__":
    main()
