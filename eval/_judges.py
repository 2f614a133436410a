"""Judges for ColoredDigits-Bias (DESIGN §7): the hue judge, a colour CNN and a digit CNN.

Images are float tensors ``(B, 3, H, W)`` in ``[0, 1]``. Judges must hold on *generated* images,
whose backgrounds carry a tint opposite to the ink and speckle noise: the hue judge reads only the
most ink-like (most chromatic) pixels, and the CNNs train with tint and noise augmentation.
Judged labels use ``-1`` for an image the judge cannot place.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

UNDETERMINED = -1


def rgb_to_hue_chroma(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hue in degrees [0, 360) and chroma (max − min) per pixel of ``(B, 3, H, W)`` RGB."""
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    mx, _ = x.max(1)
    mn, _ = x.min(1)
    c = mx - mn
    safe = torch.where(c > 1e-8, c, torch.ones_like(c))
    h = torch.where(
        mx == r,
        ((g - b) / safe) % 6,
        torch.where(mx == g, (b - r) / safe + 2, (r - g) / safe + 4),
    )
    return (h * 60.0) % 360.0, c


class HueJudge:
    """Ink colour from the hue of the most chromatic pixels.

    Args:
        classes: Colour names (the classes of attribute ``color``).
        hues: Prototype hue (degrees) of each class.
        ink_fraction: Share of an image's pixels read as ink: the most chromatic ones.
        min_chroma: Below this mean chroma of the ink pixels the ink is too faint to call.
        max_hue_distance: An ink pixel further than this from every prototype votes for no class.
        min_agreement: The winning class needs this share of the (chroma-weighted) votes.
    """

    def __init__(
        self,
        classes: list[str],
        hues: list[float],
        *,
        ink_fraction: float = 0.08,
        min_chroma: float = 0.2,
        max_hue_distance: float = 45.0,
        min_agreement: float = 0.7,
    ) -> None:
        if len(classes) != len(hues):
            raise ValueError("one prototype hue per class")
        self.classes, self.hues = list(classes), torch.tensor(hues, dtype=torch.float32)
        self.ink_fraction, self.min_chroma = ink_fraction, min_chroma
        self.max_hue_distance, self.min_agreement = max_hue_distance, min_agreement

    @classmethod
    def for_colors(cls, colors: list[str], **kw) -> HueJudge:
        from fairtune.data import ink_hue

        return cls(colors, [ink_hue(c) for c in colors], **kw)

    @torch.no_grad()
    def votes(self, images: torch.Tensor) -> torch.Tensor:
        """Per image, the chroma-weighted vote share of each class, ``(B, K)``; rows may sum < 1."""
        hue, chroma = rgb_to_hue_chroma(images.float().clamp(0, 1))
        # Average the chroma vector over 3x3 neighbourhoods: a stroke keeps its colour while an
        # isolated speckle of noise is diluted ninefold and no longer outranks real ink.
        rad = torch.deg2rad(hue)
        vec = torch.stack([chroma * torch.cos(rad), chroma * torch.sin(rad)], 1)
        vec = F.avg_pool2d(vec, 3, stride=1, padding=1, count_include_pad=False)
        chroma = vec.norm(dim=1)
        hue = torch.rad2deg(torch.atan2(vec[:, 1], vec[:, 0])) % 360.0
        b = hue.shape[0]
        hue, chroma = hue.reshape(b, -1), chroma.reshape(b, -1)
        k = max(4, int(round(self.ink_fraction * hue.shape[1])))
        top_c, idx = chroma.topk(k, dim=1)
        top_h = hue.gather(1, idx)
        d = (top_h[..., None] - self.hues).abs() % 360
        d = torch.minimum(d, 360 - d)  # (B, k, K) circular distance
        nearest = d.argmin(-1)
        near_ok = d.min(-1).values <= self.max_hue_distance
        w = top_c * near_ok
        v = torch.zeros(b, len(self.classes))
        v.scatter_add_(1, nearest, w)
        v = v / top_c.sum(1, keepdim=True).clamp_min(1e-8)
        faint = top_c.mean(1) < self.min_chroma
        v[faint] = 0.0
        return v

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Class index per image, or -1 where the ink is faint or its hue ambiguous."""
        v = self.votes(images)
        share, label = v.max(1)
        return torch.where(share >= self.min_agreement, label, torch.full_like(label, UNDETERMINED))


def ink_map(x: torch.Tensor) -> torch.Tensor:
    """How far each pixel is from the image's background colour (its median), scaled to [0, 1] per
    image: ``(B, 1, H, W)``. Colour, tint and background brightness drop out; the stroke stays."""
    bg = x.flatten(2).median(dim=2).values[..., None, None]
    d = (x - bg).norm(dim=1, keepdim=True)
    return d / d.flatten(1).amax(1).clamp_min(1e-6)[:, None, None, None]


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


def _ink_alpha(images: torch.Tensor) -> torch.Tensor:
    """``(B, 1, H, W)`` ink opacity: distance to the image's median (background) colour, 0.6 = full ink."""
    bg = images.flatten(2).median(dim=2).values[..., None, None]  # (B, 3, 1, 1)
    return ((images - bg).abs().amax(1, keepdim=True) / 0.6).clamp(0, 1)


