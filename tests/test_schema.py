import pytest
from PIL import Image

from fairtune.data import (
    AttributeDataModule,
    AttributeSpec,
    Record,
    SchemaError,
    SourceConfig,
    Target,
    TargetConfig,
    validate_record,
)

SPEC = AttributeSpec({"color": ["red", "blue"], "background": ["light", "dark"]})
COLOR = AttributeSpec({"color": ["red", "blue"]})


def test_spec_rejects_single_class_and_duplicates():
    with pytest.raises(SchemaError, match="'color' needs at least two classes"):
        AttributeSpec({"color": ["red"]})
    with pytest.raises(SchemaError, match="declares a class twice"):
        AttributeSpec({"color": ["red", "red"]})


def test_undeclared_class_is_named():
    rec = Record(Image.new("RGB", (4, 4)), "p", "digit 1", {"color": "green", "background": None})
    with pytest.raises(SchemaError, match="'color' has class 'green', which is not declared"):
        validate_record(rec, SPEC)


def test_record_normalises_unknown_and_mode():
    rec = Record(Image.new("L", (4, 4)), "p", "digit 1", {"color": "red"})
    out = validate_record(rec, SPEC)
    assert out.attributes == {"color": "red", "background": None}
    assert out.image.mode == "RGB"


def test_record_rejects_undeclared_attribute_and_empty_concept():
    with pytest.raises(SchemaError, match="undeclared attributes \\['age'\\]"):
        validate_record(Record(Image.new("RGB", (2, 2)), "p", "c", {"age": "old"}), SPEC)
    with pytest.raises(SchemaError, match="concept must be a non-empty string"):
        validate_record(Record(Image.new("RGB", (2, 2)), "p", "", {}), SPEC)


def test_uniform_and_explicit_targets():
    t = Target(TargetConfig(attributes=["color"]), SPEC)
    assert t.groups == ["red", "blue"] and t.proportions() == [0.5, 0.5]
    t = Target(TargetConfig(attributes=["color"], proportions={"red": 0.3, "blue": 0.7}), SPEC)
    assert t.proportions("digit 3") == [0.3, 0.7]


def test_unset_target_attributes_mean_the_only_declared_one():
    t = Target(TargetConfig(), COLOR)
    assert t.attributes == ["color"] and t.groups == ["red", "blue"]
    # with several declared, nothing is guessed: the error names them
    with pytest.raises(SchemaError, match=r"target.attributes is not set .* \['color', 'background'\]"):
        Target(TargetConfig(), SPEC)


def test_joint_target_groups_and_lookup():
    t = Target(TargetConfig(attributes=["color", "background"]), SPEC)
    assert t.groups == ["red+light", "red+dark", "blue+light", "blue+dark"]
    assert t.proportions() == [0.25] * 4
    assert t.group_of({"color": "blue", "background": "dark"}) == 3
    assert t.group_of({"color": "blue", "background": None}) == -1


def test_proportions_must_sum_to_one():
    with pytest.raises(SchemaError, match="sum to 0.9"):
        Target(TargetConfig(proportions={"red": 0.3, "blue": 0.6}), COLOR)
    # within 1e-6 is accepted
    Target(TargetConfig(proportions={"red": 0.3, "blue": 0.7000004}), COLOR)


def test_unknown_group_and_attribute_named():
    with pytest.raises(SchemaError, match="groups \\['green'\\] that do not exist"):
        Target(TargetConfig(proportions={"green": 1.0}), COLOR)
    with pytest.raises(SchemaError, match="target attribute 'gender' is not declared"):
        Target(TargetConfig(attributes=["gender"]), COLOR)


def test_per_concept_override():
    cfg = TargetConfig(per_concept={"digit 0": {"red": 0.2, "blue": 0.8}})
    t = Target(cfg, COLOR)
    assert t.proportions("digit 0") == [0.2, 0.8]
    assert t.proportions("digit 1") == [0.5, 0.5]
    with pytest.raises(SchemaError, match="per_concept\\['digit 0'\\] proportions sum"):
        Target(TargetConfig(per_concept={"digit 0": {"red": 0.9}}), COLOR)


def test_empty_target_group_names_concept_and_group():
    t = Target(TargetConfig(), COLOR)
    concepts = ["digit 0", "digit 0", "digit 1", "digit 1"]
    groups = [0, 1, 0, -1]
    with pytest.raises(SchemaError, match="group 'blue' .* concept 'digit 1'"):
        t.check_coverage(concepts, groups)
    # a group with target 0 may be absent
    t0 = Target(TargetConfig(per_concept={"digit 1": {"red": 1.0}}), COLOR)
    t0.check_coverage(concepts, groups)


def test_a_datamodule_without_source_or_attributes_names_the_missing_key():
    # no benchmark defaults: a user's data declares its own attributes and path
    with pytest.raises(SchemaError, match="data.attributes is not set"):
        AttributeDataModule(source=SourceConfig(path="table"))
    with pytest.raises(SchemaError, match="data.source is not set"):
        AttributeDataModule(attributes={"gender": ["female", "male"]})


def test_a_non_finite_proportion_is_refused_naming_the_key():
    from fairtune.data import AttributeSpec, SchemaError, Target, TargetConfig

    spec = AttributeSpec({"color": ["red", "blue"]})
    with pytest.raises(SchemaError, match="target.proportions has a proportion that is not a finite"):
        Target(TargetConfig(proportions={"red": float("nan"), "blue": 0.5}), spec)
