"""Inference-time baselines: Fair Diffusion (SEGA) and prompt augmentation (DESIGN §5)."""

import logging
from collections import Counter

import pytest
import torch
from conftest import TEXT_ENCODER
from diffusers import DDIMScheduler, SemanticStableDiffusionPipeline

from fairtune.colored_digits import explicit_prompt, neutral_prompt
from fairtune.models import (
    ATTENTION,
    Backbone,
    BackboneConfig,
    FairDiffusionConfig,
    FairDiffusionPipeline,
    LoraConfig,
    PromptAugmentationConfig,
    SemanticGuidance,
    TinyUNetConfig,
    attach_lora,
    augment_prompts,
    draw_classes,
    fair_diffusion_sample,
    save_lora,
    unet_evals_per_image,
)

TINY = TinyUNetConfig(sample_size=8, block_out_channels=[8, 16], attention_head_dim=4, norm_num_groups=4)
RB = {"red": "red", "blue": "blue"}
PROMPTS = ["a photo of a nurse", "a photo of a doctor", "a cat", "a photo of a nurse"]
SEEDS = [3, 1, 4, 1]
STEPS = 6
# SEGA parameters active from step 2 of 6 (so the parity below is about an edit that acts)
EDIT = dict(
    edit_guidance_scale=4.0,
    edit_warmup_steps=2,
    edit_threshold=0.9,
    edit_momentum_scale=0.5,
    edit_mom_beta=0.6,
)


def _perturb_lora(unet, seed=0, scale=0.3):
    """Give the adapter's B matrices (zero at init) some weight, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture(scope="module")
def sd(tiny_sd):
    return Backbone.from_config(BackboneConfig(kind="sd", pretrained=str(tiny_sd)))


def _components(bb):
    return dict(
        vae=bb.vae,
        text_encoder=bb.text_encoder,
        tokenizer=bb.tokenizer,
        unet=bb.unet,
        scheduler=DDIMScheduler.from_config(bb.noise_scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@pytest.fixture(scope="module")
def reference(sd):
    """diffusers' deprecated SemanticStableDiffusionPipeline over the same components."""
    logging.getLogger("diffusers").setLevel(logging.ERROR)  # its deprecation notice
    pipe = SemanticStableDiffusionPipeline(**_components(sd))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe, bb, **kw):
    out = pipe(
        PROMPTS,
        num_inference_steps=STEPS,
        guidance_scale=3.0,
        latents=bb.initial_noise(SEEDS),
        output_type="pt",
        **kw,
    )
    return out.images


# ----------------------------------------------------------------------------- parity with diffusers
@pytest.mark.parametrize(
    "edit",
    [
        dict(editing_prompt=["red", "blue"], reverse_editing_direction=[False, True], **EDIT),
        # per-edit lists: staggered warm-ups (the partial, normalised path), cool-downs, weights
        dict(
            editing_prompt=["red", "blue", "a green cat"],
            reverse_editing_direction=[False, True, False],
            edit_guidance_scale=[4.0, 3.0, 6.0],
            edit_warmup_steps=[1, 3, 2],
            edit_cooldown_steps=[5, 6, 4],
            edit_threshold=[0.9, 0.95, 0.8],
            edit_momentum_scale=0.3,
            edit_mom_beta=0.5,
            edit_weights=[1.0, 2.0, 0.5],
        ),
    ],
    ids=["two-edits", "per-edit-lists"],
)
def test_pipeline_matches_diffusers_semantic_pipeline(sd, reference, edit):
    ours = FairDiffusionPipeline(**_components(sd))
    ours.set_progress_bar_config(disable=True)
    want = _run(reference, sd, **edit)
    got = _run(ours, sd, **edit)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    # the edit is active: without it the images differ by far more than the tolerance
    plain = _run(reference, sd)
    assert (want - plain).abs().max() > 5e-3
    torch.testing.assert_close(_run(ours, sd), plain, atol=1e-4, rtol=0)


