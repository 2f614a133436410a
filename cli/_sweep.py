"""``fairtune sweep SPEC --out DIR``: ablation sweeps (DESIGN §4, §9).

A sweep is a grid: arms (config overlays, e.g. ``configs/ablations/*.yaml``) × values (dotted keys that
``fairtune fit`` accepts, e.g. ``model.lora.rank``) × seeds. Every run is trained by ``fairtune fit`` in
a subprocess into ``DIR/runs/<hash>`` and then judged by the spec's ``judge.function`` (any
``module:function``; :func:`fairtune.colored_digits.judge_colored_digits` on ColoredDigits-Bias). The
results are aggregated per arm, mean and 95% t-interval over seeds, into ``DIR/ablation.md``,
``DIR/ablation.csv`` and ``DIR/ablation.png``.

A run is identified by a hash of what it trains: the parsed content of its config files in order, its
values and overrides, and its seed. A sweep started again skips the runs that are done (and re-judges,
without retraining, those whose judge settings changed); a run that was cut off resumes from its last
checkpoint (``fairtune fit`` does that by itself); a failed run is recorded with its error in
``DIR/runs/<hash>/status.json`` and ``DIR/sweep.jsonl`` and does not stop the others (it is tried again
on the next start, unless ``--retry_failed false``). ``fairtune sweep`` exits with status 1 when a run
failed, listing the failed runs.

A run is trained and judged under a lock on ``DIR/runs/<hash>/.lock`` (``flock``, held by the sweep and
its ``fit`` child), so two sweeps started on the same folder, or two SLURM tasks, never train the same
run: each skips the runs the other holds. The ``fit`` children run in their own process groups and die
with the sweep, however it ends (even SIGKILL); the sweep started again resumes them from their last
checkpoint.

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
    judge:                               # absent or null: no judging (the report has train time only)
      function: fairtune.colored_digits:judge_colored_digits
      options: {judges: runs/judges/colored-digits-16, n_per_prompt: 128}
    report: {metrics: [mean_dev_seen, worst_dev_seen, mean_dev_heldout, fidelity, frechet]}
    slurm: {time: "04:00:00", gpus_per_task: 1, cpus_per_task: 8, mem: 32G, setup: []}

Config paths are taken relative to the working directory, else to the spec's folder or the nearest of
its parents where they exist (so ``configs/...`` works from a spec in ``configs/sweeps/``).
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

from fairtune.data import atomic_write_json, atomic_write_text

from ._fit import PEAK_RSS
from ._sweep_procs import Children, RunLock, killed_with_us
from ._sweep_report import write_report, write_slurm
from ._sweep_spec import (
    PROGRESS,
    RunSpec,
    Spec,
    SweepError,
    _import_function,
    load_spec,
    read_status,
    run_states,
    write_status,
)


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
        self.children = Children()
        self.busy: list[str] = []  # runs skipped because another process holds their lock
        self.judge_fn = _import_function(spec.judge["function"]) if spec.judge else None

    def run_dir(self, run: RunSpec) -> Path:
        return self.out / "runs" / run.hash

    def todo(self, run: RunSpec, locked: bool = False) -> str | None:
        """Why this run still needs work (``None``: nothing to do). ``locked``: this process holds the
        run's lock, so a pid in its status file is no longer a reason to leave it."""
        status = read_status(self.run_dir(run))
        state = status.get("state")
        if not locked and _alive_elsewhere(status):
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

    def __call__(self, run: RunSpec) -> dict | None:
        """Train (or resume) and judge one run under its lock; ``None`` when it was not this process's
        to do (another holds it, it was done meanwhile, or the sweep is stopping)."""
        if self.children.stopping.is_set():
            return None
        lock = RunLock(self.run_dir(run))
        if not lock.acquire():
            with self.log_lock:
                self.busy.append(run.hash)
            return None
        try:
            if self.todo(run, locked=lock.supported) is None:
                return None
            return self._run(run, lock)
        finally:
            lock.release()

    def _run(self, run: RunSpec, lock: RunLock) -> dict | None:
        d = self.run_dir(run)
        status = read_status(d)
        trained = status.get("state") in ("trained", "done") and (_has_export(d) or not run.train)
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
        if not run.train and not trained:
            # Judged as it is: the resolved config (what `fairtune fit` would train) is all it needs.
            cmd = [*run.fit_command(d), "--print_config"]
            res = subprocess.run(cmd, capture_output=True, text=True, env=self.env(), cwd=Path.cwd())
            if res.returncode != 0:
                return self._fail(run, d, status, "config", _error_summary(res.stderr), res.stderr[-4000:])
            atomic_write_text(d / "config.yaml", res.stdout)
            status["state"] = "trained"
            write_status(d, status)
        elif not trained:
            cmd = run.fit_command(d)
            status["command"] = shlex.join(cmd)
            write_status(d, status)
            t0 = time.perf_counter()
            try:
                rc, log = self._fit(cmd, d, lock)
            except InterruptedError:
                return None
            status["train_seconds"] = time.perf_counter() - t0
            if rc != 0 and self.children.stopping.is_set():
                status.update({"state": "interrupted", "returncode": rc, "finished": _now()})
                write_status(d, status)
                return None
            peaks = [ln.split()[3] for ln in log.splitlines() if ln.startswith(PEAK_RSS)]
            if peaks:
                status["peak_rss_mb"] = float(peaks[-1])
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
        for key in ("train_seconds", "peak_rss_mb"):
            if key in status:
                metrics.setdefault(key, status[key])
        status.update(
            {"state": "done", "metrics": metrics, "judge_hash": self.spec.judge_hash, "finished": _now()}
        )
        write_status(d, status)
        self.event({"hash": run.hash, "label": run.label, "seed": run.seed, "state": "done"})
        return status

    def _fit(self, cmd: list[str], d: Path, lock: RunLock) -> tuple[int, str]:
        d.mkdir(parents=True, exist_ok=True)
        log_path = d / "fit.log"
        with open(log_path, "a") as log:
            log.write(f"\n$ {shlex.join(cmd)}\n")
            log.flush()
            # Its own process group, killed with the sweep; it holds the run's lock while it lives.
            proc = self.children.popen(
                cmd,
                pass_fds=(lock.fd,) if lock.fd is not None else (),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=self.env(),
                cwd=Path.cwd(),
            )
            try:
                for line in proc.stdout:  # everything to fit.log; the progress lines to the terminal too
                    log.write(line)
                    if line.startswith(PROGRESS):
                        log.flush()
                        print(line.rstrip(), file=sys.stderr, flush=True)
                rc = proc.wait()
            except BaseException:
                self.children.stop()
                raise
            finally:
                if proc.poll() is not None:
                    self.children.done(proc)
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


