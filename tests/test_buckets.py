"""Aspect-ratio buckets (``data.buckets``): every image goes to the bucket nearest its aspect ratio,
is resized to cover it and centre-cropped; each batch holds one bucket, cut from the sampler's own draw
(the rebalanced mix kept, DDP ranks yielding as many batches, a resumed loader skipping whole batches);
a run trains on a table of mixed sizes through ``fairtune fit``; the unsupported combinations refuse."""

from __future__ import annotations

import math
from pathlib import Path

import datasets
import lightning as L
import numpy as np
import pytest
import torch
import yaml
from conftest import COLORS, smoke_trainer
from PIL import Image

from fairtune.cli import main
from fairtune.data import (
    AttributeDataModule,
    BucketBatchSampler,
    BucketConfig,
    LatentCacheConfig,
    RebalanceConfig,
    SchemaError,
    SourceConfig,
    WeightedEpochSampler,
    bucket_sizes,
)
from fairtune.data._buckets import assign_buckets, fit_to_bucket
from fairtune.models import BackboneConfig, LoraConfig
from fairtune.train import DebiasModule, OptimConfig

SIZES = [(32, 16), (16, 32), (16, 16)]  # wide, tall, square (width, height)


def test_buckets_keep_the_area_and_the_aspect_limit():
    sizes = bucket_sizes(512, BucketConfig())  # SD 1.5 at 512 px, kohya's step of 64
    assert (512, 512) in sizes
    for w, h in sizes:
        assert w % 64 == 0 and h % 64 == 0
        assert w * h <= 512 * 512
        assert max(w / h, h / w) <= 2.0
        assert (h, w) in sizes  # both orientations
    assert len(sizes) >= 5  # more than the square and one pair
    assert [w / h for w, h in sizes] == sorted(w / h for w, h in sizes)
    # a 2:1 photo goes to the widest bucket, a square one to the square, a tall one to a tall bucket
    b = assign_buckets([(1024, 512), (300, 300), (400, 700), None], sizes)
    assert sizes[b[0]] == max(sizes, key=lambda s: s[0] / s[1])
    assert sizes[b[1]] == (512, 512) and sizes[b[3]] == (512, 512)  # unreadable: the square
    want = math.log(400 / 700)
    assert min(abs(math.log(w / h) - want) for w, h in sizes) == pytest.approx(
        abs(math.log(sizes[b[2]][0] / sizes[b[2]][1]) - want)
    )
    with pytest.raises(SchemaError, match="step=48 must divide data.image_size=512"):
        bucket_sizes(512, BucketConfig(step=48))


def test_an_image_is_resized_to_cover_its_bucket_and_cropped_at_the_centre():
    # 40x16, green, with red bands 5 px wide at the left and right edges: covering 20x12 scales it by
    # 0.75 (30x12) and crops 5 px off each side, which removes the (3.75 px) bands
    arr = np.zeros((16, 40, 3), dtype=np.uint8)
    arr[:, :, 1] = 200
    arr[:, :5] = arr[:, -5:] = (230, 0, 0)
    out = fit_to_bucket(Image.fromarray(arr), (20, 12))
    assert out.size == (20, 12)
    px = np.asarray(out).astype(int)
    assert (px[..., 1] > 150).all() and (px[..., 0] < 60).all()
    # a square image into a wide bucket: the crop keeps the middle rows
    sq = np.zeros((20, 20, 3), dtype=np.uint8)
    sq[:4] = sq[-4:] = (230, 0, 0)
    sq[4:-4] = (0, 0, 230)
    out = np.asarray(fit_to_bucket(Image.fromarray(sq), (20, 12))).astype(int)
    assert out.shape == (12, 20, 3) and (out[..., 2] > 150).all()


