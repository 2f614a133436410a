"""The sweep's report (``ablation.{csv,md,png}``: mean and 95% t-interval over seeds per arm) and its
SLURM scripts (a job array and the aggregation job)."""

from __future__ import annotations

import csv
import json
import math
import re
import shlex
import sys
from pathlib import Path
from typing import Any

from fairtune.data import atomic_path, atomic_write_text
from fairtune.eval import Goal, t_interval
from fairtune.eval import check_goals as check_goals_of

from ._sweep_spec import RunSpec, Spec, SweepError, read_status, run_states


def aggregate_rows(spec: Spec, out: Path) -> tuple[list[dict], list[str]]:
    """One row per report label: counts and, per metric, mean, std and 95% t-interval over seeds."""
    import numpy as np

    labels: dict[str, list[RunSpec]] = {}
    for r in spec.runs:
        labels.setdefault(r.label, []).append(r)
    statuses = {r.hash: read_status(out / "runs" / r.hash) for r in spec.runs}
    metrics: list[str] = []
    for s in statuses.values():
        if s.get("state") == "done":
            for k, v in (s.get("metrics") or {}).items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in metrics:
                    metrics.append(k)
    if spec.report_metrics:
        metrics = [m for m in spec.report_metrics if m in metrics] + [
            m for m in metrics if m not in spec.report_metrics
        ]
    rows = []
    for label, runs in labels.items():
        sts = [statuses[r.hash] for r in runs]
        done = [s for s in sts if s.get("state") == "done" and s.get("judge_hash") == spec.judge_hash]
        row: dict[str, Any] = {
            "arm": label,
            "arm_name": runs[0].arm,
            "values": json.dumps(runs[0].values, sort_keys=True),
            "n": len(done),
            "n_failed": sum(s.get("state") == "failed" for s in sts),
            "n_pending": len(sts) - len(done) - sum(s.get("state") == "failed" for s in sts),
            "seeds": " ".join(str(s["seed"]) for s in done),
        }
        for m in metrics:
            vals = [float(s["metrics"][m]) for s in done if m in (s.get("metrics") or {})]
            mean, lo, hi = t_interval(vals)
            row[f"{m}_mean"] = mean
            row[f"{m}_std"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else math.nan
            row[f"{m}_ci_low"] = lo
            row[f"{m}_ci_high"] = hi
        rows.append(row)
    return rows, metrics


def write_report(spec: Spec, out: Path) -> dict[str, Path]:
    """Write ``ablation.csv`` (every metric), ``ablation.md`` (the report metrics) and ``ablation.png``."""
    rows, metrics = aggregate_rows(spec, out)
    summary = run_states(spec, out)
    paths = {"csv": out / "ablation.csv", "md": out / "ablation.md", "png": out / "ablation.png"}
    fields = ["arm", "arm_name", "values", "n", "n_failed", "n_pending", "seeds"]
    fields += [f"{m}_{s}" for m in metrics for s in ("mean", "std", "ci_low", "ci_high")]
    with atomic_path(paths["csv"]) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for row in rows:
            w.writerow({k: row.get(k, "") for k in fields})

    shown = [m for m in (spec.report_metrics or metrics) if m in metrics] or metrics
    lines = [
        f"# Ablation: {spec.name}",
        "",
        f"{len(summary['done'])} of {len(summary['runs'])} runs done, {len(summary['failed'])} failed, "
        f"{len(summary['pending'])} pending. Each cell: mean ± half-width of the 95% Student-t interval "
        "over seeds (n = seeds done; no interval for n = 1).",
        "",
        "| arm | n | " + " | ".join(shown) + " |",
        "|---|---|" + "---|" * len(shown),
    ]
    for row in rows:
        cells = []
        for m in shown:
            mean, lo, hi = row.get(f"{m}_mean", math.nan), row.get(f"{m}_ci_low"), row.get(f"{m}_ci_high")
            if mean is None or math.isnan(mean):
                cells.append("")
            elif lo is None or math.isnan(lo):
                cells.append(f"{mean:.4g}")
            else:
                cells.append(f"{mean:.4g} ± {(hi - lo) / 2:.2g}")
        n = f"{row['n']}" + (f" ({row['n_failed']} failed)" if row["n_failed"] else "")
        lines.append(f"| {row['arm']} | {n} | " + " | ".join(cells) + " |")
    failed = [s for s in summary["runs"].values() if s.get("state") == "failed"]
    if failed:
        lines += ["", "## Failed runs", ""]
        for s in failed:
            first = (s.get("error") or "").strip().splitlines()
            lines.append(
                f"- `{s['hash']}` {s.get('label')} seed {s.get('seed')} ({s.get('stage')}): "
                f"{first[0] if first else 'unknown error'} — see runs/{s['hash']}/status.json"
            )
    lines += goal_lines(spec, rows)
    lines += ["", f"Spec: `{spec.path}`; runs in `runs/<hash>/`; every metric in `ablation.csv`."]
    atomic_write_text(paths["md"], "\n".join(lines) + "\n")
    _plot(rows, shown[:6], paths["png"], spec.name)
    return paths


def _plot(rows: list[dict], metrics: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = max(1, len(metrics))
    fig, axes = plt.subplots(1, k, figsize=(3.2 * k + 1, 3.4), squeeze=False)
    names = [r["arm"] for r in rows]
    for ax, m in zip(axes[0], metrics or [None]):
        if m is None:
            ax.text(0.5, 0.5, "no finished run yet", ha="center", va="center")
            ax.set_axis_off()
            continue
        means = [r.get(f"{m}_mean", math.nan) for r in rows]
        err = [
            (r[f"{m}_ci_high"] - r[f"{m}_ci_low"]) / 2
            if not math.isnan(r.get(f"{m}_ci_low", math.nan))
            else 0.0
            for r in rows
        ]
        ax.bar(
            range(len(rows)), [0 if math.isnan(v) else v for v in means], yerr=err, capsize=3, color="#4c72b0"
        )
        ax.set_xticks(range(len(rows)), names, rotation=45, ha="right", fontsize=8)
        ax.set_title(m, fontsize=9)
    fig.suptitle(f"{title}: mean and 95% t-interval over seeds", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format=Path(path).suffix[1:] or "png")
    plt.close(fig)


def _directive(key: str, value: Any, pattern: str = r"[A-Za-z0-9_.:,+%=@/-]+") -> str:
    """A checked ``#SBATCH`` value: sbatch reads these lines itself (no shell), so a value is refused
    unless it is one plain word (no space, quote, newline or ``#``)."""
    text = str(value)
    if not re.fullmatch(pattern, text):
        raise SweepError(
            f"slurm.{key}: {text!r} is not a plain SLURM value (letters, digits and _.:,+%=@/- only)"
        )
    return text


def _slurm_pattern(folder: Path, pattern: str) -> str:
    """``folder/pattern`` for sbatch's ``--output``: the folder's ``%`` (sbatch's pattern character)
    written ``%%``, the pattern's kept."""
    return f"{str(folder).replace('%', '%%')}/{pattern}"


def _slurm_config(spec: Spec) -> dict[str, Any]:
    """The spec's ``slurm:`` block over the defaults, every value checked (``gpus_per_task: 0``: no GPU
    asked for)."""
    cfg = {"time": "04:00:00", "gpus_per_task": 1, "cpus_per_task": 8, "mem": "32G", **spec.slurm}
    for key in ("gpus_per_task", "cpus_per_task", "max_parallel"):
        v = cfg.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise SweepError(f"slurm.{key} must be a non-negative integer, got {v!r}")
    if not cfg["cpus_per_task"]:
        raise SweepError("slurm.cpus_per_task must be at least 1")
    for key in ("time", "mem", "partition", "account"):
        if cfg.get(key) is not None:
            cfg[key] = _directive(key, cfg[key])
    for key in ("extra", "setup"):
        lines = cfg.get(key) or []
        if not isinstance(lines, list) or not all(isinstance(x, str) for x in lines):
            raise SweepError(f"slurm.{key} must be a list of strings")
        for x in lines:
            if "\n" in x or "\r" in x or "\0" in x:
                raise SweepError(f"slurm.{key}: {x!r} holds a line break; give one line per list item")
            if key == "extra" and not x.startswith("#SBATCH --"):
                raise SweepError(f"slurm.extra: {x!r} is not an #SBATCH line (#SBATCH --option=value)")
            if key == "extra":
                for word in x[len("#SBATCH ") :].split():
                    _directive("extra", word)
    return cfg


def write_slurm(spec: Spec, spec_path: Path, out: Path) -> dict[str, Path]:
    """Write ``DIR/sweep.sbatch`` (a job array, one task per run: ``fairtune sweep ... --index I``) and
    ``DIR/submit.sh`` (submits it, then the aggregation once every task has ended).

    Everything that comes from the spec or a path is shell-quoted where it is shell (the job name and
    the log paths are given to ``sbatch`` in ``submit.sh``, not as ``#SBATCH`` lines); the ``#SBATCH``
    values (time, mem, partition, account, ``extra``) must be plain words. ``setup`` lines are shell
    commands run as written (the spec is trusted input, like a config).

    Raises:
        SweepError: a ``slurm:`` value that is not a plain SLURM value, or a line with a line break.
    """
    cfg = _slurm_config(spec)
    out.mkdir(parents=True, exist_ok=True)
    (out / "slurm").mkdir(exist_ok=True)
    n = len(spec.runs)
    array = f"0-{n - 1}" + (f"%{cfg['max_parallel']}" if cfg.get("max_parallel") else "")
    q = shlex.quote
    cwd = q(str(Path.cwd()))
    base = f"{q(sys.executable)} -m fairtune.cli sweep {q(str(spec_path.resolve()))} --out {q(str(out))}"
    name = spec.name.replace("\n", " ").replace("\r", " ")
    header = [
        "#!/bin/bash",
        f"# fairtune sweep: {n} runs, one array task each (written by `fairtune sweep --slurm`).",
        "# Submit with submit.sh beside it: it gives sbatch the job name and the log folder.",
        f"#SBATCH --array={array}",
        "#SBATCH --ntasks=1",
        f"#SBATCH --cpus-per-task={cfg['cpus_per_task']}",
        f"#SBATCH --mem={cfg['mem']}",
        f"#SBATCH --time={cfg['time']}",
    ]
    if cfg.get("gpus_per_task"):
        header.append(f"#SBATCH --gres=gpu:{cfg['gpus_per_task']}")
    if cfg.get("partition"):
        header.append(f"#SBATCH --partition={cfg['partition']}")
    if cfg.get("account"):
        header.append(f"#SBATCH --account={cfg['account']}")
    header += list(cfg.get("extra") or [])
    body = [
        "set -euo pipefail",
        f"cd {cwd}",
        *cfg.get("setup", []),
        "export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TOKENIZERS_PARALLELISM=false",
        "# A finished run is skipped, so resubmitting the array (or one index) only redoes what is missing.",
        f'{base} --index "$SLURM_ARRAY_TASK_ID"',
    ]
    sbatch = out / "sweep.sbatch"
    atomic_write_text(sbatch, "\n".join(header + [""] + body) + "\n")
    logs = out / "slurm"
    array_args = shlex.join(
        [f"--job-name=ft-{name}", f"--output={_slurm_pattern(logs, '%A_%a.out')}", str(sbatch)]
    )
    report_args = shlex.join(
        [
            f"--job-name=ft-{name}-report",
            f"--output={_slurm_pattern(logs, 'report-%j.out')}",
            "--time=00:30:00",
            f"--cpus-per-task={min(cfg['cpus_per_task'], 2)}",
            f"--mem={cfg['mem']}",
            *([f"--partition={cfg['partition']}"] if cfg.get("partition") else []),
            *([f"--account={cfg['account']}"] if cfg.get("account") else []),
            "--wrap",
            f"cd {cwd} && {base} --aggregate_only true",
        ]
    )
    submit = out / "submit.sh"
    atomic_write_text(
        submit,
        "\n".join(
            [
                "#!/bin/bash",
                "# Submit the sweep's job array, then the aggregation once every task has ended.",
                "set -euo pipefail",
                f"jid=$(sbatch --parsable {array_args})",
                "jid=${jid%%;*}",
                f'rid=$(sbatch --parsable --dependency="afterany:$jid" {report_args})',
                'echo "submitted array $jid, report ${rid%%;*}"',
            ]
        )
        + "\n",
    )
    submit.chmod(0o755)
    return {"sbatch": sbatch, "submit": submit}


def check_goals(spec: Spec, rows: list[dict]) -> list[dict]:
    """The spec's goals against the arms' means: per goal its value, whether it is met, and by how much
    it is missed (``value`` is ``arm − relative_to`` or ``arm / relative_to`` when a reference arm is
    named; the check is :func:`fairtune.eval.check_goals`)."""
    means = {
        r["arm_name"]: {k.removesuffix("_mean"): v for k, v in r.items() if k.endswith("_mean")} for r in rows
    }
    return check_goals_of(spec.goals, means)


def goal_lines(spec: Spec, rows: list[dict]) -> list[str]:
    """The goals section of the report (nothing when the spec sets no goals)."""
    checks = check_goals(spec, rows)
    if not checks:
        return []
    lines = ["", "## Goals", ""]
    for c in checks:
        what = c["metric"]
        if c.get("relative_to"):
            op = "/" if c.get("as") == "ratio" else "−"
            what = f"{what} ({c['arm']} {op} {c['relative_to']})"
        else:
            what = f"{what} ({c['arm']})"
        bound = Goal.from_mapping(c).text
        if c["met"] is None:
            lines.append(f"- {what} {bound}: not measured yet")
        else:
            verdict = "met" if c["met"] else f"**missed by {c['missed_by']:.3g}**"
            lines.append(f"- {what} = {c['value']:.4g} (goal {bound}): {verdict}")
    return lines
