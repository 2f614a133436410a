"""The training module: diffusion loss on (rebalanced) data, LoRA or full UNet, levers as options."""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from diffusers.training_utils import EMAModel, compute_snr

from fairtune.data import Target
from fairtune.models import (
    AdversaryConfig,
    AttributeHead,
    Backbone,
    BackboneConfig,
    LoraConfig,
    MidBlockFeatures,
    adversary_losses,
    attach_lora,
)

from ._distill import DistillConfig, DistillLoss
from ._fairness import FairnessConfig, FairnessLoss

log = logging.getLogger(__name__)


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
    """Exponential moving average of the trained weights (used for export and sampling), kept by
    diffusers' ``EMAModel``.

    At the ``n``-th optimizer update the average moves ``ema ← d·ema + (1 − d)·weights``. As in
    ``EMAModel``, the first update (``n = 1``) has ``d = 0``: the average starts from the weights after
    one update. From the second on, ``d = min(decay, n / (n + 9))`` with ``warmup`` (``EMAModel``'s
    default warm-up, ``(1 + s) / (10 + s)`` of the ``s = n − 1`` updates before this one), ``d = decay``
    without. (The hand-written EMA before it used ``(1 + n) / (10 + n)`` and started from the
    initial weights: the same average one update earlier.)

    Attributes:
        decay: The EMA decay per optimizer update (the most it reaches with ``warmup``).
        warmup: Ramp the decay up as ``n / (n + 9)`` so early averages are not stale.
    """

    decay: float = 0.999
    warmup: bool = True

    def build(self, parameters) -> EMAModel:
        """diffusers' ``EMAModel`` over ``parameters`` with this decay and warm-up (without warm-up,
        ``min_decay = decay`` holds the decay constant)."""
        decay = float(self.decay)
        return EMAModel(parameters, decay=decay, min_decay=0.0 if self.warmup else decay)


