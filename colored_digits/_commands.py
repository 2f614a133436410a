"""The benchmark's commands ``fairtune data colored-digits``, ``fairtune judges train`` and ``fairtune
classifier train`` (registered by :mod:`fairtune.colored_digits._plugin`)."""

from __future__ import annotations

import json
from pathlib import Path

from ._cnn import train_attribute_classifier
from ._data import DEFAULT_RED_SHARE, ColoredDigitsConfig, build
from ._judges import JudgeTrainConfig, train_judges


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
    stats = build(cfg, out)
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
