"""SDXL through the same Backbone: its packed conditioning is what diffusers' SDXL pipeline computes,
it trains and exports through `fairtune fit`, the adapter loads with
`StableDiffusionXLPipeline.load_lora_weights`, and Fair Diffusion and prompt augmentation run on it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from fairtune.cli import main
from fairtune.models import (
    Backbone,
    BackboneConfig,
    FairDiffusionConfig,
    PromptAugmentationConfig,
    augment_prompts,
    fair_diffusion_sample,
)

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl):
    return Backbone.from_config(BackboneConfig(kind="sdxl", pretrained=str(tiny_sdxl)))


def test_packed_conditioning_equals_the_sdxl_pipelines(sdxl):
    pipe = sdxl.pipeline()
    prompt = "a handwritten digit 3"
    embeds, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
    packed = sdxl.encode_prompts([prompt])
    torch.testing.assert_close(packed[:, :-1], embeds)
    torch.testing.assert_close(packed[:, -1, : pooled.shape[-1]], pooled)
    assert torch.count_nonzero(sdxl.encode_prompts([""])) == 0  # force_zeros_for_empty_prompt
    # the UNet called as every fairtune caller calls it equals the call diffusers' pipeline makes
    size = sdxl.image_size
    time_ids = pipe._get_add_time_ids(
        (size, size), (0, 0), (size, size), dtype=embeds.dtype, text_encoder_projection_dim=pooled.shape[-1]
    )
    x = torch.randn(1, 4, sdxl.latent_size, sdxl.latent_size, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500])
    ours = sdxl.unet(x, t, encoder_hidden_states=packed).sample
    theirs = sdxl.unet(
        x, t, encoder_hidden_states=embeds, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}
    ).sample
    torch.testing.assert_close(ours, theirs)


def test_sdxl_trains_through_fit_and_its_adapter_loads_in_diffusers(digits_dir, tiny_sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 2,
            "default_root_dir": str(tmp_path / "run"),
            "enable_progress_bar": False,
            "enable_model_summary": False,
        },
        "model": {
            "backbone": {"kind": "sdxl", "pretrained": str(tiny_sdxl)},
            "lora": {"rank": 4},
            "optim": {"lr": 1e-2, "warmup_steps": 1},
        },
        "data": {
            "source": {"path": str(digits_dir / "table")},
            "attributes": {"color": ["red", "blue"]},
            "rebalance": {},
            "image_size": 16,
            "batch_size": 4,
            "samples_per_epoch": 8,
        },
    }
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(cfg))
    main(["fit", "--config", str(path)])
    adapter = Path(tmp_path / "run" / "adapter")

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl))
    pipe.set_progress_bar_config(disable=True)

    def image():
        g = torch.Generator().manual_seed(0)
        return pipe("a handwritten digit 3", num_inference_steps=2, output_type="pt", generator=g).images

    before = image()
    pipe.load_lora_weights(str(adapter))
    assert pipe.unet.peft_config
    after = image()
    assert after.shape == (1, 3, 16, 16)
    assert not torch.allclose(before, after)  # the run's adapter changes what the user's pipeline draws


def test_size_conditioning_is_the_size_of_the_images_trained_on_and_generated(digits_dir, tiny_sdxl):
    """SDXL's time ids (original and target size) are the training images' size, not the UNet's native
    size (a real SDXL trained at 512 must not be told 1024), and the generation size when sampling."""
    from conftest import COLORS, smoke_trainer

    from fairtune.data import AttributeDataModule, RebalanceConfig, SourceConfig
    from fairtune.models import LoraConfig
    from fairtune.train import DebiasModule, OptimConfig

    torch.manual_seed(0)
    module = DebiasModule(
        backbone=BackboneConfig(kind="sdxl", pretrained=str(tiny_sdxl)),
        lora=LoraConfig(rank=4),
        optim=OptimConfig(lr=1e-3, warmup_steps=1),
    )
    bb = module.backbone
    assert bb.image_size == 16  # the tiny SDXL's native size
    seen: list[torch.Tensor] = []

    def record(unet, args, kwargs):  # runs after fairtune's hook: sees the time ids it added
        seen.append(kwargs["added_cond_kwargs"]["time_ids"].clone())

    bb.unet.register_forward_pre_hook(record, with_kwargs=True)
    dm = AttributeDataModule(
        attributes=COLORS,
        source=SourceConfig(path=str(digits_dir / "table")),
        rebalance=RebalanceConfig(),
        concepts=["digit 0"],
        image_size=32,  # trained at twice the native size
        batch_size=2,
        samples_per_epoch=2,
    )
    smoke_trainer(max_steps=1).fit(module, dm)
    assert seen and all(t.tolist() == [[32, 32, 0, 0, 32, 32]] * 2 for t in seen)

    seen.clear()  # generation: the size of the images being generated
    bb.sample(["a handwritten digit 3"], seeds=[0], steps=1)
    assert seen and all(t.tolist() == [[16, 16, 0, 0, 16, 16]] * 2 for t in seen)  # (with the unconditional)
    seen.clear()
    bb.denoise(["a handwritten digit 3"], torch.randn(1, 4, 12, 12), steps=1)
    assert seen and all(t.tolist() == [[24, 24, 0, 0, 24, 24]] * 2 for t in seen)


def test_fair_diffusion_and_prompt_augmentation_run_on_sdxl(sdxl):
    prompts = ["a handwritten digit 3"] * 4
    seeds = [0, 1, 2, 3]
    target = {"red": 0.5, "blue": 0.5}
    base = sdxl.sample(prompts, seeds=seeds, steps=3)
    cfg = FairDiffusionConfig(edit_prompts={"red": "red", "blue": "blue"}, edit_warmup_steps=0)
    fair, classes = fair_diffusion_sample(sdxl, prompts, seeds=seeds, config=cfg, target=target, steps=3)
    assert fair.shape == base.shape == (4, 3, 16, 16) and set(classes) <= {"red", "blue"}
    assert not torch.allclose(fair, base)  # the edits steer the SDXL UNet
    augmented, drawn = augment_prompts(
        prompts, config=PromptAugmentationConfig(words={"red": "red", "blue": "blue"}), target=target
    )
    assert all(p == f"a {c} handwritten digit 3" for p, c in zip(augmented, drawn))
    aug = sdxl.sample(augmented, seeds=seeds, steps=3)
    assert aug.shape == base.shape and not torch.allclose(aug, base)
