"""The judges of a comparison behind one interface (:class:`JudgePanel`), built from a
:class:`~fairtune.eval.JudgeConfig`, and the real images of the Fréchet distance."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from fairtune.data import AttributeSpec, Target, TargetConfig, images_from_table, load_table
from fairtune.models import ClassifierConfig, import_function, judged_labels, load_classifier

from ._clip_judge import attach_measurement, build_clip_judge
from ._config import JudgeConfig

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class JudgePanel:
    """The judges of a comparison behind one interface.

    Args:
        attribute: Name of the judged attribute.
        classes: Its classes (label ``k`` is ``classes[k]``; ``-1`` undetermined).
        attribute_fn: Images to attribute labels.
        concept_classes: Concept names a concept judge recognises (``None``: no concept judge).
        concept_fn: Images to concept labels (indices into ``concept_classes``).
        feature_fn: Images to features for the Fréchet distance (``None``: not available).
        reference: Real images for the Fréchet distance (``None``: not available).
        description: What the report says about the judges.
        batch_size: Images per judge batch.
        image_size: Image side the judges expect (``None``: any).
    """

    def __init__(
        self,
        *,
        attribute: str,
        classes: list[str],
        attribute_fn,
        concept_classes: list[str] | None = None,
        concept_fn=None,
        feature_fn=None,
        reference: torch.Tensor | None = None,
        description: str = "",
        batch_size: int = 512,
        image_size: int | None = None,
    ) -> None:
        self.attribute, self.classes = attribute, list(classes)
        self.attribute_fn, self.concept_fn, self.feature_fn = attribute_fn, concept_fn, feature_fn
        self.concept_classes = list(concept_classes) if concept_classes is not None else None
        self.reference = reference
        self.description = description
        self.batch_size = batch_size
        self.image_size = image_size
        self._reference_features: np.ndarray | None = None
        # Measuring with imperfect judges (attach_measurement): a second judge, labelled calibration
        # images (images, labels) for judge-error correction, features for the same-seed change score.
        self.second_fn = None
        self.second_description = ""
        self.calibration: tuple[torch.Tensor, np.ndarray] | None = None
        self.change_fn = None
        self._calibration_labels: dict | None = None

    def concept_index(self, concept: str) -> int | None:
        """Index of ``concept`` among the concept judge's classes, or ``None`` when it cannot judge it."""
        if self.concept_classes is None or concept not in self.concept_classes:
            return None
        return self.concept_classes.index(concept)

    @property
    def has_frechet(self) -> bool:
        return self.feature_fn is not None and self.reference is not None and len(self.reference) >= 2

    @torch.no_grad()
    def _batched(self, fn, images: torch.Tensor, desc: str, progress: bool) -> np.ndarray:
        out = []
        for i in tqdm(
            range(0, len(images), self.batch_size), desc=desc, disable=not progress, leave=False, unit="batch"
        ):
            out.append(torch.as_tensor(fn(images[i : i + self.batch_size])).cpu())
        return torch.cat(out).numpy()

    def attribute_labels(
        self, images: torch.Tensor, *, desc: str = "judge", progress: bool = False
    ) -> np.ndarray:
        """The attribute judge's label of each image (``-1``: undetermined)."""
        return self._batched(self.attribute_fn, images, f"{desc}: {self.attribute}", progress)

    def judge(self, images: torch.Tensor, *, desc: str = "judge", progress: bool = True) -> dict:
        """Attribute labels, concept labels (or ``None``) and Fréchet features (or ``None``)."""
        return {
            "attribute": self.attribute_labels(images, desc=desc, progress=progress),
            "concept": None
            if self.concept_fn is None
            else self._batched(self.concept_fn, images, f"{desc}: concept", progress),
            "features": None
            if not self.has_frechet
            else self._batched(self.feature_fn, images, f"{desc}: features", progress),
            "second": None
            if self.second_fn is None
            else self._batched(self.second_fn, images, f"{desc}: second judge", progress),
            "change": None
            if self.change_fn is None
            else self._batched(self.change_fn, images, f"{desc}: change features", progress),
        }

    def calibration_labels(self, *, progress: bool = True) -> dict | None:
        """``{"true", "first", "second"}`` labels of the calibration images (``second`` ``None`` without a
        second judge), or ``None`` without calibration images. Computed once."""
        if self.calibration is None:
            return None
        if self._calibration_labels is None:
            x, y = self.calibration
            self._calibration_labels = {
                "true": y,
                "first": self._batched(self.attribute_fn, x, "calibration", progress),
                "second": None
                if self.second_fn is None
                else self._batched(self.second_fn, x, "calibration: second judge", progress),
            }
        return self._calibration_labels

    def reference_features(self, *, progress: bool = True) -> np.ndarray | None:
        if not self.has_frechet:
            return None
        if self._reference_features is None:
            self._reference_features = self._batched(self.feature_fn, self.reference, "reference", progress)
        return self._reference_features


