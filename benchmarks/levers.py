"""The levers benchmark (issue 4): every ablation arm on the shipped base model, same budget and seed,
with the uniform target and with 30% red / 70% blue, plus lever 3's short differentiable path against
the full sampling chain (Shen et al.'s way) at equal training steps.

    python benchmarks/levers.py                 # trains what is missing (hours on 2 CPU cores)
    python benchmarks/levers.py --report-only   # re-tabulate the finished arms

Each group is a ``benchmarks/arms.py`` run (its arms cached under ``runs/bench/<group>/``, its own
table in ``benchmarks/results/<group>.md``); this script writes the summary
``benchmarks/results/levers.{json,md}`` with the issue's goals checked for the ``all`` arm.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from _common import RESULTS, ROOT, write_results

ARMS = ["naive", "sampler", "adversary", "fairness", "sampler_adversary", "sampler_fairness", "all"]
# lever 3 alone at a shorter budget (its schedule compressed to match), short path vs full chain
CHAIN_STEPS = 300
CHAIN_SET = ["model.fairness.start_step=40", "model.fairness.ramp_steps=60"]
GROUPS = {
    # *_plainclf: lever 3 with a classifier never trained on mixed ink (kept when their runs exist)
    "levers_uniform": {
        "arms": ARMS,
        "args": [],
        "history": ["fairness_plainclf", "all_plainclf"],
        # this session's arms ran under other loads than the naive arm did (see the group's note)
        "timing_note": "naive, sampler, adversary and all_plainclf were timed on 2 threads with the "
        "machine to themselves; fairness_plainclf, sampler_adversary and all on 1 thread beside another "
        "job; fairness and sampler_fairness on 2 threads beside the test suite: × naive is not a "
        "step-time ratio here. The 30/70 group's naive and all ran under the same load (1 thread each, "
        "beside the ablation sweep), and both chain runs on 2 threads alone.",
    },
    "levers_30_70": {"arms": ARMS, "args": ["--target", "red30_blue70"], "timed_together": True},
    "chain_short": {"arms": ["fairness"], "args": ["--steps", str(CHAIN_STEPS), "--set", *CHAIN_SET]},
    "chain_full": {
        "arms": ["fairness"],
        "args": ["--steps", str(CHAIN_STEPS), "--set", *CHAIN_SET]
        + ["model.fairness.path=full_chain", "model.fairness.full_chain_steps=15"],
    },
}
GOALS = (
    "mean dev seen ≤ 0.05, held-out ≤ 0.10, fidelity within 0.02 of base, Fréchet ≤ 1.15 × base, "
    "step time ≤ 2 × naive"
)


def goal_check(r: dict, base: dict, timed: bool) -> list[str]:
    """The issue's goals for the ``all`` arm: 'met' or by how much each is missed."""
    checks = [
        ("mean dev seen", r["mean_dev_seen"], 0.05),
        ("mean dev held-out", r["mean_dev_heldout"], 0.10),
        ("fidelity drop", base["fidelity"] - r["fidelity"], 0.02),
        ("Fréchet / base", r["frechet"] / base["frechet"], 1.15),
    ]
    if timed and r.get("time_ratio_vs_naive"):
        checks.append(("step time / naive", r["time_ratio_vs_naive"], 2.0))
    out = []
    for name, value, limit in checks:
        verdict = "met" if value <= limit else f"missed by {value - limit:.3f}"
        out.append(f"{name} {value:.3f} (goal ≤ {limit}): {verdict}")
    return out


def table(results: dict) -> list[str]:
    lines = [
        "| arm | mean dev seen (0-7) | worst seen | mean dev held-out (8-9) | fidelity | Fréchet | "
        "undetermined | train s | × naive |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, r in results.items():
        und = sum(v.get("undetermined", 0) for v in r.get("per_concept", {}).values())
        n = und + sum(v.get("n", 0) for v in r.get("per_concept", {}).values())  # n counts judged ones
        lines.append(
            f"| {arm} | {r['mean_dev_seen']:.3f} | {r['worst_dev_seen']:.3f} | {r['mean_dev_heldout']:.3f}"
            f" | {r['fidelity']:.3f} | {r['frechet']:.1f} | {und}/{n}"
            f" | {r.get('train_seconds', 0):.0f} | {r.get('time_ratio_vs_naive', 0):.2f} |"
        )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--groups", nargs="+", default=list(GROUPS), choices=list(GROUPS))
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    for group in args.groups:
        g = GROUPS[group]
        cmd = [sys.executable, str(ROOT / "benchmarks/arms.py"), "--name", group, "--arms", *g["arms"]]
        cmd += [a for a in g.get("history", []) if (ROOT / "runs/bench" / group / f"{a}.json").exists()]
        cmd += g["args"]
        if args.report_only:
            cmd.append("--report-only")
        subprocess.run(cmd, check=True, cwd=ROOT)

    payload: dict = {"goals": GOALS, "groups": {}}
    md = [
        "# levers: every ablation arm on the shipped base model (issue 4)",
        "",
        "Rank-8 LoRA, lr 2e-3 cosine, batch 64, trained on digits 0-7 with the same seed; judged on digits"
        " 0-9 with N = 128 images per digit, guidance 2, 25 DDIM steps, hue judge. dev = |red share − target"
        " red|. Per-digit shares: the group's own table (`<group>.md`). Train s: wall time of the whole"
        " `fairtune fit` process; × naive: against the naive arm of the same group (same machine load).",
    ]
    for group in GROUPS:
        path = RESULTS / f"{group}.json"
        if not path.exists():
            continue
        res = json.loads(path.read_text())
        payload["groups"][group] = res
        arms = res["arms"]
        md += ["", f"## {group} ({res['steps']} steps, target red {res['target'][0]:.2f})", "", *table(arms)]
        if "all" in arms and "base" in arms:
            md += ["", f"Goals for `all` ({GOALS}):", ""]
            md += [
                f"- {line}"
                for line in goal_check(arms["all"], arms["base"], GROUPS[group].get("timed_together", False))
            ]
        if GROUPS[group].get("timing_note"):
            md += ["", "Timing: " + GROUPS[group]["timing_note"]]
    short, full = payload["groups"].get("chain_short"), payload["groups"].get("chain_full")
    if short and full and "fairness" in short["arms"] and "fairness" in full["arms"]:
        s, f = short["arms"]["fairness"], full["arms"]["fairness"]
        ratio = f["train_seconds"] / s["train_seconds"]
        payload["chain_time_ratio"] = ratio
        md += [
            "",
            f"Full chain (15 differentiable DDIM steps) vs short path (3 steps), {CHAIN_STEPS} steps each: "
            f"mean dev seen {f['mean_dev_seen']:.3f} vs {s['mean_dev_seen']:.3f}, training "
            f"{f['train_seconds']:.0f} s vs {s['train_seconds']:.0f} s ({ratio:.2f}×).",
        ]
    write_results("levers", payload, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
