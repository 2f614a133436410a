import json

import numpy as np
import pytest

from fairtune.colored_digits import (
    DEFAULT_RED_SHARE,
    ColoredDigitsConfig,
    generate_colored_digits,
    neutral_prompt,
)
from fairtune.data import load_table


def test_stats_show_the_configured_skew(digits_dir):
    stats = json.loads((digits_dir / "stats.json").read_text())
    train = stats["splits"]["train"]
    for d, share in enumerate(DEFAULT_RED_SHARE):
        entry = train[f"digit {d}"]
        assert abs(entry["red_share"] - share) <= 0.03
        assert entry["color"]["red"] + entry["color"]["blue"] == entry["n"]
        # about a quarter of captions are explicit
        assert 0.15 < entry["explicit_captions"] / entry["n"] < 0.35
    # every digit is skewed by at least 0.25, half each way
    shares = [train[f"digit {d}"]["red_share"] for d in range(10)]
    assert all(abs(s - 0.5) >= 0.25 - 0.03 for s in shares)
    assert sum(s > 0.5 for s in shares) == 5


def test_heldout_split_is_disjoint_and_balanced(digits_dir):
    train = load_table(str(digits_dir / "table"), split="train")
    held = load_table(str(digits_dir / "table"), split="heldout")
    assert not set(train["source_id"]) & set(held["source_id"])
    red = np.mean(np.array(held["color"]) == "red")
    assert abs(red - 0.5) < 0.01


def test_explicit_captions_name_the_colour(digits_dir):
    train = load_table(str(digits_dir / "table"), split="train")
    for prompt, color, digit in zip(train["prompt"][:400], train["color"][:400], train["digit"][:400]):
        assert prompt in (neutral_prompt(digit), f"a {color} handwritten digit {digit}")


def test_same_seed_same_images_other_seed_differs():
    a = generate_colored_digits(ColoredDigitsConfig(renders_per_image=1, heldout_renders=1))
    b = generate_colored_digits(ColoredDigitsConfig(renders_per_image=1, heldout_renders=1))
    c = generate_colored_digits(ColoredDigitsConfig(renders_per_image=1, heldout_renders=1, seed=1))
    assert a["train"][0]["image"].tobytes() == b["train"][0]["image"].tobytes()
    assert [r["prompt"] for r in a["train"]] == [r["prompt"] for r in b["train"]]
    assert [r["source_id"] for r in a["train"]] != [r["source_id"] for r in c["train"]]


def test_background_and_third_colour_at_32px():
    cfg = ColoredDigitsConfig(
        size=32,
        colors=["red", "blue", "green"],
        background=True,
        dark_share=[0.5] * 10,
        renders_per_image=2,
        heldout_renders=1,
    )
    rows = generate_colored_digits(cfg)["train"]
    assert rows[0]["image"].size == (32, 32)
    assert cfg.spec().classes == {
        "color": ["red", "blue", "green"],
        "background": ["light", "dark"],
    }
    d0 = [r for r in rows if r["digit"] == 0]
    blue = np.mean([r["color"] == "blue" for r in d0])
    green = np.mean([r["color"] == "green" for r in d0])
    assert abs(blue - 0.025) < 0.02 and abs(green - 0.025) < 0.02
    dark = [r for r in rows if r["background"] == "dark"]
    assert abs(len(dark) / len(rows) - 0.5) < 0.02
    # a dark background really is dark
    assert np.asarray(dark[0]["image"]).mean() < 100


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(size=24), "size must be 16 or 32"),
        (dict(colors=["red", "purple"]), "colors must be"),
        (dict(red_share=[0.5] * 9), "red_share needs 10 values"),
        (dict(heldout_fraction=1.0), "heldout_fraction"),
    ],
)
def test_bad_config_is_named(kw, msg):
    with pytest.raises(ValueError, match=msg):
        ColoredDigitsConfig(**kw)


def test_per_colour_shares_give_each_digit_its_dominant_ink():
    shares = [[0.7, 0.15, 0.15], [0.15, 0.7, 0.15], [0.15, 0.15, 0.7]] * 3 + [[0.2, 0.3, 0.5]]
    cfg = ColoredDigitsConfig(
        colors=["red", "blue", "green"], color_shares=shares, renders_per_image=1, heldout_renders=1
    )
    splits = generate_colored_digits(cfg)
    for d in (0, 1, 2, 9):
        rows = [r for r in splits["train"] if r["digit"] == d]
        got = [np.mean([r["color"] == c for r in rows]) for c in cfg.colors]
        assert np.allclose(got, shares[d], atol=0.02), (d, got)
    held = [r for r in splits["heldout"] if r["digit"] == 0]  # the judges' split stays balanced
    assert abs(np.mean([r["color"] == "green" for r in held]) - 1 / 3) < 0.03


@pytest.mark.parametrize(
    "shares, msg",
    [
        ([[0.5, 0.5, 0.0]] * 9, "color_shares needs 10 rows"),
        ([[0.5, 0.5]] * 10, "color_shares needs 10 rows"),
        ([[0.5, 0.5, 0.5]] * 10, r"color_shares\[0\] must be non-negative and sum to 1"),
    ],
)
def test_bad_colour_shares_are_named(shares, msg):
    with pytest.raises(ValueError, match=msg):
        ColoredDigitsConfig(colors=["red", "blue", "green"], color_shares=shares)
