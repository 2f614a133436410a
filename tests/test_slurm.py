"""SLURM for real (issue 12): a one-node cluster on this machine (tests/slurm_cluster.py; skipped where
it cannot start) runs what users submit: the sweep's job array and its aggregation job, with a crafted
name and out path passed through unharmed; ``scripts/slurm_fit.sbatch`` training over gloo with 2
tasks; and a fit job requeued while it trains, resuming from its checkpoint."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from slurm_cluster import cluster_fixture
from test_distributed import tiny_base, tiny_config  # noqa: F401 - tiny_base is a fixture

from fairtune.cli import load_spec, main
from fairtune.models import LORA_WEIGHT_NAME

ROOT = Path(__file__).resolve().parent.parent
ABLATIONS = ROOT / "configs" / "ablations"
CPU_SLURM = {"gpus_per_task": 0, "cpus_per_task": 1, "mem": "1G", "time": "00:20:00"}

slurm = pytest.fixture(scope="session")(cluster_fixture)


def _spec(folder: Path, base: Path, name: str, seeds=(0,)) -> Path:
    spec = {
        "name": name,
        "base": [str(base)],
        "arms": {"naive": [str(ABLATIONS / "naive.yaml")]},
        "seeds": list(seeds),
        "judge": None,
        "slurm": CPU_SLURM,
    }
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _submit(slurm, submit: Path, **env) -> tuple[str, str]:
    """``bash submit.sh`` against the cluster; the array's and the report's job ids."""
    res = subprocess.run(
        ["bash", str(submit)], cwd=ROOT, env={**slurm.env, **env}, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr
    m = re.search(r"submitted array (\d+), report (\d+)", res.stdout)
    assert m, res.stdout
    return m.group(1), m.group(2)


def _squeue(slurm, job: str, field: str) -> list[str]:
    res = slurm.run("squeue", "-h", "-r", "-j", job, "-O", f"{field}:500")
    return [ln.strip() for ln in res.stdout.splitlines()]


def test_submit_sh_hands_sbatch_a_crafted_name_and_path_whole(slurm, tmp_path):
    """Real sbatch, jobs held (SBATCH_HOLD): the job name and the log path arrive as written, with
    their spaces, quotes, `;` and `$( )`, and no injected command ran."""
    weird = tmp_path / 'd\'q "x"; touch PWNED_DIR'
    weird.mkdir()
    name = "x; touch PWNED $(touch PWNED2) 'q\""
    spec_path = _spec(weird, ABLATIONS / "naive.yaml", name, seeds=[0, 1])
    out = weird / "out ;$(touch PWNED3) 50%"
    main(["sweep", str(spec_path), "--out", str(out), "--slurm", "true"])
    array, report = _submit(slurm, out / "submit.sh", SBATCH_HOLD="1")
    try:
        assert set(_squeue(slurm, array, "Name")) == {f"ft-{name}"}
        # stored as given: sbatch's pattern, the folder's % doubled (expanded to % when the job writes)
        pattern = str(out).replace("%", "%%") + "/slurm/%A_%a.out"
        assert _squeue(slurm, array, "STDOUT") == [pattern] * 2
        assert _squeue(slurm, array, "ArrayTaskID") == ["0", "1"]
        assert _squeue(slurm, report, "Name") == [f"ft-{name}-report"]
        assert _squeue(slurm, report, "Dependency") == [f"afterany:{array}_*(unfulfilled)"]
    finally:
        slurm.run("scancel", array, report, check=False)
    assert [p for d in (tmp_path, weird, out, ROOT) for p in d.glob("PWNED*")] == []


@pytest.mark.slow
def test_sweep_array_and_report_run_on_slurm(slurm, digits_dir, tiny_base, tmp_path):  # noqa: F811
    base = tiny_config(digits_dir, tiny_base, tmp_path / "tiny.yaml", **{"trainer.max_steps": 2})
    spec_path = _spec(tmp_path, base, "slurm sweep", seeds=[0, 1])
    out = tmp_path / "out dir"
    main(["sweep", str(spec_path), "--out", str(out), "--slurm", "true"])
    array, report = _submit(slurm, out / "submit.sh")
    states = slurm.wait([array, report], timeout=900)
    logs = {p.name: p.read_text()[-1500:] for p in (out / "slurm").glob("*.out")}
    assert set(states.values()) == {"COMPLETED"}, (states, logs)
    assert len(states) == 3  # two array tasks and the report
    for run in load_spec(spec_path).runs:
        d = out / "runs" / run.hash
        assert json.loads((d / "status.json").read_text())["state"] == "done"
        assert (d / "adapter" / LORA_WEIGHT_NAME).is_file()
    assert "2 of 2 runs done, 0 failed" in (out / "ablation.md").read_text()
    assert (out / "slurm" / f"report-{report}.out").is_file()


def _fit_job(slurm, cfg: Path, run: Path, log: Path, *args: str) -> str:
    res = slurm.run(
        "sbatch", "--parsable", "--nodes=1", "--gpus-per-node=0", "--cpus-per-task=1", "--mem=2G",
        "--time=00:20:00", "--open-mode=append", f"--output={log}", *args,
        str(ROOT / "scripts" / "slurm_fit.sbatch"), "--config", str(cfg),
        "--trainer.default_root_dir", str(run),
    )  # fmt: skip
    return res.stdout.strip().split(";")[0]


@pytest.mark.slow
def test_slurm_fit_sbatch_trains_over_gloo_with_two_tasks(slurm, digits_dir, tiny_base, tmp_path):  # noqa: F811
    cfg = tiny_config(digits_dir, tiny_base, tmp_path / "tiny.yaml", **{"trainer.max_steps": 4})
    ddp = tmp_path / "ddp.yaml"  # configs/launch/cpu_ddp.yaml, as a second --config
    ddp.write_text((ROOT / "configs" / "launch" / "cpu_ddp.yaml").read_text())
    run, log = tmp_path / "run", tmp_path / "fit.out"
    job = slurm.run(
        "sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1",
        "--mem=2G", "--time=00:20:00", f"--output={log}", str(ROOT / "scripts" / "slurm_fit.sbatch"),
        "--config", str(cfg), "--config", str(ddp), "--trainer.default_root_dir", str(run),
    ).stdout.strip()  # fmt: skip
    states = slurm.wait([job], timeout=600)
    text = log.read_text() if log.exists() else ""
    assert states == {job: "COMPLETED"}, text[-3000:]
    assert "1 node(s) x 2 task(s)" in text
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in text
    assert (run / "adapter" / LORA_WEIGHT_NAME).is_file()
    assert (run / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow
def test_a_requeued_fit_job_resumes_from_its_checkpoint(slurm, digits_dir, tiny_base, tmp_path):  # noqa: F811
    cfg = tiny_config(digits_dir, tiny_base, tmp_path / "tiny.yaml", **{"trainer.max_steps": 200})
    run, log = tmp_path / "run", tmp_path / "fit.out"
    job = _fit_job(slurm, cfg, run, log, "--ntasks-per-node=1")
    try:
        deadline = time.monotonic() + 300
        while not (run / "checkpoints" / "last.ckpt").exists():
            assert time.monotonic() < deadline and slurm.job_state(job) in ("PENDING", "RUNNING"), (
                log.read_text()
            )
            time.sleep(0.2)
        slurm.run("scontrol", "requeue", job)
        states = slurm.wait([job], timeout=600)
    finally:
        slurm.run("scancel", job, check=False)
    text = log.read_text()
    assert states == {job: "COMPLETED"}, text[-3000:]
    assert text.count("fairtune: 1 node(s) x 1 task(s)") == 2  # started twice
    assert "Restoring states from the checkpoint path" in text.split("fairtune: 1 node(s)")[2]
    assert (run / "adapter" / LORA_WEIGHT_NAME).is_file()
    assert "Restarts=1" in slurm.run("scontrol", "show", "job", job).stdout
    assert os.path.isdir(run / "logs" / "version_1")  # a second launch, resumed
