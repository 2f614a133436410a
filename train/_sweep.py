"""``fairtune sweep SPEC --out DIR``: ablation sweeps (DESIGN §4, §9).

A sweep is a grid: arms (config overlays, e.g. ``configs/ablations/*.yaml``) × values (dotted keys that
``fairtune fit`` accepts, e.g. ``model.lora.rank``) × seeds. Every run is trained by ``fairtune fit`` in
a subprocess into ``DIR/runs/<hash>`` and then judged (by default on ColoredDigits-Bias with
:func:`fairtune.eval.evaluate_backbone_on_digits`; any ``module:function`` can be plugged in). The
results are aggregated per arm, mean and 95% t-interval over seeds, into ``DIR/ablation.md``,
``DIR/ablation.csv`` and ``DIR/ablation.png``.

A run is identified by a hash of what it trains: the parsed content of its config files in order, its
values and overrides, and its seed. A sweep started again skips the runs that are done (and re-judges,
without retraining, those whose judge settings changed); a run that was cut off resumes from its last
checkpoint (``fairtune fit`` does that by itself); a failed run is recorded with its error in
``DIR/runs/<hash>/status.json`` and ``DIR/sweep.jsonl`` and does not stop the others (it is tried again
on the next start, unless ``--retry_failed false``).

The spec (YAML)::

    name: ablation                       # title of the report (default: the file's stem)
    base: [configs/colored_digits/lora.yaml]  # configs every run gets first
    arms:                                # name -> overlays, or -> {configs, values, seeds}
      naive: [configs/ablations/naive.yaml]
      sampler: [configs/ablations/sampler.yaml]
      small-lr: {configs: [configs/ablations/sampler.yaml], values: {model.optim.lr: 1.0e-3}}
    grid: {model.lora.rank: [4, 8]}      # crossed with every arm (optional)
    seeds: [0, 1, 2]
    seed_keys: [seed_everything, model.seed, data.seed]   # where a run's seed goes
    overrides: {trainer.max_steps: 1000} # given to every run (part of the hash)
    judge:                               # null: no judging (the report then has train time only)
      function: fairtune.train._sweep:judge_colored_digits
      options: {judges: runs/judges/colored-digits-16, n_per_prompt: 128}
    report: {metrics: [mean_dev_seen, worst_dev_seen, mean_dev_heldout, fidelity, frechet]}
    slurm: {time: "04:00:00", gpus_per_task: 1, cpus_per_task: 8, mem: 32G, setup: []}

Config paths are taken relative to the working directory, else to the spec's folder or the nearest of
its parents where they exist (so ``configs/...`` works from a spec in ``configs/sweeps/``).
"""

from __future__ import annotations

import csv
import hashlib
import importlib
import itertools
import json
import math
import os
import shlex
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

SPEC_KEYS = {"name", "base", "arms", "grid", "seeds", "seed_keys", "overrides", "judge", "report", "slurm"}
ARM_KEYS = {"configs", "values", "seeds"}
SLURM_KEYS = {
    "partition", "account", "time", "gpus_per_task", "cpus_per_task", "mem", "max_parallel", "extra", "setup",
}  # fmt: skip
DEFAULT_SEED_KEYS = ["seed_everything", "model.seed", "data.seed"]
DEFAULT_JUDGE = "fairtune.train._sweep:judge_colored_digits"
STATUS = "status.json"


class SweepError(ValueError):
    """A sweep spec that cannot run, named by what is wrong."""


