"""Every YAML under configs/ instantiates (without training), and each ablation arm builds exactly
the levers it names."""

from pathlib import Path

import pytest
import yaml

from fairtune.cli import FairtuneCLI
from fairtune.data import AttributeDataModule
from fairtune.train import DebiasModule

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
LORA_BASE = CONFIGS / "colored_digits" / "lora.yaml"


# Overlays meant on top of other overlays (the feedback round continues a run of all three levers).
K3BG = CONFIGS / "colored_digits" / "lora_k3bg.yaml"  # the three-ink targets need its classes
AFTER = {
    "colored_digits/feedback_round.yaml": [CONFIGS / "ablations" / "all.yaml"],
    "targets/red20_blue30_green50.yaml": [K3BG],
    "targets/color_x_background_uniform.yaml": [K3BG],
}


def _is_full(path: Path) -> bool:
    if str(path.relative_to(CONFIGS)) in AFTER:
        return False
    return {"model", "trainer"} <= set(yaml.safe_load(path.read_text()) or {})


# Compare and sweep specs (demo/ holds one) are not training configs, launch overlays need GPUs and
# the occupations recipe names real Stable Diffusion and CLIP weights: tests/test_compare.py,
# tests/test_sweep.py, tests/test_distributed.py and tests/test_occupations.py (with tiny stand-ins)
# instantiate them.
NOT_FIT = ("compare", "sweeps", "launch", "occupations", "demo", "data", "judges")  # data/: see the last test
ALL = sorted(p for p in CONFIGS.rglob("*.yaml") if p.relative_to(CONFIGS).parts[0] not in NOT_FIT)
# ColoredDigits-SD's pretraining names the folder benchmarks/colored_digits_sd.py builds:
# tests/test_colored_digits_sd.py instantiates it on one built at toy scale.
# Its lever-3 overlay needs a CLIP probe trained on the shipped CLIP: that test trains one.
BUILT_FIRST = {"base/pretrain_colored_digits_sd.yaml", "colored_digits_sd/fairness.yaml"}
FULL = [p for p in ALL if _is_full(p) and str(p.relative_to(CONFIGS)) not in BUILT_FIRST]
OVERLAYS = [p for p in ALL if not _is_full(p) and str(p.relative_to(CONFIGS)) not in BUILT_FIRST]


@pytest.fixture(scope="module")
def classifier_weights(tmp_path_factory):
    """Stand-in weights for lever 3's classifier (the real ones come from `fairtune classifier train`)."""
    from safetensors.torch import save_file

    from fairtune.colored_digits import SmallCNN

    path = tmp_path_factory.mktemp("clf") / "classifier.safetensors"
    save_file(SmallCNN(2, 8, 16).state_dict(), str(path))
    return path


def _uses_fairness(paths) -> bool:
    return any((yaml.safe_load(p.read_text()) or {}).get("model", {}).get("fairness") for p in paths)


def _instantiate(*paths, tmp_path, classifier=None):
    args = []
    for p in paths:
        args += ["--config", str(p)]
    args += ["--trainer.default_root_dir", str(tmp_path)]
    if _uses_fairness(paths):
        args += ["--model.fairness.classifier.weights", str(classifier)]
    return FairtuneCLI(DebiasModule, AttributeDataModule, args=args, run=False)


@pytest.mark.parametrize("path", FULL, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_full_config_instantiates(path, tmp_path, classifier_weights):
    cli = _instantiate(path, tmp_path=tmp_path, classifier=classifier_weights)
    assert isinstance(cli.model, DebiasModule)
    assert cli.trainer.max_steps > 0


@pytest.mark.parametrize("path", OVERLAYS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_overlay_instantiates_on_the_lora_base(path, tmp_path, classifier_weights):
    before = AFTER.get(str(path.relative_to(CONFIGS)), [])
    cli = _instantiate(LORA_BASE, *before, path, tmp_path=tmp_path, classifier=classifier_weights)
    assert cli.model.lora is not None


# arm -> levers it must build
ARMS = {
    "naive": set(),
    "sampler": {"sampler"},
    "adversary": {"adversary"},
    "fairness": {"fairness"},
    "sampler_adversary": {"sampler", "adversary"},
    "sampler_fairness": {"sampler", "fairness"},
    "all": {"sampler", "adversary", "fairness"},
    "distill": {"sampler", "distill"},
}


def test_every_arm_has_an_overlay():
    assert {p.stem for p in (CONFIGS / "ablations").glob("*.yaml")} == set(ARMS)


@pytest.mark.parametrize("arm", sorted(ARMS))
def test_ablation_arm_builds_exactly_its_levers(arm, tmp_path, classifier_weights):
    cli = _instantiate(
        LORA_BASE, CONFIGS / "ablations" / f"{arm}.yaml", tmp_path=tmp_path, classifier=classifier_weights
    )
    built = set()
    if cli.datamodule.rebalance is not None:
        built.add("sampler")
    if cli.model.adversary is not None:
        assert cli.model._features is not None  # its hook is on the mid block
        built.add("adversary")
    else:
        assert not cli.model.backbone.unet.mid_block._forward_hooks
    if cli.model.fairness_loss is not None:
        built.add("fairness")
    if cli.model.distill_loss is not None:
        built.add("distill")
    assert built == ARMS[arm]


def test_target_overlay_sets_explicit_proportions(tmp_path):
    cli = _instantiate(LORA_BASE, CONFIGS / "targets" / "red30_blue70.yaml", tmp_path=tmp_path)
    assert cli.datamodule.target.proportions("digit 3") == [0.3, 0.7]


def test_the_k3bg_data_recipe_renders_what_its_fine_tune_overlay_declares(tmp_path):
    """configs/data/ holds `fairtune data colored-digits` configs; the three-ink one must render the
    inks the k3bg overlay trains on, with both backgrounds."""
    from fairtune.colored_digits import ColoredDigitsConfig

    recipe = yaml.safe_load((CONFIGS / "data" / "colored_digits_k3bg.yaml").read_text())
    cfg = ColoredDigitsConfig(**recipe)  # validates the share rows
    declared = yaml.safe_load(K3BG.read_text())["data"]["attributes"]
    assert cfg.colors == declared["color"] and cfg.background and "background" in declared


def test_the_benchmarks_judges_file_plugs_in_through_the_panel_extension_point(judges_dir):
    """`--judges configs/judges/colored_digits.yaml` (the docs' and the feedback benchmark's form)
    gives a panel-kind judge config, and its options replace the file's to point at other judges."""
    import json

    from fairtune.cli import load_compare_config
    from fairtune.eval import build_judges

    cfg = load_compare_config(
        CONFIGS / "compare" / "colored_digits.yaml",
        "--judges", str(CONFIGS / "judges" / "colored_digits.yaml"),
        "--judges.options", json.dumps({"path": str(judges_dir), "color_judge": "cnn"}),
        "--judges.reference", "null",
    )  # fmt: skip
    assert cfg.judges.kind == "panel" and cfg.judges.panel == "fairtune.colored_digits:judge_panel"
    panel = build_judges(cfg.judges)
    assert panel.attribute == "color" and "cnn judge" in panel.description
    cfg.judges.options = {"path": str(judges_dir), "colour": "hue"}
    with pytest.raises(ValueError, match="judges.options has unknown keys"):
        build_judges(cfg.judges)
