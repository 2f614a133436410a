"""ColoredDigits-Bias (DESIGN §7): real handwriting with a protected ink colour, skewed per digit.

Source images are scikit-learn's ``load_digits`` (1,797 8x8 digits shipped in its wheel), upsampled
and rendered in an ink colour (and optionally on a light or dark background). Each digit is a
concept, skewed like an occupation: by default digits 0-4 are mostly red, 5-9 mostly blue.
"""

from __future__ import annotations

import colorsys
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fairtune.data import AttributeSpec, Record

# Ink and background colours (RGB in [0, 1]); the hue judge takes its prototypes from these.
INK = {"red": (0.85, 0.12, 0.12), "blue": (0.12, 0.25, 0.85), "green": (0.10, 0.62, 0.18)}
BACKGROUND = {"light": (0.96, 0.96, 0.95), "dark": (0.10, 0.10, 0.12)}
DEFAULT_RED_SHARE = [0.95, 0.90, 0.85, 0.80, 0.75, 0.25, 0.20, 0.15, 0.10, 0.05]
DIGITS = list(range(10))


def concept_name(digit: int) -> str:
    return f"digit {digit}"


def neutral_prompt(digit: int) -> str:
    return f"a handwritten digit {digit}"


def explicit_prompt(digit: int, color: str, background: str | None = None) -> str:
    p = f"a {color} handwritten digit {digit}"
    return p if background is None else f"{p} on a {background} background"


def ink_hue(color: str) -> float:
    """Hue of an ink colour in degrees."""
    return colorsys.rgb_to_hsv(*INK[color])[0] * 360.0


@dataclass
class ColoredDigitsConfig:
    """How ColoredDigits-Bias is rendered.

    Attributes:
        size: Image side in pixels (16 or 32).
        colors: Ink colours, the classes of attribute ``color``; add ``"green"`` for K=3.
        background: Also render attribute ``background`` in {light, dark} (for joint targets).
        red_share: Per digit 0-9, the share of training renders in the first colour; the rest is
            split evenly over the other colours (ignored when ``color_shares`` is given).
        color_shares: Per digit 0-9, the share of training renders in each colour (one list per
            digit, in the order of ``colors``, summing to 1): a skew with a dominant ink among three.
        dark_share: Per digit, the share of dark backgrounds (only with ``background``).
        explicit_share: Share of training captions that name the attributes ("a blue ...").
        renders_per_image: Training renders per source image.
        heldout_fraction: Share of source images kept out of training, for judges and references.
        heldout_renders: Renders per held-out source image (colours balanced).
        shard_size: Records per webdataset shard.
        seed: Seed for the split, colours, jitter and captions.
    """

    size: int = 16
    colors: list[str] = field(default_factory=lambda: ["red", "blue"])
    background: bool = False
    red_share: list[float] = field(default_factory=lambda: list(DEFAULT_RED_SHARE))
    color_shares: list[list[float]] | None = None
    dark_share: list[float] = field(default_factory=lambda: [0.3] * 10)
    explicit_share: float = 0.25
    renders_per_image: int = 4
    heldout_fraction: float = 0.5
    heldout_renders: int = 4
    shard_size: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.size not in (16, 32):
            raise ValueError(f"size must be 16 or 32, got {self.size}")
        unknown = [c for c in self.colors if c not in INK]
        if unknown or len(self.colors) < 2 or len(set(self.colors)) != len(self.colors):
            raise ValueError(f"colors must be 2-3 distinct of {list(INK)}, got {self.colors}")
        for name in ("red_share", "dark_share"):
            v = getattr(self, name)
            if len(v) != 10 or not all(0.0 <= x <= 1.0 for x in v):
                raise ValueError(f"{name} needs 10 values in [0, 1] (one per digit), got {v}")
        if self.color_shares is not None:
            rows = self.color_shares
            if len(rows) != 10 or any(len(r) != len(self.colors) for r in rows):
                raise ValueError(
                    f"color_shares needs 10 rows (one per digit) of {len(self.colors)} shares "
                    f"(one per colour of {self.colors}), got {rows}"
                )
            for d, r in enumerate(rows):
                if any(x < 0 for x in r) or abs(sum(r) - 1.0) > 1e-6:
                    raise ValueError(f"color_shares[{d}] must be non-negative and sum to 1, got {r}")
        if not 0.0 <= self.explicit_share <= 1.0:
            raise ValueError(f"explicit_share must be in [0, 1], got {self.explicit_share}")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")

    def spec(self) -> AttributeSpec:
        classes = {"color": list(self.colors)}
        if self.background:
            classes["background"] = list(BACKGROUND)
        return AttributeSpec(classes)


