"""The one scoring engine: intervals that hold where a deviation folds at 0, and one summary for
every entry point."""

import numpy as np
import pytest
import torch

from fairtune.colored_digits import digit_entries, judge_digit_images
from fairtune.data import AttributeSpec, Target, TargetConfig
from fairtune.eval import (
    JudgePanel,
    MethodImages,
    exact_interval,
    judge_method,
    mean_interval,
    metric_intervals,
    score_concept,
    summarize,
    wilson_interval,
)


def test_score_concept_bundle():
    r = score_concept([0] * 70 + [1] * 30 + [-1] * 5, target=[0.5, 0.5], concept="digit 1")
    assert r["n"] == 100 and r["undetermined"] == 5 and r["counts"] == [70, 30]
    assert r["dev"] == pytest.approx(0.2) and r["bias"] == pytest.approx(0.4)
    for m in ("dev", "fd", "kl", "bias"):
        lo, hi = r[f"{m}_ci"]
        assert lo <= r[m] <= hi, m
    empty = score_concept([-1, -1], target=[0.5, 0.5])
    assert empty["dev"] is None and empty["dev_ci"] is None and empty["p_hat"] == [None, None]


def test_interval_known_values():
    lo, hi = wilson_interval(np.array([70]), 100)
    # Wilson 95% for 70/100 (Newcombe 1998, method 3): 0.6041 to 0.7810
    assert lo[0] == pytest.approx(0.6041, abs=1e-4) and hi[0] == pytest.approx(0.7810, abs=1e-4)
    from scipy.stats import binom

    lo, hi = exact_interval(np.array([70, 0, 100]), 100)
    # Clopper-Pearson's definition: at the lower end P(X >= 70) = 2.5%, at the upper P(X <= 70) = 2.5%
    assert binom.sf(69, 100, lo[0]) == pytest.approx(0.025, abs=1e-6)
    assert binom.cdf(70, 100, hi[0]) == pytest.approx(0.025, abs=1e-6)
    assert lo[1] == 0.0 and hi[2] == 1.0


def test_balanced_concept_interval_starts_at_zero_with_the_estimate_inside():
    # The percentile bootstrap of |p - q| gave 0.004 [0.004, 0.100] here: estimate on the lower edge.
    r = score_concept([0] * 65 + [1] * 63, target=[0.5, 0.5])
    lo, hi = r["dev_ci"]
    assert lo == 0.0 and lo < r["dev"] < hi < 0.1


@pytest.mark.parametrize("p,q", [(0.5, 0.5), (0.55, 0.5), (0.7, 0.5), (0.3, 0.3), (0.9, 0.5)])
def test_deviation_interval_coverage_by_simulation(p, q):
    rng = np.random.default_rng(0)
    n, sims = 128, 2000
    true_dev = abs(p - q)
    hits = 0
    for x in rng.binomial(n, p, size=sims):
        lo, hi = metric_intervals([x, n - x], [q, 1 - q])["dev_ci"]
        hits += lo - 1e-12 <= true_dev <= hi + 1e-12
    assert hits / sims >= 0.95


def test_three_class_and_mean_interval_coverage_by_simulation():
    rng = np.random.default_rng(1)
    p, q = np.array([0.2, 0.3, 0.5]), np.array([1 / 3] * 3)
    true_dev = np.abs(p - q).max()
    hits = sum(
        (lambda ci: ci[0] <= true_dev <= ci[1])(metric_intervals(c, q)["dev_ci"])
        for c in rng.multinomial(128, p, size=1000)
    )
    assert hits / 1000 >= 0.94
    # the mean over 8 concepts, each drawn at its own share
    shares = np.linspace(0.4, 0.75, 8)
    true_mean = np.mean(np.abs(shares - 0.5))
    hits = 0
    for _ in range(500):
        recs = []
        for s in shares:
            x = rng.binomial(128, s)
            recs.append({"n": 128, "counts": [x, 128 - x], "target": [0.5, 0.5]})
        lo, hi = mean_interval(recs)
        hits += lo <= true_mean <= hi
    assert hits / 500 >= 0.95


def _label_images(labels: np.ndarray) -> torch.Tensor:
    """Images that carry their judged label in one pixel (label + 1) / 4, read back by the panel."""
    x = torch.zeros(len(labels), 3, 4, 4)
    x[:, 0, 0, 0] = torch.as_tensor(labels + 1, dtype=torch.float32) / 4
    return x


