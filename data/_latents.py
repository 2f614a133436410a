"""Latent cache: each training image encoded once by the VAE, reused by every run and sweep arm.

An entry holds, per record, the VAE posterior's mean and standard deviation for every preprocessing
variant the run can draw (the image resized to ``image_size``, and its horizontal flip when
``random_flip`` is on; no crop). Training draws ``mean + std * noise`` from the step's generator, which
is exactly what encoding the image again would draw, so a run from the cache equals a run that encodes
every step, without the VAE encoder or the image decode.

Entries live in ``<dir>/<key>/`` with ``key`` a hash of the model (the VAE's config and weights),
the preprocessing and the data (source, fingerprint, concepts): change any of them and a new entry is
built; the old one is left for runs that still use it. The folder is outside any run folder, so every
arm of a sweep over the same model and data reads one entry. Building takes a file lock: concurrent
runs (or DDP ranks) build an entry once and the others wait for it. Entries are written atomically
(into a temporary folder, then renamed into place).

An entry is checked when it is loaded: a folder without ``meta.json`` (left by a build killed before
this version wrote atomically, or by a copy cut short), a ``latents.safetensors`` that cannot be read
(truncated) or whose shape disagrees with ``meta.json``, or one holding non-finite values (corrupted
in place) is removed and built again, with a warning naming the folder and what was wrong, so a run
never trains on a damaged entry.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

LATENTS_FILE = "latents.safetensors"
META_FILE = "meta.json"
_FINITE_CHUNK = 1024  # records per finiteness check (bounds the check's temporary memory)

log = logging.getLogger(__name__)


def default_cache_dir() -> str:
    """``$FAIRTUNE_CACHE/latents``, else ``~/.cache/fairtune/latents``."""
    root = os.environ.get("FAIRTUNE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fairtune")
    return os.path.join(root, "latents")


@dataclass
class LatentCacheConfig:
    """Train from VAE latents encoded once (models with a VAE: Stable Diffusion, SDXL).

    Attributes:
        dir: Folder holding cache entries (shared by runs and sweep arms); ``None``:
            ``$FAIRTUNE_CACHE/latents`` or ``~/.cache/fairtune/latents``.
        dtype: Storage precision of the mean and std (``float16`` halves the disk and memory).
        batch_size: Images per VAE call while building an entry.
    """

    dir: str | None = None
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    batch_size: int = 32

    def root(self) -> Path:
        return Path(self.dir or default_cache_dir()).expanduser()


def cache_key(model: str, preprocessing: dict, data: dict) -> str:
    """The entry's name: a hash of the model fingerprint, the preprocessing and the data."""
    blob = json.dumps({"model": model, "preprocessing": preprocessing, "data": data}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@dataclass
class LatentEntry:
    """A loaded cache entry.

    Attributes:
        path: The entry's folder.
        mean: Posterior means, ``(N, V, C, h, w)`` for N records and V preprocessing variants.
        std: Posterior standard deviations, same shape.
        valid: ``(N,)``: False where the image could not be decoded (the record is skipped in training).
        meta: What the entry was built from (``meta.json``).
        built: True when this call encoded it, False when it was reused.
    """

    path: Path
    mean: torch.Tensor
    std: torch.Tensor
    valid: torch.Tensor
    meta: dict
    built: bool


def load_or_build(
    config: LatentCacheConfig,
    *,
    model: str,
    preprocessing: dict,
    data: dict,
    count: int,
    pixels: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]],
    encode: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    variants: list[Callable[[torch.Tensor], torch.Tensor]],
) -> LatentEntry:
    """Load the entry for (model, preprocessing, data), encoding it first if there is none.

    Args:
        config: Where entries live and how they are stored.
        model: Fingerprint of the encoder (changes when its config or weights change).
        preprocessing: Everything that shapes the encoded pixels (recorded in ``meta.json``).
        data: What identifies the records and their order (recorded in ``meta.json``).
        count: Number of records.
        pixels: ``pixels(start, stop)``: the preprocessed pixels of records ``start:stop``, ``(B, 3, H, W)``,
            and a ``(B,)`` bool mask of those that decoded (the others' pixels are placeholders).
        encode: Pixels to the posterior's ``(mean, std)``.
        variants: Pixel transforms, one per stored variant (e.g. identity, horizontal flip).

    An entry that is partial (no ``meta.json``), unreadable (a truncated file) or damaged (non-finite
    values, a shape other than ``meta.json`` records) is removed and encoded again, with a warning.

    Raises:
        RuntimeError: The entry holds another number of records than ``count``, or the encoder itself
            produced non-finite latents.
    """
    key = cache_key(model, preprocessing, data)
    root = config.root()
    entry = root / key
    built = False
    # Fast path, without the lock: a sound entry is read by every run and rank at once.
    loaded = _read_entry(entry) if (entry / META_FILE).exists() else "missing"
    if isinstance(loaded, str):
        with _locked(root / f".{key}.lock"):
            loaded = _read_entry(entry) if entry.exists() else "missing"  # another process built it?
            if isinstance(loaded, str):
                if loaded != "missing":
                    log.warning("latent cache %s: %s; removing it and encoding it again", entry, loaded)
                    _remove(entry, root, key)
                _remove_stale_temporaries(root, key)
                _build(config, entry, root, key, model, preprocessing, data, count, pixels, encode, variants)
                built = True
                loaded = _read_entry(entry)
                if isinstance(loaded, str):
                    raise RuntimeError(f"latent cache {entry}: {loaded} right after it was encoded")
    meta, tensors = loaded
    if tensors["mean"].shape[0] != count:
        raise RuntimeError(f"latent cache {entry} holds {tensors['mean'].shape[0]} records, expected {count}")
    return LatentEntry(entry, tensors["mean"], tensors["std"], tensors["valid"].bool(), meta, built)


