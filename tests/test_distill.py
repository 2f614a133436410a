"""Lever 1's data-free form: the base model's explicit generations distilled into the neutral prompt."""

import copy

import pytest
import torch
from conftest import COLORS, TEXT_ENCODER

from fairtune.data import AttributeSpec, Target, TargetConfig
from fairtune.models import LoraConfig, attach_lora
from fairtune.train import DistillConfig, DistillLoss

CONCEPTS = ["digit 0", "digit 7"]


def _cfg(**over) -> DistillConfig:
    return DistillConfig(
        **{
            "concepts": list(CONCEPTS),
            "prompt": "a handwritten {concept}",
            "explicit": "a {cls} handwritten {concept}",
            "images_per_class": 6,
            "sampling_steps": 4,
            "batch_size": 8,
            **over,
        }
    )


@pytest.fixture(scope="module")
def lora_backbone(backbone):
    bb = copy.deepcopy(backbone)
    attach_lora(bb.unet, LoraConfig(rank=4))
    return bb


def _target(**props) -> Target:
    return Target(TargetConfig(attributes=["color"], **props), AttributeSpec(COLORS))


def test_bank_holds_the_base_models_explicit_inks_and_depends_on_the_seed_alone(lora_backbone):
    target = _target()
    a, b, c = DistillLoss(_cfg(), seed=0), DistillLoss(_cfg(), seed=0), DistillLoss(_cfg(), seed=1)
    for loss in (a, b, c):
        loss.build_bank(lora_backbone, target.groups)
    assert a.bank.shape == (2, 2, 6, 3, 16, 16)
    assert torch.equal(a.bank, b.bank)
    assert not torch.equal(a.bank, c.bank)
    # "a red handwritten digit 7" (a digit the base model draws blue 92% of the time) comes out red:
    # ink pixels (darker than the paper) have more red than blue in the red bank, and the reverse.
    for concept in range(2):
        red, blue = a.bank[concept, 0], a.bank[concept, 1]
        assert (red[:, 0] - red[:, 2]).mean() > 0.05
        assert (blue[:, 2] - blue[:, 0]).mean() > 0.05


def test_classes_are_drawn_in_the_target_mix_per_concept():
    target = _target(
        proportions={"red": 0.3, "blue": 0.7}, per_concept={"digit 7": {"red": 1.0, "blue": 0.0}}
    )
    loss = DistillLoss(_cfg(), seed=0)
    ci, gi, ii = loss.draw(target, 8000, torch.Generator().manual_seed(0))
    red_share_0 = (gi[ci == 0] == 0).float().mean().item()
    assert abs(red_share_0 - 0.3) < 0.03
    assert (gi[ci == 1] == 0).all()
    assert ii.min() >= 0 and ii.max() < 6


def test_at_initialisation_only_the_neutral_prompt_is_pulled(lora_backbone):
    """LoRA starts at zero: the held rows (explicit and empty prompts) equal the teacher exactly,
    while the neutral prompt differs from the explicit prediction it is pulled toward."""
    loss = DistillLoss(_cfg(), seed=0)
    out = loss(lora_backbone, _target(), torch.Generator().manual_seed(0))
    assert out["hold"].item() < 1e-10
    assert out["distill"].item() > 1e-6


def test_training_on_the_loss_moves_the_neutral_prompt_toward_the_explicit_one(lora_backbone):
    bb = copy.deepcopy(lora_backbone)
    loss = DistillLoss(_cfg(hold_explicit=False, hold_uncond=False), seed=0)
    target = _target()
    params = [p for p in bb.unet.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=2e-4)  # the loss is ~1e-4: Adam's step is lr whatever its scale
    first = None
    for _ in range(30):
        out = loss(bb, target, torch.Generator().manual_seed(100))  # the same batch: it must fit it
        first = out["distill"].item() if first is None else first
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert out["distill"].item() < 0.7 * first


def _blue_drift(bb, loss) -> float:
    """How far the adapter moved the prediction for "a blue handwritten digit ..." on blue bank images."""
    from fairtune.train._distill import _adapters_disabled

    x0 = loss.bank[:, 1, :4].reshape(-1, *loss.bank.shape[3:])
    t = torch.full((len(x0),), 800)
    x_t = bb.noise_scheduler.add_noise(
        x0, torch.randn(x0.shape, generator=torch.Generator().manual_seed(1)), t
    )
    ctx = bb.encode_prompts([f"a blue handwritten {c}" for c in CONCEPTS for _ in range(4)])
    with torch.no_grad():
        on = bb.unet(x_t, t, encoder_hidden_states=ctx).sample
        with _adapters_disabled(bb.unet):
            off = bb.unet(x_t, t, encoder_hidden_states=ctx).sample
    return (on - off).pow(2).mean().item()


