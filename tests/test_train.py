import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from conftest import COLORS, TEXT_ENCODER, smoke_trainer, write_fit_config
from safetensors.torch import load_file

from fairtune.cli import main
from fairtune.data import AttributeDataModule, RebalanceConfig, SourceConfig
from fairtune.models import LORA_WEIGHT_NAME, BackboneConfig, LoraConfig, TinyUNetConfig
from fairtune.train import DebiasModule, EmaConfig, OptimConfig

TINY = TinyUNetConfig(sample_size=16, block_out_channels=[8, 16], attention_head_dim=4, norm_num_groups=4)


def _config(digits_dir, root, **over):
    root = Path(root)
    return write_fit_config(
        root.parent / f"{root.name}.yaml",
        backbone={"kind": "tiny", "text_encoder": TEXT_ENCODER, "unet": TINY.__dict__},
        data={"source": {"path": str(digits_dir / "table")}, "samples_per_epoch": 16},
        root=root,
        **over,
    )


def test_lora_step_trains_only_the_adapter(digits_dir):
    torch.manual_seed(0)
    module = DebiasModule(
        backbone=BackboneConfig(kind="tiny", text_encoder=TEXT_ENCODER, unet=TINY),
        lora=LoraConfig(rank=4),
        optim=OptimConfig(lr=1e-2, warmup_steps=1),
        ema=EmaConfig(decay=0.5),
    )
    dm = AttributeDataModule(
        attributes=COLORS,
        source=SourceConfig(path=str(digits_dir / "table")),
        rebalance=RebalanceConfig(),
        batch_size=8,
        samples_per_epoch=16,
    )
    before = {k: v.clone() for k, v in module.backbone.unet.state_dict().items()}
    trainer = smoke_trainer(max_steps=3)
    trainer.fit(module, dm)
    after = module.backbone.unet.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora" in k for k in changed)
    assert any("lora_A" in k for k in changed) and any("lora_B" in k for k in changed)
    # EMA differs from the live weights and is what ema_weights() swaps in
    live = [p.clone() for p in module.trained_params()]
    with module.ema_weights():
        assert any(not torch.equal(a, b) for a, b in zip(live, module.trained_params()))
    assert all(torch.equal(a, b) for a, b in zip(live, module.trained_params()))
    # the rebalanced sampler was in use: every seen concept's draw leans toward 50/50
    mix = dm.expected_mix()
    assert all(abs(m[0] - 0.5) < 1e-9 for m in mix.values())


@pytest.mark.parametrize("warmup", [True, False])
def test_the_ema_is_diffusers_with_the_documented_decay(warmup):
    """EmaConfig's docstring: the first update starts the average from the weights, then
    d = min(decay, n / (n + 9)) with warm-up, d = decay without."""
    w = torch.nn.Parameter(torch.zeros(3))
    ema = EmaConfig(decay=0.5, warmup=warmup).build([w])
    avg = None
    for n in range(1, 7):
        with torch.no_grad():
            w.fill_(float(n * n))
        ema.step([w])
        d = 0.0 if n == 1 else (min(0.5, n / (n + 9)) if warmup else 0.5)
        avg = n * n if avg is None else d * avg + (1 - d) * n * n
        torch.testing.assert_close(ema.shadow_params[0], torch.full((3,), float(avg)))


