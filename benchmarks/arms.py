"""Ablation arms of the LoRA fine-tune on the shipped base model, same budget and seed.

    python benchmarks/arms.py --name sampler --arms naive sampler          # issue 3
    python benchmarks/arms.py --name levers_uniform --arms naive sampler adversary fairness \
        sampler_adversary sampler_fairness all [--target red30_blue70]      # one group of issue 4
    python benchmarks/levers.py                                             # every group + summary

Each arm is ``configs/colored_digits/lora.yaml`` + ``configs/ablations/<arm>.yaml`` (+ a target
overlay), trained on digits 0-7; N images per digit are judged for digits 0-9 (guidance 2, hue
judge). Writes benchmarks/results/<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from _common import DATA, RESULTS, ROOT, ensure_assets, reference_images, save_grid, write_results
from fairtune.eval import GenerationConfig, evaluate_backbone_on_digits
from fairtune.models import Backbone, BackboneConfig, load_adapter

RUNNER = (
    "import resource, sys; from fairtune.cli import main; main(sys.argv[1:]); "
    "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
)


def train_arm(arm: str, steps: int, out_root, target: str | None, overrides: list[str] = ()) -> dict:
    run = out_root / arm
    overlays = [ROOT / f"configs/ablations/{arm}.yaml"]
    if target:
        overlays.append(ROOT / f"configs/targets/{target}.yaml")
    cmd = [sys.executable, "-c", RUNNER, "fit", "--config", str(ROOT / "configs/colored_digits/lora.yaml")]
    for o in overlays:
        cmd += ["--config", str(o)]
    cmd += [
        "--trainer.max_steps", str(steps),
        "--trainer.default_root_dir", str(run),
        "--trainer.enable_progress_bar", "false",
        "--data.source.path", str(DATA / "table"),
    ]  # fmt: skip
    for kv in overrides:  # --set model.fairness.weight=2 -> --model.fairness.weight 2
        key, _, value = kv.partition("=")
        cmd += [f"--{key}", value]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"arm {arm} failed:\n{res.stderr[-3000:]}")
    peak = [int(line.split()[1]) for line in res.stdout.splitlines() if line.startswith("PEAK_RSS_KB")]
    return {"run": str(run), "train_seconds": seconds, "peak_rss_mb": peak[-1] / 1024 if peak else None}


def report(args, q, results) -> None:
    """Write the table so far (after every arm, so an interrupted run still leaves its numbers)."""
    naive_s = results.get("naive", {}).get("train_seconds")
    for r in results.values():
        if naive_s and r.get("train_seconds"):
            r["time_ratio_vs_naive"] = r["train_seconds"] / naive_s
    lines = [
        f"# {args.name}: LoRA arms ({args.steps} steps, rank 8, lr 2e-3 cosine, batch 64, digits 0-7; "
        f"target red {q[0]:.2f}; N={args.n} per digit, guidance 2, hue judge)",
        "",
        "| arm | "
        + " | ".join(f"d{d}" for d in range(10))
        + " | mean dev 0-7 | worst 0-7 | mean dev 8-9 | fidelity | FD | train s | × naive | peak MB |",
        "|---|" + "---|" * 10 + "---|---|---|---|---|---|---|---|",
    ]
    for arm, r in results.items():
        lines.append(
            f"| {arm} | "
            + " | ".join(f"{s:.2f}" for s in r["red_share"])
            + f" | {r['mean_dev_seen']:.3f} | {r['worst_dev_seen']:.3f} | {r['mean_dev_heldout']:.3f}"
            + f" | {r['fidelity']:.3f} | {r['frechet']:.2f}"
            + f" | {r.get('train_seconds', 0):.0f} | {r.get('time_ratio_vs_naive', 0):.2f}"
            + f" | {r.get('peak_rss_mb') or 0:.0f} |"
        )
    lines += [
        "",
        "Columns d0-d9: red share per digit. dev = max over colours of |share − target| (for two "
        "colours |red share − target red|). Train seconds: wall time of the whole `fairtune fit` "
        "process (the same start-up cost in every arm).",
    ]
    payload = {"steps": args.steps, "n": args.n, "target": q, "arms": results}
    write_results(args.name, payload, "\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", default="sampler")
    ap.add_argument("--arms", nargs="+", default=["naive", "sampler"])
    ap.add_argument("--target", default=None, help="a configs/targets/ overlay, e.g. red30_blue70")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--set", nargs="*", default=[], help="overrides for every arm: key=value")
    ap.add_argument("--report-only", action="store_true", help="tabulate the finished arms, train nothing")
    args = ap.parse_args()
    from pathlib import Path

    out_root = ROOT / "runs" / "bench" / args.name
    judges = ensure_assets()
    ref = reference_images()
    gen = GenerationConfig(n_per_prompt=args.n)
    q = [0.5, 0.5]
    if args.target:
        import yaml

        props = yaml.safe_load((ROOT / f"configs/targets/{args.target}.yaml").read_text())
        props = props["data"]["target"]["proportions"]
        q = [props[c] for c in judges.colors]
    results = {}
    for arm in ["base", *args.arms]:
        # A finished arm is kept in runs/bench/<name>/<arm>.json, so an interrupted run resumes.
        cache = out_root / f"{arm}.json"
        if cache.exists():
            results[arm] = json.loads(cache.read_text())
            continue
        if args.report_only:
            continue
        bb = Backbone.from_config(BackboneConfig(kind="tiny", pretrained="colored-digits-16"))
        info = {}
        if arm != "base":
            info = train_arm(arm, args.steps, out_root, args.target, args.set)
            load_adapter(bb, Path(info["run"]) / "adapter", fuse=True)
        ev = evaluate_backbone_on_digits(bb, judges, generation=gen, reference=ref, target=q)
        save_grid(ev["images"][:: args.n // 8][:80], RESULTS / f"{args.name}_{arm}_samples.png", per_row=8)
        results[arm] = {
            **info,
            "red_share": [ev["per_concept"][f"digit {d}"]["p_hat"][0] for d in range(10)],
            "per_concept": {
                k: {kk: v[kk] for kk in ("p_hat", "dev", "dev_ci", "n", "undetermined", "fidelity")}
                for k, v in ev["per_concept"].items()
            },
            **ev["summary"],
        }
        out_root.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(results[arm]))
        print(
            arm, json.dumps({k: results[arm][k] for k in ("mean_dev_seen", "mean_dev_heldout", "fidelity")})
        )
        report(args, q, results)
    report(args, q, results)


if __name__ == "__main__":
    main()
