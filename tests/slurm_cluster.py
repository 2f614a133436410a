"""A one-node SLURM cluster on this machine, for the tests that submit real jobs (tests/test_slurm.py).

Debian's ``slurm-wlm`` and ``munge`` (``apt-get install -y slurm-wlm munge``; ``.ci/run`` installs
them): ``munged``, ``slurmctld`` and ``slurmd`` are started from a private folder (their own key,
socket, ports, state and logs; nothing under ``/etc`` is used or changed), this host is the controller
and the only compute node (2 CPUs, no GPU), with the plugins that work in a container (no cgroups:
``proctrack/linuxproc``, ``task/none``, ``select/cons_tres``). The client commands find the cluster
through ``SLURM_CONF``. Where SLURM cannot start (not installed, not root, a daemon that does not come
up), :func:`start_cluster` raises :class:`ClusterUnavailable` with the reason, and the fixture skips.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "sinfo", "scontrol", "scancel", "srun")
SBIN = ("/usr/sbin", "/usr/bin", "/sbin")
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED")


class ClusterUnavailable(RuntimeError):
    """SLURM cannot run here; the message says why."""


@dataclass
class Cluster:
    """A running one-node cluster.

    Attributes:
        root: Its folder (config, keys, state, logs).
        conf: ``slurm.conf``; set ``SLURM_CONF`` to it (``env``) for the client commands.
        node: The node's name (this host's short name).
        partition: The one partition.
        cpus: CPUs of the node.
        procs: The daemons started (stopped by :meth:`stop`).
    """

    root: Path
    conf: Path
    node: str
    partition: str = "debug"
    cpus: int = 2
    procs: dict[str, int] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        """The environment the client commands (and the jobs they submit) need."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """A client command (``sbatch``, ``squeue``, ``scontrol``...) against this cluster."""
        res = subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} exited {res.returncode}: {res.stderr.strip()}")
        return res

    def job_state(self, job_id: str) -> str:
        """The state of a job (``PENDING``, ``RUNNING``, ``COMPLETED``...); ``""`` once forgotten."""
        res = self.run("scontrol", "-o", "show", "job", job_id, check=False)
        for tok in res.stdout.split():
            if tok.startswith("JobState="):
                return tok.split("=", 1)[1]
        return ""

    def wait(self, job_ids: list[str], timeout: float, states: tuple[str, ...] = ENDED) -> dict[str, str]:
        """Wait until every job (an array job's every task) is in one of ``states``; their states."""
        deadline = time.monotonic() + timeout
        while True:
            found: dict[str, str] = {}
            for jid in job_ids:
                res = self.run("scontrol", "-o", "show", "job", jid, check=False)
                for line in res.stdout.splitlines():
                    fields = dict(t.split("=", 1) for t in line.split() if "=" in t)
                    key = fields.get("JobId", jid)
                    if fields.get("ArrayTaskId"):
                        key = f"{fields.get('ArrayJobId')}_{fields['ArrayTaskId']}"
                    found[key] = fields.get("JobState", "")
            if found and all(s in states for s in found.values()):
                return found
            if time.monotonic() > deadline:
                raise TimeoutError(f"jobs {job_ids} not finished after {timeout:.0f} s: {found}")
            time.sleep(1)

    def stop(self) -> None:
        """Cancel every job, stop the daemons (slurmd, slurmctld, munged)."""
        if "slurmctld" in self.procs:
            self.run("scancel", "--full", "--partition", self.partition, check=False, timeout=20)
        for name in reversed(DAEMONS):
            pid = self.procs.pop(name, None)
            if pid is None:
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            for _ in range(100):
                if not _alive(pid):
                    break
                time.sleep(0.1)
            else:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie left for a reaper that a container may not have)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def _which(name: str) -> str | None:
    return shutil.which(name) or next((str(Path(d) / name) for d in SBIN if (Path(d) / name).is_file()), None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read_pid(path: Path, timeout: float) -> int | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            pid = int(path.read_text().strip())
            os.kill(pid, 0)
            return pid
        except (FileNotFoundError, ValueError, ProcessLookupError):
            time.sleep(0.2)
    return None


def _tail(path: Path, n: int = 8) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-n:])
    except FileNotFoundError:
        return f"(no {path.name})"


