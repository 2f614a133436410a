import pytest
import torch
from conftest import TEXT_ENCODER
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from fairtune.models import (
    ATTENTION,
    LORA_WEIGHT_NAME,
    Backbone,
    BackboneConfig,
    LoraConfig,
    TinyUNetConfig,
    attach_lora,
    save_lora,
)

TINY = TinyUNetConfig(sample_size=8, block_out_channels=[8, 16], attention_head_dim=4, norm_num_groups=4)


def _perturb_lora(unet, seed=0):
    """Give the adapter's B matrices (zero at init) some weight, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _images(pipe, seed=0):
    g = torch.Generator().manual_seed(seed)
    return pipe("a photo of a nurse", num_inference_steps=2, generator=g, output_type="pt").images


def test_adapter_round_trips_through_diffusers_load_lora_weights(tiny_sd, tmp_path):
    bb = Backbone.from_config(BackboneConfig(kind="sd", pretrained=str(tiny_sd)))
    n = attach_lora(bb.unet, LoraConfig(rank=4, alpha=8))
    assert 0 < n < sum(p.numel() for p in bb.unet.parameters()) / 2
    assert all(not p.requires_grad for name, p in bb.unet.named_parameters() if "lora" not in name)
    _perturb_lora(bb.unet)
    path = save_lora(bb.unet, tmp_path / "adapter")
    assert path.name == LORA_WEIGHT_NAME and not list((tmp_path / "adapter").glob(".lora-*"))
    keys = load_file(str(path))
    assert all(k.startswith("unet.") for k in keys) and any("lora" in k for k in keys)

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    before = _images(pipe)
    pipe.load_lora_weights(str(tmp_path / "adapter"))
    with_lora = _images(pipe)
    assert (with_lora - before).abs().max() > 1e-3
    # the adapter loaded by diffusers computes what the trained module computes (alpha kept)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([300])
    ctx = bb.encode_prompts(["a photo of a nurse"])
    torch.testing.assert_close(pipe.unet(x, t, ctx).sample, bb.unet(x, t, ctx).sample, atol=1e-5, rtol=1e-4)
    pipe.unload_lora_weights()
    torch.testing.assert_close(_images(pipe), before, atol=0, rtol=0)


def test_tiny_backbone_loads_the_same_format(tmp_path):
    torch.manual_seed(0)
    trained = Backbone.from_config(BackboneConfig(kind="tiny", text_encoder=TEXT_ENCODER, unet=TINY))
    trained.save_pretrained(tmp_path / "base")
    attach_lora(trained.unet, LoraConfig(rank=4, target_modules=ATTENTION))
    _perturb_lora(trained.unet, seed=1)
    save_lora(trained.unet, tmp_path / "adapter")

    fresh = Backbone.from_config(BackboneConfig(kind="tiny", pretrained=str(tmp_path / "base")))
    pipe = fresh.pipeline()
    g = torch.Generator().manual_seed(0)
    before = pipe("a handwritten digit 4", num_inference_steps=3, generator=g)
    pipe.load_lora_weights(str(tmp_path / "adapter"))
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([50, 700])
    ctx = fresh.encode_prompts(["a", "b"])
    torch.testing.assert_close(fresh.unet(x, t, ctx).sample, trained.unet(x, t, ctx).sample)
    g = torch.Generator().manual_seed(0)
    after = pipe("a handwritten digit 4", num_inference_steps=3, generator=g)
    assert (after - before).abs().max() > 1e-3
    pipe.unload_lora_weights()
    g = torch.Generator().manual_seed(0)
    torch.testing.assert_close(pipe("a handwritten digit 4", num_inference_steps=3, generator=g), before)


@pytest.fixture
def one_thread():
    """One thread: two threads per process thrash on the shared 2-core machine (1.6 s against 20 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_adapter_scale_as_a_users_pipeline_sets_it(tmp_path, one_thread):
    """``load_adapter(scale=s)``: 0 is the base model, fused and unfused agree at 0.5, 1 is unchanged."""
    import copy

    from fairtune.models import load_adapter

    torch.manual_seed(0)
    base_bb = Backbone.from_config(BackboneConfig(kind="tiny", text_encoder=TEXT_ENCODER, unet=TINY))
    trained = copy.deepcopy(base_bb.unet)
    attach_lora(trained, LoraConfig(rank=4))
    _perturb_lora(trained, seed=2)
    save_lora(trained, tmp_path / "adapter")

    x, t = torch.randn(2, 3, 8, 8), torch.tensor([50, 700])
    ctx = base_bb.encode_prompts(["a handwritten digit 4", "a"])

    def with_unet():  # the base model around a fresh copy of its UNet (text encoder shared)
        b = base_bb
        return Backbone(b.config, copy.deepcopy(b.unet), b.text_encoder, b.tokenizer, b.noise_scheduler, None)

    @torch.no_grad()
    def unet_out(scale=None, fuse=False):
        bb = with_unet()
        if scale is not None:
            load_adapter(bb, tmp_path / "adapter", fuse=fuse, scale=scale)
        return bb.unet(x, t, ctx).sample

    base = unet_out()
    full = unet_out(1.0)
    assert (full - base).abs().max() > 1e-2  # the adapter changes the output
    torch.testing.assert_close(unet_out(0.0), base, atol=1e-6, rtol=0)
    torch.testing.assert_close(unet_out(0.0, fuse=True), base, atol=1e-5, rtol=1e-5)
    half = unet_out(0.5)
    torch.testing.assert_close(unet_out(0.5, fuse=True), half, atol=1e-5, rtol=1e-4)
    assert (half - base).abs().max() > 1e-3 and (half - full).abs().max() > 1e-3
    # scale 1: what a pipeline computes with load_lora_weights alone, and after a plain fuse_lora()
    bb = with_unet()
    pipe = bb.pipeline()
    pipe.load_lora_weights(str(tmp_path / "adapter"))
    with torch.no_grad():
        torch.testing.assert_close(bb.unet(x, t, ctx).sample, full, atol=0, rtol=0)
        pipe.fuse_lora()
        torch.testing.assert_close(bb.unet(x, t, ctx).sample, unet_out(1.0, fuse=True), atol=0, rtol=0)
