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
runs (or DDP ranks) build an entry once and the others wait for it. Entries are written atomically.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
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
    """
    from safetensors.torch import load_file, save_file

    key = cache_key(model, preprocessing, data)
    root = config.root()
    entry = root / key
    built = False
    with _locked(root / f".{key}.lock"):
        if not (entry / META_FILE).exists():
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
            built = True
    meta = json.loads((entry / META_FILE).read_text())
    tensors = load_file(str(entry / LATENTS_FILE))
    if tensors["mean"].shape[0] != count:
        raise RuntimeError(f"latent cache {entry} holds {tensors['mean'].shape[0]} records, expected {count}")
    return LatentEntry(entry, tensors["mean"], tensors["std"], tensors["valid"].bool(), meta, built)
