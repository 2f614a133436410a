"""Issue 26: how long light commands take to answer (`fairtune --help`, `flag list`, `review --help`),
against `fairtune compare --help` (which loads the model stack). Goal: <= 2 s to the answer on 2 cores.

    python benchmarks/startup.py            # 5 runs each; writes benchmarks/results/startup.{json,md}

Wall time is what a user waits; CPU time (user + system of the command) is what it costs and moves
less when the machine is busy: both are reported (median and range over the runs).
"""

from __future__ import annotations

import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import write_results
from fairtune.eval import Goal, check_goal

GOAL_S = 2.0


def _fairtune() -> list[str]:
    exe = shutil.which("fairtune", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "fairtune.cli"]


def measure(args: list[str], runs: int) -> dict:
    walls, cpus = [], []
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        subprocess.run([*_fairtune(), *args], capture_output=True, check=False)
        walls.append(time.perf_counter() - t)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime))
    return {
        "wall_median": statistics.median(walls), "wall_min": min(walls), "wall_max": max(walls),
        "cpu_median": statistics.median(cpus), "runs": runs,
    }  # fmt: skip


def main(runs: int = 5) -> dict:
    db = Path(tempfile.mkdtemp()) / "flags.sqlite"
    cases = {
        "fairtune --help": ["--help"],
        "fairtune flag list --db F": ["flag", "list", "--db", str(db)],
        "fairtune review --help": ["review", "--help"],
        "fairtune compare --help (full stack, for reference)": ["compare", "--help"],
    }
    env_note = f"{os.cpu_count()} CPUs, Python {platform.python_version()}"
    results = {name: measure(args, runs) for name, args in cases.items()}
    rows = []
    for name, r in results.items():
        met = check_goal(Goal("wall_median", "<=", GOAL_S), r["wall_median"])["met"]
        goal = "" if "reference" in name else ("met" if met else "missed")
        wall = f"{r['wall_median']:.2f} [{r['wall_min']:.2f}, {r['wall_max']:.2f}]"
        rows.append(f"| {name} | {wall} | {r['cpu_median']:.2f} | {goal} |")
    md = "\n".join(
        [
            "# startup: seconds until a light command answers (`python benchmarks/startup.py`)",
            "",
            f"{runs} runs each on this machine ({env_note}); wall: median [min, max]; CPU: user + system.",
            "",
            f"| command | wall s | CPU s | goal ≤ {GOAL_S:.0f} s |",
            "|---|---|---|---|",
            *rows,
            "",
        ]
    )
    payload = {"goal_s": GOAL_S, "machine": env_note, "results": results}
    write_results("startup", payload, md)
    return payload


if __name__ == "__main__":
    main()