def perturb(
    images: torch.Tensor,
    generator: torch.Generator,
    *,
    tint: float = 0.25,
    noise: float = 0.12,
    speckle: float = 0.03,
) -> torch.Tensor:
    """What generated samples look like: a background tint, Gaussian noise and coloured speckles.

    The tint is a random colour added where the pixel is far from the ink (estimated as distance to
    the image's median colour), so the stroke keeps its colour while the background shifts.
    """
    b = images.shape[0]
    x = images.clone()
    ink_alpha = _ink_alpha(x)
    t = (torch.rand(b, 3, 1, 1, generator=generator) * 2 - 1) * tint
    x = x + (1 - ink_alpha) * t
    sigma = torch.rand(b, 1, 1, 1, generator=generator) * noise
    x = x + torch.randn(x.shape, generator=generator) * sigma
    mask = (torch.rand(b, 1, *x.shape[2:], generator=generator) < speckle).float()
    x = x * (1 - mask) + mask * torch.rand(x.shape, generator=generator)
    return x.clamp(0, 1)


def random_shift(images: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    dy, dx = torch.randint(-max_shift, max_shift + 1, (2,), generator=generator).tolist()
    return torch.roll(images, shifts=(dy, dx), dims=(2, 3))


@dataclass
class JudgeTrainConfig:
    """How the CNN judges are trained.

    Attributes:
        seed: Seed for the judge split, initialisation, batches and augmentation.
        val_fraction: Share of held-out source images kept to measure the judges.
        digit_epochs: Epochs for the digit CNN.
        color_epochs: Epochs for the colour CNN.
        batch_size: Batch size.
        lr: AdamW learning rate (cosine-decayed to 0).
        augment_prob: Probability a training image gets tint, noise and speckles.
        width: First-block channels of each CNN.
        feature_dim: Penultimate width (Fréchet-distance features).
        mixed_ink_prob: Probability a training image is recoloured with two classes' inks (a blend or
            a split stroke) and labelled softly by each ink's share (see :func:`mixed_ink`); 0 for the
            judges. For lever 3's classifier it closes a loophole: a classifier that never saw mixed
            ink calls a purple digit confidently red or blue, and the fairness loss learns to draw
            purple digits instead of changing the colour.
    """

    seed: int = 0
    val_fraction: float = 0.2
    digit_epochs: int = 30
    color_epochs: int = 6
    batch_size: int = 128
    lr: float = 2e-3
    augment_prob: float = 0.8
    width: int = 32
    feature_dim: int = 64
    mixed_ink_prob: float = 0.0


def mixed_ink(
    images: torch.Tensor, labels: torch.Tensor, num_classes: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Recolour each image's ink with its own class's ink and another class's, with soft labels.

    The ink is found as in :func:`perturb` (distance to the image's median colour); a class's ink
    colour is the mean of the inkiest pixels of the batch's images of that class. Each image gets a
    field ``a`` in [0, 1]: half of them a constant blend (``a ~ U(0, 1)``, a purple-like mix), the
    other half a split stroke (``a`` = 1 on one side of a random line through the centre, 0 on the
    other). Pixel ink becomes ``a·own + (1 − a)·other``; the label is the ink-weighted mean of ``a`` for
    the own class and the rest for the other class.

    Args:
        images: ``(B, 3, H, W)`` in [0, 1].
        labels: ``(B,)`` class indices.
        num_classes: Number of classes.
        generator: Random source.

    Returns:
        The recoloured images and their ``(B, num_classes)`` soft labels; unchanged images and
        one-hot labels when the batch holds a single class.
    """
    b, _, h, w = images.shape
    alpha = _ink_alpha(images)
    inky = (alpha > 0.5).float()
    colour = (images * inky).sum((2, 3)) / inky.sum((2, 3)).clamp_min(1)  # (B, 3) per image
    soft = F.one_hot(labels, num_classes).float()
    present = [c for c in range(num_classes) if (labels == c).any()]
    if len(present) < 2:
        return images, soft
    class_ink = torch.stack(
        [colour[labels == c].mean(0) if c in present else colour.new_zeros(3) for c in range(num_classes)]
    )
    # the other class: uniform over the batch's classes but the image's own
    pres = torch.tensor(present)
    r = torch.randint(0, len(present) - 1, (b,), generator=generator)
    own_pos = torch.searchsorted(pres, labels)
    others = pres[r + (r >= own_pos).long()]
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    theta = torch.rand(b, generator=generator) * 2 * math.pi
    split = ((xx * theta.cos()[:, None, None] + yy * theta.sin()[:, None, None]) > 0).float()
    blend = torch.rand(b, 1, 1, generator=generator).expand(b, h, w)
    use_split = (torch.rand(b, generator=generator) < 0.5)[:, None, None]
    a = torch.where(use_split, split, blend)[:, None]  # (B, 1, H, W)
    out = images + alpha * (1 - a) * (class_ink[others] - colour)[..., None, None]
    share = (alpha * a).sum((1, 2, 3)) / alpha.sum((1, 2, 3)).clamp_min(1e-6)  # own ink's share
    soft = soft * share[:, None] + F.one_hot(others, num_classes).float() * (1 - share[:, None])
    return out.clamp(0, 1), soft


def _train_cnn(
    model: SmallCNN,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    cfg: JudgeTrainConfig,
    generator: torch.Generator,
) -> None:
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


@dataclass
class Judges:
    """The three judges of ColoredDigits-Bias, loaded together.

    Attributes:
        colors: Colour classes (attribute ``color``).
        hue: The hue judge.
        color_cnn: The colour CNN.
        digit_cnn: The digit CNN; its ``features`` feed the Fréchet distance.
        report: What ``judges.json`` says (accuracies, config).
    """

    colors: list[str]
    hue: HueJudge
    color_cnn: SmallCNN
    digit_cnn: SmallCNN
    report: dict = field(default_factory=dict)

    def color(self, images: torch.Tensor, *, judge: str = "hue") -> torch.Tensor:
        """Colour label per image (-1 undetermined) from the ``"hue"`` or ``"cnn"`` judge."""
        if judge == "hue":
            return self.hue.predict(images)
        if judge == "cnn":
            return predict_batched(self.color_cnn, images)
        raise ValueError(f"unknown colour judge {judge!r}; use 'hue' or 'cnn'")

    def digit(self, images: torch.Tensor) -> torch.Tensor:
        return predict_batched(self.digit_cnn, images)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return features_batched(self.digit_cnn, images)


def images_from_table(table) -> torch.Tensor:
    """A ``datasets`` table's ``image`` column as a ``(N, 3, H, W)`` float tensor in [0, 1]."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in table["image"]])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
    os.replace(tmp, path)


def train_judges(data_dir: str | Path, out: str | Path, cfg: JudgeTrainConfig | None = None) -> dict:
    """Train the CNN judges on the held-out split of a ColoredDigits-Bias folder and measure all three.

    The held-out split is divided by source image into judge-train and judge-val, so validation
    images share no handwriting with the judges' training images. Writes ``digit_cnn.safetensors``,
    ``color_cnn.safetensors`` and ``judges.json`` to ``out``.

    Returns:
        The report written to ``judges.json``.
    """
    from fairtune.data import load_table

    cfg = cfg or JudgeTrainConfig()
    data_dir, out = Path(data_dir), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stats = json.loads((data_dir / "stats.json").read_text())
    colors = stats["attributes"]["color"]
    table = load_table(str(data_dir / "table"), split="heldout")
    x = images_from_table(table)
    digit = torch.tensor(table["digit"])
    color = torch.tensor([colors.index(c) for c in table["color"]])
    sources = np.array(table["source_id"])

    rng = np.random.default_rng(cfg.seed)
    uniq = rng.permutation(np.unique(sources))
    val_src = set(uniq[: int(round(len(uniq) * cfg.val_fraction))].tolist())
    is_val = torch.tensor([s in val_src for s in sources])
    tr, va = ~is_val, is_val

    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    digit_cnn = SmallCNN(10, cfg.width, cfg.feature_dim, ink_only=True)
    _train_cnn(digit_cnn, x[tr], digit[tr], epochs=cfg.digit_epochs, cfg=cfg, generator=g)
    color_cnn = SmallCNN(len(colors), cfg.width // 2, cfg.feature_dim // 2)
    _train_cnn(color_cnn, x[tr], color[tr], epochs=cfg.color_epochs, cfg=cfg, generator=g)
    hue = HueJudge.for_colors(colors)

    # Measure on clean validation renders and on perturbed copies (tint + noise + speckles).
    xv = x[va]
    xp = perturb(xv, torch.Generator().manual_seed(cfg.seed + 1))

    def acc(pred: torch.Tensor, y: torch.Tensor) -> float:
        return float((pred == y).float().mean())

    hue_all = hue.predict(x)
    report = {
        "colors": colors,
        "image_size": int(x.shape[-1]),
        "train_images": int(tr.sum()),
        "val_images": int(va.sum()),
        "digit_cnn": {
            "val_accuracy": acc(predict_batched(digit_cnn, xv), digit[va]),
            "val_accuracy_perturbed": acc(predict_batched(digit_cnn, xp), digit[va]),
        },
        "color_cnn": {
            "val_accuracy": acc(predict_batched(color_cnn, xv), color[va]),
            "val_accuracy_perturbed": acc(predict_batched(color_cnn, xp), color[va]),
        },
        "hue": {
            "agreement": acc(hue_all, color),
            "undetermined_rate": float((hue_all == UNDETERMINED).float().mean()),
            "agreement_perturbed": acc(hue.predict(xp), color[va]),
            "prototype_hues": hue.hues.tolist(),
        },
        "config": asdict(cfg),
    }
    _atomic_save(digit_cnn.state_dict(), out / "digit_cnn.safetensors")
    _atomic_save(color_cnn.state_dict(), out / "color_cnn.safetensors")
    tmp = out / "judges.json.tmp"
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, out / "judges.json")
    return report


def load_judges(path: str | Path) -> Judges:
    """Load judges written by :func:`train_judges` (safetensors weights, no pickle)."""
    path = Path(path)
    if not (path / "judges.json").exists():
        raise FileNotFoundError(f"no judges.json in {path}: run `fairtune judges train` first")
    report = json.loads((path / "judges.json").read_text())
    cfg = JudgeTrainConfig(**report["config"])
    colors = report["colors"]
    digit_cnn = SmallCNN(10, cfg.width, cfg.feature_dim, ink_only=True)
    digit_cnn.load_state_dict(load_file(str(path / "digit_cnn.safetensors")))
    color_cnn = SmallCNN(len(colors), cfg.width // 2, cfg.feature_dim // 2)
    color_cnn.load_state_dict(load_file(str(path / "color_cnn.safetensors")))
    return Judges(
        colors=colors,
        hue=HueJudge.for_colors(colors),
        color_cnn=color_cnn.eval(),
        digit_cnn=digit_cnn.eval(),
        report=report,
    )


def train_attribute_classifier(
    data_dir: str | Path,
    out: str | Path,
    *,
    attribute: str = "color",
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
    """
    from fairtune.data import load_table

    data_dir, out = Path(data_dir), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    classes = json.loads((data_dir / "stats.json").read_text())["attributes"][attribute]
    train = load_table(str(data_dir / "table"), split="train")
    held = load_table(str(data_dir / "table"), split="heldout")
    x, y = images_from_table(train), torch.tensor([classes.index(c) for c in train[attribute]])
    torch.manual_seed(seed)
    cfg = JudgeTrainConfig(seed=seed, width=width, feature_dim=feature_dim, mixed_ink_prob=mixed_ink_prob)
    model = SmallCNN(len(classes), width, feature_dim)
    _train_cnn(model, x, y, epochs=epochs, cfg=cfg, generator=torch.Generator().manual_seed(seed))
    xh, yh = images_from_table(held), torch.tensor([classes.index(c) for c in held[attribute]])
    xp = perturb(xh, torch.Generator().manual_seed(seed + 1))
    report = {
        "module": "fairtune.eval.SmallCNN",
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
    _atomic_save(model.state_dict(), out / "classifier.safetensors")
    tmp = out / "classifier.json.tmp"
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, out / "classifier.json")
    return report
