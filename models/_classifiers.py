"""Attribute classifiers: lever 3's frozen training-time classifier and the small CNN the
ColoredDigits-Bias judges share.

Images are float tensors ``(B, 3, H, W)`` in ``[0, 1]``.
"""

from __future__ import annotations

import importlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from fairtune.data import (
    atomic_path,
    atomic_write_json,
    images_from_table,
    ink_map,
    load_table,
    mixed_ink,
    perturb,
    random_shift,
)


def import_module_class(ref: str, *, what: str) -> type[nn.Module]:
    """Import ``pkg.mod.Class`` (or ``pkg.mod:Class``) and check it is a ``torch.nn.Module`` subclass.

    Raises:
        ValueError: When it cannot be imported or is not a module class (nothing is called).
    """
    mod_name, sep, cls_name = ref.rpartition(":") if ":" in ref else ref.rpartition(".")
    try:
        cls = getattr(importlib.import_module(mod_name), cls_name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ValueError(f"{what}={ref!r} cannot be imported: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"{what}={ref!r} is not a torch.nn.Module subclass; only module classes are allowed")
    return cls


@dataclass
class CNNTrainConfig:
    """How a :class:`SmallCNN` is trained by :func:`train_cnn`.

    Attributes:
        batch_size: Batch size.
        lr: AdamW learning rate (one-cycle schedule).
        augment_prob: Probability a training image gets tint, noise and speckles.
        mixed_ink_prob: Probability a training image is recoloured with two classes' inks and
            labelled softly by each ink's share (ColoredDigits' ``mixed_ink``).
    """

    batch_size: int = 128
    lr: float = 2e-3
    augment_prob: float = 0.8
    mixed_ink_prob: float = 0.0


class SmallCNN(nn.Module):
    """A small convolutional classifier for 16x16 or 32x32 RGB; ``features`` is its penultimate layer.

    Args:
        num_classes: Output classes.
        width: Channels of the first block (doubled twice).
        feature_dim: Width of the penultimate layer (the Fréchet-distance features).
        ink_only: Read the ink map (:func:`ink_map`) instead of RGB, so ink colour and background
            tint cannot leak into the decision (the digit judge).
    """

    def __init__(
        self, num_classes: int, width: int = 32, feature_dim: int = 64, ink_only: bool = False
    ) -> None:
        super().__init__()
        self.ink_only = ink_only
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.ReLU(),
            # Keep a 4x4 layout: where a stroke is matters for a digit, so no global pooling.
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(4 * w * 16, feature_dim), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.ink_only:
            x = ink_map(x).expand(-1, 3, -1, -1)
        return self.body(x * 2.0 - 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@dataclass
class ClassifierConfig:
    """The frozen, differentiable attribute classifier the fairness loss uses (never the judge).

    Attributes:
        module: Import path of a ``torch.nn.Module`` class.
        init_args: Its constructor arguments.
        weights: A safetensors file with its state dict; ``None`` only for a module that loads its own
            weights (``loads_own_weights = True``, e.g. ``fairtune.models.CLIPZeroShotClassifier``).
        input: ``pixels`` (images in [0, 1]) or ``latents`` (what the UNet denoises).
        temperature: Logits are divided by this before the softmax; > 1 keeps outputs soft.
    """

    module: str = "fairtune.models.SmallCNN"
    init_args: dict = field(default_factory=lambda: {"num_classes": 2, "width": 8, "feature_dim": 16})
    weights: str | None = None
    input: Literal["pixels", "latents"] = "pixels"
    temperature: float = 1.0


def load_classifier(cfg: ClassifierConfig, *, what: str = "classifier") -> nn.Module:
    """Instantiate ``cfg.module`` and load its safetensors weights (none for a module that loads its
    own, such as a CLIP classifier from its folder); frozen and in eval mode."""
    if not cfg.weights:
        cls = import_module_class(cfg.module, what=f"{what}.module")
        if not getattr(cls, "loads_own_weights", False):
            raise ValueError(f"{what}.weights is not set: give the classifier's safetensors file")
        return cls(**cfg.init_args).eval().requires_grad_(False)
    if not Path(cfg.weights).is_file():
        raise FileNotFoundError(
            f"{what}.weights={cfg.weights!r} does not exist "
            "(for ColoredDigits-Bias: `fairtune classifier train`)"
        )
    # Configs are code-equivalent (like LightningCLI's class_path), but the class must still be a
    # torch module: checked before anything is instantiated, and the weights are checked first.
    cls = import_module_class(cfg.module, what=f"{what}.module")
    model = cls(**cfg.init_args)
    try:
        state = load_file(cfg.weights)
    except Exception as exc:  # safetensors raises its own error type on a truncated file
        raise ValueError(f"{what}.weights={cfg.weights!r} is not a readable safetensors file: {exc}") from exc
    model.load_state_dict(state)
    return model.eval().requires_grad_(False)


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write a safetensors file through a temporary file and a rename (never half-written)."""
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))


def train_cnn(
    model: SmallCNN,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    cfg: CNNTrainConfig,
    generator: torch.Generator,
) -> None:
    """Train ``model`` on images ``x`` and labels ``y`` (one-cycle AdamW, random one-pixel shifts,
    optional mixed-ink recolouring and tint/noise augmentation), then put it in eval mode."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    steps = epochs * math.ceil(len(x) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(1, steps))
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=generator)
        for i in range(0, len(x), cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            xb = random_shift(x[idx], generator)
            yb = F.one_hot(y[idx], model.head.out_features).float()
            if cfg.mixed_ink_prob > 0:
                mix = torch.rand(len(idx), generator=generator) < cfg.mixed_ink_prob
                xm, ym = mixed_ink(xb, y[idx], yb.shape[1], generator)
                xb, yb = torch.where(mix[:, None, None, None], xm, xb), torch.where(mix[:, None], ym, yb)
            aug = torch.rand(len(idx), generator=generator) < cfg.augment_prob
            if aug.any():
                xb[aug] = perturb(xb[aug], generator)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()


@torch.no_grad()
def predict_batched(model: SmallCNN, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Class predictions in batches."""
    return torch.cat([model(x[i : i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])


@torch.no_grad()
def features_batched(model: SmallCNN, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Penultimate features in batches."""
    return torch.cat([model.features(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def train_attribute_classifier(
    data_dir: str | Path,
    out: str | Path,
    *,
    attribute: str | None = None,
    width: int = 8,
    feature_dim: int = 16,
    epochs: int = 3,
    seed: int = 1,
    mixed_ink_prob: float = 0.5,
) -> dict:
    """Train the *training-time* attribute classifier of the fairness loss (lever 3).

    Deliberately not a judge: another architecture (a narrower SmallCNN), another seed, and the
    training split rather than the held-out split the judges learn from. Writes
    ``classifier.safetensors`` and ``classifier.json`` (its ``ClassifierConfig`` fields and its
    accuracy on held-out renders) to ``out``. ``mixed_ink_prob`` > 0 trains it on mixed-ink images
    with soft labels too (:func:`mixed_ink`), so it is not fooled by purple or two-ink digits.
    ``attribute`` names the attribute it predicts (``None``: the data's only one).
    """
    data_dir, out = Path(data_dir), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    declared = json.loads((data_dir / "stats.json").read_text())["attributes"]
    if attribute is None:  # the data's only attribute
        if len(declared) != 1:
            raise ValueError(f"{data_dir}: the data declares attributes {list(declared)}: name one")
        attribute = next(iter(declared))
    if attribute not in declared:
        raise ValueError(f"{data_dir}: no attribute {attribute!r}; the data declares {list(declared)}")
    classes = declared[attribute]
    train = load_table(str(data_dir / "table"), split="train")
    held = load_table(str(data_dir / "table"), split="heldout")
    x, y = images_from_table(train), torch.tensor([classes.index(c) for c in train[attribute]])
    torch.manual_seed(seed)
    cfg = CNNTrainConfig(mixed_ink_prob=mixed_ink_prob)
    model = SmallCNN(len(classes), width, feature_dim)
    train_cnn(model, x, y, epochs=epochs, cfg=cfg, generator=torch.Generator().manual_seed(seed))
    xh, yh = images_from_table(held), torch.tensor([classes.index(c) for c in held[attribute]])
    xp = perturb(xh, torch.Generator().manual_seed(seed + 1))
    report = {
        "module": "fairtune.models.SmallCNN",
        "init_args": {"num_classes": len(classes), "width": width, "feature_dim": feature_dim},
        "weights": str((out / "classifier.safetensors").resolve()),
        "classes": classes,
        "attribute": attribute,
        "heldout_accuracy": float((predict_batched(model, xh) == yh).float().mean()),
        "heldout_accuracy_perturbed": float((predict_batched(model, xp) == yh).float().mean()),
        "seed": seed,
        "epochs": epochs,
        "mixed_ink_prob": mixed_ink_prob,
    }
    save_safetensors_atomic(model.state_dict(), out / "classifier.safetensors")
    atomic_write_json(out / "classifier.json", report, indent=2)
    return report
