"""Training from webdataset shards: the label index, the streaming rebalanced sampler (its mix against
the table sampler's, ranks and workers, resuming mid-epoch), and `fairtune fit` from shards, also
under DDP with 2 CPU processes."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from conftest import COLORS, TEXT_ENCODER, smoke_trainer, write_fit_config
from PIL import Image

from fairtune.cli import main
from fairtune.data import (
    AttributeDataModule,
    AttributeSpec,
    RebalanceConfig,
    Record,
    SchemaError,
    ShardLoader,
    SourceConfig,
    StreamingRebalancedDataset,
    Target,
    TargetConfig,
    WeightedEpochSampler,
    index_path,
    load_index,
    rebalance_weights,
    scan_shard,
    write_shards,
)
from fairtune.models import LORA_WEIGHT_NAME, BackboneConfig, LoraConfig, TinyUNetConfig
from fairtune.train import DebiasModule, OptimConfig

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")

SPEC = AttributeSpec({"color": ["red", "blue"]})
TARGET = Target(TargetConfig(), SPEC)
CONCEPTS = [f"digit {d}" for d in range(8)]
TINY = TinyUNetConfig(sample_size=16, block_out_channels=[8, 16], attention_head_dim=4, norm_num_groups=4)
CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _shards(digits_dir) -> str:
    return str(digits_dir / "shards" / "train-*.tar")


def _synthetic(n: int, seed: int = 0) -> list[Record]:
    """Skewed records: concept c0 mostly red, c1 mostly blue, every fifth without a label."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        concept = f"c{i % 2}"
        red = rng.random() < (0.8 if concept == "c0" else 0.3)
        label = None if i % 5 == 0 else ("red" if red else "blue")
        img = Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8))
        out.append(Record(img, f"prompt {i}", concept, {"color": label}))
    return out


def _z_max(counts: collections.Counter, probs: dict, n: int) -> float:
    """Largest deviation of observed shares from ``probs``, in binomial standard errors."""
    return max(abs(counts[b] / n - p) / np.sqrt(p * (1 - p) / n) for b, p in probs.items() if 0 < p < 1)


# ------------------------------------------------------------------------------------------ the index
def test_write_shards_writes_the_label_index_a_scan_rebuilds(tmp_path):
    recs = _synthetic(10)
    paths = write_shards(recs, tmp_path, per_shard=4)
    assert len(paths) == 3 and all(index_path(p).exists() for p in paths)
    for p in paths:
        written = json.loads(index_path(p).read_text())["members"]
        assert written == scan_shard(p)
    assert [m["attributes"]["color"] for m in load_index(paths[0])] == [
        r.attributes["color"] for r in recs[:4]
    ]
    # a stale sidecar (the shard was rewritten) is rebuilt from the shard, not trusted
    side = index_path(paths[0])
    data = json.loads(side.read_text())
    data["members"] = data["members"][:1]
    data["shard"]["size"] += 1
    side.write_text(json.dumps(data))
    assert len(load_index(paths[0])) == 4
    assert json.loads(side.read_text())["shard"]["size"] == os.path.getsize(paths[0])


def test_undeclared_label_in_shards_is_named(tmp_path):
    recs = _synthetic(4)
    paths = write_shards(recs, tmp_path, per_shard=4)
    side = index_path(paths[0])
    side.unlink()  # the scan reads the members' json
    bad = Target(TargetConfig(), AttributeSpec({"color": ["red", "green"]}))
    with pytest.raises(SchemaError, match="member '00000001'.*'blue'.*not declared"):
        StreamingRebalancedDataset(paths, bad.spec, bad)


# ------------------------------------------------------------------------------------------ the mix
def test_streamed_draw_matches_the_table_samplers_mix(digits_dir):
    """Per (concept, group) bucket, the shares drawn from shards over 2 ranks x 2 workers agree with the
    table sampler's expected mix and with its actual draw, within sampling noise."""
    n = 24000
    ds = StreamingRebalancedDataset(
        _shards(digits_dir), SPEC, TARGET, concepts=CONCEPTS, batch_size=50, samples_per_epoch=n
    )
    streamed = collections.Counter(ds.drawn(0, 2, 2) + ds.drawn(1, 2, 2))
    assert sum(streamed.values()) == n

    dm = AttributeDataModule(
        attributes=COLORS,
        source=SourceConfig(path=str(digits_dir / "table")),
        rebalance=RebalanceConfig(),
        concepts=CONCEPTS,
    )
    dm.setup("fit")
    w = dm.weights.numpy()
    expected: dict = collections.defaultdict(float)
    for c, g, wi in zip(dm.record_concepts, dm.record_groups, w):
        expected[(c, g)] += wi / w.sum()
    sampler = WeightedEpochSampler(dm.weights, num_samples=n, seed=0, rank=0, world_size=1)
    table = collections.Counter((dm.record_concepts[i], dm.record_groups[i]) for i in sampler)

    assert set(streamed) == set(expected)
    assert _z_max(streamed, expected, n) < 4.5
    assert _z_max(table, expected, n) < 4.5
    # the data is skewed (mostly red); both samplers draw each concept's colours 50/50
    for c in CONCEPTS:
        red, blue = streamed[(c, 0)], streamed[(c, 1)]
        assert abs(red / (red + blue) - 0.5) < 0.05
    raw = collections.Counter(g for g in ds.groups)
    assert raw[0] / (raw[0] + raw[1]) > 0.55


