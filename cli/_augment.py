"""``fairtune data augment``: synthetic records for the rare concept x class cells of a table.

The augmentation itself (:func:`fairtune.train.augment_table`) is library code; this reads the
options, picks the backbone kind from the model folder and prints the per-cell report.
"""

from __future__ import annotations

from pathlib import Path

from fairtune.models import BackboneConfig, ClassifierConfig, resolve_shipped
from fairtune.train import AugmentConfig, augment_table


def augment_command(
    *,
    table: Path,
    out: Path,
    model: str,
    classifier: ClassifierConfig,
    augment: AugmentConfig = AugmentConfig(),  # noqa: B008 - jsonargparse reads the default
    concept_judge: ClassifierConfig | None = None,
    split: str = "train",
) -> None:
    """Add synthetic records to the rare concept x class cells of TABLE; write OUT (a table) and
    OUT/augment.json (per cell: records before/after, acceptance, the sampler's repeat factor).

    Args:
        table: The training table (``save_to_disk`` folder, parquet, imagefolder).
        out: The augmented table to write.
        model: The base model that generates (a tiny backbone folder, a shipped name or an SD folder).
        classifier: The training attribute classifier that must place a candidate in its cell's class.
        augment: Attribute, classes, explicit-prompt template, thresholds and generation settings.
        concept_judge: A concept classifier that must recognise the concept (optional).
        split: Split of TABLE to read.
    """
    kind = "sd" if (resolve_shipped(model) / "model_index.json").is_file() else "tiny"
    report = augment_table(table, out, config=augment, backbone=BackboneConfig(kind=kind, pretrained=model),
                           classifier=classifier, concept_judge=concept_judge, split=split)  # fmt: skip
    for c in report["cells"]:
        before, after = c["repeat_factor_before"], c["repeat_factor_after"]
        print(
            f"{c['concept']} / {c['class']}: {c['records']} -> {c['records_after']} records "
            f"({c['accepted']}/{c['generated']} accepted); repeat factor "
            f"{'n/a' if before is None else f'{before:.1f}'} -> {'n/a' if after is None else f'{after:.1f}'}"
        )
    print(f"wrote {out} ({report['records']} records + {report['synthetic']} synthetic)")
