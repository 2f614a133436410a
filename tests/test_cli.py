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