def test_batches_are_cut_from_the_draws_one_bucket_each_nothing_dropped_every_epoch_as_long():
    rng = np.random.default_rng(0)
    n, batch = 60, 4
    weights = torch.from_numpy(rng.uniform(0.2, 2.0, n))
    buckets = rng.integers(0, 3, n)
    buckets[:2] = 3  # a rare bucket: about 3 draws an epoch, less than a batch
    for rank in (0, 1):
        sampler = WeightedEpochSampler(weights, num_samples=200, seed=3, rank=rank, world_size=2)
        bs = BucketBatchSampler(sampler, buckets, batch)
        per = len(bs)
        assert per == 100 // batch  # what an epoch fills without buckets, on every rank
        epochs = []
        for e in range(4):
            bs.set_epoch(e)
            got = list(bs)
            assert len(got) == per
            assert all(len(b) == batch and len({int(buckets[i]) for i in b}) == 1 for b in got)
            epochs.append(got)
        # the batches are the draws of epoch 0, 1, 2, ... bucketed as one stream, in order
        stream = []
        queues: dict[int, list[int]] = {}
        for e in range(6):
            sampler.set_epoch(e)
            for i in sampler.epoch_draw()[rank::2].tolist():
                queues.setdefault(int(buckets[i]), []).append(i)
                if len(queues[int(buckets[i])]) == batch:
                    stream.append(queues.pop(int(buckets[i])))
        assert [b for got in epochs for b in got] == stream[: 4 * per]
        # the rare bucket is trained on, across epochs' ends: nothing drawn is dropped
        assert any(int(buckets[b[0]]) == 3 for got in epochs for b in got)
        # a resumed run (a fresh sampler, epoch 2, two batches done) yields what the uninterrupted one did
        again = BucketBatchSampler(
            WeightedEpochSampler(weights, num_samples=200, seed=3, rank=rank, world_size=2), buckets, batch
        )
        again.set_epoch(2)
        again.skip = 2
        assert list(again) == epochs[2][2:]
        assert list(again) == epochs[2]  # the skip applies once
        again.set_epoch(0)  # an earlier epoch: rebuilt from the stream's start
        assert list(again) == epochs[0]


