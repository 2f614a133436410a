"""Data sources behind one interface: ``datasets`` tables and webdataset shards, both yielding Records.

A table (saved with ``save_to_disk``, parquet, an imagefolder with ``metadata.jsonl``, or a hub id)
is random-access; shards stream and are split across DDP ranks and DataLoader workers. Either way a
corrupt image or shard member is skipped, counted and reported (a warning and ``.skipped``), never
a crash mid-epoch.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from ._schema import AttributeSpec, Record, SchemaError, validate_record

log = logging.getLogger(__name__)

MAX_SKIPPED_SHARE = 0.01
"""Default ceiling on the share of unreadable records a source may have before a job stops."""


class SkipCounter:
    """Counts a source's records read and skipped, per record, and stops the job with an error naming
    the source when the skipped share passes ``max_share`` (checked once ``min_records`` records were
    seen, and at the end of a pass), or when nothing at all could be read.

    The first ``max_warnings`` skips are logged one by one; the next one logs a single line saying the
    rest are only counted, and the end of a pass logs the total (the count is always in ``skipped``).

    Args:
        source: What the records come from (a table path, shards), named in the error.
        max_share: The ceiling (``None``: no ceiling; every unreadable record is still counted).
        min_records: Records seen before the ceiling is checked mid-pass.
        max_warnings: Skips logged one by one (in this process).
    """

    def __init__(
        self,
        source: str,
        max_share: float | None = MAX_SKIPPED_SHARE,
        min_records: int = 100,
        max_warnings: int = 3,
    ) -> None:
        self.source, self.max_share, self.min_records = source, max_share, min_records
        self.max_warnings = max_warnings
        self.seen = self.skipped = 0
        self.warned = 0  # skips logged one by one
        self.first: str | None = None

    def read(self, n: int = 1) -> None:
        self.seen += n

    def skip(self, what: str, exc: BaseException | str, n: int = 1) -> None:
        self.seen += n
        self.skipped += n
        self.first = self.first or f"{what}: {exc}"
        if self.warned < self.max_warnings:
            self.warned += 1
            log.warning(
                "skipping %s (%s); %d of %d skipped so far in %s",
                what, exc, self.skipped, self.seen, self.source,
            )  # fmt: skip
        elif self.warned == self.max_warnings:
            self.warned += 1
            log.warning(
                "skipping more unreadable records in %s (%d of %d so far), counted from here on without a "
                "warning each",
                self.source, self.skipped, self.seen,
            )  # fmt: skip
        self.check()

    def check(self, final: bool = False) -> None:
        if final and self.seen and self.skipped == self.seen:
            raise SchemaError(
                f"{self.source}: none of its {self.seen} records could be read (first: {self.first})"
            )
        checked = self.max_share is not None and self.seen >= (1 if final else self.min_records)
        if checked and self.skipped > self.max_share * self.seen:
            raise SchemaError(
                f"{self.source}: {self.skipped} of {self.seen} records could not be read "
                f"({self.skipped / self.seen:.1%}), more than the ceiling of {self.max_share:.1%} "
                f"(data.source.max_skipped_share); first: {self.first}"
            )
        if final and self.warned > self.max_warnings:  # the total, past those logged one by one
            log.warning("skipped %d of %d records in %s in all", self.skipped, self.seen, self.source)


def check_shard(path: str) -> None:
    """A shard that is missing or not a tar archive is an error naming it (not a skipped member)."""
    import tarfile

    if "://" in path or path.startswith("pipe:"):
        return  # remote: read as it streams
    if not os.path.isfile(path):
        raise SchemaError(f"shard {path!r} does not exist")
    try:
        with tarfile.open(path, "r") as tar:
            tar.next()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise SchemaError(f"shard {path!r} is not a readable tar archive: {exc}") from exc


@dataclass
class ColumnMap:
    """Which column of a table holds each field of the record.

    Attributes:
        image: Column with the image (a ``datasets.Image`` feature, bytes, or a file path).
        prompt: Column with the caption.
        concept: Column with the concept.
        attributes: Attribute name to column; an attribute not named here is read from the column
            of the same name.
    """

    image: str = "image"
    prompt: str = "prompt"
    concept: str = "concept"
    attributes: dict[str, str] = field(default_factory=dict)

    def attribute_column(self, name: str) -> str:
        return self.attributes.get(name, name)


def decode_image(value: Any) -> Image.Image:
    """Decode an image cell (PIL image, ``{"bytes", "path"}`` dict, raw bytes or a path) to RGB."""
    if isinstance(value, Image.Image):
        img = value
    else:
        if isinstance(value, dict):
            data, path = value.get("bytes"), value.get("path")
        elif isinstance(value, (bytes, bytearray)):
            data, path = bytes(value), None
        else:
            data, path = None, value
        img = Image.open(io.BytesIO(data)) if data is not None else Image.open(path)
        img.load()  # force the decode here, where a corrupt file is caught
    return img.convert("RGB")


def load_table(
    path: str,
    *,
    format: Literal["auto", "disk", "parquet", "imagefolder", "hub"] = "auto",
    split: str = "train",
):
    """Load a ``datasets.Dataset`` from disk, parquet, an imagefolder or the hub.

    Args:
        path: A folder written by ``save_to_disk``, a parquet file, folder or glob, an imagefolder
            with ``metadata.jsonl``/``metadata.csv``, or a hub id (needs a network).
        format: How to read ``path``; ``"auto"`` decides from what is there.
        split: Which split to take where the source holds several.
    """
    import datasets

    p = Path(path)
    if format == "auto":
        if p.is_dir() and ((p / "state.json").exists() or (p / "dataset_dict.json").exists()):
            format = "disk"
        elif str(path).endswith(".parquet") or (p.is_dir() and any(p.glob("*.parquet"))):
            format = "parquet"
        elif p.is_dir() and any(any(p.glob(g)) for g in ("metadata.jsonl", "metadata.csv", "*/metadata.*")):
            format = "imagefolder"  # split subfolders (train/, test/) each with their own metadata
        elif p.exists():
            raise SchemaError(
                f"cannot tell how to read {path!r}: expected a save_to_disk folder, parquet, or an "
                "imagefolder with metadata.jsonl"
            )
        else:
            format = "hub"
    if format == "disk":
        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise SchemaError(f"split {split!r} not in {path!r}; splits: {list(ds)}")
            ds = ds[split]
        return ds
    if format == "parquet":
        files = sorted(glob.glob(str(p / "*.parquet"))) if p.is_dir() else sorted(glob.glob(path))
        if not files:
            raise SchemaError(f"no parquet files at {path!r}")
        return datasets.load_dataset("parquet", data_files=files, split="train")
    if format == "imagefolder":
        return datasets.load_dataset("imagefolder", data_dir=str(p), split=split)
    return datasets.load_dataset(path, split=split)


class TableDataset(Dataset):
    """A map-style dataset of Records read from a ``datasets`` table.

    Args:
        table: The table (see :func:`load_table`), or a path given to it.
        spec: The attributes and their declared classes.
        columns: Which column holds each field.
        format: Passed to :func:`load_table` when ``table`` is a path.
        split: Passed to :func:`load_table` when ``table`` is a path.
        max_skipped_share: Ceiling on the share of unreadable images (see :class:`SkipCounter`).

    Raises:
        SchemaError: a mapped column is missing, a label is not a declared class, or more images
            than the ceiling cannot be read.
    """

    def __init__(
        self,
        table: Any,
        spec: AttributeSpec,
        columns: ColumnMap | None = None,
        *,
        format: Literal["auto", "disk", "parquet", "imagefolder", "hub"] = "auto",
        split: str = "train",
        max_skipped_share: float | None = MAX_SKIPPED_SHARE,
    ) -> None:
        import datasets

        source = f"table {str(table)!r}" if isinstance(table, (str, os.PathLike)) else "the table"
        if isinstance(table, (str, os.PathLike)):
            table = load_table(str(table), format=format, split=split)
        self.spec = spec
        self.columns = columns or ColumnMap()
        needed = {
            "image": self.columns.image,
            "prompt": self.columns.prompt,
            "concept": self.columns.concept,
        }
        needed.update({f"attribute {a!r}": self.columns.attribute_column(a) for a in spec.names})
        for role, col in needed.items():
            if col not in table.column_names:
                raise SchemaError(
                    f"missing {role} column {col!r}; the table has columns {table.column_names}"
                )
        # Decode images ourselves so a corrupt one is caught per record, not per batch.
        if isinstance(table.features.get(self.columns.image), datasets.Image):
            table = table.cast_column(self.columns.image, datasets.Image(decode=False))
        self.table = table
        # Validate every label up front (cheap: text columns only) so a bad class fails at load.
        self.concepts: list[str] = [str(c) for c in table[self.columns.concept]]
        self.labels: dict[str, list[str | None]] = {}
        for a in spec.names:
            col = table[self.columns.attribute_column(a)]
            self.labels[a] = [spec.check_label(a, v) for v in col]
        self.counter = SkipCounter(source, max_skipped_share)

    @property
    def skipped(self) -> int:
        """Records whose image could not be read (in this process)."""
        return self.counter.skipped

    def __len__(self) -> int:
        return len(self.table)

    def attributes(self, i: int) -> dict[str, str | None]:
        return {a: self.labels[a][i] for a in self.spec.names}

    def image_sizes(self, indices: Sequence[int], *, chunk: int = 1024) -> list[tuple[int, int] | None]:
        """Each record's image ``(width, height)`` from its header (no decode; the image column read
        ``chunk`` rows at a time); ``None`` where it cannot be read (the record is skipped and counted
        when it is drawn)."""
        col = self.table.select_columns([self.columns.image])
        out: list[tuple[int, int] | None] = []
        indices = [int(i) for i in indices]
        for start in range(0, len(indices), chunk):
            values = col.select(indices[start : start + chunk])[self.columns.image]
            out += [self._header_size(v) for v in values]
        return out

    @staticmethod
    def _header_size(value) -> tuple[int, int] | None:
        try:
            if isinstance(value, Image.Image):
                return value.size
            data, path = (value.get("bytes"), value.get("path")) if isinstance(value, dict) else (None, value)
            if isinstance(value, (bytes, bytearray)):
                data = bytes(value)
            with Image.open(io.BytesIO(data)) if data is not None else Image.open(path) as im:
                return im.size
        except Exception:  # noqa: BLE001 - unreadable here is unreadable at draw time too
            return None

    def __getitem__(self, i: int) -> Record | None:
        row = self.table[int(i)]
        try:
            image = decode_image(row[self.columns.image])
        except Exception as exc:  # noqa: BLE001 - any decode failure means a corrupt image
            self.counter.skip(f"record {i}: corrupt image", exc)
            return None
        self.counter.read()
        return validate_record(
            Record(
                image=image,
                prompt=str(row[self.columns.prompt]),
                concept=self.concepts[int(i)],
                attributes=self.attributes(int(i)),
            ),
            self.spec,
        )


INDEX_SUFFIX = ".index.json"


def expand_shards(urls: str | Sequence[str]) -> list[str]:
    """Expand a brace pattern (``shard-{000..003}.tar``), a glob, or a list of them (label-index
    sidecars, ``*.index.json``, are left out of a glob's hits)."""
    import braceexpand

    out: list[str] = []
    for u in [urls] if isinstance(urls, str) else urls:
        for e in braceexpand.braceexpand(str(u)):
            if any(ch in e for ch in "*?["):
                hits = [h for h in sorted(glob.glob(e)) if not h.endswith(INDEX_SUFFIX)]
            else:
                hits = [e]
            out.extend(hits)
    if not out:
        raise SchemaError(f"no shards match {urls!r}")
    for u in out:
        if "://" not in u and not u.startswith("pipe:") and not os.path.isfile(u):
            raise SchemaError(f"shard {u!r} does not exist")
    return out


def record_from_sample(sample: dict[str, Any], spec: AttributeSpec) -> Record:
    """Turn a webdataset sample (``png``/``jpg`` + ``json``) into a validated Record."""
    key = sample.get("__key__")
    image_bytes = next((sample[k] for k in ("png", "jpg", "jpeg", "webp") if k in sample), None)
    if image_bytes is None:
        raise SchemaError(f"shard member {key!r} has no png/jpg image")
    if "json" not in sample:
        raise SchemaError(f"shard member {key!r} has no json metadata")
    meta = json.loads(sample["json"])
    for f in ("prompt", "concept"):
        if f not in meta:
            raise SchemaError(f"shard member {key!r}: json has no {f!r} field")
    attrs = meta.get("attributes", {})
    return validate_record(
        Record(
            image=decode_image(image_bytes),
            prompt=str(meta["prompt"]),
            concept=str(meta["concept"]),
            attributes={a: spec.check_label(a, attrs.get(a)) for a in spec.names},
        ),
        spec,
    )


def rank_info() -> tuple[int, int]:
    """(rank, world size) from torch.distributed when initialised, else from the environment."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class ShardDataset(IterableDataset):
    """Records streamed from webdataset tar shards, split across DDP ranks and DataLoader workers.

    Shards are dealt round-robin: rank ``r`` of ``W`` takes shards ``r, r+W, ...`` and its worker
    ``w`` of ``N`` takes every ``N``-th of those, so each record is read exactly once per epoch
    across the job. Members that fail to read or decode are skipped and counted in ``skipped``
    (per process) and logged.

    Args:
        urls: Shard paths: a list, a glob or a brace pattern.
        spec: The attributes and their declared classes.
        rank: This process's rank; default from torch.distributed or ``RANK``.
        world_size: Number of ranks; default from torch.distributed or ``WORLD_SIZE``.
        max_skipped_share: Ceiling on the share of unreadable records (see :class:`SkipCounter`).
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        spec: AttributeSpec,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        max_skipped_share: float | None = MAX_SKIPPED_SHARE,
    ) -> None:
        self.urls = expand_shards(urls)
        self.spec = spec
        self._rank, self._world = rank, world_size
        self.counter = SkipCounter(
            f"shards {self.urls[0]!r}" + (f" (+{len(self.urls) - 1})" if len(self.urls) > 1 else ""),
            max_skipped_share,
        )

    @property
    def skipped(self) -> int:
        """Records that could not be read (in this process), counted per record."""
        return self.counter.skipped

    def shards_for(self, rank: int, world_size: int, worker: int, num_workers: int) -> list[str]:
        """The shards one worker of one rank reads."""
        slots = world_size * num_workers
        if len(self.urls) < slots:
            raise SchemaError(
                f"{len(self.urls)} shards cannot feed {world_size} ranks x {num_workers} workers: "
                "write at least one shard per rank and worker"
            )
        return self.urls[rank::world_size][worker::num_workers]

    def _skip(self, exc: Exception) -> bool:
        # a read error of webdataset's; the records it cost are counted per shard below
        log.warning("shard read error (%s)", exc)
        return True

    def __iter__(self) -> Iterator[Record]:
        import webdataset as wds

        from ._streaming import index_path

        rank, world = rank_info()
        rank = self._rank if self._rank is not None else rank
        world = self._world if self._world is not None else world
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        shards = self.shards_for(rank, world, worker, num_workers)
        for u in shards:
            check_shard(u)
        for u in shards:
            delivered = 0
            for sample in wds.tarfile_to_samples(handler=self._skip)(iter([{"url": u}])):
                delivered += 1
                try:
                    record = record_from_sample(sample, self.spec)
                except SchemaError as exc:
                    # A label outside the declared classes is a data error, not a corrupt member.
                    if "not declared" in str(exc):
                        raise
                    self.counter.skip(f"{u} member {sample.get('__key__')}", exc)
                    continue
                except Exception as exc:  # noqa: BLE001 - undecodable image or json
                    self.counter.skip(f"{u} member {sample.get('__key__')}", exc)
                    continue
                self.counter.read()
                yield record
            # Records a damaged shard did not deliver (cut short mid-member): counted one by one, from
            # its label index when there is one.
            try:  # the sidecar as written with the shard, even if the shard has changed since
                expected = len(json.loads(Path(index_path(u)).read_text())["members"])
            except Exception:  # noqa: BLE001 - no usable index: what was delivered is all we know
                expected = delivered
            if expected > delivered:
                self.counter.skip(
                    f"{u}: {expected - delivered} indexed records",
                    "not found in the shard",
                    n=expected - delivered,
                )
        self.counter.check(final=True)


