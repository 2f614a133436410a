"""`fairtune compare` / `fairtune audit`: the same seeds for every method, judged metrics, reports."""

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from fairtune.cli import main
from fairtune.colored_digits import judge_config
from fairtune.data import TargetConfig
from fairtune.eval import (
    CompareConfig,
    GenerationConfig,
    MethodConfig,
    PromptGroup,
    audit,
    compare_methods,
    load_prompt_file,
    run_comparison,
    write_report,
)
from fairtune.models import (
    BackboneConfig,
    FairDiffusionConfig,
    PromptAugmentationConfig,
)

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "compare"
N, STEPS = 8, 4
RED_9 = {"digit 9": {"red": 1.0, "blue": 0.0}}  # 100% red for the most blue-skewed digit


def _prompts():
    return [
        PromptGroup("seen", "seen", "a handwritten digit {value}", [9], "digit {value}"),
        PromptGroup("heldout", "heldout", "a handwritten digit {value}", [8], "digit {value}"),
        PromptGroup("paraphrase", "paraphrase", "a drawing of the number {value}", [9], "digit {value}"),
    ]


def _judges(judges_dir, digits_dir):
    return judge_config(judges_dir, reference=digits_dir, n_reference=256)


def _config(judges_dir, digits_dir, methods, **kw):
    return CompareConfig(
        methods=methods,
        prompts=_prompts(),
        backbone=BackboneConfig(kind="tiny", pretrained="colored-digits-16"),
        judges=_judges(judges_dir, digits_dir),
        target=TargetConfig(attributes=["color"], proportions="uniform", per_concept=RED_9),
        generation=GenerationConfig(n_per_prompt=N, steps=STEPS, batch_size=64),
        **kw,
    )


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Sample with one thread: on a shared 2-core machine, two threads per process thrash (measured
    here: 48 images x 4 steps took 1.9 s with one thread and 12-18 s with two under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def compared(backbone, adapter_dir, judges_dir, digits_dir, tmp_path_factory):
    """base, an adapter, base again (no leak from the adapter), and both inference-time baselines."""
    methods = [
        MethodConfig("base"),
        MethodConfig("adapter", kind="adapter", adapter=str(adapter_dir)),
        MethodConfig("base_again"),
        MethodConfig(
            "prompt_aug",
            kind="prompt_augmentation",
            prompt_augmentation=PromptAugmentationConfig(words={"red": "red", "blue": "blue"}),
        ),
        MethodConfig(
            "fair_diffusion",
            kind="fair_diffusion",
            fair_diffusion=FairDiffusionConfig(
                edit_prompts={"red": "red", "blue": "blue"}, edit_warmup_steps=1
            ),
        ),
    ]
    cfg = _config(judges_dir, digits_dir, methods)
    metrics, images = compare_methods(cfg, backbone=backbone, progress=False)
    out = tmp_path_factory.mktemp("compare")
    write_report(metrics, images, out, grid_columns=4)
    return cfg, metrics, images, out


def test_metrics_hold_every_field(compared):
    _, metrics, _, _ = compared
    assert list(metrics["methods"]) == ["base", "adapter", "base_again", "prompt_aug", "fair_diffusion"]
    assert metrics["classes"] == ["red", "blue"]
    keys = ["seen/digit 9", "heldout/digit 8", "paraphrase/digit 9"]
    for m in metrics["methods"].values():
        assert list(m["per_concept"]) == keys
        for r in m["per_concept"].values():
            for f in ("p_hat", "dev", "fd", "kl", "bias", "dev_ci", "fd_ci", "kl_ci", "bias_ci", "n"):
                assert f in r
            assert r["n"] + r["undetermined"] == N
            assert sum(r["p_hat"]) == pytest.approx(1.0)
            assert 0.0 <= r["fidelity"] <= 1.0
        s = m["summary"]
        for f in ("mean_dev_seen", "worst_dev_seen", "mean_dev_heldout", "mean_dev_paraphrase"):
            assert 0.0 <= s[f] <= 1.0
        lo, hi = s["mean_dev_seen_ci"]
        assert lo <= s["mean_dev_seen"] + 1e-9 and s["mean_dev_seen"] - 1e-9 <= hi
        assert s["frechet"] > 0 and s["sec_per_image"] > 0 and s["n_images"] == 3 * N
        # the per-concept target: digit 9 must be all red, digit 8 half red
    assert metrics["methods"]["base"]["per_concept"]["seen/digit 9"]["target"] == [1.0, 0.0]
    assert metrics["methods"]["base"]["per_concept"]["heldout/digit 8"]["target"] == [0.5, 0.5]


def test_unet_evaluations_are_counted(compared):
    _, metrics, _, _ = compared
    s = {n: m["summary"] for n, m in metrics["methods"].items()}
    for name in ("base", "adapter", "prompt_aug"):
        assert s[name]["unet_evals_per_image"] == 2 * STEPS == s[name]["unet_evals_per_image_formula"]
    # Fair Diffusion: unconditional + conditional + one per edit prompt (red, blue)
    assert s["fair_diffusion"]["unet_evals_per_image"] == 4 * STEPS


def test_same_seeds_same_images_and_no_adapter_leak(compared):
    _, metrics, images, _ = compared
    m = metrics["methods"]
    assert torch.equal(images["base"], images["base_again"])
    assert m["base"]["images_sha256"] == m["base_again"]["images_sha256"]
    assert m["adapter"]["images_sha256"] != m["base"]["images_sha256"]
    assert (images["adapter"] - images["base"]).abs().mean() > 0.01


def test_prompt_augmentation_moves_the_red_share_toward_its_target(compared):
    _, metrics, _, _ = compared
    base, aug = metrics["methods"]["base"], metrics["methods"]["prompt_aug"]
    for key in ("seen/digit 9", "paraphrase/digit 9"):  # target 100% red on the bluest digit
        assert aug["per_concept"][key]["drawn_share"] == [1.0, 0.0]
        assert aug["per_concept"][key]["p_hat"][0] >= base["per_concept"][key]["p_hat"][0] + 0.5
    assert aug["summary"]["mean_dev_seen"] < base["summary"]["mean_dev_seen"] - 0.4
    assert aug["summary"]["follows_drawn_class"] > 0.7


def test_report_is_written_and_self_contained(compared):
    _, metrics, _, out = compared
    md = (out / "report.md").read_text()
    for name in metrics["methods"]:
        assert f"| {name} |" in md
        assert (out / f"grid_{name}.png").stat().st_size > 0
    for png in re.findall(r"\]\(([^)]+)\)", md):
        assert (out / png).is_file()
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2 + len(metrics["methods"])
    assert not re.search(r"""(src|href)=["'](?!data:)""", html)  # nothing loaded from elsewhere
    assert "<table>" in html and "mean dev seen" in html


def test_cli_compare_reproduces_the_base_images(compared, judges_dir, digits_dir, tmp_path, capsys):
    """A second run, through the CLI and a YAML config: the same seeds give the same base images."""
    _, metrics, _, _ = compared
    cfg = {
        "backbone": {"kind": "tiny", "pretrained": "colored-digits-16"},
        "methods": [{"name": "base", "kind": "base"}],
        "prompts": [
            {"name": g.name, "role": g.role, "template": g.template, "values": g.values, "concept": g.concept}
            for g in _prompts()
        ],
        "judges": {
            "kind": "panel",
            "panel": "fairtune.colored_digits:judge_panel",
            "options": {"path": str(judges_dir), "color_judge": "hue"},
            "reference": str(digits_dir),
            "n_reference": 256,
        },
        "target": {"attributes": ["color"], "proportions": "uniform", "per_concept": RED_9},
        "generation": {"n_per_prompt": N, "steps": STEPS, "batch_size": 64},
    }
    path = tmp_path / "cmp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    main(["compare", "--config", str(path), "--out", str(tmp_path / "out")])
    written = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert written["methods"]["base"]["images_sha256"] == metrics["methods"]["base"]["images_sha256"]
    assert written["methods"]["base"]["per_concept"] == metrics["methods"]["base"]["per_concept"]
    assert (tmp_path / "out" / "report.html").is_file()
    assert "| base | base |" in capsys.readouterr().out  # the summary table is printed


@pytest.mark.parametrize("name", ["colored_digits.yaml", "baselines.yaml"])
def test_shipped_configs_parse(name, capsys):
    with pytest.raises(SystemExit) as e:
        main(["compare", "--config", str(CONFIGS / name), "--out", "x", "--print_config"])
    assert e.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["generation"]["n_per_prompt"] == 128 and printed["generation"]["guidance_scale"] == 2.0
    assert {m["kind"] for m in printed["methods"]} >= {"base", "fair_diffusion", "prompt_augmentation"}
    roles = [g["role"] for g in printed["prompts"]]
    assert {"seen", "heldout", "paraphrase"} <= set(roles)
    if name == "colored_digits.yaml":  # the demo's: every role, explicit prompts naming both inks
        assert roles == ["seen", "named", "heldout", "paraphrase", "explicit", "explicit"]
        assert [g["names"] for g in printed["prompts"] if g["role"] == "explicit"] == ["red", "blue"]


def test_clear_errors_before_any_work(judges_dir, digits_dir, tmp_path):
    def run(methods=(MethodConfig("base"),), **overrides):
        cfg = dataclasses.replace(_config(judges_dir, digits_dir, list(methods)), **overrides)
        run_comparison(cfg, tmp_path / "never", progress=False)

    with pytest.raises(ValueError, match="unknown kind 'magic'"):
        run([MethodConfig("m", kind="magic")])
    with pytest.raises(FileNotFoundError, match="pytorch_lora_weights.safetensors"):
        run([MethodConfig("a", kind="adapter", adapter=str(tmp_path))])
    with pytest.raises(ValueError, match="prompts is empty"):
        run(prompts=[])
    with pytest.raises(ValueError, match="'seen' is empty"):
        run(prompts=[PromptGroup("seen", template="digit {value}")])
    with pytest.raises(ValueError, match=r"unique, repeated: \['base'\]"):
        run([MethodConfig("base"), MethodConfig("base")])
    with pytest.raises(ValueError, match="no prompt_augmentation settings"):
        run([MethodConfig("p", kind="prompt_augmentation")])
    aug = PromptAugmentationConfig(words={"red": "red", "green": "green"})
    with pytest.raises(ValueError, match=r"words names classes \['green', 'red'\]"):
        run([MethodConfig("p", kind="prompt_augmentation", prompt_augmentation=aug)])
    with pytest.raises(ValueError, match=r"target.attributes=\['gender'\]"):
        run(target=TargetConfig(attributes=["gender"]))
    assert not (tmp_path / "never").exists()


def test_cli_rejects_an_unknown_kind(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"methods": [{"name": "m", "kind": "magic"}], "prompts": []}))
    with pytest.raises(SystemExit):
        main(["compare", "--config", str(path), "--out", str(tmp_path / "o")])
    assert "magic" in capsys.readouterr().err