# --------------------------------------------------------------------------------------------- the plan
@dataclass
class RunSpec:
    """One run of the sweep.

    Attributes:
        index: Position in the plan (the SLURM array index).
        arm: The arm's name.
        label: The report row it counts in: the arm, plus its grid values.
        configs: Config files, in order (absolute paths).
        values: The arm's and the grid's values (dotted keys).
        overrides: Values every run gets.
        seed: The seed, written to every key of ``seed_keys``.
        seed_keys: Where the seed goes.
        hash: The run's identity (folder name under ``DIR/runs``).
    """

    index: int
    arm: str
    label: str
    configs: list[str]
    values: dict[str, Any]
    overrides: dict[str, Any]
    seed: int
    seed_keys: list[str]
    hash: str = ""

    def fit_command(self, run_dir: Path) -> list[str]:
        """The ``fairtune fit`` command line of this run."""
        cmd = [sys.executable, "-m", "fairtune.train.cli", "fit"]
        for c in self.configs:
            cmd += ["--config", c]
        cmd.append("--trainer.enable_progress_bar=false")
        for key, value in {**self.overrides, **self.values}.items():
            cmd.append(f"--{key}={_cli_value(value)}")
        for key in self.seed_keys:
            cmd.append(f"--{key}={self.seed}")
        cmd.append(f"--trainer.default_root_dir={run_dir}")
        return cmd


def _cli_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


@dataclass
class Spec:
    """A parsed sweep spec (see the module docstring)."""

    name: str
    path: Path
    runs: list[RunSpec]
    judge: dict | None
    report_metrics: list[str] | None
    slurm: dict = field(default_factory=dict)

    @property
    def judge_hash(self) -> str:
        return _digest(self.judge)[:12] if self.judge else "none"


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _resolve(p: str, spec_dir: Path, what: str) -> Path:
    path = Path(p).expanduser()
    if path.is_absolute():
        candidates = [path]
    else:
        candidates = [Path.cwd() / path] + [d / path for d in (spec_dir, *spec_dir.parents)]
    for c in candidates:
        if c.is_file():
            return c.resolve()
    raise SweepError(
        f"{what}: config {p!r} not found (looked in the working directory {Path.cwd()}, "
        f"in {spec_dir} and in its parents)"
    )


def _as_list(value: Any, what: str) -> list:
    if value is None:
        return []
    if isinstance(value, (str, int, float)):
        return [value]
    if not isinstance(value, list):
        raise SweepError(f"{what} must be a list, got {type(value).__name__}")
    return value


