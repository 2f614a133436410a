"""A benchmark group: a sweep spec (``benchmarks/specs/*.yaml``) run by the sweep runner, tabulated
per digit into ``benchmarks/results/<name>.{json,md}`` with the spec's goals.

    python benchmarks/arms.py benchmarks/specs/sampler.yaml            # issue 3
    python benchmarks/arms.py benchmarks/specs/levers_uniform.yaml     # one group of issue 4
    python benchmarks/arms.py benchmarks/specs/sampler.yaml --report_only true
    python benchmarks/levers.py                                        # every levers group + summary

Training, skipping what is done, resuming what was cut off and judging are ``fairtune sweep``'s
(the same runner, the same judge function, the same scoring engine). Runs live in
``runs/bench/runs/<hash>``: a run that two specs share (the same configs, values and seed) is trained
once.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import yaml

from _common import JUDGES, RESULTS, ROOT, cell, ensure_assets, write_results
from fairtune.cli import check_goals, load_spec, read_status, run_sweep
from fairtune.eval import Goal

OUT = ROOT / "runs" / "bench"


def share_groups(arms: dict[str, dict]) -> list[str]:
    """The target groups whose per-digit shares the judge reported (``red``, ``green+dark``), in order."""
    groups: list[str] = []
    for r in arms.values():
        for k in r:
            m = re.fullmatch(r"(.+)_share_d\d+", k)
            if m and m.group(1) not in groups:
                groups.append(m.group(1))
    return groups


def tabulate(spec, out: Path) -> tuple[dict, list[str]]:
    """Per arm: the judge's metrics (first seed), share per digit of each target group, train time; and
    the markdown. With two groups the first group's share per digit is in the main table; with more
    (three inks, a joint target) every group's share per digit is in a second table."""
    arms: dict[str, dict] = {}
    for run in spec.runs:
        s = read_status(out / "runs" / run.hash)
        if run.arm in arms or s.get("state") != "done":
            continue
        arms[run.arm] = {"run": str(out / "runs" / run.hash), "seed": run.seed, **(s.get("metrics") or {})}
    naive_s = (arms.get("naive") or {}).get("train_seconds")
    for r in arms.values():
        if naive_s and r.get("train_seconds"):
            r["time_ratio_vs_naive"] = r["train_seconds"] / naive_s
    opts = (spec.judge or {}).get("options", {})
    groups = share_groups(arms) or ["red"]
    inline = len(groups) <= 2  # one share per digit says it all
    digit_cols = [f"d{d}" for d in range(10)] if inline else []
    lines = [
        f"# {spec.name}: N={opts.get('n_per_prompt', 128)} per digit, {opts.get('steps', 25)} DDIM steps, "
        f"guidance {opts.get('guidance_scale', 2.0)}, hue judge (spec `{spec.path.relative_to(ROOT)}`)",
        "",
        "| arm | "
        + "".join(f"{c} | " for c in digit_cols)
        + "mean dev seen | worst seen | mean dev held-out | fidelity | Fréchet | undetermined"
        + " | train s | × naive | peak MB |",
        "|---|" + "---|" * len(digit_cols) + "---|---|---|---|---|---|---|---|---|",
    ]
    for arm, r in arms.items():
        shares = [r.get(f"{groups[0]}_share_d{d}") for d in range(10)] if inline else []
        lines.append(
            f"| {arm} | "
            + "".join(f"{cell(x, 2)} | " for x in shares)
            + f"{cell(r.get('mean_dev_seen'))} | {cell(r.get('worst_dev_seen'))}"
            + f" | {cell(r.get('mean_dev_heldout'))} | {cell(r.get('fidelity'))}"
            + f" | {cell(r.get('frechet'), 1)}"
            + f" | {int(r.get('undetermined', 0))}/{int(r.get('n_images', 0))}"
            + f" | {cell(r.get('train_seconds'), 0)} | {cell(r.get('time_ratio_vs_naive'), 2)}"
            + f" | {cell(r.get('peak_rss_mb'), 0)} |"
        )
    if inline:
        g0 = groups[0]
        what = f"Columns d0-d9: {g0} share per digit. dev = max over groups of |share − target| (for two "
        what += f"groups |{g0} share − target {g0}|)"
    else:
        lines += ["", "Share of each group per digit (target in brackets):", ""]
        lines += ["| arm | group | " + " | ".join(f"d{d}" for d in range(10)) + " |"]
        lines += ["|---|---|" + "---|" * 10]
        target = _target_shares(spec, groups)
        for arm, r in arms.items():
            for g in groups:
                shares = [r.get(f"{g}_share_d{d}") for d in range(10)]
                tq = f" [{target[g]:.2f}]" if g in target else ""
                lines.append(f"| {arm} | {g}{tq} | " + " | ".join(cell(x, 2) for x in shares) + " |")
        what = f"dev = max over the {len(groups)} groups of |share − target|"
    lines += [
        "",
        f"{what}; seen = the digits the arm trained on. Train s: wall time of the whole "
        "`fairtune fit` process; × naive against the naive arm of this spec (same machine load only when "
        "they ran together).",
    ]
    rows = [{"arm_name": a, **{f"{k}_mean": v for k, v in r.items()}} for a, r in arms.items()]
    goals = check_goals(spec, rows)
    if goals:
        lines += ["", "Goals:", ""]
        for g in goals:
            ref = f" vs {g['relative_to']}" if g.get("relative_to") else ""
            bound = Goal.from_mapping(g).text
            verdict = (
                "not measured"
                if g["met"] is None
                else "met"
                if g["met"]
                else f"missed by {g['missed_by']:.3g}"
            )
            lines.append(f"- {g['arm']} {g['metric']}{ref} = {cell(g['value'])} (goal {bound}): {verdict}")
    return {"spec": str(spec.path.relative_to(ROOT)), "arms": arms, "goals": goals}, lines


