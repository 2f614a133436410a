import json

import pytest
import torch
from conftest import TEXT_ENCODER

from fairtune.models import BACKBONE_FILE, Backbone, BackboneConfig, TinyUNetConfig

TINY = TinyUNetConfig(sample_size=8, block_out_channels=[8, 16], attention_head_dim=4, norm_num_groups=4)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return Backbone.from_config(BackboneConfig(kind="tiny", text_encoder=TEXT_ENCODER, unet=TINY))


def test_tiny_backbone_uses_the_packaged_text_encoder(tiny):
    states = tiny.encode_prompts(["a handwritten digit 3", "a red handwritten digit 3", ""])
    assert states.shape == (3, 16, 384)
    # real, frozen text encoder: different prompts, different states; padding zeroed
    assert not torch.allclose(states[0], states[1])
    assert not any(p.requires_grad for p in tiny.text_encoder.parameters())
    assert "a handwritten digit 3" in tiny._prompt_cache


def test_a_tiny_backbone_names_its_text_encoder(tmp_path):
    """The core has no default text encoder: a fresh tiny model must name one, and a name that is
    neither a folder nor registered is refused, naming it."""
    with pytest.raises(ValueError, match="backbone.text_encoder is required"):
        Backbone.from_config(BackboneConfig(kind="tiny", unet=TINY))
    with pytest.raises(
        FileNotFoundError, match="'no-such-encoder' is neither a folder nor a name registered"
    ):
        Backbone.from_config(BackboneConfig(kind="tiny", text_encoder="no-such-encoder", unet=TINY))


def test_a_saved_tiny_model_keeps_its_text_encoders_name(tiny, tmp_path):
    """``save_pretrained`` records the encoder as named (portable), not this machine's resolved folder;
    loading the folder back needs no text_encoder option."""
    tiny.save_pretrained(tmp_path / "m")
    assert json.loads((tmp_path / "m" / BACKBONE_FILE).read_text())["text_encoder"] == TEXT_ENCODER
    again = Backbone.from_config(BackboneConfig(kind="tiny", pretrained=str(tmp_path / "m")))
    torch.testing.assert_close(again.encode_prompts(["a digit"]), tiny.encode_prompts(["a digit"]))


def test_tiny_sampling_is_a_function_of_the_seed(tiny):
    a = tiny.sample(["a handwritten digit 1", "a handwritten digit 2"], seeds=[5, 6], steps=3)
    b = tiny.sample(["a handwritten digit 2"], seeds=[6], steps=3)
    assert a.shape == (2, 3, 8, 8) and 0 <= a.min() and a.max() <= 1
    torch.testing.assert_close(a[1:], b)


def test_tiny_save_and_load_round_trip(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "unet" / "diffusion_pytorch_model.safetensors").exists()
    back = Backbone.from_config(BackboneConfig(kind="tiny", pretrained=str(tmp_path / "m")))
    x = torch.randn(2, 3, 8, 8)
    t = torch.tensor([10, 500])
    ctx = tiny.encode_prompts(["a", "b"])
    torch.testing.assert_close(back.unet(x, t, ctx).sample, tiny.unet(x, t, ctx).sample)


def test_missing_pretrained_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no fairtune_backbone.json"):
        Backbone.from_config(BackboneConfig(kind="tiny", pretrained=str(tmp_path)))
    with pytest.raises(ValueError, match="needs backbone.pretrained"):
        Backbone.from_config(BackboneConfig(kind="sd"))


def test_stable_diffusion_layout_loads_through_the_real_path(tiny_sd):
    bb = Backbone.from_config(BackboneConfig(kind="sd", pretrained=str(tiny_sd)))
    assert bb.vae is not None and bb.image_size == 16 and bb.latent_channels == 4
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    lat = bb.to_latents(pixels)
    assert lat.shape == (2, 4, 8, 8)
    img = bb.to_pixels(lat)
    assert img.shape == (2, 3, 16, 16)
    out = bb.sample(["a photo of a doctor"] * 2, seeds=[0, 1], steps=2)
    assert out.shape == (2, 3, 16, 16)
    assert not torch.allclose(out[0], out[1])


def _grads(config: BackboneConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    bb = Backbone.from_config(config)
    bb.unet.train()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, bb.latent_channels, bb.latent_size, bb.latent_size, generator=g)
    ctx = bb.encode_prompts(["a red digit", "a blue digit"])
    out = bb.unet(x, torch.tensor([10, 500]), encoder_hidden_states=ctx).sample
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in bb.unet.named_parameters() if p.grad is not None}


def test_attention_and_checkpointing_switches_keep_the_outputs_and_gradients(tiny_sd):
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    base = dict(kind="sd", pretrained=str(tiny_sd))
    ref_out, ref_grads = _grads(BackboneConfig(**base))
    bb = Backbone.from_config(BackboneConfig(**base, attention="eager", gradient_checkpointing=True))
    assert all(isinstance(p, AttnProcessor) for p in bb.unet.attn_processors.values())
    assert bb.unet.is_gradient_checkpointing
    assert all(
        isinstance(p, AttnProcessor2_0)
        for p in Backbone.from_config(BackboneConfig(**base)).unet.attn_processors.values()
    )
    out, grads = _grads(BackboneConfig(**base, attention="eager", gradient_checkpointing=True))
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-3, atol=1e-5)


def test_cached_text_embeddings_are_exact_and_switchable(tiny_sd):
    """``backbone.prompt_cache``: the text encoder runs once per distinct prompt with the cache (the
    default), at every call with 0, and both give the same states; a negative size is refused."""
    calls = []
    states = {}
    for size in (4096, 0):
        bb = Backbone.from_config(BackboneConfig(kind="sd", pretrained=str(tiny_sd), prompt_cache=size))
        hook = bb.text_encoder.register_forward_hook(lambda *_: calls.append(size))
        prompts = ["a red digit 3", "a blue digit 3", "a red digit 3"]
        states[size] = [bb.encode_prompts(prompts) for _ in range(3)][-1]
        hook.remove()
    assert calls.count(4096) == 2  # two distinct prompts, each encoded once over three steps
    assert calls.count(0) == 3  # one batched call per step
    torch.testing.assert_close(states[0], states[4096], atol=1e-5, rtol=0)
    # a cache smaller than one call's distinct prompts still answers the call, then keeps its size
    bb = Backbone.from_config(BackboneConfig(kind="sd", pretrained=str(tiny_sd), prompt_cache=1))
    torch.testing.assert_close(bb.encode_prompts(prompts), states[4096], atol=1e-5, rtol=0)
    assert list(bb._prompt_cache) == ["a blue digit 3"]
    with pytest.raises(ValueError, match="prompt_cache must be >= 0"):
        BackboneConfig(kind="sd", prompt_cache=-1)
