import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from fairtune.colored_digits import BACKGROUND, INK, render
from fairtune.eval import (
    change_score,
    change_scores,
    confusion_matrix,
    corrected_shares,
    judge_agreement,
    judge_quality,
    judged_shares,
    score_measurement,
    share_bounds,
    solve_shares,
)

# P(judged j | true i): columns red, blue, undetermined
NOISY = np.array([[0.85, 0.10, 0.05], [0.30, 0.65, 0.05]])


def _noisy_labels(true: np.ndarray, confusion: np.ndarray, rng) -> np.ndarray:
    """A judge with a known confusion: each true label is redrawn from its confusion row."""
    k = confusion.shape[0]
    out = np.array([rng.choice(k + 1, p=confusion[t]) for t in true])
    return np.where(out == k, -1, out)


def test_confusion_and_judged_shares():
    true = np.array([0, 0, 0, 0, 1, 1])
    judged = np.array([0, 0, 1, -1, 1, 1])
    c = confusion_matrix(true, judged, 2)
    np.testing.assert_allclose(c, [[0.5, 0.25, 0.25], [0.0, 1.0, 0.0]])
    np.testing.assert_allclose(judged_shares(judged, 2), [2 / 6, 3 / 6, 1 / 6])
    with pytest.raises(ValueError, match="no calibration image of class"):
        confusion_matrix([0, 0], [0, 1], 2)
    with pytest.raises(ValueError, match="label 2 outside"):
        confusion_matrix([0, 1], [0, 2], 2)
    with pytest.raises(ValueError, match="must all be known"):
        confusion_matrix([0, -1], [0, 1], 2)


def test_solve_shares_inverts_a_known_confusion_and_stays_on_the_simplex():
    p = np.array([0.2, 0.8])
    np.testing.assert_allclose(solve_shares(NOISY, NOISY.T @ p), p, atol=1e-5)
    three = np.array([[0.8, 0.1, 0.1, 0.0], [0.1, 0.7, 0.1, 0.1], [0.05, 0.15, 0.8, 0.0]])
    p3 = np.array([0.5, 0.3, 0.2])
    np.testing.assert_allclose(solve_shares(three, three.T @ p3), p3, atol=1e-5)
    # judged shares no true mix can produce (more red than the judge ever says): clipped to a vertex
    out = solve_shares(NOISY, np.array([0.95, 0.0, 0.05]))
    assert out.min() >= 0 and abs(out.sum() - 1) < 1e-9
    np.testing.assert_allclose(out, [1.0, 0.0], atol=1e-6)


def test_correction_recovers_the_truth_that_a_noisy_judge_hides():
    rng = np.random.default_rng(0)
    true_gen = (rng.random(2000) >= 0.2).astype(int)  # 20% red, 80% blue
    true_cal = np.repeat([0, 1], 400)
    out = corrected_shares(
        _noisy_labels(true_gen, NOISY, rng), true_cal, _noisy_labels(true_cal, NOISY, rng), 2, n_boot=400
    )
    # the raw judged share of red is far off (0.2*0.85 + 0.8*0.30 = 0.41), the corrected one is not
    assert out["judged"][0] > 0.35
    assert abs(out["corrected"][0] - 0.2) < 0.05
    assert out["low"][0] <= 0.2 <= out["high"][0]
    assert out["high"][0] - out["low"][0] < 0.15
    assert 0.03 < out["undetermined"] < 0.08


def test_corrected_interval_covers_at_its_level():
    """Coverage by simulation: new generated and calibration sets each trial, fixed truth."""
    rng = np.random.default_rng(1)
    p_red, hits, trials = 0.3, 0, 120
    widths = []
    for trial in range(trials):
        true_gen = (rng.random(300) >= p_red).astype(int)
        true_cal = np.repeat([0, 1], 150)
        out = corrected_shares(
            _noisy_labels(true_gen, NOISY, rng),
            true_cal,
            _noisy_labels(true_cal, NOISY, rng),
            2,
            n_boot=200,
            seed=trial,
        )
        hits += out["low"][0] <= p_red <= out["high"][0]
        widths.append(out["high"][0] - out["low"][0])
    # nominal 95%; 120 trials put a correct interval's count above 0.88 with overwhelming probability,
    # and an interval that ignored the calibration's noise would fall below it
    assert hits / trials >= 0.88
    assert np.mean(widths) < 0.3