def load_reference_images(path: str | Path, *, n: int = 2000, image_size: int | None = None, seed: int = 0):
    """Real images for the Fréchet distance, ``(n, 3, H, W)`` in [0, 1].

    Args:
        path: A data folder with a ``table/`` (its held-out split, never trained on) or a folder of
            image files (searched recursively).
        n: How many (a seeded random subset; all when fewer).
        image_size: Resize to this side (the generated images' size); ``None`` keeps the size.
        seed: Seed of the subset.

    Raises:
        FileNotFoundError: When the folder does not exist or holds no image.
    """
    from PIL import Image

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"judges.reference={str(path)!r} does not exist")
    if (path / "table").is_dir():
        held = load_table(str(path / "table"), split="heldout")
        idx = np.random.default_rng(seed).permutation(len(held))[:n]
        x = images_from_table(held.select(sorted(idx.tolist())))
    else:
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise FileNotFoundError(
                f"judges.reference={str(path)!r} holds no image ({', '.join(IMAGE_SUFFIXES)}) "
                "and is not a data folder with a table/"
            )
        idx = np.random.default_rng(seed).permutation(len(files))[:n]
        size = image_size
        arrs = []
        for i in sorted(idx.tolist()):
            im = Image.open(files[i]).convert("RGB")
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.BICUBIC)
            arrs.append(np.asarray(im, dtype=np.uint8))
        x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float() / 255.0
    if image_size is not None and x.shape[-1] != image_size:
        x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True)
        x = x.clamp(0, 1)
    return x


def _classifier_fn(cfg: ClassifierConfig, *, n_classes: int, min_confidence: float, what: str):
    if cfg.input != "pixels":
        raise ValueError(f"{what}.input must be 'pixels' to judge generated images, got {cfg.input!r}")
    model = load_classifier(cfg)

    def predict(x: torch.Tensor) -> torch.Tensor:
        return judged_labels(model(x), temperature=cfg.temperature, min_confidence=min_confidence,
                             n_classes=n_classes, what=f"{what} ({cfg.module})")  # fmt: skip

    return model, predict


def build_judges(cfg: JudgeConfig, *, image_size: int | None = None) -> JudgePanel:
    """Load the judges ``cfg`` names (and the reference images of the Fréchet distance), with the
    second judge, calibration images and change-score features it names, if any.

    Raises:
        FileNotFoundError: A judges folder, weights file or reference folder is missing.
        ValueError: A setting does not fit the judge kind.
    """
    panel = _build_panel(cfg, image_size=image_size)
    attach_measurement(panel, cfg, image_size=image_size)
    return panel


