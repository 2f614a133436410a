"""The sweep's hold on its runs and its children: a lock per run folder, and ``fairtune fit`` children
that die with the sweep.

- :class:`RunLock`: an exclusive ``flock`` on ``runs/<hash>/.lock``, taken before a run is trained or
  judged and held (by the sweep and by its ``fit`` child) until it is done, so no two processes, from
  two sweep starts or two SLURM tasks, train the same run. On a file system without ``flock`` the
  sweep falls back on the pid/host in ``status.json``.
- :class:`Children`: each ``fit`` child in its own process group (its DDP workers with it). When the
  sweep stops (an exception, SIGTERM, SIGINT, SIGHUP, exit), the groups get SIGTERM, then SIGKILL.
  When the sweep is SIGKILLed, the kernel kills the direct child (``PR_SET_PDEATHSIG``, Linux), and a
  small reaper process, which learns of the sweep's death when its pipe closes, kills the groups.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import errno
import fcntl
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

LOCK = ".lock"
# Reads "+PGID" / "-PGID" lines; at EOF (the sweep ended, however it died) kills the groups left.
_REAPER = """\
import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
groups = set()
for line in sys.stdin:
    op, pgid = line[0], int(line[1:])
    (groups.add if op == "+" else groups.discard)(pgid)
for g in groups:
    try:
        os.killpg(g, signal.SIGKILL)
    except OSError:
        pass
"""
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class RunLock:
    """An exclusive, non-blocking lock on ``run_dir/.lock``.

    Attributes:
        path: The lock file.
        supported: ``False`` where the file system has no ``flock`` (then :meth:`acquire` always
            succeeds and the caller relies on the status file's pid).
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK
        self.supported = True
        self._fd: int | None = None

    @property
    def fd(self) -> int | None:
        """The locked file's descriptor (hand it to a child to keep the lock while the child lives)."""
        return self._fd

    def acquire(self) -> bool:
        """Take the lock; ``False`` when another process holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except OSError as e:
            if e.errno not in _NO_FLOCK:
                os.close(fd)
                raise
            self.supported = False
        os.ftruncate(fd, 0)
        os.write(fd, f"{socket.gethostname()} {os.getpid()}\n".encode())
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor releases the flock
            self._fd = None

    def held_elsewhere(self) -> bool:
        """Whether another process holds the lock now (probes without keeping it)."""
        if self._fd is not None or not self.path.exists():
            return False
        if self.acquire():
            self.release()
            return False
        return True


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` asking the kernel to SIGKILL the child when the thread that started it dies
    (Linux); ``None`` elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before the line above
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


class Children:
    """Child processes, each in its own process group, that do not outlive the sweep.

    Attributes:
        stopping: Set once the sweep is stopping; no new child is started and a killed child's run
            is recorded as interrupted, not failed.
        grace: Seconds between SIGTERM and SIGKILL when the sweep stops its children.
    """

    def __init__(self, grace: float = 10.0) -> None:
        self.grace = grace
        self.stopping = threading.Event()
        self._procs: set[subprocess.Popen] = set()
        self._lock = threading.RLock()  # re-entered by a signal handler in the main thread
        self._reaper: subprocess.Popen | None = None
        self._preexec = _die_with_parent()

    def popen(self, cmd: list[str], *, pass_fds: tuple[int, ...] = (), **kwargs) -> subprocess.Popen:
        """Start ``cmd`` in a new session (its own process group), registered to be killed with us."""
        with self._lock:
            if self.stopping.is_set():
                raise InterruptedError("the sweep is stopping")
            proc = subprocess.Popen(
                cmd, start_new_session=True, preexec_fn=self._preexec, pass_fds=pass_fds, **kwargs
            )
            self._procs.add(proc)
            self._tell(f"+{proc.pid}")
        return proc

    def done(self, proc: subprocess.Popen) -> None:
        """Forget a child that has exited."""
        with self._lock:
            self._procs.discard(proc)
            self._tell(f"-{proc.pid}")

    def _tell(self, line: str) -> None:
        if self._reaper is None:
            self._reaper = subprocess.Popen(
                [sys.executable, "-c", _REAPER],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
                text=True,
            )
        with contextlib.suppress(OSError):
            self._reaper.stdin.write(line + "\n")
            self._reaper.stdin.flush()

    def stop(self) -> None:
        """SIGTERM every child's process group, then SIGKILL what is left after ``grace`` seconds."""
        self.stopping.set()
        with self._lock:
            procs = list(self._procs)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for proc in procs:
                with contextlib.suppress(OSError):
                    os.killpg(proc.pid, sig)
            deadline = time.monotonic() + (self.grace if sig == signal.SIGTERM else 5)
            while procs and time.monotonic() < deadline:
                procs = [p for p in procs if p.poll() is None]
                time.sleep(0.05)
            if not procs:
                break

    def close(self) -> None:
        """Stop the children left and the reaper."""
        if self._procs:
            self.stop()
        if self._reaper is not None:
            with contextlib.suppress(OSError):
                self._reaper.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._reaper.wait(5)
            self._reaper = None


@contextlib.contextmanager
def killed_with_us(children: Children) -> Iterator[None]:
    """Within: SIGTERM, SIGHUP and SIGINT stop the children first (SIGTERM and SIGHUP then exit with
    128 + the signal, SIGINT raises KeyboardInterrupt), and so does the interpreter's exit. The
    handlers are set only from the main thread (elsewhere the caller's own handling applies)."""
    previous: dict[int, object] = {}

    def handler(signum, frame) -> None:
        children.stop()
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            previous[sig] = signal.signal(sig, handler)
    atexit.register(children.close)
    try:
        yield
    finally:
        children.close()
        atexit.unregister(children.close)
        for sig, h in previous.items():
            signal.signal(sig, h)
