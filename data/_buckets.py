"""Aspect-ratio buckets for data of mixed sizes (kohya's and SimpleTuner's ``--enable_bucket``).

Without buckets every image is resized to one square side, which squashes a wide or tall image. With
them each record goes to the bucket (a width x height of about the square's area, sides a multiple of
``step``) nearest its aspect ratio, is resized to cover it and centre-cropped to it, and every batch
holds one bucket's records. The batches are cut from the sampler's own draw, in its order (each drawn
record waits in its bucket's queue until the queue holds a batch), so the rebalanced mix the sampler
draws is the mix the model trains on, less the partial batches left in the queues at the epoch's end.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Sampler

from ._schema import SchemaError


@dataclass
class BucketConfig:
    """Aspect-ratio buckets (``data.buckets``; ``None``: every image resized to the square side).

    Attributes:
        max_aspect: The widest bucket's width / height, and the tallest's height / width.
        step: Bucket sides are multiples of this many pixels: the VAE's downsampling times the UNet's
            (8 x 8 = 64 for SD 1.5 at 512 px, as kohya's default; 8 for a 32 px model with a 4x VAE
            and a two-level UNet).
    """

    max_aspect: float = 2.0
    step: int = 64


def bucket_sizes(side: int, cfg: BucketConfig) -> list[tuple[int, int]]:
    """Every bucket's ``(width, height)``: sides multiples of ``cfg.step``, area at most ``side``²,
    the tallest height for each width, aspect within ``cfg.max_aspect``; sorted by aspect (w / h).

    Raises:
        SchemaError: ``side`` is not a multiple of ``step``, or ``max_aspect`` is below 1.
    """
    if cfg.step <= 0 or side % cfg.step:
        raise SchemaError(f"data.buckets.step={cfg.step} must divide data.image_size={side}")
    if cfg.max_aspect < 1:
        raise SchemaError(f"data.buckets.max_aspect={cfg.max_aspect} must be at least 1")
    sizes = {(side, side)}
    for w in range(cfg.step, side * side // cfg.step + 1, cfg.step):
        h = (side * side // w) // cfg.step * cfg.step
        if h >= cfg.step and max(w / h, h / w) <= cfg.max_aspect:
            sizes.add((w, h))
    return sorted(sizes, key=lambda s: (s[0] / s[1], -s[0] * s[1]))


def assign_buckets(sizes: Sequence[tuple[int, int] | None], buckets: Sequence[tuple[int, int]]) -> np.ndarray:
    """Per image ``(width, height)``, the index of the bucket nearest its aspect ratio (in log
    ratio; ties to the larger area); an unreadable image (``None``) goes to the square bucket."""
    log_b = np.array([math.log(w / h) for w, h in buckets])
    area = np.array([w * h for w, h in buckets], dtype=np.float64)
    square = int(np.argmin(np.abs(log_b)))
    out = np.empty(len(sizes), dtype=np.int64)
    for i, s in enumerate(sizes):
        if s is None:
            out[i] = square
            continue
        d = np.abs(log_b - math.log(s[0] / s[1]))
        near = np.flatnonzero(d <= d.min() + 1e-12)
        out[i] = near[np.argmax(area[near])]
    return out


def fit_to_bucket(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize ``image`` (bicubic) to the smallest size that covers ``size`` = ``(width, height)`` and
    crop its centre to it."""
    w, h = image.size
    bw, bh = size
    scale = max(bw / w, bh / h)
    rw, rh = max(bw, round(w * scale)), max(bh, round(h * scale))
    if (rw, rh) != (w, h):
        image = image.resize((rw, rh), Image.BICUBIC)
    left, top = (rw - bw) // 2, (rh - bh) // 2
    return image.crop((left, top, left + bw, top + bh)) if (rw, rh) != (bw, bh) else image


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of one bucket each, cut from a :class:`WeightedEpochSampler`'s draw in its order.

    Each rank cuts its own part of the epoch's draw; every rank then yields as many batches as the rank
    with the fewest (ranks compute each other's draws, a function of seed and epoch), so DDP ranks never
    wait on one another at the epoch's end. ``skip`` (whole batches, set by the loader of a resumed run)
    is skipped once.

    Args:
        sampler: The epoch's weighted draw (``rank``, ``world_size``, ``epoch``, ``epoch_draw()``).
        buckets: Per record (the sampler's indices), its bucket.
        batch_size: Records per batch.
    """

    def __init__(self, sampler, buckets: np.ndarray, batch_size: int) -> None:
        self.sampler = sampler
        self.buckets = np.asarray(buckets)
        self.batch_size = batch_size
        self.skip = 0
        self._cache: tuple[int, list[list[int]]] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def batches_of(self, draw: Sequence[int]) -> list[list[int]]:
        """The full batches ``draw`` fills, in the order they fill."""
        queues: dict[int, list[int]] = {}
        out = []
        for i in draw:
            q = queues.setdefault(int(self.buckets[i]), [])
            q.append(int(i))
            if len(q) == self.batch_size:
                out.append(q.copy())
                q.clear()
        return out

    def _epoch_batches(self) -> list[list[int]]:
        epoch = self.sampler.epoch
        if self._cache is None or self._cache[0] != epoch:
            draw = self.sampler.epoch_draw().numpy()
            world = self.sampler.world_size
            per_rank = [self.batches_of(draw[r::world]) for r in range(world)]
            n = min(len(b) for b in per_rank)
            self._cache = (epoch, per_rank[self.sampler.rank][:n])
        return self._cache[1]

    def __iter__(self) -> Iterator[list[int]]:
        skip, self.skip = self.skip, 0
        return iter(self._epoch_batches()[skip:])

    def __len__(self) -> int:
        return len(self._epoch_batches())


def bucket_pixels(images: Sequence[Image.Image]) -> torch.Tensor:
    """Bucketed images (one size) to a ``(B, 3, H, W)`` tensor in [-1, 1]."""
    sizes = {im.size for im in images}
    if len(sizes) > 1:
        raise ValueError(f"a bucketed batch mixes image sizes {sorted(sizes)}")
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2)