def load_spec(path: str | os.PathLike) -> Spec:
    """Read and check a sweep spec; expand it into its runs (arm-major, then grid values, then seeds).

    Raises:
        SweepError: an unknown key, a missing config file, an empty grid axis, a bad seed.
    """
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep spec {str(path)!r} not found")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: a sweep spec is a mapping, got {type(raw).__name__}")
    unknown = set(raw) - SPEC_KEYS
    if unknown:
        raise SweepError(f"{path}: unknown keys {sorted(unknown)}; known: {sorted(SPEC_KEYS)}")
    spec_dir = path.resolve().parent
    base = [_resolve(p, spec_dir, "base") for p in _as_list(raw.get("base"), "base")]

    arms_raw = raw.get("arms") or {"base": []}
    if isinstance(arms_raw, list):
        arms_raw = {Path(str(p)).stem: [p] for p in arms_raw}
    if not isinstance(arms_raw, dict) or not arms_raw:
        raise SweepError(f"{path}: arms must be a mapping of name to overlays (or a list of overlays)")
    seeds = [_seed(s, "seeds") for s in _as_list(raw.get("seeds", [0]), "seeds")]
    if not seeds:
        raise SweepError(f"{path}: seeds is empty")
    seed_keys = [str(k) for k in _as_list(raw.get("seed_keys", DEFAULT_SEED_KEYS), "seed_keys")]
    overrides = raw.get("overrides") or {}
    grid = raw.get("grid") or {}
    if not isinstance(overrides, dict) or not isinstance(grid, dict):
        raise SweepError(f"{path}: overrides and grid must be mappings of dotted key to value(s)")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise SweepError(f"{path}: grid.{key} must be a non-empty list of values")

    runs: list[RunSpec] = []
    content = lru_cache(maxsize=None)(lambda p: yaml.safe_load(Path(p).read_text()))
    for arm, arm_raw in arms_raw.items():
        if isinstance(arm_raw, dict):
            bad = set(arm_raw) - ARM_KEYS
            if bad:
                raise SweepError(
                    f"{path}: arms.{arm} has unknown keys {sorted(bad)}; known: {sorted(ARM_KEYS)}"
                )
            overlays = _as_list(arm_raw.get("configs"), f"arms.{arm}.configs")
            arm_values = arm_raw.get("values") or {}
            arm_seeds = [
                _seed(s, f"arms.{arm}.seeds") for s in _as_list(arm_raw.get("seeds"), "seeds")
            ] or seeds
        else:
            overlays, arm_values, arm_seeds = _as_list(arm_raw, f"arms.{arm}"), {}, seeds
        configs = base + [_resolve(str(p), spec_dir, f"arms.{arm}") for p in overlays]
        for combo in itertools.product(*grid.values()) if grid else [()]:
            grid_values = dict(zip(grid.keys(), combo))
            label = arm + "".join(f" {k.split('.')[-1]}={_cli_value(v)}" for k, v in grid_values.items())
            values = {**arm_values, **grid_values}
            for seed in arm_seeds:
                run = RunSpec(
                    index=len(runs),
                    arm=str(arm),
                    label=label,
                    configs=[str(c) for c in configs],
                    values=values,
                    overrides=dict(overrides),
                    seed=seed,
                    seed_keys=seed_keys,
                )
                identity = {
                    "configs": [content(c) for c in run.configs],
                    "values": values,
                    "overrides": run.overrides,
                    "seed": seed,
                    "seed_keys": seed_keys,
                }
                run.hash = _digest(identity)[:12]
                runs.append(run)

    judge = raw.get("judge", {"function": DEFAULT_JUDGE, "options": {}})
    if judge is not None:
        if not isinstance(judge, dict) or set(judge) - {"function", "options"}:
            raise SweepError(f"{path}: judge must be null or a mapping with function and options")
        judge = {"function": judge.get("function") or DEFAULT_JUDGE, "options": judge.get("options") or {}}
        _import_function(judge["function"])  # fail now, not after the first training
    report = raw.get("report") or {}
    slurm = raw.get("slurm") or {}
    bad = set(slurm) - SLURM_KEYS
    if bad:
        raise SweepError(f"{path}: slurm has unknown keys {sorted(bad)}; known: {sorted(SLURM_KEYS)}")
    return Spec(
        name=str(raw.get("name") or path.stem),
        path=path.resolve(),
        runs=runs,
        judge=judge,
        report_metrics=report.get("metrics"),
        slurm=slurm,
    )


def _seed(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SweepError(f"{what}: a seed is an integer, got {value!r}")
    return value


def _import_function(ref: str) -> Callable:
    module, _, name = ref.partition(":") if ":" in ref else ref.rpartition(".")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise SweepError(f"judge.function {ref!r} cannot be imported: {e}") from e
    if not callable(fn):
        raise SweepError(f"judge.function {ref!r} is not callable")
    return fn


# --------------------------------------------------------------------------------------------- run state
def read_status(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / STATUS).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def write_status(run_dir: Path, status: dict) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".{STATUS}.tmp-{os.getpid()}-{threading.get_ident()}"
    tmp.write_text(json.dumps(status, indent=2, default=str))
    os.replace(tmp, run_dir / STATUS)


def _alive_elsewhere(status: dict) -> bool:
    """A run marked running by another sweep process on this host that is still alive."""
    pid = status.get("pid")
    if status.get("state") != "running" or not pid or status.get("host") != socket.gethostname():
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _error_summary(log: str) -> str:
    """The part of a failed fit's output that says why: jsonargparse's ``error:`` block, else the
    exception line of the last traceback, else the last line."""
    lines = [ln.rstrip() for ln in log.splitlines() if ln.strip()]
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].lstrip().startswith("error:"):
            return "\n".join(lines[i : i + 12])[:2000]
    for ln in reversed(lines):
        head = ln.split(":", 1)[0].strip()
        if head.endswith(("Error", "Exception", "Interrupt")) and " " not in head:
            return ln[:2000]
    return lines[-1][:2000] if lines else "no output"