def start_cluster(root: Path, cpus: int = 2, timeout: float = 60) -> Cluster:
    """Start munged, slurmctld and slurmd in ``root`` and wait until the node takes jobs.

    Raises:
        ClusterUnavailable: SLURM is not installed, this is not root (the daemons run as root here),
            or a daemon did not come up (the reason and its log's last lines).
    """
    missing = [n for n in (*DAEMONS, *CLIENTS) if _which(n) is None]
    if missing:
        raise ClusterUnavailable(
            f"SLURM is not installed ({', '.join(missing)} not found); "
            "install it with: apt-get install -y slurm-wlm munge"
        )
    if os.geteuid() != 0:
        raise ClusterUnavailable("the one-node SLURM cluster runs its daemons as root; this is not root")
    root = Path(root).resolve()
    for sub in ("munge", "state", "spool", "log"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "munge").chmod(0o700)
    node = socket.gethostname().split(".")[0]
    cluster = Cluster(root=root, conf=root / "slurm.conf", node=node, cpus=cpus)

    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    sock = root / "munge" / "munge.socket"
    mem_mb = int(next(ln.split()[1] for ln in open("/proc/meminfo") if ln.startswith("MemTotal"))) // 1024
    conf = f"""\
ClusterName=fairtune-test
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={sock},cred_expire=10
CredType=cred/munge
StateSaveLocation={root / "state"}
SlurmdSpoolDir={root / "spool"}
SlurmctldPidFile={root / "slurmctld.pid"}
SlurmdPidFile={root / "slurmd.pid"}
SlurmctldLogFile={root / "log" / "slurmctld.log"}
SlurmdLogFile={root / "log" / "slurmd.log"}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=5
# a requeued job may start again after cred_expire (default 120 s)
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={max(1024, mem_mb // 2)} State=UNKNOWN
PartitionName={cluster.partition} Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""
    cluster.conf.write_text(conf)
    env = cluster.env

    def daemon(name: str, args: list[str], pidfile: Path, log: Path) -> None:
        res = subprocess.run([_which(name), *args], env=env, capture_output=True, text=True, timeout=30)
        pid = _read_pid(pidfile, timeout=timeout / 3)
        if res.returncode != 0 or pid is None:
            cluster.stop()
            raise ClusterUnavailable(
                f"{name} did not start (exit {res.returncode}): {res.stderr.strip()[-500:]} {_tail(log)}"
            )
        cluster.procs[name] = pid

    daemon(
        "munged",
        [
            "--force",
            f"--socket={sock}",
            f"--key-file={key}",
            f"--pid-file={root / 'munge' / 'munged.pid'}",
            f"--log-file={root / 'log' / 'munged.log'}",
            f"--seed-file={root / 'munge' / 'munged.seed'}",
        ],
        root / "munge" / "munged.pid",
        root / "log" / "munged.log",
    )
    daemon("slurmctld", ["-f", str(cluster.conf)], root / "slurmctld.pid", root / "log" / "slurmctld.log")
    daemon("slurmd", ["-f", str(cluster.conf), "-N", node], root / "slurmd.pid", root / "log" / "slurmd.log")

    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        res = cluster.run("sinfo", "-h", "-N", "-o", "%T", check=False)
        state = res.stdout.strip()
        if state in ("idle", "mixed", "allocated"):
            return cluster
        if state.startswith(("down", "drain")):
            cluster.run("scontrol", "update", f"NodeName={node}", "State=RESUME", check=False)
        time.sleep(0.5)
    cluster.stop()
    raise ClusterUnavailable(
        f"the node did not become idle in {timeout:.0f} s (state {state!r}): "
        f"{_tail(root / 'log' / 'slurmctld.log')} {_tail(root / 'log' / 'slurmd.log')}"
    )


def cluster_fixture(tmp_path_factory):
    """The session's cluster (a generator for a pytest fixture): started once, stopped at the end;
    skips with the reason where it cannot start. With ``FAIRTUNE_TEST_INSTALL_SLURM=1`` a missing
    SLURM is installed first (``apt-get install -y slurm-wlm munge``, as root)."""
    import pytest

    if os.environ.get("FAIRTUNE_TEST_INSTALL_SLURM") == "1" and _which("slurmctld") is None:
        subprocess.run(
            "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "
            "--no-install-recommends slurm-wlm munge",
            shell=True,
            capture_output=True,
            timeout=900,
        )
    try:
        cluster = start_cluster(tmp_path_factory.mktemp("slurm"))
    except ClusterUnavailable as e:
        pytest.skip(f"no SLURM cluster: {e}")
    try:
        yield cluster
    finally:
        cluster.stop()
