"""The one statistics module (fairtune.eval._stats): intervals over seeds, the bootstrap's pieces, goal
checks, and that no other module re-derives an interval."""

import math
import re
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from fairtune.eval import (
    Goal,
    bootstrap_means,
    bootstrap_shares,
    check_goal,
    check_goals,
    half_width,
    percentile_interval,
    prediction_interval,
    seed_summary,
    wald_interval,
)

ROOT = Path(__file__).resolve().parent.parent


def test_seed_summary_and_the_prediction_interval_of_one_more_seed():
    v = [0.1, 0.2, 0.4]
    s = seed_summary([*v, None, math.nan], prediction=True)
    assert s["n"] == 3 and s["values"] == v and s["mean"] == pytest.approx(np.mean(v))
    t, sd = stats.t.ppf(0.975, 2), np.std(v, ddof=1)
    assert half_width(s["ci"]) == pytest.approx(t * sd / math.sqrt(3))
    # mean ± t·sd·√(1 + 1/n): one more run, not the mean
    assert half_width(s["range"]) == pytest.approx(t * sd * math.sqrt(1 + 1 / 3))
    one = seed_summary([0.3], prediction=True)
    assert one == {"mean": 0.3, "ci": None, "n": 1, "values": [0.3], "range": None}
    assert seed_summary([]) == {"mean": None, "ci": None, "n": 0, "values": []}
    assert prediction_interval({"mean": 1.0, "ci": None, "n": 1}) is None


def test_goal_checks_both_ways_with_an_optional_half_width_bound():
    at_most = Goal("mean_dev_seen", "<=", 0.04)
    assert at_most.text == "≤ 0.04"
    assert check_goal(at_most, 0.03)["met"] is True and check_goal(at_most, 0.03)["missed_by"] == 0.0
    c = check_goal(at_most, 0.05)
    assert c["met"] is False and c["missed_by"] == pytest.approx(0.01)
    assert check_goal(at_most, None)["met"] is None and check_goal(at_most, math.nan)["missed_by"] is None
    at_least = Goal.from_mapping({"metric": "fidelity", "min": 0.98})
    assert at_least == Goal("fidelity", ">=", 0.98) and at_least.text == "≥ 0.98"
    assert check_goal(at_least, 0.99)["met"] is True and check_goal(at_least, 0.97)["met"] is False
    narrow = Goal("mean_dev_seen", "<=", 0.04, max_halfwidth=0.01)
    c = check_goal(narrow, 0.03, halfwidth=0.02)
    assert c["met"] is True and c["halfwidth_met"] is False and c["all_met"] is False
    assert check_goal(narrow, 0.03, halfwidth=0.005)["all_met"] is True
    assert check_goal(narrow, 0.03)["all_met"] is None  # no interval: not measured
    assert check_goal(at_most, 0.03)["all_met"] is True
    with pytest.raises(ValueError, match="op must be"):
        Goal("x", "<", 1.0)


def test_goals_written_as_a_spec_writes_them_against_a_reference_arm():
    means = {"base": {"fidelity": 0.99, "frechet": 50.0}, "arm": {"fidelity": 0.975, "frechet": 54.0,
             "mean_dev_seen": 0.03}, "empty": {}}  # fmt: skip
    goals = [
        {"arm": "arm", "metric": "mean_dev_seen", "max": 0.04},
        {"arm": "arm", "metric": "fidelity", "relative_to": "base", "min": -0.01},
        {"arm": "arm", "metric": "frechet", "relative_to": "base", "as": "ratio", "max": 1.10},
        {"arm": "empty", "metric": "fidelity", "relative_to": "base", "min": -0.01},
        {"arm": "arm", "metric": "frechet", "relative_to": "empty", "as": "ratio", "max": 1.10},
    ]
    seen, fid, fre, no_arm, no_ref = check_goals(goals, means)
    assert seen["met"] is True and seen["value"] == 0.03
    assert fid["value"] == pytest.approx(-0.015) and fid["met"] is False
    assert fid["missed_by"] == pytest.approx(0.005)
    assert fre["value"] == pytest.approx(1.08) and fre["met"] is True and fre["arm"] == "arm"
    assert no_arm["met"] is None and no_ref["met"] is None and no_ref["value"] is None


def test_bootstrap_pieces():
    rng = np.random.default_rng(0)
    shares = bootstrap_shares(np.array([0, 0, 1, 2]), 3, 50, rng)
    assert shares.shape == (50, 3) and np.allclose(shares.sum(1), 1.0)
    means = bootstrap_means(np.arange(10.0), 2000, np.random.default_rng(1))
    lo, hi = percentile_interval(means, level=0.9)
    assert lo < 4.5 < hi
    assert np.quantile(means, 0.05) == lo and np.quantile(means, 0.95) == hi
    lo2, hi2 = percentile_interval(means - 1, means + 1, level=0.9)
    assert lo2 == pytest.approx(lo - 1) and hi2 == pytest.approx(hi + 1)
    low, high = wald_interval(0.5, 100)
    assert (low, high) == pytest.approx((0.5 - 0.098, 0.5 + 0.098))


def test_no_other_module_derives_an_interval():
    """Quantiles of a distribution or of bootstrap replicates are taken in eval/_stats.py only."""
    pattern = re.compile(r"\.ppf\(|np\.quantile\(|inv_cdf\(|rng\.multinomial\(")
    offenders = [
        str(p.relative_to(ROOT))
        for folder in ("data", "models", "train", "eval", "cli", "benchmarks")
        for p in sorted((ROOT / folder).glob("*.py"))
        if p.name != "_stats.py" and pattern.search(p.read_text())
    ]
    assert offenders == []


def test_the_prediction_interval_widens_by_one_runs_sampling_spread():
    # a figure every seed scored alike has no spread over seeds, yet its images are a sample
    s = seed_summary([0.0, 0.0, 0.0, 0.0, 0.0], prediction=True)
    assert s["range"] == [0.0, 0.0]
    z = stats.norm.ppf(0.975)
    widened = seed_summary([0.0] * 5, prediction=True, sampling_sd=0.004)
    assert widened["range"] == pytest.approx([-z * 0.004, z * 0.004]) and widened["sampling_sd"] == 0.004
    v = [0.1, 0.2, 0.4]
    sd, t = np.std(v, ddof=1), stats.t.ppf(0.975, 2)
    both = seed_summary(v, prediction=True, sampling_sd=0.05)
    expected = math.sqrt((t * sd) ** 2 * (1 + 1 / 3) + (z * 0.05) ** 2)
    assert half_width(both["range"]) == pytest.approx(expected)
    # clipped to where the metric can lie (a deviation is never below 0)
    clipped = seed_summary([0.0] * 5, prediction=True, sampling_sd=0.004, bounds=(0.0, 1.0))
    assert clipped["range"] == pytest.approx([0.0, z * 0.004])