def render(
    gray: np.ndarray,
    ink: np.ndarray,
    background: np.ndarray,
    *,
    size: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Render 8x8 grey digits (N, 8, 8) in [0, 1] as RGB (N, size, size, 3) in [0, 1].

    Each render gets a random one-pixel shift, a little ink-colour and contrast jitter.
    """
    n = gray.shape[0]
    x = torch.from_numpy(gray).float()[:, None]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)[:, 0].numpy()
    # Sharpen the stroke a little: bilinear upsampling leaves a wide soft edge.
    alpha = np.clip((x - 0.15) * 1.4, 0.0, 1.0)
    shift = max(1, size // 16)
    out = np.empty((n, size, size), dtype=np.float32)
    for i in range(n):
        dy, dx = rng.integers(-shift, shift + 1, size=2)
        out[i] = np.roll(alpha[i], (int(dy), int(dx)), axis=(0, 1))
    alpha = out * rng.uniform(0.85, 1.0, size=(n, 1, 1))
    ink = np.clip(ink + rng.normal(0.0, 0.03, size=ink.shape), 0.0, 1.0)
    background = np.clip(background + rng.normal(0.0, 0.015, size=background.shape), 0.0, 1.0)
    a = alpha[..., None]
    return (background[:, None, None, :] * (1.0 - a) + ink[:, None, None, :] * a).astype(np.float32)


def _stratified(shares: list[float], n: int, rng: np.random.Generator) -> np.ndarray:
    """Class indices for n items with counts as close to ``shares`` as integers allow, shuffled."""
    counts = np.floor(np.asarray(shares) * n).astype(int)
    rest = n - counts.sum()
    frac = np.asarray(shares) * n - counts
    counts[np.argsort(-frac)[:rest]] += 1
    labels = np.repeat(np.arange(len(shares)), counts)
    return rng.permutation(labels)


def _color_shares(cfg: ColoredDigitsConfig, digit: int) -> list[float]:
    if cfg.color_shares is not None:
        return [float(x) for x in cfg.color_shares[digit]]
    first = cfg.red_share[digit]
    rest = (1.0 - first) / (len(cfg.colors) - 1)
    return [first] + [rest] * (len(cfg.colors) - 1)


def _to_pil(arr: np.ndarray) -> Image.Image:
    return Image.fromarray((np.clip(arr, 0, 1) * 255 + 0.5).astype(np.uint8), mode="RGB")


def generate(cfg: ColoredDigitsConfig) -> dict[str, list[dict]]:
    """Render the training and held-out splits as lists of row dicts (image is a PIL image)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0
    targets = digits.target.astype(int)
    rng = np.random.default_rng(cfg.seed)

    # Split source images per digit so both splits hold every digit and share no source image.
    heldout_ids, train_ids = [], []
    for d in DIGITS:
        ids = rng.permutation(np.flatnonzero(targets == d))
        k = int(round(len(ids) * cfg.heldout_fraction))
        heldout_ids.extend(ids[:k].tolist())
        train_ids.extend(ids[k:].tolist())

    splits: dict[str, list[dict]] = {}
    for split, ids, reps in (
        ("train", train_ids, cfg.renders_per_image),
        ("heldout", heldout_ids, cfg.heldout_renders),
    ):
        rows: list[dict] = []
        for d in DIGITS:
            src = np.array([i for i in ids if targets[i] == d], dtype=int)
            src = np.repeat(src, reps)
            n = len(src)
            if split == "train":
                color_shares = _color_shares(cfg, d)
                dark = cfg.dark_share[d]
            else:  # judges see every colour and background equally often
                color_shares = [1.0 / len(cfg.colors)] * len(cfg.colors)
                dark = 0.5
            color_idx = _stratified(color_shares, n, rng)
            bg_idx = _stratified([1.0 - dark, dark], n, rng) if cfg.background else np.zeros(n, int)
            ink = np.array([INK[cfg.colors[c]] for c in color_idx])
            bg_names = list(BACKGROUND)
            bg = np.array([BACKGROUND[bg_names[b]] for b in bg_idx])
            pix = render(images[src], ink, bg, size=cfg.size, rng=rng)
            explicit = rng.random(n) < cfg.explicit_share
            for j in range(n):
                color = cfg.colors[color_idx[j]]
                background = bg_names[bg_idx[j]] if cfg.background else None
                prompt = explicit_prompt(d, color, background) if explicit[j] else neutral_prompt(d)
                row = {
                    "image": _to_pil(pix[j]),
                    "prompt": prompt,
                    "concept": concept_name(d),
                    "digit": d,
                    "color": color,
                    "source_id": int(src[j]),
                }
                if cfg.background:
                    row["background"] = background
                rows.append(row)
        order = rng.permutation(len(rows))
        splits[split] = [rows[i] for i in order]
    return splits


def split_stats(rows: list[dict], cfg: ColoredDigitsConfig) -> dict:
    """Per concept: record count, attribute class counts, and the share of the first colour."""
    attrs = cfg.spec().classes
    out: dict[str, dict] = {}
    for d in DIGITS:
        sub = [r for r in rows if r["digit"] == d]
        entry: dict = {"n": len(sub)}
        for a, classes in attrs.items():
            entry[a] = {c: sum(r[a] == c for r in sub) for c in classes}
        entry[f"{cfg.colors[0]}_share"] = entry["color"][cfg.colors[0]] / max(1, len(sub))
        entry["explicit_captions"] = sum(r["prompt"] != neutral_prompt(d) for r in sub)
        out[concept_name(d)] = entry
    return out


def build(cfg: ColoredDigitsConfig, out: str | Path) -> dict:
    """Write ColoredDigits-Bias to ``out``: ``table/`` (datasets, splits train and heldout),
    ``shards/train-*.tar`` and ``shards/heldout-*.tar`` (webdataset), ``stats.json``.

    Returns:
        The stats written to ``stats.json``.
    """
    import datasets

    from fairtune.data import write_shards

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    splits = generate(cfg)
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "prompt": datasets.Value("string"),
            "concept": datasets.Value("string"),
            "digit": datasets.Value("int32"),
            "color": datasets.Value("string"),
            "source_id": datasets.Value("int32"),
            **({"background": datasets.Value("string")} if cfg.background else {}),
        }
    )
    table = datasets.DatasetDict(
        {name: datasets.Dataset.from_list(rows, features=features) for name, rows in splits.items()}
    )
    table.save_to_disk(str(out / "table"))
    spec = cfg.spec()
    for name, rows in splits.items():
        records = (
            Record(
                image=r["image"],
                prompt=r["prompt"],
                concept=r["concept"],
                attributes={a: r[a] for a in spec.names},
            )
            for r in rows
        )
        write_shards(records, out / "shards", per_shard=cfg.shard_size, prefix=name)
    stats = {
        "config": asdict(cfg),
        "attributes": spec.classes,
        "splits": {name: split_stats(rows, cfg) for name, rows in splits.items()},
        "heldout_source_images": len({r["source_id"] for r in splits["heldout"]}),
        "train_source_images": len({r["source_id"] for r in splits["train"]}),
    }
    (out / "stats.json").write_text(json.dumps(stats, indent=2))
    return stats


