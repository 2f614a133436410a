"""The training module: diffusion loss on (rebalanced) data, LoRA or full UNet, levers as options."""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F

from fairtune.models import Backbone, BackboneConfig, LoraConfig, attach_lora


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule.

    Attributes:
        lr: Peak learning rate.
        weight_decay: AdamW weight decay.
        betas: AdamW betas.
        warmup_steps: Linear warm-up from 0.
        schedule: ``cosine`` decays to 0 at ``trainer.max_steps``; ``constant`` holds the peak (a trial
            saw the colour mix drift back with a constant rate).
    """

    lr: float = 2e-3
    weight_decay: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 50
    schedule: Literal["cosine", "constant"] = "cosine"


@dataclass
class EmaConfig:
    """Exponential moving average of the trained weights (used for export).

    Attributes:
        decay: EMA decay per step.
        warmup: Use ``min(decay, (1 + step) / (10 + step))`` so early averages are not stale.
    """

    decay: float = 0.999
    warmup: bool = True


class DebiasModule(L.LightningModule):
    """Fine-tunes a text-to-image UNet: LoRA (base frozen) or, with ``lora: null``, the full UNet.

    Args:
        backbone: The model to train.
        lora: The adapter; ``None`` trains every UNet weight (used to pretrain the base model).
        optim: Optimizer and schedule.
        prompt_dropout: Share of prompts replaced by "" so classifier-free guidance keeps working.
        min_snr_gamma: Min-SNR loss weighting (Hang et al., 2023); ``None`` weighs all steps equally.
        ema: EMA of the trained weights; ``None`` for none.
        seed: Seed of the per-step noise, timesteps and prompt dropout (a function of seed and step,
            so a resumed run draws exactly what an uninterrupted one would).
    """

    def __init__(
        self,
        backbone: BackboneConfig | None = None,
        lora: LoraConfig | None = None,
        optim: OptimConfig | None = None,
        prompt_dropout: float = 0.1,
        min_snr_gamma: float | None = None,
        ema: EmaConfig | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not 0.0 <= prompt_dropout < 1.0:
            raise ValueError(f"model.prompt_dropout must be in [0, 1), got {prompt_dropout}")
        self.backbone_config = backbone or BackboneConfig()
        self.lora = lora
        self.optim = optim or OptimConfig()
        self.prompt_dropout = prompt_dropout
        self.min_snr_gamma = min_snr_gamma
        self.ema_config = ema
        self.seed = seed
        self.backbone = Backbone.from_config(self.backbone_config)
        if lora is not None:
            self.trainable_parameters = attach_lora(self.backbone.unet, lora)
        else:
            self.backbone.unet.requires_grad_(True)
            self.trainable_parameters = sum(p.numel() for p in self.backbone.unet.parameters())
        self._ema: list[torch.Tensor] | None = None
        if ema is not None:
            self._ema = [p.detach().clone() for p in self.trained_params()]

    # ----------------------------------------------------------------- parameters
    def trained_params(self) -> list[torch.nn.Parameter]:
        return [p for p in self.backbone.unet.parameters() if p.requires_grad]

    @contextmanager
    def ema_weights(self):
        """Swap the EMA weights in (for export or sampling), then back."""
        if self._ema is None:
            yield
            return
        params = self.trained_params()
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, e in zip(params, self._ema):
                p.copy_(e)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)

    # ----------------------------------------------------------------- the step
    def step_generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + self.global_step)

    def diffusion_loss(self, batch: dict, g: torch.Generator) -> torch.Tensor:
        bb = self.backbone
        sched = bb.noise_scheduler
        latents = bb.to_latents(batch["pixels"])
        n = latents.shape[0]
        noise = torch.randn(latents.shape, generator=g).to(latents)
        t = torch.randint(0, sched.config.num_train_timesteps, (n,), generator=g).to(latents.device)
        # Drop some prompts to "" so the same model also learns the unconditional score (CFG).
        drop = torch.rand(n, generator=g) < self.prompt_dropout
        prompts = ["" if d else p for d, p in zip(drop.tolist(), batch["prompts"])]
        context = bb.encode_prompts(prompts)
        noisy = sched.add_noise(latents, noise, t)
        pred = bb.unet(noisy, t, encoder_hidden_states=context).sample
        if sched.config.prediction_type == "v_prediction":
            target = sched.get_velocity(latents, noise, t)
        else:
            target = noise
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if self.min_snr_gamma is not None:
            ac = sched.alphas_cumprod.to(latents.device)[t]
            snr = ac / (1 - ac)
            w = torch.clamp(snr, max=self.min_snr_gamma)
            w = w / (snr + 1) if sched.config.prediction_type == "v_prediction" else w / snr
            per_sample = per_sample * w
        return per_sample.mean()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        g = self.step_generator()
        loss = self.diffusion_loss(batch, g)
        self.log("train/diffusion_loss", loss, prog_bar=True, sync_dist=True)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"])
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self._ema is None:
            return
        step = self.global_step
        decay = self.ema_config.decay
        if self.ema_config.warmup:
            decay = min(decay, (1 + step) / (10 + step))
        params = self.trained_params()
        if self._ema[0].device != params[0].device:
            self._ema = [e.to(params[0].device) for e in self._ema]
        with torch.no_grad():
            for e, p in zip(self._ema, params):
                e.mul_(decay).add_(p.detach(), alpha=1 - decay)

    # ----------------------------------------------------------------- optimisation
    def configure_optimizers(self):
        opt = torch.optim.AdamW(
            self.trained_params(),
            lr=self.optim.lr,
            weight_decay=self.optim.weight_decay,
            betas=tuple(self.optim.betas),
        )
        total = self.trainer.max_steps if self.trainer and self.trainer.max_steps > 0 else None
        warm = max(0, self.optim.warmup_steps)

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            if self.optim.schedule == "constant" or total is None:
                return 1.0
            progress = min(1.0, (step - warm) / max(1, total - warm))
            return 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ----------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Keep checkpoints small and complete: trained weights (not the frozen text encoder), EMA.
        sd = checkpoint["state_dict"]
        trained = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in sd.items() if k in trained}
        if self._ema is not None:
            checkpoint["ema"] = [e.clone() for e in self._ema]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        full = self.state_dict()
        full.update(checkpoint["state_dict"])
        checkpoint["state_dict"] = full
        if "ema" in checkpoint and self._ema is not None:
            self._ema = [e.clone() for e in checkpoint["ema"]]