class _Runner:
    """Trains and judges runs; thread-safe (judging is serialised, one at a time in this process)."""

    def __init__(self, spec: Spec, out: Path, workers: int, retry_failed: bool) -> None:
        self.spec, self.out, self.workers, self.retry_failed = spec, out, workers, retry_failed
        self.judge_lock = threading.Lock()
        self.log_lock = threading.Lock()
        self.procs: set[subprocess.Popen] = set()
        self.judge_fn = _import_function(spec.judge["function"]) if spec.judge else None

    def run_dir(self, run: RunSpec) -> Path:
        return self.out / "runs" / run.hash

    def todo(self, run: RunSpec) -> str | None:
        """Why this run still needs work (``None``: nothing to do)."""
        status = read_status(self.run_dir(run))
        state = status.get("state")
        if _alive_elsewhere(status):
            return None
        if state == "done" and status.get("judge_hash") == self.spec.judge_hash:
            return None
        if state == "failed" and not self.retry_failed:
            return None
        return state or "new"

    def event(self, record: dict) -> None:
        with self.log_lock, open(self.out / "sweep.jsonl", "a") as f:
            f.write(json.dumps({"time": _now(), **record}, default=str) + "\n")

    def env(self) -> dict:
        env = dict(os.environ)
        if self.workers > 1 and "OMP_NUM_THREADS" not in env:
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // self.workers))
        return env

    def __call__(self, run: RunSpec) -> dict:
        d = self.run_dir(run)
        status = read_status(d)
        trained = status.get("state") in ("trained", "done") and _has_export(d)
        status.update(
            {
                "hash": run.hash,
                "index": run.index,
                "arm": run.arm,
                "label": run.label,
                "seed": run.seed,
                "values": run.values,
                "configs": run.configs,
                "state": "running",
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": _now(),
                "error": None,
            }
        )
        status.pop("finished", None)
        write_status(d, status)
        if not trained:
            cmd = run.fit_command(d)
            status["command"] = shlex.join(cmd)
            write_status(d, status)
            t0 = time.perf_counter()
            rc, log = self._fit(cmd, d)
            status["train_seconds"] = time.perf_counter() - t0
            if rc != 0:
                return self._fail(run, d, status, "train", _error_summary(log), log[-4000:], rc=rc)
            if not _has_export(d):
                return self._fail(
                    run, d, status, "train", "fairtune fit wrote no adapter/ or model/", log[-4000:]
                )
            status["state"] = "trained"
            write_status(d, status)
        metrics: dict[str, float] = {}
        if self.judge_fn is not None:
            try:
                config = yaml.safe_load((d / "config.yaml").read_text())
                t0 = time.perf_counter()
                with self.judge_lock:
                    metrics = dict(self.judge_fn(d, config, **self.spec.judge["options"]))
                status["judge_seconds"] = time.perf_counter() - t0
            except Exception as e:  # a judge failure is this run's, not the sweep's
                tb = traceback.format_exc()
                return self._fail(run, d, status, "judge", f"{type(e).__name__}: {e}", tb[-4000:])
        if "train_seconds" in status:
            metrics.setdefault("train_seconds", status["train_seconds"])
        status.update(
            {"state": "done", "metrics": metrics, "judge_hash": self.spec.judge_hash, "finished": _now()}
        )
        write_status(d, status)
        self.event({"hash": run.hash, "label": run.label, "seed": run.seed, "state": "done"})
        return status

    def _fit(self, cmd: list[str], d: Path) -> tuple[int, str]:
        d.mkdir(parents=True, exist_ok=True)
        log_path = d / "fit.log"
        with open(log_path, "a") as log:
            log.write(f"\n$ {shlex.join(cmd)}\n")
            log.flush()
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env(), cwd=Path.cwd())
            self.procs.add(proc)
            try:
                rc = proc.wait()
            finally:
                self.procs.discard(proc)
        text = log_path.read_text(errors="replace")
        return rc, text[text.rfind("\n$ ") :]

    def _fail(self, run, d, status, stage, error, detail, rc=None) -> dict:
        status.update(
            {
                "state": "failed",
                "stage": stage,
                "error": error,
                "detail": detail,
                "returncode": rc,
                "finished": _now(),
            }
        )
        write_status(d, status)
        self.event(
            {"hash": run.hash, "label": run.label, "seed": run.seed, "state": "failed", "error": error}
        )
        return status

    def stop(self) -> None:
        for proc in list(self.procs):
            proc.terminate()


