import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

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
        "trainer.max_steps": 2,
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
