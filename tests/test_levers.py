import numpy as np
import pytest
import torch
from conftest import COLORS, TEXT_ENCODER, smoke_trainer

from fairtune.data import AttributeSpec, Target, TargetConfig
from fairtune.models import (
    AdversaryConfig,
    AttributeHead,
    BackboneConfig,
    ClassifierConfig,
    LoraConfig,
    MidBlockFeatures,
    TinyUNetConfig,
    adversary_losses,
    grad_reverse,
)
from fairtune.train import DebiasModule, FairnessConfig, alignment_loss, ot_assignment

TINY = TinyUNetConfig(sample_size=16, block_out_channels=[8, 16], attention_head_dim=4, norm_num_groups=4)
SPEC = AttributeSpec({"color": ["red", "blue"]})


def test_gradient_reversal_sign_and_scale():
    x = torch.randn(5, 3, requires_grad=True)
    w = torch.randn(3)
    (grad_reverse(x, 0.7) @ w).sum().backward()
    torch.testing.assert_close(x.grad, -0.7 * w.expand(5, 3))
    y = grad_reverse(x, 0.7)
    torch.testing.assert_close(y, x)  # identity forward


def test_reversal_hands_the_features_minus_lambda_times_the_head_gradient():
    torch.manual_seed(0)
    head = AttributeHead(6, 2, hidden=4)
    f = torch.randn(8, 6, requires_grad=True)
    groups = torch.tensor([0, 1, 0, 1, 0, 1, -1, 0])
    q = torch.full((8, 2), 0.5)
    out = adversary_losses(head, f, groups, q, loss="reversal", lam=0.3)
    out["total"].backward()
    # reference: plain cross-entropy gradient w.r.t. the features, on the labelled rows only
    f2 = f.detach().clone().requires_grad_(True)
    known = groups >= 0
    torch.nn.functional.cross_entropy(head(f2[known]), groups[known]).backward()
    torch.testing.assert_close(f.grad, -0.3 * f2.grad)
    assert f.grad[6].abs().sum() == 0  # the unknown-label row trains nothing


def test_confusion_is_bounded_and_pulls_toward_the_target():
    torch.manual_seed(0)
    head = AttributeHead(4, 2, hidden=8)
    f = torch.randn(16, 4, requires_grad=True)
    groups = torch.randint(0, 2, (16,))
    q = torch.tensor([[0.5, 0.5]]).expand(16, 2)
    out = adversary_losses(head, f, groups, q, loss="confusion", lam=1.0)
    assert out["lora_loss"] >= 0
    out["total"].backward()
    # the head's weights get only the cross-entropy gradient, the features only the confusion one
    head2 = AttributeHead(4, 2, hidden=8)
    head2.load_state_dict(head.state_dict())
    torch.nn.functional.cross_entropy(head2(f.detach()), groups).backward()
    for p, p2 in zip(head.parameters(), head2.parameters()):
        torch.testing.assert_close(p.grad, p2.grad)
    # a gradient step on the features lowers the KL to the target
    with torch.no_grad():
        f_new = f - 0.5 * f.grad
    kl_after = adversary_losses(head, f_new, groups, q, loss="confusion", lam=1.0)["lora_loss"]
    assert kl_after < out["lora_loss"]


def test_ot_assignment_on_a_hand_made_batch():
    # 4 samples, target 50/50: the two most-red go to red, the two most-blue to blue
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4]])
    assert ot_assignment(probs, np.array([0.5, 0.5])).tolist() == [0, 0, 1, 1]
    # 30/70 of 10 samples: exactly 3 red, the three reddest
    probs = np.linspace([0.95, 0.05], [0.55, 0.45], 10)
    got = ot_assignment(probs, np.array([0.3, 0.7]))
    assert got.tolist() == [0, 0, 0] + [1] * 7


def test_ot_loss_skips_settled_samples_and_kl_matches_formula():
    logits = torch.tensor([[4.0, 0.0], [3.0, 0.0], [2.0, 0.0], [1.0, 0.0]], requires_grad=True)
    probs = logits.softmax(-1)
    loss = alignment_loss(probs, logits, torch.tensor([0.5, 0.5]), method="ot", threshold=0.8)
    loss.backward()
    # samples 0, 1 are assigned red and confidently red: no gradient; 2, 3 are pushed to blue
    assert logits.grad[0].abs().sum() == 0 and logits.grad[1].abs().sum() == 0
    assert logits.grad[2, 1] < 0 and logits.grad[3, 1] < 0
    p = torch.tensor([[0.8, 0.2], [0.6, 0.4]])
    kl = alignment_loss(p, p.log(), torch.tensor([0.5, 0.5]), method="kl")
    mean = torch.tensor([0.7, 0.3])
    torch.testing.assert_close(kl, (mean * (mean / 0.5).log()).sum())


