"""Issue 15: the debiased adapter against the sampling-noise floor, over seeds; lever 2's forms.

    python benchmarks/noise_floor.py search      # noise_floor_search.yaml: the candidates, seed 0
    python benchmarks/noise_floor.py final       # noise_floor.yaml: its arms over its seeds, with the goals
    python benchmarks/noise_floor.py target_30_70  # noise_floor_30_70.yaml: the demo's arm, 30/70, 3 seeds
    python benchmarks/noise_floor.py adversary   # adversary_forms.yaml over its seeds, paired vs naive
    python benchmarks/noise_floor.py removal     # adversary_removal.yaml: `all` without lever 2, paired
    python benchmarks/noise_floor.py concepts    # fairness_concepts.yaml: lever 3 prompting digits 0-9
    python benchmarks/noise_floor.py classes     # three_class.yaml and joint.yaml over their seeds
    python benchmarks/noise_floor.py all --workers 6

``search`` writes ``benchmarks/specs/noise_floor.yaml`` from the candidate closest to the goals (mean
over the goals of value / bound, on seed 0); ``final`` runs that spec on seeds the search never saw,
so the reported figures are not selected on. Each writes ``benchmarks/results/<name>.{json,md}``:
per arm, the mean and the 95% Student-t interval over seeds of every metric, and the goals.

Runs are ``fairtune sweep``'s (skipped when done, resumed when cut off) in ``runs/bench``;
``--overrides '{"trainer.accelerator": "gpu"}'`` adds values to every run (benchmarks/gpu/noise_floor.sh).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Literal

import numpy as np
import yaml

from _common import FAIRNESS_COLUMNS, RESULTS, ROOT, ensure_assets, goal_rows, interval_cell, write_results
from fairtune.cli import load_spec, read_status, run_sweep
from fairtune.eval import Goal, check_goal, seed_summary

OUT = ROOT / "runs" / "bench"
SPECS = ROOT / "benchmarks" / "specs"
SEARCH = SPECS / "noise_floor_search.yaml"
FINAL = SPECS / "noise_floor.yaml"
ADVERSARY = SPECS / "adversary_forms.yaml"
REMOVAL = SPECS / "adversary_removal.yaml"
CONCEPTS = SPECS / "fairness_concepts.yaml"
TARGET_SPEC = SPECS / "noise_floor_30_70.yaml"
K3BG_DATA = ROOT / "configs/data/colored_digits_k3bg.yaml"
CLASSES = {"three_class": SPECS / "three_class.yaml", "joint": SPECS / "joint.yaml"}
FINAL_SEEDS = [1, 2, 3]
TARGET_30_70 = "configs/targets/red30_blue70.yaml"

# Issue 15's goals, per target, as a sweep spec writes them (every trained arm against its base row),
# checked by the one goal check, fairtune.eval.check_goals.
GOALS = [
    {"metric": "mean_dev_seen", "max": 0.04},
    {"metric": "worst_dev_seen", "max": 0.10},
    {"metric": "mean_dev_heldout", "max": 0.06},
    {"metric": "mean_dev_paraphrase", "max": 0.06},
    {"metric": "fidelity", "relative_to": "base", "min": -0.01},
    {"metric": "frechet", "relative_to": "base", "as": "ratio", "max": 1.10},
    {"metric": "undetermined_rate", "max": 0.005},
]
COLUMNS = [
    *FAIRNESS_COLUMNS,
    ("undetermined_rate", "mixed/undetermined", 4),
    ("explicit_follow", "explicit kept", 3),
    ("train_seconds", "train s", 0),
]


def seed_metrics(spec, out: Path = OUT) -> dict[str, dict[int, dict]]:
    """Per arm, per seed: the judged metrics of every finished run."""
    arms: dict[str, dict[int, dict]] = {}
    for run in spec.runs:
        s = read_status(out / "runs" / run.hash)
        if s.get("state") == "done":
            arms.setdefault(run.arm, {})[run.seed] = {"run": str(out / "runs" / run.hash), **s["metrics"]}
    return arms


def table(arms: dict[str, dict[int, dict]]) -> dict[str, dict[str, dict]]:
    """Per arm, per metric: :func:`fairtune.eval.seed_summary` over seeds."""
    return {
        arm: {key: seed_summary([r.get(key) for r in runs.values()]) for key, _, _ in COLUMNS}
        for arm, runs in arms.items()
    }


def check(row: dict[str, dict], base: dict[str, dict]) -> list[dict]:
    """Issue 15's goals (:data:`GOALS`) for one arm's means against its base row (:func:`goal_rows`)."""
    return goal_rows(GOALS, row, base)


def closeness(goals: list[dict]) -> float:
    """How far from every goal an arm is: the mean over goals of value / bound (1 = on the bounds)."""
    r = [g["ratio"] for g in goals if g["ratio"] is not None]
    return float(np.mean([max(x, 0.0) for x in r])) if r else math.inf


def markdown(title: str, rows: dict[str, dict], notes: list[str]) -> list[str]:
    lines = [f"# {title}", "", "| arm | n | " + " | ".join(c for _, c, _ in COLUMNS) + " |"]
    lines.append("|---|---|" + "---|" * len(COLUMNS))
    for arm, row in rows.items():
        n = max(s["n"] for s in row.values())
        lines.append(f"| {arm} | {n} | " + " | ".join(interval_cell(row[k], d) for k, _, d in COLUMNS) + " |")
    return lines + [""] + notes


def _copy_grids(arms: dict[str, dict[int, dict]], name: str) -> None:
    for arm, runs in arms.items():
        grid = Path(runs[min(runs)]["run"]) / "samples.png"
        if grid.is_file():
            shutil.copyfile(grid, RESULTS / f"{name}_{arm}_samples.png")


# What main() was given, for every step: (workers, overrides, judge options, report only).
SETTINGS: dict = {
    "workers": 1,
    "overrides": None,
    "judge_options": None,
    "report_only": False,
    "machine": None,
}


def _run(spec_path: Path):
    """Run (or, with ``report_only``, only read) a spec: the spec, its runs' metrics per arm and seed,
    and their per-arm summary."""
    spec = load_spec(spec_path, overrides=SETTINGS["overrides"])
    if SETTINGS["judge_options"] and spec.judge:
        spec.judge["options"].update(SETTINGS["judge_options"])
    if not SETTINGS["report_only"]:
        ensure_assets()
        run_sweep(spec, OUT, workers=SETTINGS["workers"], aggregate=False)
    arms = seed_metrics(spec)
    return spec, arms, table(arms)


def search() -> dict:
    """Run the candidates on seed 0, pick the one closest to the goals, write the final spec."""
    spec, arms, rows = _run(SEARCH)
    base = rows.get("base", {})
    goals = {a: check(r, base) for a, r in rows.items() if a != "base"}
    score = {a: closeness(g) for a, g in goals.items()}
    if not score:
        raise SystemExit("no candidate finished: nothing to choose from")
    winner = min(score, key=score.get)
    raw = yaml.safe_load(SEARCH.read_text())
    arm = raw["arms"][winner]
    configs, values = list(arm["configs"]), dict(arm.get("values") or {})
    final = {
        "name": "noise_floor",
        "base": raw["base"],
        "arms": {  # the base model is judged once (seed 0: its images do not depend on a training seed)
            "base": {"configs": [], "train": False, "seeds": [0]},
            "debiased": {"configs": configs, "values": values},
            "base_30_70": {"configs": [TARGET_30_70], "train": False, "seeds": [0]},
            "debiased_30_70": {"configs": [*configs, TARGET_30_70], "values": dict(values)},
        },
        "seeds": FINAL_SEEDS,
        "overrides": raw["overrides"],
        "judge": raw["judge"],
        "report": raw["report"],
    }
    header = (
        "# Issue 15, step 2 (written by `python benchmarks/noise_floor.py search`, do not edit): the\n"
        f"# candidate closest to the goals on seed 0 ({winner}, mean goal ratio {score[winner]:.3f}),\n"
        f"# trained on seeds {FINAL_SEEDS} (never seen by the choice) for the uniform and the 30/70 target.\n"
        "#   python benchmarks/noise_floor.py final\n"
    )
    FINAL.write_text(header + yaml.safe_dump(final, sort_keys=False, width=110))
    lines = markdown(
        f"noise_floor_search: the candidates, seed 0, uniform target (spec `{SEARCH.relative_to(ROOT)}`)",
        rows,
        [
            "Each arm's mean goal ratio (value / bound, averaged over the seven goals of issue 15; the "
            "winner has the lowest): "
            + ", ".join(f"{a} {s:.3f}" for a, s in sorted(score.items(), key=lambda x: x[1]))
            + f". Winner: **{winner}**, written to `{FINAL.relative_to(ROOT)}`.",
            "",
            _columns_note(),
        ],
    )
    _copy_grids(arms, "noise_floor_search")
    payload = {"spec": str(SEARCH.relative_to(ROOT)), "arms": rows, "goals": goals, "score": score,
               "winner": winner, "seeds": {a: sorted(r) for a, r in arms.items()}}  # fmt: skip
    write_results("noise_floor_search", payload, "\n".join(lines) + "\n")
    return payload


def _columns_note(columns: str | None = None) -> str:
    """Where the runs ran, then what the columns mean (``columns``, default the demo's judging)."""
    where = f"Measured on {SETTINGS['machine']}. " if SETTINGS["machine"] else ""
    return where + (columns or DEMO_COLUMNS)


DEMO_COLUMNS = (
    "Columns: mean and 95% Student-t interval over seeds (one seed: the value). dev = max over inks "
    "of |share − target| per digit, N = 128 per digit, 15 DDIM steps, guidance 2, the hue judge; "
    "seen = digits 0-7 (trained), held-out = 8-9, paraphrase = 'a drawing of the number {d}' for "
    "1, 3, 5, 7; mixed/undetermined = images the hue judge cannot place, over every neutral and "
    "paraphrased image; explicit kept = share of 'a {red|blue} handwritten digit {d}' images "
    "judged in the named ink (32 per prompt). Train s: wall time of `fairtune fit`."
)


def final() -> dict:
    """The winner over three seeds, both targets, with the goals."""
    if not FINAL.is_file():
        raise SystemExit(f"{FINAL} is missing: run `python benchmarks/noise_floor.py search` first")
    return _goals_report(FINAL, "noise_floor", "the debiased adapter")


def target_30_70() -> dict:
    """The demo's arm over three seeds at the 30/70 target, with the goals."""
    return _goals_report(TARGET_SPEC, "noise_floor_30_70", "the demo's adapter at the 30/70 target")


def _ensure_k3bg() -> None:
    """Render the three-ink, two-background data and train its judges, if missing."""
    from fairtune.colored_digits import ColoredDigitsConfig, build_colored_digits, train_judges

    data, judges = ROOT / "runs/data/colored-digits-16-k3bg", ROOT / "runs/judges/colored-digits-16-k3bg"
    if not (data / "stats.json").exists():
        build_colored_digits(ColoredDigitsConfig(**yaml.safe_load(K3BG_DATA.read_text())), data)
    if not (judges / "judges.json").exists():
        train_judges(data, judges)


def classes() -> dict:
    """The three-ink and the colour x background targets on the three-ink base model, over seeds (the
    per-digit share tables of their first seed are ``benchmarks/arms.py``'s)."""
    if not SETTINGS["report_only"]:
        _ensure_k3bg()
    note = (
        "Columns: mean and 95% Student-t interval over seeds (one seed: the value). dev = max over the "
        "target's groups of |share − target| per digit, N = 128 per digit, 25 DDIM steps, guidance 2, "
        "the hue judge (ink; the joint target adds the background judge); seen = digits 0-7 (trained), "
        "held-out = 8-9; "
        "undetermined = images the judges cannot place. No paraphrase or explicit prompts are judged "
        "here. Train s: wall time of `fairtune fit`."
    )
    return {
        name: _goals_report(path, f"{name}_seeds", f"the {name.replace('_', '-')} target", note)
        for name, path in CLASSES.items()
    }


def _goals_report(spec_path: Path, name: str, title: str, note: str | None = None) -> dict:
    """Every trained arm of a spec over its seeds, with issue 15's goals against the base row of its
    target (``*_30_70`` against ``base_30_70``, the others against ``base``)."""
    spec, arms, rows = _run(spec_path)
    goals = {
        arm: check(row, rows.get("base_30_70" if arm.endswith("_30_70") else "base", {}))
        for arm, row in rows.items()
        if not arm.startswith("base")
    }
    notes = [_columns_note(note), ""]
    for target, gs in goals.items():
        notes += [f"Goals, {target} (its mean over seeds, against its target's base row):", ""]
        for g in gs:
            verdict = "not measured" if g["met"] is None else "met" if g["met"] else "**missed**"
            val = "" if g["value"] is None else f"{g['value']:.4g}"
            notes.append(f"- {g['metric']} = {val} (goal {g['goal']}): {verdict}")
        notes.append("")
    seeds = sorted({r.seed for r in spec.runs if r.train})
    lines = markdown(
        f"{name}: {title} over seeds {seeds} (spec `{spec_path.relative_to(ROOT)}`)", rows, notes
    )
    _copy_grids(arms, name)
    payload = {"spec": str(spec_path.relative_to(ROOT)), "arms": rows, "goals": goals,
               "per_seed": arms}  # fmt: skip
    write_results(name, payload, "\n".join(lines) + "\n")
    return payload


def _paired(arms: dict[str, dict[int, dict]], reference: str, arm: str, key: str) -> dict:
    """``arm`` minus ``reference`` on one metric, paired by seed: the differences' seed summary."""
    ref, runs = arms.get(reference, {}), arms.get(arm, {})
    diffs = [runs[s][key] - ref[s][key] for s in sorted(runs) if s in ref
             and runs[s].get(key) is not None and ref[s].get(key) is not None]  # fmt: skip
    return seed_summary(diffs)


def adversary() -> dict:
    """Lever 2's forms over seeds, each paired by seed with the naive arm."""
    spec, arms, rows = _run(ADVERSARY)
    forms = [arm for arm in arms if arm not in ("naive", "base")]
    paired = {arm: _paired(arms, "naive", arm, "mean_dev_seen") for arm in forms}
    notes = [_columns_note(), "", "Mean dev seen minus the naive arm's, paired by seed (goal ≤ −0.05, "
             "interval excluding 0):", ""]  # fmt: skip
    for arm, s in paired.items():
        # met: the mean at most -0.05 and its interval below 0
        met = bool(check_goal(Goal("mean_dev_seen", "<=", -0.05), s["mean"])["met"])
        met = met and s["ci"] is not None and s["ci"][1] < 0
        notes.append(f"- {arm}: {interval_cell(s, 3)} over {s['n']} seeds: {'met' if met else '**missed**'}")
    lines = markdown(
        f"adversary_forms: lever 2 alone, its forms (spec `{ADVERSARY.relative_to(ROOT)}`)", rows, notes
    )
    _copy_grids(arms, "adversary_forms")
    payload = {"spec": str(ADVERSARY.relative_to(ROOT)), "arms": rows, "paired_vs_naive": paired,
               "per_seed": arms}  # fmt: skip
    write_results("adversary_forms", payload, "\n".join(lines) + "\n")
    return payload


def _against(spec_path: Path, name: str, reference: str, title: str, intro: str) -> dict:
    """Every trained arm of a spec minus ``reference``, paired by seed, on every column; and each
    arm's goals against the base row."""
    spec, arms, rows = _run(spec_path)
    others = [a for a in arms if a not in (reference, "base")]
    paired = {a: {key: _paired(arms, reference, a, key) for key, _, _ in COLUMNS} for a in others}
    goals = {a: check(rows[a], rows.get("base", {})) for a in [reference, *others] if a in rows}
    notes = [_columns_note(), "", intro, ""]
    for arm in others:
        notes.append(f"`{arm}` minus `{reference}`:")
        for key, label, digits in COLUMNS:
            s = paired[arm][key]
            if s["mean"] is None:
                continue
            measurable = s["ci"] is not None and (s["ci"][0] > 0 or s["ci"][1] < 0)
            notes.append(f"- {label}: {interval_cell(s, digits + 1)} over {s['n']} seeds"
                         + (" (measurable)" if measurable else " (interval includes 0)"))  # fmt: skip
        notes.append("")
    for arm, gs in goals.items():
        met = [g["metric"] for g in gs if g["met"]]
        missed = [f"{g['metric']} {g['value']:.4g} (goal {g['goal']})" for g in gs if g["met"] is False]
        notes.append(
            f"Issue 15's goals, `{arm}`: met {', '.join(met) or 'none'}; "
            f"missed {'; '.join(missed) or 'none'}."
        )
    lines = markdown(f"{name}: {title} (spec `{spec_path.relative_to(ROOT)}`)", rows, notes)
    _copy_grids(arms, name)
    payload = {"spec": str(spec_path.relative_to(ROOT)), "arms": rows, "reference": reference,
               "minus_reference": paired, "goals": goals, "per_seed": arms}  # fmt: skip
    write_results(name, payload, "\n".join(lines) + "\n")
    return payload


def removal() -> dict:
    """What removing the adversary from ``all`` costs: ``sampler_fairness`` minus ``all``, paired by seed,
    on every column (a cost is a positive difference in a deviation or Fréchet, negative in fidelity)."""
    return _against(
        REMOVAL, "adversary_removal", "all", "the demo's adapter with and without lever 2",
        "Without the adversary (`sampler_fairness`) minus with it (`all`), paired by seed, mean and 95% "
        "Student-t interval of the differences; an interval that excludes 0 is a measurable change.",
    )  # fmt: skip


def concepts() -> dict:
    """The fairness loss prompting every digit (0-9), against the demo's ``all``, paired by seed."""
    return _against(
        CONCEPTS, "fairness_concepts", "all", "the fairness loss beyond the trained digits",
        "Each arm minus the demo's arm (`all`), paired by seed, mean and 95% Student-t interval of the "
        "differences; an interval that excludes 0 is a measurable change.",
    )  # fmt: skip


def main(
    step: Literal["search", "final", "target_30_70", "adversary", "removal", "concepts", "classes", "all"],
    *,
    workers: int = 1,
    overrides: dict | None = None,
    judge_options: dict | None = None,
    report_only: bool = False,
    machine: str | None = None,
) -> None:
    """Run one step (or ``all``: every one, in this order: search, final, target_30_70, adversary, removal,
        concepts, classes).

    Args:
        step: Which benchmark.
        workers: Runs trained at the same time.
        overrides: Values added to every run (e.g. ``{"trainer.accelerator": "gpu"}``).
        judge_options: Judge options replacing the spec's (a quick dry run).
        report_only: Tabulate the finished runs; train and judge nothing.
        machine: Where the runs ran, for the report (e.g. ``"one H200, 6 runs at a time"``).
    """
    SETTINGS.update(
        workers=workers,
        overrides=overrides,
        judge_options=judge_options,
        report_only=report_only,
        machine=machine,
    )
    if step in ("search", "all"):
        search()
    if step in ("final", "all"):
        final()
    if step in ("target_30_70", "all"):
        target_30_70()
    if step in ("adversary", "all"):
        adversary()
    if step in ("removal", "all"):
        removal()
    if step in ("concepts", "all"):
        concepts()
    if step in ("classes", "all"):
        classes()
    print(json.dumps({"results": str(RESULTS)}))


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main, as_positional=True)
