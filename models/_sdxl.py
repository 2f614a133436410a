"""Stable Diffusion XL behind the same Backbone interface (two text encoders, pooled embeddings,
added time ids), and a tiny SDXL assembled from config for tests and benchmarks.

SDXL's UNet needs, beside the token states, ``added_cond_kwargs``: the pooled embedding of the second
text encoder and six time ids (original size, crop offset, target size). So that every caller that
runs ``unet(x, t, encoder_hidden_states=ctx)`` -- the training step, the adversary, the fairness
loss, sampling, Fair Diffusion -- works unchanged, :meth:`Backbone.encode_prompts` returns one tensor
per prompt: the concatenated token states of both encoders (``(L, D1 + D2)``) and one more row that
carries the pooled embedding (zero-padded to the width). A forward pre-hook on the UNet takes that row
off and passes it as ``text_embeds``, with time ids for the size of the images being denoised: the
latents' side times the VAE's scale factor, i.e. the training images' size in training (not the UNet's
native 1024) and the generation size in sampling, as original and target size, with no crop. A caller
that passes ``added_cond_kwargs`` itself (diffusers' ``StableDiffusionXLPipeline``) is left alone.
As in SDXL's pipeline (``force_zeros_for_empty_prompt``), the empty prompt encodes to zeros.
"""

from __future__ import annotations

from pathlib import Path

import torch


def sdxl_pre_hook(pooled_dim: int, vae_scale: int):
    """The UNet forward pre-hook that unpacks the pooled row and adds the time ids (see the module doc).

    Args:
        pooled_dim: Width of the second text encoder's pooled embedding.
        vae_scale: Pixels per latent position (the VAE's scale factor): the images' size is the latents'
            times this.
    """

    def hook(module, args, kwargs):
        if kwargs.get("added_cond_kwargs") is not None:
            return None
        ctx = kwargs.get("encoder_hidden_states")
        if ctx is None:
            raise ValueError("an SDXL UNet needs encoder_hidden_states as a keyword (from encode_prompts)")
        b = ctx.shape[0]
        sample = args[0] if args else kwargs["sample"]
        h, w = (int(n) * vae_scale for n in sample.shape[-2:])
        # (original height, width; crop top, left; target height, width), as SDXL's pipeline orders them
        time_ids = torch.tensor([h, w, 0, 0, h, w], dtype=ctx.dtype, device=ctx.device)
        kwargs = dict(kwargs)
        kwargs["encoder_hidden_states"] = ctx[:, :-1]
        kwargs["added_cond_kwargs"] = {
            "text_embeds": ctx[:, -1, :pooled_dim],
            "time_ids": time_ids.expand(b, 6),
        }
        return args, kwargs

    return hook


def load_sdxl(src: str) -> dict:
    """The components of an SDXL folder (diffusers layout) or hub id, safetensors only."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    kw = {"use_safetensors": True}
    return {
        "unet": UNet2DConditionModel.from_pretrained(src, subfolder="unet", **kw),
        "vae": AutoencoderKL.from_pretrained(src, subfolder="vae", **kw),
        "text_encoder": CLIPTextModel.from_pretrained(src, subfolder="text_encoder", **kw),
        "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(src, subfolder="text_encoder_2", **kw),
        "tokenizer": CLIPTokenizer.from_pretrained(src, subfolder="tokenizer"),
        "tokenizer_2": CLIPTokenizer.from_pretrained(src, subfolder="tokenizer_2"),
        "noise_scheduler": DDPMScheduler.from_pretrained(src, subfolder="scheduler"),
    }


@torch.no_grad()
def encode_sdxl(backbone, prompts: list[str]) -> torch.Tensor:
    """Packed SDXL conditioning ``(B, L + 1, D1 + D2)``: both encoders' penultimate token states, then
    the second encoder's pooled (projected) embedding as a last row."""
    states, pooled = [], None
    for tok, enc in (
        (backbone.tokenizer, backbone.text_encoder),
        (backbone.tokenizer_2, backbone.text_encoder_2),
    ):
        device = next(enc.parameters()).device
        ids = tok(
            prompts,
            padding="max_length",
            max_length=tok.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)
        out = enc(ids, output_hidden_states=True)
        states.append(out.hidden_states[-2])
        if enc is backbone.text_encoder_2:
            pooled = out.text_embeds
    ctx = torch.cat(states, dim=-1)
    row = torch.zeros(ctx.shape[0], 1, ctx.shape[-1], dtype=ctx.dtype, device=ctx.device)
    row[:, 0, : pooled.shape[-1]] = pooled
    packed = torch.cat([ctx, row], dim=1)
    empty = torch.tensor([p == "" for p in prompts], device=packed.device)
    return torch.where(empty[:, None, None], torch.zeros_like(packed), packed)


def sdxl_pipeline(backbone):
    """A ``StableDiffusionXLPipeline`` sharing the backbone's components (``load_lora_weights`` works)."""
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        vae=backbone.vae,
        text_encoder=backbone.text_encoder,
        text_encoder_2=backbone.text_encoder_2,
        tokenizer=backbone.tokenizer,
        tokenizer_2=backbone.tokenizer_2,
        unet=backbone.unet,
        scheduler=backbone.sampling_scheduler(),
    )


def make_tiny_sdxl(out: str | Path, *, seed: int = 0, sample_size: int = 8) -> Path:
    """Build a tiny SDXL (UNet with ``text_time`` added conditioning, AutoencoderKL, two CLIP text
    encoders -- the second with a projection -- and their tokenizers), save it to ``out`` in
    diffusers' layout and return the folder.

    Args:
        out: Folder to write (``model_index.json``, ``unet/``, ``text_encoder_2/``, ...).
        seed: Seed of the random initialisation.
        sample_size: Latent side; images are 2x that (one VAE down-sampling).
    """
    from diffusers import DDPMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from ._tiny_sd import byte_level_vocab, tiny_text_config, tiny_vae

    torch.manual_seed(seed)
    vocab = byte_level_vocab()
    text_cfg = tiny_text_config(len(vocab), projection_dim=32)
    time_dim = 8
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        transformer_layers_per_block=(1, 1),
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=text_cfg.projection_dim + 6 * time_dim,
        cross_attention_dim=2 * text_cfg.hidden_size,
        norm_num_groups=4,
    )
    vae = tiny_vae(sample_size)
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(text_cfg),
        text_encoder_2=CLIPTextModelWithProjection(text_cfg),
        tokenizer=CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77),
        tokenizer_2=CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77),
        unet=unet,
        scheduler=DDPMScheduler(
            num_train_timesteps=1000,
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            steps_offset=1,
        ),
    )
    out = Path(out)
    pipe.save_pretrained(out, safe_serialization=True)
    return out