def test_an_adapter_trained_toward_one_class_holds_the_others_prompts_with_hold_classes_all(lora_backbone):
    """Toward 100% red, the drawn explicit prompts are all red ones: with ``hold_classes: drawn`` nothing
    holds "a blue ...", with ``all`` it is held on blue images and moves far less."""
    target = _target(proportions={"red": 1.0, "blue": 0.0})
    drift = {}
    for mode in ("drawn", "all"):
        bb = copy.deepcopy(lora_backbone)
        loss = DistillLoss(
            _cfg(hold_explicit=True, hold_uncond=False, hold_classes=mode, timesteps=(600, 1000))
        )
        params = [p for p in bb.unet.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=1e-3)
        for step in range(15):
            out = loss(bb, target, torch.Generator().manual_seed(step))
            opt.zero_grad()
            out["loss"].backward()
            opt.step()
        drift[mode] = _blue_drift(bb, loss)
    assert drift["all"] < 0.5 * drift["drawn"], drift


@pytest.mark.parametrize(
    ("over", "key"),
    [
        ({"prompt": "a handwritten digit"}, "model.distill.prompt"),
        ({"extra_templates": ["no field"]}, "model.distill.extra_templates[0]"),
        ({"explicit": "a {concept}"}, "model.distill.explicit"),
        ({"batch_size": 0}, "model.distill.batch_size"),
        ({"timesteps": (500, 100)}, "model.distill.timesteps"),
        ({"weight": -1.0}, "model.distill.weight"),
        ({"uncond_share": 1.0, "hold_uncond": False}, "model.distill.uncond_share"),
        ({"uncond_share": 0.1}, "model.distill.uncond_share"),
    ],
)
def test_bad_settings_name_their_key(over, key):
    with pytest.raises(ValueError, match=key.replace("[", r"\[").replace("]", r"\]")):
        DistillLoss(_cfg(**over))


def test_joint_groups_are_written_word_by_word():
    cfg = _cfg(words={"red": "crimson"})
    assert cfg.group_words("red+dark") == "crimson dark"


def test_the_data_loss_trains_only_its_timesteps():
    """`model.data_timesteps: [0, 600]` leaves the high-noise steps to the distillation: every
    timestep the data loss draws lies in the range, and the default still draws over all of them."""
    from fairtune.models import BackboneConfig, TinyUNetConfig
    from fairtune.train import DebiasModule

    unet = TinyUNetConfig(sample_size=16, block_out_channels=[8, 16], attention_head_dim=4, norm_num_groups=4)
    tiny = BackboneConfig(kind="tiny", text_encoder=TEXT_ENCODER, unet=unet)
    batch = {"pixels": torch.rand(64, 3, 16, 16), "prompts": ["a handwritten digit 1"] * 64}
    split = DebiasModule(backbone=tiny, lora=LoraConfig(rank=2), data_timesteps=(0, 600))
    _, aux = split.diffusion_loss(batch, torch.Generator().manual_seed(0))
    assert int(aux["t"].max()) < 600
    full = DebiasModule(backbone=tiny, lora=LoraConfig(rank=2))
    _, aux = full.diffusion_loss(batch, torch.Generator().manual_seed(0))
    assert int(aux["t"].max()) >= 600
    with pytest.raises(ValueError, match="model.data_timesteps"):
        DebiasModule(backbone=tiny, lora=LoraConfig(rank=2), data_timesteps=(600, 600))


