"""Augmentation of under-represented groups: synthetic records for the rare concept × class cells.

The rebalanced sampler draws a rare cell's few images again and again (a cell holding 5% of a
concept's records, drawn at a 50% target, repeats each image about 10× as often as the data would).
:func:`augment_table` generates explicit-prompt images for each rare cell from the base model
(``template``, e.g. ``"a {cls} handwritten {concept}"``), keeps those that the training classifier
places in the cell's class (and, when given, a concept judge recognises as the concept), and writes
the table with them added as records marked ``synthetic``. The report gives, per rare cell, the
records before and after, the acceptance rate, and the sampler's repeat factor before and after
(draws per image under the target relative to the unbalanced draw). The command that calls it,
``fairtune data augment``, lives in ``fairtune.cli``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fairtune.data import AttributeSpec, Target, TargetConfig, atomic_dir, load_table
from fairtune.models import Backbone, BackboneConfig, ClassifierConfig, load_classifier

SYNTHETIC = "synthetic"


@dataclass
class AugmentConfig:
    """What to augment and how.

    Attributes:
        attribute: The protected attribute (its table column); required.
        classes: Its classes, in the order of the classifier's outputs; required.
        template: Explicit prompt of a cell, with ``{cls}`` and ``{concept}``.
        record_prompt: The caption stored on a synthetic record (``{cls}``/``{concept}`` filled);
            ``None``: the explicit prompt itself.
        min_share: A cell is rare when its share of the concept's labelled records is below this.
        per_cell: Synthetic records to add to each rare cell (at most).
        max_tries: Generate at most ``max_tries × per_cell`` candidates per cell.
        min_confidence: A candidate is kept when the classifier gives its cell's class at least this.
        concept_classes: The concept judge's class names (concepts), in the order of its outputs.
        steps: DDIM steps per image.
        guidance_scale: Classifier-free guidance scale.
        seed: First seed (candidates of a cell use consecutive seeds).
        batch_size: Images per sampling batch.
        target: The target mix the sampler draws toward (for the repeat factors).
    """

    attribute: str = ""
    classes: list[str] = field(default_factory=list)
    template: str = "a {cls} {concept}"
    record_prompt: str | None = None
    min_share: float = 0.15
    per_cell: int = 64
    max_tries: int = 4
    min_confidence: float = 0.9
    concept_classes: list[str] | None = None
    steps: int = 25
    guidance_scale: float = 2.0
    seed: int = 0
    batch_size: int = 256
    target: TargetConfig = field(default_factory=TargetConfig)


def rare_cells(concepts: list[str], labels: list[str | None], classes: list[str], min_share: float) -> dict:
    """``{(concept, class): count}`` for every cell under ``min_share`` of its concept's labelled records."""
    out = {}
    for c in sorted(set(concepts)):
        counts = {k: 0 for k in classes}
        for cc, y in zip(concepts, labels):
            if cc == c and y in counts:
                counts[y] += 1
        total = sum(counts.values())
        for k, n in counts.items():
            if total and n / total < min_share:
                out[(c, k)] = n
    return out


def repeat_factor(cell_count: int, concept_count: int, target_share: float) -> float | None:
    """How many times as often as the unbalanced draw each image of a cell is drawn when the sampler
    gives the cell ``target_share`` of its concept (``None`` for an empty cell)."""
    if cell_count == 0:
        return None
    return target_share / (cell_count / concept_count)


