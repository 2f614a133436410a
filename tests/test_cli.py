import json

import pytest

from fairtune.cli import main


def test_colored_digits_command_writes_everything(tmp_path, capsys):
    out = tmp_path / "cd"
    main(
        [
            "data",
            "colored-digits",
            "--out",
            str(out),
            "--renders_per_image",
            "1",
            "--heldout_renders",
            "1",
            "--red_share",
            "[0.9,0.9,0.9,0.9,0.9,0.1,0.1,0.1,0.1,0.1]",
        ]
    )
    stats = json.loads((out / "stats.json").read_text())
    assert stats["splits"]["train"]["digit 0"]["red_share"] == pytest.approx(0.9, abs=0.03)
    assert (out / "table" / "dataset_dict.json").exists()
    assert sorted(p.name.split("-")[0] for p in (out / "shards").glob("*.tar")) == [
        "heldout",
        "train",
    ]
    assert "digit 9" in capsys.readouterr().out


def test_unknown_option_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["data", "colored-digits", "--out", str(tmp_path), "--sise", "16"])
    assert e.value.code != 0
    assert "--sise" in capsys.readouterr().err


def test_wrong_type_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(
            [
                "judges",
                "train",
                "--data",
                str(tmp_path),
                "--out",
                str(tmp_path),
                "--train.digit_epochs",
                "many",
            ]
        )
    assert "digit_epochs" in capsys.readouterr().err


def test_slurm_fit_script_names_the_python_that_cannot_import_fairtune(tmp_path):
    """Submitted from a folder without .venv and with a Python that lacks fairtune, the job stops before
    srun, saying which Python and how to choose one (it used to fail on every node with
    `No module named 'fairtune'`)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "scripts" / "slurm_fit.sbatch"
    bare = tmp_path / "bare-python"
    bare.write_text(f'#!/bin/sh\nexec {sys.executable} -I -S "$@"\n')  # no site-packages: no fairtune
    bare.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "SLURM_SUBMIT_DIR": str(tmp_path), "FAIRTUNE_PYTHON": str(bare)}
    res = subprocess.run(["bash", str(script), "--config", "x.yaml"], env=env, capture_output=True, text=True)
    assert res.returncode == 1
    assert f"'{bare}' cannot import fairtune" in res.stderr and "FAIRTUNE_PYTHON" in res.stderr
    # the repository's own interpreter passes the check (then fails later only for want of SLURM)
    env["FAIRTUNE_PYTHON"] = sys.executable
    res = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert "cannot import fairtune" not in res.stderr


def _printed_config(capsys, *args) -> dict:
    import yaml

    with pytest.raises(SystemExit):
        main(["fit", "--config", "configs/colored_digits/lora.yaml", *args, "--print_config"])
    return yaml.safe_load(capsys.readouterr().out)


def test_null_on_the_command_line_is_none_and_a_class_change_resets_its_arguments(capsys):
    fairness = ["--config", "configs/ablations/fairness.yaml"]
    cfg = _printed_config(capsys, *fairness, "--model.fairness.classifier.weights", "null")
    # jsonargparse alone reads this nested null as the string 'None' (then "missing file 'None'")
    assert cfg["model"]["fairness"]["classifier"]["weights"] is None
    cfg = _printed_config(capsys, *fairness, "--model.fairness.preservation.weights=None")
    assert cfg["model"]["fairness"]["preservation"]["weights"] is None
    cfg = _printed_config(
        capsys, *fairness,
        "--model.fairness.classifier.module", "fairtune.models.CLIPLinearProbe",
        "--model.fairness.classifier.init_args.probe", "runs/probe",
    )  # fmt: skip
    clf = cfg["model"]["fairness"]["classifier"]
    # SmallCNN's num_classes / width / feature_dim are not carried into the probe's arguments
    assert clf["module"] == "fairtune.models.CLIPLinearProbe" and clf["init_args"] == {"probe": "runs/probe"}
    # the rest of the section is kept
    assert cfg["model"]["fairness"]["every_k_steps"] == 8


def test_light_commands_do_not_import_the_model_stack(tmp_path):
    """`fairtune --help`, `flag` and `review --help` answer without torch, Lightning or diffusers
    (their start-up time is measured in benchmarks/startup.py)."""
    import subprocess
    import sys

    probe = (
        "import sys\n"
        "from fairtune.cli import main\n"
        "try:\n"
        "    main(sys.argv[1:])\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = sorted(m for m in ('torch', 'lightning', 'diffusers', 'transformers') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    db = str(tmp_path / "flags.sqlite")
    for args in (["--help"], ["flag", "list", "--db", db], ["review", "--help"]):
        cmd = [sys.executable, "-c", probe, *args]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert "HEAVY []" in out.stdout, (args, out.stdout[-500:], out.stderr[-2000:])


def test_the_fast_help_lists_exactly_the_commands_the_parser_has(capsys):
    from fairtune.cli import command_help
    from fairtune.cli._app import commands

    assert sorted(command_help()) == sorted(commands())
    main(["--help"])
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in command_help())
