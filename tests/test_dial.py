"""The fairness dial: the judged mix against the adapter's scale, a scale per requested share."""

import json
import sys

import numpy as np
import pytest
import torch
import yaml
from conftest import judges_args

from fairtune.cli import main
from fairtune.colored_digits import judge_config
from fairtune.eval import (
    CompareConfig,
    GenerationConfig,
    MethodConfig,
    PromptEntry,
    compare_methods,
    curve_from_metrics,
    dial_curve,
    expand_request,
    load_prompt_file,
    scale_for,
    scales_for,
    score_judged,
    share_box,
    verify_request,
)
from fairtune.eval._compare import method_key
from fairtune.models import BackboneConfig


def _judges(path):
    return judge_config(path)


GEN = GenerationConfig(n_per_prompt=8, steps=4, batch_size=64)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread: two per process thrash on the shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ===================================================================== reading a scale off a curve
def _curve(shares_by_scale: dict[float, dict[str, float]], n: int = 100) -> dict:
    """A curve built by the scoring engine from judged labels: at each scale, ``round(share * n)`` of
    ``n`` images of each concept judged red (class 0), the rest blue."""
    entries = [
        PromptEntry(key=f"seen/{c}", group="seen", role="seen", concept=c, prompt=f"a {c}")
        for c in next(iter(shares_by_scale.values()))
    ]
    methods = {}
    for s, shares in shares_by_scale.items():
        labels = np.concatenate([(np.arange(n) >= round(shares[e.concept] * n)).astype(int) for e in entries])
        scored = score_judged(
            {"attribute": labels},
            entries,
            n_per_prompt=n,
            target_of=lambda c: [0.5, 0.5],
            classes=["red", "blue"],
        )
        methods[f"scale_{s:.2f}"] = {"kind": "adapter", **scored}
    metrics = {"attribute": "color", "classes": ["red", "blue"], "methods": methods}
    return curve_from_metrics(metrics, {f"scale_{s:.2f}": s for s in shares_by_scale})


def test_scale_for_interpolates_the_measured_curve():
    curve = _curve({0.0: {"a": 0.8, "b": 0.2}, 0.5: {"a": 0.6, "b": 0.3}, 1.0: {"a": 0.3, "b": 0.5}})
    a = curve["concepts"]["a"]["classes"]["red"]
    assert curve["scales"] == [0.0, 0.5, 1.0] and a["share"] == pytest.approx([0.8, 0.6, 0.3])
    lo, hi = share_box([80, 20])
    assert (a["low"][0], a["high"][0]) == pytest.approx((lo[0], hi[0]))  # the engine's exact interval
    # linear between the two measured scales around the requested share
    for want in (0.7, 0.45, 0.6, 0.8, 0.3):
        s = scale_for(curve, "a", "red", want)
        (s0, p0), (s1, p1) = next(
            ((x0, y0), (x1, y1))
            for (x0, y0), (x1, y1) in zip(
                zip(curve["scales"], a["share"]), zip(curve["scales"][1:], a["share"][1:])
            )
            if min(y0, y1) <= want <= max(y0, y1)
        )
        assert s0 <= s <= s1 and p0 + (p1 - p0) * (s - s0) / (s1 - s0) == pytest.approx(want)
    # the other class of a two-class attribute is the complement
    assert scale_for(curve, "a", "blue", 0.3) == pytest.approx(scale_for(curve, "a", "red", 0.7))
    # a curve that crosses twice: the crossing nearest the base model
    wavy = _curve({0.0: {"a": 0.9}, 0.5: {"a": 0.4}, 1.0: {"a": 0.8}})
    assert scale_for(wavy, "a", "red", 0.6) < 0.5
    # every concept at once ("*"), one named otherwise
    found = scales_for(curve, {"*": {"red": 0.4}, "a": {"red": 0.7}})
    assert found["a"]["requested"] == 0.7 and found["b"]["requested"] == 0.4
    assert found["b"]["scale"] == pytest.approx(scale_for(curve, "b", "red", 0.4))


def test_scale_for_names_the_concept_and_the_reachable_range():
    curve = _curve({0.0: {"digit 3": 0.8}, 1.0: {"digit 3": 0.6}})
    with pytest.raises(ValueError, match=r"'digit 3'.*0\.300.*scales 0 to 1.*0\.600 to 0\.800"):
        scale_for(curve, "digit 3", "red", 0.3)
    with pytest.raises(ValueError, match=r"unknown concept 'digit 4'.*digit 3"):
        scale_for(curve, "digit 4", "red", 0.7)
    with pytest.raises(ValueError, match=r"unknown class 'green'.*\['red', 'blue'\]"):
        scale_for(curve, "digit 3", "green", 0.7)
    with pytest.raises(ValueError, match="one class"):
        expand_request({"digit 3": {"red": 0.7, "blue": 0.3}}, ["digit 3"])
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        expand_request({"digit 3": {"red": 1.5}}, ["digit 3"])


def test_the_scale_is_part_of_the_cache_key():
    cfg = CompareConfig(methods=[], prompts=[], backbone=BackboneConfig(kind="tiny"))
    key = {
        s: method_key(cfg, MethodConfig("m", "adapter", "/nowhere", adapter_scale=s), cfg.backbone)
        for s in (0.5, 1.0)
    }
    assert key[0.5] != key[1.0]


# ========================================================================= the dial on a tiny model


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "digits.yaml"
    path.write_text(
        yaml.safe_dump(
            [
                {
                    "name": "seen",
                    "template": "a handwritten digit {value}",
                    "values": [1, 9],
                    "concept": "digit {value}",
                }
            ]
        )  # fmt: skip
    )
    return path


