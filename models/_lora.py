"""LoRA on the UNet with peft, and export in diffusers' format (``pytorch_lora_weights.safetensors``)."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
ATTENTION_AND_CONVS = ATTENTION + ["conv1", "conv2", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]


@dataclass
class LoraConfig:
    """The LoRA adapter on the UNet (peft, attached with diffusers' ``add_adapter``).

    Attributes:
        rank: Rank of each low-rank update.
        alpha: Scale numerator (update scaled by alpha / rank); default ``rank``.
        target_modules: UNet module names (suffixes) that get an adapter. The default covers
            attention, ResNet convolutions, projections and feed-forward layers; attention alone
            (``to_q``, ``to_k``, ``to_v``, ``to_out.0``) moved the colour mix less in trials.
        dropout: Dropout on the adapter's input.
        init_from: Start from an existing adapter (a folder with ``pytorch_lora_weights.safetensors``,
            e.g. a run's ``adapter/``) instead of a fresh one; rank, alpha and target modules must be
            the ones it was trained with.
    """

    rank: int = 8
    alpha: float | None = None
    target_modules: list[str] = field(default_factory=lambda: list(ATTENTION_AND_CONVS))
    dropout: float = 0.0
    init_from: str | None = None


def attach_lora(unet: UNet2DConditionModel, cfg: LoraConfig) -> int:
    """Freeze the UNet and add a trainable LoRA adapter; returns the number of trainable parameters."""
    from peft import LoraConfig as PeftLoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(
        PeftLoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.alpha if cfg.alpha is not None else cfg.rank,
            target_modules=list(cfg.target_modules),
            lora_dropout=cfg.dropout,
            init_lora_weights="gaussian",
        )
    )
    if cfg.init_from is not None:
        load_lora_into(unet, cfg.init_from)
    return sum(p.numel() for p in unet.parameters() if p.requires_grad)


def load_lora_into(unet: UNet2DConditionModel, adapter: str | os.PathLike) -> None:
    """Copy a saved adapter's weights into the UNet's (trainable) ``default`` adapter.

    Raises:
        FileNotFoundError: No ``pytorch_lora_weights.safetensors`` at ``adapter``.
        ValueError: The saved adapter does not fit the attached one (other rank, alpha or modules).
    """
    import json

    from peft.utils import set_peft_model_state_dict
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(adapter)
    file = path / LORA_WEIGHT_NAME if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"model.lora.init_from={str(adapter)!r}: no {LORA_WEIGHT_NAME} there")
    cfg = unet.peft_config["default"]
    with safe_open(str(file), "pt") as f:
        meta = json.loads((f.metadata() or {}).get("lora_adapter_metadata") or "{}")
    meta = {k.removeprefix("unet."): v for k, v in meta.items()}
    for key, want in (("r", cfg.r), ("lora_alpha", cfg.lora_alpha)):
        if key in meta and meta[key] != want:
            raise ValueError(
                f"model.lora.init_from={str(adapter)!r} was saved with {key}={meta[key]}, but model.lora has "
                f"{key}={want}: set model.lora to the saved adapter's settings"
            )
    state = {k.removeprefix("unet."): v for k, v in load_file(str(file)).items()}
    own = {n for n, p in unet.named_parameters() if p.requires_grad}
    try:
        result = set_peft_model_state_dict(unet, state, adapter_name="default")
    except RuntimeError as e:
        first = next((s.strip() for s in str(e).splitlines() if "mismatch" in s), str(e)[:300])
        raise ValueError(f"model.lora.init_from={str(adapter)!r} does not fit model.lora: {first}") from e
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    missing = [k for k in getattr(result, "missing_keys", []) or [] if k in own]
    if unexpected or missing:
        raise ValueError(
            f"model.lora.init_from={str(adapter)!r} does not fit model.lora.target_modules: "
            f"{len(unexpected)} saved weights have no place, {len(missing)} adapter weights are not saved "
            f"(e.g. {(unexpected or missing)[0]})"
        )


def lora_state_dict(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """The adapter's weights in the peft key layout that ``load_lora_weights`` reads.

    diffusers' ``convert_state_dict_to_diffusers`` renames attention keys to the old ``lora.down``
    form but leaves convolution and projection keys as ``lora_A``; the mixed dict then loads wrong.
    The peft layout (``...to_q.lora_A.weight``) loads as it is, for every target module.
    """
    from peft.utils import get_peft_model_state_dict

    sd = get_peft_model_state_dict(unet)
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}


def save_lora(unet: UNet2DConditionModel, out_dir: str | os.PathLike, state_dict: dict | None = None) -> Path:
    """Write ``out_dir/pytorch_lora_weights.safetensors`` atomically (temp file + rename).

    Args:
        unet: The UNet carrying the adapter (its peft config is stored as metadata so alpha survives).
        out_dir: Target folder.
        state_dict: Weights to write instead of the UNet's current ones (e.g. EMA weights).
    """
    from diffusers import StableDiffusionPipeline

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = state_dict if state_dict is not None else lora_state_dict(unet)
    meta = unet.peft_config["default"].to_dict()
    meta = {k: (sorted(v) if isinstance(v, set) else v) for k, v in meta.items()}
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".lora-"))
    try:
        StableDiffusionPipeline.save_lora_weights(
            tmp, unet_lora_layers=sd, safe_serialization=True, unet_lora_adapter_metadata=meta
        )
        os.replace(tmp / LORA_WEIGHT_NAME, out / LORA_WEIGHT_NAME)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out / LORA_WEIGHT_NAME


def export_is_complete(run_dir: str | os.PathLike) -> bool:
    """Whether a run folder holds a complete export: an ``adapter/`` whose safetensors file opens and
    holds LoRA weights, or a ``model/`` with a UNet config and weights. A file cut short by a kill
    fails to open and counts as missing."""
    from safetensors import safe_open

    root = Path(run_dir)
    adapter = root / "adapter" / LORA_WEIGHT_NAME
    if adapter.is_file():
        try:
            with safe_open(str(adapter), framework="pt") as f:
                return any("lora" in k for k in f.keys())
        except Exception:  # safetensors raises its own error types on a truncated file
            return False
    unet = root / "model" / "unet"
    return (unet / "config.json").is_file() and any(unet.glob("*.safetensors"))


def remove_stale_temporaries(run_dir: str | os.PathLike) -> list[Path]:
    """Remove what a write killed half-way leaves behind in a run folder's exports (``adapter/.lora-*``,
    ``.model.*`` folders, ``*.tmp`` files); returns what was removed."""
    root = Path(run_dir)
    stale = [*root.glob("adapter/.lora-*"), *root.glob(".model.*"), *root.glob("adapter/*.tmp")]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return stale


def load_adapter(backbone, adapter_dir: str | os.PathLike, *, fuse: bool = False, scale: float = 1.0):
    """Load a ``pytorch_lora_weights.safetensors`` into a Backbone's UNet through diffusers'
    ``load_lora_weights`` (the same path a user's pipeline takes); ``fuse`` merges it into the
    weights so inference costs what the base model costs. Returns the backbone.

    Args:
        backbone: The backbone whose UNet gets the adapter.
        adapter_dir: A folder holding ``pytorch_lora_weights.safetensors``.
        fuse: Merge the adapter into the UNet's weights (``pipe.fuse_lora(lora_scale=scale)``).
        scale: The adapter's weight, as a user's pipeline sets it: fused, ``fuse_lora(lora_scale=scale)``;
            unfused, ``set_adapters(name, adapter_weights=scale)``. 0 is the base model, 1 the adapter
            as trained, above 1 extrapolates. At 1 nothing is rescaled (the path taken before the weight
            existed).

    Raises:
        FileNotFoundError: No ``pytorch_lora_weights.safetensors`` in ``adapter_dir``.
        ValueError: ``scale`` is not a finite number.
    """
    import math

    path = Path(adapter_dir)
    if not (path / LORA_WEIGHT_NAME).exists():
        raise FileNotFoundError(f"no {LORA_WEIGHT_NAME} in {path}")
    if not math.isfinite(float(scale)):
        raise ValueError(f"adapter scale must be a finite number, got {scale!r}")
    pipe = backbone.pipeline()
    pipe.load_lora_weights(str(path))
    if fuse:
        pipe.fuse_lora(lora_scale=float(scale))
    elif scale != 1.0:
        pipe.set_adapters(pipe.get_active_adapters(), adapter_weights=[float(scale)])
    return backbone


def adapter_copy(backbone, adapter_dir: str | os.PathLike, *, fuse: bool = True, scale: float = 1.0):
    """A backbone sharing ``backbone``'s text encoder, VAE, scheduler and prompt cache around a copy of
    its UNet carrying the adapter (:func:`load_adapter`), so ``backbone`` itself is never changed."""
    import copy

    from ._backbones import Backbone

    bb = Backbone(
        backbone.config,
        copy.deepcopy(backbone.unet),
        backbone.text_encoder,
        backbone.tokenizer,
        backbone.noise_scheduler,
        backbone.vae,
    )
    bb._prompt_cache = backbone._prompt_cache
    return load_adapter(bb, adapter_dir, fuse=fuse, scale=scale)
