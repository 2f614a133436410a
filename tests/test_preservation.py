from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from fairtune.colored_digits import ink_map
from fairtune.models import make_tiny_clip
from fairtune.train import FairnessConfig, FairnessLoss, PreservationConfig, PreservationFeatures

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


class _Pixels:
    """A backbone stand-in for the feature maps: UNet space is pixels in [-1, 1] (the tiny backbone)."""

    @staticmethod
    def to_pixels(x):
        return ((x + 1) / 2).clamp(0, 1)


def test_each_feature_space():
    torch.manual_seed(0)
    a, b = torch.rand(3, 3, 16, 16) * 2 - 1, torch.rand(3, 3, 16, 16) * 2 - 1
    bb = _Pixels()
    lat = PreservationFeatures(PreservationConfig(features="latent"))
    assert lat.loss(lat(a, bb), lat(b, bb)) == pytest.approx(F.mse_loss(a, b).item())
    pix = PreservationFeatures(PreservationConfig(features="pixels"))
    assert pix.loss(pix(a, bb), pix(b, bb)) == pytest.approx(
        F.mse_loss(bb.to_pixels(a), bb.to_pixels(b)).item()
    )
    # ColoredDigits' setting, through the generic module path: exactly the ink-map MSE of before
    ink = PreservationFeatures(PreservationConfig(features="module", module="fairtune.colored_digits.InkMap"))
    expected = F.mse_loss(ink_map(bb.to_pixels(a)), ink_map(bb.to_pixels(b)))
    assert ink.loss(ink(a, bb), ink(b, bb)).item() == pytest.approx(expected.item())
    # a recolouring (colour only) leaves the ink map alone but moves the pixels
    recolour = torch.flip(a, dims=[1])
    assert ink.loss(ink(a, bb), ink(recolour, bb)) < 1e-6 < pix.loss(pix(a, bb), pix(recolour, bb))


def test_clip_features_are_differentiable_and_cosine_by_default(tmp_path):
    clip = make_tiny_clip(tmp_path / "clip")
    pres = PreservationFeatures(PreservationConfig(features="clip", clip=str(clip)))
    assert pres.distance == "cosine" and not any(p.requires_grad for p in pres.parameters())
    x = (torch.rand(2, 3, 16, 16) * 2 - 1).requires_grad_(True)
    ref = torch.rand(2, 3, 16, 16) * 2 - 1
    loss = pres.loss(pres(x, _Pixels()), pres(ref, _Pixels()).detach())
    loss.backward()
    assert loss > 0 and x.grad.abs().sum() > 0
    assert pres.loss(pres(ref, _Pixels()), pres(ref, _Pixels())) == pytest.approx(0.0, abs=1e-6)


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="preservation.clip"):
        PreservationFeatures(PreservationConfig(features="clip"))
    with pytest.raises(ValueError, match="preservation.module"):
        PreservationFeatures(PreservationConfig(features="module"))
    with pytest.raises(ValueError, match="not a torch.nn.Module subclass"):
        PreservationFeatures(PreservationConfig(features="module", module="fairtune.colored_digits.ink_map"))
    with pytest.raises(ValueError, match="no {concept} field"):
        FairnessLoss(FairnessConfig(prompt="a photo"))
    with pytest.raises(ValueError, match="classifier.module is not set"):
        FairnessLoss(FairnessConfig())  # the classifier comes from the recipe: no default class or weights


def test_generic_defaults_carry_no_benchmark_and_colored_digits_configs_do():
    cfg = FairnessConfig()
    assert cfg.prompt == "{concept}" and cfg.preservation.features == "latent"
    assert cfg.classifier.weights is None and "colored_digits" not in cfg.classifier.module
    for arm in ("fairness", "sampler_fairness", "all"):
        f = yaml.safe_load((CONFIGS / "ablations" / f"{arm}.yaml").read_text())["model"]["fairness"]
        assert f["prompt"] == "a handwritten {concept}"
        assert f["preservation"] == {"features": "module", "module": "fairtune.colored_digits.InkMap"}
        assert f["classifier"]["weights"] == "runs/classifiers/color-train-16/classifier.safetensors"
