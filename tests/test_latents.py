"""The latent cache: a run from cached latents never calls the VAE encoder and trains exactly as a run
that encodes every step; an entry is reused across runs and rebuilt when the model or preprocessing
changes; a pixel-space backbone refuses it clearly."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from conftest import COLORS, TEXT_ENCODER, smoke_trainer

from fairtune.data import AttributeDataModule, LatentCacheConfig, RebalanceConfig, SourceConfig
from fairtune.models import BackboneConfig, LoraConfig, TinyUNetConfig, make_tiny_stable_diffusion
from fairtune.train import DebiasModule, OptimConfig

CONCEPTS = ["digit 0", "digit 1"]  # a few hundred records: the cache builds in a second


def _dm(digits_dir, cache=None, **kw):
    kw.setdefault("image_size", 16)
    return AttributeDataModule(
        attributes=COLORS,
        source=SourceConfig(path=str(digits_dir / "table")),
        rebalance=RebalanceConfig(),
        concepts=kw.pop("concepts", CONCEPTS),
        batch_size=8,
        samples_per_epoch=16,
        latents=LatentCacheConfig(dir=str(cache)) if cache else None,
        **kw,
    )


def _module(sd, kind="sd"):
    torch.manual_seed(0)
    backbone = (
        BackboneConfig(kind="sd", pretrained=str(sd))
        if kind == "sd"
        else BackboneConfig(
            kind="tiny",
            text_encoder=TEXT_ENCODER,
            unet=TinyUNetConfig(sample_size=16, block_out_channels=[8, 16], norm_num_groups=4),
        )
    )
    return DebiasModule(
        backbone=backbone, lora=LoraConfig(rank=4), optim=OptimConfig(lr=1e-3, warmup_steps=1)
    )


class EncoderCalls(L.Callback):
    """Counts the VAE encoder's forward passes during the training steps (a forward hook on the real VAE)."""

    def __init__(self):
        self.calls, self.during_training, self.losses = 0, None, []

    def setup(self, trainer, module, stage):
        module.backbone.vae.encoder.register_forward_hook(lambda *a: setattr(self, "calls", self.calls + 1))

    def on_train_start(self, trainer, module):
        self.at_start = self.calls

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))

    def on_train_end(self, trainer, module):
        self.during_training = self.calls - self.at_start


def _fit(module, dm, steps=3):
    calls = EncoderCalls()
    trainer = smoke_trainer(max_steps=steps)
    trainer.callbacks.append(calls)
    trainer.fit(module, dm)
    return calls


def test_cached_latents_skip_the_encoder_and_train_as_encoding_every_step(digits_dir, tiny_sd, tmp_path):
    # encoding every step (random flips on): the encoder runs at each step
    plain = _fit(_module(tiny_sd), _dm(digits_dir, random_flip=True))
    assert plain.during_training == 3

    dm = _dm(digits_dir, tmp_path / "cache", random_flip=True)
    cached = _fit(_module(tiny_sd), dm)
    entry = dm.latent_entry
    assert entry.built and cached.calls > 0  # encoded once, in setup ...
    assert cached.during_training == 0  # ... and never while training
    assert entry.mean.shape[:2] == (len(dm.record_concepts), 2)  # both flip variants
    meta = json.loads((entry.path / "meta.json").read_text())
    assert meta["preprocessing"] == {
        "image_size": 16,
        "resize": "bicubic",
        "crop": "none",
        "variants": ["none", "hflip"],
    }
    # same seeds, same flips, same posterior draws: the same losses as encoding every step
    torch.testing.assert_close(torch.tensor(cached.losses), torch.tensor(plain.losses), rtol=1e-4, atol=1e-5)

    # another run (another sweep arm) over the same model and data reuses the entry: no encoding at all
    dm2 = _dm(digits_dir, tmp_path / "cache", random_flip=True)
    again = _fit(_module(tiny_sd), dm2)
    assert not dm2.latent_entry.built and dm2.latent_entry.path == entry.path
    assert again.calls == 0


def test_the_cache_is_rebuilt_when_the_model_or_preprocessing_changes(digits_dir, tiny_sd, tmp_path):
    cache = tmp_path / "cache"

    def entry(sd, **kw):
        dm = _dm(digits_dir, cache, **kw)
        dm.setup("fit")
        module = _module(sd)
        module.use_latent_cache(dm)
        return dm.latent_entry

    first = entry(tiny_sd)
    assert first.built
    assert not entry(tiny_sd).built
    # preprocessing: another image size, or flips
    assert entry(tiny_sd, image_size=8).built
    flipped = entry(tiny_sd, random_flip=True)
    assert flipped.built and flipped.mean.shape[1] == 2
    # model: the same layout with other VAE weights
    other = make_tiny_stable_diffusion(tmp_path / "other_sd", seed=1)
    changed = entry(other)
    assert changed.built and changed.path != first.path
    assert len({p.name for p in cache.iterdir() if not p.name.startswith(".")}) == 4


def test_a_pixel_space_backbone_refuses_the_latent_cache(digits_dir, tmp_path):
    with pytest.raises(ValueError, match="no VAE.*data.latents"):
        smoke_trainer(max_steps=1).fit(_module(None, kind="tiny"), _dm(digits_dir, tmp_path / "cache"))
    assert not (tmp_path / "cache").exists()


def _damage(path, how):
    """Damage an entry on disk as a crash, a full disk or bit rot would."""
    from safetensors.torch import load_file, save_file

    file = path / "latents.safetensors"
    if how == "nan":  # corrupted in place: same size, same header, NaN values
        size = file.stat().st_size
        tensors = load_file(str(file))
        tensors["mean"][0] = float("nan")
        save_file(tensors, str(file))
        assert file.stat().st_size == size
    elif how == "truncated":
        data = file.read_bytes()
        file.write_bytes(data[: len(data) // 2])
    elif how == "partial":  # a folder without meta.json, as a build killed half-way leaves
        (path / "meta.json").unlink()


@pytest.mark.parametrize("how", ["nan", "truncated", "partial"])
def test_a_damaged_entry_is_rebuilt_not_trained_on(digits_dir, tiny_sd, tmp_path, caplog, how):
    cache = tmp_path / "cache"

    def entry():
        dm = _dm(digits_dir, cache, concepts=["digit 0"])  # a few hundred records
        dm.setup("fit")
        _module(tiny_sd).use_latent_cache(dm)
        return dm.latent_entry

    first = entry()
    assert first.built
    mean = first.mean.clone()
    _damage(first.path, how)

    with caplog.at_level("WARNING", logger="fairtune.data._latents"):
        again = entry()
    assert again.built and again.path == first.path  # encoded again, in the same place
    assert torch.isfinite(again.mean).all() and torch.equal(again.mean, mean)
    assert str(first.path) in caplog.text and "encoding it again" in caplog.text
    assert [p.name for p in cache.iterdir() if p.is_dir()] == [first.path.name]  # nothing left aside
    assert not entry().built  # and the rebuilt entry is reused as any other
