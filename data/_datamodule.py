"""The Lightning DataModule: a table or webdataset shards of records, optionally rebalanced toward the
target mix (the table sampler, or its streaming form over shards)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ._buckets import (
    BucketBatchSampler,
    BucketConfig,
    assign_buckets,
    bucket_sizes,
    fit_to_bucket,
)
from ._latents import LatentCacheConfig, LatentEntry, load_or_build
from ._sampler import RebalanceConfig, WeightedEpochSampler, rebalance_weights
from ._schema import AttributeSpec, Record, SchemaError, Target, TargetConfig
from ._sources import MAX_SKIPPED_SHARE, ColumnMap, ShardDataset, TableDataset, expand_shards
from ._streaming import ShardLoader, StreamingRebalancedDataset


@dataclass
class SourceConfig:
    """Where the training records come from.

    Attributes:
        path: A ``save_to_disk`` folder, parquet file/folder/glob, imagefolder with metadata, hub id, or
            webdataset shards: a ``.tar`` path, glob or brace pattern (``shards/train-{000000..000099}.tar``;
            several separated by ``::``).
        format: How to read ``path`` (``auto`` decides from what is there; a path naming ``.tar`` files
            is read as shards).
        split: Split to read (tables).
        columns: Which column holds each record field (tables; shards carry ``png``/``jpg`` + ``json``).
        shuffle_buffer: Shards only: records held to shuffle each worker's stream.
        max_skipped_share: Ceiling on the share of records whose image or member cannot be read,
            counted per record: past it the job stops with an error naming the source (``null``: no
            ceiling; every skipped record is still counted and logged).
    """

    path: str
    format: Literal["auto", "disk", "parquet", "imagefolder", "hub", "shards"] = "auto"
    split: str = "train"
    columns: ColumnMap = field(default_factory=ColumnMap)
    shuffle_buffer: int = 1000
    max_skipped_share: float | None = MAX_SKIPPED_SHARE

    def is_shards(self) -> bool:
        return self.format == "shards" or (self.format == "auto" and ".tar" in str(self.path))

    def shard_urls(self) -> list[str]:
        return expand_shards(str(self.path).split("::"))


def to_pixels(image: Image.Image, size: int | tuple[int, int]) -> torch.Tensor:
    """PIL image to a ``(3, H, W)`` tensor in [-1, 1], resized with bicubic where needed to ``size``: a
    square side, or ``(width, height)``."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    if image.size != size:
        image = image.resize(size, Image.BICUBIC)
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1)


@dataclass
class CachedRecord:
    """A record whose image is replaced by its cached VAE posterior (``(V, C, h, w)`` mean and std)."""

    mean: torch.Tensor
    std: torch.Tensor
    prompt: str
    concept: str
    attributes: dict[str, str | None]


class _CachedSubset(Dataset):
    def __init__(self, entry: LatentEntry, prompts, concepts, attributes):
        self.entry, self.prompts, self.concepts, self.attributes = entry, prompts, concepts, attributes

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> CachedRecord | None:
        if not self.entry.valid[i]:
            return None  # its image did not decode when the entry was built
        e = self.entry
        return CachedRecord(e.mean[i], e.std[i], self.prompts[i], self.concepts[i], self.attributes[i])


class _Subset(Dataset):
    def __init__(self, base: TableDataset, indices: list[int]):
        self.base, self.indices = base, indices
        self.fit_to: list[tuple[int, int]] | None = None  # per record, its bucket's (width, height)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Record | None:
        rec = self.base[self.indices[i]]
        if rec is not None and self.fit_to is not None:
            rec = replace(rec, image=fit_to_bucket(rec.image, self.fit_to[i]))
        return rec


