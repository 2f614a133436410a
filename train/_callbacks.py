"""Callbacks: export of the trained weights (LoRA adapter or full model), rank zero only, atomically."""

from __future__ import annotations

import os
import time
from dataclasses import asdict, is_dataclass
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info

from fairtune.data import atomic_path
from fairtune.models import export_is_complete, remove_stale_temporaries, save_lora, write_model_card


class ExportWeights(L.Callback):
    """Writes what a user keeps: ``DIR/adapter/pytorch_lora_weights.safetensors`` (diffusers' format,
    ``pipe.load_lora_weights(DIR/adapter)``) for a LoRA run, or ``DIR/model/`` for a full fine-tune.

    Args:
        dirpath: Output folder; default the trainer's ``default_root_dir``.
        every_n_steps: Also export every n optimizer steps (``None``: only at the end).
    """

    def __init__(self, dirpath: str | None = None, every_n_steps: int | None = None) -> None:
        self.dirpath = dirpath
        self.every_n_steps = every_n_steps

    def _root(self, trainer: L.Trainer) -> Path:
        return Path(self.dirpath or trainer.default_root_dir)

    def setup(self, trainer: L.Trainer, module, stage: str) -> None:
        if trainer.is_global_zero:
            for p in remove_stale_temporaries(self._root(trainer)):
                rank_zero_info(f"removed {p}, left by an export that was killed half-way")
        if _shards_parameters(trainer.strategy):
            if module.lora is None:
                raise ValueError(
                    "a full fine-tune (model.lora: null) cannot be exported under a sharded strategy "
                    f"({type(trainer.strategy).__name__}) yet; train with DDP, or with a LoRA adapter"
                )
            if getattr(module, "_ema", None) is not None:
                raise ValueError(
                    f"model.ema is not supported under {type(trainer.strategy).__name__}: the EMA copy "
                    "would hold unsharded weights; set model.ema: null or train with DDP"
                )

    def export(self, trainer: L.Trainer, module) -> Path | None:
        """Write the export; called on every rank (a sharded strategy gathers the weights collectively),
        rank zero writes. Returns the folder written, ``None`` on the other ranks."""
        if _shards_parameters(trainer.strategy):
            return self._export_sharded(trainer, module)
        if not trainer.is_global_zero:
            return None
        root = self._root(trainer)
        with module.ema_weights():
            if module.lora is not None:
                out = save_lora(module.backbone.unet, root / "adapter").parent
                write_model_card(out, **model_card_info(trainer, module))
                return out
            module.backbone.save_pretrained(root / "model")
            return root / "model"

    def _export_sharded(self, trainer: L.Trainer, module) -> Path | None:
        # FSDP: gather the full state dict (every rank takes part; rank zero receives it), then write
        # the adapter from it. Names are cleaned of FSDP's wrapper prefixes.
        from peft.utils import get_peft_model_state_dict

        full = trainer.strategy.lightning_module_state_dict()
        if not trainer.is_global_zero:
            return None
        prefix = "backbone.unet."
        unet_sd = {}
        for key, value in full.items():
            key = key.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")
            if key.startswith(prefix) and "lora_" in key:
                unet_sd[key[len(prefix) :]] = value
        sd = get_peft_model_state_dict(module.backbone.unet, state_dict=unet_sd)
        sd = {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}
        out = save_lora(module.backbone.unet, self._root(trainer) / "adapter", state_dict=sd).parent
        write_model_card(out, **model_card_info(trainer, module))
        return out

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        stepped = (batch_idx + 1) % trainer.accumulate_grad_batches == 0
        if self.every_n_steps and stepped and step > 0 and step % self.every_n_steps == 0:
            self.export(trainer, module)

    def on_train_end(self, trainer, module) -> None:
        self.export(trainer, module)
        self._exported = True

    def on_fit_end(self, trainer, module) -> None:
        # A run killed during its export resumes at max_steps: Lightning then skips the training loop
        # (and on_train_end), so the export is redone here from the restored checkpoint weights.
        if getattr(self, "_exported", False):
            return
        missing = trainer.is_global_zero and not export_is_complete(self._root(trainer))
        if trainer.strategy.broadcast(missing):
            rank_zero_info(f"the export in {self._root(trainer)} is missing or incomplete: writing it again")
            self.export(trainer, module)


def _settings(cfg) -> dict | None:
    if cfg is None:
        return None
    d = asdict(cfg) if is_dataclass(cfg) else dict(vars(cfg))
    return {k: v for k, v in d.items() if k != "concepts"}  # a concept list can run to hundreds


def model_card_info(trainer: L.Trainer, module) -> dict:
    """What the adapter's model card records: base model, target, levers, steps, LoRA settings."""
    bb = module.backbone_config
    target = getattr(module, "target", None)
    dm = getattr(trainer, "datamodule", None)
    return {
        "base_model": str(bb.pretrained),
        "kind": bb.kind,
        "target": None
        if target is None
        else {
            "attributes": target.attributes,
            "groups": target.groups,
            "proportions": target.default,
        },  # fmt: skip
        "levers": {
            "sampler": _settings(getattr(dm, "rebalance", None)),
            "adversary": _settings(module.adversary),
            "fairness": _settings(module.fairness),
        },
        "steps": int(trainer.global_step),
        "lora": _settings(module.lora),
        "extra": {"learning rate": module.optim.lr, "schedule": module.optim.schedule, "seed": module.seed},
    }


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file and renamed into place, so a run killed mid-write
    leaves the previous checkpoint intact rather than a truncated one. Loads with ``weights_only``.
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())

    def load_checkpoint(self, path, map_location=None, weights_only: bool | None = None) -> dict:
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)