def _target_shares(spec, groups: list[str]) -> dict[str, float]:
    """The spec's target proportion of each group (same for every digit), from the arms' resolved config."""
    from fairtune.data import AttributeSpec, Target, TargetConfig

    for run in spec.runs:
        cfg_file = OUT / "runs" / run.hash / "config.yaml"
        if cfg_file.is_file():
            data = (yaml.safe_load(cfg_file.read_text()) or {}).get("data") or {}
            if data.get("attributes") and data.get("target"):
                t = Target(TargetConfig(**data["target"]), AttributeSpec(data["attributes"]))
                if t.groups == groups:
                    return dict(zip(t.groups, t.proportions()))
    return {}


def _check_assets(spec) -> None:
    """The default benchmark's data and judges are made when missing; a spec naming other judges or a
    reference must find them (made by the commands in the spec's header)."""
    opts = (spec.judge or {}).get("options", {})
    judges = ROOT / opts.get("judges", str(JUDGES.relative_to(ROOT)))
    reference = opts.get("reference")
    if judges.resolve() == JUDGES.resolve():
        ensure_assets()
        return
    missing = [str(p) for p in (judges / "judges.json",) if not p.is_file()]
    if reference and not (ROOT / reference / "stats.json").is_file():
        missing.append(str(ROOT / reference / "stats.json"))
    if missing:
        raise SystemExit(
            f"{spec.path}: missing {', '.join(missing)}; make them with the commands in the spec's header"
        )


def main(spec: Path, *, report_only: bool = False, workers: int = 1) -> dict:
    """Run (or resume) one benchmark spec and write its results.

    Args:
        spec: A sweep spec in ``benchmarks/specs/``.
        report_only: Tabulate the finished arms; train and judge nothing.
        workers: Runs trained at the same time.
    """
    parsed = load_spec(spec)
    if not report_only:
        _check_assets(parsed)
        run_sweep(parsed, OUT, workers=workers, aggregate=False)
    payload, lines = tabulate(parsed, OUT)
    for arm, r in payload["arms"].items():
        grid = Path(r["run"]) / "samples.png"
        if grid.is_file():
            shutil.copyfile(grid, RESULTS / f"{parsed.name}_{arm}_samples.png")
    write_results(parsed.name, payload, "\n".join(lines) + "\n")
    return payload


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main, as_positional=True)
    print(json.dumps({"results": str(RESULTS)}))
