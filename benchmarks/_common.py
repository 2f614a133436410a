"""Shared set-up of the ColoredDigits-Bias benchmarks: data, judges, references, result files."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from fairtune.data import format_number
from fairtune.eval import check_goals, half_width

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DATA = ROOT / "runs" / "data" / "colored-digits-16"
JUDGES = ROOT / "runs" / "judges" / "colored-digits-16"
CLASSIFIER = ROOT / "runs" / "classifiers" / "color-train-16"
DATA_SKEW = [0.95, 0.90, 0.85, 0.80, 0.75, 0.25, 0.20, 0.15, 0.10, 0.05]
# The comparison's fairness and quality columns (metric key, header, decimals), as the demo reports them.
FAIRNESS_COLUMNS = [
    ("mean_dev_seen", "mean dev seen", 3),
    ("worst_dev_seen", "worst seen", 3),
    ("mean_dev_heldout", "held-out", 3),
    ("mean_dev_paraphrase", "paraphrase", 3),
    ("fidelity", "fidelity", 3),
    ("frechet", "Fréchet", 1),
]


def ensure_assets():
    """Render the benchmark data and train the judges if they are not there yet; return the judges."""
    from fairtune.colored_digits import load_judges, prepare_assets

    # OMP_NUM_THREADS lets two benchmark queues share the 2 cores, one each.
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 2)))
    prepare_assets(DATA, JUDGES, CLASSIFIER)
    return load_judges(JUDGES)


def reference_images(n: int = 2000, seed: int = 0) -> torch.Tensor:
    """Held-out real renders (never trained on) for the Fréchet distance, loaded as compare loads them."""
    from fairtune.eval import load_reference_images

    return load_reference_images(DATA, n=n, seed=seed)


def cell(x, digits: int = 3) -> str:
    """A table cell of one number: ``digits`` decimals, empty without a value (None or NaN: the results
    files are strict JSON)."""
    return format_number(x, digits, missing="")


def interval_cell(s: dict | None, digits: int) -> str:
    """A table cell of a seed summary (:func:`fairtune.eval.seed_summary`): ``mean [low, high]``, the
    mean alone without an interval, empty without a value."""
    if not s or s.get("mean") is None:
        return ""
    if s.get("ci") is None:
        return f"{s['mean']:.{digits}f}"
    return f"{s['mean']:.{digits}f} [{s['ci'][0]:.{digits}f}, {s['ci'][1]:.{digits}f}]"


def goal_rows(goals: list[dict], row: dict[str, dict], base: dict[str, dict]) -> list[dict]:
    """An issue's goals, written as a sweep spec writes them (``relative_to: base`` for those against the
    base row), checked by :func:`fairtune.eval.check_goals` on one arm's seed summaries: per goal the
    metric, the arm's own ``value`` (metric ``<key>_halfwidth``: the half-width of ``<key>``'s interval
    over seeds), the goal as the report writes it, ``met``, and ``ratio``, how close (1 = on the bound)."""

    def means(r: dict[str, dict]) -> dict[str, float | None]:
        out = {k: (s or {}).get("mean") for k, s in r.items()}
        return out | {f"{k}_halfwidth": half_width((s or {}).get("ci")) for k, s in r.items()}

    m = {"arm": means(row), "base": means(base)}
    rows = []
    for g, c in zip(goals, check_goals([{**g, "arm": "arm"} for g in goals], m)):
        key = g["metric"]
        v, ref = m["arm"].get(key), m["base"].get(key)
        if c["met"] is None:
            rows.append({"metric": key, "value": v, "goal": None, "met": None, "ratio": None})
            continue
        at_most = "max" in g
        bound = g["max"] if at_most else g["min"]
        op = "≤" if at_most else "≥"
        if "relative_to" not in g:
            text = ("half-width " if key.endswith("_halfwidth") else "") + f"{op} {bound}"
            ratio = _closeness(v, bound, at_most)
        elif g.get("as") == "ratio":
            text, ratio = f"{op} {bound * ref:.1f} ({bound} × base)", _closeness(v, bound * ref, at_most)
        elif not at_most and bound < 0:  # e.g. fidelity at least base − 0.01: how much of the margin is used
            text, ratio = f"≥ {ref + bound:.3f} (base − {-bound})", max(0.0, ref - v) / -bound
        else:
            sign = "+" if bound >= 0 else "−"
            text = f"{op} {ref + bound:.3f} (base {sign} {abs(bound)})"
            ratio = _closeness(v, ref + bound, at_most)
        rows.append({"metric": key, "value": v, "goal": text, "met": c["met"], "ratio": float(ratio)})
    return rows


def _closeness(v: float, bound: float, at_most: bool) -> float:
    """How close ``v`` is to its bound: ``v / bound`` for an upper bound, ``bound / v`` for a lower one
    (1 = on the bound, above 1 = past it; ``inf`` where the division has no meaning)."""
    num, den = (v, bound) if at_most else (bound, v)
    return num / den if den else float("inf")


def spec_steps(spec) -> int | None:
    """The training steps a sweep spec's trained runs are given (its ``trainer.max_steps`` override)."""
    return next((r.overrides.get("trainer.max_steps") for r in spec.runs if r.train), None)


def write_results(name: str, payload: dict, markdown: str, results: Path = RESULTS) -> None:
    from fairtune.data import atomic_write_json, atomic_write_text

    atomic_write_json(results / f"{name}.json", payload, indent=2)  # a killed run keeps the last file whole
    atomic_write_text(results / f"{name}.md", markdown)
    print(markdown)
    print(f"wrote {results / name}.json and .md", file=sys.stderr)


def save_grid(images: torch.Tensor, path: Path, per_row: int) -> None:
    """A PNG grid (nearest-neighbour upscaled 3x) to look at samples."""
    from PIL import Image

    from fairtune.data import image_grid

    grid = image_grid(images, per_row)
    h, w = grid.shape[:2]
    Image.fromarray(grid).resize((w * 3, h * 3), Image.NEAREST).save(path)