def test_a_judge_that_calls_every_image_one_class_gives_no_false_certainty():
    """Zero-shot CLIP that says "red" to everything: its judged shares fit every true mix, so each
    corrected interval is [0, 1] (not the solver's arbitrary vertex) and the judge is flagged."""
    true_cal = np.repeat([0, 1], 100)
    constant = np.zeros(200, dtype=int)
    out = corrected_shares(np.zeros(128, dtype=int), true_cal, constant, 2, n_boot=200, target=[0.5, 0.5])
    assert not out["identified"]
    np.testing.assert_allclose(out["low"], [0.0, 0.0], atol=1e-9)
    np.testing.assert_allclose(out["high"], [1.0, 1.0], atol=1e-9)
    assert out["dev_low"] == pytest.approx(0.0) and out["dev_high"] == pytest.approx(0.5)
    q = judge_quality(true_cal, constant, 2)
    assert q["balanced_accuracy"] == pytest.approx(0.5) and not q["informative"]
    # three classes, two of which the judge confuses completely: those two are unidentified, their
    # sum is not, and the third class keeps a point
    conf = np.array([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    lo, hi = share_bounds(conf, np.array([0.2, 0.8, 0.0, 0.0]))
    np.testing.assert_allclose(lo, [0.2, 0.0, 0.0], atol=1e-9)
    np.testing.assert_allclose(hi, [0.2, 0.8, 0.8], atol=1e-9)


def test_corrected_interval_is_a_point_for_a_perfect_judge_and_widens_with_error_and_fewer_images():
    rng = np.random.default_rng(3)
    true_gen = (rng.random(400) >= 0.3).astype(int)

    def width(confusion, n_cal):
        true_cal = np.repeat([0, 1], n_cal)
        judged_cal = _noisy_labels(true_cal, confusion, rng)
        out = corrected_shares(_noisy_labels(true_gen, confusion, rng), true_cal, judged_cal, 2, n_boot=300)
        assert out["identified"]
        return out["high"][0] - out["low"][0], judge_quality(true_cal, judged_cal, 2)

    perfect = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    poor = np.array([[0.52, 0.48, 0.0], [0.48, 0.52, 0.0]])
    w_perfect, q_perfect = width(perfect, 200)
    w_noisy, _ = width(NOISY, 200)
    w_noisy_small, _ = width(NOISY, 25)
    w_poor, q_poor = width(poor, 200)
    assert q_perfect["informative"] and q_perfect["balanced_accuracy"] == 1.0
    # only the generated images' sampling error is left for a perfect judge (binomial, N = 400)
    assert w_perfect < 0.1
    assert w_perfect < w_noisy < w_noisy_small
    assert w_noisy < w_poor
    assert not q_poor["informative"]  # balanced accuracy ~0.52: near chance


def _hue_renders(colors, rng):
    d = load_digits()
    idx = rng.integers(0, len(d.images), size=len(colors))
    gray = (d.images[idx] / 16.0).astype(np.float32)
    ink = np.array([INK[c] for c in colors])
    bg = np.array([BACKGROUND["light"]] * len(colors))
    return torch.from_numpy(render(gray, ink, bg, size=16, rng=rng)).permute(0, 3, 1, 2)


def test_colored_digits_demo_corrects_a_deliberately_noisy_hue_judge():
    """ColoredDigits: the exact hue judge made noisy (known flips); corrected share back on target."""
    from fairtune.colored_digits import HueJudge

    rng = np.random.default_rng(2)
    hue = HueJudge.for_colors(["red", "blue"])
    flip = np.array([[0.90, 0.10, 0.0], [0.35, 0.65, 0.0]])  # judged | hue's call

    def noisy_judge(images):
        called = hue.predict(images).numpy()
        assert (called >= 0).all()
        return _noisy_labels(called, flip, rng)

    gen_colors = ["red"] * 150 + ["blue"] * 450  # true red share 0.25
    cal_colors = ["red"] * 200 + ["blue"] * 200
    gen = noisy_judge(_hue_renders(gen_colors, rng))
    cal_true = np.array([0 if c == "red" else 1 for c in cal_colors])
    out = corrected_shares(gen, cal_true, noisy_judge(_hue_renders(cal_colors, rng)), 2, n_boot=400)
    assert out["judged"][0] > 0.38  # ~0.25*0.9 + 0.75*0.35 = 0.49
    assert out["low"][0] <= 0.25 <= out["high"][0]
    assert abs(out["corrected"][0] - 0.25) < 0.07


def test_judge_agreement_and_kappa():
    a = np.array([0, 0, 1, 1, 0, 1, -1, 0])
    b = np.array([0, 1, 1, 1, 0, 0, 1, -1])
    out = judge_agreement(a, b, 2)
    assert out["n_both"] == 6
    assert out["agreement"] == pytest.approx(4 / 6)
    # p_e = (3/6)(3/6) + (3/6)(3/6) = 0.5 -> kappa = (4/6 - 0.5) / 0.5
    assert out["kappa"] == pytest.approx((4 / 6 - 0.5) / 0.5)
    assert out["undetermined_a"] == pytest.approx(1 / 8)
    # independent judges agree at chance: kappa near 0; identical judges: kappa 1
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 3, 5000), rng.integers(0, 3, 5000)
    assert abs(judge_agreement(x, y, 3)["kappa"]) < 0.05
    assert judge_agreement(x, x, 3)["kappa"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="different numbers"):
        judge_agreement([0], [0, 1], 2)


def test_change_score_is_zero_for_identical_images_and_grows_with_change():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(64, 16))
    same = change_score(base, base)
    assert same["mean"] == pytest.approx(0.0, abs=1e-12)
    small = change_score(base, base + 0.1 * rng.normal(size=base.shape))
    large = change_score(base, base + 1.0 * rng.normal(size=base.shape))
    assert 0 < small["mean"] < large["mean"]
    assert large["low"] <= large["mean"] <= large["high"]
    assert change_score(base, -base)["mean"] == pytest.approx(2.0)
    assert change_score(base, base + 1.0, metric="l2")["mean"] == pytest.approx(4.0)
    with pytest.raises(ValueError, match="same"):
        change_score(base, base[:10])


