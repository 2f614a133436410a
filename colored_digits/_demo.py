"""``fairtune demo``: the main job on the embedded ColoredDigits-Bias benchmark, end to end.

1. render the data and train the judges (skipped when already there);
2. the sweep spec ``configs/demo/sweep.yaml``: the class adapters ``red`` and ``blue`` (lever 1 in its
   data-free form: each distils the base model's own explicit generations of one ink into the
   neutral wordings) on the shipped biased base model and, with ``--single true``, the single
   debiased adapter (one adapter toward the mix), with ``--control true`` the naive control (the same
   training without any lever), all with the same budget and seed;
3. the comparison ``configs/compare/colored_digits.yaml`` with those adapters: base, ``class_pair``
   (each image from one of the class adapters, drawn in the target's mix), Fair Diffusion and prompt
   augmentation (and debiased, naive) on the same prompts, seeds and judges; writes
   ``OUT/compare/{metrics.json,report.md,report.html}``, prints the table and this run's figures
   beside the committed results over seeds.

Every stage is resumable: the sweep runner skips a finished training and a killed one resumes from
its last checkpoint; the assets are built once.
"""

from __future__ import annotations

import json
import sys
import time
from importlib import resources
from pathlib import Path

import torch

from fairtune.data import atomic_write_json


def configs_dir() -> Path:
    """The shipped configs (package data, so the demo works from an installed wheel too)."""
    return Path(str(resources.files("fairtune.configs")))


DEMO_COMPARE = "compare/colored_digits.yaml"
DEMO_SWEEP = "demo/sweep.yaml"


def prepare_assets(data: Path, judges: Path, classifier: Path | None = None) -> None:
    """Render ColoredDigits-Bias and train the judges and (given ``classifier``) lever 3's classifier,
    if missing."""
    from ._cnn import train_attribute_classifier
    from ._data import ColoredDigitsConfig, build
    from ._judges import train_judges

    if not (data / "stats.json").exists():
        print(f"[demo] rendering ColoredDigits-Bias into {data}", file=sys.stderr)
        build(ColoredDigitsConfig(), data)
    if not (judges / "judges.json").exists():
        print(f"[demo] training the judges into {judges}", file=sys.stderr)
        train_judges(data, judges)
    if classifier is not None and not (classifier / "classifier.json").exists():  # never a judge
        print(f"[demo] training the fairness loss's classifier into {classifier}", file=sys.stderr)
        train_attribute_classifier(data, classifier)


def demo_compare_config(
    adapters: dict[str, str | Path],
    *,
    judges: Path = Path("runs/judges/colored-digits-16"),
    data: Path = Path("runs/data/colored-digits-16"),
    n_per_prompt: int = 128,
    sampling_steps: int = 15,
    batch_size: int | None = None,
    paraphrase_digits: list[int] | None = None,
    adapter_scale: float | None = None,
):
    """The demo's comparison (configs/compare/colored_digits.yaml) with its judges, reference data and
    generation budget, keeping the methods whose adapters are given (``adapters``: arm name to adapter
    folder; an ``adapter`` method by its name, a ``class_adapters`` method when every class it names
    is given) and the base and inference-time methods. ``fairtune demo`` compares with it, and
    benchmarks/dependable.py judges every seed's pair with it, so the demo's figures and the committed
    ones come from one generate → judge → score path, prompts, seeds and draw.

    Args:
        adapters: Arm name to adapter folder.
        judges: Judges folder.
        data: ColoredDigits-Bias folder (its held-out renders are the Fréchet reference).
        n_per_prompt: Images per prompt and method.
        sampling_steps: DDIM steps.
        batch_size: Images per UNet batch (default: the backbone's choice).
        paraphrase_digits: Digits prompted with the never-trained wording (default: the config's).
        adapter_scale: The class adapters' scale (default: the config's).
    """
    from fairtune.cli import load_compare_config

    cfg = load_compare_config(
        configs_dir() / DEMO_COMPARE,
        "--judges.options", json.dumps({"path": str(judges), "color_judge": "hue"}),
        "--judges.reference", str(data),
        "--generation.n_per_prompt", str(n_per_prompt), "--generation.steps", str(sampling_steps),
        *(["--generation.batch_size", str(batch_size)] if batch_size is not None else []),
    )  # fmt: skip
    cfg.methods = [
        m for m in cfg.methods
        if not (m.kind == "adapter" and m.name not in adapters)
        and not (m.kind == "class_adapters" and not set(m.class_adapters or {}) <= set(adapters))
    ]  # fmt: skip
    for m in cfg.methods:
        if m.kind == "adapter":
            m.adapter = str(adapters[m.name])
        elif m.kind == "class_adapters":
            m.class_adapters = {c: str(adapters[c]) for c in m.class_adapters}
            if adapter_scale is not None:
                m.adapter_scale = float(adapter_scale)
    if paraphrase_digits is not None:
        for g in cfg.prompts:
            if g.role == "paraphrase":
                g.values = list(paraphrase_digits)
    return cfg


