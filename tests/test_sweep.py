"""Ablation sweeps (issue 6): `fairtune sweep` trains every arm x seed with `fairtune fit`, judges it,
resumes after an interruption without redoing finished runs, records a failed run without stopping,
and aggregates per arm (mean and 95% t-interval over seeds)."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from scipy import stats
from test_distributed import tiny_base, tiny_config  # noqa: F401 - tiny_base is a fixture

from fairtune.cli import SweepError, check_goals, load_spec, main, read_status, run_sweep
from fairtune.cli._sweep import _error_summary
from fairtune.eval import t_interval
from fairtune.models import LORA_WEIGHT_NAME

ABLATIONS = Path(__file__).resolve().parent.parent / "configs" / "ablations"


@pytest.fixture(scope="session")
def quick_judges(digits_dir, tmp_path_factory):
    """Judges trained for one epoch (seconds, not minutes): the sweep tests check the plumbing and the
    aggregation, not the judges' accuracy (tests/test_judges.py does that with the full recipe)."""
    from fairtune.colored_digits import JudgeTrainConfig, train_judges

    out = tmp_path_factory.mktemp("quick_judges")
    train_judges(digits_dir, out, JudgeTrainConfig(digit_epochs=1, color_epochs=1, width=8, feature_dim=16))
    return out


