"""CLIP judges (zero-shot prompts per class, or a trained linear probe) and labelled calibration
images for judge-error correction.

Generic over attribute and class names: nothing here knows a benchmark.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass
class ClipJudgeConfig:
    """A CLIP attribute judge.

    Attributes:
        clip: CLIP folder (local path or hub id) for zero-shot judging; with ``probe``, overrides the
            folder recorded in the probe.
        prompts: Zero-shot only: class -> prompts, or templates with ``{label}``; ``None``:
            ``"a photo of a {label}"``.
        undetermined_prompts: Zero-shot only: prompts for "none of the classes" (e.g. ``"a photo with
            no person"``); images they win are counted undetermined.
        probe: A probe folder (``train_clip_probe``) instead of zero-shot prompts.
        min_confidence: Below this top-class probability an image is undetermined.
    """

    clip: str | None = None
    prompts: dict[str, list[str] | str] | list[str] | str | None = None
    undetermined_prompts: list[str] | None = None
    probe: str | None = None
    min_confidence: float = 0.0


def build_clip_judge(cfg: ClipJudgeConfig, *, classes: list[str], what: str = "judges.clip"):
    """The judge's module (for its ``features``) and a function images -> labels (``-1`` undetermined).

    Raises:
        ValueError: Neither ``clip`` nor ``probe`` is set, or the probe's classes differ from ``classes``.
    """
    from fairtune.models import CLIPLinearProbe, CLIPZeroShotClassifier

    if cfg.probe:
        model = CLIPLinearProbe(cfg.clip, probe=cfg.probe, min_confidence=cfg.min_confidence)
        if model.classes != list(classes):
            raise ValueError(f"{what}.probe {cfg.probe!r} has classes {model.classes}, the judges {classes}")
        how = f"CLIP linear probe `{cfg.probe}` on `{model.clip}`"
    elif cfg.clip:
        model = CLIPZeroShotClassifier(
            cfg.clip, list(classes), cfg.prompts,
            undetermined_prompts=cfg.undetermined_prompts, min_confidence=cfg.min_confidence,
        )  # fmt: skip
        how = f"CLIP zero-shot `{cfg.clip}` with prompts {model.prompts}"
        if cfg.undetermined_prompts:
            how += f" and 'none of these' prompts {list(cfg.undetermined_prompts)}"
    else:
        raise ValueError(f"{what} needs clip (zero-shot) or probe (a trained CLIP probe folder)")

    def predict(x: torch.Tensor) -> torch.Tensor:
        dev = next(model.parameters()).device
        return model.predict(x.to(dev), batch_size=max(1, len(x)))

    return model, predict, how


def table_splits(path: str | Path) -> list[str]:
    """The splits a local table folder holds (a ``save_to_disk`` dataset dict, or an imagefolder with
    split subfolders); one ``train`` for anything else."""
    import datasets

    p = Path(path)
    if (p / "dataset_dict.json").is_file():
        return list(json.loads((p / "dataset_dict.json").read_text())["splits"])
    if p.is_dir() and not (p / "state.json").exists() and not any(p.glob("*.parquet")):
        try:
            return list(datasets.get_dataset_split_names("imagefolder", data_dir=str(p)))
        except Exception:  # not an imagefolder: load_table names what is wrong
            return ["train"]
    return ["train"]


def load_labelled_images(
    path: str | Path,
    *,
    attribute: str,
    classes: list[str],
    image_size: int | None = None,
    n: int | None = None,
    seed: int = 0,
    image_column: str = "image",
    format: str = "auto",
    split: str | None = None,
) -> tuple[torch.Tensor, np.ndarray]:
    """Labelled held-out images (e.g. for a judge's confusion matrix): ``(N, 3, H, W)`` in [0, 1] and
    class indices into ``classes``; records without a label are skipped.

    Args:
        path: An imagefolder with ``metadata.jsonl`` (a column named ``attribute``), a ``save_to_disk``
            folder or parquet (see ``fairtune.data.load_table``).
        attribute: The label column.
        classes: Class names; label ``k`` is ``classes[k]``.
        image_size: Resize to this side (the generated images' size); ``None``: keep (all must match).
        n: At most this many (a seeded random subset).
        seed: Seed of the subset.
        image_column: Column of the images.
        format: How to read ``path``.
        split: Split to read; ``None``: the only one (a folder with several splits is refused, naming
            them, rather than silently reading ``train``, which may be what a probe trained on).

    Raises:
        ValueError: A missing column, a label outside ``classes`` (naming the record), or several
            splits and none chosen.
    """
    import datasets
    from PIL import Image

    from fairtune.data import decode_image, load_table

    if not Path(path).exists():
        raise FileNotFoundError(f"calibration images {str(path)!r} do not exist")
    if split is None:
        splits = table_splits(path)
        if len(splits) > 1:
            raise ValueError(
                f"calibration images {str(path)!r} hold several splits {splits}: choose the held-out one "
                "(judges.calibration_split), never the one a judge or probe was trained on"
            )
        split = splits[0] if splits else "train"
    table = load_table(str(path), format=format, split=split)
    for c in (image_column, attribute):
        if c not in table.column_names:
            raise ValueError(
                f"calibration images {str(path)!r} have no column {c!r}; columns: {table.column_names}"
            )
    raw = table[attribute]
    keep = [i for i, v in enumerate(raw) if v is not None and str(v) != ""]
    for i in keep:
        if str(raw[i]) not in classes:
            raise ValueError(f"calibration record {i}: {attribute}={raw[i]!r} is not one of {classes}")
    if n is not None and len(keep) > n:
        keep = sorted(np.random.default_rng(seed).permutation(keep)[:n].tolist())
    if not keep:
        raise ValueError(f"calibration images {str(path)!r} hold no labelled record of {attribute!r}")
    if isinstance(table.features.get(image_column), datasets.Image):
        table = table.cast_column(image_column, datasets.Image(decode=False))
    arrs = []
    for i in keep:
        im = decode_image(table[i][image_column])
        if image_size is not None and im.size != (image_size, image_size):
            im = im.resize((image_size, image_size), Image.BICUBIC)
        arrs.append(np.asarray(im, dtype=np.uint8))
    if len({a.shape for a in arrs}) > 1:
        raise ValueError(f"calibration images {str(path)!r} differ in size: set image_size")
    x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float() / 255.0
    y = np.array([classes.index(str(raw[i])) for i in keep], dtype=np.int64)
    return x, y


def attach_measurement(panel, cfg, *, image_size: int | None = None) -> None:
    """Give a judge panel what measuring with imperfect judges needs, as ``cfg`` (a ``JudgeConfig``)
    names it: a second CLIP judge, labelled calibration images, features for the change score.

    Raises:
        ValueError: A second judge or calibration set that does not fit the panel's classes.
        FileNotFoundError: Missing calibration images.
    """
    notes = []
    if cfg.second is not None:
        _, panel.second_fn, how = build_clip_judge(cfg.second, classes=panel.classes, what="judges.second")
        panel.second_description = how
        notes.append(f"second judge: {how}")
    if cfg.calibration is not None:
        panel.calibration = load_labelled_images(
            cfg.calibration, attribute=panel.attribute, classes=panel.classes, image_size=image_size,
            n=cfg.n_calibration, split=cfg.calibration_split,
        )  # fmt: skip
        notes.append(f"shares corrected with the judge's confusion on {len(panel.calibration[1])} labelled "
                     f"images from `{cfg.calibration}`")  # fmt: skip
    if cfg.change_features is not None:
        from fairtune.models import CLIPImageFeatures

        feats = CLIPImageFeatures(cfg.change_features)
        panel.change_fn = feats.features
        notes.append(f"change score on CLIP embeddings of `{cfg.change_features}`")
    elif cfg.kind == "clip":
        panel.change_fn = panel.feature_fn
        notes.append("change score on the CLIP judge's image embeddings")
    if notes:
        panel.description += "; " + "; ".join(notes)
