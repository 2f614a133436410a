"""The full ``fairtune`` command set: the subcommand table, merged with the commands plugins register
under the ``fairtune.commands`` entry point (imported only when a heavy command runs; ``fairtune.cli``
dispatches light ones without it)."""

from __future__ import annotations

import json
from pathlib import Path

from ._augment import augment_command
from ._commands import audit_command, compare_command, dial_command
from ._flag import flag_commands
from ._review import review_command
from ._sweep import sweep


def classifier_clip_probe(
    *,
    data: Path,
    out: Path,
    clip: str,
    attribute: str,
    classes: list[str] | None = None,
    image_column: str = "image",
    val_fraction: float = 0.2,
    C: float = 10.0,
    seed: int = 0,
) -> None:
    """Train a linear probe on CLIP image embeddings of labelled images: a classifier for lever 3
    (``module: fairtune.models.CLIPLinearProbe``, ``init_args: {probe: OUT}``) or a judge
    (``judges.clip.probe: OUT``; never the same one for both).

    Args:
        data: An imagefolder with metadata.jsonl, a save_to_disk folder or parquet, with a label column.
        out: Output folder for probe.safetensors and probe.json.
        clip: CLIP folder (local path or hub id).
        attribute: The label column (and the attribute's name).
        classes: Class names in order; default the sorted distinct labels.
        image_column: Column of the images.
        val_fraction: Share of each class held out for the reported accuracy and confusion matrix.
        C: Inverse L2 strength of the logistic regression.
        seed: Seed of the split.
    """
    from fairtune.models import train_clip_probe

    report = train_clip_probe(
        data, out, clip=clip, attribute=attribute, classes=classes, image_column=image_column,
        val_fraction=val_fraction, C=C, seed=seed,
    )  # fmt: skip
    keys = ("classes", "n_train", "n_val", "train_accuracy", "val_accuracy", "majority_rate", "val_confusion")
    print(json.dumps({k: report[k] for k in keys}, indent=2))


def fit() -> None:
    """Train an adapter or a full fine-tune (resumes a killed run); ``fairtune fit --help``.

    LightningCLI over model / data / trainer; handled before this parser, listed here for --help.
    """


def commands() -> dict:
    """The subcommands (jsonargparse's ``CLI`` dict): functions whose signatures are their options,
    with every plugin's commands merged in (:func:`fairtune.cli.plugins`)."""
    from . import plugins

    table = {
        "fit": fit,
        "compare": compare_command,
        "audit": audit_command,
        "dial": dial_command,
        "sweep": sweep,
        "data": {"_help": "Make or extend training data.", "augment": augment_command},
        "classifier": {
            "_help": "Train an attribute classifier: a CLIP linear probe (plugins add more).",
            "clip-probe": classifier_clip_probe,
        },
        "flag": flag_commands(),
        "review": review_command,
    }
    for plugin in plugins():
        for name, entry in plugin.commands().items():
            if isinstance(entry, dict) and isinstance(table.get(name), dict):
                clash = (set(entry) - {"_help"}) & set(table[name])
                if clash:
                    raise ValueError(f"plugin {plugin.__name__} registers {name} {sorted(clash)}: they exist")
                table[name] = {**table[name], **{k: v for k, v in entry.items() if k != "_help"}}
            elif name in table:
                raise ValueError(f"plugin {plugin.__name__} registers command {name!r}, which exists")
            else:
                table[name] = entry
    return table
