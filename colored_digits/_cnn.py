"""ColoredDigits-Bias' small CNN: the judges' colour and digit classifiers and lever 3's training-time
attribute classifier (another width, seed and split: never a judge).

Images are float tensors ``(B, 3, H, W)`` in ``[0, 1]``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from fairtune.data import atomic_write_json, images_from_table, load_table
from fairtune.models import predict_batched, save_safetensors_atomic

from ._data import ink_map, mixed_ink, perturb, random_shift


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
        "module": "fairtune.colored_digits.SmallCNN",
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