def augment_table(
    table: str | Path,
    out: str | Path,
    *,
    config: AugmentConfig,
    backbone: Backbone | BackboneConfig,
    classifier: ClassifierConfig,
    concept_judge: ClassifierConfig | None = None,
    split: str = "train",
) -> dict:
    """Write ``out`` (a ``save_to_disk`` table: the records of ``table``'s ``split`` plus accepted
    synthetic ones, column ``synthetic``) and ``out/augment.json`` (the report); returns the report.

    Raises:
        ValueError: A class or the attribute column is missing, or ``template`` lacks a field.
    """
    import datasets

    cfg = config
    if not cfg.attribute or not cfg.classes:
        raise ValueError("augment needs augment.attribute and augment.classes (the classifier's class names)")
    if "{cls}" not in cfg.template or "{concept}" not in cfg.template:
        raise ValueError(f"augment.template needs {{cls}} and {{concept}}, got {cfg.template!r}")
    for key, ok, want in (
        ("min_share", 0.0 < cfg.min_share <= 1.0, "in (0, 1]"),
        ("per_cell", cfg.per_cell >= 1, ">= 1"),
        ("max_tries", cfg.max_tries >= 1, ">= 1"),
        ("min_confidence", 0.0 <= cfg.min_confidence <= 1.0, "in [0, 1]"),
        ("steps", cfg.steps >= 1, ">= 1"),
        ("batch_size", cfg.batch_size >= 1, ">= 1"),
    ):
        if not ok:
            raise ValueError(f"augment.{key} must be {want}, got {getattr(cfg, key)}")
    src, dst = Path(table).resolve(), Path(out).resolve()
    if dst == src or dst in src.parents:
        raise ValueError(f"--out {out} would overwrite the table it reads ({table}): write elsewhere")
    ds = load_table(str(table), split=split)
    if cfg.attribute not in ds.column_names:
        raise ValueError(
            f"augment.attribute={cfg.attribute!r} is not a column of {table} ({ds.column_names})"
        )
    keep_cols = ["image", "prompt", "concept", cfg.attribute]
    ds = ds.select_columns(keep_cols)
    concepts, labels = list(ds["concept"]), list(ds[cfg.attribute])
    declared = sorted({y for y in labels if y is not None and y != ""})
    unknown = [c for c in cfg.classes if c not in declared]
    if unknown:
        raise ValueError(
            f"augment.classes names {unknown}, which no record of {table} has in column "
            f"{cfg.attribute!r} (its classes: {declared})"
        )
    cells = rare_cells(concepts, labels, cfg.classes, cfg.min_share)
    target = Target(cfg.target, AttributeSpec({cfg.attribute: list(cfg.classes)}))
    bb = backbone if isinstance(backbone, Backbone) else Backbone.from_config(backbone)
    device = next(bb.unet.parameters()).device
    clf = load_classifier(classifier, what="augment.classifier").to(device)
    judge = load_classifier(concept_judge, what="augment.concept_judge").to(device) if concept_judge else None
    if judge is not None and not cfg.concept_classes:
        raise ValueError("augment.concept_judge needs augment.concept_classes (its class names)")

    rows = {"image": [], "prompt": [], "concept": [], cfg.attribute: []}
    report_cells = []
    for (concept, cls), count in sorted(cells.items()):
        prompt = cfg.template.format(cls=cls, concept=concept)
        k = cfg.classes.index(cls)
        kept: list[np.ndarray] = []
        tried = 0
        while len(kept) < cfg.per_cell and tried < cfg.max_tries * cfg.per_cell:
            n = min(cfg.batch_size, cfg.max_tries * cfg.per_cell - tried)
            seeds = [cfg.seed + tried + i for i in range(n)]
            with torch.no_grad():
                x = bb.sample([prompt] * n, seeds=seeds, steps=cfg.steps, guidance_scale=cfg.guidance_scale,
                              batch_size=cfg.batch_size)  # fmt: skip
                p = clf(x.to(device)).float().softmax(1)
                ok = (p.argmax(1) == k) & (p[:, k] >= cfg.min_confidence)
                if judge is not None:
                    ci = cfg.concept_classes.index(concept) if concept in cfg.concept_classes else -1
                    ok &= judge(x.to(device)).argmax(1) == ci
            tried += n
            for img in x[ok.cpu()][: cfg.per_cell - len(kept)]:
                kept.append((img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())
        caption = (cfg.record_prompt or cfg.template).format(cls=cls, concept=concept)
        from PIL import Image

        for arr in kept:
            rows["image"].append(Image.fromarray(arr))
            rows["prompt"].append(caption)
            rows["concept"].append(concept)
            rows[cfg.attribute].append(cls)
        total = sum(1 for c, y in zip(concepts, labels) if c == concept and y in cfg.classes)
        q = target.proportions(concept)[k]
        report_cells.append(
            {
                "concept": concept, "class": cls, "prompt": prompt, "records": count, "generated": tried,
                "accepted": len(kept), "acceptance_rate": len(kept) / max(tried, 1),
                "records_after": count + len(kept), "target_share": q,
                "repeat_factor_before": repeat_factor(count, total, q),
                "repeat_factor_after": repeat_factor(count + len(kept), total + len(kept), q),
            }
        )  # fmt: skip
    real = ds.add_column(SYNTHETIC, [False] * len(ds))
    synth = datasets.Dataset.from_dict(
        {**rows, SYNTHETIC: [True] * len(rows["image"])}, features=real.features
    )
    merged = datasets.concatenate_datasets([real, synth])
    report = {
        "table": str(table),
        "split": split,
        "records": len(ds),
        "synthetic": len(synth),
        "cells": report_cells,
    }
    with atomic_dir(out) as tmp:
        merged.save_to_disk(str(tmp))
        (tmp / "augment.json").write_text(json.dumps(report, indent=2, default=float))
    return report
