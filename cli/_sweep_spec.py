"""Sweep specs (arms x values x seeds) and the per-run status files of ``fairtune sweep``."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from fairtune.data import atomic_write_json

SPEC_KEYS = {
    "name", "base", "arms", "grid", "seeds", "seed_keys", "overrides", "judge", "report", "slurm", "goals",
}  # fmt: skip
ARM_KEYS = {"configs", "values", "seeds", "train"}
GOAL_KEYS = {"arm", "metric", "max", "min", "relative_to", "as"}
SLURM_KEYS = {
    "partition", "account", "time", "gpus_per_task", "cpus_per_task", "mem", "max_parallel", "extra", "setup",
}  # fmt: skip
DEFAULT_SEED_KEYS = ["seed_everything", "model.seed", "data.seed"]
STATUS = "status.json"
PROGRESS = "[sweep]"


class SweepError(ValueError):
    """A sweep spec that cannot run, named by what is wrong."""


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
        train: ``False``: nothing is trained; the model the configs describe is judged as it is
            (the base row of a benchmark).
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
    train: bool = True

    def fit_command(self, run_dir: Path) -> list[str]:
        """The ``fairtune fit`` command line of this run."""
        cmd = [sys.executable, "-m", "fairtune.cli", "fit"]
        for c in self.configs:
            cmd += ["--config", c]
        cmd.append("--trainer.enable_progress_bar=false")
        for key, value in {**self.overrides, **self.values}.items():
            cmd.append(f"--{key}={_cli_value(value)}")
        for key in self.seed_keys:
            cmd.append(f"--{key}={self.seed}")
        cmd.append(f"--trainer.default_root_dir={run_dir}")
        # a line per 25 steps (step, rate, time left), echoed by the runner while the child trains
        cmd += [
            "--trainer.callbacks+=fairtune.train.ProgressLog",
            f"--trainer.callbacks.prefix={self.progress_prefix}",
        ]
        return cmd

    @property
    def progress_prefix(self) -> str:
        return f"{PROGRESS} {self.label} seed {self.seed}:"


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
    goals: list[dict] = field(default_factory=list)

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


def load_spec(
    path: str | os.PathLike,
    *,
    overrides: dict[str, Any] | None = None,
    arm_values: dict[str, dict[str, Any]] | None = None,
    seeds: list[int] | None = None,
) -> Spec:
    """Read and check a sweep spec; expand it into its runs (arm-major, then grid values, then seeds).

    Args:
        path: The spec (YAML).
        overrides: Values given to every run on top of the spec's ``overrides`` (part of each
            run's identity, like them).
        arm_values: Per arm, values on top of its own.
        seeds: Replace the spec's seeds.

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
    if overrides:
        raw["overrides"] = {**(raw.get("overrides") or {}), **overrides}
    if seeds is not None:
        raw["seeds"] = list(seeds)
    for arm, extra in (arm_values or {}).items():
        if arm not in arms_raw:
            raise SweepError(f"{path}: no arm {arm!r} to set values on; arms: {sorted(arms_raw)}")
        a = arms_raw[arm]
        a = dict(a) if isinstance(a, dict) else {"configs": _as_list(a, f"arms.{arm}")}
        a["values"] = {**(a.get("values") or {}), **extra}
        arms_raw[arm] = a
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
            arm_train = arm_raw.get("train", True)
            if not isinstance(arm_train, bool):
                raise SweepError(f"{path}: arms.{arm}.train must be true or false, got {arm_train!r}")
            arm_seeds = [
                _seed(s, f"arms.{arm}.seeds") for s in _as_list(arm_raw.get("seeds"), "seeds")
            ] or seeds
        else:
            overlays, arm_values, arm_seeds, arm_train = _as_list(arm_raw, f"arms.{arm}"), {}, seeds, True
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
                    train=arm_train,
                )
                identity = {
                    "configs": [content(c) for c in run.configs],
                    "values": values,
                    "overrides": run.overrides,
                    "seed": seed,
                    "seed_keys": seed_keys,
                    **({} if arm_train else {"train": False}),
                }
                run.hash = _digest(identity)[:12]
                runs.append(run)

    judge = raw.get("judge")  # absent or null: no judging
    if judge is not None:
        if not isinstance(judge, dict) or set(judge) - {"function", "options"}:
            raise SweepError(f"{path}: judge must be null or a mapping with function and options")
        if not judge.get("function"):
            raise SweepError(
                f"{path}: judge.function is not set: a module:function such as "
                "fairtune.colored_digits:judge_colored_digits (ColoredDigits-Bias), or judge: null"
            )
        judge = {"function": judge["function"], "options": judge.get("options") or {}}
        _import_function(judge["function"])  # fail now, not after the first training
    report = raw.get("report") or {}
    goals = _as_list(raw.get("goals") or [], "goals")
    for i, g in enumerate(goals):
        if not isinstance(g, dict) or set(g) - GOAL_KEYS or not {"arm", "metric"} <= set(g):
            raise SweepError(
                f"{path}: goals[{i}] must be a mapping with arm, metric and max or min; "
                f"known keys: {sorted(GOAL_KEYS)}"
            )
        if ("max" in g) == ("min" in g):
            raise SweepError(f"{path}: goals[{i}] needs exactly one of max and min")
        for a in (g["arm"], g.get("relative_to")):
            if a is not None and a not in arms_raw:
                raise SweepError(
                    f"{path}: goals[{i}] names arm {a!r}, not an arm of the spec ({sorted(arms_raw)})"
                )
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
        goals=goals,
    )


def _seed(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SweepError(f"{what}: a seed is an integer, got {value!r}")
    return value


def _import_function(ref: str) -> Callable:
    from fairtune.models import import_function

    try:
        return import_function(ref, what="judge.function")
    except ValueError as e:
        raise SweepError(str(e)) from e


def read_status(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / STATUS).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def write_status(run_dir: Path, status: dict) -> None:
    atomic_write_json(run_dir / STATUS, status, indent=2, default=str)


def run_states(spec: Spec, out: Path) -> dict:
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
