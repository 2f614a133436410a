"""Experiment tracking's callbacks: what a debiasing run needs watched, logged to the run's loggers
(``fairtune.train.TensorBoardLogger``, wandb, the CSV log): the learning rate, the batch's attribute
mix against the target, and a grid of samples every k steps; and a progress line on stderr for runs
without a progress bar.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from contextlib import nullcontext
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import LearningRateMonitor

from fairtune.data import atomic_path, image_grid


class LearningRateLog(LearningRateMonitor):
    """Lightning's LearningRateMonitor (one curve per optimizer parameter group: the LoRA and, with
    lever 2, the adversary head), quietly off when the run has no logger.

    Args:
        enabled: Log the learning rates.
        logging_interval: ``step`` or ``epoch``.
        log_momentum: Also log momentum (AdamW's beta1).
        log_weight_decay: Also log weight decay.
    """

    def __init__(
        self,
        enabled: bool = True,
        logging_interval: str | None = "step",
        log_momentum: bool = False,
        log_weight_decay: bool = False,
    ) -> None:
        super().__init__(logging_interval, log_momentum, log_weight_decay)
        self.enabled = enabled
        self._active = False

    def on_train_start(self, trainer, *args, **kwargs) -> None:
        self._active = self.enabled and bool(trainer.loggers)
        if self._active:
            super().on_train_start(trainer, *args, **kwargs)

    def on_train_batch_start(self, trainer, *args, **kwargs) -> None:
        if self._active:
            super().on_train_batch_start(trainer, *args, **kwargs)

    def on_train_epoch_start(self, trainer, *args, **kwargs) -> None:
        if self._active:
            super().on_train_epoch_start(trainer, *args, **kwargs)


class BatchMixMonitor(L.Callback):
    """Logs the attribute mix of each training batch beside the target mix for the same concepts.

    Counted over the whole step (all DDP ranks together: the counts are summed across ranks before
    logging), from the batch's target-group labels (``batch["groups"]``, -1 where unknown) and the data
    module's target:

    - ``mix/<group>``: the group's share among the batch's records with a known label;
    - ``mix/<group>_target``: the target's share of that group, averaged over the same records' concepts;
    - ``mix/gap``: the largest |share − target| over groups;
    - ``mix/unknown``: the share of records whose label is unknown.

    With the rebalanced sampler the shares hover around the target; without it they show the data's skew.

    Args:
        enabled: Log the mix.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled

    @staticmethod
    def _target(trainer, pl_module):
        dm = getattr(trainer, "datamodule", None)
        return getattr(dm, "target", None) or getattr(pl_module, "target", None)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.enabled or not isinstance(batch, Mapping) or "groups" not in batch:
            return
        target = self._target(trainer, pl_module)
        if target is None:
            return
        k = len(target.groups)
        # [count per group | target mass per group | unknown | records]
        counts = torch.zeros(2 * k + 2, dtype=torch.float64)
        for g, concept in zip(batch["groups"].tolist(), batch["concepts"]):
            if g < 0:
                counts[2 * k] += 1
            else:
                counts[g] += 1
                counts[k : 2 * k] += torch.tensor(target.proportions(concept), dtype=torch.float64)
        counts[2 * k + 1] = len(batch["concepts"])
        counts = trainer.strategy.reduce(counts.to(pl_module.device), reduce_op="sum").cpu()
        known = float(counts[:k].sum())
        metrics = {"mix/unknown": float(counts[2 * k] / max(float(counts[2 * k + 1]), 1.0))}
        if known > 0:
            share = counts[:k] / known
            tgt = counts[k : 2 * k] / known
            for i, name in enumerate(target.groups):
                metrics[f"mix/{name}"] = float(share[i])
                metrics[f"mix/{name}_target"] = float(tgt[i])
            metrics["mix/gap"] = float((share - tgt).abs().max())
        # Already summed over ranks: every rank logs the same values, no second reduction needed.
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, sync_dist=False)


def step_is_due(trainer, batch_idx: int, every_n_steps: int | None, last_step: int | None) -> bool:
    """Whether a callback that runs every ``every_n_steps`` optimizer steps is due after this batch
    (an optimizer step just happened, on a multiple of n, not already handled at this step)."""
    if not every_n_steps:
        return False
    stepped = (batch_idx + 1) % trainer.accumulate_grad_batches == 0
    step = trainer.global_step
    return stepped and step > 0 and step % every_n_steps == 0 and step != last_step