def test_the_ema_is_saved_and_restored_with_the_checkpoint():
    def module():
        torch.manual_seed(0)
        return DebiasModule(
            backbone=BackboneConfig(kind="tiny", text_encoder=TEXT_ENCODER, unet=TINY),
            lora=LoraConfig(rank=4),
            ema=EmaConfig(decay=0.9),
        )

    a = module()
    for _ in range(3):
        with torch.no_grad():
            for p in a.trained_params():
                p.add_(torch.randn_like(p))
        a._ema.step(a.trained_params())
    ckpt = {"state_dict": a.state_dict(), "global_step": 3}
    a.on_save_checkpoint(ckpt)
    ckpt = torch.load(_roundtrip(ckpt), weights_only=True)  # what Lightning writes and reads back
    b = module()
    b.on_load_checkpoint(ckpt)
    assert b._ema.optimization_step == 3 and b._ema.decay == 0.9
    for x, y in zip(a._ema.shadow_params, b._ema.shadow_params):
        assert torch.equal(x, y)
    live = [p.clone() for p in a.trained_params()]
    with a.ema_weights():  # the average swapped in, then the live weights back
        assert all(torch.equal(p, e) for p, e in zip(a.trained_params(), a._ema.shadow_params))
    assert all(torch.equal(p, q) for p, q in zip(live, a.trained_params()))
    # a checkpoint of the hand-written EMA (the averaged tensors alone) still resumes
    c = module()
    c.on_load_checkpoint({**ckpt, "ema": [e.clone() for e in a._ema.shadow_params]})
    assert c._ema.optimization_step == 3
    assert all(torch.equal(x, y) for x, y in zip(a._ema.shadow_params, c._ema.shadow_params))


def _roundtrip(obj):
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def test_fit_cli_writes_run_folder_and_adapter(digits_dir, tmp_path):
    cfg = _config(digits_dir, tmp_path / "run")
    main(["fit", "--config", str(cfg), "--data.rebalance", "{}"])
    run = tmp_path / "run"
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["model"]["lora"]["rank"] == 4
    assert resolved["data"]["rebalance"] == {"unknown": "keep"}
    assert (run / "checkpoints" / "last.ckpt").exists()
    weights = load_file(str(run / "adapter" / LORA_WEIGHT_NAME))
    assert weights and all(k.startswith("unet.") for k in weights)
    assert "train/diffusion_loss" in (run / "logs" / "version_0" / "metrics.csv").read_text()


def test_full_finetune_exports_a_loadable_model(digits_dir, tmp_path):
    cfg = _config(digits_dir, tmp_path / "full", **{"model.lora": None, "trainer.max_steps": 2})
    main(["fit", "--config", str(cfg)])
    from fairtune.models import Backbone

    bb = Backbone.from_config(BackboneConfig(kind="tiny", pretrained=str(tmp_path / "full" / "model")))
    assert list(bb.unet.config.block_out_channels) == [8, 16]


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--model.lora.rnk", "4"], "rnk"),
        (["--model.optim.lr", "fast"], "lr"),
        (["--model.backbone.kind", "xl"], "kind"),
        (["--data.batch_sise", "3"], "batch_sise"),
    ],
)
def test_bad_config_fails_before_training_naming_the_key(digits_dir, tmp_path, capsys, args, needle):
    cfg = _config(digits_dir, tmp_path / "bad")
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(cfg), *args])
    assert e.value.code != 0
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "bad" / "checkpoints").exists()


def test_empty_target_group_fails_before_training(digits_dir, tmp_path):
    cfg = _config(
        digits_dir,
        tmp_path / "empty",
        **{"data.attributes": {"color": ["red", "blue", "green"]}, "data.rebalance": {}},
    )
    with pytest.raises(Exception, match="group 'green' .* no record"):
        main(["fit", "--config", str(cfg)])


def test_a_non_finite_loss_stops_the_run_naming_the_step_and_exports_nothing(digits_dir, tmp_path):
    # An absurd learning rate sends the weights to inf within a few steps.
    cfg = _config(
        digits_dir,
        tmp_path / "nan",
        **{"model.optim.lr": 1e30, "model.optim.warmup_steps": 0, "trainer.max_steps": 8},
    )
    with pytest.raises(FloatingPointError, match=r"training loss is (nan|inf) at step \d+"):
        main(["fit", "--config", str(cfg)])
    assert not (tmp_path / "nan" / "adapter" / LORA_WEIGHT_NAME).exists()


def _fit_cmd(cfg):
    return [sys.executable, "-m", "fairtune.cli", "fit", "--config", str(cfg)]


