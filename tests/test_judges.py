import json

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from fairtune.data import BACKGROUND, INK, load_table, render
from fairtune.eval import UNDETERMINED, HueJudge, images_from_table, load_judges, perturb


def _renders(colors, background_rgb, seed=0, noise=0.0):
    """Digits in the given inks on a (possibly tinted) background, with Gaussian noise."""
    rng = np.random.default_rng(seed)
    n = len(colors)
    d = load_digits()
    gray = (d.images[:n] / 16.0).astype(np.float32)
    ink = np.array([INK[c] for c in colors])
    bg = np.array([background_rgb] * n)
    x = torch.from_numpy(render(gray, ink, bg, size=16, rng=rng)).permute(0, 3, 1, 2)
    x = x + noise * torch.from_numpy(rng.normal(size=x.shape).astype(np.float32))
    return x.clamp(0, 1)


def test_hue_judge_reads_ink_not_a_tinted_background():
    judge = HueJudge.for_colors(["red", "blue"])
    # the tint seen on generated images: cyan behind red, yellow behind blue, plus noise
    red = _renders(["red"] * 200, (0.75, 1.0, 1.0), noise=0.06)
    blue = _renders(["blue"] * 200, (1.0, 1.0, 0.7), noise=0.06, seed=1)
    assert (judge.predict(red) == 0).float().mean() >= 0.99
    assert (judge.predict(blue) == 1).float().mean() >= 0.99


def test_hue_judge_withholds_a_call_on_faint_or_mixed_ink():
    judge = HueJudge.for_colors(["red", "blue"])
    grey = _renders(["red"] * 10, (0.96, 0.96, 0.96))
    grey = grey.mean(1, keepdim=True).expand(-1, 3, -1, -1)  # no colour at all
    assert (judge.predict(grey) == UNDETERMINED).all()
    # ink halfway between the classes (purple) is no class
    rng = np.random.default_rng(0)
    gray = (load_digits().images[:20] / 16.0).astype(np.float32)
    purple = (np.array(INK["red"]) + np.array(INK["blue"])) / 2
    x = render(gray, np.array([purple] * 20), np.array([BACKGROUND["light"]] * 20), size=16, rng=rng)
    x = torch.from_numpy(x).permute(0, 3, 1, 2)
    assert (judge.predict(x) == UNDETERMINED).float().mean() >= 0.9


def test_hue_judge_three_colours_and_dark_background():
    judge = HueJudge.for_colors(["red", "blue", "green"])
    x = _renders(["green"] * 100, BACKGROUND["dark"])
    assert (judge.predict(x) == 2).float().mean() >= 0.99


def test_trained_judges_meet_their_accuracies(judges_dir):
    report = json.loads((judges_dir / "judges.json").read_text())
    assert report["digit_cnn"]["val_accuracy"] >= 0.97
    assert report["color_cnn"]["val_accuracy"] >= 0.99
    assert report["hue"]["agreement"] >= 0.995
    # and they hold on renders with the tint and noise of generated images
    assert report["digit_cnn"]["val_accuracy_perturbed"] >= 0.95
    assert report["color_cnn"]["val_accuracy_perturbed"] >= 0.99
    assert report["hue"]["agreement_perturbed"] >= 0.98


def test_loaded_judges_on_tinted_noisy_renders(judges_dir, digits_dir):
    judges = load_judges(judges_dir)
    held = load_table(str(digits_dir / "table"), split="heldout").select(range(600))
    x = perturb(images_from_table(held), torch.Generator().manual_seed(123))
    color = torch.tensor([judges.colors.index(c) for c in held["color"]])
    assert (judges.color(x, judge="cnn") == color).float().mean() >= 0.98
    assert (judges.color(x, judge="hue") == color).float().mean() >= 0.97
    # judge-train images are in this slice too, so this is a robustness check, not accuracy
    assert (judges.digit(x) == torch.tensor(held["digit"])).float().mean() >= 0.9
    feats = judges.features(x[:10])
    assert feats.shape == (10, report_dim(judges_dir))
    with pytest.raises(ValueError, match="unknown colour judge 'clip'"):
        judges.color(x, judge="clip")


def report_dim(judges_dir):
    return json.loads((judges_dir / "judges.json").read_text())["config"]["feature_dim"]


def test_missing_judges_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no judges.json"):
        load_judges(tmp_path)