class SampleGrid(L.Callback):
    """Every k optimizer steps, samples a few prompts from fixed seeds (the weights that would be
    exported: EMA when on) and keeps the grid: ``DIR/samples/step_NNNNNN.png`` always, and in the logger
    where it takes images (wandb: ``samples``; TensorBoard: ``samples``). One row per prompt.

    Every rank samples (so sharded strategies work); rank zero writes and logs.

    Args:
        every_n_steps: Sample every n optimizer steps (and after the last); ``None``: never.
        prompts: The prompts; ``None``: ``template`` filled with the data module's concepts.
        template: Prompt for a concept, e.g. ``"a handwritten {concept}"`` (concept ``digit 3``).
        max_prompts: At most this many prompts (concepts taken in sorted order).
        n_per_prompt: Images per prompt (image i from seed ``seed + i``).
        steps: DDIM steps.
        guidance_scale: Classifier-free guidance scale.
        seed: First seed.
        upscale: Nearest-neighbour upscaling of the saved PNG (tiny images are hard to see).
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        prompts: list[str] | None = None,
        template: str = "{concept}",
        max_prompts: int = 8,
        n_per_prompt: int = 4,
        steps: int = 20,
        guidance_scale: float = 2.0,
        seed: int = 0,
        upscale: int = 1,
    ) -> None:
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"samples.every_n_steps must be >= 1 or null, got {every_n_steps}")
        if n_per_prompt < 1 or max_prompts < 1 or steps < 1 or upscale < 1:
            raise ValueError("samples.n_per_prompt, max_prompts, steps and upscale must be >= 1")
        self.every_n_steps = every_n_steps
        self.prompts = prompts
        self.template = template
        self.max_prompts = max_prompts
        self.n_per_prompt = n_per_prompt
        self.steps = steps
        self.guidance_scale = guidance_scale
        self.seed = seed
        self.upscale = upscale
        self._last_step: int | None = None

    def _prompts(self, trainer) -> list[str]:
        if self.prompts:
            return list(self.prompts)[: self.max_prompts]
        dm = getattr(trainer, "datamodule", None)
        concepts = sorted(set(getattr(dm, "record_concepts", None) or []))
        if not concepts:
            return [self.template.format(concept="")]
        return [self.template.format(concept=c) for c in concepts[: self.max_prompts]]

    def sample(self, trainer, pl_module) -> Path | None:
        """Sample the grid now (on every rank); rank zero writes and logs it. Returns the PNG's path."""
        step = trainer.global_step
        self._last_step = step
        prompts = self._prompts(trainer)
        all_prompts = [p for p in prompts for _ in range(self.n_per_prompt)]
        seeds = [self.seed + i for _ in prompts for i in range(self.n_per_prompt)]
        ema = getattr(pl_module, "ema_weights", None)
        with ema() if callable(ema) else nullcontext():
            images = pl_module.backbone.sample(
                all_prompts, seeds=seeds, steps=self.steps, guidance_scale=self.guidance_scale
            )
        if not trainer.is_global_zero:
            return None
        grid = image_grid(images, per_row=self.n_per_prompt)
        from PIL import Image

        out = Path(trainer.default_root_dir) / "samples" / f"step_{step:06d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(grid)
        if self.upscale > 1:
            img = img.resize((img.width * self.upscale, img.height * self.upscale), Image.NEAREST)
        with atomic_path(out) as tmp:
            img.save(tmp, format="PNG")
        self._log_image(trainer, img, grid, prompts, step)
        return out

    @staticmethod
    def _log_image(trainer, img, grid: np.ndarray, prompts: list[str], step: int) -> None:
        from lightning.pytorch.loggers import TensorBoardLogger as TB
        from lightning.pytorch.loggers import WandbLogger

        caption = " | ".join(prompts)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="samples", images=[img], step=step, caption=[caption])
            elif isinstance(logger, TB):
                logger.experiment.add_image("samples", grid, global_step=step, dataformats="HWC")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if step_is_due(trainer, batch_idx, self.every_n_steps, self._last_step):
            self.sample(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.every_n_steps and trainer.global_step != self._last_step:
            self.sample(trainer, pl_module)


class ProgressLog(L.Callback):
    """One line per ``every_n_steps`` optimizer steps, and at the last, on stderr: step, rate, time left
    (rank 0 only).

    For runs without a progress bar (a child process of ``fairtune demo`` or ``sweep``, batch jobs
    whose logs are files), so a long step shows it is alive and how long it will take.

    Args:
        every_n_steps: Steps between lines.
        prefix: Put before every line (e.g. ``[demo] all``).
    """

    def __init__(self, every_n_steps: int = 25, prefix: str = "[fit]") -> None:
        self.every_n_steps, self.prefix = max(1, every_n_steps), prefix
        self._t0: float | None = None
        self._step0 = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self._t0, self._step0 = time.perf_counter(), trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        if not trainer.is_global_zero or self._t0 is None or (step % self.every_n_steps and step != total):
            return
        done = step - self._step0
        rate = done / max(time.perf_counter() - self._t0, 1e-9)
        left = f", {(total - step) / rate / 60:.1f} min left" if total and rate > 0 else ""
        of = f"/{total}" if total else ""
        print(f"{self.prefix} step {step}{of}, {rate:.2f} steps/s{left}", file=sys.stderr, flush=True)