def test_killed_run_resumes_to_the_same_adapter(digits_dir, tmp_path):
    over = {
        "trainer.max_steps": 8,
        "data.samples_per_epoch": 32,  # 2 steps per epoch: a checkpoint every 2 steps, killed after one
        "data.batch_size": 16,
        "model.ema": {"decay": 0.9},
        "data.rebalance": {},
    }
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    ref_cfg = _config(digits_dir, tmp_path / "ref", **over)
    subprocess.run(_fit_cmd(ref_cfg), check=True, env=env, capture_output=True)

    cfg = _config(digits_dir, tmp_path / "killed", **over)
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen(_fit_cmd(cfg), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    adapter = tmp_path / "killed" / "adapter" / LORA_WEIGHT_NAME
    assert last.exists() and not adapter.exists(), "the run was not killed mid-way"
    step_at_kill = torch.load(last, weights_only=True)["global_step"]
    assert step_at_kill < 8

    subprocess.run(_fit_cmd(cfg), check=True, env=env, capture_output=True)  # the same command
    # it resumed: the second launch's log starts where the checkpoint left off, not at step 0
    import csv

    with open(tmp_path / "killed" / "logs" / "version_1" / "metrics.csv") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f)]
    assert min(steps) >= step_at_kill > 0
    assert (tmp_path / "killed" / "logs" / "version_0" / "metrics.csv").exists()  # history kept
    ref = load_file(str(tmp_path / "ref" / "adapter" / LORA_WEIGHT_NAME))
    got = load_file(str(adapter))
    assert ref.keys() == got.keys()
    for k in ref:  # bit for bit: the EMA in the checkpoint is that of its weights (it was one update behind)
        torch.testing.assert_close(got[k], ref[k], atol=0, rtol=0)
    assert torch.load(last, weights_only=True)["global_step"] == 8


class Killed(Exception):
    pass


