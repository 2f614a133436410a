"""Augmentation of under-represented groups against the rebalanced sampler alone (issue 16).

    python benchmarks/augment.py      # -> benchmarks/results/augment.{json,md}

1. ``fairtune data augment`` (the command in ``configs/colored_digits/augmented.yaml``) adds synthetic
   records to every concept x colour cell under 15% of its digit's records;
2. the spec ``benchmarks/specs/augment.yaml`` trains the sampler arm on the plain table and on the
   augmented one (same budget and seed) and judges both and the base model (``arms.py``'s runner);
3. per rare cell, the sampler's actual draws over the whole training budget (the data module the
   runs use, every epoch) are counted: draws, distinct records drawn, and the duplicate rate (the share
   of draws that repeat a record already drawn) — without and with the synthetic records.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from arms import OUT, tabulate

from _common import CLASSIFIER, DATA, ROOT, ensure_assets, write_results
from fairtune.cli import load_spec, run_sweep
from fairtune.data import AttributeDataModule, RebalanceConfig, SourceConfig, TargetConfig

SPEC = ROOT / "benchmarks" / "specs" / "augment.yaml"
AUGMENTED = ROOT / "runs" / "data" / "colored-digits-16-augmented"
DIGITS = [f"digit {d}" for d in range(8)]


def build_augmented(out: Path = AUGMENTED) -> float:
    """Run ``fairtune data augment`` as configs/colored_digits/augmented.yaml documents it; seconds."""
    if (out / "augment.json").exists():
        return 0.0
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "fairtune.cli", "data", "augment", "--table", str(DATA / "table"),
         "--out", str(out), "--model", "colored-digits-16",
         "--classifier.module", "fairtune.colored_digits.SmallCNN",
         "--classifier.weights", str(CLASSIFIER / "classifier.safetensors"),
         "--classifier.init_args", "{num_classes: 2, width: 8, feature_dim: 16}",
         "--augment.attribute", "color", "--augment.classes", "[red, blue]",
         "--augment.template", "a {cls} handwritten {concept}",
         "--augment.record_prompt", "a handwritten {concept}", "--augment.target.attributes", "[color]",
         "--augment.min_share", "0.15", "--augment.per_cell", "256"],
        check=True, cwd=ROOT,
    )  # fmt: skip
    return time.perf_counter() - t0


def draw_counts(table: Path, cells: list[tuple[str, str]], steps: int, batch_size: int = 64) -> dict:
    """Per cell, what the rebalanced sampler draws over ``steps`` optimizer steps: the training
    runs' data module (uniform colour target, digits 0-7, seed 0), every epoch's draw."""
    dm = AttributeDataModule(
        source=SourceConfig(path=str(table)),
        attributes={"color": ["red", "blue"]},
        target=TargetConfig(attributes=["color"], proportions="uniform"),
        rebalance=RebalanceConfig(unknown="keep"),
        concepts=DIGITS,
        batch_size=batch_size,
        samples_per_epoch=3200,
        seed=0,
    )
    dm.setup("fit")
    sampler = dm.train_dataloader().sampler
    draws: list[int] = []
    epoch = 0
    while len(draws) < steps * batch_size:
        sampler.set_epoch(epoch)
        draws += sampler.epoch_draw().tolist()
        epoch += 1
    draws = draws[: steps * batch_size]
    groups = dm.target.groups
    table_ds = dm.table.table
    synthetic = list(table_ds["synthetic"]) if "synthetic" in table_ds.column_names else None
    out = {}
    for concept, cls in cells:
        g = groups.index(cls)
        in_cell = [i for i in draws if dm.record_concepts[i] == concept and dm.record_groups[i] == g]
        records = sum(1 for c, rg in zip(dm.record_concepts, dm.record_groups) if c == concept and rg == g)
        distinct = len(set(in_cell))
        out[f"{concept}/{cls}"] = {
            "records": records,
            "draws": len(in_cell),
            "distinct_drawn": distinct,
            "draws_per_record": len(in_cell) / max(distinct, 1),
            "duplicate_rate": 1 - distinct / max(len(in_cell), 1),
            "synthetic_draw_share": (
                sum(bool(synthetic[dm.dataset.indices[i]]) for i in in_cell) / max(len(in_cell), 1)
                if synthetic is not None
                else 0.0
            ),
        }
    return out


def main(steps: int = 500, report_only: bool = False) -> None:
    """Build the augmented table, train and judge the spec's arms, count the sampler's repeats.

    Args:
        steps: The spec's training budget (``trainer.max_steps``), for the draw counts.
        report_only: Tabulate what is finished; build, train and judge nothing.
    """
    spec = load_spec(SPEC)
    t_aug = 0.0
    if not report_only:
        ensure_assets()
        t_aug = build_augmented()
        run_sweep(spec, OUT, workers=1, aggregate=False)
    report = json.loads((AUGMENTED / "augment.json").read_text())
    cells = [(c["concept"], c["class"]) for c in report["cells"] if c["concept"] in DIGITS]
    plain = draw_counts(DATA / "table", cells, steps)
    augmented = draw_counts(AUGMENTED, cells, steps)
    payload, lines = tabulate(spec, OUT)
    payload["augment"] = {"seconds": t_aug or None, "report": report}
    payload["rare_cells"] = {"sampler": plain, "sampler_augmented": augmented}
    mean = lambda rows, k: sum(r[k] for r in rows.values()) / len(rows)  # noqa: E731
    lines += [
        "",
        f"## Rare cells: the sampler's draws over {steps} steps × 64 "
        "(digits 0-7, cells under 15% of their digit)",
        "",
        "| cell | records | + synthetic (accepted / generated) | draws | draws per record drawn "
        "| duplicate rate | with synthetic: draws per record | duplicate rate | synthetic share of draws |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    by_cell = {f"{c['concept']}/{c['class']}": c for c in report["cells"]}
    for key, p in plain.items():
        a, c = augmented[key], by_cell[key]
        lines.append(
            f"| {key} | {p['records']} | {a['records'] - p['records']} ({c['accepted']}/{c['generated']}) "
            f"| {p['draws']} | {p['draws_per_record']:.1f} | {p['duplicate_rate']:.3f} "
            f"| {a['draws_per_record']:.1f} | {a['duplicate_rate']:.3f} | {a['synthetic_draw_share']:.2f} |"
        )
    lines += [
        f"| mean | | | | {mean(plain, 'draws_per_record'):.1f} | {mean(plain, 'duplicate_rate'):.3f} "
        f"| {mean(augmented, 'draws_per_record'):.1f} | {mean(augmented, 'duplicate_rate'):.3f} "
        f"| {mean(augmented, 'synthetic_draw_share'):.2f} |",
        "",
        "Duplicate rate: the share of a cell's draws that repeat a record already drawn in the run. "
        + (f"`fairtune data augment` took {t_aug:.0f} s." if t_aug else ""),
    ]
    write_results(spec.name, payload, "\n".join(lines) + "\n")


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main, as_positional=False)
