"""Launching (issue 6): launch overlays compose with a training config through the real CLI parser;
`fairtune fit` trains under DDP with 2 CPU processes (gloo), writes from rank zero only, syncs its
metrics across ranks, and each rank trains on its own part of the rebalanced draw."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import COLORS, TEXT_ENCODER, write_fit_config

from fairtune.cli import FairtuneCLI
from fairtune.data import AttributeDataModule, RebalanceConfig, SourceConfig, WeightedEpochSampler
from fairtune.models import LORA_WEIGHT_NAME, Backbone, BackboneConfig, TinyUNetConfig, load_adapter
from fairtune.train import DebiasModule

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
LORA_BASE = CONFIGS / "colored_digits" / "lora.yaml"
LAUNCH = sorted((CONFIGS / "launch").glob("*.yaml"))
TINY = TinyUNetConfig(sample_size=16, block_out_channels=[8, 16], attention_head_dim=4, norm_num_groups=4)
CONCEPTS = [f"digit {d}" for d in range(8)]


# ------------------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """A tiny pretrained base (random weights, saved), so a run's adapter can be loaded back onto it."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny_base") / "base"
    Backbone.from_config(BackboneConfig(kind="tiny", text_encoder=TEXT_ENCODER, unet=TINY)).save_pretrained(
        out
    )
    return out


def tiny_config(digits_dir, base, path: Path, **over) -> Path:
    """A fast fit config (tiny UNet, a few steps) written to ``path``; ``over``: dotted keys."""
    return write_fit_config(
        path,
        backbone={"kind": "tiny", "pretrained": str(base)},
        data={"source": {"path": str(digits_dir / "table")}, "samples_per_epoch": 16},
        **over,
    )


def fit_env(**extra) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **extra}
    return env


class _ParseOnly(FairtuneCLI):
    """The real fit CLI up to (and including) its pre-instantiation hook, building nothing."""

    def instantiate_classes(self) -> None:
        pass


def parse(*configs, args=()):
    argv = []
    for c in configs:
        argv += ["--config", str(c)]
    return _ParseOnly(DebiasModule, AttributeDataModule, args=[*argv, *args], run=False).config


# ------------------------------------------------------------------------------------------ overlays
EXPECTED = {
    "single_gpu": {"accelerator": "gpu", "devices": 1, "strategy": "auto", "precision": "bf16-mixed"},
    "ddp": {"accelerator": "gpu", "devices": "auto", "strategy": "ddp", "precision": "bf16-mixed"},
    "cpu_ddp": {"accelerator": "cpu", "devices": 2, "strategy": "ddp", "precision": "32-true"},
    "multinode": {"num_nodes": 2, "devices": 4, "strategy": "ddp", "precision": "bf16-mixed"},
    "fsdp": {"accelerator": "gpu", "precision": "bf16-mixed"},
    "memory": {"accumulate_grad_batches": 4},
    "bf16": {"precision": "bf16-mixed"},
    "wandb": {},
    "tensorboard": {},
}


def test_every_launch_overlay_is_covered():
    assert {p.stem for p in LAUNCH} == set(EXPECTED)


@pytest.mark.parametrize("overlay", LAUNCH, ids=lambda p: p.stem)
def test_launch_overlay_composes_with_the_lora_config(overlay, tmp_path):
    cfg = parse(LORA_BASE, overlay, args=["--trainer.default_root_dir", str(tmp_path)])
    for key, value in EXPECTED[overlay.stem].items():
        assert cfg.trainer[key] == value, key
    # the training config is untouched by the launch overlay
    assert cfg.model.lora.rank == 8 and cfg.data.batch_size == 64 and cfg.trainer.max_steps == 1000
    # no overlay may hand the sampler to Lightning: it deals its own draw to the ranks
    assert cfg.trainer.use_distributed_sampler is False
    if overlay.stem == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        s = cfg.trainer.strategy
        assert s.class_path.endswith("FSDPStrategy") and s.dict_kwargs["use_orig_params"] is True
        # the parsed arguments are ones FSDPStrategy takes (it needs a GPU only once training starts)
        strategy = FSDPStrategy(**dict(s.init_args), **s.dict_kwargs)
        assert strategy.sharding_strategy.name == "FULL_SHARD"
    if overlay.stem == "memory":
        assert cfg.gradient_checkpointing.enabled is True
    if overlay.stem in ("wandb", "tensorboard"):
        assert cfg.trainer.logger.init_args.save_dir == str(tmp_path)  # into the run folder
        assert cfg.samples.every_n_steps == 250