def _has_export(d: Path) -> bool:
    from fairtune.models import LORA_WEIGHT_NAME

    return (d / "adapter" / LORA_WEIGHT_NAME).is_file() or (d / "model").is_dir()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


# --------------------------------------------------------------------------------------------- sweep
def run_sweep(
    spec_path: str | os.PathLike | Spec,
    out: str | os.PathLike,
    *,
    workers: int = 1,
    max_runs: int | None = None,
    index: int | None = None,
    retry_failed: bool = True,
    aggregate: bool = True,
) -> dict:
    """Run (or resume) a sweep; return a summary ``{"done", "failed", "pending", "ran", "busy", "runs"}``
    (``busy``: runs left because another process holds them; with ``index``, ``failed`` counts that run
    only).

    Args:
        spec_path: The sweep spec (YAML), or one already loaded by :func:`load_spec`.
        out: The sweep folder (``runs/<hash>/``, ``plan.json``, ``sweep.jsonl``, ``ablation.*``).
        workers: Runs trained at the same time on this machine.
        max_runs: Start at most this many runs this time (the rest stay pending for the next start).
        index: Run only the plan's run at this index (a SLURM array task); no aggregation.
        retry_failed: Try failed runs again.
        aggregate: Write ``ablation.md``, ``.csv`` and ``.png`` at the end.
    """
    spec = spec_path if isinstance(spec_path, Spec) else load_spec(spec_path)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if workers < 1:
        raise SweepError(f"--workers must be >= 1, got {workers}")
    _write_plan(spec, out)
    runner = _Runner(spec, out, workers, retry_failed)
    if workers > 1 and runner.judge_fn is not None and "OMP_NUM_THREADS" not in os.environ:
        # The judge runs in this process beside the training children, each given cpus / workers
        # threads: with torch's default here too, the cores are oversubscribed and judging slows
        # several-fold (measured: 0.82 s/image against 0.15 s/image with the machine to itself).
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    unique = list({r.hash: r for r in spec.runs}.values())
    if index is not None:
        if not 0 <= index < len(spec.runs):
            raise SweepError(f"--index {index} is outside the plan (0..{len(spec.runs) - 1})")
        unique = [spec.runs[index]]
        aggregate = False
    todo = [r for r in unique if runner.todo(r) is not None]
    if max_runs is not None:
        todo = todo[: max(0, max_runs)]
    results: list[dict | None] = []
    with killed_with_us(runner.children):
        if workers == 1:
            for run in todo:
                results.append(runner(run))
        else:
            pool = ThreadPoolExecutor(max_workers=workers)
            try:
                results = list(pool.map(runner, todo))
            except BaseException:
                runner.children.stop()
                raise
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
    summary: dict[str, Any] = run_states(spec, out)
    summary["ran"] = [r["hash"] for r in results if r]
    summary["busy"] = sorted(set(runner.busy))
    if index is not None:
        summary["failed"] = [h for h in summary["failed"] if h == spec.runs[index].hash]
    if aggregate:
        write_report(spec, out)
    return summary


def _write_plan(spec: Spec, out: Path) -> None:
    plan = [asdict(r) for r in spec.runs]
    atomic_write_json(out / "plan.json", {"spec": str(spec.path), "name": spec.name, "runs": plan}, indent=2)


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
            f"wrote {paths['sbatch']} ({len(parsed.runs)} array tasks); "
            f"submit with: bash {shlex.quote(str(paths['submit']))}"
        )
        return
    if aggregate_only:
        parsed = load_spec(spec)
        paths = write_report(parsed, Path(out).resolve())
        print(f"wrote {paths['md']}, {paths['csv']}, {paths['png']}")
        return
    summary = run_sweep(spec, out, workers=workers, max_runs=max_runs, index=index, retry_failed=retry_failed)
    busy = f", {len(summary['busy'])} held by another process" if summary["busy"] else ""
    print(
        f"{len(summary['done'])} done, {len(summary['failed'])} failed, {len(summary['pending'])} pending "
        f"({len(summary['ran'])} run now{busy}); report: {Path(out) / 'ablation.md'}"
    )
    if summary["failed"]:
        print(f"fairtune sweep: {len(summary['failed'])} run(s) failed:", file=sys.stderr)
        for h in summary["failed"]:
            s = summary["runs"][h]
            why = " ".join(ln.strip() for ln in (s.get("error") or "").strip().splitlines()[:3])[:300]
            print(
                f"  {h} {s.get('label')} seed {s.get('seed')} ({s.get('stage')}): "
                f"{why} (see {Path(out) / 'runs' / h / 'status.json'})",
                file=sys.stderr,
            )
        raise SystemExit(1)
