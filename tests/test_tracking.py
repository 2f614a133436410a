"""Experiment tracking (issue 6): loggers from config (CSV always, TensorBoard, wandb), wandb offline
without a key and never writing one, and what is logged: losses, learning rates, the batch's attribute
mix against the target, a samples grid every k steps."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml
from test_distributed import tiny_base, tiny_config  # noqa: F401 - tiny_base is a fixture

from fairtune.cli import main
from fairtune.train import prepare_logger_config, redact, wandb_offline_reason

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
KEY = "dummy-wandb-key-0123456789abcdef0123456789"


# a samples grid small enough for a CPU test (the overlays' defaults are sized for a GPU run)
SMALL_GRID = ["--samples.steps", "2", "--samples.max_prompts", "2", "--samples.n_per_prompt", "2"]


def _fit(cfg: Path, run: Path, *extra: str) -> None:
    main(["fit", "--config", str(cfg), *extra, *SMALL_GRID, "--trainer.default_root_dir", str(run)])


def _rows(run: Path) -> list[dict]:
    with open(run / "logs" / "version_0" / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def wandb_env(monkeypatch):
    """A clean wandb environment, restored afterwards (Lightning sets WANDB_MODE when offline)."""
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_ERROR_REPORTING"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_wandb_without_a_key_runs_offline_into_the_run_folder(digits_dir, tiny_base, tmp_path, wandb_env):  # noqa: F811
    cfg = tiny_config(digits_dir, tiny_base, tmp_path / "fit.yaml", **{"data.rebalance": {}})
    run = tmp_path / "run"
    _fit(cfg, run, "--config", str(CONFIGS / "launch" / "wandb.yaml"), "--samples.every_n_steps", "2")
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["trainer"]["logger"]["init_args"]["offline"] is True  # forced: no key was set
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1, list((run / "wandb").iterdir())
    data = next(offline[0].glob("run-*.wandb")).read_bytes()
    for metric in (b"train/diffusion_loss", b"mix/red", b"mix/gap", b"lr-AdamW", b"trainer/global_step"):
        assert metric in data, metric
    # the samples grid went to wandb as images, and as PNGs into the run folder
    assert len(list(offline[0].glob("files/media/images/samples_*.png"))) == 2
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_000002.png", "step_000004.png"]
    # the CSV log is still kept beside wandb
    assert any(r["train/diffusion_loss"] for r in _rows(run))


def test_a_wandb_key_in_the_environment_is_written_nowhere(digits_dir, tiny_base, tmp_path, wandb_env, capfd):  # noqa: F811
    wandb_env.setenv("WANDB_API_KEY", KEY)
    wandb_env.setenv("WANDB_MODE", "offline")  # a key is set, but this test must not go online
    cfg = tiny_config(digits_dir, tiny_base, tmp_path / "fit.yaml", **{"trainer.max_steps": 2})
    run = tmp_path / "run"
    _fit(cfg, run, "--config", str(CONFIGS / "launch" / "wandb.yaml"))
    files = [p for p in run.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files) and (run / "config.yaml") in files
    leaked = [p for p in files if KEY.encode() in p.read_bytes()]
    assert not leaked, leaked
    out, err = capfd.readouterr()
    assert KEY not in out and KEY not in err


def test_tensorboard_logs_scalars_images_and_the_target_mix(digits_dir, tiny_base, tmp_path):  # noqa: F811
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_config(digits_dir, tiny_base, tmp_path / "fit.yaml", **{"data.rebalance": {}})
    run = tmp_path / "run"
    _fit(
        cfg,
        run,
        "--config", str(CONFIGS / "launch" / "tensorboard.yaml"),
        "--config", str(CONFIGS / "targets" / "red30_blue70.yaml"),
        "--samples.every_n_steps", "3",
    )  # fmt: skip
    events = list((run / "tensorboard" / "version_0").glob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0].parent), size_guidance={"images": 0, "scalars": 0}).Reload()
    tags = acc.Tags()
    assert {"train/diffusion_loss", "train/loss", "lr-AdamW", "mix/red", "mix/red_target"} <= set(
        tags["scalars"]
    )
    assert "samples" in tags["images"]
    # step 3 and the end (step 4)
    assert [e.step for e in acc.Images("samples")] == [3, 4]
    # the target the mix is compared with is the run's own (30% red), in every step's row
    rows = [r for r in _rows(run) if r.get("mix/red_target")]
    assert len(rows) == 4 and all(float(r["mix/red_target"]) == pytest.approx(0.3) for r in rows)
    for r in rows:
        share = float(r["mix/red"])
        assert float(r["mix/blue"]) == pytest.approx(1 - share)
        assert float(r["mix/gap"]) == pytest.approx(abs(share - 0.3))
    lrs = [float(r["lr-AdamW"]) for r in _rows(run) if r.get("lr-AdamW")]
    assert len(lrs) == 4 and all(lr > 0 for lr in lrs)


def test_no_logger_still_trains(digits_dir, tiny_base, tmp_path):  # noqa: F811
    """The learning-rate monitor and the mix monitor stay quiet without a logger."""
    cfg = tiny_config(digits_dir, tiny_base, tmp_path / "fit.yaml", **{"trainer.max_steps": 2})
    run = tmp_path / "run"
    _fit(cfg, run, "--trainer.logger", "false")
    assert (run / "adapter").is_dir() and not (run / "logs").exists()


def test_wandb_mode_rules(monkeypatch):
    for name in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(name, raising=False)
    assert wandb_offline_reason() == "WANDB_API_KEY is not set"
    monkeypatch.setenv("WANDB_API_KEY", KEY)
    assert wandb_offline_reason() is None
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_offline_reason() == "WANDB_MODE=disabled"
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.setenv("WANDB_MODE", "online")  # explicit: a `wandb login` in ~/.netrc
    assert wandb_offline_reason() is None


def test_logger_config_defaults_to_the_run_folder_and_redacts(monkeypatch, tmp_path):
    from jsonargparse import Namespace

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_ERROR_REPORTING", raising=False)
    wandb = Namespace(
        class_path="lightning.pytorch.loggers.WandbLogger",
        init_args=Namespace(save_dir=".", dir=None, offline=False, log_model="all", mode="online"),
    )
    tb = Namespace(class_path="fairtune.train.TensorBoardLogger", init_args=Namespace(save_dir="/elsewhere"))
    prepare_logger_config([wandb, tb], str(tmp_path))
    assert wandb.init_args.save_dir == str(tmp_path) and wandb.init_args.offline is True
    assert wandb.init_args.mode == "offline" and wandb.init_args.log_model is False  # nothing uploaded
    assert tb.init_args.save_dir == "/elsewhere"  # an explicit folder is kept
    monkeypatch.setenv("MY_SERVICE_TOKEN", "tok-0123456789")
    assert redact("a: tok-0123456789\nb: 1") == "a: ***\nb: 1"
