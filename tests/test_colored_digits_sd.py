"""ColoredDigits-SD's frozen parts (benchmarks/colored_digits_sd.py) at toy scale: the folder it
assembles is a Stable Diffusion checkpoint diffusers loads and runs with no fairtune code, its text
encoder is the trained CLIP's text tower, and the product's trainer pretrains its UNet on latents."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import colored_digits_sd as sd  # noqa: E402


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    opt = sd.Options(data=root / "data", out=root / "out", vae_steps=2, vae_batch_size=4, clip_steps=2,
                     batch_size=4, threads=1, device="cpu", n_per_prompt=2, sampling_steps=2,
                     results=root / "results", correction_boot=50, n_calibration=400)  # fmt: skip
    from fairtune.colored_digits import ColoredDigitsConfig, build_colored_digits

    # one render per source image (a quarter of the data): the `data` step then finds it and skips
    build_colored_digits(ColoredDigitsConfig(size=32, renders_per_image=1, heldout_renders=1), opt.data)
    for step in ("data", "vae", "clip", "assemble"):  # `all` goes on to a full-length judge and UNet training
        sd.main(step, opt)
    return opt


@pytest.fixture(scope="module")
def judged(built):
    """The toy build with its judges (one epoch each)."""
    from fairtune.colored_digits import JudgeTrainConfig, train_judges

    if not (built.out / "judges" / "judges.json").is_file():
        train_judges(built.data, built.out / "judges", JudgeTrainConfig(digit_epochs=1, color_epochs=1))
    return built


def test_measure_generates_through_diffusers_and_scores_both_judges(judged):
    """The measurement on the untrained folder (as if pretrained): every figure present and in range,
    the hue share of each prompt checked against the corrected CLIP interval."""
    import shutil

    built = judged
    shutil.copytree(built.out / "init", built.out / "pretrain" / "model")
    sd.main("measure", built)
    r = json.loads((built.results / "colored_digits_sd_base.json").read_text())
    assert len(r["per_prompt"]) == 30 and r["settings"]["n_per_prompt"] == 2
    assert 0.0 <= r["fidelity_neutral"] <= 1.0
    placed = [p for p in r["per_prompt"] if p["kind"] == "neutral" and p["hue_red"] == p["hue_red"]]
    assert (0.0 <= r["skew"] <= 0.5) if len(placed) == 10 else r["skew"] != r["skew"]  # nan: a digit unplaced
    for p in r["per_prompt"]:
        if p["hue_red"] == p["hue_red"]:  # not nan: some image placed
            assert p["covered"] == (p["corrected_low"] - 1e-9 <= p["hue_red"] <= p["corrected_high"] + 1e-9)
    conf = r["confusion_hue_rows_clip_cols"]["counts"]
    assert sum(map(sum, conf)) == 60 and sum(conf[-1]) / 60 == pytest.approx(r["hue_undetermined"])
    md = (built.results / "colored_digits_sd_base.md").read_text()
    assert "StableDiffusionPipeline.from_pretrained" in md and "| a red handwritten digit 3 |" in md


def test_the_assembled_folder_is_a_stable_diffusion_checkpoint(built):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPModel

    pipe = StableDiffusionPipeline.from_pretrained(built.out / "init")
    images = pipe(
        "a handwritten digit 3", num_inference_steps=2, height=32, width=32, output_type="np"
    ).images
    assert images.shape == (1, 32, 32, 3)
    assert pipe.unet.config.sample_size == 8 and pipe.vae.config.latent_channels == 4
    # the text encoder is the trained CLIP's text tower, weight for weight
    clip = CLIPModel.from_pretrained(built.out / "clip")
    text = pipe.text_encoder.state_dict()
    tower = clip.text_model.state_dict()
    text = {k.removeprefix("text_model."): v for k, v in text.items()}
    assert text.keys() == tower.keys()
    assert all(torch.equal(text[k], tower[k]) for k in tower)
    assert pipe.unet.config.cross_attention_dim == clip.config.text_config.hidden_size
    record = json.loads((built.out / "build.json").read_text())
    assert record["vae"]["scaling_factor"] == pytest.approx(pipe.vae.config.scaling_factor)
    assert 0.0 <= record["clip"]["zero_shot_ink_accuracy_heldout"] <= 1.0
    size = sum(f.stat().st_size for f in (built.out / "init").rglob("*") if f.is_file())
    assert size < 20e6, size  # it ships in the repository


def test_a_finished_step_is_skipped_and_a_half_written_one_is_not_kept(built, monkeypatch):
    before = (built.out / "vae" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns

    def boom(*a, **k):
        raise RuntimeError("killed")

    monkeypatch.setattr(sd, "train_vae", boom)
    sd.main("vae", built)  # done: skipped, nothing trained
    assert (built.out / "vae" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == before
    monkeypatch.setattr(sd, "train_clip", boom)
    other = sd.Options(**{**built.__dict__, "out": built.out.parent / "other"})
    (other.out / "vae").mkdir(parents=True)
    (other.out / "vae" / "config.json").write_text((built.out / "vae" / "config.json").read_text())
    with pytest.raises(RuntimeError, match="killed"):
        sd.main("clip", other)
    assert not (other.out / "clip").exists()  # no half-written CLIP for the next step to load


def test_the_pretraining_config_instantiates_on_the_built_folder(built, tmp_path):
    from fairtune.cli import FairtuneCLI
    from fairtune.data import AttributeDataModule
    from fairtune.train import DebiasModule

    args = [
        "--config", str(ROOT / "configs" / "base" / "pretrain_colored_digits_sd.yaml"),
        "--model.backbone.pretrained", str(built.out / "init"),
        "--data.source.path", str(built.data / "table"),
        "--trainer.default_root_dir", str(tmp_path),
    ]  # fmt: skip
    cli = FairtuneCLI(DebiasModule, AttributeDataModule, args=args, run=False)
    assert cli.model.lora is None and cli.model.backbone_config.kind == "sd"  # the whole UNet trains
    assert cli.datamodule.latents is not None  # from cached latents


# A subprocess `fairtune fit` (about 20 s on 2 idle cores): `pytest -m slow` runs it.
@pytest.mark.slow
def test_the_unet_pretrains_on_cached_latents_with_the_product_trainer(built, tmp_path):
    cmd = [
        sys.executable, "-m", "fairtune.cli", "fit",
        "--config", str(ROOT / "configs" / "base" / "pretrain_colored_digits_sd.yaml"),
        "--model.backbone.pretrained", str(built.out / "init"),
        "--data.source.path", str(built.data / "table"),
        "--data.latents.dir", str(tmp_path / "latents"),
        "--data.batch_size", "4", "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(tmp_path / "run"),
    ]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "run" / "model")
    init = StableDiffusionPipeline.from_pretrained(built.out / "init")
    trained, start = pipe.unet.state_dict(), init.unet.state_dict()
    assert any(not torch.equal(trained[k], start[k]) for k in start)  # the UNet trained
    vae, vae0 = pipe.vae.state_dict(), init.vae.state_dict()
    assert all(torch.equal(vae[k], vae0[k]) for k in vae0)  # the VAE stayed frozen
    assert list((tmp_path / "latents").iterdir())  # from the latent cache


def test_the_sd_lever_recipe_trains_every_lever_from_shards_and_from_cached_latents(built, tmp_path):
    """configs/colored_digits_sd/fairness.yaml (lever 3 written as the occupations recipe writes it: a
    CLIP classifier, preservation in latent space) with the sampler and the adversary, on the shipped
    model through the product's CLI: the probe trains on the labelled renders with the shipped CLIP and
    tells the inks apart, and a fit step of every lever's loss runs from webdataset shards (the
    streaming sampler) and from the table with cached VAE latents."""
    from fairtune.cli import FairtuneCLI
    from fairtune.data import AttributeDataModule
    from fairtune.models import train_clip_probe
    from fairtune.train import DebiasModule

    probe = tmp_path / "probe"
    report = train_clip_probe(built.data / "table", probe, clip=sd.SHIPPED_CLIP, attribute="color",
                              classes=["red", "blue"])  # fmt: skip
    assert report["val_accuracy"] >= 0.95, report["val_accuracy"]
    recipe = ROOT / "configs" / "colored_digits_sd"
    shards = sorted((built.data / "shards").glob("train-*.tar"))
    assert shards
    sources = {
        "shards": ["--data.source.path", str(shards[0])],
        "latents": ["--data.source.path", str(built.data / "table"),
                    "--data.latents", json.dumps({"dir": str(tmp_path / "latents")})],
    }  # fmt: skip
    for name, source in sources.items():
        args = ["--config", str(recipe / "lora.yaml"), "--config", str(recipe / "fairness.yaml"), *source,
                "--data.rebalance", '{"unknown": "keep"}', "--data.batch_size", "4",
                "--data.samples_per_epoch", "8", "--model.adversary", '{"weight": 0.5, "warmup_steps": 0}',
                "--model.fairness.classifier.init_args.probe", str(probe), "--model.fairness.start_step", "0",
                "--model.fairness.ramp_steps", "0", "--model.fairness.every_k_steps", "1",
                "--model.fairness.concepts_per_step", "1", "--model.fairness.samples_per_concept", "2",
                "--trainer.max_steps", "1", "--trainer.accelerator", "cpu", "--trainer.devices", "1",
                "--trainer.default_root_dir", str(tmp_path / name)]  # fmt: skip
        cli = FairtuneCLI(DebiasModule, AttributeDataModule, args=args, run=False)
        assert cli.model.fairness.preservation.features == "latent"
        cli.trainer.fit(cli.model, cli.datamodule)
        logged = cli.trainer.logged_metrics
        for key in ("adversary/head_loss", "fairness/align", "fairness/preserve", "train/loss"):
            assert key in logged and torch.isfinite(logged[key]), (name, key)
        assert cli.datamodule.source.is_shards() == (name == "shards")
        assert (cli.datamodule.latent_entry is not None) == (name == "latents"), name
    assert list((tmp_path / "latents").iterdir())  # the entry the latents run encoded


def test_the_sd_pair_trains_the_demos_arms_and_is_judged_as_the_demo_judges():
    """The pair on ColoredDigits-SD is the demo's (same arms and values, the 200-step budget the pixel
    model's pair met its goals at), and its comparison is the demo's on the SD model: same methods'
    settings, prompts, target and budget; the recipe differs from the pixel one only where the model does."""
    import yaml

    demo = yaml.safe_load((ROOT / "configs" / "demo" / "sweep.yaml").read_text())
    spec = yaml.safe_load(sd.PAIR_SPEC.read_text())
    pixel_200 = yaml.safe_load(
        (ROOT / "benchmarks/specs/class_adapters_datafree_wordings_200.yaml").read_text()
    )
    for cls in ("red", "blue"):
        assert spec["arms"][cls] == demo["arms"][cls]
    assert spec["overrides"]["trainer.max_steps"] == pixel_200["overrides"]["trainer.max_steps"]
    assert spec["base"] == ["configs/colored_digits_sd/lora.yaml"]
    pixel = yaml.safe_load((ROOT / "configs" / "colored_digits" / "lora.yaml").read_text())
    recipe = yaml.safe_load((ROOT / "configs" / "colored_digits_sd" / "lora.yaml").read_text())
    assert recipe["model"]["backbone"] == {"kind": "sd", "pretrained": "colored-digits-sd32"}
    for key in ("lora", "optim", "prompt_dropout"):
        assert recipe["model"][key] == pixel["model"][key]
    assert {k: v for k, v in recipe["data"].items() if k not in ("source", "image_size")} == {
        k: v for k, v in pixel["data"].items() if k != "source"
    }
    demo_cmp = yaml.safe_load((ROOT / "configs" / "compare" / "colored_digits.yaml").read_text())
    sd_cmp = yaml.safe_load(sd.SD_COMPARE.read_text())
    assert sd_cmp["prompts"] == demo_cmp["prompts"] and sd_cmp["target"] == demo_cmp["target"]
    by_name = {m["name"]: m for m in demo_cmp["methods"]}
    for m in sd_cmp["methods"]:
        ref = dict(by_name[m["name"]])
        if m["kind"] == "class_adapters":
            assert set(m["class_adapters"]) == set(ref.pop("class_adapters")) and m.pop("class_adapters")
        assert m == ref
    assert sd_cmp["generation"]["n_per_prompt"] == 128 and sd_cmp["generation"]["steps"] == 15
    assert set(sd_cmp["judges"]["second"]["prompts"]) == {"red", "blue"}


def test_the_shipped_model_runs_in_diffusers_alone_and_its_clip_sees_the_ink():
    """The shipped ColoredDigits-SD (colored-digits-sd32) loads with StableDiffusionPipeline alone and
    draws 32x32 images; the shipped CLIP, by its registered name through the product's zero-shot judge,
    tells red from blue on fresh renders of real digits, and its text tower is the model's encoder."""
    import numpy as np
    from diffusers import StableDiffusionPipeline
    from sklearn.datasets import load_digits

    from fairtune.colored_digits import BACKGROUND, INK, render
    from fairtune.models import CLIPZeroShotClassifier, resolve_shipped

    model = resolve_shipped("colored-digits-sd32")
    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(["a handwritten digit 3"] * 2, height=32, width=32, num_inference_steps=2, output_type="np",
               generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert out.images.shape == (2, 32, 32, 3) and np.isfinite(out.images).all()
    size = sum(f.stat().st_size for f in model.rglob("*") if f.is_file())
    assert size < 20e6, size
    digits = load_digits()
    gray = (digits.images[:40] / 16.0).astype(np.float32)
    inks = ["red", "blue"] * 20
    rgb = render(gray, np.array([INK[c] for c in inks]), np.array([BACKGROUND["light"]] * 40), size=32,
                 rng=np.random.default_rng(0))  # fmt: skip
    images = torch.from_numpy(rgb).permute(0, 3, 1, 2).float()
    judge = CLIPZeroShotClassifier("colored-digits-sd32-clip", ["red", "blue"], sd.INK_PROMPTS)
    pred = judge.predict(images).numpy()
    assert (pred == np.array([0, 1] * 20)).mean() >= 0.95
    from transformers import CLIPModel

    tower = CLIPModel.from_pretrained(resolve_shipped("colored-digits-sd32-clip")).text_model.state_dict()
    enc = {k.removeprefix("text_model."): v for k, v in pipe.text_encoder.state_dict().items()}
    assert enc.keys() == tower.keys() and all(torch.equal(enc[k], v) for k, v in tower.items())


@pytest.mark.slow  # the default suite checks the same parity on a tiny SD (tests/test_baselines.py); the
# shipped model's, at the comparison's settings: benchmarks/results/colored_digits_sd_fd_parity.md
def test_fair_diffusion_on_the_shipped_model_equals_diffusers_semantic_pipeline(judged):
    """The comparison's Fair Diffusion (its SEGA settings, steps, guidance and seeds) on the shipped
    colored-digits-sd32, through fairtune's sampler, equals diffusers' SemanticStableDiffusionPipeline
    image for image, each image pushed toward the ink drawn for it."""
    r = sd.fd_parity(judged, n_per_prompt=3, prompts=["a handwritten digit 7", "a blue handwritten digit 0"])
    assert r["n_images"] == 6 and r["model"] == "colored-digits-sd32"
    assert r["settings"]["edit_warmup_steps"] == 2 and r["settings"]["steps"] == 15
    assert r["max_abs_pixel_diff"] < 1e-4 and r["same_hue_label"] == 1.0
    assert 0 < r["drawn_share"]["red"] < 1  # both directions: some images pushed toward each ink
    assert "| 6 |" in sd.fd_parity_markdown(r)
