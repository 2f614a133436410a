import numpy as np
import pytest
import torch

from fairtune.data import (
    AttributeSpec,
    SchemaError,
    Target,
    TargetConfig,
    WeightedEpochSampler,
    rebalance_weights,
)

SPEC = AttributeSpec({"color": ["red", "blue"], "background": ["light", "dark"]})


def _skewed(n_per=400, red=(0.9, 0.2), seed=0):
    """Two concepts with opposite skews (and an unequal size)."""
    rng = np.random.default_rng(seed)
    concepts, groups, bgs = [], [], []
    for c, share, n in (("doctor", red[0], n_per), ("nurse", red[1], n_per // 2)):
        for _ in range(n):
            concepts.append(c)
            groups.append(0 if rng.random() < share else 1)
            bgs.append(int(rng.random() < 0.3))
    return concepts, groups, bgs


def _drawn_mix(concepts, groups, idx, k=2):
    out = {}
    for c in sorted(set(concepts)):
        sel = [groups[i] for i in idx if concepts[i] == c and groups[i] >= 0]
        out[c] = np.bincount(sel, minlength=k) / len(sel)
    return out


def test_uniform_target_is_met_per_concept_on_a_large_draw():
    concepts, groups, _ = _skewed()
    t = Target(TargetConfig(attributes=["color"]), SPEC)
    w = rebalance_weights(concepts, groups, t)
    idx = WeightedEpochSampler(w, num_samples=40000, seed=1).epoch_draw().tolist()
    for c, mix in _drawn_mix(concepts, groups, idx).items():
        assert mix == pytest.approx([0.5, 0.5], abs=0.015), c
    # concepts keep their share of the draw (2:1)
    share = np.mean([concepts[i] == "doctor" for i in idx])
    assert share == pytest.approx(2 / 3, abs=0.01)


def test_explicit_and_per_concept_proportions():
    concepts, groups, _ = _skewed()
    cfg = TargetConfig(
        attributes=["color"],
        proportions={"red": 0.3, "blue": 0.7},
        per_concept={"nurse": {"red": 0.6, "blue": 0.4}},
    )
    w = rebalance_weights(concepts, groups, Target(cfg, SPEC))
    idx = WeightedEpochSampler(w, num_samples=40000).epoch_draw().tolist()
    mix = _drawn_mix(concepts, groups, idx)
    assert mix["doctor"] == pytest.approx([0.3, 0.7], abs=0.015)
    assert mix["nurse"] == pytest.approx([0.6, 0.4], abs=0.015)


def test_joint_target_over_two_attributes():
    concepts, groups, bgs = _skewed(n_per=2000)
    t = Target(TargetConfig(attributes=["color", "background"]), SPEC)
    joint = [
        t.group_of({"color": SPEC.classes["color"][g], "background": SPEC.classes["background"][b]})
        for g, b in zip(groups, bgs)
    ]
    w = rebalance_weights(concepts, joint, t)
    idx = WeightedEpochSampler(w, num_samples=80000).epoch_draw().tolist()
    for mix in _drawn_mix(concepts, joint, idx, k=4).values():
        assert mix == pytest.approx([0.25] * 4, abs=0.02)


def test_without_the_lever_the_draw_keeps_the_skew():
    concepts, groups, _ = _skewed()
    idx = WeightedEpochSampler(torch.ones(len(groups)), num_samples=40000).epoch_draw().tolist()
    assert _drawn_mix(concepts, groups, idx)["doctor"][0] == pytest.approx(0.9, abs=0.03)


def test_deterministic_from_seed_and_epoch():
    w = torch.rand(100)
    a, b = WeightedEpochSampler(w, seed=3), WeightedEpochSampler(w, seed=3)
    assert list(a) == list(b)
    a.set_epoch(1)
    assert list(a) != list(b)
    b.set_epoch(1)
    assert list(a) == list(b)
    assert list(WeightedEpochSampler(w, seed=4)) != list(WeightedEpochSampler(w, seed=3))


def test_ranks_split_the_epoch_without_overlap():
    w = torch.rand(50)
    full = WeightedEpochSampler(w, num_samples=101, seed=7, rank=0, world_size=1)
    full_draw = WeightedEpochSampler(w, num_samples=102, seed=7, rank=0, world_size=2).epoch_draw()
    parts = [list(WeightedEpochSampler(w, num_samples=101, seed=7, rank=r, world_size=2)) for r in (0, 1)]
    assert len(parts[0]) == len(parts[1]) == 51  # rounded up to a multiple of the world size
    # positions in the epoch's draw are dealt round-robin: disjoint, together the whole draw
    merged = [None] * 102
    merged[0::2], merged[1::2] = parts
    assert merged == full_draw.tolist()
    assert len(full) == 101


def test_unknown_labels_keep_or_drop():
    concepts = ["a"] * 6
    groups = [0, 0, 1, -1, -1, 1]
    t = Target(TargetConfig(attributes=["color"]), SPEC)
    keep = rebalance_weights(concepts, groups, t, unknown="keep")
    drop = rebalance_weights(concepts, groups, t, unknown="drop")
    assert keep.tolist() == [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert drop[3] == 0 and drop[4] == 0 and drop[0] == 1.0


def test_empty_target_group_is_named():
    t = Target(TargetConfig(attributes=["color"]), SPEC)
    with pytest.raises(SchemaError, match="group 'blue' .* concept 'surgeon'"):
        rebalance_weights(["surgeon", "surgeon", "nurse", "nurse"], [0, 0, 1, 0], t)
