"""The rebalanced sampler in streaming form, over webdataset shards (DESIGN §9).

A label index (per shard: member key, concept, attribute labels) is read from the sidecar that
:func:`~fairtune.data.write_shards` writes beside each shard (``<shard>.index.json``), or built in one
pass over the shards' json members (no image is decoded) and written there when the folder is writable.
From it the table sampler's weights are computed over the whole data (:func:`rebalance_weights`, the same
function), so each (concept, group) bucket -- ``group = -1`` for a record without a label -- has the mass
the table sampler gives it.

Each DataLoader worker of each DDP rank (a *slot*) owns the shards ``urls[rank::W][worker::N]`` and
draws its share of the epoch: buckets by those masses, then a record of the bucket uniformly among the
slot's records of it, with replacement. The draw is a function of (seed, epoch, rank, worker) alone. The
slot then streams its shards once, in an order shuffled per epoch, keeps each member as many times as
it was drawn (members drawn zero times are passed over undecoded: acceptance sampling) and emits them
through a seeded shuffle buffer. So the drawn (concept, group) mix is the table sampler's, every rank
yields the same number of batches, and a run resumed mid-epoch skips exactly what it had consumed
(:class:`ShardLoader` keeps that count in the checkpoint).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, Sampler, get_worker_info

from ._io import atomic_write_json
from ._sampler import rebalance_weights
from ._schema import AttributeSpec, Record, SchemaError, Target
from ._sources import (
    INDEX_SUFFIX,
    MAX_SKIPPED_SHARE,
    SkipCounter,
    check_shard,
    expand_shards,
    rank_info,
    record_from_sample,
)

log = logging.getLogger(__name__)

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")


def index_path(shard: str) -> Path:
    """The label-index sidecar of ``shard``."""
    return Path(shard + INDEX_SUFFIX)


def _stamp(shard: str) -> dict[str, int]:
    st = os.stat(shard)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def write_index(shard: str, members: list[dict[str, Any]]) -> None:
    """Write ``shard``'s label index atomically (members: ``{"key", "concept", "attributes"}``)."""
    atomic_write_json(index_path(shard), {"shard": _stamp(shard), "members": members})


def scan_shard(shard: str) -> list[dict[str, Any]]:
    """One pass over a shard's json members (images are not read): its label index.

    A member without an image or with unreadable json is left out (it would be skipped in training);
    a truncated shard yields the members before the damage.
    """
    metas: dict[str, dict] = {}
    has_image: set[str] = set()
    order: list[str] = []
    try:
        with tarfile.open(shard, "r") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                name = m.name.rsplit("/", 1)[-1]
                key, _, ext = name.partition(".")
                if key not in metas and key not in has_image:
                    order.append(key)
                if ext.lower() in IMAGE_EXTS:
                    has_image.add(key)
                elif ext == "json":
                    try:
                        metas[key] = json.loads(tar.extractfile(m).read())
                    except (ValueError, UnicodeDecodeError) as exc:
                        log.warning("index: %s member %r has unreadable json (%s); left out", shard, key, exc)
    except (tarfile.TarError, OSError, EOFError) as exc:
        log.warning("index: %s is damaged (%s); indexing the members read before it", shard, exc)
    out = []
    for key in order:
        meta = metas.get(key)
        if meta is None or key not in has_image or "concept" not in meta:
            continue
        out.append({"key": key, "concept": str(meta["concept"]), "attributes": meta.get("attributes", {})})
    return out


def load_index(shard: str, *, write: bool = True) -> list[dict[str, Any]]:
    """``shard``'s label index: its sidecar when current (same size and mtime), else a scan (written
    back as the sidecar when ``write`` and the folder allows)."""
    path = index_path(shard)
    if path.exists():
        try:
            data = json.loads(path.read_text())
            if data.get("shard") == _stamp(shard):
                return data["members"]
        except (ValueError, KeyError):
            pass
        log.info("index: %s is stale or unreadable; rebuilding it", path)
    members = scan_shard(shard)
    if write:
        try:
            write_index(shard, members)
        except OSError as exc:
            log.info("index: cannot write %s (%s); it is rebuilt on every start", path, exc)
    return members