def test_gpu_launch_overlays_build_a_trainer_on_cpu_when_told_to(tmp_path):
    """ddp + memory + tensorboard stacked on the training config instantiate as a whole (with the
    accelerator swapped for the CPU): DDP over 2 devices, bf16, accumulation, the extra logger."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
    from lightning.pytorch.strategies import DDPStrategy

    cli = FairtuneCLI(
        DebiasModule,
        AttributeDataModule,
        args=[
            "--config", str(LORA_BASE),
            "--config", str(CONFIGS / "launch" / "ddp.yaml"),
            "--config", str(CONFIGS / "launch" / "memory.yaml"),
            "--config", str(CONFIGS / "launch" / "tensorboard.yaml"),
            "--trainer.accelerator", "cpu",
            "--trainer.devices", "2",
            "--trainer.default_root_dir", str(tmp_path),
        ],
        run=False,
    )  # fmt: skip
    t = cli.trainer
    assert isinstance(t.strategy, DDPStrategy) and t.num_devices == 2
    assert t.accumulate_grad_batches == 4 and t.precision == "bf16-mixed"
    assert [type(lg) for lg in t.loggers][:1] == [CSVLogger]  # the CSV log is kept beside the others
    assert any(isinstance(lg, TensorBoardLogger) for lg in t.loggers)
    names = {type(cb).__name__ for cb in t.callbacks}
    assert {"GradientCheckpointing", "BatchMixMonitor", "LearningRateLog", "SampleGrid"} <= names


# ------------------------------------------------------------------------------------------ sampler
@pytest.mark.parametrize("world", [2, 3])
def test_weighted_sampler_ranks_take_disjoint_parts_of_one_draw(world):
    weights = torch.rand(50, generator=torch.Generator().manual_seed(0)) + 0.1
    for epoch in (0, 1):
        single = WeightedEpochSampler(weights, num_samples=60, seed=3, rank=0, world_size=1)
        single.set_epoch(epoch)
        full = list(single)
        parts = []
        for r in range(world):
            s = WeightedEpochSampler(weights, num_samples=60, seed=3, rank=r, world_size=world)
            s.set_epoch(epoch)
            parts.append(list(s))
        assert all(len(p) == len(s) == 60 // world for p in parts)
        # rank r holds positions r, r+W, ... of the one draw: no position twice, none missing
        interleaved = [parts[i % world][i // world] for i in range(60)]
        assert interleaved == full
        assert parts[0] != parts[1]
    s0 = WeightedEpochSampler(weights, num_samples=60, seed=3, rank=0, world_size=world)
    first = list(s0)
    s0.set_epoch(1)
    assert list(s0) != first  # a new epoch, a new draw


# ------------------------------------------------------------------------------------------ DDP fit
RECORDER = '''
import hashlib, json
from pathlib import Path
import lightning as L


class DrawRecorder(L.Callback):
    """Per rank and batch: a fingerprint of every image trained on, its group label, and the loss."""

    def __init__(self, out: str):
        self.out = out

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        rec = {
            "step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "pixels": [hashlib.sha1(x.numpy().tobytes()).hexdigest() for x in batch["pixels"].cpu()],
            "groups": batch["groups"].tolist(),
            "loss": float(outputs["loss"]),
        }
        Path(self.out).mkdir(parents=True, exist_ok=True)
        with open(Path(self.out) / f"rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\\n")
'''


def _fingerprint(dm: AttributeDataModule, index: int) -> str:
    pixels = dm.collate([dm.dataset[index]])["pixels"][0]
    return hashlib.sha1(pixels.numpy().tobytes()).hexdigest()


def test_ddp_fit_two_cpu_processes(digits_dir, tiny_base, tmp_path):
    run, draws = tmp_path / "run", tmp_path / "draws"
    (tmp_path / "ddp_recorder.py").write_text(RECORDER)
    cfg = tiny_config(
        digits_dir,
        tiny_base,
        tmp_path / "fit.yaml",
        **{
            "data.rebalance": {},
            "data.samples_per_epoch": 32,  # 16 per rank: 2 batches of 8 per rank and epoch
            "trainer.callbacks": [
                {"class_path": "ddp_recorder.DrawRecorder", "init_args": {"out": str(draws)}}
            ],
            "samples": {"every_n_steps": 2, "max_prompts": 2, "n_per_prompt": 2, "steps": 2},
        },
    )
    cmd = [
        sys.executable, "-m", "fairtune.cli", "fit",
        "--config", str(cfg), "--config", str(CONFIGS / "launch" / "cpu_ddp.yaml"),
        "--trainer.default_root_dir", str(run),
    ]  # fmt: skip
    env = fit_env(PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "Starting with 2 processes" in res.stdout + res.stderr

    # --- rank zero alone wrote the run folder (one config, one log version, no stray temp files)
    files = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())
    assert files == [
        "adapter/README.md",  # the model card
        f"adapter/{LORA_WEIGHT_NAME}",
        "checkpoints/last.ckpt",
        "config.yaml",
        "logs/version_0/metrics.csv",
        "samples/step_000002.png",
        "samples/step_000004.png",
    ], files
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4

    # --- the adapter loads onto the base and changes what it generates
    bb = Backbone.from_config(BackboneConfig(kind="tiny", pretrained=str(tiny_base)))
    before = bb.sample(["a handwritten digit 3"], seeds=[0], steps=3)
    load_adapter(bb, run / "adapter")
    assert bb.unet.peft_config
    after = bb.sample(["a handwritten digit 3"], seeds=[0], steps=3)
    assert not torch.allclose(before, after)

    # --- each rank trained on its own part of the single-process draw; together, all of it
    recs = {r: [json.loads(x) for x in (draws / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)}
    assert len(recs[0]) == len(recs[1]) == 4
    dm = AttributeDataModule(
        attributes=COLORS,
        source=SourceConfig(path=str(digits_dir / "table")),
        rebalance=RebalanceConfig(),
        concepts=CONCEPTS,
        batch_size=8,
        samples_per_epoch=32,
    )
    dm.setup("fit")
    sampler = WeightedEpochSampler(dm.weights, num_samples=32, seed=dm.seed, rank=0, world_size=1)
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        expected = [_fingerprint(dm, i) for i in sampler]
        seen = {r: [h for rec in recs[r] if rec["epoch"] == epoch for h in rec["pixels"]] for r in (0, 1)}
        assert seen[0] == expected[0::2] and seen[1] == expected[1::2]
        assert seen[0] != seen[1]

    # --- logged metrics are synced across ranks: the loss is the ranks' mean, the batch mix is pooled
    with open(run / "logs" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    assert len(rows) == 4
    red = dm.target.groups.index("red")
    for i, row in enumerate(rows):
        mean_loss = (recs[0][i]["loss"] + recs[1][i]["loss"]) / 2
        assert float(row["train/loss"]) == pytest.approx(mean_loss, rel=1e-5)
        groups = recs[0][i]["groups"] + recs[1][i]["groups"]
        known = [g for g in groups if g >= 0]
        assert float(row["mix/red"]) == pytest.approx(sum(g == red for g in known) / len(known))
        assert float(row["mix/red_target"]) == pytest.approx(0.5)
    assert {"lr-AdamW", "mix/gap", "train/diffusion_loss"} <= set(rows[0])


# ------------------------------------------------------------------------------------------ memory
def test_gradient_checkpointing_recomputes_activations_and_keeps_the_gradients(digits_dir):
    from diffusers.models.resnet import ResnetBlock2D

    from fairtune.models import LoraConfig
    from fairtune.train import GradientCheckpointing

    torch.manual_seed(0)
    module = DebiasModule(
        backbone=BackboneConfig(kind="tiny", text_encoder=TEXT_ENCODER, unet=TINY), lora=LoraConfig(rank=4)
    )
    dm = AttributeDataModule(
        attributes=COLORS, source=SourceConfig(path=str(digits_dir / "table")), batch_size=4
    )
    dm.setup("fit")
    batch = dm.collate([dm.dataset[i] for i in range(4)])
    calls = []
    block = next(m for m in module.backbone.unet.modules() if isinstance(m, ResnetBlock2D))
    # a pre-hook: recomputation stops early once it has what backward needs, before forward returns
    block.register_forward_pre_hook(lambda *a: calls.append(1))

    def grads():
        module.zero_grad()
        calls.clear()
        loss, _ = module.diffusion_loss(batch, torch.Generator().manual_seed(0))
        loss.backward()
        return [p.grad.clone() for p in module.trained_params()], len(calls)

    module.backbone.unet.train()
    plain, plain_calls = grads()
    GradientCheckpointing(enabled=True).setup(None, module, "fit")
    assert module.backbone.unet.is_gradient_checkpointing
    ckpt, ckpt_calls = grads()
    assert plain_calls == 1 and ckpt_calls == 2  # the block ran again in the backward pass
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ launchers
FAKE_SRUN = """#!/bin/bash
# stands in for srun on one host: SLURM_NTASKS copies of the command, each with its task's ids
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((r = 0; r < SLURM_NTASKS; r++)); do
  SLURM_PROCID=$r SLURM_LOCALID=$r SLURM_NODEID=0 "$@" &
  pids+=($!)
