"""A tiny Stable Diffusion assembled from config, saved exactly as a real checkpoint is laid out.

It stands in for a real SD 1.x folder where nothing can be downloaded: tests and benchmarks build it,
``save_pretrained`` it, and load it back through the same path a real checkpoint takes.
"""

from __future__ import annotations

from pathlib import Path


def byte_level_vocab() -> dict[str, int]:
    """CLIP's byte-level alphabet (each byte as a token, and as a word-final ``</w>`` token)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    chars = [chr(c) for c in cs]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    return vocab


def tiny_text_config(vocab_size: int, **extra):
    """The tiny CLIP text encoder config of the test stand-ins (``extra``: e.g. ``projection_dim``)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        **extra,
    )


def tiny_vae(sample_size: int):
    """The tiny AutoencoderKL of the test stand-ins (latents of side ``sample_size``, 4 channels)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=sample_size * 2,
    )


def make_tiny_stable_diffusion(out: str | Path, *, seed: int = 0, sample_size: int = 8):
    """Build a tiny SD 1.x-layout pipeline (UNet, AutoencoderKL, CLIP text encoder and tokenizer,
    PNDM/DDPM-style scheduler config), save it to ``out`` and return the folder.

    Args:
        out: Folder to write (``model_index.json``, ``unet/``, ``vae/``, ...).
        seed: Seed of the random initialisation.
        sample_size: Latent side; images are 2x that (one VAE down-sampling).
    """
    import torch
    from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=4,
    )
    vae = tiny_vae(sample_size)
    vocab = byte_level_vocab()
    text_encoder = CLIPTextModel(tiny_text_config(len(vocab)))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    out = Path(out)
    pipe.save_pretrained(out, safe_serialization=True)
    return out
