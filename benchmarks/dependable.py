"""Issue 24: the demo's debiased adapter over training seeds, with the goals, and the README's
result table rendered from the committed results (never typed by hand).

    python benchmarks/dependable.py run        # train + judge the spec's seeds (skips finished runs)
    python benchmarks/dependable.py report     # tabulate the finished runs only
    python benchmarks/dependable.py readme     # rewrite the README's result block from the results file
    python benchmarks/dependable.py report --spec benchmarks/specs/distill_split.yaml   # any multi-seed spec

The spec (``benchmarks/specs/dependable.yaml``) trains the demo's arm (``configs/demo/sweep.yaml``'s
``debiased``: the same overlays and values, checked by a test) at 400 steps and judges it as
the demo judges. Results: ``benchmarks/results/dependable.{json,md}``: per arm, the mean and the 95%
Student-t interval over seeds of every column, each seed's value, and the goals.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path
from typing import Literal

from _common import RESULTS, ROOT, cell, goal_rows, interval_cell, spec_steps, write_results
from fairtune.colored_digits._demo import CHECKED as DEMO_CHECKED
from fairtune.eval import seed_summary

SPEC = ROOT / "benchmarks" / "specs" / "dependable.yaml"
NAME = "dependable"
README = ROOT / "README.md"
BEGIN, END = "<!-- dependable:begin -->", "<!-- dependable:end -->"
# The pair `fairtune demo` trains (its default: 200 steps per adapter), over seeds, and its results (in
# the README's block too). The 400-step pair (class_adapters_datafree_wordings.yaml) is in
# docs/benchmarks.md.
PAIR_SPEC = ROOT / "benchmarks" / "specs" / "class_adapters_datafree_wordings_200.yaml"
# The pair's results in the README: every adapter fused at the demo's scale
# (configs/compare/colored_digits.yaml's class_pair; a test checks they agree).
PAIR_SCALE = 1.5
PAIR_RESULTS = {
    f"class_pair x{PAIR_SCALE:g}": f"class_adapters_datafree_wordings_200_pair_x{PAIR_SCALE:g}.json",
}

# (metric key, header, decimals)
COLUMNS = [
    ("mean_dev_seen", "mean dev seen", 3),
    ("worst_dev_seen", "worst seen", 3),
    ("mean_dev_named", "named, no data", 3),
    ("mean_dev_unnamed", "never named", 3),
    ("mean_dev_paraphrase", "paraphrase", 3),
    ("explicit_follow", "explicit kept", 3),
    ("fidelity", "fidelity", 3),
    ("frechet", "Fréchet", 1),
    ("undetermined_rate", "mixed", 4),
    ("train_seconds", "train s", 0),
]
# Issue 24's goals: (metric, bound, kind). ``max``: mean <= bound; ``min``: mean >= bound; ``halfwidth``:
# the mean's 95% interval half-width <= bound; ``fid``: fidelity >= base - bound; ``frechet``:
# <= bound x base.
# Issue 24's goals, as a sweep spec writes them (``relative_to: base``: against the base row), each
# with its kind as the results name it; checked by _common.goal_rows (fairtune.eval.check_goals).
GOALS = [
    ({"metric": "mean_dev_seen", "max": 0.04}, "max"),
    ({"metric": "mean_dev_seen_halfwidth", "max": 0.01}, "halfwidth"),
    ({"metric": "worst_dev_seen", "max": 0.10}, "max"),
    ({"metric": "mean_dev_paraphrase", "max": 0.06}, "max"),
    ({"metric": "mean_dev_named", "max": 0.06}, "max"),
    ({"metric": "mean_dev_unnamed", "max": 0.10}, "max"),
    ({"metric": "explicit_follow", "min": 0.98}, "min"),
    ({"metric": "fidelity", "relative_to": "base", "min": -0.01}, "fid"),
    ({"metric": "frechet", "relative_to": "base", "as": "ratio", "max": 1.10}, "frechet"),
    ({"metric": "undetermined_rate", "max": 0.005}, "max"),
]
NOTE = (
    "Columns: mean and 95% Student-t interval over training seeds (one seed: the value). dev = max over "
    "inks of |share − target| per digit, N = 128 images per digit, 15 DDIM steps, guidance 2, the hue "
    "judge; seen = digits 0-7 (trained with images); named, no data = digit 8 (named in the distillation "
    "prompts, no training image); never named = digit 9; paraphrase = 'a drawing of the number {d}' for 1, "
    "3, 5, 7 (a wording never trained); explicit kept = share of 'a {red|blue} handwritten digit {d}' "
    "images judged in the named ink (digits 0-7, 32 per prompt); mixed = images the hue judge cannot "
    "place; train s = wall time of `fairtune fit` (bank generation included). The JSON also holds, per "
    "column, `range`: the 95% prediction interval of one more seed's run (what `fairtune demo` checks its "
    "own figures against)."
)


SWEEP_PAIR_NOTE = NOTE + (
    " Judged by the sweep's judge (`--judge sweep`), as every pair before the demo's path existed; "
    "`--judge compare` (the default) judges with the demo's own comparison."
)
PAIR_NOTE = (
    "The pair's row is measured by the demo's comparison (configs/compare/colored_digits.yaml at the "
    "demo's budget: N = 128 images per prompt, 15 DDIM steps, guidance 2, the hue judge; "
    "`fairtune.colored_digits.demo_compare_config`), the path `fairtune demo` measures its own pair "
    "with: seen = digits 0-7, named, no data = digit 8, never named = digit 9, paraphrase = 'a drawing "
    "of the number {d}' for 1, 3, 5, 7, explicit kept = 'a {red|blue} handwritten digit {d}' for 0 and "
    "7 (128 each). The base and single-adapter rows are dependable.json's (the sweep's judge: explicit "
    "prompts for digits 0-7, 32 each). `range` in the JSON: the 95% prediction interval of one more "
    "run, `mean ± √((t·sd·√(1 + 1/n))² + (z·s)²)` with `s` the figure's spread over resamples of a "
    "run's own images (`sampling_sd`: `fairtune.eval.sampling_sd`, root mean square over seeds; "
    "docs/metrics.md): what `fairtune demo` checks its figures against."
)


# Where each column can lie (its range of one run is clipped to it): shares and deviations in [0, 1].
BOUNDS = {k: (0.0, 1.0) for k, _, _ in COLUMNS if k not in ("frechet", "train_seconds")} | {
    "frechet": (0.0, float("inf"))
}


def pooled_sd(sds) -> float | None:
    """The root mean square of per-seed standard deviations (``None`` where none is given)."""
    v = [float(x) for x in sds if x is not None]
    return (sum(x * x for x in v) / len(v)) ** 0.5 if v else None


def sampling_floor(n: int = 128) -> float:
    """E|p̂ − ½| of a perfectly balanced two-class model judged on ``n`` images: the mean dev seen a
    flawless adapter would still score."""
    from scipy import stats

    k = range(n + 1)
    return float(sum(stats.binom.pmf(i, n, 0.5) * abs(i / n - 0.5) for i in k))


def floor_note(row: dict) -> str:
    """Where the residual stands against sampling noise, and how much of it moves with the seed."""
    s = row.get("mean_dev_seen") or {}
    floor = sampling_floor()
    text = f"Sampling floor at N = 128: a perfectly balanced model scores mean dev {floor:.3f} on average."
    vals = s.get("values") or []
    if len(vals) > 1:
        import numpy as np

        text += (
            f" Over seeds, mean dev seen runs {min(vals):.3f}-{max(vals):.3f} "
            f"(sd {np.std(vals, ddof=1):.3f}): {s['mean'] - floor:+.3f} above the floor on average."
        )
    return text


def goal_checks(row: dict, base: dict) -> list[dict]:
    """Issue 24's goals (:data:`GOALS`) for one arm's summary against the base row
    (:func:`goal_rows`; the ``halfwidth`` goal on the half-width of the mean's interval)."""
    rows = goal_rows([g for g, _ in GOALS], row, base)
    return [
        {"metric": r["metric"].removesuffix("_halfwidth"), "kind": kind,
         "value": None if r["value"] is None else float(r["value"]), "goal": r["goal"], "met": r["met"]}
        for (_, kind), r in zip(GOALS, rows)
    ]  # fmt: skip


def table_lines(rows: dict[str, dict], columns=COLUMNS) -> list[str]:
    lines = ["| arm | seeds | " + " | ".join(c for _, c, _ in columns) + " |"]
    lines.append("|---|---|" + "---|" * len(columns))
    for arm, row in rows.items():
        n = max((s.get("n", 0) for s in row.values()), default=0)
        lines.append(
            f"| {arm} | {n} | " + " | ".join(interval_cell(row.get(k), d) for k, _, d in columns) + " |"
        )
    return lines


def report(run: bool = False, workers: int = 1, spec_path: Path = SPEC) -> dict:
    """Run (with ``run``) and tabulate a spec over its seeds; write ``benchmarks/results/<name>.{json,md}``
    (``dependable`` for the default spec; any other multi-seed spec, e.g. a variant tried against it,
    gets the same table, intervals and goals)."""
    from noise_floor import OUT, seed_metrics

    from fairtune.cli import load_spec, run_sweep

    spec = load_spec(spec_path)
    name = spec.name
    if run:
        from _common import ensure_assets

        ensure_assets()
        run_sweep(spec, OUT, workers=workers, aggregate=False)
    arms = seed_metrics(spec, OUT)
    rows = {
        arm: {
            key: seed_summary([r.get(key) for _, r in sorted(runs.items())], prediction=True)
            for key, _, _ in COLUMNS
        }
        for arm, runs in arms.items()
    }
    goals = {arm: goal_checks(row, rows.get("base", {})) for arm, row in rows.items() if arm != "base"}
    seeds = sorted({r.seed for r in spec.runs if r.train})
    what = "the demo's debiased adapter" if name == NAME else "arms"
    spec_rel = Path(spec.path).resolve().relative_to(ROOT)
    lines = [f"# {name}: {what} over seeds {seeds} (spec `{spec_rel}`)", ""]
    main_arm = "debiased" if "debiased" in rows else next((a for a in rows if a != "base"), "base")
    lines += table_lines(rows) + ["", NOTE, "", floor_note(rows.get(main_arm, {})), ""]
    for arm, gs in goals.items():
        lines += [f"Issue 24's goals, `{arm}` (mean over seeds):", ""]
        for g in gs:
            verdict = "not measured" if g["met"] is None else "met" if g["met"] else "**missed**"
            val = "" if g["value"] is None else f"{g['value']:.4g}"
            label = g["metric"] + (" interval half-width" if g["kind"] == "halfwidth" else "")
            lines.append(f"- {label} = {val} (goal {g['goal']}): {verdict}")
        lines.append("")
    per_seed = {
        arm: {str(s): {k: r.get(k) for k, _, _ in COLUMNS} for s, r in sorted(runs.items())}
        for arm, runs in arms.items()
    }
    steps = spec_steps(spec)
    payload = {"spec": str(spec_rel), "steps": steps, "arms": rows, "goals": goals,
               "per_seed": per_seed}  # fmt: skip
    write_results(name, payload, "\n".join(lines) + "\n")
    return payload


Judge = Literal["compare", "sweep"]


def pair_key(spec, seed: int, target: str = "uniform", scale: float = 1.0, judge: Judge = "compare") -> str:
    """The identity of a seed's pair: its arms' run hashes (what each trains), the mix drawn, (when
    not 1) the scale the adapters are fused at, and ``-compare`` when judged by the demo's comparison
    (keys without it were judged by the sweep's judge)."""
    runs = {r.arm: r.hash for r in spec.runs if r.train and r.seed == seed}
    return (
        "-".join(runs[a] for a in sorted(runs))
        + f"-{target}"
        + ("" if scale == 1.0 else f"-x{scale:g}")
        + ("-compare" if judge == "compare" else "")
    )


def pair_name(spec, scale: float = 1.0) -> str:
    """The results file's stem: ``<spec>_pair``, ``<spec>_pair_x1.5`` for adapters fused at 1.5."""
    return f"{spec.name}_pair" + ("" if scale == 1.0 else f"_x{scale:g}")


def committed_row(
    spec,
    committed: dict[str, dict] | None,
    seed: int,
    target: str = "uniform",
    scale: float = 1.0,
    judge: Judge = "compare",
) -> dict | None:
    """A seed's committed pair figures when they belong to this spec's runs and judge (same
    ``pair_key``)."""
    row = (committed or {}).get(str(seed))
    key = pair_key(spec, seed, target, scale, judge)
    return row if row is not None and row.get("pair_key") == key else None


# The comparison's summary keys under the names of :data:`COLUMNS`: the demo's own mapping (its
# ``heldout`` role is the digit never named; ``explicit_kept`` the share of explicit prompts' images in
# the named ink).
FROM_COMPARE = {key: column for key, column, _ in DEMO_CHECKED if key != column}
# Bootstrap resamples of every seed's images: each figure's sampling spread, which widens the range a
# newcomer's run is checked against.
SAMPLING_BOOT = 100


def pair_row(summary: dict, per_concept: dict, classes: list[str]) -> dict:
    """A seed's row from the comparison's ``class_pair`` summary: the :data:`COLUMNS` figures, their
    ``sampling_sd`` and each neutral digit's share of every class (``red_share_d3``)."""
    keys = {k for k, _, _ in COLUMNS}
    row = {FROM_COMPARE.get(k, k): v for k, v in summary.items() if FROM_COMPARE.get(k, k) in keys}
    row["sampling_sd"] = {FROM_COMPARE.get(k, k): v for k, v in (summary.get("sampling_sd") or {}).items()}
    for rec in per_concept.values():
        if rec.get("role") in ("seen", "named", "heldout") and rec.get("p_hat") is not None:
            d = rec["concept"].split()[-1]
            row.update({f"{c}_share_d{d}": p for c, p in zip(classes, rec["p_hat"])})
    return row


def check_pair_judge(judge: Judge, target: str) -> None:
    """Raise where the judge cannot measure the request (before any training)."""
    if judge == "compare" and target != "uniform":
        raise ValueError("pair: the demo's comparison judges a uniform target; use --judge sweep")


def pair_compare_config(adapters: dict[str, Path], run_config: Path, scale: float):
    """The demo's comparison reduced to its ``class_pair`` method with ``adapters`` at ``scale``.

    Raises:
        ValueError: The adapters are not the pair's classes, or the runs trained on another base model.
    """
    import yaml

    from fairtune.colored_digits import demo_compare_config

    cfg = demo_compare_config(adapters, adapter_scale=scale)
    cfg.methods = [m for m in cfg.methods if m.name == "class_pair"]
    if not cfg.methods or set(cfg.methods[0].class_adapters) != set(adapters):
        raise ValueError(f"pair: the demo's class_pair draws red and blue; the spec has {sorted(adapters)}")
    trained_on = (yaml.safe_load(run_config.read_text())["model"]["backbone"] or {}).get("pretrained")
    if trained_on != cfg.backbone.pretrained:
        raise ValueError(
            f"pair: the runs trained on {trained_on!r}, the demo's comparison samples "
            f"{cfg.backbone.pretrained!r}; use --judge sweep"
        )
    return cfg


def pair_metrics(
    spec,
    out: Path,
    *,
    target: str = "uniform",
    committed: dict[str, dict] | None = None,
    scale: float = 1.0,
    judge: Judge = "compare",
) -> dict[int, dict]:
    """Per seed where every arm of ``spec`` (one per class, named after it) has trained: the base model
    with those class adapters fused at ``scale``, each image drawn from one of them in ``target``'s
    proportions, judged by

    - ``compare``: the demo's comparison (:func:`fairtune.colored_digits.demo_compare_config`: its
      prompts, seeds, draw, judges and budget; ``target`` uniform), its ``class_pair`` method: the
      very path ``fairtune demo`` measures its own pair with, so their figures compare; each figure
      also gets its spread over resamples of the seed's images (``sampling_sd``);
    - ``sweep``: the sweep's judge (:func:`fairtune.colored_digits.judge_colored_digits` with the
      dependable spec's options: explicit prompts for every seen digit, 32 each; the draw of
      :class:`fairtune.models.ClassAdapterMix`): how the pair results before the demo's path were
      judged, kept so their commands still reproduce them.

    Each seed's row is cached in ``out/pairs/<pair_key>.json`` (the comparison's images beside it,
    resumable); ``train_seconds`` is the adapters' sum.

    ``committed`` (the results file's ``per_seed``): a seed whose adapters are not here is taken from
    it when its ``pair_key`` is this spec's (the same runs and judge, so the same figures up to the
    machine), so adding seeds to a spec does not mean training and judging the committed ones again."""
    import yaml

    from fairtune.cli import load_spec, read_status
    from fairtune.colored_digits import judge_colored_digits
    from fairtune.data import atomic_write_json
    from fairtune.eval import compare_methods

    check_pair_judge(judge, target)
    by_seed: dict[int, dict[str, Path]] = {}
    for run in spec.runs:
        if run.train and read_status(out / "runs" / run.hash).get("state") == "done":
            by_seed.setdefault(run.seed, {})[run.arm] = out / "runs" / run.hash
    arms = sorted({r.arm for r in spec.runs if r.train})
    result = {}
    for seed, dirs in sorted(by_seed.items()):
        if sorted(dirs) != arms:
            continue
        key = pair_key(spec, seed, target, scale, judge)
        cache = out / "pairs" / f"{key}.json"
        if not cache.is_file():
            print(f"judging the class adapters {arms} of seed {seed} at scale {scale:g}", file=sys.stderr)
            adapters = {a: dirs[a] / "adapter" for a in arms}
            if judge == "compare":
                cfg = pair_compare_config(adapters, dirs[arms[0]] / "config.yaml", scale)
                cfg.sampling_boot = SAMPLING_BOOT
                metrics, _ = compare_methods(cfg, cache_dir=out / "pairs" / key, progress=False)
                m = metrics["methods"]["class_pair"]
                row = pair_row(m["summary"], m["per_concept"], metrics["classes"])
            else:
                config = yaml.safe_load((dirs[arms[0]] / "config.yaml").read_text())
                config["data"]["target"] = {"proportions": target}
                folder = out / "pairs" / key
                folder.mkdir(parents=True, exist_ok=True)
                row = judge_colored_digits(
                    folder, config, **load_spec(SPEC).judge["options"], class_adapters=adapters,
                    adapter_scale=scale,
                )  # fmt: skip
            row["train_seconds"] = sum(
                (read_status(dirs[a]).get("metrics") or {}).get("train_seconds") or float("nan") for a in arms
            )
            atomic_write_json(cache, row, indent=2)
        result[seed] = {**json.loads(cache.read_text()), "pair_key": key}
    for seed in sorted({r.seed for r in spec.runs if r.train} - set(result)):
        if (row := committed_row(spec, committed, seed, target, scale, judge)) is not None:
            result[seed] = {**row, "source": "committed"}
    return dict(sorted(result.items()))


def readme_block(results: dict, pairs: dict[str, dict] | None = None) -> str:
    """The README's result block, rendered from ``benchmarks/results/dependable.json`` and (given) the
    class-adapter pairs' results (``PAIR_RESULTS``: README row name to that file's payload): one row
    per arm, then each arm's missed goals."""

    # Each trained row names its budget: the single adapter and the demo's pair train different counts.
    def label(arm: str, payload: dict) -> str:
        return arm if arm == "base" or payload.get("steps") is None else f"{arm}, {payload['steps']} steps"

    rows = {label(arm, results): row for arm, row in results["arms"].items()}
    goals = {label(arm, results): g for arm, g in results["goals"].items()}
    for name, pair in (pairs or {}).items():
        rows[label(name, pair)] = pair["arms"]["class_pair"]
        goals[label(name, pair)] = pair["goals"]["class_pair"]
    cols = [c for c in COLUMNS if c[0] != "train_seconds"]
    lines = [BEGIN, *table_lines(rows, cols), ""]
    for arm, gs in goals.items():
        missed = [
            f"{g['metric']}{' half-width' if g['kind'] == 'halfwidth' else ''} {g['value']:.3g} ({g['goal']})"
            for g in gs
            if g["met"] is False
        ]
        lines.append(f"Goals missed by {arm} (issue 24): " + ("; ".join(missed) + "." if missed else "none."))
    return "\n".join(lines + [END])


def readme(check: bool = False) -> bool:
    """Rewrite (or, with ``check``, only compare) the README's block between the markers."""
    results = json.loads((RESULTS / f"{NAME}.json").read_text())
    pairs = {
        name: json.loads((RESULTS / f).read_text())
        for name, f in PAIR_RESULTS.items()
        if (RESULTS / f).is_file()
    }
    text = README.read_text()
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{README} has no {BEGIN} ... {END} block")
    new = pattern.sub(lambda _: readme_block(results, pairs), text)
    if check:
        return new == text
    README.write_text(new)
    return True


def pair_report(
    spec_path: Path,
    *,
    run: bool = False,
    workers: int = 1,
    target: str = "uniform",
    scale: float = 1.0,
    judge: Judge = "compare",
) -> dict:
    """The class-adapter pair (one adapter per class, drawn per image, each fused at ``scale``) over
    seeds, judged by ``judge`` (:func:`pair_metrics`), tabulated beside the demo's base row and single
    adapter (``dependable.json``), with issue 24's goals; writes
    ``benchmarks/results/<spec name>_pair[_x<scale>].{json,md}``."""
    from noise_floor import OUT

    from fairtune.cli import load_spec, run_sweep

    check_pair_judge(judge, target)
    spec = load_spec(spec_path)
    name = pair_name(spec, scale)
    committed_file = RESULTS / f"{name}.json"
    committed_seeds = (
        json.loads(committed_file.read_text()).get("per_seed", {}).get("class_pair", {})
        if committed_file.is_file()
        else {}
    )
    if run:
        from _common import ensure_assets

        ensure_assets()
        # Seeds whose committed figures belong to these very runs are not trained again.
        todo = [
            r for r in spec.runs if committed_row(spec, committed_seeds, r.seed, target, scale, judge) is None
        ]
        run_sweep(dataclasses.replace(spec, runs=todo), OUT, workers=workers, aggregate=False)
    per_seed = pair_metrics(spec, OUT, target=target, committed=committed_seeds, scale=scale, judge=judge)
    arm = "class_pair"
    # The base row and the single adapter come from the committed dependable.json (the same judge,
    # prompts and seeds), so a pair can be tabulated without judging the base model again.
    committed = json.loads((RESULTS / f"{NAME}.json").read_text())["arms"]
    single = committed.get("debiased")
    rows = {
        "base": committed["base"],
        **({"debiased (dependable.md)": single} if single else {}),
        arm: {
            k: seed_summary(
                [r.get(k) for r in per_seed.values()],
                prediction=True,
                sampling_sd=pooled_sd([(r.get("sampling_sd") or {}).get(k) for r in per_seed.values()]),
                bounds=BOUNDS.get(k),
            )  # fmt: skip
            for k, _, _ in COLUMNS
        },
    }
    goals = goal_checks(rows[arm], rows["base"])
    spec_rel = Path(spec.path).resolve().relative_to(ROOT)
    lines = [
        f"# {spec.name}: the class adapters ({', '.join(sorted({r.arm for r in spec.runs if r.train}))}) "
        f"drawn per image in {target} proportions"
        + ("" if scale == 1.0 else f", each fused at scale {scale:g}")
        + f", over seeds {sorted(per_seed)} (spec `{spec_rel}`)",
        "",
        *table_lines(rows),
        "",
        PAIR_NOTE if judge == "compare" else SWEEP_PAIR_NOTE,
        "",
        f"`{arm}` per seed:",
        "",
        "| seed | " + " | ".join(c for _, c, _ in COLUMNS) + " |",
        "|---|" + "---|" * len(COLUMNS),
        *(
            f"| {seed} | " + " | ".join(cell(m.get(k), d) for k, _, d in COLUMNS) + " |"
            for seed, m in per_seed.items()
        ),
        "",
        "Each image of the pair is generated by one adapter trained toward one class alone, drawn "
        "stratified per prompt (half the images of every prompt each, for a uniform target), fused into "
        "its own copy of the UNet: the base model's cost per image, twice the training. Explicit prompts "
        "also go through the drawn adapter. Command: `python benchmarks/dependable.py pair --spec "
        f"{spec_rel}{'' if scale == 1.0 else f' --scale {scale:g}'}"
        f"{'' if judge == 'compare' else ' --judge sweep'}` "
        "(`pair_run` first trains the adapters).",
        "",
        *(
            [
                f"Seeds {', '.join(str(k) for k, v in per_seed.items() if v.get('source') == 'committed')}: "
                "the committed figures of the same runs (their `pair_key`, in the JSON, names the runs "
                "and the mix; a changed config or spec gives new keys and trains again); seeds "
                f"{', '.join(str(k) for k, v in per_seed.items() if v.get('source') != 'committed')} "
                "judged by this report's run.",
                "",
            ]
            if any(v.get("source") == "committed" for v in per_seed.values())
            else []
        ),
        f"Issue 24's goals, `{arm}` (mean over seeds):",
        "",
    ]
    for g in goals:
        verdict = "not measured" if g["met"] is None else "met" if g["met"] else "**missed**"
        val = "" if g["value"] is None else f"{g['value']:.4g}"
        label = g["metric"] + (" interval half-width" if g["kind"] == "halfwidth" else "")
        lines.append(f"- {label} = {val} (goal {g['goal']}): {verdict}")
    steps = spec_steps(spec)
    payload = {"spec": str(spec_rel), "target": target, "scale": scale, "judge": judge, "steps": steps,
               "arms": rows,
               "goals": {arm: goals},
               "per_seed": {arm: {str(k): v for k, v in per_seed.items()}}}  # fmt: skip
    write_results(name, payload, "\n".join(lines) + "\n")
    return payload


def main(
    step: Literal["run", "report", "readme", "pair", "pair_run"],
    *,
    workers: int = 1,
    spec: Path = SPEC,
    target: str = "uniform",
    scale: float = 1.0,
    judge: Judge = "compare",
) -> None:
    """``run``: train and judge the spec's runs, then tabulate; ``report``: tabulate only; ``readme``:
    rewrite the README's result block from the committed results. ``--spec`` tabulates another
    multi-seed spec (its own results file; the README block stays the dependable spec's). ``pair``:
    judge and tabulate a spec of class adapters (one arm per class) as one pair per seed, drawn per
    image in ``--target`` proportions, every adapter fused at ``--scale``; ``pair_run`` trains them
    first."""
    if step in ("pair", "pair_run"):
        pair_report(
            Path(spec), run=step == "pair_run", workers=workers, target=target, scale=scale, judge=judge
        )
        return
    if step == "readme":
        readme()
        print(f"rewrote the block in {README}", file=sys.stderr)
        return
    report(run=step == "run", workers=workers, spec_path=Path(spec))
    if Path(spec).resolve() == SPEC.resolve():
        readme()


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main, as_positional=True)