class _Entry:
    def __init__(self, key, role, concept):
        self.key, self.role, self.concept = key, role, concept


def test_score_measurement_per_prompt_and_summary():
    rng = np.random.default_rng(3)
    entries = [_Entry("g/a", "seen", "a"), _Entry("g/b", "seen", "b"), _Entry("h/c", "heldout", "c")]
    truth = {"a": 0.2, "b": 0.5, "c": 0.8}
    true = np.concatenate([(rng.random(600) >= truth[e.concept]).astype(int) for e in entries])
    first = _noisy_labels(true, NOISY, rng)
    second = _noisy_labels(true, NOISY, rng)
    true_cal = np.repeat([0, 1], 300)
    out = score_measurement(
        first, entries, n_per_prompt=600, n_classes=2, target_of=lambda c: [0.5, 0.5],
        calibration=(true_cal, _noisy_labels(true_cal, NOISY, rng)), second=second, n_boot=300,
    )  # fmt: skip
    for e in entries:
        r = out["per_concept"][e.key]
        assert r["corrected_low"][0] - 0.02 <= truth[e.concept] <= r["corrected_high"][0] + 0.02
        assert abs(r["dev_corrected"] - abs(truth[e.concept] - 0.5)) < 0.08
        assert r["dev_corrected_low"] <= r["dev_corrected"] <= r["dev_corrected_high"]
        assert 0 < r["kappa"] < 1
    s = out["summary"]
    assert s["mean_dev_corrected_seen"] == pytest.approx(
        np.mean([out["per_concept"][k]["dev_corrected"] for k in ("g/a", "g/b")])
    )
    assert s["mean_dev_corrected_paraphrase"] is None
    assert s["n_calibration"] == 600 and 0.6 < s["calibration_accuracy"] < 0.85
    # two judges with independent noise agree less than perfectly, above chance
    assert 0.5 < s["agreement"] < 0.9 and 0.1 < s["kappa"] < 0.8
    # without calibration or second judge: nothing to add
    bare = score_measurement(first, entries, n_per_prompt=600, n_classes=2, target_of=lambda c: [0.5, 0.5])
    assert bare["summary"] == {} and bare["per_concept"]["g/a"] == {}


def test_change_scores_against_the_base_method():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(32, 8))
    feats = {"base": base, "same": base.copy(), "moved": base + rng.normal(size=base.shape)}
    out = change_scores(feats, base="base", n_boot=100)
    assert set(out) == {"same", "moved"} and "per_image" not in out["same"]
    assert out["same"]["mean"] == pytest.approx(0.0, abs=1e-12)
    assert out["moved"]["mean"] > 0.1
    with pytest.raises(ValueError, match="base method 'nope'"):
        change_scores(feats, base="nope")
