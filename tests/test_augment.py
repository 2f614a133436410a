"""Augmentation of under-represented groups (issue 16, part 5): explicit-prompt images from the base
model for the rare concept x class cells, kept when the training classifier places them in the cell's
class, added as records marked synthetic; the sampler's repeat factor in those cells falls."""

from __future__ import annotations

import json

import pytest
import torch
from test_audit_callback import JUDGE_ARGS, color_judge_dir  # noqa: F401 - a fixture

from fairtune.cli import main
from fairtune.data import AttributeSpec, TableDataset, load_table
from fairtune.models import ClassifierConfig, load_classifier
from fairtune.train._augment import rare_cells, repeat_factor


def test_rare_cells_and_repeat_factor():
    concepts = ["a"] * 20 + ["b"] * 10
    labels = ["red"] * 19 + ["blue"] + ["red"] * 5 + ["blue"] * 4 + [None]
    assert rare_cells(concepts, labels, ["red", "blue"], 0.1) == {("a", "blue"): 1}
    # a 5% cell drawn at 50% repeats each image 10x as often as the data would
    assert repeat_factor(1, 20, 0.5) == pytest.approx(10.0)
    assert repeat_factor(0, 20, 0.5) is None


@pytest.mark.slow  # generates and judges the rare cells
def test_augment_adds_accepted_synthetic_records_to_the_rare_cells(digits_dir, color_judge_dir, tmp_path):  # noqa: F811
    out = tmp_path / "augmented"
    weights = str(color_judge_dir / "color_cnn.safetensors")
    main(["data", "augment", "--table", str(digits_dir / "table"), "--out", str(out),
          "--model", "colored-digits-16", "--classifier.module", "fairtune.colored_digits.SmallCNN",
          "--classifier.init_args", json.dumps(JUDGE_ARGS), "--classifier.weights", weights,
          "--augment.attribute", "color", "--augment.classes", "[red, blue]",
          "--augment.template", "a {cls} handwritten {concept}",
          "--augment.record_prompt", "a handwritten {concept}",
          "--augment.min_share", "0.08", "--augment.per_cell", "12", "--augment.max_tries", "2",
          "--augment.steps", "8", "--augment.target.attributes", "[color]"])  # fmt: skip
    report = json.loads((out / "augment.json").read_text())
    # the default skew: digit 0 is 95% red, digit 9 95% blue; only those cells are under 8%
    assert [(c["concept"], c["class"]) for c in report["cells"]] == [("digit 0", "blue"), ("digit 9", "red")]
    real = load_table(str(digits_dir / "table"))
    table = load_table(str(out))
    synth = table.filter(lambda r: r["synthetic"])
    assert len(table) == len(real) + len(synth) and len(synth) == report["synthetic"]
    for cell in report["cells"]:
        assert 0 < cell["accepted"] <= 12 and cell["generated"] <= 24
        assert cell["prompt"] == f"a {cell['class']} handwritten {cell['concept']}"
        assert cell["records_after"] == cell["records"] + cell["accepted"]
        assert cell["repeat_factor_after"] < cell["repeat_factor_before"]
        rows = synth.filter(lambda r, c=cell: r["concept"] == c["concept"])
        assert len(rows) == cell["accepted"] and set(rows["color"]) == {cell["class"]}
        assert set(rows["prompt"]) == {f"a handwritten {cell['concept']}"}
    # every kept image is one the classifier places in its cell's class, confidently
    clf = load_classifier(
        ClassifierConfig(module="fairtune.colored_digits.SmallCNN", init_args=JUDGE_ARGS, weights=weights)
    )
    from fairtune.data import images_from_table

    with torch.no_grad():
        p = clf(images_from_table(synth)).softmax(1)
    want = torch.tensor([["red", "blue"].index(c) for c in synth["color"]])
    assert (p.argmax(1) == want).all() and (p.gather(1, want[:, None]) >= 0.9 - 1e-3).all()
    # the training data module reads the augmented table like any other
    ds = TableDataset(str(out), AttributeSpec({"color": ["red", "blue"]}))
    assert len(ds) == len(table)


@pytest.mark.parametrize(
    ("over", "needle"),
    [
        ({"per_cell": -3}, "augment.per_cell must be >= 1"),
        ({"min_share": 2.0}, "augment.min_share must be in"),
        ({"max_tries": 0}, "augment.max_tries must be >= 1"),
        ({"classes": ["red", "green"]}, r"augment.classes names \['green'\]"),
    ],
)
def test_bad_augment_settings_are_refused_naming_the_key(digits_dir, tmp_path, over, needle):
    from fairtune.train import AugmentConfig, augment_table

    cfg = AugmentConfig(**{"attribute": "color", "classes": ["red", "blue"], **over})
    with pytest.raises(ValueError, match=needle):
        augment_table(digits_dir / "table", tmp_path / "out", config=cfg, backbone=None, classifier=None)
    assert not (tmp_path / "out").exists()


def test_augment_never_writes_over_the_table_it_reads(digits_dir):
    from fairtune.train import AugmentConfig, augment_table

    cfg = AugmentConfig(attribute="color", classes=["red", "blue"])
    before = sorted(p.name for p in (digits_dir / "table").rglob("*"))
    for out in (digits_dir / "table", digits_dir):
        with pytest.raises(ValueError, match="would overwrite the table it reads"):
            augment_table(digits_dir / "table", out, config=cfg, backbone=None, classifier=None)
    assert sorted(p.name for p in (digits_dir / "table").rglob("*")) == before