class StopAfter(L.Callback):
    """Stands in for a kill: the run stops, exporting nothing, after optimizer step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise Killed(f"killed after step {self.step}")


def test_a_run_stopped_mid_epoch_resumes_from_its_step_checkpoint_to_the_same_adapter(digits_dir, tmp_path):
    over = {
        "trainer.max_steps": 6,
        "data.samples_per_epoch": 48,  # 6 steps per epoch: steps 2 and 3 are mid-epoch
        "model.ema": {"decay": 0.9},
        "data.rebalance": {},
    }
    main(["fit", "--config", str(_config(digits_dir, tmp_path / "ref", **over))])
    recorded = yaml.safe_load((tmp_path / "ref" / "config.yaml").read_text())["checkpoint"]
    assert (recorded["every_n_train_steps"], recorded["every_n_epochs"]) == (100, 1)  # the defaults

    # every 2 steps and never at an epoch end (Lightning's ModelCheckpoint refuses both set; with only
    # every_n_epochs 0 it wrote nothing); stopped at step 3: the checkpoint is step 2's
    cfg = _config(digits_dir, tmp_path / "run", **over)
    # (and the newest two step checkpoints kept beside last.ckpt: diffusers' checkpoints_total_limit)
    every = ["--checkpoint.every_n_train_steps", "2", "--checkpoint.every_n_epochs", "0",
             "--checkpoint.keep_last", "2"]  # fmt: skip
    stop = [
        "--trainer.callbacks",
        json.dumps([{"class_path": f"{__name__}.StopAfter", "init_args": {"step": 3}}]),
    ]
    with pytest.raises(Killed):
        main(["fit", "--config", str(cfg), *every, *stop])
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 2
    assert [p.name for p in last.parent.glob("step-*.ckpt")] == ["step-00000002.ckpt"]
    adapter = tmp_path / "run" / "adapter" / LORA_WEIGHT_NAME
    assert not adapter.exists()

    main(["fit", "--config", str(cfg), *every])  # the same command, started again
    import csv

    with open(tmp_path / "run" / "logs" / "version_1" / "metrics.csv") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f)]
    assert min(steps) >= 2  # resumed from step 2, not restarted
    ref = load_file(str(tmp_path / "ref" / "adapter" / LORA_WEIGHT_NAME))
    got = load_file(str(adapter))
    assert ref.keys() == got.keys()
    for k in ref:  # bit for bit: the rest of epoch 0 was drawn as the uninterrupted run drew it
        torch.testing.assert_close(got[k], ref[k], atol=0, rtol=0)
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*.ckpt"))
    assert kept == ["step-00000004.ckpt", "step-00000006.ckpt"]  # step 2's deleted
    assert torch.load(last.with_name(kept[-1]), weights_only=True)["global_step"] == 6


PIXEL_SIDES: list[int] = []


class RecordPixelSide(L.Callback):
    """Records the side of the pixels each training batch carries (into ``PIXEL_SIDES``)."""

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        PIXEL_SIDES.append(batch["pixels"].shape[-1])


def test_backbone_resolution_is_the_training_image_side_and_config_yaml_says_so(
    digits_dir, tiny_sd, tmp_path
):
    """``model.backbone.resolution`` (diffusers' ``--resolution``) resizes the training images (16 px here)
    and is recorded as ``data.image_size``; set with another ``data.image_size``, or on ``tiny``, it is
    refused before training."""
    from fairtune.cli._fit import ConfigError

    over = {"model.backbone": {"kind": "sd", "pretrained": str(tiny_sd)}, "data.rebalance": {}}
    cfg = _config(digits_dir, tmp_path / "sd", **over, **{"trainer.max_steps": 1})
    record = json.dumps([{"class_path": f"{__name__}.RecordPixelSide"}])
    PIXEL_SIDES.clear()
    main(["fit", "--config", str(cfg), "--model.backbone.resolution", "32", "--trainer.callbacks", record])
    assert PIXEL_SIDES == [32]
    resolved = yaml.safe_load((tmp_path / "sd" / "config.yaml").read_text())
    assert resolved["model"]["backbone"]["resolution"] == 32 and resolved["data"]["image_size"] == 32

    with pytest.raises(ConfigError, match="resolution=32 and data.image_size=16 disagree"):
        main(["fit", "--config", str(cfg), "--model.backbone.resolution", "32", "--data.image_size", "16"])
    tiny = _config(digits_dir, tmp_path / "tiny")
    with pytest.raises(ConfigError, match="resolution=32 applies to sd and sdxl"):
        main(["fit", "--config", str(tiny), "--model.backbone.resolution", "32"])
    # built in Python, where no CLI sets the data's side from it: a mismatch is an error, not ignored
    module = DebiasModule(
        backbone=BackboneConfig(kind="sd", pretrained=str(tiny_sd), resolution=32),
        lora=LoraConfig(rank=4),
        optim=OptimConfig(lr=1e-3, warmup_steps=1),
    )
    dm = AttributeDataModule(
        attributes=COLORS,
        source=SourceConfig(path=str(digits_dir / "table")),
        batch_size=8,
        samples_per_epoch=8,
    )
    with pytest.raises(ValueError, match="resolution=32 but the data module trains at 16 px"):
        smoke_trainer(max_steps=1).fit(module, dm)


def test_stable_diffusion_trains_and_exports_through_the_same_module(digits_dir, tiny_sd, tmp_path):
    from diffusers import StableDiffusionPipeline

    cfg = _config(
        digits_dir,
        tmp_path / "sd",
        **{
            "model.backbone": {"kind": "sd", "pretrained": str(tiny_sd)},
            "data.image_size": 16,
            "data.rebalance": {},
            "trainer.max_steps": 2,
        },
    )
    main(["fit", "--config", str(cfg)])
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(tmp_path / "sd" / "adapter"))
    assert pipe.unet.peft_config  # the run's adapter is on the user's pipeline
    out = pipe("a handwritten digit 3", num_inference_steps=2, output_type="pt").images
    assert out.shape == (1, 3, 16, 16)
