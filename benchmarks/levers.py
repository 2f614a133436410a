"""The levers benchmark (issue 4): every ablation arm on the shipped base model with the uniform target
and with 30% red / 70% blue, plus lever 3's short differentiable path against the full sampling chain.

    python benchmarks/levers.py                      # trains what is missing (hours on 2 CPU cores)
    python benchmarks/levers.py --report_only true   # re-tabulate the finished arms

Each group is a sweep spec in ``benchmarks/specs/`` run by ``benchmarks/arms.py`` (its own table in
``benchmarks/results/<group>.md``, its goals from the spec); this script writes the summary
``benchmarks/results/levers.{json,md}``.
"""

from __future__ import annotations

import arms as group_runner

from _common import ROOT, cell, write_results
from fairtune.eval import Goal

GROUPS = ["levers_uniform", "levers_30_70", "chain_short", "chain_full"]


def table(arms: dict) -> list[str]:
    lines = [
        "| arm | mean dev seen | worst seen | mean dev held-out | fidelity | Fréchet | undetermined "
        "| train s | × naive |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, r in arms.items():
        lines.append(
            f"| {arm} | {cell(r.get('mean_dev_seen'))} | {cell(r.get('worst_dev_seen'))}"
            f" | {cell(r.get('mean_dev_heldout'))} | {cell(r.get('fidelity'))} | {cell(r.get('frechet'), 1)}"
            f" | {int(r.get('undetermined', 0))}/{int(r.get('n_images', 0))}"
            f" | {cell(r.get('train_seconds'), 0)} | {cell(r.get('time_ratio_vs_naive'), 2)} |"
        )
    return lines


def main(*, groups: list[str] = GROUPS, report_only: bool = False, workers: int = 1) -> dict:
    """Run (or resume) the levers groups and write their summary.

    Args:
        groups: Specs of ``benchmarks/specs/`` to run.
        report_only: Tabulate the finished arms; train and judge nothing.
        workers: Runs trained at the same time.
    """
    payload: dict = {"groups": {}}
    md = [
        "# levers: every ablation arm on the shipped base model (issue 4)",
        "",
        "Rank-8 LoRA, lr 2e-3 cosine, batch 64, trained on digits 0-7 with the same seed; judged on digits "
        "0-9 with N = 128 images per digit, guidance 2, 25 DDIM steps, hue judge. Per-digit shares: each "
        "group's own table (`<group>.md`); goals come from the group's spec.",
    ]
    for group in groups:
        res = group_runner.main(
            ROOT / "benchmarks" / "specs" / f"{group}.yaml", report_only=report_only, workers=workers
        )
        payload["groups"][group] = res
        md += ["", f"## {group} (`{res['spec']}`)", "", *table(res["arms"])]
        for g in res["goals"]:
            ref = f" vs {g['relative_to']}" if g.get("relative_to") else ""
            bound = Goal.from_mapping(g).text
            verdict = (
                "not measured"
                if g["met"] is None
                else ("met" if g["met"] else f"missed by {g['missed_by']:.3g}")
            )
            md.append(f"- {g['arm']} {g['metric']}{ref} = {cell(g['value'])} (goal {bound}): {verdict}")
    short = payload["groups"].get("chain_short", {}).get("arms", {}).get("fairness")
    full = payload["groups"].get("chain_full", {}).get("arms", {}).get("fairness")
    if short and full and short.get("train_seconds") and full.get("train_seconds"):
        ratio = full["train_seconds"] / short["train_seconds"]
        payload["chain_time_ratio"] = ratio
        md += [
            "",
            f"Full chain (15 differentiable DDIM steps) vs short path (3 steps): mean dev seen "
            f"{cell(full['mean_dev_seen'])} vs {cell(short['mean_dev_seen'])}, training "
            f"{full['train_seconds']:.0f} s vs {short['train_seconds']:.0f} s ({ratio:.2f}×).",
        ]
    write_results("levers", payload, "\n".join(md) + "\n")
    return payload


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main)