def write_shards(
    records: Sequence[Record] | Iterator[Record],
    out_dir: str | os.PathLike,
    *,
    per_shard: int = 1000,
    prefix: str = "shard",
) -> list[str]:
    """Write records as webdataset tar shards (``KEY.png`` + ``KEY.json``) and, beside each, its label
    index (``<shard>.index.json``: key, concept and labels of every member, read by the streaming
    sampler instead of a pass over the shard); returns the shard paths."""
    import webdataset as wds

    from ._streaming import write_index

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pattern = str(out / f"{prefix}-%06d.tar")
    index: list[list[dict]] = []
    with wds.ShardWriter(pattern, maxcount=per_shard, verbose=0) as sink:
        for i, r in enumerate(records):
            buf = io.BytesIO()
            r.image.save(buf, format="PNG")
            meta = {"prompt": r.prompt, "concept": r.concept, "attributes": r.attributes}
            sink.write({"__key__": f"{i:08d}", "png": buf.getvalue(), "json": json.dumps(meta)})
            if i % per_shard == 0:
                index.append([])
            index[-1].append({"key": f"{i:08d}", "concept": r.concept, "attributes": r.attributes})
    paths = [pattern % j for j in range(len(index))]
    for path, members in zip(paths, index):
        write_index(path, members)
    return paths


def collate_records(batch: list[Record | None]) -> list[Record]:
    """A DataLoader ``collate_fn`` that drops the ``None`` left by a skipped corrupt record.

    Raises:
        SchemaError: when every record of the batch was unreadable (nothing trains on zero records).
    """
    out = [r for r in batch if r is not None]
    if batch and not out:
        raise SchemaError(f"all {len(batch)} records of a batch were unreadable: the data source is damaged")
    return out