def test_every_entry_point_summarises_the_same_labels_identically():
    rng = np.random.default_rng(0)
    digits, seen, n = list(range(10)), list(range(8)), 64
    labels = rng.choice([0, 1, -1], p=[0.55, 0.43, 0.02], size=len(digits) * n)
    images = _label_images(labels)
    concept_labels = np.repeat(digits, n)
    concept_labels[::7] = 0  # some images judged as another digit
    panel = JudgePanel(
        attribute="color",
        classes=["red", "blue"],
        attribute_fn=lambda x: (x[:, 0, 0, 0] * 4).round().long() - 1,
        concept_classes=[f"digit {d}" for d in digits],
        concept_fn=lambda x, _c=torch.as_tensor(concept_labels): _c[: len(x)] if len(x) == len(_c) else None,
    )
    panel.batch_size = len(images)  # one batch, so the concept labels line up
    target = Target(TargetConfig(), AttributeSpec({"color": ["red", "blue"]}))

    # sweep / benchmarks: judge_digit_images
    bench = judge_digit_images(
        images, digits=digits, n_per_prompt=n, judges=panel, target=[0.5, 0.5], seen=seen
    )["summary"]
    # compare / audit / demo: judge_method on the same images, prompts and target
    res = MethodImages(images, [""] * len(images), None, 1.0, 1, len(images), 30)
    entries = digit_entries(digits, seen, "a handwritten digit {d}")
    cmp = judge_method(res, entries, panel=panel, target=target, n_per_prompt=n, progress=False)["summary"]
    shared = {k: cmp[k] for k in bench}
    assert shared == bench
    assert bench["mean_dev_seen"] is not None and bench["mean_dev_paraphrase"] is None
    assert bench["fidelity"] < 1.0 and bench["undetermined"] == int((labels == -1).sum())


def test_summary_keys_are_documented():
    from pathlib import Path

    doc = (Path(__file__).resolve().parent.parent / "docs" / "metrics.md").read_text()
    recs = {"a": score_concept([0, 1, 1], target=[0.5, 0.5]) | {"role": "seen", "fidelity": 1.0}}
    for key in [*summarize(recs), *recs["a"]]:
        assert f"`{key}`" in doc, key


def test_sampling_sd_is_each_figures_spread_over_resamples_of_the_images():
    from fairtune.eval import sampling_sd

    n = 400
    entries = digit_entries([0], [0], "a handwritten digit {d}")
    kw = dict(n_per_prompt=n, target_of=lambda c: [0.5, 0.5], classes=["red", "blue"], n_boot=200)
    # i.i.d. labels, 30% red: the share's binomial spread, sqrt(p(1 - p) / n)
    iid = (np.random.default_rng(0).random(n) > 0.3).astype(np.int64)
    sd = sampling_sd({"attribute": iid}, entries, **kw)
    assert sd["mean_dev_seen"] == pytest.approx(np.sqrt(0.21 / n), rel=0.25)
    # no image undetermined among 400 still leaves a chance of one (half an image each outcome)
    assert 0.0 < sd["undetermined_rate"] < 0.005 and "frechet" not in sd
    # a stratified draw (half the images of the prompt each class) the judge follows exactly: the
    # resampling stays within each drawn class, so the figure moves only by the misses 200 images per
    # class cannot rule out (half an image of each outcome added) ...
    drawn = ["red", "blue"] * (n // 2)
    follows = np.array([0, 1] * (n // 2))
    exact = sampling_sd({"attribute": follows}, entries, drawn=drawn, **kw)["mean_dev_seen"]
    assert 0.0 < exact < 0.004
    # ... whereas ignoring the draw would count the stratified counts as sampled
    assert sampling_sd({"attribute": follows}, entries, **kw)["mean_dev_seen"] > 0.01
    # where the judge misses the drawn class now and then, it moves by those misses
    missed = follows.copy()
    missed[:20:2] = 1  # 10 red-drawn images judged blue
    s = sampling_sd({"attribute": missed}, entries, drawn=drawn, **kw)["mean_dev_seen"]
    assert exact < s < 0.01
    # fidelity and the Fréchet distance from half-samples of the images (no image thrice)
    concept = np.zeros(n, dtype=np.int64)
    concept[::4] = 1  # a quarter judged another digit: fidelity 0.75
    feats = np.random.default_rng(1).normal(size=(n, 3))
    ref = np.random.default_rng(2).normal(size=(500, 3))
    sd = sampling_sd(
        {"attribute": iid, "concept": concept, "features": feats}, entries, **kw, concept_index=lambda c: 0,
        reference_features=ref, frechet_roles=("seen",),
    )  # fmt: skip
    assert sd["fidelity"] == pytest.approx(np.sqrt(0.75 * 0.25 / n), rel=0.3)
    assert 0.0 < sd["frechet"] < 0.1
    with pytest.raises(ValueError, match="n_boot"):
        sampling_sd({"attribute": iid}, entries, **{**kw, "n_boot": 1})