@pytest.mark.parametrize("unknown", ["keep", "drop"])
def test_records_without_a_label_are_drawn_as_the_table_sampler_draws_them(tmp_path, unknown):
    recs = _synthetic(400)
    paths = write_shards(recs, tmp_path, per_shard=100)
    n = 20000
    ds = StreamingRebalancedDataset(
        paths, SPEC, TARGET, rebalance_unknown=unknown, batch_size=100, samples_per_epoch=n
    )
    groups = [TARGET.group_of(r.attributes) for r in recs]
    w = rebalance_weights([r.concept for r in recs], groups, TARGET, unknown=unknown).numpy()
    expected: dict = collections.defaultdict(float)
    for r, g, wi in zip(recs, groups, w):
        expected[(r.concept, g)] += wi / w.sum()
    streamed = collections.Counter(ds.drawn(0, 1, 2))
    assert _z_max(streamed, expected, n) < 4.5
    unlabelled = sum(v for (c, g), v in streamed.items() if g < 0)
    if unknown == "drop":
        assert unlabelled == 0
    else:
        assert abs(unlabelled / n - 0.2) < 0.02  # one record in five, kept at weight 1


# ------------------------------------------------------------------------------------------ the stream
def _loader(paths, world=1, rank=0, workers=0, **kw):
    ds = StreamingRebalancedDataset(paths, SPEC, TARGET, batch_size=4, samples_per_epoch=32 * world, **kw)
    ds.rank, ds.world_size = rank, world
    loader = ShardLoader(ds, collate_fn=lambda b: [r.prompt if r else None for r in b], num_workers=workers)
    return ds, loader


def _epoch(loader, rank, world):
    # ShardLoader resolves the rank at iteration from torch.distributed / RANK
    os.environ["RANK"], os.environ["WORLD_SIZE"] = str(rank), str(world)
    try:
        return list(loader)
    finally:
        del os.environ["RANK"], os.environ["WORLD_SIZE"]


def test_ranks_and_workers_stream_the_planned_draw(tmp_path):
    recs = _synthetic(240)
    paths = write_shards(recs, tmp_path, per_shard=30)  # 8 shards: 2 ranks x 2 workers x 2
    prompt_key = {r.prompt: (r.concept, TARGET.group_of(r.attributes)) for r in recs}
    seen = {}
    for rank in (0, 1):
        ds, loader = _loader(paths, world=2, rank=rank, workers=2)
        batches = _epoch(loader, rank, 2)
        assert len(batches) == len(loader) == 8 and all(len(b) == 4 for b in batches)
        got = collections.Counter(prompt_key[p] for b in batches for p in b)
        assert got == collections.Counter(ds.drawn(rank, 2, 2))
        seen[rank] = {p for b in batches for p in b}
        # shards are dealt per rank: no record is read by both ranks
    assert not seen[0] & seen[1]
    # a new epoch is a new draw; the same epoch is the same draw
    ds, loader = _loader(paths)
    e0 = _epoch(loader, 0, 1)
    assert _epoch(loader, 0, 1) == e0
    loader.set_epoch(1)
    assert _epoch(loader, 0, 1) != e0


def test_a_loader_restored_mid_epoch_yields_the_rest_of_that_epoch(tmp_path):
    paths = write_shards(_synthetic(120), tmp_path, per_shard=30)
    _, loader = _loader(paths, workers=2)
    loader.set_epoch(3)
    full = _epoch(loader, 0, 1)
    it = iter(loader)
    head = [next(it) for _ in range(3)]
    state = loader.state_dict()
    assert state == {"epoch": 3, "batches": 3} and head == full[:3]

    _, fresh = _loader(paths, workers=2)  # a new process: restored from the checkpoint's state
    fresh.load_state_dict(state)
    assert _epoch(fresh, 0, 1) == full[3:]
    assert _epoch(fresh, 0, 1) == full  # the skip applies once


# ------------------------------------------------------------------------------------------ fit
def _fit_config(path: Path, shards: str, root: Path, **over) -> Path:
    return write_fit_config(
        path,
        backbone={"kind": "tiny", "text_encoder": TEXT_ENCODER, "unet": TINY.__dict__},
        data={"source": {"path": shards, "shuffle_buffer": 64}, "rebalance": {}, "samples_per_epoch": 32},
        root=root,
        **over,
    )


