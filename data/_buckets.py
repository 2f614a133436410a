"""Aspect-ratio buckets for data of mixed sizes (kohya's and SimpleTuner's ``--enable_bucket``).

Without buckets every image is resized to one square side, which squashes a wide or tall image. With
them each record goes to the bucket (a width x height of about the square's area, sides a multiple of
``step``) nearest its aspect ratio, is resized to cover it and centre-cropped to it, and every batch
holds one bucket's records. The batches are cut from the sampler's own draws, in their order, epoch
after epoch as one stream (each drawn record waits in its bucket's queue until the queue holds a
batch, across an epoch's end if need be), so every drawn record is trained on and the rebalanced mix
the sampler draws is the mix the model trains on; an epoch is the same number of batches as without
buckets.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
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
            sizes |= {(w, h), (h, w)}  # both orientations, as kohya's
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
    """Batches of one bucket each, cut from a :class:`WeightedEpochSampler`'s draws in their order.

    This rank's draws of epoch 0, 1, 2, ... form one stream; each drawn record joins its bucket's queue,
    and a queue that holds ``batch_size`` records is a batch. Epoch ``e`` is batches ``e·B`` to
    ``(e + 1)·B − 1`` of that stream, ``B`` being the batches an epoch of the sampler fills without
    buckets (``draws // batch_size``): the same on every rank and in every epoch, so DDP ranks and
    Lightning's epoch length agree. A record still queued at an epoch's end is trained on in a later
    one: nothing drawn is dropped. Everything is a function of the sampler's seed, so a resumed run
    (``skip``: whole batches of its epoch, set by the loader) yields what an uninterrupted one does.

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
        self._reset()

    def _reset(self) -> None:
        self._queues: dict[int, list[int]] = {}
        self._ready: list[list[int]] = []  # batches from self._first on
        self._first = 0  # stream index of self._ready[0]
        self._next_draw = 0  # the next epoch whose draw joins the stream

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def _draw(self, epoch: int) -> np.ndarray:
        saved = self.sampler.epoch
        self.sampler.epoch = epoch
        try:
            return self.sampler.epoch_draw().numpy()[self.sampler.rank :: self.sampler.world_size]
        finally:
            self.sampler.epoch = saved

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """Epoch ``epoch``'s batches (see the class)."""
        per = len(self)
        lo, hi = epoch * per, (epoch + 1) * per
        if lo < self._first:  # an earlier epoch than the stream kept: rebuild it from the start
            self._reset()
        while self._first + len(self._ready) < hi:
            for i in self._draw(self._next_draw):
                q = self._queues.setdefault(int(self.buckets[i]), [])
                q.append(int(i))
                if len(q) == self.batch_size:
                    self._ready.append(q.copy())
                    q.clear()
            self._next_draw += 1
        drop = lo - self._first  # batches of earlier epochs are not needed again
        self._ready, self._first = self._ready[drop:], lo
        return self._ready[: hi - lo]

    def __iter__(self) -> Iterator[list[int]]:
        skip, self.skip = self.skip, 0
        return iter(self.epoch_batches(self.sampler.epoch)[skip:])
