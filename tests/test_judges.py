import json

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from fairtune.colored_digits import BACKGROUND, INK, HueJudge, load_judges, perturb, render
from fairtune.data import images_from_table, load_table
from fairtune.eval import UNDETERMINED


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


def test_mixed_ink_labels_follow_each_inks_share():
    from fairtune.colored_digits import mixed_ink

    x = torch.cat([_renders(["red"] * 32, (1.0, 1.0, 1.0)), _renders(["blue"] * 32, (1.0, 1.0, 1.0), seed=1)])
    y = torch.tensor([0] * 32 + [1] * 32)
    xm, soft = mixed_ink(x, y, 2, torch.Generator().manual_seed(0))
    assert torch.allclose(soft.sum(1), torch.ones(64)) and (soft >= 0).all()
    assert (soft.max(1).values < 0.9).sum() > 16  # most images really are mixed
    # the share of red ink measured in the pixels: un-blend each inky pixel from the background and
    # project its ink colour onto the segment from the blue ink to the red ink
    red, blue = torch.tensor(INK["red"]), torch.tensor(INK["blue"])
    bg = torch.ones(3)
    alpha = ((x - bg[:, None, None]).abs().amax(1) / 0.6).clamp(0, 1)  # the input's ink, unchanged by mixing
    ink = (xm - (1 - alpha[:, None]) * bg[:, None, None]) / alpha[:, None].clamp_min(1e-6)
    t = ((ink - blue[:, None, None]) * (red - blue)[:, None, None]).sum(1) / ((red - blue) ** 2).sum()
    w = (alpha > 0.5).float()
    measured_red = (t.clamp(0, 1) * w).sum((1, 2)) / w.sum((1, 2))
    assert (measured_red - soft[:, 0]).abs().mean() < 0.1


def test_mixed_ink_training_stops_the_classifier_calling_purple_confidently(digits_dir, tmp_path):
    """A classifier that never saw mixed ink calls mixed digits confidently one colour (the loophole the
    fairness loss exploited); with mixed-ink training it reports the ink share."""
    from safetensors.torch import load_file

    from fairtune.colored_digits import SmallCNN, mixed_ink, train_attribute_classifier

    held = load_table(str(digits_dir / "table"), split="heldout").select(range(256))
    x, y = images_from_table(held), torch.tensor([["red", "blue"].index(c) for c in held["color"]])
    xm, soft = mixed_ink(x, y, 2, torch.Generator().manual_seed(3))
    mixed = soft.max(1).values < 0.8
    errors = {}
    for prob in (0.0, 0.5):
        report = train_attribute_classifier(digits_dir, tmp_path / str(prob), epochs=2, mixed_ink_prob=prob)
        assert report["heldout_accuracy"] > 0.97
        m = SmallCNN(**report["init_args"])
        m.load_state_dict(load_file(report["weights"]))
        with torch.no_grad():
            p = m.eval()(xm).softmax(1)
        errors[prob] = (p[mixed, 0] - soft[mixed, 0]).abs().mean().item()
    assert errors[0.5] < 0.2 < errors[0.0]


@pytest.fixture(scope="module")
def k3bg_rows():
    """Held-out renders (balanced) of three inks on light and dark backgrounds, one per source image."""
    from fairtune.colored_digits import ColoredDigitsConfig, generate_colored_digits

    cfg = ColoredDigitsConfig(
        colors=["red", "blue", "green"], background=True, renders_per_image=1, heldout_renders=1, seed=3
    )
    return cfg, generate_colored_digits(cfg)["heldout"][:600]


def test_three_colour_hue_and_background_judges_on_rendered_data(k3bg_rows):
    from fairtune.colored_digits import BackgroundJudge, Judges, SmallCNN
    from fairtune.data import AttributeSpec, Target, TargetConfig

    cfg, rows = k3bg_rows
    x = torch.stack(
        [torch.from_numpy(np.asarray(r["image"], np.float32) / 255).permute(2, 0, 1) for r in rows]
    )
    color = torch.tensor([cfg.colors.index(r["color"]) for r in rows])
    background = torch.tensor([list(BACKGROUND).index(r["background"]) for r in rows])
    assert len(set(color.tolist())) == 3 and len(set(background.tolist())) == 2
    hue = HueJudge.for_colors(cfg.colors)
    bg = BackgroundJudge()
    assert (hue.predict(x) == color).float().mean() >= 0.98
    assert (bg.predict(x) == background).float().mean() >= 0.98
    # the tint, noise and speckles of generated images do not move the background call
    xp = perturb(x, torch.Generator().manual_seed(0))
    assert (bg.predict(xp) == background).float().mean() >= 0.98
    assert (hue.predict(xp) == color).float().mean() >= 0.95

    # the joint label is the index of the record's group among the joint target's groups
    judges = Judges(cfg.colors, hue, SmallCNN(3, 4, 4), SmallCNN(10, 4, 4))
    target = Target(TargetConfig(attributes=["color", "background"]), cfg.spec())
    assert judges.groups(["color", "background"]) == target.groups
    truth = torch.tensor(
        [target.group_of({"color": r["color"], "background": r["background"]}) for r in rows]
    )
    assert (judges.label(x, ["color", "background"]) == truth).float().mean() >= 0.98
    bg_only = Target(TargetConfig(attributes=["background"]), AttributeSpec(cfg.spec().classes))
    assert judges.groups(["background"]) == bg_only.groups
    with pytest.raises(ValueError, match="not 'digit'"):
        judges.label(x, ["digit"])