class RedVsBlue(torch.nn.Module):
    """A user's own attribute classifier (any ``nn.Module`` class loads): the chroma-weighted mean of
    red minus blue, as two logits (red, blue)."""

    def __init__(self, sharpness: float = 1.0) -> None:
        super().__init__()
        self.sharpness = torch.nn.Parameter(torch.tensor(float(sharpness)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = x.max(1).values - x.min(1).values
        score = ((x[:, 0] - x[:, 2]) * w).sum((1, 2)) / w.sum((1, 2)).clamp_min(1e-6)
        return torch.stack([score, -score], 1) * self.sharpness


def test_feedback_measures_the_adapters_own_mix_and_moves_the_drawn_mix_against_the_gap(
    lora_backbone, tmp_path
):
    """Closing the loop: at LoRA's zero start the adapter is the base model (digit 0 mostly red, digit 7
    mostly blue); one measurement moves each concept's drawn mix toward its minority ink, by the gap,
    within max_offset; the state survives a checkpoint round trip and the next measurement uses fresh
    seeds."""
    from safetensors.torch import save_file

    from fairtune.models import ClassifierConfig
    from fairtune.train import DistillFeedback

    weights = tmp_path / "clf.safetensors"
    save_file(RedVsBlue(50.0).state_dict(), str(weights))
    clf = ClassifierConfig(module="test_distill.RedVsBlue", init_args={}, weights=str(weights))
    fb = DistillFeedback(classifier=clf, n_per_concept=16, steps=4, gain=1.0, max_offset=0.3)
    loss = DistillLoss(_cfg(feedback=fb), seed=0)
    target = _target()
    assert torch.allclose(loss.mix(target), torch.full((2, 2), 0.5))
    shares = loss.feedback(lora_backbone, target, step=100)
    red0, red7 = shares["digit 0"][0], shares["digit 7"][0]
    assert red0 > 0.6 > 0.4 > red7  # the base model's skew, as the classifier sees it
    mix = loss.mix(target)
    assert torch.allclose(mix.sum(1), torch.ones(2))
    # digit 0 now drawn bluer, digit 7 redder, each by its gap (bounded by max_offset)
    assert mix[0, 0] == pytest.approx(max(0.5 - (red0 - 0.5), 0.2), abs=1e-5)
    assert mix[1, 0] == pytest.approx(min(0.5 + (0.5 - red7), 0.8), abs=1e-5)
    state = loss.state_dict()
    resumed = DistillLoss(_cfg(feedback=fb), seed=0)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.mix(target), mix) and resumed.measurements == 1
    # the adapter has not moved, so the gap persists and the offsets keep growing, up to max_offset
    loss.feedback(lora_backbone, target, step=200)
    assert loss.measurements == 2
    assert 0.2 - 1e-5 <= loss.mix(target)[0, 0] <= mix[0, 0]


def test_feedback_is_due_from_its_start_step_every_n_steps():
    from fairtune.train import DistillFeedback

    fb = DistillFeedback(start_step=100, every_n_steps=50)
    assert [s for s in range(0, 260) if fb.due(s)] == [100, 150, 200, 250]
    with pytest.raises(ValueError, match="max_offset"):
        DistillLoss(_cfg(feedback=DistillFeedback(max_offset=1.5)))


def test_distill_proportions_draw_one_class_while_the_data_keeps_its_target():
    """`model.distill.proportions` gives the distillation its own mix: the data's target (what the
    rebalanced sampler draws) stays uniform while every distilled example is red; a group the data
    does not declare is refused naming the key."""
    from fairtune.models import BackboneConfig, TinyUNetConfig
    from fairtune.train import DebiasModule

    unet = TinyUNetConfig(sample_size=16, block_out_channels=[8, 16], attention_head_dim=4, norm_num_groups=4)
    tiny = BackboneConfig(kind="tiny", text_encoder=TEXT_ENCODER, unet=unet)
    module = DebiasModule(
        backbone=tiny, lora=LoraConfig(rank=2), distill=_cfg(proportions={"red": 1.0, "blue": 0.0})
    )
    module.attach_target(_target())
    assert module.target.proportions("digit 0") == [0.5, 0.5]
    red = module.distill_target.groups.index("red")
    _, gi, _ = module.distill_loss.draw(module.distill_target, 64, torch.Generator().manual_seed(0))
    assert set(gi.tolist()) == {red}
    same = DebiasModule(backbone=tiny, lora=LoraConfig(rank=2), distill=_cfg())
    same.attach_target(_target())
    assert same.distill_target is same.target
    bad = DebiasModule(backbone=tiny, lora=LoraConfig(rank=2), distill=_cfg(proportions={"green": 1.0}))
    with pytest.raises(ValueError, match="model.distill.proportions.*green"):
        bad.attach_target(_target())


def test_noise_offset_adds_one_constant_per_image_and_channel():
    """`model.noise_offset` shifts each image's noise by a per-channel constant (the same draws
    otherwise), and a negative offset is refused naming the key."""
    from fairtune.models import BackboneConfig, TinyUNetConfig
    from fairtune.train import DebiasModule

    unet = TinyUNetConfig(sample_size=16, block_out_channels=[8, 16], attention_head_dim=4, norm_num_groups=4)
    tiny = BackboneConfig(kind="tiny", text_encoder=TEXT_ENCODER, unet=unet)
    batch = {"pixels": torch.rand(4, 3, 16, 16), "prompts": ["a handwritten digit 1"] * 4}
    plain = DebiasModule(backbone=tiny, lora=LoraConfig(rank=2))
    shifted = DebiasModule(backbone=tiny, lora=LoraConfig(rank=2), noise_offset=0.1)
    _, a = plain.diffusion_loss(batch, torch.Generator().manual_seed(0))
    _, b = shifted.diffusion_loss(batch, torch.Generator().manual_seed(0))
    assert torch.equal(a["t"], b["t"])
    diff = b["noisy"] - a["noisy"]
    per_image = diff.mean(dim=(2, 3), keepdim=True)
    assert torch.allclose(diff, per_image.expand_as(diff), atol=1e-5)
    assert per_image.abs().min() > 0
    with pytest.raises(ValueError, match="model.noise_offset"):
        DebiasModule(backbone=tiny, lora=LoraConfig(rank=2), noise_offset=-0.1)


def test_data_weight_zero_trains_from_the_distillation_alone(digits_dir):
    """`model.data_weight: 0` skips the data pass: a fit logs no data loss, still moves the adapter
    (the distillation trains it), and the switch is refused without a loss to learn from or beside
    the adversary, which reads the data pass."""
    from conftest import smoke_trainer

    from fairtune.data import AttributeDataModule, SourceConfig
    from fairtune.models import AdversaryConfig, BackboneConfig, TinyUNetConfig
    from fairtune.train import DebiasModule

    unet = TinyUNetConfig(sample_size=16, block_out_channels=[8, 16], attention_head_dim=4, norm_num_groups=4)
    tiny = BackboneConfig(kind="tiny", text_encoder=TEXT_ENCODER, unet=unet)
    torch.manual_seed(0)
    module = DebiasModule(
        backbone=tiny, lora=LoraConfig(rank=2), distill=_cfg(timesteps=(0, 1000)), data_weight=0.0
    )
    lora_b = {n: p.detach().clone() for n, p in module.backbone.unet.named_parameters() if "lora_B" in n}
    dm = AttributeDataModule(
        attributes=COLORS,
        source=SourceConfig(path=str(digits_dir / "table")),
        concepts=CONCEPTS,
        batch_size=8,
        samples_per_epoch=16,
    )
    trainer = smoke_trainer(max_steps=2)
    trainer.fit(module, dm)
    logged = trainer.logged_metrics
    assert "train/diffusion_loss" not in logged and "distill/loss" in logged
    params = dict(module.backbone.unet.named_parameters())
    assert any(not torch.equal(params[n], before) for n, before in lora_b.items())
    for bad in ({}, {"distill": _cfg(), "adversary": AdversaryConfig()}):
        with pytest.raises(ValueError, match="model.data_weight"):
            DebiasModule(backbone=tiny, lora=LoraConfig(rank=2), data_weight=0.0, **bad)
    with pytest.raises(ValueError, match="model.data_weight"):
        DebiasModule(backbone=tiny, lora=LoraConfig(rank=2), data_weight=-1.0)


def test_uncond_share_distils_the_empty_prompt_toward_the_explicit_prediction(lora_backbone):
    """`uncond_share` gives that share of the student's prompts as the empty one (prompt dropout for
    the distillation), drawn per example; off, every student prompt is a neutral wording."""
    seen: list[str] = []
    bb = copy.deepcopy(lora_backbone)
    encode = bb.encode_prompts

    def recording(prompts):
        seen.extend(prompts)
        return encode(prompts)

    bb.encode_prompts = recording
    cfg = _cfg(hold_explicit=False, hold_uncond=False, batch_size=64)
    DistillLoss(cfg, seed=0)(bb, _target(), torch.Generator().manual_seed(0))
    student = seen[-64:]  # after the bank and the teacher, the student's rows come last
    assert "" not in student
    seen.clear()
    DistillLoss(_cfg(hold_explicit=False, hold_uncond=False, batch_size=64, uncond_share=0.5), seed=0)(
        bb, _target(), torch.Generator().manual_seed(0)
    )
    teacher, student = seen[-128:-64], seen[-64:]  # the last call: the teacher's rows, then the student's
    assert "" not in teacher  # the teacher still reads the explicit prompts
    assert 16 <= student.count("") <= 48