def _build_panel(cfg: JudgeConfig, *, image_size: int | None = None) -> JudgePanel:
    """The first judge's panel (see :func:`build_judges`).

    Raises:
        FileNotFoundError: A judges folder, weights file or reference folder is missing.
        ValueError: A setting does not fit the judge kind.
    """
    reference = None
    if cfg.kind is None:
        raise ValueError("judges.kind is not set: 'panel', 'classifier' or 'clip'")
    if cfg.kind == "panel":
        # A judge panel of one's own (a benchmark's judges, or a user's): ``module:function`` called
        # with this config and the generated image side, returning a JudgePanel.
        if not cfg.panel:
            raise ValueError(
                "judges.kind='panel' needs judges.panel: 'module:function' building the panel "
                "(ColoredDigits-Bias: fairtune.colored_digits:judge_panel)"
            )
        build = import_function(cfg.panel, what="judges.panel")
        panel = build(cfg, image_size=image_size)
        if not isinstance(panel, JudgePanel):
            raise ValueError(f"judges.panel={cfg.panel!r} returned {type(panel).__name__}, not a JudgePanel")
        return panel
    if cfg.kind in ("classifier", "clip") and not cfg.attribute:
        raise ValueError(
            f"judges.kind={cfg.kind!r} needs judges.attribute: the name of the attribute it judges"
        )
    if cfg.kind == "classifier":
        if not cfg.classifier.weights or not cfg.classes:
            raise ValueError(
                "judges.kind='classifier' needs judges.classifier (module, init_args, weights) and "
                "judges.classes (the class names of its outputs, in order)"
            )
        attr_model, attr_fn = _classifier_fn(
            cfg.classifier, n_classes=len(cfg.classes), min_confidence=cfg.min_confidence,
            what="judges.classifier",
        )  # fmt: skip
        concept_fn = concept_model = None
        if cfg.concept_classifier.weights:
            if not cfg.concept_classes:
                raise ValueError("judges.concept_classifier needs judges.concept_classes (its class names)")
            concept_model, concept_fn = _classifier_fn(
                cfg.concept_classifier, n_classes=len(cfg.concept_classes), min_confidence=0.0,
                what="judges.concept_classifier",
            )  # fmt: skip
        feature_model = next(
            (m for m in (concept_model, attr_model) if m is not None and hasattr(m, "features")), None
        )
        if cfg.reference is not None and feature_model is not None:
            reference = load_reference_images(cfg.reference, n=cfg.n_reference, image_size=image_size)
        return JudgePanel(
            attribute=cfg.attribute,
            classes=list(cfg.classes),
            attribute_fn=attr_fn,
            concept_classes=cfg.concept_classes if concept_fn is not None else None,
            concept_fn=concept_fn,
            feature_fn=feature_model.features if feature_model is not None else None,
            reference=reference,
            description=(
                f"attribute `{cfg.attribute}` judged by `{cfg.classifier.module}` "
                f"({cfg.classifier.weights}) over {list(cfg.classes)}"
                + (f", concept by `{cfg.concept_classifier.module}`" if concept_fn is not None else "")
            ),
            batch_size=cfg.batch_size,
        )
    if cfg.kind == "clip":
        if not cfg.classes:
            raise ValueError(
                "judges.kind='clip' needs judges.classes (the attribute's class names, in order)"
            )
        model, predict, how = build_clip_judge(cfg.clip, classes=list(cfg.classes), what="judges.clip")
        if cfg.reference is not None:
            reference = load_reference_images(cfg.reference, n=cfg.n_reference, image_size=image_size)
        return JudgePanel(
            attribute=cfg.attribute,
            classes=list(cfg.classes),
            attribute_fn=predict,
            feature_fn=model.features,
            reference=reference,
            description=f"attribute `{cfg.attribute}` judged by {how} over {list(cfg.classes)}",
            batch_size=cfg.batch_size,
        )
    raise ValueError(f"judges.kind must be 'panel', 'classifier' or 'clip', got {cfg.kind!r}")


def build_target(cfg: TargetConfig, panel: JudgePanel) -> Target:
    """The target over the judged attribute's classes.

    Raises:
        ValueError: When the target is over another attribute (or a joint of several).
    """
    if isinstance(cfg, Mapping):
        cfg = TargetConfig(**cfg)
    if cfg.attributes is None:  # the judged attribute
        cfg = replace(cfg, attributes=[panel.attribute])
    if list(cfg.attributes) != [panel.attribute]:
        raise ValueError(
            f"target.attributes={list(cfg.attributes)} but the judges judge one attribute, "
            f"{panel.attribute!r}: set target.attributes to [{panel.attribute}]"
        )
    return Target(cfg, AttributeSpec({panel.attribute: panel.classes}))
