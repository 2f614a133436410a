"""The ``fairtune`` command line: the only layer that imports every package.

``fairtune data colored-digits --out DIR``   render the ColoredDigits-Bias benchmark data
``fairtune judges train --data DIR --out DIR`` train and measure the benchmark's judges
``fairtune fit --config A.yaml [--config B.yaml]`` train (LightningCLI; resumes a killed run)
``fairtune demo --out runs/demo``  the main job: train the debiased adapter, compare, report
``fairtune compare --config C.yaml --out DIR``  every method on the same prompts, seeds and judges
``fairtune audit --model PATH --prompts FILE --out DIR``  one model's judged attribute mix
``fairtune dial --model PATH --adapter DIR --prompts FILE --out DIR [--request JSON]``  the judged mix
    against the adapter's scale, and the scale per concept for a requested mix (checked)
``fairtune sweep SPEC.yaml --out DIR [--workers N | --slurm true]``  ablation grid, resumable
``fairtune flag add|propose|list|export --db FILE ...``  reviewers' flags on biased outputs
``fairtune review --audit DIR --db FILE``  a local page to review an audit and flag images

Every entry point is a typed function whose signature is its option schema (jsonargparse), so a
misspelt option or a value of the wrong type fails before any work with a message naming it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from fairtune.data import DEFAULT_RED_SHARE, ColoredDigitsConfig, build_colored_digits
from fairtune.eval import JudgeTrainConfig, train_judges
from fairtune.models import train_attribute_classifier

from ._commands import audit_command, compare_command, dial_command
from ._demo import demo, prepare_assets
from ._fit import FairtuneCLI, run_fit_cli
from ._sweep import run_sweep, sweep
from ._sweep_report import check_goals, t_interval, write_report, write_slurm
from ._sweep_spec import Spec, SweepError, load_spec, read_status


def colored_digits(
    *,
    out: Path,
    size: int = 16,
    colors: list[str] = ["red", "blue"],
    background: bool = False,
    red_share: list[float] = DEFAULT_RED_SHARE,
    color_shares: list[list[float]] | None = None,
    dark_share: list[float] = [0.3] * 10,
    explicit_share: float = 0.25,
    renders_per_image: int = 4,
    heldout_fraction: float = 0.5,
    heldout_renders: int = 4,
    shard_size: int = 1000,
    seed: int = 0,
) -> None:
    """Render ColoredDigits-Bias into OUT: table/, shards/, stats.json.

    Args:
        out: Output folder.
        size: Image side, 16 or 32.
        colors: Ink colours (classes of attribute ``color``); add green for three classes.
        background: Also render attribute ``background`` (light/dark), for joint targets.
        red_share: Per digit 0-9, share of training renders in the first colour (the rest split
            evenly over the other colours).
        color_shares: Per digit 0-9, the share of each colour (rows in the order of ``colors``,
            each summing to 1); overrides ``red_share``, e.g. a dominant ink among three per digit.
        dark_share: Per digit, share of dark backgrounds (with ``background``).
        explicit_share: Share of captions that name the attributes.
        renders_per_image: Training renders per source image.
        heldout_fraction: Share of source images held out for judges.
        heldout_renders: Renders per held-out source image.
        shard_size: Records per webdataset shard.
        seed: Random seed.
    """
    cfg = ColoredDigitsConfig(
        size=size,
        colors=list(colors),
        background=background,
        red_share=list(red_share),
        color_shares=None if color_shares is None else [list(r) for r in color_shares],
        dark_share=list(dark_share),
        explicit_share=explicit_share,
        renders_per_image=renders_per_image,
        heldout_fraction=heldout_fraction,
        heldout_renders=heldout_renders,
        shard_size=shard_size,
        seed=seed,
    )
    stats = build_colored_digits(cfg, out)
    print(
        f"wrote {out}: {stats['train_source_images']} training / "
        f"{stats['heldout_source_images']} held-out source images"
    )
    for concept, s in stats["splits"]["train"].items():
        mix = "  ".join(f"{c} {k / max(1, s['n']):.3f}" for a in stats["attributes"] for c, k in s[a].items())
        print(f"  {concept}: n={s['n']:4d}  {mix}")


def judges_train(
    *,
    data: Path,
    out: Path,
    train: JudgeTrainConfig = JudgeTrainConfig(),
) -> None:
    """Train the colour and digit CNN judges on DATA's held-out split; write weights and judges.json.

    Args:
        data: A folder written by ``fairtune data colored-digits``.
        out: Output folder for ``*.safetensors`` and ``judges.json``.
        train: Training settings.
    """
    report = train_judges(data, out, train)
    shown = {k: report[k] for k in ("digit_cnn", "color_cnn", "hue", "background") if k in report}
    print(json.dumps(shown, indent=2))


def classifier_train(
    *,
    data: Path,
    out: Path,
    attribute: str | None = None,
    width: int = 8,
    feature_dim: int = 16,
    epochs: int = 3,
    seed: int = 1,
    mixed_ink_prob: float = 0.5,
) -> None:
    """Train the fairness loss's attribute classifier (not a judge: other architecture, seed and split).

    Args:
        data: A folder written by ``fairtune data colored-digits``.
        out: Output folder for ``classifier.safetensors`` and ``classifier.json``.
        attribute: The attribute it predicts (``None``: the data's only attribute).
        width: First-block channels.
        feature_dim: Penultimate width.
        epochs: Training epochs.
        seed: Random seed.
        mixed_ink_prob: Share of training images recoloured with two classes' inks and labelled by
            each ink's share, so the fairness loss cannot satisfy it with purple or two-ink digits.
    """
    report = train_attribute_classifier(
        data,
        out,
        attribute=attribute,
        width=width,
        feature_dim=feature_dim,
        epochs=epochs,
        seed=seed,
        mixed_ink_prob=mixed_ink_prob,
    )
    print(json.dumps({k: report[k] for k in ("heldout_accuracy", "heldout_accuracy_perturbed")}, indent=2))


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


__all__ = [
    "FairtuneCLI",
    "Spec",
    "SweepError",
    "check_goals",
    "read_status",
    "audit_command",
    "compare_command",
    "dial_command",
    "demo",
    "load_spec",
    "main",
    "prepare_assets",
    "run_fit_cli",
    "run_sweep",
    "sweep",
    "t_interval",
    "write_report",
    "write_slurm",
]


def fit() -> None:
    """Train an adapter or a full fine-tune (resumes a killed run); ``fairtune fit --help``.

    LightningCLI over model / data / trainer; handled before this parser, listed here for --help.
    """


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``fairtune`` console script.

    Expected errors (a bad config or schema, a missing or unreadable file, a failed run) print one
    line naming what is wrong and exit 2 (bad input) or 1 (a failure while running); ``--debug`` (or
    ``FAIRTUNE_DEBUG=1``) shows the traceback instead.
    """
    from_shell = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("FAIRTUNE_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    if argv and argv[0] in ("fit", "validate"):
        argv = fit_argv(argv)
    if from_shell:  # what LightningCLI (and DDP's relaunch of this command) read
        sys.argv = [sys.argv[0], *argv]
    if debug or not from_shell:  # called from Python (tests, notebooks): exceptions propagate
        _run(argv)
        return
    try:
        _run(argv)
    except KeyboardInterrupt:
        print("fairtune: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except (ValueError, KeyError, TypeError) as e:  # bad input: configs, schemas, file contents
        print(f"fairtune: error: {_one_line(e)}{_HINT}", file=sys.stderr)
        raise SystemExit(2) from None
    except (OSError, RuntimeError, ImportError) as e:  # missing files, failed runs
        print(f"fairtune: error: {_one_line(e)}{_HINT}", file=sys.stderr)
        raise SystemExit(1) from None


_HINT = "  (--debug shows the traceback)"
_NULLS = ("null", "Null", "NULL", "None", "~")


def _nested(key: str, value) -> str:
    out = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return json.dumps(out)


def fit_argv(argv: list[str]) -> list[str]:
    """``fairtune fit`` arguments as the parser should read them.

    - ``--a.b.c null`` (a key two levels down or more) becomes an inline config ``{"a": {"b": {"c":
      null}}}`` at the same place: jsonargparse reads a null given as a nested argument under an
      optional section as the string ``'None'`` (or fails for a number), but reads it from a config.
    - ``--X.module NAME`` (a class from a config, e.g. ``model.fairness.classifier``) starts
      ``X.init_args`` afresh, as LightningCLI's ``class_path`` does: the previous class's arguments
      are not merged into the new class's (``--X.init_args.KEY`` after it add to the new ones).
    """
    out: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        key, value, used = None, None, 1
        if a.startswith("--") and "=" in a:
            key, value = a[2:].split("=", 1)
        elif a.startswith("--") and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            key, value, used = a[2:], argv[i + 1], 2
        if key is not None and key.count(".") >= 2 and value in _NULLS:
            out += ["--config", _nested(key, None)]
        elif key is not None and key.count(".") >= 1 and key.endswith(".module"):
            out += argv[i : i + used]
            out += ["--config", _nested(key[: -len(".module")] + ".init_args", {})]
        else:
            out += argv[i : i + used]
        i += used
    return out


def _one_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    if isinstance(e, KeyError):
        text = f"missing key {text}"
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}" if len(lines) <= 40 else lines[0]


def _run(argv: list[str]) -> None:
    from jsonargparse import CLI

    if argv and argv[0] in ("fit", "validate"):
        from ._fit import run_fit_cli

        run_fit_cli(None if argv == sys.argv[1:] else argv)
        return
    from fairtune.data import flag_add, flag_export, flag_list, flag_propose
    from fairtune.eval import review_command
    from fairtune.train import augment_command

    CLI(
        {
            "fit": fit,
            "demo": demo,
            "compare": compare_command,
            "audit": audit_command,
            "dial": dial_command,
            "sweep": sweep,
            "data": {
                "_help": "Render benchmark data (ColoredDigits-Bias).",
                "colored-digits": colored_digits,
                "augment": augment_command,
            },
            "judges": {
                "_help": "Train the benchmark's judges (never used by training).",
                "train": judges_train,
            },
            "classifier": {
                "_help": "Train lever 3's attribute classifier (not a judge).",
                "train": classifier_train,
                "clip-probe": classifier_clip_probe,
            },
            "flag": {
                "_help": "Reviewers' flags on biased outputs (a SQL database; docs/feedback_loop.md).",
                "add": flag_add,
                "propose": flag_propose,
                "list": flag_list,
                "export": flag_export,
            },
            "review": review_command,
        },
        args=argv,
        prog="fairtune",
        description="Debias text-to-image diffusion models at training time, and compare with "
        "inference-time fixes. `fairtune <command> --help` lists a command's options.",
    )


if __name__ == "__main__":
    main()
