"""Sweep specs (arms x values x seeds) and the per-run status files of ``fairtune sweep``."""

from __future__ import annotations

import hashlib
import importlib
import itertools
import json
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
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
DEFAULT_JUDGE = "fairtune.eval:judge_colored_digits"
# Judge functions of earlier releases, still accepted in specs.
JUDGE_ALIASES = {"fairtune.train._sweep:judge_colored_digits": DEFAULT_JUDGE}
STATUS = "status.json"


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
        cmd = [sys.executable, "-m", "fairtune.cli", "fit"]
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
    ref = JUDGE_ALIASES.get(ref, ref)
    module, _, name = ref.partition(":") if ":" in ref else ref.rpartition(".")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise SweepError(f"judge.function {ref!r} cannot be imported: {e}") from e
    if not callable(fn):
        raise SweepError(f"judge.function {ref!r} is not callable")
    return fn


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