def demo(
    out: Path = Path("runs/demo"),
    *,
    steps: int = 200,
    n_per_prompt: int = 128,
    sampling_steps: int = 15,
    batch_size: int | None = None,
    paraphrase_digits: list[int] | None = None,
    data: Path = Path("runs/data/colored-digits-16"),
    judges: Path = Path("runs/judges/colored-digits-16"),
    seed: int = 0,
    threads: int | None = None,
    control: bool = False,
    pair: bool = True,
    single: bool = False,
) -> dict:
    """The main job: train the class adapters, compare them with the base model and the baselines.

    Training is the sweep spec configs/demo/sweep.yaml (run by the sweep runner: a finished arm is
    skipped, a cut-off one resumes); the comparison is configs/compare/colored_digits.yaml with this
    run's adapters.

    Args:
        out: Run folder: ``runs/<hash>/`` (the training runs; ``red``, ``blue``, ``debiased`` and
            ``naive`` link to those trained), ``compare/`` (``metrics.json``, ``report.md``,
            ``report.html``), ``demo.json``.
        steps: Training steps of each adapter (every arm gets the same budget and seed). The
            committed single adapter (``--single``) was measured at 400: ``--steps 400`` to compare
            with it.
        n_per_prompt: Images per prompt and method.
        sampling_steps: DDIM steps of every method at comparison time.
        batch_size: Images per UNet batch when generating (default: the backbone's choice, 64 on a
            CPU, 512 on a GPU).
        paraphrase_digits: Seen digits also prompted with a wording never trained on (default:
            those of configs/compare/colored_digits.yaml).
        data: ColoredDigits-Bias folder (rendered if missing).
        judges: Judges folder (trained if missing).
        seed: Training seed of every arm.
        threads: torch CPU threads (default: torch's choice).
        control: Also train and compare the naive control, the same LoRA training without any
            lever (it shows that fine-tuning alone leaves the bias; about 5 more minutes on 2 cores).
        pair: Train the class adapters (``red`` and ``blue``: each learnt from the base model's own
            explicit generations toward one ink alone, the explicit prompts held) and compare them
            drawn per image in the target's mix (``class_pair``, each fused at the scale the compare
            config names: the base model's cost per image).
        single: Also train and compare the single debiased adapter (one adapter distilled toward the
            mix, with the rebalanced sampler on the data: ``debiased``; it misses issue 24's goals,
            benchmarks/results/dependable.md).

    Returns:
        The comparison's metrics (also in ``out/compare/metrics.json``).
    """
    from fairtune.cli import load_spec, run_sweep
    from fairtune.eval import run_comparison

    if not (pair or single or control):
        raise ValueError("demo: nothing to train; leave --pair true, or set --single or --control true")
    if threads:
        torch.set_num_threads(threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    prepare_assets(Path(data), Path(judges))
    timings["assets_s"] = time.perf_counter() - t0

    spec = load_spec(
        configs_dir() / DEMO_SWEEP,
        overrides={"trainer.max_steps": steps, "data.source.path": str(Path(data).resolve() / "table")},
        seeds=[seed],
    )
    skip = {"naive"} if not control else set()
    skip |= {"red", "blue"} if not pair else set()
    skip |= {"debiased"} if not single else set()
    spec.runs = [r for r in spec.runs if r.arm not in skip]
    print(
        f"[demo] training {', '.join(r.arm for r in spec.runs)} ({steps} steps each) into {out}/runs",
        file=sys.stderr,
    )
    summary = run_sweep(spec, out, aggregate=False)
    if summary["failed"]:
        s = summary["runs"][summary["failed"][0]]
        raise RuntimeError(
            f"training arm {s.get('arm')!r} failed: {s.get('error')} (see {out}/runs/{s['hash']}/fit.log)"
        )
    runs = {r.arm: out / "runs" / r.hash for r in spec.runs}
    for arm, d in runs.items():  # out/<arm>: the folders configs/compare/colored_digits.yaml names
        link = out / arm
        if link.is_symlink() or not link.exists():
            link.unlink(missing_ok=True)
            link.symlink_to(Path("runs") / d.name, target_is_directory=True)
    for arm, d in runs.items():
        timings[f"train_{arm}_s"] = float(summary["runs"][d.name].get("train_seconds") or 0.0)

    # The comparison is configs/compare/colored_digits.yaml, with this run's adapters, judges and
    # generation budget (the very config benchmarks/dependable.py judges the pair's seeds with).
    cfg = demo_compare_config(
        {arm: d / "adapter" for arm, d in runs.items()}, judges=judges, data=data,
        n_per_prompt=n_per_prompt, sampling_steps=sampling_steps, batch_size=batch_size,
        paraphrase_digits=paraphrase_digits,
    )  # fmt: skip
    t1 = time.perf_counter()
    metrics = run_comparison(cfg, out / "compare")
    timings["compare_s"] = time.perf_counter() - t1
    timings["total_s"] = time.perf_counter() - t0
    record = {
        "seed": seed,
        "steps": steps,
        "n_per_prompt": n_per_prompt,
        "sampling_steps": sampling_steps,
        "runs": {arm: str(d) for arm, d in runs.items()},
        **timings,
    }
    atomic_write_json(out / "demo.json", record, indent=2)
    print(
        f"[demo] done in {timings['total_s'] / 60:.1f} min; report: {out / 'compare' / 'report.html'}",
        file=sys.stderr,
    )
    if single:
        beside_committed(metrics["methods"].get("debiased", {}).get("summary"), steps=steps, seed=seed)
    pair_method = next((m for m in cfg.methods if m.name == "class_pair"), None)
    if pair and pair_method is not None:
        beside_committed(
            metrics["methods"].get("class_pair", {}).get("summary"), steps=steps, seed=seed,
            path=Path(committed_pair(pair_method.adapter_scale, steps)), arm="class_pair",
        )  # fmt: skip
    return metrics


# The demo's columns and the keys of benchmarks/results/dependable.json they are checked against.
COMMITTED = "benchmarks/results/dependable.json"


def committed_pair(scale: float = 1.0, steps: int = 200) -> str:
    """The committed results of the demo's pair (benchmarks/dependable.py ``pair --scale``) at ``scale``,
    trained ``steps`` per adapter: the 200-step spec (the demo's default), or the 400-step one."""
    spec = "class_adapters_datafree_wordings" + ("" if steps == 400 else "_200")
    return f"benchmarks/results/{spec}_pair" + ("" if scale == 1.0 else f"_x{scale:g}") + ".json"


CHECKED = [
    ("mean_dev_seen", "mean_dev_seen", "mean dev seen"),
    ("worst_dev_seen", "worst_dev_seen", "worst seen"),
    ("mean_dev_named", "mean_dev_named", "named, no data"),
    ("mean_dev_heldout", "mean_dev_unnamed", "never named"),
    ("mean_dev_paraphrase", "mean_dev_paraphrase", "paraphrase"),
    ("explicit_kept", "explicit_follow", "explicit kept"),
    ("fidelity", "fidelity", "fidelity"),
    ("frechet", "frechet", "Fréchet"),
]


def beside_committed(
    summary: dict | None, *, steps: int, seed: int, path: Path | None = None, arm: str = "debiased"
) -> list[dict]:
    """Print this run's figures of ``arm`` beside the committed results over seeds (the mean and the
    95% range of one run), saying whether each falls inside; ``[]`` where there is nothing to compare
    (no committed results next to the working directory, or a budget other than theirs)."""
    path = Path(COMMITTED) if path is None else path
    if summary is None or not path.is_file():
        return []
    committed = json.loads(path.read_text())
    row = committed.get("arms", {}).get(arm, {})
    budget = committed.get("steps")
    if budget is not None and budget != steps:
        print(f"[demo] {path} was measured at {budget} steps, this run trained {steps}: not compared",
              file=sys.stderr)  # fmt: skip
        return []
    checks = []
    lines = [f"[demo] {arm}, this run (seed {seed}) beside {path} (mean over seeds; 95% range of one run):"]
    for key, ckey, label in CHECKED:
        v, s = summary.get(key), row.get(ckey) or {}
        rng = s.get("range")
        if v is None or rng is None:
            continue
        inside = rng[0] <= v <= rng[1]
        checks.append({"metric": key, "value": v, "mean": s["mean"], "range": rng, "inside": inside})
        lines.append(
            f"  {label:16s} {v:8.3f}   mean {s['mean']:.3f}, range [{rng[0]:.3f}, {rng[1]:.3f}]: "
            + ("inside" if inside else "OUTSIDE")
        )
    print("\n".join(lines), file=sys.stderr)
    return checks