class EpochCheckpoint(ModelCheckpoint):
    """The run's checkpoint (``fairtune fit`` writes one file, ``checkpoints/last.ckpt``), saved when any
    of its triggers fires:

    - every ``every_n_train_steps`` optimizer steps (default 100, so a kill in a long epoch loses at most
      100 steps),
    - at the end of every ``every_n_epochs``-th epoch (default 1),
    - every ``train_time_interval`` (default none),

    at most once per step; ``0`` or ``None`` turns a trigger off. Lightning's ``ModelCheckpoint`` takes
    only one of the three; here they combine, so asking for steps does not give up the epoch ends.

    Epoch ends are saved on the epoch's *last batch* (``on_train_batch_end``), so a resumed run starts
    the next epoch cleanly. Saved in ``on_train_epoch_end`` (the stock behaviour), Lightning resumes by
    running one more batch of the finished epoch, drawn from the next epoch's sampler, and then starts
    that epoch again: the data order shifts and the resumed run no longer matches an uninterrupted one.
    A step checkpoint inside an epoch resumes as exactly: the training loaders are stateful (their place
    in the epoch is in the checkpoint). Steps are saved only after an optimizer step, never in the middle
    of a gradient accumulation.

    Args:
        every_n_train_steps: Save every n optimizer steps (``0``/``None``: never).
        every_n_epochs: Save at the end of every n-th epoch (``0``/``None``: never).
        train_time_interval: Save when this much time has passed since the last save (``None``: never).
        keep_last: Also keep the newest ``keep_last`` checkpoints as ``step-<N>.ckpt`` beside the one a
            run resumes from, older ones deleted (diffusers' ``--checkpoints_total_limit``); ``0``: only
            that one.
        **kwargs: The other arguments of Lightning's ``ModelCheckpoint`` (``dirpath``, ``filename``, ...).
    """

    def __init__(
        self,
        every_n_train_steps: int | None = 100,
        every_n_epochs: int | None = 1,
        train_time_interval: timedelta | None = None,
        keep_last: int = 0,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)  # Lightning's triggers are mutually exclusive: ours are set below
        if keep_last < 0:
            raise ValueError(f"checkpoint.keep_last={keep_last}: must be >= 0 (0: only the last one)")
        self.keep_last = keep_last
        for name, value in (("every_n_train_steps", every_n_train_steps), ("every_n_epochs", every_n_epochs)):
            if value is not None and value < 0:
                raise ValueError(f"checkpoint.{name}={value}: must be >= 0 (0 or null: never)")
        self._every_n_train_steps = every_n_train_steps or 0
        self._every_n_epochs = every_n_epochs or 0
        self._train_time_interval = train_time_interval

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._should_skip_saving_checkpoint(trainer):
            return
        stepped = (batch_idx + 1) % trainer.accumulate_grad_batches == 0
        last = batch_idx + 1 == trainer.num_training_batches
        epochs = self._every_n_epochs
        at_epoch = last and epochs >= 1 and (trainer.current_epoch + 1) % epochs == 0
        steps = self._every_n_train_steps
        at_step = stepped and steps >= 1 and trainer.global_step % steps == 0
        at_time = False
        if self._train_time_interval is not None and (stepped or last):
            elapsed = time.monotonic() - (self._last_time_checked or time.monotonic())
            # ranks' clocks differ: rank zero decides for all, so every rank saves (or none does)
            at_time = trainer.strategy.broadcast(elapsed >= self._train_time_interval.total_seconds())
        if at_epoch or at_step or at_time:
            self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            if self.keep_last:
                self._keep_step_checkpoint(trainer)
            self._last_time_checked = time.monotonic()

    def _keep_step_checkpoint(self, trainer) -> None:
        """Save ``step-<N>.ckpt`` and delete all but the newest ``keep_last`` of them."""
        folder = Path(self.dirpath)
        trainer.save_checkpoint(str(folder / f"step-{trainer.global_step:08d}.ckpt"), self.save_weights_only)
        # every rank lists and removes: the strategy deletes on rank zero, files or sharded folders alike
        for old in sorted(folder.glob("step-*.ckpt"))[: -self.keep_last]:
            trainer.strategy.remove_checkpoint(old)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        pass


def _shards_parameters(strategy) -> bool:
    """Whether the strategy splits parameters across ranks (FSDP, DeepSpeed), so an export needs a
    collective gather rather than rank zero reading its own copy."""
    names = {cls.__name__ for cls in type(strategy).__mro__}
    return bool(names & {"FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy"})


class GradientCheckpointing(L.Callback):
    """Recompute the UNet's activations in the backward pass instead of keeping them (diffusers'
    ``enable_gradient_checkpointing``): much less activation memory for a large UNet (Stable
    Diffusion at 512-1024 px), at the cost of about one more forward pass per step. The gradients are
    the same. Turned on before the strategy wraps the model, so it composes with DDP and FSDP.

    Args:
        enabled: Turn it on.
    """

    def __init__(self, enabled: bool = False) -> None:
        self.enabled = enabled

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        if not self.enabled:
            return
        unet = pl_module.backbone.unet
        if not getattr(unet, "_supports_gradient_checkpointing", False):
            raise ValueError(f"gradient_checkpointing.enabled: {type(unet).__name__} does not support it")
        unet.enable_gradient_checkpointing()
