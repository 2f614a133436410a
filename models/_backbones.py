"""One interface over two kinds of text-to-image model (DESIGN §2, issue 3).

- ``tiny``: a pixel-space diffusers ``UNet2DConditionModel`` built from config, conditioned on the
  token states of a frozen Hugging Face text encoder named by folder or registered name (the embedded
  ColoredDigits-Bias benchmark registers all-MiniLM-L6-v2 and its base models: ``_shipped.py``).
- ``sd``: Stable Diffusion 1.x/2.x from a local folder or hub id, exactly as diffusers lays it out
  (VAE latents, CLIP text encoder, UNet, scheduler).
- ``sdxl``: Stable Diffusion XL likewise (two text encoders, pooled embeddings and added time ids,
  packed into the conditioning tensor: see ``_sdxl.py``).

Both expose the same pieces to the training module: ``unet``, ``noise_scheduler``,
``encode_prompts``, ``to_latents``/``to_pixels``, ``sample`` and ``pipeline()`` (a diffusers pipeline
with ``load_lora_weights``). Images are ``(B, 3, H, W)`` floats; training pixels are in [-1, 1],
sampled images in [0, 1].
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline, UNet2DConditionModel
from diffusers.loaders import StableDiffusionLoraLoaderMixin

from fairtune.data import atomic_dir

from ._shipped import resolve_shipped

BACKBONE_FILE = "fairtune_backbone.json"


@dataclass
class TinyUNetConfig:
    """The tiny pixel-space UNet (diffusers ``UNet2DConditionModel``).

    Attributes:
        sample_size: Image side in pixels.
        block_out_channels: Channels per resolution level; the first level has no attention.
        layers_per_block: ResNet layers per level.
        attention_head_dim: Channels per attention head.
        norm_num_groups: GroupNorm groups.
    """

    sample_size: int = 16
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    layers_per_block: int = 1
    attention_head_dim: int = 8
    norm_num_groups: int = 8

    def build(self, cross_attention_dim: int) -> UNet2DConditionModel:
        n = len(self.block_out_channels)
        down = ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * (n - 1)
        up = ["CrossAttnUpBlock2D"] * (n - 1) + ["UpBlock2D"]
        return UNet2DConditionModel(
            sample_size=self.sample_size,
            in_channels=3,
            out_channels=3,
            block_out_channels=tuple(self.block_out_channels),
            layers_per_block=self.layers_per_block,
            down_block_types=tuple(down),
            up_block_types=tuple(up),
            cross_attention_dim=cross_attention_dim,
            attention_head_dim=self.attention_head_dim,
            norm_num_groups=self.norm_num_groups,
        )


@dataclass
class BackboneConfig:
    """Which text-to-image model to train.

    Attributes:
        kind: ``"tiny"`` (pixel-space UNet + frozen text encoder), ``"sd"`` (Stable Diffusion 1.x/2.x)
            or ``"sdxl"`` (Stable Diffusion XL).
        pretrained: Folder (or, for ``sd``/``sdxl``, hub id) holding the weights. For ``tiny``, a folder
            written by ``save_pretrained`` or a name an installed package registers under the
            ``fairtune.checkpoints`` entry point (the benchmark's ``colored-digits-16``); ``None`` builds
            a fresh UNet from ``unet``.
        text_encoder: ``tiny`` only: folder (or registered name, e.g. the benchmark's
            ``all-MiniLM-L6-v2``) of a Hugging Face text encoder and tokenizer. ``None``: the one the
            ``pretrained`` model was saved with; a fresh UNet needs one named.
        unet: ``tiny`` only, with ``pretrained=None``: the UNet's shape.
        max_length: Token length prompts are padded/truncated to (``tiny``; ``sd`` uses CLIP's).
        prediction_type: What the UNet predicts, for a freshly built ``tiny`` model.
        num_train_timesteps: Diffusion steps of the noise schedule, for a freshly built ``tiny`` model.
        resolution: ``sd``/``sdxl``: the training images' side in pixels, as diffusers'
            ``train_text_to_image_lora.py --resolution``: the images are resized to it. It sets
            ``data.image_size`` (the option every backbone trains at; ``fairtune fit`` records the
            size there, and refuses the two set to different values, or this one on ``tiny``).
            ``None``: ``data.image_size`` decides, else the source images' own size.
        gradient_checkpointing: Recompute the UNet's activations in the backward pass: much less
            activation memory for about one more forward pass per step.
        attention: ``sdpa``: PyTorch's fused scaled-dot-product attention (flash / memory-efficient
            kernels on GPU); ``eager``: the plain matmul-softmax-matmul (a reference, and for debugging).
        prompt_cache: Cached text embeddings: the frozen text encoder's states of up to this many
            distinct prompts are kept (in CPU memory, least recently used dropped), so a prompt is
            encoded once, not at every step (the encoder never trains). ``0``: every call encodes its
            prompts in one batch, as a plain training loop does: the same states up to float rounding.
    """

    kind: Literal["tiny", "sd", "sdxl"] = "tiny"
    pretrained: str | None = None
    text_encoder: str | None = None
    unet: TinyUNetConfig = field(default_factory=TinyUNetConfig)
    max_length: int = 16
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    num_train_timesteps: int = 1000
    resolution: int | None = None
    gradient_checkpointing: bool = False
    attention: Literal["sdpa", "eager"] = "sdpa"
    prompt_cache: int = 4096

    def __post_init__(self) -> None:
        if self.prompt_cache < 0:
            raise ValueError(f"backbone.prompt_cache must be >= 0 (0: no cache), got {self.prompt_cache}")


class TinyTextToImagePipeline(DiffusionPipeline, StableDiffusionLoraLoaderMixin):
    """A diffusers pipeline around the tiny backbone, so ``load_lora_weights`` works as on SD."""

    def __init__(self, unet, text_encoder, tokenizer, scheduler):
        super().__init__()
        self.register_modules(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)
        self._backbone: Backbone | None = None

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        num_inference_steps: int = 25,
        guidance_scale: float = 2.0,
        generator: torch.Generator | None = None,
        num_images_per_prompt: int = 1,
    ) -> torch.Tensor:
        """Images in [0, 1], ``(B, 3, H, W)``."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        from diffusers.utils.torch_utils import randn_tensor

        size = self.unet.config.sample_size
        noise = randn_tensor((len(prompts), 3, size, size), generator=generator, device=self.unet.device)
        return self._backbone.denoise(
            prompts, noise, steps=num_inference_steps, guidance_scale=guidance_scale, scheduler=self.scheduler
        )


class Backbone(nn.Module):
    """The parts of a text-to-image model that training and evaluation use.

    Build with :meth:`from_config`. The text encoder and VAE are frozen; only ``unet`` trains.
    """

    def __init__(
        self,
        config: BackboneConfig,
        unet: UNet2DConditionModel,
        text_encoder: nn.Module,
        tokenizer,
        noise_scheduler: DDPMScheduler,
        vae: nn.Module | None = None,
        text_encoder_2: nn.Module | None = None,
        tokenizer_2=None,
    ) -> None:
        super().__init__()
        self.config = config
        self.unet = unet
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.text_encoder_2 = (
            text_encoder_2.eval().requires_grad_(False) if text_encoder_2 is not None else None
        )
        self.tokenizer_2 = tokenizer_2
        self.vae = vae.eval().requires_grad_(False) if vae is not None else None
        self.tokenizer = tokenizer
        self.noise_scheduler = noise_scheduler
        self._prompt_cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_config(cls, config: BackboneConfig) -> Backbone:
        if isinstance(config, dict):
            config = BackboneConfig(**config)
        if config.kind == "tiny":
            bb = cls._tiny(config)
        elif config.kind == "sd":
            bb = cls._sd(config)
        elif config.kind == "sdxl":
            bb = cls._sdxl(config)
        else:
            raise ValueError(f"backbone.kind must be 'tiny', 'sd' or 'sdxl', got {config.kind!r}")
        bb.configure_compute()
        return bb

    def configure_compute(self) -> None:
        """Apply ``gradient_checkpointing`` and ``attention`` to the UNet."""
        from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

        cfg = self.config
        if cfg.attention not in ("sdpa", "eager"):
            raise ValueError(f"backbone.attention must be 'sdpa' or 'eager', got {cfg.attention!r}")
        self.unet.set_attn_processor(AttnProcessor2_0() if cfg.attention == "sdpa" else AttnProcessor())
        if cfg.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()

    @classmethod
    def _tiny(cls, config: BackboneConfig) -> Backbone:
        from transformers import AutoModel, AutoTokenizer

        meta: dict = {}
        if config.pretrained is not None:
            config.pretrained = str(resolve_shipped(config.pretrained))
            path = Path(config.pretrained)
            if not (path / BACKBONE_FILE).exists():
                raise FileNotFoundError(
                    f"backbone.pretrained={config.pretrained!r} has no {BACKBONE_FILE}: "
                    "expected a folder written by Backbone.save_pretrained"
                )
            meta = json.loads((path / BACKBONE_FILE).read_text())
        te_name = config.text_encoder or meta.get("text_encoder")
        if te_name is None:
            raise ValueError(
                "backbone.text_encoder is required for kind 'tiny'"
                + (f" ({config.pretrained} names none)" if config.pretrained is not None else "")
                + ": a folder with a Hugging Face text encoder and tokenizer, or a registered name "
                "(all-MiniLM-L6-v2 with fairtune[colored-digits])"
            )
        te_path = resolve_shipped(te_name)
        if not te_path.is_dir():
            raise FileNotFoundError(
                f"backbone.text_encoder={te_name!r} is neither a folder nor a name registered under the "
                "fairtune.checkpoints entry point"
            )
        tokenizer = AutoTokenizer.from_pretrained(te_path)
        text_encoder = AutoModel.from_pretrained(te_path, use_safetensors=True)
        if config.pretrained is not None:
            unet = UNet2DConditionModel.from_pretrained(str(Path(config.pretrained) / "unet"))
            scheduler = DDPMScheduler.from_pretrained(str(Path(config.pretrained) / "scheduler"))
        else:
            unet = config.unet.build(text_encoder.config.hidden_size)
            scheduler = DDPMScheduler(
                num_train_timesteps=config.num_train_timesteps,
                beta_schedule="squaredcos_cap_v2",
                prediction_type=config.prediction_type,
                clip_sample=True,
            )
        config.text_encoder = str(te_name)  # as named (portable), not as resolved on this machine
        return cls(config, unet, text_encoder, tokenizer, scheduler)

    @classmethod
    def _sd(cls, config: BackboneConfig) -> Backbone:
        from diffusers import AutoencoderKL
        from transformers import CLIPTextModel, CLIPTokenizer

        if config.pretrained is None:
            raise ValueError("backbone.kind='sd' needs backbone.pretrained (a folder or hub id)")
        src = str(resolve_shipped(config.pretrained))  # a folder, a registered name, else a hub id
        kw = {"use_safetensors": True}
        unet = UNet2DConditionModel.from_pretrained(src, subfolder="unet", **kw)
        vae = AutoencoderKL.from_pretrained(src, subfolder="vae", **kw)
        text_encoder = CLIPTextModel.from_pretrained(src, subfolder="text_encoder", **kw)
        tokenizer = CLIPTokenizer.from_pretrained(src, subfolder="tokenizer")
        scheduler = DDPMScheduler.from_pretrained(src, subfolder="scheduler")
        return cls(config, unet, text_encoder, tokenizer, scheduler, vae=vae)

    @classmethod
    def _sdxl(cls, config: BackboneConfig) -> Backbone:
        from ._sdxl import load_sdxl, sdxl_pre_hook

        if config.pretrained is None:
            raise ValueError("backbone.kind='sdxl' needs backbone.pretrained (a folder or hub id)")
        bb = cls(config, **load_sdxl(config.pretrained))
        pooled_dim = bb.text_encoder_2.config.projection_dim
        vae_scale = 2 ** (len(bb.vae.config.block_out_channels) - 1)
        bb.unet.register_forward_pre_hook(sdxl_pre_hook(pooled_dim, vae_scale), with_kwargs=True)
        return bb

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write the model so ``BackboneConfig(pretrained=path)`` loads it back (atomically).

        ``tiny``: ``unet/``, ``scheduler/`` and ``fairtune_backbone.json`` (the text encoder is referenced
        by its folder or registered name, not copied). ``sd``/``sdxl``: a ``StableDiffusionPipeline`` /
        ``StableDiffusionXLPipeline`` folder.
        """
        with atomic_dir(path) as tmp:
            if self.config.kind == "tiny":
                self.unet.save_pretrained(tmp / "unet", safe_serialization=True)
                self.noise_scheduler.save_pretrained(tmp / "scheduler")
                meta = {"kind": "tiny", "text_encoder": self.config.text_encoder}
                (tmp / BACKBONE_FILE).write_text(json.dumps(meta, indent=2))
            else:
                self.pipeline().save_pretrained(tmp, safe_serialization=True)

    # ----------------------------------------------------------------- shapes
    @property
    def latent_channels(self) -> int:
        return self.unet.config.in_channels

    @property
    def latent_size(self) -> int:
        return self.unet.config.sample_size

    @property
    def image_size(self) -> int:
        if self.vae is None:
            return self.unet.config.sample_size
        return self.unet.config.sample_size * 2 ** (len(self.vae.config.block_out_channels) - 1)

    # ----------------------------------------------------------------- conditioning
    @torch.no_grad()
    def _encode_uncached(self, prompts: list[str]) -> torch.Tensor:
        if self.config.kind == "sdxl":
            from ._sdxl import encode_sdxl

            return encode_sdxl(self, prompts)
        device = next(self.text_encoder.parameters()).device
        if self.vae is None:
            tok = self.tokenizer(
                prompts,
                padding="max_length",
                max_length=self.config.max_length,
                truncation=True,
                return_tensors="pt",
            ).to(device)
            states = self.text_encoder(**tok).last_hidden_state
            # Zero padded positions: the UNet's cross-attention then reads only real tokens' values.
            return states * tok["attention_mask"][..., None].to(states.dtype)
        tok = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=min(self.tokenizer.model_max_length, self.text_encoder.config.max_position_embeddings),
            truncation=True,
            return_tensors="pt",
        ).to(device)
        return self.text_encoder(tok["input_ids"])[0]

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Token states ``(B, L, D)`` of the frozen text encoder.

        Distinct prompts are encoded one at a time (so a prompt's states never depend on what it was
        batched with) and kept on the CPU in a bounded LRU cache (``config.prompt_cache`` prompts;
        with ``0`` the whole list is encoded in one call every time).
        """
        size = getattr(self.config, "prompt_cache", 4096)
        device = next(self.unet.parameters()).device
        if size == 0:
            return self._encode_uncached(list(prompts)).to(device)
        cache, states = self._prompt_cache, {}
        for p in dict.fromkeys(prompts):
            if p in cache:
                cache.move_to_end(p)
                states[p] = cache[p]
            else:
                states[p] = cache[p] = self._encode_uncached([p])[0].cpu()
        while len(cache) > size:  # after the lookups: a call may need more prompts than the cache keeps
            cache.popitem(last=False)
        return torch.stack([states[p] for p in prompts]).to(device)

    # ----------------------------------------------------------------- image space
    def vae_fingerprint(self) -> str:
        """A hash of the VAE's config and weights (the latent cache's model key)."""
        import hashlib

        if self.vae is None:
            raise ValueError(
                f"backbone.kind={self.config.kind!r} has no VAE (it trains in pixel space): there are no "
                "latents to cache; leave data.latents unset"
            )
        h = hashlib.sha256(json.dumps(dict(self.vae.config), sort_keys=True, default=str).encode())
        for name, t in sorted(self.vae.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    @torch.no_grad()
    def encode_moments(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixels in [-1, 1] to the VAE posterior's unscaled ``(mean, std)`` (what the latent cache keeps)."""
        if self.vae is None:
            raise ValueError("encode_moments needs a backbone with a VAE")
        device = next(self.vae.parameters()).device
        dist = self.vae.encode(pixels.to(device, self.vae.dtype)).latent_dist
        return dist.mean, dist.std

    def latents_from_moments(
        self, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """A draw from a cached posterior, scaled for the UNet: the same draw :meth:`to_latents` makes from
        the same generator."""
        from diffusers.utils.torch_utils import randn_tensor

        noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return (mean + std * noise) * self.vae.config.scaling_factor

    def to_latents(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training pixels in [-1, 1] to what the UNet denoises (the VAE's draw from ``generator``)."""
        if self.vae is None:
            return pixels
        with torch.no_grad():
            lat = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.sample(generator=generator)
        return lat * self.vae.config.scaling_factor

    def to_pixels(self, latents: torch.Tensor) -> torch.Tensor:
        """UNet space to images in [0, 1] (differentiable)."""
        x = latents if self.vae is None else self.vae.decode(latents / self.vae.config.scaling_factor).sample
        return ((x.float() + 1) / 2).clamp(0, 1)

    def initial_noise(self, seeds: list[int]) -> torch.Tensor:
        """Per-image starting noise, one generator per seed, so an image depends on its seed alone."""
        shape = (self.latent_channels, self.latent_size, self.latent_size)
        return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])

    # ----------------------------------------------------------------- sampling
    def sampling_batch_size(self, rows_per_image: int = 2) -> int:
        """Images per sampling batch when none is given: the UNet runs about 128 rows of 16x16 latents
        per call on a CPU (activations stay in cache: on 2 cores the 16-pixel model made 575
        evaluations/s with 64 guided images per batch, 300 with 512) and 8 times that on a GPU; larger
        latents get proportionally fewer rows.

        Args:
            rows_per_image: UNet rows per image and step (2 with classifier-free guidance; Fair
                Diffusion adds one per edit prompt).
        """
        on_cpu = next(self.unet.parameters()).device.type == "cpu"
        positions = (128 if on_cpu else 1024) * 16 * 16
        return max(1, positions // (self.latent_size**2 * max(1, rows_per_image)))

    def sampling_scheduler(self) -> DDIMScheduler:
        return DDIMScheduler.from_config(self.noise_scheduler.config)

    @torch.no_grad()
    def denoise(
        self,
        prompts: list[str],
        noise: torch.Tensor,
        *,
        steps: int = 25,
        guidance_scale: float = 2.0,
        scheduler=None,
    ) -> torch.Tensor:
        """Classifier-free-guided sampling from ``noise``; images in [0, 1]."""
        device = next(self.unet.parameters()).device
        sched = scheduler or self.sampling_scheduler()
        sched.set_timesteps(steps)
        lat = noise.to(device) * sched.init_noise_sigma
        cond = self.encode_prompts(prompts)
        uncond = self.encode_prompts([""] * len(prompts))
        ctx = torch.cat([uncond, cond])
        for t in sched.timesteps:
            inp = sched.scale_model_input(torch.cat([lat, lat]), t)
            e_u, e_c = self.unet(inp, t, encoder_hidden_states=ctx).sample.chunk(2)
            eps = e_u + guidance_scale * (e_c - e_u)
            lat = sched.step(eps, t, lat).prev_sample
        return self.to_pixels(lat)

    @torch.no_grad()
    def sample(
        self,
        prompts: list[str],
        *,
        seeds: list[int],
        steps: int = 25,
        guidance_scale: float = 2.0,
        batch_size: int | None = None,
    ) -> torch.Tensor:
        """Images ``(B, 3, H, W)`` in [0, 1] for ``prompts``, image i from ``seeds[i]``, in batches of
        ``batch_size`` images (default :meth:`sampling_batch_size`)."""
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        if batch_size is None:
            batch_size = self.sampling_batch_size()
        was_training = self.unet.training
        self.unet.eval()
        out = []
        for i in range(0, len(prompts), batch_size):
            noise = self.initial_noise(seeds[i : i + batch_size])
            out.append(
                self.denoise(
                    prompts[i : i + batch_size], noise, steps=steps, guidance_scale=guidance_scale
                ).cpu()
            )
        self.unet.train(was_training)
        return torch.cat(out)

    def pipeline(self):
        """A diffusers pipeline over these components (sharing them), with ``load_lora_weights``."""
        if self.vae is None:
            pipe = TinyTextToImagePipeline(
                unet=self.unet,
                text_encoder=self.text_encoder,
                tokenizer=self.tokenizer,
                scheduler=self.sampling_scheduler(),
            )
            pipe._backbone = self
            return pipe
        if self.config.kind == "sdxl":
            from ._sdxl import sdxl_pipeline

            return sdxl_pipeline(self)
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            scheduler=self.sampling_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    def describe(self) -> dict:
        return {
            "config": asdict(self.config),
            "unet_parameters": sum(p.numel() for p in self.unet.parameters()),
            "image_size": self.image_size,
        }