class _EpochSignal(Sampler):
    """Stands in for the index sampler of a :class:`ShardLoader`, so Lightning's ``set_epoch`` reaches it."""

    def __init__(self, loader: ShardLoader) -> None:
        self.loader = loader

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def __iter__(self) -> Iterator[None]:
        while True:
            yield None


class StreamingRebalancedDataset(IterableDataset):
    """Records streamed from webdataset shards in the rebalanced (or uniform) mix; see the module doc.

    Args:
        urls: Shard paths: a list, a glob or a brace pattern.
        spec: The attributes and their declared classes.
        target: The target mix over groups.
        rebalance_unknown: ``None`` draws uniformly (no lever); ``"keep"`` or ``"drop"`` rebalances, and
            says what a record without a label gets, as in :func:`rebalance_weights`.
        concepts: Keep only records of these concepts; ``None`` keeps all.
        batch_size: Batch size per rank (each worker yields whole batches).
        samples_per_epoch: Draws per epoch over all ranks (rounded up to whole batches per rank).
        seed: Seed of the draw.
        shuffle_buffer: Records held to shuffle the stream's order.
        write_index: Write a missing or stale sidecar index after scanning a shard.
        max_skipped_share: Ceiling on the share of unreadable records of a pass, counted per record
            (see :class:`~fairtune.data.SkipCounter`).

    Raises:
        SchemaError: a label is not a declared class, no record has a wanted concept, or a concept lacks
            a group with a positive target proportion.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        spec: AttributeSpec,
        target: Target,
        *,
        rebalance_unknown: str | None = "keep",
        concepts: Sequence[str] | None = None,
        batch_size: int = 64,
        samples_per_epoch: int = 3200,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        write_index: bool = True,
        max_skipped_share: float | None = MAX_SKIPPED_SHARE,
    ) -> None:
        self.urls = [u for u in expand_shards(urls) if not u.endswith(INDEX_SUFFIX)]
        for u in self.urls:  # a missing or garbage shard is an error naming it, before any training
            check_shard(u)
        self.max_skipped_share = max_skipped_share
        self.spec, self.target = spec, target
        self.batch_size, self.samples_per_epoch, self.seed = batch_size, samples_per_epoch, seed
        self.shuffle_buffer = max(1, shuffle_buffer)
        # the global index: (shard, key, concept, group) of every wanted record
        self.shard_of: list[int] = []
        self.keys: list[str] = []
        self.concepts: list[str] = []
        self.groups: list[int] = []
        for si, url in enumerate(self.urls):
            for m in load_index(url, write=write_index):
                if concepts is not None and m["concept"] not in concepts:
                    continue
                attrs = m.get("attributes") or {}
                try:
                    labels = {a: spec.check_label(a, attrs.get(a)) for a in spec.names}
                except SchemaError as exc:
                    raise SchemaError(f"{url} member {m['key']!r}: {exc}") from None
                self.shard_of.append(si)
                self.keys.append(m["key"])
                self.concepts.append(m["concept"])
                self.groups.append(target.group_of(labels))
        if not self.keys:
            raise SchemaError(f"no record with a wanted concept ({concepts}) in {len(self.urls)} shards")
        missing = set(concepts or []) - set(self.concepts)
        if missing:
            raise SchemaError(f"data.concepts names concepts with no record in the shards: {sorted(missing)}")
        if rebalance_unknown is None:
            weights = torch.ones(len(self.keys), dtype=torch.float64)
        else:
            weights = rebalance_weights(self.concepts, self.groups, target, unknown=rebalance_unknown)
        self.weights = weights.numpy()
        # bucket = (concept, group); its mass is the share of the table sampler's draw it gets
        self.bucket_names = sorted(set(zip(self.concepts, self.groups)))
        bucket_id = {b: i for i, b in enumerate(self.bucket_names)}
        self.bucket = np.array([bucket_id[b] for b in zip(self.concepts, self.groups)])
        self.bucket_mass = np.bincount(self.bucket, weights=self.weights, minlength=len(self.bucket_names))
        self.bucket_mass /= self.bucket_mass.sum()
        self.epoch = 0
        self.skip_batches = 0  # batches of this epoch already consumed (a resumed run)
        self.rank: int | None = None
        self.world_size: int | None = None
        self.skipped = 0

    # ----------------------------------------------------------------- sizes
    def _rank_world(self) -> tuple[int, int]:
        r, w = rank_info()
        return (r if self.rank is None else self.rank), (w if self.world_size is None else self.world_size)

    def batches_per_rank(self, world_size: int | None = None) -> int:
        world = self._rank_world()[1] if world_size is None else world_size
        return max(1, math.ceil(self.samples_per_epoch / (world * self.batch_size)))

    def __len__(self) -> int:
        """Records per rank per epoch."""
        return self.batches_per_rank() * self.batch_size

    def worker_batches(self, worker: int, num_workers: int, world_size: int | None = None) -> int:
        """Batches worker ``worker`` yields per epoch (DataLoader takes them round-robin)."""
        b = self.batches_per_rank(world_size)
        return b // num_workers + (worker < b % num_workers)

    def shards_for(self, rank: int, world_size: int, worker: int, num_workers: int) -> list[int]:
        """Indices (into ``urls``) of the shards one worker of one rank reads."""
        if len(self.urls) < world_size * num_workers:
            raise SchemaError(
                f"{len(self.urls)} shards cannot feed {world_size} ranks x {num_workers} workers: "
                "write at least one shard per rank and worker"
            )
        return list(range(len(self.urls)))[rank::world_size][worker::num_workers]

    # ----------------------------------------------------------------- the draw
    def plan(self, rank: int, world_size: int, worker: int, num_workers: int) -> tuple[list[int], dict]:
        """One slot's epoch: its shard order and how many times each of its records is drawn.

        Returns:
            (shard indices in read order, ``{(shard index, key): times drawn}``).
        """
        shards = self.shards_for(rank, world_size, worker, num_workers)
        rng = np.random.default_rng([self.seed, self.epoch, rank, worker, 7919])
        own = np.flatnonzero(np.isin(np.array(self.shard_of), shards))
        n = self.worker_batches(worker, num_workers, world_size) * self.batch_size
        if n == 0 or own.size == 0:
            return [], {}
        counts = np.bincount(self.bucket[own], minlength=len(self.bucket_names))
        mass = self.bucket_mass.copy()
        lost = mass[counts == 0].sum()
        if lost > 1e-12:
            log.warning(
                "rank %d worker %d has no record of buckets holding %.1f%% of the mix; its draw "
                "renormalises over the rest (write shards that mix concepts and groups)",
                rank,
                worker,
                100 * lost,
            )
        p = np.where(counts > 0, mass / np.maximum(counts, 1), 0.0)[self.bucket[own]]
        if p.sum() <= 0:
            return [], {}
        drawn = rng.choice(own, size=n, replace=True, p=p / p.sum())
        times: dict = {}
        for i in drawn.tolist():
            k = (self.shard_of[i], self.keys[i])
            times[k] = times.get(k, 0) + 1
        order = [shards[j] for j in rng.permutation(len(shards))]
        return order, times

    def drawn(self, rank: int = 0, world_size: int = 1, num_workers: int = 1) -> list[tuple[str, int]]:
        """(concept, group) of every record one rank draws this epoch, over all its workers (for tests
        and benchmarks: no shard is read)."""
        pos = {(s, k): i for i, (s, k) in enumerate(zip(self.shard_of, self.keys))}
        out = []
        for w in range(num_workers):
            for sk, t in self.plan(rank, world_size, w, num_workers)[1].items():
                i = pos[sk]
                out += [(self.concepts[i], self.groups[i])] * t
        return out

    # ----------------------------------------------------------------- the stream
    def _skip(self, exc: Exception) -> bool:
        # a read error of webdataset's; the records it cost are counted below, one by one
        log.warning("shard read error (%s)", exc)
        return True

    def __iter__(self) -> Iterator[Record | None]:
        import webdataset as wds

        rank, world = self._rank_world()
        info = get_worker_info()
        loader_worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        # The DataLoader takes batches from its workers round-robin, starting at worker 0: after a
        # resume at batch s, its worker j plays the part of worker (j + s) mod N of the uninterrupted
        # epoch, so the batches come in the same order.
        worker = (loader_worker + self.skip_batches) % num_workers
        order, times = self.plan(rank, world, worker, num_workers)
        n = sum(times.values())
        # batches of this worker among the first skip_batches
        mine = max(0, (self.skip_batches - worker + num_workers - 1) // num_workers)
        to_skip = min(n, mine * self.batch_size)
        rng = np.random.default_rng([self.seed, self.epoch, rank, worker, 104729])
        buffer: list[dict] = []
        emitted = 0
        counter = SkipCounter(
            f"shards {self.urls[0]!r}" + (f" (+{len(self.urls) - 1})" if len(self.urls) > 1 else ""),
            self.max_skipped_share,
        )
        self.counter = counter

        def emit(sample: dict | None) -> Record | None:
            if sample is None:
                return None
            what = f"{sample.get('__url__')} member {sample.get('__key__')}"
            try:
                record = record_from_sample(sample, self.spec)
            except SchemaError as exc:
                if "not declared" in str(exc):
                    raise
                counter.skip(what, exc)
                self.skipped = counter.skipped
                return None
            except Exception as exc:  # noqa: BLE001 - undecodable image or json
                counter.skip(what, exc)
                self.skipped = counter.skipped
                return None
            counter.read()
            return record

        def pop() -> dict:
            j = int(rng.integers(len(buffer)))
            buffer[j], buffer[-1] = buffer[-1], buffer[j]
            return buffer.pop()

        urls = [{"url": self.urls[s], "__shard__": s} for s in order]
        shard_ids = {self.urls[s]: s for s in order}
        stream = wds.tarfile_to_samples(handler=self._skip)(iter(urls))
        for sample in stream:
            k = (shard_ids.get(sample.get("__url__"), -1), sample.get("__key__"))
            t = times.pop(k, 0)
            buffer.extend([sample] * t)
            while len(buffer) >= self.shuffle_buffer:
                s = pop()
                emitted += 1
                if emitted > to_skip:
                    yield emit(s)
        while buffer:
            s = pop()
            emitted += 1
            if emitted > to_skip:
                yield emit(s)
        # members the index promised but the stream did not deliver (a damaged shard): keep the count
        # of batches equal on every rank with placeholders that collate drops, as a corrupt image is
        for _ in range(n - emitted):
            counter.skip("an indexed member", "not found in its shard (the shard is damaged)")
            self.skipped = counter.skipped
            emitted += 1
            if emitted > to_skip:
                yield None
        counter.check(final=True)


class ShardLoader(DataLoader):
    """A DataLoader over a :class:`StreamingRebalancedDataset` that knows its epoch and where it is in it.

    Lightning's ``set_epoch`` reaches it (through the index sampler), and it is *stateful*:
    ``state_dict()`` (``{"epoch", "batches"}``) goes into the checkpoint, and ``load_state_dict`` makes the
    next pass over that epoch skip the batches already consumed. Workers are started per epoch (not
    persistent), so each receives the epoch and the skip.
    """

    def __init__(self, dataset: StreamingRebalancedDataset, **kwargs) -> None:
        kwargs.pop("persistent_workers", None)
        super().__init__(dataset, batch_size=dataset.batch_size, drop_last=False, **kwargs)
        self.batch_sampler.sampler = _EpochSignal(self)
        self.epoch = 0
        self._yielded = 0
        self._resume: dict | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.dataset.batches_per_rank()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches": self._yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self._resume = {"epoch": int(state["epoch"]), "batches": int(state["batches"])}

    def __iter__(self):
        return self._batches()

    def _batches(self):
        # Resolved at the first batch, after Lightning's set_epoch and load_state_dict.
        ds: StreamingRebalancedDataset = self.dataset
        skip = 0
        if self._resume is not None and self._resume["epoch"] == self.epoch:
            skip = self._resume["batches"]
        self._resume = None
        ds.epoch, ds.skip_batches = self.epoch, skip
        ds.rank, ds.world_size = rank_info()
        self._yielded = skip
        if skip >= len(self):
            return
        for batch in super().__iter__():
            self._yielded += 1
            yield batch