@pytest.fixture(scope="module")
def classifier_file(tmp_path_factory):
    from safetensors.torch import save_file

    from fairtune.colored_digits import SmallCNN

    torch.manual_seed(0)
    m = SmallCNN(2, 4, 8)
    path = tmp_path_factory.mktemp("clf") / "c.safetensors"
    save_file(m.state_dict(), str(path))
    return ClassifierConfig(
        module="fairtune.colored_digits.SmallCNN",
        init_args={"num_classes": 2, "width": 4, "feature_dim": 8},
        weights=str(path),
    )


def _module(**levers):
    torch.manual_seed(0)
    m = DebiasModule(
        backbone=BackboneConfig(kind="tiny", text_encoder=TEXT_ENCODER, unet=TINY),
        lora=LoraConfig(rank=4),
        **levers,
    )
    m.attach_target(Target(TargetConfig(), SPEC))
    return m


def _batch(n=8):
    g = torch.Generator().manual_seed(0)
    return {
        "pixels": torch.rand(n, 3, 16, 16, generator=g) * 2 - 1,
        "prompts": ["a handwritten digit 1"] * n,
        "concepts": ["digit 1"] * n,
        "groups": torch.tensor([0, 1] * (n // 2)),
    }


def _count_unet_calls(module):
    calls = []
    h = module.backbone.unet.register_forward_pre_hook(lambda *a, **k: calls.append(1))
    return calls, h


def test_preservation_term_is_zero_at_initialisation(classifier_file):
    m = _module(fairness=FairnessConfig(classifier=classifier_file, samples_per_concept=4, ddim_steps=2))
    out = m.fairness_loss(m.backbone, ["digit 1", "digit 2"], torch.full((2, 2), 0.5), torch.Generator())
    assert out["preserve"].item() == 0.0  # LoRA B is zero: adapter-on equals adapter-off
    assert out["share"].shape == (2, 2)
    assert out["align"].requires_grad


@pytest.mark.parametrize("detach", [True, False])
def test_every_ddim_step_of_the_short_path_gets_gradient(classifier_file, detach):
    # The attribute is decided at high noise: the first step's output must be on the gradient path,
    # also when the UNet reads detached inputs (adjusted direct fine-tuning).
    cfg = FairnessConfig(
        classifier=classifier_file, samples_per_concept=4, ddim_steps=3, detach_inputs=detach, alignment="kl"
    )
    m = _module(fairness=cfg)
    outputs = []

    def keep(module, args, kwargs, output):
        if output.sample.requires_grad:  # not the no-grad reference pass of the preservation term
            output.sample.retain_grad()
            outputs.append(output.sample)

    h = m.backbone.unet.register_forward_hook(keep, with_kwargs=True)
    out = m.fairness_loss(
        m.backbone, ["digit 1", "digit 2"], torch.tensor([[1.0, 0.0]] * 2), torch.Generator()
    )
    h.remove()
    assert len(outputs) == 3
    (out["align"] + out["share"].sum() * 0).backward()
    for i, o in enumerate(outputs):
        assert o.grad is not None and o.grad.abs().sum() > 0, f"step {i} got no gradient"


@pytest.mark.parametrize("steps", [3, 6])
def test_short_path_matches_the_sampler(classifier_file, steps):
    # The differentiable path must produce the images the judged sampler produces from the same noise
    # (same timesteps, same x0 clipping), or the loss trains on images nobody samples.
    from fairtune.train import FairnessLoss

    m = _module()
    with torch.no_grad():
        for p in m.trained_params():  # move off the zero-initialised adapter
            p.add_(torch.randn_like(p) * 0.05)
    loss = FairnessLoss(FairnessConfig(classifier=classifier_file, ddim_steps=steps, preservation_weight=0))
    prompts = ["a handwritten digit 1", "a handwritten digit 7"]
    noise = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = m.backbone.to_pixels(loss.generate(m.backbone, prompts, noise))
    ref = m.backbone.denoise(prompts, noise, steps=steps, guidance_scale=2.0)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def test_disabled_levers_add_no_computation(classifier_file):
    naive = _module()
    assert naive.head is None and naive.fairness_loss is None and naive._features is None
    assert not naive.backbone.unet.mid_block._forward_hooks
    calls, h = _count_unet_calls(naive)
    naive.diffusion_loss(_batch(), torch.Generator().manual_seed(0))
    assert len(calls) == 1
    h.remove()

    adv = _module(adversary=AdversaryConfig())
    assert len(adv.backbone.unet.mid_block._forward_hooks) == 1
    calls, h = _count_unet_calls(adv)
    loss, aux = adv.diffusion_loss(_batch(), torch.Generator().manual_seed(0))
    adv.adversary_step(_batch(), aux)
    assert len(calls) == 1  # the conditional features come from the same forward pass
    h.remove()

    induced = _module(adversary=AdversaryConfig(features="prompt_induced"))
    calls, h = _count_unet_calls(induced)
    loss, aux = induced.diffusion_loss(_batch(), torch.Generator().manual_seed(0))
    induced.adversary_step(_batch(), aux)
    assert len(calls) == 2  # one extra pass, stopped after the mid block
    h.remove()

    cfg = FairnessConfig(
        classifier=classifier_file,
        start_step=0,
        every_k_steps=3,
        ddim_steps=2,
        samples_per_concept=2,
        concepts=["digit 1"],
    )
    assert not cfg.active(1) and cfg.active(3)
    assert FairnessConfig(start_step=10).lam(5) == 0.0


def test_mid_block_hook_works_on_stable_diffusion_unet(tiny_sd):
    from fairtune.models import Backbone

    bb = Backbone.from_config(BackboneConfig(kind="sd", pretrained=str(tiny_sd)))
    feats = MidBlockFeatures(bb.unet)
    ctx = bb.encode_prompts(["a", "b"])
    bb.unet(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), encoder_hidden_states=ctx)
    assert feats.pop().shape == (2, bb.unet.config.block_out_channels[-1])
    part = feats.run_until_mid(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), encoder_hidden_states=ctx)
    assert part.shape == (2, 16)
    feats.remove()
    assert not bb.unet.mid_block._forward_hooks


