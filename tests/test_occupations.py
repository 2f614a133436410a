import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from fairtune.cli import main
from fairtune.models import make_tiny_clip

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "occupations"
SD = 16  # the tiny SD's image side


def _yaml(name):
    return yaml.safe_load((CONFIGS / name).read_text())


def test_occupation_sets_are_consistent_and_disjoint():
    fit = _yaml("sd15.yaml")
    cmp = {g["name"]: g for g in _yaml("compare.yaml")["prompts"]}
    files = {g["name"]: g for f in ("occupations.yaml", "winobias.yaml") for g in _yaml(f"prompts/{f}")}
    train = fit["model"]["fairness"]["concepts"]
    assert train == cmp["seen"]["values"] == files["seen"]["values"]
    assert cmp["heldout"]["values"] == files["heldout"]["values"]
    assert cmp["winobias"]["values"] == files["winobias"]["values"]
    held, wino = set(cmp["heldout"]["values"]), {w.lower() for w in cmp["winobias"]["values"]}
    assert len(train) == 103 and len(held) == 26 and len(wino) == 36
    assert not (set(train) & held) and not (set(train) & wino) and not (held & wino)
    template = "a photo of the face of a {value}, a person"
    assert fit["model"]["fairness"]["prompt"] == template.replace("{value}", "{concept}")
    assert cmp["seen"]["template"] == cmp["heldout"]["template"] == template
    for f in ("style_context.yaml", "personal_descriptors.yaml"):
        for g in _yaml(f"prompts/{f}"):
            assert g["values"] and "{value}" in g["template"]


def test_recipes_carry_the_published_settings():
    fit = _yaml("sd15.yaml")
    assert fit["model"]["lora"]["rank"] == 50 and _yaml("cheap.yaml")["model"]["lora"]["rank"] < 50
    assert fit["data"]["target"] == {"attributes": ["gender"], "proportions": "uniform"}
    joint = _yaml("gender_race.yaml")
    assert joint["data"]["target"]["attributes"] == ["gender", "race"]
    classes = joint["model"]["fairness"]["classifier"]["init_args"]["classes"]
    assert set(classes) == set(joint["model"]["fairness"]["classifier"]["init_args"]["prompts"])
    assert len(classes) == 2 * len(fit["data"]["attributes"]["race"])
    (fd,) = [m for m in _yaml("compare.yaml")["methods"] if m["kind"] == "fair_diffusion"]
    assert fd["fair_diffusion"] == {
        "edit_prompts": {"male": "male person", "female": "female person"},
        "edit_guidance_scale": 4.0,
        "edit_warmup_steps": 5,
        "edit_threshold": 0.95,
        "edit_momentum_scale": 0.5,
        "edit_mom_beta": 0.6,
    }
    # the judges are not the training classifier (another CLIP, other prompts)
    cmp = _yaml("compare.yaml")
    train_clf = fit["model"]["fairness"]["classifier"]["init_args"]
    assert cmp["judges"]["clip"]["clip"] != train_clf["clip"]
    assert cmp["judges"]["second"]["clip"] not in (train_clf["clip"], cmp["judges"]["clip"]["clip"])