def _has_export(d: Path) -> bool:
    from fairtune.models import LORA_WEIGHT_NAME

    return (d / "adapter" / LORA_WEIGHT_NAME).is_file() or (d / "model").is_dir()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


# --------------------------------------------------------------------------------------------- sweep
def run_sweep(
    spec_path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    workers: int = 1,
    max_runs: int | None = None,
    index: int | None = None,
    retry_failed: bool = True,
    aggregate: bool = True,
) -> dict:
    """Run (or resume) a sweep; return a summary ``{"done", "failed", "pending", "ran", "runs"}``.

    Args:
        spec_path: The sweep spec (YAML).
        out: The sweep folder (``runs/<hash>/``, ``plan.json``, ``sweep.jsonl``, ``ablation.*``).
        workers: Runs trained at the same time on this machine.
        max_runs: Start at most this many runs this time (the rest stay pending for the next start).
        index: Run only the plan's run at this index (a SLURM array task); no aggregation.
        retry_failed: Try failed runs again.
        aggregate: Write ``ablation.md``, ``.csv`` and ``.png`` at the end.
    """
    spec = load_spec(spec_path)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if workers < 1:
        raise SweepError(f"--workers must be >= 1, got {workers}")
    _write_plan(spec, out)
    runner = _Runner(spec, out, workers, retry_failed)
    unique = list({r.hash: r for r in spec.runs}.values())
    if index is not None:
        if not 0 <= index < len(spec.runs):
            raise SweepError(f"--index {index} is outside the plan (0..{len(spec.runs) - 1})")
        unique = [spec.runs[index]]
        aggregate = False
    todo = [r for r in unique if runner.todo(r) is not None]
    if max_runs is not None:
        todo = todo[: max(0, max_runs)]
    results: list[dict] = []
    try:
        if workers == 1:
            for run in todo:
                results.append(runner(run))
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                results = list(pool.map(runner, todo))
    except BaseException:
        runner.stop()
        raise
    summary = summarize(spec, out)
    summary["ran"] = [r["hash"] for r in results]
    if aggregate:
        write_report(spec, out)
    return summary


def _write_plan(spec: Spec, out: Path) -> None:
    plan = [asdict(r) for r in spec.runs]
    tmp = out / f".plan.json.tmp-{socket.gethostname()}-{os.getpid()}"
    tmp.write_text(json.dumps({"spec": str(spec.path), "name": spec.name, "runs": plan}, indent=2))
    os.replace(tmp, out / "plan.json")


def summarize(spec: Spec, out: Path) -> dict:
    """Counts of the plan's unique runs by state, and every run's status."""
    states: dict[str, dict] = {}
    for r in spec.runs:
        states.setdefault(r.hash, read_status(out / "runs" / r.hash))
    done = [
        h for h, s in states.items() if s.get("state") == "done" and s.get("judge_hash") == spec.judge_hash
    ]
    failed = [h for h, s in states.items() if s.get("state") == "failed"]
    pending = [h for h in states if h not in done and h not in failed]
    return {"done": done, "failed": failed, "pending": pending, "runs": states}