def _spec(tmp_path, base, quick_judges, **extra) -> Path:
    spec = {
        "name": "tiny",
        "base": [str(base)],
        "arms": {
            # nothing trained: the base model judged as it is (its config resolved, no training)
            "base": {"configs": [], "train": False, "seeds": [0]},
            "naive": [str(ABLATIONS / "naive.yaml")],
            # a misspelt key: fairtune fit refuses it before training
            "broken": {
                "configs": [str(ABLATIONS / "naive.yaml")],
                "values": {"model.lora.rnk": 4},
                "seeds": [0],
            },
            # one seed (a fit subprocess fewer): the aggregate over seeds is checked on naive
            "sampler": {"configs": [str(ABLATIONS / "sampler.yaml")], "seeds": [0]},
        },
        "seeds": [0, 1],
        "judge": {
            "function": "fairtune.colored_digits:judge_colored_digits",
            "options": {
                "judges": str(quick_judges),
                "n_per_prompt": 2,
                "steps": 2,
                "digits": [0, 1, 8],
                "color_judge": "cnn",  # the tiny random base draws noise: the hue judge abstains
            },
        },
        "report": {"metrics": ["mean_dev_seen", "fidelity"]},
        "goals": [
            {"arm": "naive", "metric": "mean_dev_seen", "max": 1.0},
            {"arm": "naive", "metric": "fidelity", "relative_to": "base", "min": 2.0},  # cannot be met
        ],
        **extra,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _mtimes(run: Path) -> dict:
    files = [run / "status.json", run / "fit.log", run / "adapter" / LORA_WEIGHT_NAME]
    return {p: p.stat().st_mtime_ns for p in files}


def test_sweep_resumes_records_failures_and_aggregates(digits_dir, quick_judges, tiny_base, tmp_path, capsys):  # noqa: F811
    base = tiny_config(digits_dir, tiny_base, tmp_path / "tiny.yaml", **{"trainer.max_steps": 2})
    spec_path = _spec(tmp_path, base, quick_judges)
    out = tmp_path / "sweep"
    spec = load_spec(spec_path)
    assert [(r.arm, r.seed) for r in spec.runs] == [
        ("base", 0), ("naive", 0), ("naive", 1), ("broken", 0), ("sampler", 0),
    ]  # fmt: skip
    assert len({r.hash for r in spec.runs}) == 5

    # --- interrupted: only the first three runs get done (the untrained base arm and naive's two)
    first = run_sweep(spec_path, out, max_runs=3, workers=2)
    base_run = out / "runs" / spec.runs[0].hash
    naive = [out / "runs" / r.hash for r in spec.runs[1:3]]
    assert sorted(first["ran"]) == sorted([base_run.name] + [p.name for p in naive])
    assert len(first["done"]) == 3 and len(first["pending"]) == 2 and not first["failed"]
    # the untrained arm: judged as it is, nothing trained
    assert (base_run / "config.yaml").is_file() and not (base_run / "adapter").exists()
    assert not (base_run / "fit.log").exists()
    assert "mean_dev_seen" in read_status(base_run)["metrics"]
    for run in naive:
        status = json.loads((run / "status.json").read_text())
        assert status["state"] == "done" and 0 <= status["metrics"]["mean_dev_seen"] <= 1
        assert (run / "config.yaml").exists() and (run / "checkpoints" / "last.ckpt").exists()
    assert "| naive | 2 |" in (out / "ablation.md").read_text()
    before = {run: _mtimes(run) for run in naive}

    # --- restarted: only the missing runs train; the bad override fails alone
    second = run_sweep(spec_path, out, workers=2)
    broken, sampler = spec.runs[3], spec.runs[4:]
    assert sorted(second["ran"]) == sorted([broken.hash] + [r.hash for r in sampler])
    assert len(second["done"]) == 4 and second["failed"] == [broken.hash] and not second["pending"]
    for run in naive:  # finished runs untouched: not retrained, not re-judged
        assert _mtimes(run) == before[run]
        assert (run / "fit.log").read_text().count("\n$ ") == 1
    failed = json.loads((out / "runs" / broken.hash / "status.json").read_text())
    assert failed["state"] == "failed" and failed["stage"] == "train" and "rnk" in failed["error"]
    events = [json.loads(x) for x in (out / "sweep.jsonl").read_text().splitlines()]
    states = [e["state"] for e in events]
    assert states.count("done") == 4 and states.count("failed") == 1

    # --- started again without retrying failures: nothing to do
    assert run_sweep(spec_path, out, retry_failed=False)["ran"] == []
    # the command exits 1, listing the failed run on stderr
    with pytest.raises(SystemExit) as e:
        main(["sweep", str(spec_path), "--out", str(out), "--retry_failed", "false"])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "1 run(s) failed" in err and f"{broken.hash} broken seed 0 (train)" in err
    assert 'Parser key "model.lora"' in err and str(out / "runs" / broken.hash / "status.json") in err

    # --- the aggregate: one row per arm, mean and t-interval over the seeds' metrics
    with open(out / "ablation.csv") as f:
        rows = {r["arm"]: r for r in csv.DictReader(f)}
    assert list(rows) == ["base", "naive", "broken", "sampler"]
    assert rows["broken"]["n"] == "0" and rows["broken"]["n_failed"] == "1"
    assert rows["sampler"]["n"] == "1"
    for arm, runs in (("naive", spec.runs[1:3]),):
        vals = [json.loads((out / "runs" / r.hash / "status.json").read_text())["metrics"] for r in runs]
        devs = [v["mean_dev_seen"] for v in vals]
        mean = sum(devs) / 2
        half = stats.t.ppf(0.975, 1) * stats.tstd(devs) / math.sqrt(2)
        assert rows[arm]["n"] == "2"
        assert float(rows[arm]["mean_dev_seen_mean"]) == pytest.approx(mean)
        assert float(rows[arm]["mean_dev_seen_ci_high"]) == pytest.approx(mean + half)
        assert float(rows[arm]["fidelity_mean"]) == pytest.approx(sum(v["fidelity"] for v in vals) / 2)
        assert "train_seconds_mean" in rows[arm] and "red_share_d8_mean" in rows[arm]
    md = (out / "ablation.md").read_text()
    assert "| arm | n | mean_dev_seen | fidelity |" in md
    assert f"{float(rows['naive']['mean_dev_seen_mean']):.4g} ±" in md
    assert "## Failed runs" in md and broken.hash in md
    assert (out / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the spec's goals, checked against the arms' means (one relative to the untrained base arm)
    assert "## Goals" in md and "missed by" in md and ": met" in md
    means = [{"arm_name": "base", "fidelity_mean": 0.5},
             {"arm_name": "naive", "fidelity_mean": 0.75, "mean_dev_seen_mean": 0.5}]  # fmt: skip
    checks = check_goals(spec, means)
    assert checks[0]["met"] is True
    assert checks[1]["value"] == pytest.approx(0.25) and checks[1]["met"] is False
    assert checks[1]["missed_by"] == pytest.approx(1.75)

    # --- the CLI: the report alone, and a SLURM job array instead of running
    (out / "ablation.md").unlink()
    main(["sweep", str(spec_path), "--out", str(out), "--aggregate_only", "true"])
    assert "| sampler | 1 |" in (out / "ablation.md").read_text()
    main(["sweep", str(spec_path), "--out", str(out), "--slurm", "true"])
    sbatch = (out / "sweep.sbatch").read_text()
    assert "#SBATCH --array=0-4" in sbatch and '--index "$SLURM_ARRAY_TASK_ID"' in sbatch
    assert "--aggregate_only true" in (out / "submit.sh").read_text()
    # an array task whose run is done does nothing
    assert run_sweep(spec_path, out, index=0)["ran"] == []

    # --- other judge settings: every done run is judged again, none is trained again
    done = [out / "runs" / r.hash for r in spec.runs if r.arm not in ("broken", "base")]
    ckpts = {run: (run / "checkpoints" / "last.ckpt").stat().st_mtime_ns for run in done}
    raw = yaml.safe_load(spec_path.read_text())
    raw["judge"]["options"]["n_per_prompt"] = 3
    spec_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    third = run_sweep(spec_path, out, retry_failed=False)
    assert sorted(third["ran"]) == sorted([base_run.name] + [run.name for run in done])
    assert len(third["done"]) == 4
    for run in done:
        assert (run / "checkpoints" / "last.ckpt").stat().st_mtime_ns == ckpts[run]
        assert (run / "fit.log").read_text().count("\n$ ") == 1


@pytest.mark.parametrize(
    "spec, needle",
    [
        ({"arms": {"a": []}, "sede": [0]}, "unknown keys ['sede']"),
        ({"arms": {"a": ["no/such/overlay.yaml"]}}, "no/such/overlay.yaml"),
        ({"arms": {"a": []}, "grid": {"model.lora.rank": []}}, "grid.model.lora.rank"),
        ({"arms": {"a": []}, "seeds": ["x"]}, "seed is an integer"),
        ({"arms": {"a": {"config": []}}}, "arms.a has unknown keys ['config']"),
        ({"arms": {"a": []}, "judge": {"function": "fairtune.nothing:here"}}, "cannot be imported"),
        ({"arms": {"a": []}, "judge": {"options": {}}}, "judge.function is not set"),
    ],
)
def test_bad_spec_fails_before_any_run_naming_the_problem(tmp_path, spec, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    with pytest.raises(SweepError, match=None) as e:
        run_sweep(path, tmp_path / "out")
    assert needle in str(e.value)
    assert not (tmp_path / "out" / "runs").exists()


def test_grid_and_seeds_expand_with_stable_hashes(tmp_path):
    spec = {
        "arms": {"naive": [str(ABLATIONS / "naive.yaml")], "sampler": [str(ABLATIONS / "sampler.yaml")]},
        "grid": {"model.lora.rank": [4, 8], "model.optim.lr": [1e-3]},
        "seeds": [0, 1, 2],
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    a, b = load_spec(path), load_spec(path)
    assert len(a.runs) == 2 * 2 * 3 and [r.hash for r in a.runs] == [r.hash for r in b.runs]
    assert len({r.hash for r in a.runs}) == 12
    assert a.runs[0].label == "naive rank=4 lr=0.001" and a.runs[3].label == "naive rank=8 lr=0.001"
    cmd = a.runs[4].fit_command(tmp_path / "r")
    assert "--model.lora.rank=8" in cmd and "--model.seed=1" in cmd and "--seed_everything=1" in cmd
    assert f"--trainer.default_root_dir={tmp_path / 'r'}" in cmd
    assert cmd[-1] == "--trainer.callbacks.prefix=[sweep] naive rank=8 lr=0.001 seed 1:"
    # a comment in an overlay does not change a run's identity; a value does
    overlay = tmp_path / "naive.yaml"
    overlay.write_text((ABLATIONS / "naive.yaml").read_text())
    spec["arms"] = {"naive": [str(overlay)]}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    h1 = load_spec(path).runs[0].hash
    overlay.write_text("# a new comment\n" + overlay.read_text())
    assert load_spec(path).runs[0].hash == h1 == a.runs[0].hash
    overlay.write_text(overlay.read_text() + "trainer:\n  max_steps: 7\n")
    assert load_spec(path).runs[0].hash != h1


def test_t_interval_and_error_summary():
    mean, lo, hi = t_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and hi - mean == pytest.approx(stats.t.ppf(0.975, 2) * 1.0 / math.sqrt(3))
    assert math.isnan(t_interval([1.0])[1]) and t_interval([1.0])[0] == 1.0
    log = "Traceback (most recent call last):\n  File x\nValueError: model.prompt_dropout must be in [0, 1)\n"
    assert _error_summary(log) == "ValueError: model.prompt_dropout must be in [0, 1)"
    log = 'usage: fairtune ...\nerror: Parser key "model.lora":\n  rnk is not expected\n'
    assert _error_summary(log).startswith('error: Parser key "model.lora"') and "rnk" in _error_summary(log)


def test_the_shipped_ablation_spec_expands_to_commands_fit_accepts():
    """configs/sweeps/ablation.yaml: 7 arms x 3 seeds, and every arm's command parses with the real
    fit CLI (nothing trained)."""
    from test_distributed import parse

    spec = load_spec(Path(__file__).resolve().parent.parent / "configs" / "sweeps" / "ablation.yaml")
    assert len(spec.runs) == 21 and len({r.hash for r in spec.runs}) == 21
    assert [r.arm for r in spec.runs[::3]] == [Path(r.configs[-1]).stem for r in spec.runs[::3]]
    for run in spec.runs[::3]:
        args = run.fit_command(Path("/tmp/never-written"))[4:]
        cfg = parse(args=args)
        assert cfg.seed_everything == cfg.model.seed == cfg.data.seed == run.seed
        assert cfg.trainer.default_root_dir == "/tmp/never-written"


def test_a_goal_naming_no_arm_of_the_spec_is_refused(tmp_path):
    raw = {"name": "g", "base": [], "arms": {"naive": [str(ABLATIONS / "naive.yaml")]}, "judge": None,
           "goals": [{"arm": "nope", "metric": "fidelity", "max": 1}]}  # fmt: skip
    spec_path = tmp_path / "g.yaml"
    spec_path.write_text(yaml.safe_dump(raw))
    with pytest.raises(SweepError, match="names arm 'nope'"):
        load_spec(spec_path)


# ------------------------------------------------------------------------- reliability (issue 12)
ROOT = Path(__file__).resolve().parent.parent


def _plain_spec(tmp_path, base, seeds=(0,), **extra) -> Path:
    """One arm, no judge: what the fault-injection tests train."""
    spec = {"name": "faults", "base": [str(base)], "arms": {"naive": [str(ABLATIONS / "naive.yaml")]}}
    spec.update({"seeds": list(seeds), "judge": None, **extra})
    path = tmp_path / "faults.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _sweep_cmd(spec_path, out) -> list[str]:
    return [sys.executable, "-m", "fairtune.cli", "sweep", str(spec_path), "--out", str(out)]


def _dead(pid: int) -> bool:
    """Gone, or a zombie (exited, waiting for a reaper that may not exist in a container)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def _descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of every live descendant of ``pid``, from /proc."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            rest = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if rest[0] not in ("Z", "X"):
            parents[int(stat.parent.name)] = int(rest[1])
    found, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        for child, parent in parents.items():
            if parent == p:
                try:
                    cmd = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                except OSError:
                    continue
                found.append((child, cmd))
                frontier.append(child)
    return found


def _wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def test_a_run_locked_by_another_process_is_left_to_it(tmp_path):
    """The lock on runs/<hash>/.lock, held here as another sweep would: the sweep trains nothing,
    reports the run as held, and exits 0; once the lock is free, a probe finds it free."""
    from fairtune.cli._sweep_procs import RunLock

    spec_path = _plain_spec(tmp_path, ABLATIONS / "naive.yaml", seeds=[0, 1])
    out = tmp_path / "out"
    spec = load_spec(spec_path)
    locks = [RunLock(out / "runs" / r.hash) for r in spec.runs]
    assert all(lock.acquire() for lock in locks)
    summary = run_sweep(spec_path, out)
    assert summary["ran"] == [] and summary["busy"] == sorted(r.hash for r in spec.runs)
    assert not summary["failed"] and len(summary["pending"]) == 2
    assert not (out / "runs" / spec.runs[0].hash / "fit.log").exists()
    # another process sees the lock held; released, it is free
    check = (
        "import fcntl, sys\nf = open(sys.argv[1])\ntry:\n    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
        "    print(False)\nexcept BlockingIOError:\n    print(True)\n"
    )
    run_dir = str(out / "runs" / spec.runs[0].hash / ".lock")
    held = subprocess.run([sys.executable, "-c", check, run_dir], capture_output=True, text=True)
    assert held.stdout.strip() == "True", held.stderr
    locks[0].release()
    free = subprocess.run([sys.executable, "-c", check, run_dir], capture_output=True, text=True)
    assert free.stdout.strip() == "False", free.stderr


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_children_die_with_their_parent_grandchildren_too(tmp_path, sig):
    """A process using Children as the sweep does starts a child that starts a grandchild (as a DDP
    launcher does); kill the parent: both are gone. SIGKILL: PDEATHSIG for the child, the reaper for
    the group; SIGTERM: the parent's handler stops the group and exits 143."""
    script = tmp_path / "parent.py"
    script.write_text(
        "import importlib.util, subprocess, sys, time\n"
        "spec = importlib.util.spec_from_file_location('procs', sys.argv[1])\n"
        "procs = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(procs)\n"
        "c = procs.Children()\n"
        "with procs.killed_with_us(c):\n"
        "    p = c.popen(['bash', '-c', 'sleep 300 & echo $!; wait'], stdout=subprocess.PIPE, text=True)\n"
        "    print(p.pid, p.stdout.readline().strip(), flush=True)\n"
        "    time.sleep(300)\n"
    )
    procs = ROOT / "cli" / "_sweep_procs.py"  # loaded alone: no torch import, a fast start
    parent = subprocess.Popen([sys.executable, str(script), str(procs)], stdout=subprocess.PIPE, text=True)
    child, grandchild = (int(x) for x in parent.stdout.readline().split())
    assert not _dead(child) and not _dead(grandchild)
    assert os.getpgid(child) == child and os.getpgid(grandchild) == child  # their own group
    parent.send_signal(sig)
    assert parent.wait(30) == (-signal.SIGKILL if sig == signal.SIGKILL else 128 + signal.SIGTERM)
    _wait_for(lambda: _dead(child) and _dead(grandchild), 10, "the orphans to die")


def test_quoted_slurm_scripts_run_no_injected_command(tmp_path, monkeypatch, capsys):
    """A sweep name and an out path with spaces, quotes and `;`: the scripts parse (bash -n), sbatch gets
    each value as one argument (a fake sbatch on PATH records them), and nothing injected runs."""
    weird = tmp_path / 'we\'ird dir; touch PWNED_DIR "q"'
    weird.mkdir()
    name = "x; touch PWNED $(touch PWNED2) `touch PWNED3` 'q\" %j"
    spec_path = _plain_spec(weird, ABLATIONS / "naive.yaml", name=name)
    raw = yaml.safe_load(spec_path.read_text())
    raw["slurm"] = {"gpus_per_task": 0, "cpus_per_task": 1, "mem": "1G", "time": "00:10:00"}
    spec_path.write_text(yaml.safe_dump(raw))
    out = weird / "out 50% ;$(touch PWNED4)"
    main(["sweep", str(spec_path), "--out", str(out), "--slurm", "true"])
    sbatch, submit = out / "sweep.sbatch", out / "submit.sh"
    # the printed hint, pasted into a shell, is one argument too
    hint = capsys.readouterr().out.split("submit with: ")[1].strip()
    assert shlex.split(hint) == ["bash", str(submit)]
    for script in (sbatch, submit):
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = sbatch.read_text()
    assert "gres" not in text and "#SBATCH --cpus-per-task=1" in text  # gpus_per_task: 0 asks no GPU
    line = next(ln for ln in text.splitlines() if "--index" in ln)
    assert shlex.split(line)[3:] == [
        "sweep",
        str(spec_path.resolve()),
        "--out",
        str(out),
        "--index",
        "$SLURM_ARRAY_TASK_ID",
    ]

    fake = tmp_path / "bin"
    fake.mkdir()
    record = tmp_path / "sbatch-calls"
    (fake / "sbatch").write_text(
        f'#!/bin/bash\nfor a in "$@"; do printf \'%s\\0\' "$a"; done >> {shlex.quote(str(record))}\n'
        f"printf '\\n' >> {shlex.quote(str(record))}\necho 42\n"
    )
    (fake / "sbatch").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"}
    res = subprocess.run(["bash", str(submit)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    calls = [c.split("\0") for c in record.read_text().split("\0\n") if c]
    assert calls[0] == [
        "--parsable",
        f"--job-name=ft-{name}",
        f"--output={str(out).replace('%', '%%')}/slurm/%A_%a.out",
        str(sbatch),
    ]
    assert f"--job-name=ft-{name}-report" in calls[1] and "--dependency=afterany:42" in calls[1]
    wrap = calls[1][calls[1].index("--wrap") + 1]
    assert shlex.split(wrap)[-6:] == [
        "sweep",
        str(spec_path.resolve()),
        "--out",
        str(out),
        "--aggregate_only",
        "true",
    ]
    leftovers = [p for p in (tmp_path, weird, out, Path.cwd()) for p in p.glob("PWNED*")]
    assert leftovers == []

    raw["slurm"]["partition"] = "gpu\n#SBATCH --wrap=rm"
    spec_path.write_text(yaml.safe_dump(raw))
    with pytest.raises(SweepError, match="slurm.partition"):
        main(["sweep", str(spec_path), "--out", str(out), "--slurm", "true"])


@pytest.mark.slow
def test_a_sigkilled_sweep_leaves_no_orphan_and_its_restart_resumes_the_run(digits_dir, tiny_base, tmp_path):  # noqa: F811
    base = tiny_config(digits_dir, tiny_base, tmp_path / "tiny.yaml", **{"trainer.max_steps": 100})
    spec_path = _plain_spec(tmp_path, base)
    out = tmp_path / "out"
    run = out / "runs" / load_spec(spec_path).runs[0].hash
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    sweep = subprocess.Popen(_sweep_cmd(spec_path, out), cwd=ROOT, env=env, stderr=subprocess.DEVNULL)
    _wait_for(lambda: (run / "checkpoints" / "last.ckpt").exists(), 120, "the first checkpoint")
    fits = [p for p, cmd in _descendants(sweep.pid) if "fairtune.cli fit" in cmd]
    assert len(fits) == 1
    sweep.kill()  # SIGKILL: no handler runs
    sweep.wait()
    _wait_for(lambda: _dead(fits[0]), 10, "the fit child to die with its sweep")
    assert json.loads((run / "status.json").read_text())["state"] == "running"  # cut off

    again = subprocess.run(_sweep_cmd(spec_path, out), cwd=ROOT, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "done" and (run / "adapter" / LORA_WEIGHT_NAME).is_file()
    log = (run / "fit.log").read_text()
    assert log.count("\n$ ") == 2
    assert "Restoring states from the checkpoint path" in log.split("\n$ ")[2]  # resumed, not restarted


@pytest.mark.slow
def test_two_sweeps_on_one_folder_never_train_a_run_twice(digits_dir, tiny_base, tmp_path):  # noqa: F811
    base = tiny_config(digits_dir, tiny_base, tmp_path / "tiny.yaml", **{"trainer.max_steps": 4})
    spec_path = _plain_spec(tmp_path, base, seeds=[0, 1, 2])
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(_sweep_cmd(spec_path, out), cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    ran = [int(re.search(r"\((\d+) run now", o).group(1)) for o in outputs]
    assert sum(ran) == 3, outputs
    for r in load_spec(spec_path).runs:
        d = out / "runs" / r.hash
        assert json.loads((d / "status.json").read_text())["state"] == "done"
        assert (d / "fit.log").read_text().count("\n$ ") == 1  # trained once
    events = [json.loads(x) for x in (out / "sweep.jsonl").read_text().splitlines()]
    assert sorted(e["hash"] for e in events if e["state"] == "done") == sorted(
        r.hash for r in load_spec(spec_path).runs
    )