class EpochLoader(DataLoader):
    """The table's DataLoader over a :class:`WeightedEpochSampler`, *stateful* as :class:`ShardLoader` is:
    ``state_dict()`` (``{"epoch", "batches"}``) goes into the checkpoint, and ``load_state_dict`` makes the
    next pass over that epoch skip the batches already consumed. A run resumed from a checkpoint written
    inside an epoch (``checkpoint.every_n_train_steps``) then trains on the batches an uninterrupted run
    trains on next.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._yielded = 0
        self._resume: dict | None = None

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.batch_sampler.sampler.epoch, "batches": self._yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = {"epoch": int(state["epoch"]), "batches": int(state["batches"])}

    def __iter__(self):
        return self._batches()

    def _batches(self):
        # Resolved at the first batch, after Lightning's set_epoch and load_state_dict.
        skip = 0
        if self._resume is not None and self._resume["epoch"] == self.batch_sampler.sampler.epoch:
            skip = self._resume["batches"]
        self._resume = None
        self._yielded = skip
        if skip >= len(self):
            return
        if isinstance(self.batch_sampler, BucketBatchSampler):
            self.batch_sampler.skip = skip
        else:
            self.sampler.skip = skip * self.batch_size  # (drop_last: whole batches only)
        for batch in super().__iter__():
            self._yielded += 1
            yield batch


class AttributeDataModule(L.LightningDataModule):
    """Training batches of records: pixels, prompts, concepts and target-group labels.

    Each epoch draws ``samples_per_epoch`` records with replacement, as a function of (seed, epoch):
    uniformly without the lever, or rebalanced toward ``target`` within each concept with it. Under
    DDP each rank draws its own part (set ``trainer.use_distributed_sampler: false``). From webdataset
    shards the same mix is drawn in streaming form (:class:`StreamingRebalancedDataset`: each rank and
    worker streams its own shards, and the loader's place in the epoch is checkpointed).

    Args:
        source: Where the records come from (required).
        attributes: Attribute name to declared classes (required).
        target: The target mix (used by the sampler and by the other levers).
        rebalance: The rebalanced sampler (lever 1); ``None`` draws uniformly.
        concepts: Train only on these concepts (e.g. digits 0-7); ``None`` keeps all.
        image_size: Side the images are resized to; ``None`` keeps the source's size. (``fairtune fit``
            sets it from ``model.backbone.resolution`` where that is given, for sd/sdxl.)
        batch_size: Batch size per device.
        samples_per_epoch: Draws per epoch across all ranks. The loader's place in the epoch is
            checkpointed (tables and shards), so a run resumes exactly from a checkpoint inside an epoch.
        num_workers: DataLoader workers.
        seed: Seed of the draw.
        random_flip: Flip each drawn image horizontally with probability 1/2 (the training module draws
            the choice from its per-step generator, so a run from cached latents makes the same choices).
        latents: Train from VAE latents encoded once into a shared cache (tables, models with a VAE);
            ``None`` encodes the images at every step.
        buckets: Aspect-ratio buckets for images of mixed sizes (tables): each image resized to cover
            and centre-cropped to the bucket nearest its aspect ratio, of about ``image_size``² pixels,
            one bucket per batch; ``None`` resizes every image to ``image_size`` square.
    """

    def __init__(
        self,
        source: SourceConfig | None = None,
        attributes: dict[str, list[str]] | None = None,
        target: TargetConfig | None = None,
        rebalance: RebalanceConfig | None = None,
        concepts: list[str] | None = None,
        image_size: int | None = None,
        batch_size: int = 64,
        samples_per_epoch: int = 3200,
        num_workers: int = 0,
        seed: int = 0,
        random_flip: bool = False,
        latents: LatentCacheConfig | None = None,
        buckets: BucketConfig | None = None,
    ) -> None:
        super().__init__()
        if source is None:
            raise SchemaError("data.source is not set: give data.source.path (a table, parquet or shards)")
        if not attributes:
            raise SchemaError(
                "data.attributes is not set: declare each attribute's classes, e.g. "
                "{gender: [female, male]} (class indices follow this order)"
            )
        self.source = source
        self.spec = AttributeSpec(attributes)
        self.target = Target(target or TargetConfig(), self.spec)
        self.rebalance = rebalance
        self.concepts = concepts
        self.image_size = image_size
        self.batch_size = batch_size
        self.samples_per_epoch = samples_per_epoch
        self.num_workers = num_workers
        self.seed = seed
        self.random_flip = random_flip
        self.latents = latents
        self.buckets = buckets
        self.bucket_sizes: list[tuple[int, int]] = []
        self.record_bucket: np.ndarray | None = None
        self.latent_entry: LatentEntry | None = None
        self.dataset: _Subset | _CachedSubset | StreamingRebalancedDataset | None = None

    def _setup_shards(self) -> None:
        if self.buckets is not None:
            raise SchemaError(
                "data.buckets needs a table source (a bucket is chosen from every record's size up front); "
                "with webdataset shards, resize the images upstream or leave data.buckets unset"
            )
        ds = StreamingRebalancedDataset(
            self.source.shard_urls(),
            self.spec,
            self.target,
            rebalance_unknown=None if self.rebalance is None else self.rebalance.unknown,
            concepts=self.concepts,
            batch_size=self.batch_size,
            samples_per_epoch=self.samples_per_epoch,
            seed=self.seed,
            shuffle_buffer=self.source.shuffle_buffer,
            max_skipped_share=self.source.max_skipped_share,
        )
        self.dataset = ds
        self.record_concepts, self.record_groups = ds.concepts, ds.groups
        self.weights = torch.from_numpy(ds.weights)
        if self.image_size is None:
            stream = ShardDataset(ds.urls[:1], self.spec, rank=0, world_size=1, max_skipped_share=None)
            first = next(r for r in stream if r is not None)
            self.image_size = first.image.size[0]

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is not None:
            return
        if self.source.is_shards():
            self._setup_shards()
            return
        table = TableDataset(
            self.source.path,
            self.spec,
            self.source.columns,
            format=self.source.format,
            split=self.source.split,
            max_skipped_share=self.source.max_skipped_share,
        )
        keep = [i for i, c in enumerate(table.concepts) if self.concepts is None or c in self.concepts]
        if not keep:
            raise SchemaError(
                f"no record has a concept in data.concepts={self.concepts}; "
                f"the table's concepts: {sorted(set(table.concepts))}"
            )
        missing = set(self.concepts or []) - {table.concepts[i] for i in keep}
        if missing:
            raise SchemaError(f"data.concepts names concepts with no record: {sorted(missing)}")
        self.table = table
        self.dataset = _Subset(table, keep)
        self.record_concepts = [table.concepts[i] for i in keep]
        self.record_groups = [self.target.group_of(table.attributes(i)) for i in keep]
        if self.rebalance is not None:
            self.weights = rebalance_weights(
                self.record_concepts, self.record_groups, self.target, unknown=self.rebalance.unknown
            )
        else:
            self.weights = torch.ones(len(keep), dtype=torch.float64)
        if self.buckets is not None:
            self._setup_buckets()
        if self.image_size is None:
            first = next(r for r in (self.dataset[i] for i in range(len(self.dataset))) if r is not None)
            self.image_size = first.image.size[0]

    def _setup_buckets(self) -> None:
        if self.image_size is None:
            raise SchemaError(
                "data.buckets needs data.image_size (or model.backbone.resolution): the side of the square "
                "whose area every bucket keeps"
            )
        self.bucket_sizes = bucket_sizes(self.image_size, self.buckets)
        sizes = self.table.image_sizes(self.dataset.indices)
        self.record_bucket = assign_buckets(sizes, self.bucket_sizes)
        self.dataset.fit_to = [self.bucket_sizes[b] for b in self.record_bucket]

    def collate(self, batch: list[Record | CachedRecord | None]) -> dict:
        records = [r for r in batch if r is not None]  # a corrupt image was skipped and counted
        out = {
            "prompts": [r.prompt for r in records],
            "concepts": [r.concept for r in records],
            "groups": torch.tensor([self.target.group_of(r.attributes) for r in records]),
            "random_flip": self.random_flip,
        }
        if records and isinstance(records[0], CachedRecord):
            out["latent_mean"] = torch.stack([r.mean for r in records])
            out["latent_std"] = torch.stack([r.std for r in records])
        elif self.buckets is not None:
            out["pixels"] = torch.stack([to_pixels(r.image, r.image.size) for r in records])  # one bucket
        else:
            out["pixels"] = torch.stack([to_pixels(r.image, self.image_size) for r in records])
        return out

    # ----------------------------------------------------------------- latent cache
    def preprocessing(self) -> dict:
        """What shapes the pixels a model sees (part of the latent cache key)."""
        return {
            "image_size": self.image_size,
            "resize": "bicubic",
            "crop": "none",
            "variants": ["none", "hflip"] if self.random_flip else ["none"],
        }

    def use_latent_cache(
        self, model: str, encode: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    ) -> LatentEntry:
        """Swap the training records' images for cached VAE latents, encoding them first where the cache
        has no entry for this model, preprocessing and data (called by the training module's setup).

        Args:
            model: Fingerprint of the VAE.
            encode: Pixels in [-1, 1] to the VAE posterior's ``(mean, std)``.
        """
        if self.latents is None:
            raise SchemaError("data.latents is not set")
        if self.buckets is not None:
            raise SchemaError(
                "data.latents and data.buckets together are not supported (the cache holds one latent size); "
                "leave one unset"
            )
        if self.source.is_shards() or not isinstance(self.dataset, _Subset):
            raise SchemaError(
                "data.latents caches a table source; with webdataset shards, encode the latents into the "
                "shards upstream or leave data.latents unset"
            )
        if self.latent_entry is not None:
            return self.latent_entry
        sub = self.dataset
        table = self.table.table
        data = {
            "source": {k: v for k, v in asdict(self.source).items() if k != "shuffle_buffer"},
            "fingerprint": getattr(table, "_fingerprint", None),
            "records": len(table),
            "concepts": sorted(self.concepts) if self.concepts is not None else None,
        }

        def pixels(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
            recs = [sub[i] for i in range(start, stop)]
            blank = torch.zeros(3, self.image_size, self.image_size)
            x = torch.stack([to_pixels(r.image, self.image_size) if r is not None else blank for r in recs])
            return x, torch.tensor([r is not None for r in recs])

        variants = [lambda x: x] + ([lambda x: x.flip(-1)] if self.random_flip else [])
        entry = load_or_build(
            self.latents,
            model=model,
            preprocessing=self.preprocessing(),
            data=data,
            count=len(sub),
            pixels=pixels,
            encode=encode,
            variants=variants,
        )
        prompt_col = table[self.source.columns.prompt]
        prompts = [str(prompt_col[i]) for i in sub.indices]
        attributes = [self.table.attributes(i) for i in sub.indices]
        self.dataset = _CachedSubset(entry, prompts, self.record_concepts, attributes)
        self.latent_entry = entry
        return entry

    def train_dataloader(self) -> DataLoader:
        if isinstance(self.dataset, StreamingRebalancedDataset):
            return ShardLoader(self.dataset, collate_fn=self.collate, num_workers=self.num_workers)
        sampler = WeightedEpochSampler(self.weights, num_samples=self.samples_per_epoch, seed=self.seed)
        if self.buckets is not None:
            return EpochLoader(
                self.dataset,
                batch_sampler=BucketBatchSampler(sampler, self.record_bucket, self.batch_size),
                collate_fn=self.collate,
                num_workers=self.num_workers,
                persistent_workers=self.num_workers > 0,
            )
        return EpochLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=self.collate,
            num_workers=self.num_workers,
            drop_last=True,
            persistent_workers=self.num_workers > 0,
        )

    def expected_mix(self) -> dict[str, list[float]]:
        """Per concept, the group mix the sampler draws in expectation (for logs and tests)."""
        out: dict[str, list[float]] = {}
        w = self.weights.numpy()
        for c in sorted(set(self.record_concepts)):
            idx = [i for i, rc in enumerate(self.record_concepts) if rc == c]
            mix = np.zeros(len(self.target.groups))
            for i in idx:
                if self.record_groups[i] >= 0:
                    mix[self.record_groups[i]] += w[i]
            out[c] = (mix / max(mix.sum(), 1e-12)).tolist()
        return out