def test_fit_cli_trains_from_shards(digits_dir, tmp_path):
    cfg = _fit_config(tmp_path / "fit.yaml", _shards(digits_dir), tmp_path / "run")
    main(["fit", "--config", str(cfg)])
    run = tmp_path / "run"
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    assert (run / "adapter" / LORA_WEIGHT_NAME).exists()
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    # the loader's place in the epoch is in the checkpoint (4 batches per epoch: at the end of epoch 0)
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 0, "batches": 4}]


class _Record(L.Callback):
    def __init__(self):
        self.seen: list[tuple[int, list[str]]] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        digest = [str(hash(x.numpy().tobytes())) for x in batch["pixels"]]
        self.seen.append((trainer.global_step, digest))


def _module():
    torch.manual_seed(0)
    return DebiasModule(
        backbone=BackboneConfig(kind="tiny", text_encoder=TEXT_ENCODER, unet=TINY),
        lora=LoraConfig(rank=4),
        optim=OptimConfig(lr=1e-3, warmup_steps=1),
    )


@pytest.mark.parametrize("at", [3, 6], ids=["mid_epoch", "epoch_end"])
def test_fit_resumed_sees_the_batches_an_uninterrupted_run_sees(digits_dir, tmp_path, at):
    """A checkpoint at step 3 (mid-epoch) or 6 (the last batch of epoch 0, where fit's own checkpoint is
    written): the resumed run trains on the very batches an uninterrupted run trains on next."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def dm():
        return AttributeDataModule(
            attributes=COLORS,
            source=SourceConfig(path=_shards(digits_dir), shuffle_buffer=64),
            rebalance=RebalanceConfig(),
            concepts=CONCEPTS,
            batch_size=8,
            samples_per_epoch=48,  # 6 batches per epoch
        )

    ref = _Record()
    trainer = smoke_trainer(max_steps=at + 2)
    trainer.callbacks.append(ref)
    trainer.fit(_module(), dm())

    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=at, save_top_k=-1)
    first = L.Trainer(
        max_steps=at,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=[ckpt],
    )
    first.fit(_module(), dm())
    path = next(tmp_path.glob("*.ckpt"))
    resumed = _Record()
    trainer = smoke_trainer(max_steps=at + 2)
    trainer.callbacks.append(resumed)
    trainer.fit(_module(), dm(), ckpt_path=str(path))
    assert [s for s, _ in resumed.seen] == [at + 1, at + 2]  # (global_step after the optimizer step)
    assert resumed.seen == ref.seen[at : at + 2]


RECORDER = """
import json
from pathlib import Path
import lightning as L


class GroupRecorder(L.Callback):
    def __init__(self, out: str):
        self.out = out

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        rec = {"epoch": trainer.current_epoch, "prompts": batch["prompts"]}
        rec["groups"] = batch["groups"].tolist()
        Path(self.out).mkdir(parents=True, exist_ok=True)
        with open(Path(self.out) / f"rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\\n")
"""


@pytest.mark.slow  # ~20 s: two processes; DDP itself stays in the default suite (test_distributed)
def test_ddp_fit_from_shards_two_cpu_processes(digits_dir, tmp_path):
    run, draws = tmp_path / "run", tmp_path / "draws"
    (tmp_path / "shard_recorder.py").write_text(RECORDER)
    cfg = _fit_config(
        tmp_path / "fit.yaml",
        _shards(digits_dir),
        run,
        **{
            "trainer.callbacks": [
                {"class_path": "shard_recorder.GroupRecorder", "init_args": {"out": str(draws)}}
            ],
        },
    )
    cmd = [
        sys.executable, "-m", "fairtune.cli", "fit",
        "--config", str(cfg), "--config", str(CONFIGS / "launch" / "cpu_ddp.yaml"),
    ]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
    }
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "Starting with 2 processes" in res.stdout + res.stderr
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    assert (run / "adapter" / LORA_WEIGHT_NAME).exists()
    recs = {r: [json.loads(x) for x in (draws / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)}
    # 32 draws per epoch over 2 ranks: 2 batches of 8 per rank and epoch, 4 steps = 2 epochs
    assert len(recs[0]) == len(recs[1]) == 4
    assert all(len(r["prompts"]) == 8 for rank in recs.values() for r in rank)
    # each rank streamed its own shards' part of the draw the index plans for it
    ds = StreamingRebalancedDataset(
        _shards(digits_dir), SPEC, TARGET, concepts=CONCEPTS, batch_size=8, samples_per_epoch=32
    )
    for rank in (0, 1):
        for epoch in (0, 1):
            ds.epoch = epoch
            got = collections.Counter(g for r in recs[rank] if r["epoch"] == epoch for g in r["groups"])
            want = collections.Counter(g for _, g in ds.drawn(rank, 2, 1))
            assert got == want