def _mixed_table(path: Path) -> Path:
    """32 records, digits 0 and 1, red/blue labels, images wide, tall or square: a solid ink on a
    light ground with a dark centre dot (so the centre crop is checkable)."""
    rows = {"image": [], "prompt": [], "concept": [], "color": []}
    for i in range(32):
        w, h = SIZES[i % 3]
        color = ("red", "blue")[i // 3 % 2]
        arr = np.full((h, w, 3), 235, dtype=np.uint8)
        arr[2:-2, 2:-2] = (200, 30, 30) if color == "red" else (30, 30, 200)
        arr[h // 2 - 1 : h // 2 + 1, w // 2 - 1 : w // 2 + 1] = 0
        rows["image"].append(Image.fromarray(arr))
        rows["prompt"].append(f"a handwritten digit {i % 2}")
        rows["concept"].append(f"digit {i % 2}")
        rows["color"].append(color)
    ds = datasets.Dataset.from_dict(rows, features=datasets.Features({
        "image": datasets.Image(), "prompt": datasets.Value("string"), "concept": datasets.Value("string"),
        "color": datasets.Value("string"),
    }))  # fmt: skip
    ds.save_to_disk(str(path))
    return path


class Shapes(L.Callback):
    def __init__(self):
        self.shapes, self.losses = [], []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.shapes.append(tuple(batch["pixels"].shape[-2:]))
        self.losses.append(float(outputs["loss"]))


def test_a_run_trains_on_images_of_mixed_sizes_one_bucket_per_batch(tiny_sd, tmp_path):
    table = _mixed_table(tmp_path / "mixed")
    cfg = BucketConfig(max_aspect=2.0, step=4)  # tiny SD: a 2x VAE and a two-level UNet
    dm = AttributeDataModule(
        source=SourceConfig(path=str(table)), attributes=COLORS, rebalance=RebalanceConfig(),
        image_size=16, batch_size=4, samples_per_epoch=48, buckets=cfg,
    )  # fmt: skip
    dm.setup("fit")
    assert dm.bucket_sizes == [(12, 20), (16, 16), (20, 12)]
    # every record went to the bucket of its own orientation
    for i, b in enumerate(dm.record_bucket):
        w, h = SIZES[dm.dataset.indices[i] % 3]
        assert dm.bucket_sizes[b] == {(32, 16): (20, 12), (16, 32): (12, 20), (16, 16): (16, 16)}[(w, h)]
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(batches) == len(loader) > 0
    shapes = {tuple(b["pixels"].shape[-2:]) for b in batches}
    assert len(shapes) == 3  # (H, W) of every bucket over the epoch ...
    assert all(b["pixels"].shape[0] == 4 for b in batches)  # ... one bucket per batch
    first = batches[0]["pixels"][0]
    h, w = first.shape[-2:]
    assert first[:, h // 2, w // 2].max() < -0.5  # the centre dot survived the crop: it is dark
    assert first.min() >= -1.0 and first.max() <= 1.0
    # a loader resumed two batches into the epoch yields the rest of it (whole batches)
    resumed = dm.train_dataloader()
    resumed.load_state_dict({"epoch": 0, "batches": 2})
    rest = list(resumed)
    assert len(rest) == len(batches) - 2
    assert all(torch.equal(a["pixels"], b["pixels"]) for a, b in zip(rest, batches[2:]))

    torch.manual_seed(0)
    module = DebiasModule(
        backbone=BackboneConfig(kind="sd", pretrained=str(tiny_sd)), lora=LoraConfig(rank=4),
        optim=OptimConfig(lr=1e-2, warmup_steps=1),
    )  # fmt: skip
    seen = Shapes()
    trainer = smoke_trainer(max_steps=4)
    trainer.callbacks.append(seen)
    trainer.fit(module, dm)
    assert len(seen.shapes) == 4 and len(set(seen.shapes)) >= 2
    assert all(np.isfinite(seen.losses))


def test_fit_takes_data_buckets_from_its_config(tiny_sd, tmp_path):
    table = _mixed_table(tmp_path / "mixed")
    cfg = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 2,
                    "default_root_dir": str(tmp_path / "run"),
                    "enable_progress_bar": False, "enable_model_summary": False},
        "model": {"backbone": {"kind": "sd", "pretrained": str(tiny_sd), "resolution": 16},
                  "lora": {"rank": 4}, "optim": {"lr": 1e-2, "warmup_steps": 1}},
        "data": {"source": {"path": str(table)}, "attributes": COLORS, "rebalance": {}, "batch_size": 4,
                 "samples_per_epoch": 16, "buckets": {"max_aspect": 2.0, "step": 4}},
    }  # fmt: skip
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(cfg))
    main(["fit", "--config", str(path)])
    assert (tmp_path / "run" / "adapter" / "pytorch_lora_weights.safetensors").is_file()
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["data"]["buckets"] == {"max_aspect": 2.0, "step": 4}
    assert saved["data"]["image_size"] == 16  # from the resolution: the area every bucket keeps


def test_buckets_refuse_what_they_cannot_do(tmp_path, digits_dir):
    table = _mixed_table(tmp_path / "mixed")
    base = dict(attributes=COLORS, batch_size=4, buckets=BucketConfig(step=4))
    with pytest.raises(SchemaError, match="data.buckets needs data.image_size"):
        AttributeDataModule(source=SourceConfig(path=str(table)), **base).setup("fit")
    with pytest.raises(SchemaError, match="data.buckets needs a table source"):
        AttributeDataModule(
            source=SourceConfig(path=str(digits_dir / "shards" / "*.tar")), image_size=16, **base
        ).setup("fit")
    dm = AttributeDataModule(
        source=SourceConfig(path=str(table)), image_size=16,
        latents=LatentCacheConfig(dir=str(tmp_path / "c")), **base,
    )  # fmt: skip
    dm.setup("fit")
    with pytest.raises(SchemaError, match="data.latents and data.buckets together"):
        dm.use_latent_cache("vae", lambda x: (x, x))
