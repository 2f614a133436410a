"""Faults a user running real jobs meets (issue 12): exports that cannot be lost, a run folder that
belongs to one config, budgets that train nothing, and errors read in one line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import judges_args
from safetensors.torch import load_file
from test_train import _config

from fairtune.cli import main
from fairtune.models import LORA_WEIGHT_NAME, export_is_complete


def _fit(cfg, *extra):
    main(["fit", "--config", str(cfg), *extra])


def test_an_export_lost_to_a_kill_is_written_again_by_the_same_command(digits_dir, tmp_path):
    root = tmp_path / "run"
    cfg = _config(digits_dir, root, **{"trainer.max_steps": 2})
    _fit(cfg)
    adapter = root / "adapter" / LORA_WEIGHT_NAME
    good = adapter.read_bytes()
    weights = {k: v.clone() for k, v in load_file(adapter).items()}  # not views of the file
    assert export_is_complete(root)
    # What a kill during the export leaves: the temp folder of the write, and a file cut short.
    stale = root / "adapter" / ".lora-abc123"
    stale.mkdir()
    (stale / LORA_WEIGHT_NAME).write_bytes(good[:100])
    adapter.write_bytes(good[: len(good) // 2])
    assert not export_is_complete(root)
    _fit(cfg)  # resumes at max_steps: no training step, but the export is redone from the checkpoint
    assert export_is_complete(root) and not stale.exists()
    _same(load_file(adapter), weights)
    # and with the adapter gone entirely
    adapter.unlink()
    _fit(cfg)
    _same(load_file(adapter), weights)


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_folder_refuses_a_config_that_changes_the_result(digits_dir, tmp_path):
    root = tmp_path / "run"
    cfg = _config(digits_dir, root, **{"trainer.max_steps": 2})
    _fit(cfg)
    before = (root / "config.yaml").read_text()
    changed = _config(digits_dir, root, **{"trainer.max_steps": 2, "model.optim.lr": 5e-3})
    with pytest.raises(ValueError, match=r"model\.optim\.lr: 0\.001 -> 0\.005.*--allow_config_change"):
        _fit(changed)
    assert (root / "config.yaml").read_text() == before  # the false config is not written
    # a change that does not affect the result is allowed, and recorded
    cfg = _config(digits_dir, root, **{"trainer.max_steps": 2})  # (the same file as `changed`)
    _fit(cfg, "--trainer.log_every_n_steps", "5")
    record = json.loads((root / "config_changes.jsonl").read_text().splitlines()[-1])
    assert "trainer.log_every_n_steps" in record["changed"] and record["affects_result"] == []
    # the explicit override resumes anyway, and says what it changed
    changed = _config(digits_dir, root, **{"trainer.max_steps": 2, "model.optim.lr": 5e-3})
    _fit(changed, "--allow_config_change", "true")
    record = json.loads((root / "config_changes.jsonl").read_text().splitlines()[-1])
    assert record["affects_result"] == ["model.optim.lr"]


@pytest.mark.parametrize(
    "over,needle",
    [
        ({"trainer.max_steps": 0}, "trainer.max_steps=0"),
        ({"trainer.max_epochs": 0, "trainer.max_steps": -1}, "trainer.max_epochs=0"),
        ({"data.samples_per_epoch": 4}, "data.samples_per_epoch=4 is smaller than data.batch_size=8"),
        # no run folder: no guessed default (a resume would look for its checkpoints somewhere else)
        ({"trainer.default_root_dir": None}, "trainer.default_root_dir is not set"),
    ],
)
def test_a_budget_that_trains_nothing_is_an_error(digits_dir, tmp_path, over, needle):
    cfg = _config(digits_dir, tmp_path / "run", **over)
    with pytest.raises(ValueError, match=needle):
        _fit(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


def _cli(*args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "FAIRTUNE_DEBUG": ""}
    return subprocess.run(
        [sys.executable, "-m", "fairtune.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
    )


def _shell(monkeypatch, capsys, *args):
    """``fairtune ARGS`` as the console script runs it (argv from the command line), in this process."""
    monkeypatch.setattr(sys, "argv", ["fairtune", *args])
    monkeypatch.delenv("FAIRTUNE_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_:
        main()
    return exit_.value.code, capsys.readouterr().err


def test_expected_errors_are_one_line_naming_the_file(tmp_path, judges_dir, monkeypatch, capsys):
    bad = tmp_path / "prompts.txt"
    bad.write_bytes(b"a photo of a \xff\xfe doctor\n")
    res = _cli(
        "audit",
        "--model",
        "colored-digits-16",
        "--prompts",
        str(bad),
        "--out",
        str(tmp_path / "a"),
        cwd=tmp_path,
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr
    (line,) = [ln for ln in res.stderr.splitlines() if ln.startswith("fairtune: error:")]
    assert str(bad) in line and "UTF-8" in line
    # a truncated judge file: named, one line
    judges = tmp_path / "judges"
    judges.mkdir()
    for f in Path(judges_dir).iterdir():
        (judges / f.name).write_bytes(f.read_bytes())
    w = judges / "color_cnn.safetensors"
    w.write_bytes(w.read_bytes()[:64])
    good = tmp_path / "good.txt"
    good.write_text("a handwritten digit 3\n")
    code, err = _shell(
        monkeypatch, capsys, "audit", "--model", "colored-digits-16", "--prompts", str(good),
        "--out", str(tmp_path / "b"), *judges_args(judges),
        "--judges.reference", "null",
    )  # fmt: skip
    (line,) = [ln for ln in err.splitlines() if ln.startswith("fairtune: error:")]
    assert code == 2 and "color_cnn.safetensors" in line and "readable safetensors" in line
    # --debug: the exception itself, with its traceback
    monkeypatch.setattr(
        sys, "argv", ["fairtune", "audit", "--model", "m", "--prompts", str(bad), "--out", "x", "--debug"]
    )
    with pytest.raises(ValueError, match="not UTF-8"):
        main()


def test_a_class_named_in_a_config_must_be_a_torch_module(tmp_path):
    from safetensors.torch import save_file

    from fairtune.colored_digits import SmallCNN
    from fairtune.models import ClassifierConfig, load_classifier

    weights = tmp_path / "w.safetensors"
    save_file(SmallCNN(2, 4, 8).state_dict(), str(weights))
    marker = tmp_path / "PWNED"
    # a callable that is not a module class is refused before anything is called
    cfg = ClassifierConfig(module="os.system", init_args={"command": f"touch {marker}"}, weights=str(weights))
    with pytest.raises(ValueError, match="not a torch.nn.Module subclass"):
        load_classifier(cfg)
    assert not marker.exists()
    # the weights are checked before the class is imported or built
    cfg = ClassifierConfig(module="os.system", weights=str(tmp_path / "missing.safetensors"))
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_classifier(cfg)


def test_atomic_writes_get_the_mode_a_plain_write_gets(tmp_path):
    """A file or folder written through a temporary one is as readable as one written in place (the
    process umask applies), not private to its owner as mkstemp/mkdtemp make them: a sweep's report on a
    cluster's shared folder stays readable by the group."""
    from fairtune.data import atomic_dir, atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.md", "x")
        (tmp_path / "plain.md").write_text("x")
        with atomic_dir(tmp_path / "folder") as tmp:
            (tmp / "f").write_text("y")
        (tmp_path / "plain_folder").mkdir()
    finally:
        os.umask(old)
    mode = lambda p: p.stat().st_mode & 0o777  # noqa: E731
    assert mode(tmp_path / "a.md") == mode(tmp_path / "plain.md") == 0o644
    assert mode(tmp_path / "folder") == mode(tmp_path / "plain_folder") == 0o755
    assert (tmp_path / "folder" / "f").read_text() == "y"