def test_prompt_files(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("# occupations\na photo of a doctor\n\na photo of a nurse\n")
    (g,) = load_prompt_file(txt)
    assert [e.prompt for e in g.entries()] == ["a photo of a doctor", "a photo of a nurse"]
    mapping = tmp_path / "p.yaml"
    mapping.write_text(
        yaml.safe_dump({"doctor": ["a photo of a doctor", "a doctor at work"], "nurse": "a nurse"})
    )
    seen, para = load_prompt_file(mapping)
    assert [(e.role, e.concept, e.prompt) for e in seen.entries() + para.entries()] == [
        ("seen", "doctor", "a photo of a doctor"),
        ("seen", "nurse", "a nurse"),
        ("paraphrase", "doctor", "a doctor at work"),
    ]
    groups = tmp_path / "g.json"
    groups.write_text(json.dumps({"prompts": [{"name": "d", "template": "digit {value}", "values": [1, 2]}]}))
    assert [e.key for e in load_prompt_file(groups)[0].entries()] == ["d/1", "d/2"]
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(ValueError, match="holds no prompt"):
        load_prompt_file(tmp_path / "empty.txt")


def test_audit_tiny_stable_diffusion_with_a_classifier_judge(tiny_sd, tmp_path, capsys):
    """Any classifier module as the attribute judge; no concept judge or reference: fidelity and
    Fréchet are n/a."""
    from safetensors.torch import save_file

    from fairtune.colored_digits import SmallCNN

    torch.manual_seed(0)
    weights = tmp_path / "clf.safetensors"
    save_file(SmallCNN(2, 4, 8).state_dict(), str(weights))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a doctor\na photo of a nurse\n")
    clf = {
        "module": "fairtune.colored_digits.SmallCNN",
        "init_args": {"num_classes": 2, "width": 4, "feature_dim": 8},
    }
    clf["weights"] = str(weights)
    out = tmp_path / "audit"
    main(
        [
            "audit",
            "--model", str(tiny_sd),
            "--prompts", str(prompts),
            "--out", str(out),
            "--judges.kind", "classifier",
            "--judges.attribute", "gender",
            "--judges.classes", "[female, male]",
            "--judges.classifier", json.dumps(clf),
            "--judges.reference", "null",
            "--target.attributes", "[gender]",
            "--generation.n_per_prompt", "4",
            "--generation.steps", "2",
        ]
    )  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    (m,) = metrics["methods"].values()
    assert metrics["classes"] == ["female", "male"] and metrics["image_size"] == 16
    assert list(m["per_concept"]) == ["prompts/a photo of a doctor", "prompts/a photo of a nurse"]
    for r in m["per_concept"].values():
        assert r["n"] + r["undetermined"] == 4 and r["fidelity"] is None
    assert m["summary"]["fidelity"] is None and m["summary"]["frechet"] is None
    assert m["summary"]["unet_evals_per_image"] == 4
    row = next(line for line in (out / "report.md").read_text().splitlines() if line.startswith("| model |"))
    assert (
        row.count("n/a") == 7
    )  # named, held-out, paraphrase dev, explicit kept, fidelity, Fréchet, follows drawn
    assert "| model |" in capsys.readouterr().out


def test_audit_shipped_model_with_judges_and_adapter(backbone, adapter_dir, judges_dir, digits_dir, tmp_path):
    import shutil

    from fairtune.models import write_model_card

    adapter = tmp_path / "adapter"
    shutil.copytree(adapter_dir, adapter)
    write_model_card(adapter, base_model="colored-digits-16", kind="tiny", target=None, levers={}, steps=1,
                     lora=None)  # fmt: skip
    card = (adapter / "README.md").read_text()
    prompts = tmp_path / "digits.yaml"
    prompts.write_text(yaml.safe_dump([{"name": "seen", "template": "a handwritten digit {value}",
                                        "values": [1, 9], "concept": "digit {value}"}]))  # fmt: skip
    kwargs = dict(
        model="colored-digits-16",
        adapter=adapter,
        prompts=prompts,
        judges=_judges(judges_dir, digits_dir),
        generation=GenerationConfig(n_per_prompt=4, steps=STEPS),
        backbone=backbone,
        progress=False,
        name="tuned",
    )
    metrics = audit(out=tmp_path / "audit", **kwargs)
    (m,) = metrics["methods"].values()
    assert m["kind"] == "adapter"
    assert m["summary"]["fidelity"] is not None and m["summary"]["frechet"] is not None
    assert (tmp_path / "audit" / "report.html").is_file()
    # the adapter, an input, is left as it was; its card section is written beside the report
    assert (adapter / "README.md").read_text() == card
    assert "mean" in (tmp_path / "audit" / "model_card_tuned.md").read_text()
    # asked for, the section goes into the adapter's own card
    audit(out=tmp_path / "audit2", update_model_card=True, **kwargs)
    assert (adapter / "README.md").read_text() != card
    assert "No audit recorded yet" not in (adapter / "README.md").read_text()


def test_a_comparison_keeps_what_it_finishes_and_resumes(
    backbone, adapter_dir, judges_dir, digits_dir, tmp_path
):
    broken = tmp_path / "broken"
    broken.mkdir()
    good = (adapter_dir / "pytorch_lora_weights.safetensors").read_bytes()
    (broken / "pytorch_lora_weights.safetensors").write_bytes(good[: len(good) // 3])  # cut short
    methods = [
        MethodConfig("base"),
        MethodConfig("broken", kind="adapter", adapter=str(broken)),
        MethodConfig("adapter", kind="adapter", adapter=str(adapter_dir)),
    ]
    cfg = _config(judges_dir, digits_dir, methods)
    out = tmp_path / "cmp"
    with pytest.raises(RuntimeError, match="1 of 3 methods failed.*broken"):
        run_comparison(cfg, out, backbone=backbone, progress=False)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["methods"]["broken"]["failed"] and metrics["methods"]["broken"]["error"]
    assert metrics["methods"]["adapter"]["summary"]["mean_dev_seen"] is not None  # after the failure
    assert "`broken` failed:" in (out / "report.md").read_text()
    kept = {n: (out / "methods" / f"{n}.json").stat().st_mtime_ns for n in ("base", "adapter")}

    # fixed and started again: only the failed method runs; the finished ones are read back
    (broken / "pytorch_lora_weights.safetensors").write_bytes(good)
    again = run_comparison(cfg, out, backbone=backbone, progress=False)
    assert {n: (out / "methods" / f"{n}.json").stat().st_mtime_ns for n in kept} == kept
    for n in ("base", "adapter"):
        assert again["methods"][n]["images_sha256"] == metrics["methods"][n]["images_sha256"]
    assert again["methods"]["broken"]["images_sha256"] == again["methods"]["adapter"]["images_sha256"]
    # a changed method is not taken from the cache
    cfg.generation.seed = 1
    third = run_comparison(cfg, out, backbone=backbone, progress=False)
    assert third["methods"]["base"]["images_sha256"] != metrics["methods"]["base"]["images_sha256"]


def test_the_measurement_note_without_a_base_method_says_so():
    from fairtune.eval._report import _measurement_blocks

    metrics = {
        "methods": {"adapter": {"summary": {"agreement": 0.9, "kappa": 0.8}}},
        "measurement": {"change_base": None, "second_judge": "cnn"},
    }
    text = " ".join(b[1] for b in _measurement_blocks(metrics) if b[0] == "p")
    assert "None" not in text and "no base method" in text
    metrics["measurement"]["change_base"] = "base"
    text = " ".join(b[1] for b in _measurement_blocks(metrics) if b[0] == "p")
    assert "`base` image from the same seed" in text


def test_the_measurement_note_flags_a_judge_near_chance():
    from fairtune.eval._report import _measurement_blocks

    cal = {"n": 200, "accuracy_first": 0.49, "balanced_accuracy_first": 0.5, "informative_first": False}
    metrics = {
        "methods": {"adapter": {"summary": {"mean_dev_corrected_seen": 0.5, "calibration_accuracy": 0.49}}},
        "measurement": {"change_base": None, "calibration": cal},
    }
    text = " ".join(b[1] for b in _measurement_blocks(metrics) if b[0] == "p")
    assert "the judge is not informative" in text and "0.500" in text
    cal.update(accuracy_first=0.97, balanced_accuracy_first=0.97, informative_first=True)
    text = " ".join(b[1] for b in _measurement_blocks(metrics) if b[0] == "p")
    assert "not informative" not in text
