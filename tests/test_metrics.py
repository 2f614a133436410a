import math

import numpy as np
import pytest
from scipy import linalg, stats

from fairtune.eval import (
    KL_EPS,
    deviation,
    fairness_discrepancy,
    fidelity,
    frechet_distance,
    kl_divergence,
    noise_floor,
    proportions,
    shen_bias,
)


def test_proportions_count_undetermined():
    p, n, und = proportions([0, 0, 1, -1, 0, -1], num_classes=2)
    assert p.tolist() == [0.75, 0.25] and n == 4 and und == 2
    with pytest.raises(ValueError, match="labels must be in"):
        proportions([0, 2], num_classes=2)


def test_known_values_by_hand():
    p, q = [0.8, 0.2], [0.5, 0.5]
    assert deviation(p, target=q) == pytest.approx(0.3)
    assert fairness_discrepancy(p, target=q) == pytest.approx(math.sqrt(0.09 + 0.09))
    assert shen_bias(p) == pytest.approx(2 * abs(0.8 - 0.5))
    assert shen_bias([0.5, 0.3, 0.2]) == pytest.approx((0.2 + 0.3 + 0.1) / 3)
    assert deviation([0.3, 0.7], target=[0.3, 0.7]) == 0.0
    with pytest.raises(ValueError, match="p_hat has 3 classes but target has 2"):
        deviation([0.2, 0.3, 0.5], target=q)


def test_kl_matches_scipy_with_stated_smoothing():
    p, q = np.array([1.0, 0.0, 0.0]), np.array([0.2, 0.3, 0.5])
    ps = (1 - KL_EPS) * p + KL_EPS / 3
    qs = (1 - KL_EPS) * q + KL_EPS / 3
    assert kl_divergence(p, target=q) == pytest.approx(stats.entropy(ps, qs))
    assert kl_divergence(q, target=q) == pytest.approx(0.0, abs=1e-12)
    assert math.isfinite(kl_divergence([0.0, 1.0], target=[1.0, 0.0]))


def test_noise_floor():
    assert noise_floor([0.5, 0.5], n=256).tolist() == pytest.approx([1 / 32, 1 / 32])


def test_fidelity():
    assert fidelity([1, 2, 3, 3], expected=[1, 2, 3, 4]) == 0.75


def test_frechet_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    a = rng.normal(0.0, 1.0, size=(20000, 3))
    b = rng.normal(1.0, 2.0, size=(20000, 3))
    # ||mu||^2 + sum (s_a + s_b - 2 sqrt(s_a s_b)) = 3 + 3 * (1 + 4 - 4) = 6
    assert frechet_distance(a, b) == pytest.approx(6.0, rel=0.03)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_frechet_matches_scipy_sqrtm_reference():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(500, 4)) @ rng.normal(size=(4, 4))
    b = rng.normal(size=(400, 4)) @ rng.normal(size=(4, 4)) + 0.5
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ref = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(sa + sb - 2 * np.real(linalg.sqrtm(sa @ sb)))
    assert frechet_distance(a, b) == pytest.approx(ref, rel=1e-9)
    with pytest.raises(ValueError, match="equal D"):
        frechet_distance(a, b[:, :3])