class DebiasModule(L.LightningModule):
    """Fine-tunes a text-to-image UNet: LoRA (base frozen) or, with ``lora: null``, the full UNet.

    Args:
        backbone: The model to train.
        lora: The adapter; ``None`` trains every UNet weight (used to pretrain the base model).
        optim: Optimizer and schedule.
        prompt_dropout: Share of prompts replaced by "" so classifier-free guidance keeps working.
        min_snr_gamma: Min-SNR loss weighting (Hang et al., 2023); ``None`` weighs all steps equally.
        noise_offset: Noise offset (the diffusers training scripts' ``--noise_offset``): each image's
            noise gets ``noise_offset · N(0, 1)`` added per channel, constant over the image, so the
            model also learns to move a whole image's mean (very dark or light images); 0: off.
        ema: EMA of the trained weights; ``None`` for none.
        adversary: Lever 2, the adversarial attribute head; ``None``: absent (no hook, no head).
        fairness: Lever 3, the fairness-penalised loss; ``None``: absent (no generation pass).
        distill: Lever 1's data-free form: the base model's class-explicit generations distilled into
            the neutral prompt in the target mix; ``None``: absent.
        data_timesteps: ``[lo, hi)``: the timesteps the diffusion loss on the data trains (drawn
            uniformly). ``[0, 1000)`` trains all; e.g. ``[0, 600)`` with ``distill.timesteps: [600,
            1000]`` leaves the high-noise steps, where the attribute is decided, to the distillation,
            and the data anchors only the details (its scarce minority images are not memorised as
            "the" images of that class).
        data_weight: Weight of the diffusion loss on the data. 0 skips it (no UNet pass on the data):
            the adapter learns from the distillation alone (with ``distill.timesteps: [0, 1000]``, the
            base model's class-explicit predictions at every step, a data-free adapter); needs
            ``distill`` or ``fairness`` and no ``adversary`` (it reads the data pass's features).
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
        noise_offset: float = 0.0,
        ema: EmaConfig | None = None,
        adversary: AdversaryConfig | None = None,
        fairness: FairnessConfig | None = None,
        distill: DistillConfig | None = None,
        data_timesteps: tuple[int, int] = (0, 1000),
        data_weight: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not 0.0 <= prompt_dropout < 1.0:
            raise ValueError(f"model.prompt_dropout must be in [0, 1), got {prompt_dropout}")
        lo, hi = data_timesteps
        if not 0 <= lo < hi:
            raise ValueError(f"model.data_timesteps must be [lo, hi) with 0 <= lo < hi, got {data_timesteps}")
        self.data_timesteps = (int(lo), int(hi))
        if not (math.isfinite(data_weight) and data_weight >= 0):
            raise ValueError(f"model.data_weight must be >= 0, got {data_weight}")
        if data_weight == 0 and (adversary is not None or (distill is None and fairness is None)):
            raise ValueError(
                "model.data_weight: 0 trains without the data loss: it needs model.distill or "
                "model.fairness to learn from, and no model.adversary (it reads the data pass)"
            )
        self.data_weight = float(data_weight)
        if not (math.isfinite(noise_offset) and noise_offset >= 0):
            raise ValueError(f"model.noise_offset must be >= 0, got {noise_offset}")
        self.noise_offset = float(noise_offset)
        self.backbone_config = backbone or BackboneConfig()
        self.lora = lora
        self.optim = optim or OptimConfig()
        self.prompt_dropout = prompt_dropout
        self.min_snr_gamma = min_snr_gamma
        self.ema_config = ema
        self.adversary = adversary
        self.fairness = fairness
        self.distill = distill
        self.seed = seed
        self.backbone = Backbone.from_config(self.backbone_config)
        if lora is not None:
            self.trainable_parameters = attach_lora(self.backbone.unet, lora)
        else:
            self.backbone.unet.requires_grad_(True)
            self.trainable_parameters = sum(p.numel() for p in self.backbone.unet.parameters())
        self._ema: EMAModel | None = ema.build(self.trained_params()) if ema is not None else None
        self.target = None  # the data's Target, attached in setup()
        self.distill_target = None  # the distillation's (model.distill.proportions), attached with it
        self.head: AttributeHead | None = None
        self._features: MidBlockFeatures | None = None
        self.fairness_loss: FairnessLoss | None = None
        if fairness is not None:
            if lora is None and fairness.preservation_weight > 0:
                raise ValueError(
                    "model.fairness.preservation_weight > 0 needs model.lora: the reference is the same "
                    "UNet with its adapter disabled"
                )
            self.fairness_loss = FairnessLoss(fairness)
        self.distill_loss: DistillLoss | None = None
        if distill is not None:
            if lora is None:
                raise ValueError(
                    "model.distill needs model.lora: the teacher is the same UNet with its adapter disabled"
                )
            self.distill_loss = DistillLoss(distill, seed=seed)
        if adversary is not None:
            if adversary.loss not in ("confusion", "reversal"):
                raise ValueError(
                    f"model.adversary.loss must be confusion or reversal, got {adversary.loss!r}"
                )
            self._features = MidBlockFeatures(self.backbone.unet)

    def attach_target(self, target) -> None:
        """Give the levers the data's target (called from ``setup`` with the data module's)."""
        self.target = target
        # The distillation's own mix where model.distill.proportions sets one (the data loss keeps
        # the data's target), else the data's target.
        self.distill_target = target
        if self.distill is not None and self.distill.proportions is not None:
            config = replace(target.config, proportions=self.distill.proportions, per_concept=None)
            try:
                self.distill_target = Target(config, target.spec)
            except ValueError as err:
                raise ValueError(f"model.distill.proportions: {err}") from None
        if self.adversary is not None and self.head is None:
            width = self.backbone.unet.config.block_out_channels[-1]
            self.head = AttributeHead(width, len(target.groups), self.adversary.hidden)

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        res = self.backbone_config.resolution
        if res is not None and self.backbone_config.kind != "tiny" and dm is not None:
            size = getattr(dm, "image_size", res)
            # (fairtune fit sets data.image_size from it; a data module built in Python may differ)
            if size != res:
                raise ValueError(
                    f"model.backbone.resolution={res} but the data module trains at {size} px: set "
                    f"data.image_size={res} (the training images' side) or leave resolution unset"
                )
        if dm is not None and getattr(dm, "latents", None) is not None and stage == "fit":
            self.use_latent_cache(dm)
        if dm is not None and getattr(dm, "target", None) is not None:
            self.attach_target(dm.target)
            if self.fairness is not None and self.fairness.concepts is None:
                self.fairness.concepts = (
                    sorted(set(dm.record_concepts)) if hasattr(dm, "record_concepts") else None
                )
            if self.distill is not None and self.distill.concepts is None:
                if not hasattr(dm, "record_concepts"):
                    raise ValueError("model.distill.concepts is not set and the data module names none")
                self.distill.concepts = sorted(set(dm.record_concepts))

    def use_latent_cache(self, dm) -> None:
        """Have the data module train from cached VAE latents, encoding them (on the training device)
        where the cache has no entry for this VAE; every rank takes the same entry."""
        bb = self.backbone
        fingerprint = bb.vae_fingerprint()  # a clear error where the backbone has no VAE
        device = self.trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
        bb.vae.to(device)
        entry = dm.use_latent_cache(fingerprint, bb.encode_moments)
        log.info("latent cache: %s %s", "built" if entry.built else "reused", entry.path)

    # ----------------------------------------------------------------- parameters
    def trained_params(self) -> list[torch.nn.Parameter]:
        return [p for p in self.backbone.unet.parameters() if p.requires_grad]

    @contextmanager
    def ema_weights(self):
        """Swap the EMA weights in (for export or sampling), then back (``EMAModel``'s ``store``,
        ``copy_to``, ``restore``)."""
        if self._ema is None:
            yield
            return
        params = self.trained_params()
        self._ema.store(params)
        self._ema.copy_to(params)
        try:
            yield
        finally:
            self._ema.restore(params)

    # ----------------------------------------------------------------- the step
    def step_generator(self, batch_idx: int = 0) -> torch.Generator:
        """The randomness of one micro-batch: a function of (seed, optimizer step, micro-batch, rank)
        alone, so a resumed run draws what an uninterrupted one would and DDP ranks differ."""
        accumulate = self.trainer.accumulate_grad_batches if self._trainer is not None else 1
        rank = self.global_rank if self._trainer is not None else 0
        micro = batch_idx % accumulate
        key = ((self.seed * 1_000_003 + self.global_step) * 64 + micro) * 4096 + rank
        return torch.Generator().manual_seed(key)

    def _optimizer_steps_now(self, batch_idx: int) -> bool:
        if self._trainer is None:
            return True
        return (batch_idx + 1) % self.trainer.accumulate_grad_batches == 0

    def diffusion_loss(self, batch: dict, g: torch.Generator) -> tuple[torch.Tensor, dict]:
        bb = self.backbone
        sched = bb.noise_scheduler
        cached = "latent_mean" in batch
        n = (batch["latent_mean"] if cached else batch["pixels"]).shape[0]
        # the flip choice comes first from the step's generator, so both paths make the same choices
        flip = torch.rand(n, generator=g) < 0.5 if batch.get("random_flip") else torch.zeros(n, dtype=bool)
        if cached:
            # (B, V, C, h, w): variant 1 is the flipped image where the cache holds it
            variant = flip.long() if batch["latent_mean"].shape[1] > 1 else torch.zeros(n, dtype=torch.long)
            pick = (torch.arange(n), variant)
            latents = bb.latents_from_moments(batch["latent_mean"][pick], batch["latent_std"][pick], g)
        else:
            pixels = batch["pixels"]
            if flip.any():
                pixels = torch.where(flip.to(pixels.device)[:, None, None, None], pixels.flip(-1), pixels)
            latents = bb.to_latents(pixels, generator=g)
        noise = torch.randn(latents.shape, generator=g).to(latents)
        lo, hi = self.data_timesteps
        hi = min(hi, sched.config.num_train_timesteps)
        if lo >= hi:
            raise ValueError(
                f"model.data_timesteps {self.data_timesteps} is outside the schedule's "
                f"{sched.config.num_train_timesteps} timesteps"
            )
        t = torch.randint(lo, hi, (n,), generator=g).to(latents.device)
        # Drop some prompts to "" so the same model also learns the unconditional score (CFG).
        drop = torch.rand(n, generator=g) < self.prompt_dropout
        prompts = ["" if d else p for d, p in zip(drop.tolist(), batch["prompts"])]
        if self.noise_offset:
            # drawn last, so that a run without it draws exactly what it always did
            offset = torch.randn(n, latents.shape[1], 1, 1, generator=g).to(latents)
            noise = noise + self.noise_offset * offset
        context = bb.encode_prompts(prompts)
        noisy = sched.add_noise(latents, noise, t)
        pred = bb.unet(noisy, t, encoder_hidden_states=context).sample
        if sched.config.prediction_type == "v_prediction":
            target = sched.get_velocity(latents, noise, t)
        else:
            target = noise
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if self.min_snr_gamma is not None:
            snr = compute_snr(sched, t)
            w = torch.clamp(snr, max=self.min_snr_gamma)
            w = w / (snr + 1) if sched.config.prediction_type == "v_prediction" else w / snr
            per_sample = per_sample * w
        return per_sample.mean(), {"t": t, "dropped": drop.to(t.device), "noisy": noisy}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        g = self.step_generator(batch_idx)
        # 1. the diffusion loss on (rebalanced) real data: it anchors quality (off at data_weight 0,
        # where the adapter learns only from the base model's own generations)
        loss, aux = torch.zeros((), device=self.device), None
        if self.data_weight > 0:
            data_loss, aux = self.diffusion_loss(batch, g)
            self.log("train/diffusion_loss", data_loss, prog_bar=True, sync_dist=True)
            loss = self.data_weight * data_loss
        # 2. the adversary reads the mid-block features the hook caught in that same forward pass
        if self.adversary is not None:
            loss = loss + self.adversary_step(batch, aux)
        # 3. the fairness loss generates its own images every k steps
        if (
            self.fairness is not None
            and self.fairness.active(self.global_step)
            and self._optimizer_steps_now(batch_idx)
        ):
            loss = loss + self.fairness_step(g)
        # 4. lever 1's data-free form: the neutral prompt learns the base model's explicit predictions
        if self.distill_loss is not None:
            fb = self.distill.feedback
            if fb is not None and fb.due(self.global_step) and self._optimizer_steps_now(batch_idx):
                # Closing the loop: the adapter's own mix, measured, moves the mix it is distilled in.
                shares = self.distill_loss.feedback(self.backbone, self.distill_target, self.global_step)
                for concept, share in shares.items():
                    for group, v in zip(self.target.groups, share):
                        self.log(f"distill/feedback/{concept}/{group}", v, sync_dist=True)
            out = self.distill_loss(self.backbone, self.distill_target, g)
            self.log_dict({"distill/loss": out["distill"], "distill/hold": out["hold"]}, sync_dist=True)
            loss = loss + out["loss"]
        if not torch.isfinite(loss):
            # Stop here: one NaN update poisons every weight, and the run would go on to export them.
            raise FloatingPointError(
                f"the training loss is {loss.item()} at step {self.global_step}: stopping before the "
                "weights are updated (lower model.optim.lr, check the data and any cached latents)"
            )
        self.log("train/lr", self.optimizers().param_groups[0]["lr"])
        self.log("train/loss", loss, sync_dist=True)
        return loss

    def _targets_for(self, concepts: list[str]) -> torch.Tensor:
        return torch.tensor([self.target.proportions(c) for c in concepts], dtype=torch.float32)

    def adversary_step(self, batch: dict, aux: dict) -> torch.Tensor:
        cfg = self.adversary
        feats = self._features.pop()
        if cfg.features == "prompt_induced":
            ctx = self.backbone.encode_prompts([""] * feats.shape[0])
            feats = feats - self._features.run_until_mid(aux["noisy"], aux["t"], encoder_hidden_states=ctx)
        groups = batch["groups"].to(feats.device).clone()
        lo, hi = cfg.timesteps
        # Unknown labels, out-of-range timesteps and prompt-dropped examples don't train the head.
        groups[(aux["t"] < lo) | (aux["t"] >= hi) | aux["dropped"]] = -1
        out = adversary_losses(
            self.head,
            feats,
            groups,
            self._targets_for(batch["concepts"]).to(feats.device),
            loss=cfg.loss,
            lam=cfg.lam(self.global_step),
        )
        self.log_dict(
            {
                "adversary/head_loss": out["head_loss"],
                "adversary/accuracy": out["accuracy"],
                "adversary/majority_rate": out["majority"],
                "adversary/lora_loss": out["lora_loss"],
                "adversary/lambda": cfg.lam(self.global_step),
            },
            sync_dist=True,
        )
        return out["total"]

    def fairness_step(self, g: torch.Generator) -> torch.Tensor:
        cfg = self.fairness
        pool = self.fairness_loss.pool()  # (concept, prompt): the concepts, then extra (flagged) prompts
        if not pool:
            raise ValueError("model.fairness.concepts is empty and the data module gave none")
        pick = torch.randperm(len(pool), generator=g)[: cfg.concepts_per_step].tolist()
        concepts = [pool[i][0] for i in pick]
        targets = self._targets_for(concepts).to(self.device)
        out = self.fairness_loss(self.backbone, concepts, targets, g, prompts=[pool[i][1] for i in pick])
        lam = cfg.lam(self.global_step)
        self.log_dict(
            {
                "fairness/align": out["align"],
                "fairness/preserve": out["preserve"],
                "fairness/lambda": lam,
                # the generated batch's first-group share vs its target, averaged over concepts
                "fairness/share_gap": (out["share"] - targets).abs().max(-1).values.mean(),
            },
            sync_dist=True,
        )
        # The preservation term ramps with λ: before the alignment pushes, there is nothing to hold.
        ramp = lam / cfg.weight if cfg.weight > 0 else 1.0
        return lam * out["align"] + ramp * cfg.preservation_weight * out["preserve"]

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        # The EMA moves here, with the weights, not in on_train_batch_end: callbacks' batch-end hooks
        # (EpochCheckpoint) run before the module's, so a checkpoint would hold weights one update
        # ahead of their EMA and a resumed run would export a different adapter.
        if self._ema is None:
            return
        params = self.trained_params()
        if self._ema.shadow_params[0].device != params[0].device:
            self._ema.to(device=params[0].device)
        self._ema.step(params)  # counts the updates itself (optimization_step), saved with it

    # ----------------------------------------------------------------- optimisation
    def configure_optimizers(self):
        groups = [{"params": self.trained_params()}]
        if self.head is not None:
            groups.append({"params": list(self.head.parameters()), "lr": self.adversary.lr})
        opt = torch.optim.AdamW(
            groups,
            lr=self.optim.lr,
            weight_decay=self.optim.weight_decay,
            betas=tuple(self.optim.betas),
        )
        total = None
        if self._trainer is not None:
            total = self.trainer.max_steps if self.trainer.max_steps > 0 else None
            if total is None:
                est = self.trainer.estimated_stepping_batches
                total = int(est) if est != float("inf") else None
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
        # Keep checkpoints small and complete: trained weights (not the frozen text encoder, not the
        # fairness classifier), the adversary head, EMA.
        sd = checkpoint["state_dict"]
        # (FSDP / activation-checkpointing wrappers prefix the names the state dict does not carry)
        trained = {
            n.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")
            for n, p in self.named_parameters()
            if p.requires_grad
        }
        checkpoint["state_dict"] = {k: v for k, v in sd.items() if k in trained}
        if self.distill_loss is not None:
            checkpoint["distill"] = self.distill_loss.state_dict()
        if self._ema is not None:
            state = self._ema.state_dict()  # references: copied, as the tensors move on after saving
            checkpoint["ema"] = {**state, "shadow_params": [e.clone() for e in state["shadow_params"]]}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        full = self.state_dict()
        full.update(checkpoint["state_dict"])
        checkpoint["state_dict"] = full
        if "distill" in checkpoint and self.distill_loss is not None:
            self.distill_loss.load_state_dict(checkpoint["distill"])
        if "ema" in checkpoint and self._ema is not None:
            state = checkpoint["ema"]
            if isinstance(state, list):  # a checkpoint of the hand-written EMA: its tensors alone
                state = {"shadow_params": state, "optimization_step": int(checkpoint.get("global_step", 0))}
            # the averaged weights and the update count; decay and warm-up stay the config's
            self._ema.load_state_dict({k: state[k] for k in ("shadow_params", "optimization_step")})