def _read_entry(entry: Path) -> tuple[dict, dict[str, torch.Tensor]] | str:
    """An entry's ``meta.json`` and tensors, or (a string) why the entry cannot be used.

    The tensors are checked for finiteness in chunks (one pass over them; a VAE never encodes NaN or
    inf, so any is damage on disk) and against the shape ``meta.json`` records.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not (entry / META_FILE).exists():
        return f"no {META_FILE} (a partial entry, left by a build that did not finish)"
    try:
        meta = json.loads((entry / META_FILE).read_text())
    except (OSError, ValueError) as exc:
        return f"{META_FILE} cannot be read ({exc})"
    try:
        tensors = load_file(str(entry / LATENTS_FILE))
    except (SafetensorError, OSError, ValueError) as exc:
        return f"{LATENTS_FILE} cannot be read ({exc})"
    missing = {"mean", "std", "valid"} - set(tensors)
    if missing:
        return f"{LATENTS_FILE} lacks {sorted(missing)}"
    for name in ("mean", "std"):
        t = tensors[name]
        if list(t.shape) != list(meta.get("shape", t.shape)):
            return f"{LATENTS_FILE} holds {name} of shape {list(t.shape)}, {META_FILE} says {meta['shape']}"
        if not all(bool(torch.isfinite(c).all()) for c in t.split(_FINITE_CHUNK)):
            return f"{LATENTS_FILE} holds non-finite values (NaN or inf) in {name!r}"
    if tensors["valid"].shape[:1] != tensors["mean"].shape[:1]:
        return (
            f"{LATENTS_FILE} holds {len(tensors['valid'])} validity flags for {len(tensors['mean'])} records"
        )
    return meta, tensors


def _remove(entry: Path, root: Path, key: str) -> None:
    """Remove a damaged entry: renamed aside first (atomic), so no reader ever sees it half-deleted."""
    aside = root / f".{key}.damaged-{os.getpid()}-{time.time_ns()}"
    os.replace(entry, aside)
    shutil.rmtree(aside, ignore_errors=True)


def _remove_stale_temporaries(root: Path, key: str) -> None:
    """Folders ``.<key>.*`` left by a build that was killed (called under the entry's lock, so none is
    a build in progress)."""
    for p in root.glob(f".{key}.*"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def _build(config, entry, root, key, model, preprocessing, data, count, pixels, encode, variants) -> None:
    """Encode every record and write the entry atomically (a temporary folder renamed into place)."""
    from safetensors.torch import save_file

    t0 = time.time()
    means, stds, valid = [], [], []
    with torch.no_grad():
        for start in range(0, count, config.batch_size):
            x, ok = pixels(start, min(count, start + config.batch_size))
            m_v, s_v = zip(*(encode(v(x)) for v in variants))
            means.append(torch.stack(m_v, 1).cpu().float())
            stds.append(torch.stack(s_v, 1).cpu().float())
            valid.append(ok.to(torch.uint8))
    dtype = getattr(torch, config.dtype)
    tensors = {
        "mean": torch.cat(means).to(dtype).contiguous(),
        "std": torch.cat(stds).to(dtype).contiguous(),
        "valid": torch.cat(valid).contiguous(),
    }
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{key}."))
    try:
        save_file(tensors, str(tmp / LATENTS_FILE))
        meta = {
            "key": key,
            "model": model,
            "preprocessing": preprocessing,
            "data": data,
            "count": count,
            "shape": list(tensors["mean"].shape),
            "dtype": config.dtype,
            "encode_seconds": round(time.time() - t0, 3),
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        os.replace(tmp, entry)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
