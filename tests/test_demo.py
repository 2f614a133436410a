"""``fairtune demo`` end to end at toy scale: trains every arm, compares six methods, resumes; by
default the class adapters alone."""

import json
from pathlib import Path

import pytest
import yaml

from fairtune.cli import main


# The main job end to end (about a minute on 2 idle cores): `pytest -m slow` runs it.
@pytest.mark.slow
def test_demo_end_to_end_and_resume(digits_dir, judges_dir, tmp_path, capfd):
    out = tmp_path / "demo"
    args = [
        "demo",
        "--out", str(out),
        "--steps", "2",
        "--n_per_prompt", "4",
        "--sampling_steps", "2",
        "--paraphrase_digits", "[3]",
        "--data", str(digits_dir),
        "--judges", str(judges_dir),
        "--control", "true",
        "--single", "true",
    ]  # fmt: skip
    main(args)
    metrics = json.loads((out / "compare" / "metrics.json").read_text())
    methods = metrics["methods"]
    assert set(methods) == {
        "base",
        "naive",
        "debiased",
        "class_pair",
        "fair_diffusion",
        "prompt_augmentation",
    }
    record = json.loads((out / "demo.json").read_text())
    assert set(record["runs"]) == {"naive", "debiased", "red", "blue"} and record["train_debiased_s"] > 0
    assert methods["class_pair"]["class_adapters"] == {
        c: str(Path(record["runs"][c]) / "adapter") for c in ("red", "blue")
    }
    assert (
        methods["class_pair"]["summary"]["unet_evals_per_image"]
        == methods["base"]["summary"]["unet_evals_per_image"]
    )
    for arm, run in record["runs"].items():
        assert (Path(run) / "adapter" / "pytorch_lora_weights.safetensors").exists()
        assert (out / arm).resolve() == Path(run).resolve()  # the paths the compare YAML names
        config = yaml.safe_load((Path(run) / "config.yaml").read_text())
        assert config["trainer"]["max_steps"] == 2
        assert (config["model"]["distill"] is not None) == (arm != "naive")
    # the comparison judged this run's adapters
    assert methods["debiased"]["adapter"] == str(Path(record["runs"]["debiased"]) / "adapter")
    assert (out / "compare" / "report.html").stat().st_size > 0
    # the sweep runner echoed the children's progress lines
    assert "[sweep] debiased seed 0: step" in capfd.readouterr().err

    # Started again, the finished trainings are skipped (their adapters untouched).
    adapter = Path(record["runs"]["debiased"]) / "adapter" / "pytorch_lora_weights.safetensors"
    before = adapter.stat().st_mtime_ns
    main(args)
    assert adapter.stat().st_mtime_ns == before

    # By default the demo trains the class adapters alone (here: finds them trained) and compares their
    # mix with the baselines, each adapter fused at the compare config's scale.
    main(args[:-4])
    record = json.loads((out / "demo.json").read_text())
    assert set(record["runs"]) == {"red", "blue"}
    methods = json.loads((out / "compare" / "metrics.json").read_text())["methods"]
    assert set(methods) == {"base", "class_pair", "fair_diffusion", "prompt_augmentation"}
    assert methods["class_pair"]["adapter_scale"] == 1.5
    with pytest.raises(ValueError, match="nothing to train"):
        main([*args[:2], str(tmp_path / "none"), *args[3:-4], "--pair", "false"])


def test_the_demo_says_whether_its_figures_fall_inside_the_committed_range(tmp_path, capsys):
    from fairtune.colored_digits._demo import beside_committed

    committed = tmp_path / "dependable.json"
    committed.write_text(
        json.dumps(
            {
                "steps": 400,
                "arms": {
                    "debiased": {
                        "mean_dev_seen": {"mean": 0.06, "range": [0.04, 0.08]},
                        "mean_dev_unnamed": {"mean": 0.3, "range": [0.2, 0.4]},
                        "fidelity": {"mean": 0.99, "range": None},
                    }
                },
            }
        )
    )
    summary = {"mean_dev_seen": 0.05, "mean_dev_heldout": 0.45, "fidelity": 0.99}
    checks = {c["metric"]: c["inside"] for c in beside_committed(summary, steps=400, seed=0, path=committed)}
    assert checks == {"mean_dev_seen": True, "mean_dev_heldout": False}
    err = capsys.readouterr().err
    assert "inside" in err and "OUTSIDE" in err
    # another budget is not compared with the committed one
    assert beside_committed(summary, steps=2, seed=0, path=committed) == []
    assert "measured at 400 steps" in capsys.readouterr().err


def test_the_demo_and_the_pair_benchmark_compare_with_one_config(tmp_path):
    """benchmarks/dependable.py judges every seed's pair with the demo's own comparison config, so the
    demo's figures and the committed ones come from the same prompts, seeds, draw and judges."""
    from fairtune.colored_digits import demo_compare_config

    red, blue = tmp_path / "red", tmp_path / "blue"
    cfg = demo_compare_config(
        {"red": red, "blue": blue}, judges=tmp_path / "j", data=tmp_path / "d", n_per_prompt=8,
        sampling_steps=4, adapter_scale=2.0,
    )  # fmt: skip
    assert [m.name for m in cfg.methods] == ["base", "class_pair", "fair_diffusion", "prompt_augmentation"]
    pair = cfg.methods[1]
    assert pair.class_adapters == {"red": str(red), "blue": str(blue)} and pair.adapter_scale == 2.0
    assert (cfg.generation.n_per_prompt, cfg.generation.steps) == (8, 4)
    assert cfg.judges.reference == str(tmp_path / "d") and cfg.judges.options["path"] == str(tmp_path / "j")
    # the scale the shipped config names, where none is asked for
    default = demo_compare_config({"red": red, "blue": blue})
    assert next(m for m in default.methods if m.name == "class_pair").adapter_scale == 1.5
    single = demo_compare_config({"debiased": tmp_path / "x"}, paraphrase_digits=[2])
    assert [m.name for m in single.methods] == ["base", "debiased", "fair_diffusion", "prompt_augmentation"]
    assert [g.values for g in single.prompts if g.role == "paraphrase"] == [[2]]