@pytest.mark.parametrize("kind", ["tiny", "sd"])
def test_all_levers_train_on_both_backbones(kind, classifier_file, digits_dir, tiny_sd):

    from fairtune.data import AttributeDataModule, RebalanceConfig, SourceConfig

    torch.manual_seed(0)
    backbone = (
        BackboneConfig(kind="tiny", text_encoder=TEXT_ENCODER, unet=TINY)
        if kind == "tiny"
        else BackboneConfig(kind="sd", pretrained=str(tiny_sd))
    )
    module = DebiasModule(
        backbone=backbone,
        lora=LoraConfig(rank=4),
        adversary=AdversaryConfig(warmup_steps=0, lr=1e-2),
        fairness=FairnessConfig(
            classifier=classifier_file,
            start_step=0,
            ramp_steps=0,
            every_k_steps=2,
            samples_per_concept=4,
            concepts_per_step=2,
            ddim_steps=2,
        ),
    )
    dm = AttributeDataModule(
        attributes=COLORS,
        source=SourceConfig(path=str(digits_dir / "table")),
        rebalance=RebalanceConfig(),
        concepts=["digit 0", "digit 1"],
        batch_size=8,
        samples_per_epoch=32,
    )
    trainer = smoke_trainer(max_steps=3)
    trainer.fit(module, dm)
    assert module.head is not None
    assert module.fairness.concepts == ["digit 0", "digit 1"]  # taken from the data module
    logged = trainer.logged_metrics
    for key in (
        "adversary/head_loss",
        "adversary/accuracy",
        "adversary/majority_rate",
        "fairness/align",
        "fairness/preserve",
    ):
        assert key in logged, key
    assert torch.isfinite(logged["train/loss"])
    assert logged["fairness/preserve"] >= 0


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_ddim_step_recovers_x0_for_both_prediction_types(kind):
    from diffusers import DDPMScheduler

    from fairtune.train._fairness import _ddim_step

    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    sched = DDPMScheduler(prediction_type=kind, clip_sample=False)
    t = 500
    a = sched.alphas_cumprod[t]
    xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
    out = eps if kind == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0
    x_prev, got = _ddim_step(sched, out, t, 250, xt)
    torch.testing.assert_close(got, x0, atol=1e-4, rtol=1e-4)
    a_prev = sched.alphas_cumprod[250]
    torch.testing.assert_close(x_prev, a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps, atol=1e-4, rtol=1e-4)


def test_adversary_zero_loss_still_touches_the_head():
    head = AttributeHead(4, 2, hidden=4)
    f = torch.randn(3, 4, requires_grad=True)
    out = adversary_losses(
        head, f, torch.tensor([-1, -1, -1]), torch.full((3, 2), 0.5), loss="confusion", lam=1.0
    )
    out["total"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() == 0 for p in head.parameters())


def test_extra_templates_join_the_pool_and_are_checked(classifier_file):
    from fairtune.train import FairnessLoss

    cfg = FairnessConfig(
        classifier=classifier_file,
        concepts=["digit 1", "digit 2"],
        prompt="a handwritten {concept}",
        extra_templates=["the {concept}, drawn by hand"],
    )
    assert FairnessLoss(cfg).pool() == [
        ("digit 1", "a handwritten digit 1"),
        ("digit 2", "a handwritten digit 2"),
        ("digit 1", "the digit 1, drawn by hand"),
        ("digit 2", "the digit 2, drawn by hand"),
    ]
    with pytest.raises(ValueError, match=r"extra_templates\[0\]"):
        FairnessLoss(FairnessConfig(classifier=classifier_file, extra_templates=["no field"]))