done
rc=0; for p in "${pids[@]}"; do wait "$p" || rc=$?; done; exit $rc
"""
FAKE_SCONTROL = '#!/bin/bash\n[ "$1 $2" = "show hostnames" ] && echo 127.0.0.1\n'


def test_launcher_scripts_are_valid_bash():
    for script in ("torchrun.sh", "slurm_fit.sbatch"):
        subprocess.run(["bash", "-n", str(ROOT / "scripts" / script)], check=True)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "slurm"])
def test_launcher_scripts_train_with_two_cpu_processes(launcher, digits_dir, tiny_base, tmp_path):
    """scripts/torchrun.sh and scripts/slurm_fit.sbatch (under a stand-in srun/scontrol on this host)
    start 2 ranks that Lightning joins, and the run ends with an adapter."""
    cfg = tiny_config(digits_dir, tiny_base, tmp_path / "fit.yaml")
    run = tmp_path / "run"
    args = ["--config", str(cfg), "--config", str(CONFIGS / "launch" / "cpu_ddp.yaml")]
    args += ["--trainer.default_root_dir", str(run)]
    env = fit_env(MASTER_PORT=str(29500 + os.getpid() % 1000))
    if launcher == "torchrun":
        cmd = ["bash", str(ROOT / "scripts" / "torchrun.sh"), *args]
        env.update(NPROC_PER_NODE="2", PYTHON=sys.executable)
    else:
        fake = tmp_path / "bin"
        fake.mkdir()
        for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
            (fake / name).write_text(text)
            (fake / name).chmod(0o755)
        cmd = ["bash", str(ROOT / "scripts" / "slurm_fit.sbatch"), *args]
        env.update(
            PATH=os.pathsep.join([str(fake), str(Path(sys.executable).parent), env["PATH"]]),
            SLURM_JOB_NODELIST="localhost", SLURM_JOB_ID="4242", SLURM_JOB_NAME="fairtune-fit",
            SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="2", SLURM_JOB_NUM_NODES="1", SLURM_SUBMIT_DIR=str(ROOT),
        )  # fmt: skip
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "Starting with 2 processes" in res.stdout + res.stderr
    assert (run / "adapter" / LORA_WEIGHT_NAME).exists()


def test_sharded_export_gathers_and_writes_the_same_adapter(tmp_path):
    """Under FSDP the adapter is written from the gathered state dict (FSDP's wrapper prefixes in the
    names); it must equal what rank zero writes from its own copy under DDP."""
    from types import SimpleNamespace

    from safetensors.torch import load_file

    from fairtune.models import LoraConfig
    from fairtune.train import ExportWeights

    torch.manual_seed(0)
    module = DebiasModule(
        backbone=BackboneConfig(kind="tiny", text_encoder=TEXT_ENCODER, unet=TINY), lora=LoraConfig(rank=4)
    )
    with torch.no_grad():
        for p in module.trained_params():
            p.add_(torch.randn_like(p))

    class FSDPStrategy:  # what the export sees of Lightning's: the gathered, prefixed state dict
        def lightning_module_state_dict(self):
            return {k.replace("unet.down_blocks", "unet._fsdp_wrapped_module.down_blocks"): v
                    for k, v in module.state_dict().items()}  # fmt: skip

    export = ExportWeights(dirpath=str(tmp_path / "sharded"))
    with pytest.raises(ValueError, match="model.ema"):
        ema_module = SimpleNamespace(lora=module.lora, _ema=[torch.zeros(1)])
        export.setup(
            SimpleNamespace(strategy=FSDPStrategy(), is_global_zero=True, default_root_dir=str(tmp_path)),
            ema_module,
            "fit",
        )
    trainer = SimpleNamespace(
        strategy=FSDPStrategy(), is_global_zero=True, default_root_dir=str(tmp_path), global_step=0
    )
    export.export(trainer, module)
    plain = SimpleNamespace(
        strategy=object(), is_global_zero=True, default_root_dir=str(tmp_path / "plain"), global_step=0
    )
    ExportWeights().export(plain, module)
    got = load_file(str(tmp_path / "sharded" / "adapter" / LORA_WEIGHT_NAME))
    ref = load_file(str(tmp_path / "plain" / "adapter" / LORA_WEIGHT_NAME))
    assert got.keys() == ref.keys() and any("down_blocks" in k for k in got)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k])