def test_a_joint_target_is_scored_over_its_groups(k3bg_rows):
    from fairtune.colored_digits import Judges, SmallCNN, colored_digits_panel, judge_digit_images
    from fairtune.data import Target, TargetConfig

    cfg, rows = k3bg_rows
    n = 20
    by_digit = [[r for r in rows if r["digit"] == d][:n] for d in range(10)]
    assert all(len(b) == n for b in by_digit)
    ordered = [r for b in by_digit for r in b]  # digit-major, as the benchmark generates them
    x = torch.stack(
        [torch.from_numpy(np.asarray(r["image"], np.float32) / 255).permute(2, 0, 1) for r in ordered]
    )
    target = Target(TargetConfig(attributes=["color", "background"]), cfg.spec())
    judges = Judges(cfg.colors, HueJudge.for_colors(cfg.colors), SmallCNN(3, 4, 4), SmallCNN(10, 4, 4))
    panel = colored_digits_panel(judges, attributes=["color", "background"])
    assert panel.attribute == "color+background" and panel.classes == target.groups
    out = judge_digit_images(
        x, digits=list(range(10)), n_per_prompt=n, judges=panel, target=target.proportions()
    )
    for d, b in enumerate(by_digit):
        rec = out["per_concept"][f"digit {d}"]
        truth = np.bincount([target.group_of(r) for r in b], minlength=6) / n
        assert len(rec["p_hat"]) == 6
        assert np.abs(np.array(rec["p_hat"]) - truth).max() <= 0.05 + 1e-9
        assert rec["dev"] == pytest.approx(np.abs(np.array(rec["p_hat"]) - 1 / 6).max())


def test_the_sweep_judge_scores_a_paraphrase_and_explicit_prompts(judges_dir, tmp_path):
    """The shipped base model judged as the sweep does, with a paraphrase and explicit prompts: an
    explicit colour is followed (the base model knows both inks), the paraphrase is scored on its
    own digits and its images count in the undetermined total."""
    from fairtune.colored_digits import judge_colored_digits

    config = {
        "model": {"backbone": {"kind": "tiny", "pretrained": "colored-digits-16"}},
        "data": {"concepts": ["digit 0", "digit 5"], "attributes": {"color": ["red", "blue"]}},
    }
    kw = dict(judges=str(judges_dir), n_per_prompt=8, steps=10, digits=[0, 5], batch_size=64)
    plain = judge_colored_digits(tmp_path, config, **kw)
    out = judge_colored_digits(
        tmp_path, config, **kw, paraphrase="a drawing of the number {d}", paraphrase_digits=[0],
        explicit="a {cls} handwritten digit {d}", explicit_n=8, device="auto",
    )  # fmt: skip
    assert "mean_dev_paraphrase" not in plain and "explicit_follow" not in plain
    assert out["mean_dev_seen"] == pytest.approx(plain["mean_dev_seen"], abs=1e-6)
    assert 0.0 <= out["mean_dev_paraphrase"] <= 0.5
    assert out["worst_dev_paraphrase"] == pytest.approx(out["mean_dev_paraphrase"])  # one digit
    assert out["n_images"] == plain["n_images"] + 8
    assert out["explicit_follow"] >= 0.75 and 0.0 <= out["explicit_follow_min"] <= out["explicit_follow"]


def test_calibration_images_from_a_folder_with_several_splits_name_the_split(tmp_path):
    """A probe's folder often holds train/ and test/: the calibration split is chosen, never guessed."""
    from PIL import Image

    from fairtune.eval._clip_judge import load_labelled_images

    for split, color in (("train", "red"), ("test", "blue")):
        d = tmp_path / "labelled" / split
        d.mkdir(parents=True)
        rows = []
        for i in range(3):
            Image.new("RGB", (8, 8), color).save(d / f"{i}.png")
            rows.append(json.dumps({"file_name": f"{i}.png", "color": color}))
        (d / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    folder = tmp_path / "labelled"
    with pytest.raises(ValueError, match=r"several splits \['train', 'test'\].*calibration_split"):
        load_labelled_images(folder, attribute="color", classes=["red", "blue"])
    x, y = load_labelled_images(folder, attribute="color", classes=["red", "blue"], split="test")
    assert x.shape == (3, 3, 8, 8) and y.tolist() == [1, 1, 1]
    # one split: read without being named
    x, y = load_labelled_images(folder / "train", attribute="color", classes=["red", "blue"])
    assert y.tolist() == [0, 0, 0]