def labelled_faces(root: Path, occupations, *, n_per=4, seed=0, size=SD) -> Path:
    """A tiny imagefolder in the recipe's layout: random images with occupation, gender and race."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for occ in occupations:
        for i in range(n_per):
            gender = ["male", "female"][i % 2]
            race = ["WMELH", "Asian", "Black", "Indian"][int(rng.integers(4))]
            tint = np.array([200, 60, 60]) if gender == "male" else np.array([60, 60, 200])
            arr = np.clip(tint + rng.normal(0, 30, size=(size, size, 3)), 0, 255).astype(np.uint8)
            name = f"{occ.replace(' ', '_')}_{i}.png"
            Image.fromarray(arr).save(root / name)
            rows.append({"file_name": name, "prompt": f"a photo of the face of a {occ}, a person",
                         "concept": occ, "gender": gender, "race": race})  # fmt: skip
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture(scope="module")
def stand_ins(tiny_sd, tmp_path_factory):
    """Tiny stand-ins for every model the recipe names: SD, the training CLIP, two judge CLIPs."""
    root = tmp_path_factory.mktemp("occupations")
    fit = _yaml("sd15.yaml")
    return {
        "sd": str(tiny_sd),
        "clip_train": str(make_tiny_clip(root / "clip_train", seed=0)),
        "clip_judge": str(make_tiny_clip(root / "clip_judge", seed=1)),
        "clip_second": str(make_tiny_clip(root / "clip_second", seed=2)),
        "data": str(labelled_faces(root / "data", fit["model"]["fairness"]["concepts"][:6])),
        "calibration": str(labelled_faces(root / "calibration", ["calibration"], n_per=40, seed=1)),
        "root": root,
    }


def fit_args(s: dict, out: Path, *configs: str) -> list[str]:
    """``fairtune fit`` on the recipe, overriding only paths and sizes: the tiny models and data, a
    few steps, small batches. (Command-line keys, so a nested ``init_args`` key changes alone.)"""
    args = ["fit", "--config", str(CONFIGS / "sd15.yaml")]
    for c in configs:
        args += ["--config", str(c)]
    sizes = {
        "trainer.max_steps": 1,
        "trainer.accelerator": "cpu",
        "trainer.devices": 1,
        "trainer.default_root_dir": str(out),
        "trainer.enable_progress_bar": False,
        "trainer.enable_model_summary": False,
        "trainer.log_every_n_steps": 1,
        "model.backbone.pretrained": s["sd"],
        "model.backbone.resolution": SD,
        "model.fairness.samples_per_concept": 2,
        "model.fairness.full_chain_steps": 2,
        "model.fairness.classifier.init_args.clip": s["clip_train"],
        "model.fairness.preservation.clip": s["clip_train"],
        "data.source.path": s["data"],
        "data.image_size": SD,
        "data.batch_size": 4,
        "data.samples_per_epoch": 8,
    }
    for k, v in sizes.items():
        args += [f"--{k}", str(v)]
    return args


def test_recipe_trains_with_tiny_stand_ins(stand_ins, tmp_path):
    """configs/occupations/sd15.yaml, unchanged but for paths and sizes: lever 3 with the CLIP
    zero-shot classifier and CLIP preservation trains the LoRA and exports a loadable adapter."""
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "run"
    main(fit_args(stand_ins, out))
    adapter = out / "adapter"
    card = (adapter / "README.md").read_text()
    assert "| levers | fairness |" in card and stand_ins["sd"] in card and "| steps | 1 |" in card
    assert '"rank": 50' in card  # the recipe's LoRA, unchanged
    pipe = StableDiffusionPipeline.from_pretrained(stand_ins["sd"], safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(adapter))
    img = pipe("a photo of the face of a nurse, a person", num_inference_steps=2, output_type="pt").images
    assert img.shape == (1, 3, SD, SD)


def test_gender_race_and_cheap_overlays_build(stand_ins, tmp_path):
    from fairtune.cli import FairtuneCLI
    from fairtune.data import AttributeDataModule
    from fairtune.models import CLIPZeroShotClassifier
    from fairtune.train import DebiasModule

    args = fit_args(stand_ins, tmp_path / "joint", CONFIGS / "gender_race.yaml", CONFIGS / "cheap.yaml")[1:]
    cli = FairtuneCLI(DebiasModule, AttributeDataModule, args=args, run=False)
    clf = cli.model.fairness_loss.classifier
    assert isinstance(clf, CLIPZeroShotClassifier) and clf.clip == stand_ins["clip_train"]
    assert clf.classes[0] == "male+WMELH" and len(clf.classes) == 8
    assert cli.model.lora.rank == 8 and cli.model.fairness.path == "ddim"
    cli.datamodule.setup("fit")
    assert cli.datamodule.target.groups == clf.classes  # the classifier's outputs are the target's groups


@pytest.mark.slow
def test_end_to_end_all_levers_then_compare_with_two_clip_judges(stand_ins, tmp_path):
    """Tiny SD + tiny CLIPs: train with all three levers (sampler, adversary, lever 3 with the CLIP
    zero-shot classifier and CLIP preservation), export, then compare base / adapter / Fair Diffusion /
    prompt augmentation with the occupations compare config (CLIP judge, second CLIP judge, judge-error
    correction on labelled calibration images, same-seed change score) into metrics.json and
    report.html."""
    run = tmp_path / "run"
    main(
        fit_args(stand_ins, run)
        + ["--trainer.max_steps", "3", "--data.rebalance", "{unknown: keep}",
           "--model.adversary", "{weight: 0.5, warmup_steps: 0}"]
    )  # fmt: skip
    adapter = run / "adapter"
    card = (adapter / "README.md").read_text()
    assert "| levers | sampler, adversary, fairness |" in card

    cmp = _yaml("compare.yaml")
    for m in cmp["methods"]:
        if m["kind"] == "adapter":
            m["adapter"] = str(adapter)  # a path
    methods = tmp_path / "methods.yaml"
    methods.write_text(yaml.safe_dump({"methods": cmp["methods"]}))
    out = tmp_path / "compare"
    main(
        ["compare", "--config", str(CONFIGS / "compare.yaml"), "--config", str(methods), "--out", str(out),
         "--backbone.pretrained", stand_ins["sd"], "--backbone.resolution", str(SD),
         "--judges.clip.clip", stand_ins["clip_judge"], "--judges.second.clip", stand_ins["clip_second"],
         "--judges.calibration", stand_ins["calibration"],
         "--judges.change_features", stand_ins["clip_judge"], "--judges.correction_boot", "100",
         "--generation.n_per_prompt", "2", "--generation.steps", "2", "--generation.batch_size", "256"]
    )  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["methods"]) == ["base", "debiased", "fair_diffusion", "prompt_augmentation"]
    assert "CLIP zero-shot" in metrics["judges"] and "second judge" in metrics["judges"]
    meas = metrics["measurement"]
    assert meas["calibration"]["n"] == 40 and meas["change_base"] == "base"
    assert len(meas["calibration"]["confusion_first"]) == 2
    n_prompts = len(metrics["prompts"])
    assert n_prompts == 103 + 26 + 36 + 6
    for name, m in metrics["methods"].items():
        s = m["summary"]
        assert s["mean_dev_corrected_seen"] is not None and 0 <= s["mean_dev_corrected_seen"] <= 1
        assert s["agreement"] is None or 0 <= s["agreement"] <= 1
        assert s["n_images"] == 2 * n_prompts
        r = next(iter(m["per_concept"].values()))
        assert (
            len(r["corrected"]) == 2 and r["corrected_low"][0] <= r["corrected"][0] <= r["corrected_high"][0]
        )
        if name == "base":
            assert s["change_score"] == 0.0
        else:
            lo, hi = s["change_score_ci"]
            assert 0 <= lo <= s["change_score"] <= hi
    # Fair Diffusion changes the base image of the same seed more than nothing does
    assert metrics["methods"]["fair_diffusion"]["summary"]["change_score"] > 0
    html = (out / "report.html").read_text()
    assert "Measurement: judge error, agreement, change" in html and "corrected mean dev seen" in html
    # the adapter's model card now carries the figures measured
    card = (adapter / "README.md").read_text()
    assert "No audit recorded yet" not in card and "mean deviation, judge-corrected" in card


def test_audit_with_a_clip_judge_a_second_judge_and_calibration(stand_ins, tmp_path):
    """`fairtune audit` on the tiny SD, judged by CLIP zero-shot, with agreement and corrected shares."""
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text(yaml.safe_dump([{"name": "seen", "role": "seen", "template": "a photo of a {value}",
                                        "values": ["nurse", "pilot"]}]))  # fmt: skip
    out = tmp_path / "audit"
    main(
        ["audit", "--model", stand_ins["sd"], "--prompts", str(prompts), "--out", str(out),
         "--judges.kind", "clip", "--judges.attribute", "gender", "--judges.classes", "[male, female]",
         "--judges.clip.clip", stand_ins["clip_judge"],
         "--judges.clip.prompts", json.dumps({"male": ["a man"], "female": ["a woman"]}),
         "--judges.second.clip", stand_ins["clip_second"], "--judges.calibration", stand_ins["calibration"],
         "--judges.correction_boot", "50", "--judges.reference", "null", "--target.attributes", "[gender]",
         "--generation.n_per_prompt", "6", "--generation.steps", "2"]
    )  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    (m,) = metrics["methods"].values()
    s = m["summary"]
    assert metrics["measurement"]["calibration"]["n"] == 40
    assert 0 <= s["calibration_accuracy"] <= 1 and s["n_calibration"] == 40
    assert s["mean_dev_corrected_seen"] is not None and s["mean_dev_heldout"] is None
    assert s["change_score"] is None  # no base method to compare with
    for r in m["per_concept"].values():
        assert r["corrected_low"][0] <= r["corrected"][0] <= r["corrected_high"][0]
        assert r["n"] + r["undetermined"] == 6
    assert "Measurement: judge error, agreement, change" in (out / "report.md").read_text()