# ------------------------------------------------------------------ ink helpers (judges, lever 3)
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


def ink_map(x: torch.Tensor) -> torch.Tensor:
    """How far each pixel is from the image's background colour (its median), scaled to [0, 1] per
    image: ``(B, 1, H, W)``. Colour, tint and background brightness drop out; the stroke stays."""
    bg = x.flatten(2).median(dim=2).values[..., None, None]
    d = (x - bg).norm(dim=1, keepdim=True)
    return d / d.flatten(1).amax(1).clamp_min(1e-6)[:, None, None, None]


class InkMap(torch.nn.Module):
    """:func:`ink_map` as a parameter-free module: ColoredDigits' preservation features for lever 3
    (``fairness.preservation: {features: module, module: fairtune.colored_digits.InkMap}``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ink_map(x)


def ink_alpha(images: torch.Tensor) -> torch.Tensor:
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
    alpha = ink_alpha(x)
    t = (torch.rand(b, 3, 1, 1, generator=generator) * 2 - 1) * tint
    x = x + (1 - alpha) * t
    sigma = torch.rand(b, 1, 1, 1, generator=generator) * noise
    x = x + torch.randn(x.shape, generator=generator) * sigma
    mask = (torch.rand(b, 1, *x.shape[2:], generator=generator) < speckle).float()
    x = x * (1 - mask) + mask * torch.rand(x.shape, generator=generator)
    return x.clamp(0, 1)


def random_shift(images: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    dy, dx = torch.randint(-max_shift, max_shift + 1, (2,), generator=generator).tolist()
    return torch.roll(images, shifts=(dy, dx), dims=(2, 3))


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
    alpha = ink_alpha(images)
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