def test_backbone_sampler_matches_diffusers_per_image_direction(sd, reference):
    """fair_diffusion_sample on an SD backbone: each image equals diffusers' with that image's class
    pushed toward and the other pushed away."""
    toward_red = _run(
        reference, sd, editing_prompt=["red", "blue"], reverse_editing_direction=[False, True], **EDIT
    )
    toward_blue = _run(
        reference, sd, editing_prompt=["red", "blue"], reverse_editing_direction=[True, False], **EDIT
    )
    assert (toward_red - toward_blue).abs().max() > 5e-3
    cfg = FairDiffusionConfig(edit_prompts=RB, assignment="stratified", seed=1, **EDIT)
    x, classes = fair_diffusion_sample(
        sd,
        PROMPTS,
        seeds=SEEDS,
        config=cfg,
        target={"red": 0.5, "blue": 0.5},
        steps=STEPS,
        guidance_scale=3.0,
    )
    assert set(classes) == {"red", "blue"}  # a mixed batch: per-image directions are exercised
    want = torch.stack([(toward_red if c == "red" else toward_blue)[i] for i, c in enumerate(classes)])
    torch.testing.assert_close(x, want, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- tiny backbone, LoRA
@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return Backbone.from_config(BackboneConfig(kind="tiny", text_encoder=TEXT_ENCODER, unet=TINY))


def test_tiny_backbone_images_depend_on_seed_and_class_only(tiny):
    cfg = FairDiffusionConfig(edit_prompts=RB, edit_warmup_steps=1)
    prompts = [neutral_prompt(d) for d in (1, 2, 3, 4, 5)]
    seeds = [10, 11, 12, 13, 14]
    tgt = {"red": 0.4, "blue": 0.6}
    x, classes = fair_diffusion_sample(tiny, prompts, seeds=seeds, config=cfg, target=tgt, steps=4)
    assert x.shape == (5, 3, 8, 8) and x.min() >= 0 and x.max() <= 1 and len(classes) == 5
    y, classes_y = fair_diffusion_sample(
        tiny, prompts, seeds=seeds, config=cfg, target=tgt, steps=4, batch_size=2
    )
    assert classes_y == classes
    torch.testing.assert_close(y, x, atol=1e-5, rtol=0)
    base = tiny.sample(prompts, seeds=seeds, steps=4)
    assert (x - base).abs().max() > 1e-3
    # fully warmed-up edits with zero scale reduce to the backbone's own sampler
    off = FairDiffusionConfig(edit_prompts=RB, edit_guidance_scale=0.0, edit_warmup_steps=0)
    z, _ = fair_diffusion_sample(tiny, prompts, seeds=seeds, config=off, target=tgt, steps=4)
    torch.testing.assert_close(z, base, atol=1e-5, rtol=0)


def test_runs_on_top_of_a_lora_adapter():
    torch.manual_seed(0)
    bb = Backbone.from_config(BackboneConfig(kind="tiny", text_encoder=TEXT_ENCODER, unet=TINY))
    cfg = FairDiffusionConfig(edit_prompts=RB, edit_warmup_steps=1)
    kw = dict(seeds=[0, 1, 2], config=cfg, target={"red": 1.0, "blue": 0.0}, steps=4)
    prompts = [neutral_prompt(7)] * 3
    before, _ = fair_diffusion_sample(bb, prompts, **kw)
    attach_lora(bb.unet, LoraConfig(rank=4, target_modules=ATTENTION))
    _perturb_lora(bb.unet)
    after, _ = fair_diffusion_sample(bb, prompts, **kw)
    assert (after - before).abs().max() > 1e-3
    bb.unet.disable_adapters()
    torch.testing.assert_close(fair_diffusion_sample(bb, prompts, **kw)[0], before, atol=1e-5, rtol=0)


def test_pipeline_load_lora_weights_equals_backbone_with_adapter(tiny_sd, tmp_path):
    trained = Backbone.from_config(BackboneConfig(kind="sd", pretrained=str(tiny_sd)))
    attach_lora(trained.unet, LoraConfig(rank=4, alpha=8))
    _perturb_lora(trained.unet, seed=2)
    save_lora(trained.unet, tmp_path / "adapter")

    pipe = FairDiffusionPipeline.from_pretrained(str(tiny_sd), safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    edit = dict(editing_prompt=["red", "blue"], reverse_editing_direction=[False, True], **EDIT)
    before = _run(pipe, trained, **edit)
    pipe.load_lora_weights(str(tmp_path / "adapter"))
    after = _run(pipe, trained, **edit)
    assert (after - before).abs().max() > 5e-3
    cfg = FairDiffusionConfig(edit_prompts=RB, **EDIT)
    x, _ = fair_diffusion_sample(
        trained,
        PROMPTS,
        seeds=SEEDS,
        config=cfg,
        target={"red": 1.0, "blue": 0.0},
        steps=STEPS,
        guidance_scale=3.0,
    )
    torch.testing.assert_close(x, after, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- the shipped model
@pytest.mark.slow  # 128 guided images on the shipped model
def test_fair_diffusion_turns_blue_digit_7_red_on_the_shipped_model():
    from fairtune.colored_digits import HueJudge

    bb = Backbone.from_config(BackboneConfig(kind="tiny", pretrained="colored-digits-16"))
    judge = HueJudge.for_colors(["red", "blue"])
    n, steps = 32, 10
    prompts, seeds = [neutral_prompt(7)] * n, list(range(n))
    base = (judge.predict(bb.sample(prompts, seeds=seeds, steps=steps)) == 0).float().mean().item()
    # In 16x16 pixel space the colour is settled early and ink covers far more than 5% of the pixels:
    # the paper's warm-up 5 and threshold 0.95 moved it little here (0.03 -> 0.06 red at 10 steps).
    cfg = FairDiffusionConfig(edit_prompts=RB, edit_warmup_steps=2, edit_threshold=0.5)
    x, classes = fair_diffusion_sample(
        bb, prompts, seeds=seeds, config=cfg, target={"red": 1.0, "blue": 0.0}, steps=steps
    )
    assert classes == ["red"] * n
    red = (judge.predict(x) == 0).float().mean().item()
    assert base <= 0.25, base  # the base model draws 7s mostly blue
    assert red >= base + 0.4, (base, red)


# ----------------------------------------------------------------------------- class draw
def test_stratified_draw_hits_the_target_per_prompt():
    keys = ["a"] * 10 + ["b"] * 20 + ["a"] * 10
    got = draw_classes(keys, target={"red": 0.3, "blue": 0.7}, assignment="stratified", seed=5)
    assert Counter(c for k, c in zip(keys, got) if k == "a") == {"red": 6, "blue": 14}
    assert Counter(c for k, c in zip(keys, got) if k == "b") == {"red": 6, "blue": 14}
    # a group's draw does not depend on the groups drawn with it
    alone = draw_classes(["b"] * 20, target={"red": 0.3, "blue": 0.7}, assignment="stratified", seed=5)
    assert [c for k, c in zip(keys, got) if k == "b"] == alone
    # non-integral counts: off by at most one, ties not always won by the first class
    odd = [draw_classes(7, target={"x": 0.5, "y": 0.5}, assignment="stratified", seed=s) for s in range(20)]
    assert all(abs(d.count("x") - 3.5) == 0.5 for d in odd)
    assert {d.count("x") for d in odd} == {3, 4}


def test_random_draw_is_seeded_and_follows_the_target():
    tgt = {"red": 0.2, "blue": 0.5, "green": 0.3}
    a = draw_classes(3000, target=tgt, seed=1)
    assert a == draw_classes(3000, target=tgt, seed=1)
    assert a != draw_classes(3000, target=tgt, seed=2)
    share = {k: a.count(k) / len(a) for k in tgt}
    assert all(abs(share[k] - p) < 0.04 for k, p in tgt.items()), share
    assert draw_classes(50, target={"red": 0.0, "blue": 1.0}, seed=0) == ["blue"] * 50


@pytest.mark.parametrize(
    "target, match",
    [
        ({}, "non-empty"),
        ({"red": 0.7, "blue": 0.7}, "sum to 1"),
        ({"red": 1.5, "blue": -0.5}, ">= 0"),
        ({"red": float("nan"), "blue": 1.0}, "finite"),
    ],
)
def test_draw_rejects_bad_targets(target, match):
    with pytest.raises(ValueError, match=match):
        draw_classes(4, target=target)


def test_draw_rejects_bad_assignment_and_counts():
    with pytest.raises(ValueError, match="assignment"):
        draw_classes(4, target={"a": 1.0}, assignment="balanced")
    with pytest.raises(ValueError, match=">= 0"):
        draw_classes(-1, target={"a": 1.0})


# ----------------------------------------------------------------------------- prompt augmentation
def test_augmented_digit_prompt_is_the_explicit_caption():
    cfg = PromptAugmentationConfig(words=RB, assignment="stratified")
    prompts = [neutral_prompt(d) for d in range(10) for _ in range(4)]
    out, classes = augment_prompts(prompts, config=cfg, target={"red": 0.5, "blue": 0.5})
    assert all(o == explicit_prompt(int(p[-1]), c) for p, o, c in zip(prompts, out, classes))
    for d in range(10):
        assert Counter(c for p, c in zip(prompts, classes) if p == neutral_prompt(d)) == {"red": 2, "blue": 2}
    # both baselines give the same image the same class
    fd = FairDiffusionConfig(edit_prompts=RB, assignment="stratified")
    assert (
        draw_classes(prompts, target={"red": 0.5, "blue": 0.5}, assignment=fd.assignment, seed=fd.seed)
        == classes
    )


def test_augmentation_rule_on_other_prompts():
    cfg = PromptAugmentationConfig(words={"f": "female", "o": "old"})
    assert cfg.apply("a photo of a doctor", "female") == "a female photo of a doctor"
    assert cfg.apply("An apple", "red") == "A red apple"
    assert cfg.apply("a photo", "old") == "an old photo"
    assert cfg.apply("the  nurse", "male") == "the male nurse"
    assert cfg.apply("doctors at work", "female") == "female doctors at work"
    assert cfg.apply("another doctor", "old") == "old another doctor"  # "an" only as a whole word
    custom = PromptAugmentationConfig(words=RB, template="{article} {rest}, {word}")
    assert custom.apply("a handwritten digit 3", "red") == "a handwritten digit 3, red"


def test_augmentation_rejects_bad_inputs():
    with pytest.raises(ValueError, match="must equal the words classes"):
        augment_prompts(["a cat"], config=PromptAugmentationConfig(words=RB), target={"red": 1.0})
    with pytest.raises(ValueError, match="non-empty strings"):
        augment_prompts([""], config=PromptAugmentationConfig(words=RB), target={"red": 1.0, "blue": 0.0})
    with pytest.raises(ValueError, match="template"):
        PromptAugmentationConfig(words=RB, template="{word} {rest} {color}")
    with pytest.raises(ValueError, match="template must contain"):
        PromptAugmentationConfig(words=RB, template="{article} {rest}")
    with pytest.raises(ValueError, match="non-empty"):
        PromptAugmentationConfig(words={"red": ""})


# ----------------------------------------------------------------------------- validation, cost
def test_fair_diffusion_rejects_bad_inputs(tiny):
    cfg = FairDiffusionConfig(edit_prompts=RB)
    ok = dict(config=cfg, target={"red": 0.5, "blue": 0.5}, steps=2)
    with pytest.raises(ValueError, match="2 prompts but 1 seeds"):
        fair_diffusion_sample(tiny, ["a cat", "a dog"], seeds=[0], **ok)
    with pytest.raises(ValueError, match="non-empty strings"):
        fair_diffusion_sample(tiny, ["a cat", " "], seeds=[0, 1], **ok)
    with pytest.raises(ValueError, match=r"missing: \['blue'\], unknown: \['green'\]"):
        fair_diffusion_sample(
            tiny, ["a cat"], seeds=[0], config=cfg, target={"red": 0.5, "green": 0.5}, steps=2
        )
    with pytest.raises(ValueError, match="sum to 1"):
        fair_diffusion_sample(
            tiny, ["a cat"], seeds=[0], config=cfg, target={"red": 0.5, "blue": 0.4}, steps=2
        )
    with pytest.raises(ValueError, match="edit_prompts"):
        FairDiffusionConfig(edit_prompts={"red": "", "blue": "blue"})
    with pytest.raises(ValueError, match="edit_weights has 1 values for 2"):
        FairDiffusionConfig(edit_prompts=RB, edit_weights=[1.0])
    with pytest.raises(ValueError, match="edit_threshold"):
        FairDiffusionConfig(edit_prompts=RB, edit_threshold=1.5)
    with pytest.raises(ValueError, match="assignment"):
        FairDiffusionConfig(edit_prompts=RB, assignment="uniform")
    with pytest.raises(ValueError, match="edit_warmup_steps has 3 values but there are 2"):
        SemanticGuidance(2, guidance_scale=2.0, edit_warmup_steps=[1, 2, 3])
    with pytest.raises(ValueError, match="reverse"):
        SemanticGuidance(2, guidance_scale=2.0, reverse=[True, False, True])


def test_unet_evals_per_image():
    assert unet_evals_per_image("base", steps=25) == 50
    assert unet_evals_per_image("adapter", steps=25) == 50
    assert unet_evals_per_image("prompt_augmentation", steps=25) == 50
    assert unet_evals_per_image("fair_diffusion", steps=25, n_edits=2) == 100
    with pytest.raises(ValueError, match="method must be one of"):
        unet_evals_per_image("sega", steps=25)
    with pytest.raises(ValueError, match="n_edits >= 1"):
        unet_evals_per_image("fair_diffusion", steps=25)


def test_sampler_calls_the_unet_once_per_step_on_all_edits(tiny):
    calls = []
    h = tiny.unet.register_forward_pre_hook(
        lambda m, args, kw: calls.append(args[0].shape[0]), with_kwargs=True
    )
    try:
        cfg = FairDiffusionConfig(edit_prompts={"red": "red", "blue": "blue", "green": "green"})
        fair_diffusion_sample(
            tiny,
            ["a cat"] * 3,
            seeds=[0, 1, 2],
            config=cfg,
            target={"red": 0.2, "blue": 0.3, "green": 0.5},
            steps=3,
        )
    finally:
        h.remove()
    assert calls == [(2 + 3) * 3] * 3
    assert sum(calls) / 3 == unet_evals_per_image("fair_diffusion", steps=3, n_edits=3)