# --------------------------------------------------------------------------------------------- report
def t_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean and the two ends of the Student-t interval of the mean (``nan`` ends for fewer than 2)."""
    import numpy as np
    from scipy import stats

    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if len(x) == 0:
        return math.nan, math.nan, math.nan
    mean = float(x.mean())
    if len(x) < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + confidence / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return mean, mean - half, mean + half


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
    summary = summarize(spec, out)
    paths = {"csv": out / "ablation.csv", "md": out / "ablation.md", "png": out / "ablation.png"}
    fields = ["arm", "arm_name", "values", "n", "n_failed", "n_pending", "seeds"]
    fields += [f"{m}_{s}" for m in metrics for s in ("mean", "std", "ci_low", "ci_high")]
    with open(paths["csv"], "w", newline="") as f:
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
    lines += ["", f"Spec: `{spec.path}`; runs in `runs/<hash>/`; every metric in `ablation.csv`."]
    paths["md"].write_text("\n".join(lines) + "\n")
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
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------- SLURM
def write_slurm(spec: Spec, spec_path: Path, out: Path) -> dict[str, Path]:
    """Write ``DIR/sweep.sbatch`` (a job array, one task per run: ``fairtune sweep ... --index I``) and
    ``DIR/submit.sh`` (submits it, then the aggregation once every task has ended)."""
    cfg = {"time": "04:00:00", "gpus_per_task": 1, "cpus_per_task": 8, "mem": "32G", **spec.slurm}
    out.mkdir(parents=True, exist_ok=True)
    (out / "slurm").mkdir(exist_ok=True)
    n = len(spec.runs)
    array = f"0-{n - 1}" + (f"%{cfg['max_parallel']}" if cfg.get("max_parallel") else "")
    py = shlex.quote(sys.executable)
    spec_arg, out_arg = shlex.quote(str(spec_path.resolve())), shlex.quote(str(out))
    base = f"{py} -m fairtune.train.cli sweep {spec_arg} --out {out_arg}"
    header = [
        "#!/bin/bash",
        f"# fairtune sweep {spec.name}: {n} runs, one array task each (written by `fairtune sweep --slurm`).",
        f"#SBATCH --job-name=ft-{spec.name}",
        f"#SBATCH --array={array}",
        "#SBATCH --ntasks=1",
        f"#SBATCH --cpus-per-task={cfg['cpus_per_task']}",
        f"#SBATCH --mem={cfg['mem']}",
        f"#SBATCH --time={cfg['time']}",
        f"#SBATCH --output={out}/slurm/%A_%a.out",
    ]
    if cfg.get("gpus_per_task"):
        header.append(f"#SBATCH --gres=gpu:{cfg['gpus_per_task']}")
    if cfg.get("partition"):
        header.append(f"#SBATCH --partition={cfg['partition']}")
    if cfg.get("account"):
        header.append(f"#SBATCH --account={cfg['account']}")
    header += [str(x) for x in cfg.get("extra") or []]
    body = [
        "set -euo pipefail",
        f"cd {shlex.quote(str(Path.cwd()))}",
        *[str(x) for x in cfg.get("setup") or []],
        "export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TOKENIZERS_PARALLELISM=false",
        "# A finished run is skipped, so resubmitting the array (or one index) only redoes what is missing.",
        f'{base} --index "$SLURM_ARRAY_TASK_ID"',
    ]
    sbatch = out / "sweep.sbatch"
    sbatch.write_text("\n".join(header + [""] + body) + "\n")
    submit = out / "submit.sh"
    submit.write_text(
        "\n".join(
            [
                "#!/bin/bash",
                "# Submit the sweep's job array, then the aggregation once every task has ended.",
                "set -euo pipefail",
                f"jid=$(sbatch --parsable {shlex.quote(str(sbatch))})",
                f"sbatch --dependency=afterany:$jid --job-name=ft-{spec.name}-report "
                f"--output={out}/slurm/report-%j.out --time=00:30:00 "
                f"--wrap {shlex.quote(f'cd {shlex.quote(str(Path.cwd()))} && {base} --aggregate_only true')}",
                'echo "submitted array $jid"',
            ]
        )
        + "\n"
    )
    submit.chmod(0o755)
    return {"sbatch": sbatch, "submit": submit}


# --------------------------------------------------------------------------------------------- judging
@lru_cache(maxsize=4)
def _judges(path: str):
    from fairtune.eval import load_judges

    return load_judges(path)


@lru_cache(maxsize=4)
def _reference(path: str, n: int, seed: int = 0):
    import numpy as np

    from fairtune.data import load_table
    from fairtune.eval import images_from_table

    held = load_table(path, split="heldout")
    idx = np.random.default_rng(seed).permutation(len(held))[:n]
    return images_from_table(held.select(sorted(idx.tolist())))


def judge_colored_digits(
    run_dir: Path,
    config: dict,
    *,
    judges: str = "runs/judges/colored-digits-16",
    n_per_prompt: int = 128,
    steps: int = 25,
    guidance_scale: float = 2.0,
    seed: int = 0,
    batch_size: int = 512,
    digits: list[int] | None = None,
    prompt: str = "a handwritten digit {d}",
    color_judge: str = "hue",
    reference: str | None = None,
    reference_n: int = 2000,
) -> dict[str, float]:
    """Judge a trained run on ColoredDigits-Bias: the base model (``model.backbone`` of the run's
    resolved config) with the run's adapter fused in, ``n_per_prompt`` images per digit from a neutral
    prompt, scored against the run's own target (``data.target``); digits in ``data.concepts`` count as
    seen, the others as held out.

    Args:
        run_dir: The run folder (``adapter/`` or ``model/``, ``config.yaml``).
        config: The run's resolved config.
        judges: Folder written by ``fairtune judges train``.
        n_per_prompt: Images per digit (≥ 128 for a usable interval; see DESIGN §10).
        steps: DDIM steps.
        guidance_scale: Judging guidance (≤ 2, DESIGN §10).
        seed: Image i of every prompt starts from seed ``seed + i``.
        batch_size: Images per UNet batch.
        digits: Digits to judge (default 0-9).
        prompt: Neutral prompt template.
        color_judge: ``hue`` or ``cnn``.
        reference: A ColoredDigits data folder's ``table`` whose held-out split is the real reference
            for the Fréchet distance; ``None`` skips it.
        reference_n: Real images in the reference.

    Returns:
        Flat metrics: the harness summary (``mean_dev_seen``, ``worst_dev_seen``, ``mean_dev_heldout``,
        ``fidelity``, ``frechet``, ...) and the first group's share per digit (``red_share_d3``).
    """
    from fairtune.data import AttributeSpec, Target, TargetConfig
    from fairtune.eval import GenerationConfig, evaluate_backbone_on_digits
    from fairtune.models import LORA_WEIGHT_NAME, Backbone, BackboneConfig, TinyUNetConfig, load_adapter

    run_dir = Path(run_dir)
    bcfg = dict(config["model"]["backbone"])
    if isinstance(bcfg.get("unet"), dict):
        bcfg["unet"] = TinyUNetConfig(**bcfg["unet"])
    if (run_dir / "adapter" / LORA_WEIGHT_NAME).is_file():
        if bcfg.get("pretrained") is None:
            raise SweepError(
                f"{run_dir}: the run trained an adapter on a randomly initialised UNet "
                "(model.backbone.pretrained: null); judging needs the base it was trained on"
            )
        bb = Backbone.from_config(BackboneConfig(**bcfg))
        load_adapter(bb, run_dir / "adapter", fuse=True)
    elif (run_dir / "model").is_dir():
        bb = Backbone.from_config(BackboneConfig(**{**bcfg, "pretrained": str(run_dir / "model")}))
    else:
        raise SweepError(f"{run_dir}: no adapter/ or model/ to judge")
    data = config.get("data") or {}
    target = Target(
        TargetConfig(**(data.get("target") or {})),
        AttributeSpec(data.get("attributes") or {"color": ["red", "blue"]}),
    )
    jd = _judges(str(Path(judges).resolve()))
    if list(jd.colors) != list(target.groups):
        raise SweepError(
            f"the judges score colours {jd.colors} but the run's target groups are {target.groups}"
        )
    digits = list(range(10)) if digits is None else list(digits)
    concepts = data.get("concepts")
    seen = [d for d in digits if concepts is None or f"digit {d}" in concepts]
    ref = _reference(str(Path(reference).resolve()), reference_n) if reference else None
    ev = evaluate_backbone_on_digits(
        bb,
        jd,
        digits=digits,
        seen=seen,
        target={f"digit {d}": target.proportions(f"digit {d}") for d in digits},
        generation=GenerationConfig(
            n_per_prompt=n_per_prompt,
            steps=steps,
            guidance_scale=guidance_scale,
            seed=seed,
            batch_size=batch_size,
        ),
        reference=ref,
        prompt=prompt,
        color_judge=color_judge,
    )
    out = {
        k: float(v)
        for k, v in ev["summary"].items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    first = target.groups[0]
    for d in digits:
        out[f"{first}_share_d{d}"] = float(ev["per_concept"][f"digit {d}"]["p_hat"][0])
    return out


# --------------------------------------------------------------------------------------------- CLI
def sweep(
    spec: Path,
    *,
    out: Path,
    workers: int = 1,
    slurm: bool = False,
    index: int | None = None,
    max_runs: int | None = None,
    retry_failed: bool = True,
    aggregate_only: bool = False,
) -> None:
    """Run an ablation sweep (arms x values x seeds), resumable; report in OUT/ablation.{md,csv,png}.

    Every run is trained by ``fairtune fit`` in a subprocess into OUT/runs/<hash> and judged; a run
    that is done is skipped when the sweep is started again, and a failed one is recorded and retried.

    Args:
        spec: The sweep spec (YAML; see ``configs/sweeps/ablation.yaml``).
        out: The sweep folder.
        workers: Runs trained at the same time on this machine.
        slurm: Write ``OUT/sweep.sbatch`` (a SLURM job array) and ``OUT/submit.sh``; run nothing.
        index: Run only the run at this index of the plan (what each array task does).
        max_runs: Start at most this many runs now; the rest stay for the next start.
        retry_failed: Try runs that failed before again.
        aggregate_only: Only (re)write the report from the runs done so far.
    """
    if slurm:
        parsed = load_spec(spec)
        paths = write_slurm(parsed, Path(spec), Path(out).resolve())
        _write_plan(parsed, Path(out).resolve())
        print(
            f"wrote {paths['sbatch']} ({len(parsed.runs)} array tasks); submit with: bash {paths['submit']}"
        )
        return
    if aggregate_only:
        parsed = load_spec(spec)
        paths = write_report(parsed, Path(out).resolve())
        print(f"wrote {paths['md']}, {paths['csv']}, {paths['png']}")
        return
    summary = run_sweep(spec, out, workers=workers, max_runs=max_runs, index=index, retry_failed=retry_failed)
    print(
        f"{len(summary['done'])} done, {len(summary['failed'])} failed, {len(summary['pending'])} pending "
        f"({len(summary['ran'])} run now); report: {Path(out) / 'ablation.md'}"
    )
    for h in summary["failed"]:
        s = summary["runs"][h]
        first = (s.get("error") or "").strip().splitlines()
        print(f"  failed {h} {s.get('label')} seed {s.get('seed')}: {first[0] if first else ''}")