@pytest.fixture(scope="module")
def dialled(backbone, adapter_dir, judges_dir, prompts_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("dial")
    curve = dial_curve(
        adapter=adapter_dir, prompts=load_prompt_file(prompts_file), out=out, scales=[1.0, 0.0],
        backbone=backbone, judges=_judges(judges_dir), generation=GEN, progress=False,
    )  # fmt: skip
    return out, curve


def test_the_curve_is_written_per_concept_and_scale(dialled, backbone, judges_dir, prompts_file):
    out, curve = dialled
    saved = json.loads((out / "dial.json").read_text())
    assert saved["scales"] == [0.0, 1.0] and saved["methods"] == ["scale_0.00", "scale_1.00"]
    assert saved["classes"] == ["red", "blue"] and sorted(saved["concepts"]) == ["digit 1", "digit 9"]
    metrics = json.loads((out / "metrics.json").read_text())
    for concept, rec in saved["concepts"].items():
        assert set(rec) == {"prompts", "target", "n", "undetermined", "classes"}
        assert rec["prompts"] == [f"seen/{concept}"]
        for k, scale_method in enumerate(saved["methods"]):
            r = metrics["methods"][scale_method]["per_concept"][f"seen/{concept}"]
            assert rec["n"][k] == r["n"] and rec["n"][k] + rec["undetermined"][k] == GEN.n_per_prompt
            red = rec["classes"]["red"]
            if not r["n"]:  # every image undetermined: no share, no interval
                assert red["share"][k] is None and red["low"][k] is None and red["high"][k] is None
                continue
            assert red["share"][k] == pytest.approx(r["p_hat"][0])
            assert red["low"][k] <= red["share"][k] <= red["high"][k]
            assert rec["classes"]["blue"]["share"][k] == pytest.approx(1 - red["share"][k])
    assert (out / "dial.png").stat().st_size > 0
    report = (out / "report.md").read_text()
    assert "## Fairness dial" in report and "dial.png" in report and "| digit 9 | red |" in report
    # scale 0 is the base model: the same images, seed for seed
    base, _ = compare_methods(
        CompareConfig(methods=[MethodConfig("base")], prompts=load_prompt_file(prompts_file),
                      backbone=backbone.config, judges=_judges(judges_dir), generation=GEN),
        backbone=backbone, progress=False,
    )  # fmt: skip
    assert metrics["methods"]["scale_0.00"]["images_sha256"] == base["methods"]["base"]["images_sha256"]
    assert metrics["methods"]["scale_1.00"]["images_sha256"] != base["methods"]["base"]["images_sha256"]


def test_a_request_is_checked_at_its_scale_on_fresh_seeds(
    dialled, backbone, adapter_dir, judges_dir, prompts_file, monkeypatch, capsys
):
    out, curve = dialled
    measured = [p for p in curve["concepts"]["digit 9"]["classes"]["red"]["share"] if p is not None]
    assert measured, "no image of digit 9 was placed at any scale"
    want = (min(measured) + max(measured)) / 2  # between the measured shares: always reachable
    result = verify_request(
        curve, {"digit 9": {"red": want}}, adapter=adapter_dir, prompts=load_prompt_file(prompts_file),
        out=out, backbone=backbone, judges=_judges(judges_dir), generation=GEN, progress=False,
    )  # fmt: skip
    (row,) = result["rows"]
    assert row["concept"] == "digit 9" and row["requested"] == want
    assert row["scale"] == pytest.approx(scale_for(curve, "digit 9", "red", want), abs=1e-4)
    assert row["low"] <= row["landed"] <= row["high"] and row["abs_error"] == pytest.approx(
        abs(row["landed"] - want)
    )
    assert result["generation"]["seed"] == GEN.seed + GEN.n_per_prompt  # not the curve's seeds
    assert json.loads((out / "request.json").read_text()) == json.loads(json.dumps(result))
    assert "## Requested mixes" in (out / "report.md").read_text()

    # the same through the command line: the curve and the check are read back from OUT's cache
    before = (out / "methods" / "scale_1.00.json").stat().st_mtime_ns
    main(
        ["dial", "--model", "colored-digits-16", "--adapter", str(adapter_dir),
         "--prompts", str(prompts_file), "--out", str(out), "--scales", "[0, 1]",
         *judges_args(judges_dir),
         "--generation.n_per_prompt", "8", "--generation.steps", "4", "--generation.batch_size", "64",
         "--request", json.dumps({"digit 9": {"red": want}})]
    )  # fmt: skip
    assert (out / "methods" / "scale_1.00.json").stat().st_mtime_ns == before
    printed = capsys.readouterr().out
    assert f"digit 9: red {want:.2f} at adapter scale {row['scale']:.3f}" in printed
    assert json.loads((out / "request.json").read_text())["rows"] == result["rows"]


@pytest.mark.parametrize(
    "request_, named",
    [
        ({"digit 11": {"red": 0.7}}, "digit 11"),
        ({"digit 1": {"green": 0.7}}, "green"),
        ({"digit 1": {"red": 2}}, "[0, 1]"),
    ],
)
def test_a_bad_request_is_one_line_before_any_work(
    request_, named, judges_dir, prompts_file, adapter_dir, tmp_path, monkeypatch, capsys
):
    argv = ["fairtune", "dial", "--model", "colored-digits-16", "--adapter", str(adapter_dir), "--prompts",
            str(prompts_file), "--out", str(tmp_path / "o"), *judges_args(judges_dir),
            "--request", json.dumps(request_)]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.delenv("FAIRTUNE_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_:
        main()
    (line,) = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("fairtune: error:")]
    assert exit_.value.code == 2 and named in line and "request" in line
    assert not (tmp_path / "o").exists()
