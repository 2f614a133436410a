"""ColoredDigits-SD (issue 25): a latent diffusion model trained on the benchmark's own images and saved
in Stable Diffusion's layout, with a CLIP that really sees, and the base model measured.

    python benchmarks/colored_digits_sd.py data      # render ColoredDigits-Bias at 32 px (same skew)
    python benchmarks/colored_digits_sd.py vae       # AutoencoderKL: 32x32x3 <-> 8x8x4 latents
    python benchmarks/colored_digits_sd.py clip      # CLIPModel (vision + text) trained contrastively
    python benchmarks/colored_digits_sd.py assemble  # OUT/init: the SD folder (trained VAE, CLIP's text
                                                     # tower as text encoder, a random UNet)
    python benchmarks/colored_digits_sd.py judges    # the benchmark's judges at 32 px (hue, digit CNN)
    python benchmarks/colored_digits_sd.py unet      # the UNet pretrained on cached latents by the
                                                     # product's own trainer: `fairtune fit --config
                                                     # configs/base/pretrain_colored_digits_sd.yaml`
    python benchmarks/colored_digits_sd.py measure   # the base model through diffusers alone, judged by
                                                     # the hue judge and the CLIP: benchmarks/results/
                                                     # colored_digits_sd_base.{json,md}
    python benchmarks/colored_digits_sd.py all       # the seven in order, each skipped when done
    python benchmarks/colored_digits_sd.py levers    # the three levers by `fairtune fit` (lever 3's
                                                     # classifier a CLIP probe), judged as the pair is
    python benchmarks/colored_digits_sd.py fd_parity # Fair Diffusion on it: fairtune's against
                                                     # diffusers' SemanticStableDiffusionPipeline
    python benchmarks/colored_digits_sd.py ship      # copy the model and the CLIP into
                                                     # colored_digits/checkpoints/ (shipped names
                                                     # colored-digits-sd32, colored-digits-sd32-clip)

The UNet is pretrained as a user pretrains on SD (``unet`` runs that command; its ``model/`` folder is
the biased base model; ``StableDiffusionPipeline.from_pretrained`` loads it with no fairtune code, and
``measure`` generates through exactly that).

The CLIP (``OUT/clip``, the hub layout ``CLIPModel`` loads) is the judge that "really sees": its text
tower is the SD model's text encoder, as in SD. Captions name the ink and the digit ("a red
handwritten digit 3") for most images and only the digit for the rest, so the text tower also
encodes the neutral prompts the model is asked for. Every write goes to a temporary folder first, so
a killed step leaves nothing half-written and runs again from the start (the UNet's training resumes
from its last checkpoint).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.optimization import get_cosine_schedule_with_warmup

from _common import cell, interval_cell, spec_steps, write_results

ROOT = Path(__file__).resolve().parent.parent
CAPTIONS = ("a {color} handwritten digit {digit}", "a handwritten digit {digit} in {color} ink")
NEUTRAL = "a handwritten digit {digit}"
# The zero-shot ink judge's prompts: each ink's text embedding is the mean over the ten digits' captions
# (prompt ensembling). Its captions always name a digit: "a red handwritten digit" alone lies outside
# them, and judged held-out renders' ink right 0.312 of the time.
INK_PROMPTS = [f"a {{label}} handwritten digit {d}" for d in range(10)]


@dataclass
class Options:
    """How ColoredDigits-SD's frozen parts are trained.

    Attributes:
        data: ColoredDigits-Bias rendered at 32 px (``data`` renders it).
        out: Output folder: ``vae/``, ``clip/``, ``init/`` (the SD folder to pretrain), ``build.json``.
        vae_steps: AutoencoderKL optimizer steps.
        vae_batch_size: Images per AutoencoderKL step.
        clip_steps: CLIP optimizer steps.
        batch_size: Images per CLIP step.
        lr: AdamW learning rate (both; cosine decay).
        kl_weight: Weight of the VAE's KL term (small: a near-deterministic autoencoder, as SD's).
        neutral_share: Share of CLIP captions naming only the digit.
        width: Width of the CLIP towers (the SD UNet's cross-attention width).
        seed: Seed of the initialisation and the batches.
        threads: torch CPU threads.
        device: ``auto``: a GPU where there is one.
        unet_steps: The UNet's pretraining steps (``None``: the config's).
        n_per_prompt: ``measure``: images per prompt.
        sampling_steps: ``measure``: DDIM steps.
        guidance_scale: ``measure``: classifier-free guidance.
        correction_boot: ``measure``: bootstrap replicates of each corrected CLIP interval.
        n_calibration: ``measure``: at most this many real held-out renders calibrate the CLIP
            (``None``: all).
        results: ``measure``/``pair``: where ``colored_digits_sd_{base,pair}.{json,md}`` go.
        pair_spec: ``pair``: the sweep spec of the class adapters (one arm per ink); its ``name`` names
            the results files.
        pair_out: ``pair``: the sweep's folder (its training runs and the comparisons).
        pair_seeds: ``pair``: the spec's seeds to train and judge (``None``: all).
        pair_n_per_prompt: ``pair``: images per prompt and method.
        pair_calibration_n: ``pair``: images per neutral prompt and adapter that calibrate the pair's
            draw (:func:`calibrated_pair`); ``0``: no calibrated pair.
        levers_spec: ``levers``: the sweep spec of the lever arms (one adapter each).
        levers_out: ``levers``: the sweep's folder.
    """

    data: Path = ROOT / "runs" / "data" / "colored-digits-32"
    out: Path = ROOT / "runs" / "colored-digits-sd32"
    vae_steps: int = 2000
    vae_batch_size: int = 32
    clip_steps: int = 3000
    batch_size: int = 128
    lr: float = 1e-3
    kl_weight: float = 1e-6
    neutral_share: float = 0.2
    width: int = 64
    seed: int = 0
    threads: int = 2
    device: Literal["auto", "cpu", "cuda"] = "auto"
    unet_steps: int | None = None
    n_per_prompt: int = 64
    sampling_steps: int = 20
    guidance_scale: float = 2.0
    correction_boot: int = 1000
    n_calibration: int | None = None
    results: Path = ROOT / "benchmarks" / "results"
    pair_spec: Path = ROOT / "benchmarks" / "specs" / "colored_digits_sd_pair.yaml"
    pair_out: Path = ROOT / "runs" / "colored-digits-sd32-pair"
    pair_seeds: list[int] | None = None
    pair_n_per_prompt: int = 128
    pair_calibration_n: int = 64
    levers_spec: Path = ROOT / "benchmarks" / "specs" / "colored_digits_sd_levers.yaml"
    levers_out: Path = ROOT / "runs" / "colored-digits-sd32-levers"


def _device(opt: Options) -> torch.device:
    return torch.device("cuda" if opt.device == "auto" and torch.cuda.is_available() else opt.device.replace(
        "auto", "cpu"))  # fmt: skip


def load_split(data: Path, split: str = "train") -> tuple[torch.Tensor, list[int], list[str]]:
    """Images in [-1, 1] ``(N, 3, 32, 32)``, digits and inks of one split of the rendered table."""
    import datasets

    table = datasets.load_from_disk(str(data / "table"))
    if split not in table:
        raise ValueError(f"{data / 'table'}: no split {split!r}; splits: {list(table)}")
    rows = table[split]
    x = torch.from_numpy(np.stack([np.asarray(im.convert("RGB"), np.float32) for im in rows["image"]]))
    return x.permute(0, 3, 1, 2) / 127.5 - 1.0, list(rows["digit"]), list(rows["color"])


def build_vae():
    """The AutoencoderKL: three encoder blocks (32 -> 16 -> 8), 4 latent channels, as SD's but small
    (16/32/64 channels: on 2 CPU cores a step costs a third of 32/64/64's)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )


def _save_atomic(folder: Path, save) -> None:
    """``save(tmp)`` into a temporary folder put in place at the end (a kill leaves no half)."""
    from fairtune.data import atomic_dir

    with atomic_dir(folder) as tmp:
        save(tmp)


def train_vae(images: torch.Tensor, opt: Options, *, log=print) -> tuple[object, dict]:
    """Train the autoencoder on ``images`` (in [-1, 1]); sets ``scaling_factor`` to 1 / the latents'
    standard deviation (SD's convention: unit-variance latents for the UNet). Returns the model and
    its figures (reconstruction MSE on the last batches, the factor)."""
    dev = _device(opt)
    torch.manual_seed(opt.seed)
    vae = build_vae().to(dev)
    optim = torch.optim.AdamW(vae.parameters(), lr=opt.lr, weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(optim, num_warmup_steps=0, num_training_steps=opt.vae_steps)
    g = torch.Generator().manual_seed(opt.seed)
    recent: list[float] = []
    for step in range(opt.vae_steps):
        x = images[torch.randint(len(images), (opt.vae_batch_size,), generator=g)].to(dev)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        mse = F.mse_loss(rec, x)
        loss = mse + opt.kl_weight * post.kl().mean()
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        sched.step()
        recent = (recent + [mse.item()])[-20:]
        if step % 250 == 0 or step == opt.vae_steps - 1:
            log(f"[vae] step {step}/{opt.vae_steps}: reconstruction MSE {np.mean(recent):.4f}")
    vae.eval()
    with torch.no_grad():
        sample = images[:2048]  # the latents' spread on (up to) 2048 training images
        z = torch.cat([vae.encode(x.to(dev)).latent_dist.mean for x in sample.split(256)])
    factor = float(1.0 / z.std())
    vae.register_to_config(scaling_factor=factor)
    return vae.cpu(), {"reconstruction_mse": float(np.mean(recent)), "scaling_factor": factor}


def captions_for(digits: list[int], colors: list[str], *, neutral_share: float, rng: np.random.Generator):
    """One caption per image: the ink and the digit in one of :data:`CAPTIONS`, or (``neutral_share``
    of them) only the digit."""
    out = []
    for d, c in zip(digits, colors):
        if rng.random() < neutral_share:
            out.append(NEUTRAL.format(digit=d))
        else:
            out.append(CAPTIONS[int(rng.integers(len(CAPTIONS)))].format(color=c, digit=d))
    return out


def train_clip(images: torch.Tensor, digits, colors, opt: Options, folder: Path, *, log=print) -> dict:
    """Train a CLIP (both towers) contrastively on the images and their captions, starting from
    :func:`fairtune.models.make_tiny_clip`'s layout at width ``opt.width``; saved in place to
    ``folder``. Returns its figures: the loss, and the zero-shot ink and digit accuracy on the last
    training batches."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    from fairtune.models import make_tiny_clip

    dev = _device(opt)
    make_tiny_clip(folder, seed=opt.seed, image_size=32, patch_size=4, hidden_size=opt.width,
                   projection_dim=opt.width)  # fmt: skip
    model = CLIPModel.from_pretrained(folder).to(dev)
    tok = CLIPTokenizer.from_pretrained(folder)
    proc = CLIPImageProcessor.from_pretrained(folder)
    mean = torch.tensor(proc.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(proc.image_std).view(1, 3, 1, 1)
    pixels = ((images + 1) / 2 - mean) / std
    rng = np.random.default_rng(opt.seed)
    g = torch.Generator().manual_seed(opt.seed)
    optim = torch.optim.AdamW(model.parameters(), lr=opt.lr, weight_decay=0.1)
    sched = get_cosine_schedule_with_warmup(optim, num_warmup_steps=0, num_training_steps=opt.clip_steps)
    recent: list[float] = []
    for step in range(opt.clip_steps):
        idx = torch.randint(len(images), (opt.batch_size,), generator=g)
        caps = captions_for([digits[i] for i in idx], [colors[i] for i in idx],
                            neutral_share=opt.neutral_share, rng=rng)  # fmt: skip
        text = tok(caps, padding=True, return_tensors="pt").to(dev)
        out = model(**text, pixel_values=pixels[idx].to(dev), return_loss=True)
        optim.zero_grad(set_to_none=True)
        out.loss.backward()
        optim.step()
        sched.step()
        recent = (recent + [out.loss.item()])[-20:]
        if step % 250 == 0 or step == opt.clip_steps - 1:
            log(f"[clip] step {step}/{opt.clip_steps}: contrastive loss {np.mean(recent):.3f}")
    model.eval().cpu()
    model.save_pretrained(folder, safe_serialization=True)
    return {"contrastive_loss": float(np.mean(recent))}


def clip_zero_shot_figures(opt: Options, *, log=print) -> dict:
    """The CLIP's zero-shot accuracy on the real held-out renders: ink (:data:`INK_PROMPTS`) and digit."""
    held, hd, hc = load_split(opt.data, "heldout")
    inks = sorted(set(hc))
    pred = zero_shot(opt.out / "clip", held, inks, INK_PROMPTS)
    ink = float(np.mean([p >= 0 and inks[p] == c for p, c in zip(pred, hc)]))
    pred = zero_shot(opt.out / "clip", held, [str(d) for d in range(10)], "a handwritten digit {label}")
    digit = float(np.mean(pred == np.asarray(hd)))
    log(f"[clip] held-out zero-shot: ink {ink:.3f}, digit {digit:.3f}")
    return {"zero_shot_ink_accuracy_heldout": ink, "zero_shot_digit_accuracy_heldout": digit}


def zero_shot(folder: Path, images: torch.Tensor, classes: list[str], template) -> np.ndarray:
    """Each image's class by the CLIP in ``folder`` as a zero-shot judge (the product's
    :class:`fairtune.models.CLIPZeroShotClassifier`, the judge users run), ``template`` (one or a list) with
    ``{label}``; images in [-1, 1]."""
    from fairtune.models import CLIPZeroShotClassifier

    judge = CLIPZeroShotClassifier(str(folder), classes, template)
    return judge.predict((images + 1) / 2, batch_size=256).numpy()


def assemble(vae_folder: Path, clip_folder: Path, out: Path, *, seed: int = 0) -> Path:
    """The SD folder to pretrain: the trained VAE, CLIP's text tower as ``text_encoder`` with its
    tokenizer, a random ``UNet2DConditionModel`` on 8x8x4 latents attending to the text tower's width,
    SD 1.x's noise schedule; saved by ``StableDiffusionPipeline.save_pretrained``."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPModel, CLIPTextModel, CLIPTokenizer

    clip = CLIPModel.from_pretrained(clip_folder)
    text = CLIPTextModel(clip.config.text_config)
    getattr(text, "text_model", text).load_state_dict(clip.text_model.state_dict())  # transformers 4 wraps it
    width = clip.config.text_config.hidden_size
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(48, 96),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=width,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, steps_offset=1,
    )  # fmt: skip
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(vae_folder), text_encoder=text,
        tokenizer=CLIPTokenizer.from_pretrained(clip_folder), unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    _save_atomic(out, lambda tmp: pipe.save_pretrained(tmp, safe_serialization=True))
    return out


PRETRAIN_CONFIG = ROOT / "configs" / "base" / "pretrain_colored_digits_sd.yaml"
SHIPPED = ROOT / "colored_digits" / "checkpoints"


def pretrain_unet(opt: Options) -> Path:
    """The UNet pretrained on cached latents by ``fairtune fit`` (the command a user runs on SD), in
    ``OUT/pretrain``; started again, it resumes from its last checkpoint. Returns its ``model/``."""
    import subprocess

    cmd = [
        sys.executable, "-m", "fairtune.cli", "fit", "--config", str(PRETRAIN_CONFIG),
        "--model.backbone.pretrained", str(opt.out / "init"),
        "--data.source.path", str(opt.data / "table"),
        "--data.latents.dir", str(opt.out / "latents"),
        "--trainer.default_root_dir", str(opt.out / "pretrain"),
        "--trainer.enable_progress_bar", "false",
        *(["--trainer.max_steps", str(opt.unet_steps)] if opt.unet_steps is not None else []),
    ]  # fmt: skip
    subprocess.run(cmd, check=True, cwd=ROOT)
    return opt.out / "pretrain" / "model"


def generate_sd(
    model: Path, prompts: list[str], seeds: list[int], *, steps: int, guidance_scale: float,
    batch_size: int = 64, device: torch.device | str = "cpu",
) -> torch.Tensor:  # fmt: skip
    """Images ``(N, 3, H, W)`` in [0, 1] from diffusers' own ``StableDiffusionPipeline`` on ``model``
    (no fairtune code), DDIM, image i from ``seeds[i]`` alone."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    out = []
    for i in range(0, len(prompts), batch_size):
        gens = [torch.Generator().manual_seed(s) for s in seeds[i : i + batch_size]]
        res = pipe(prompts[i : i + batch_size], height=size, width=size, num_inference_steps=steps,
                   guidance_scale=guidance_scale, generator=gens, output_type="pt")  # fmt: skip
        out.append(res.images.float().cpu())
    return torch.cat(out)


def measure_base(opt: Options, *, log=print) -> dict:
    """The base model's figures: per prompt (each digit's neutral prompt and both inks' explicit ones,
    ``n_per_prompt`` images from seeds 0..n-1) the hue judge's red share (the ground truth), the digit
    CNN's fidelity, and the CLIP zero-shot judge's labels: its agreement with the hue judge, the
    confusion, and whether its shares corrected for its error on real held-out renders
    (:func:`fairtune.eval.corrected_shares`) cover the hue judge's share."""
    from fairtune.colored_digits import load_judges
    from fairtune.eval import corrected_shares, judge_agreement
    from fairtune.models import CLIPZeroShotClassifier

    dev = _device(opt)
    judges = load_judges(opt.out / "judges")
    inks = list(judges.colors)
    n = opt.n_per_prompt
    rows = [("neutral", d, None, NEUTRAL.format(digit=d)) for d in range(10)]
    rows += [("explicit", d, c, CAPTIONS[0].format(color=c, digit=d)) for c in inks for d in range(10)]
    t0 = time.perf_counter()
    images = generate_sd(opt.out / "pretrain" / "model", [r[3] for r in rows for _ in range(n)],
                         [i for _ in rows for i in range(n)], steps=opt.sampling_steps,
                         guidance_scale=opt.guidance_scale, device=dev)  # fmt: skip
    gen_s = time.perf_counter() - t0
    hue = judges.color(images).numpy()
    digit = judges.digit(images).numpy()
    clip_judge = CLIPZeroShotClassifier(str(opt.out / "clip"), inks, INK_PROMPTS).to(dev)
    clip = clip_judge.predict(images.to(dev), batch_size=256).numpy()
    real, _, real_inks = load_split(opt.data, "heldout")
    if opt.n_calibration is not None and opt.n_calibration < len(real):  # a seeded subset, every digit
        keep = np.random.default_rng(opt.seed).permutation(len(real))[: opt.n_calibration]
        real, real_inks = real[torch.from_numpy(keep)], [real_inks[i] for i in keep]
    cal_true = np.array([inks.index(c) for c in real_inks])
    cal_clip = clip_judge.predict(((real + 1) / 2).to(dev), batch_size=256).numpy()
    cal_hue = judges.color((real + 1) / 2).numpy()
    red = inks.index("red")
    per_prompt = []
    for p, (kind, d, ink, text) in enumerate(rows):
        sl = slice(p * n, (p + 1) * n)
        h, c = hue[sl], clip[sl]
        placed = h >= 0
        hue_red = float((h[placed] == red).mean()) if placed.any() else float("nan")
        corr = corrected_shares(c, cal_true, cal_clip, len(inks), n_boot=opt.correction_boot, seed=p)
        low, high = float(corr["low"][red]), float(corr["high"][red])
        per_prompt.append({
            "prompt": text, "kind": kind, "digit": d, "ink": ink,
            "hue_red": hue_red, "hue_undetermined": float((~placed).mean()),
            "clip_red": float((c == red).mean()), "corrected_red": float(corr["corrected"][red]),
            "corrected_low": low, "corrected_high": high,
            "covered": bool(low - 1e-9 <= hue_red <= high + 1e-9),  # at a bound: 0 within [0, 0] to rounding
            "fidelity": float((digit[sl] == d).mean()),
            "explicit_kept": None if ink is None else float((h == inks.index(ink)).mean()),
        })  # fmt: skip
    neutral = [r for r in per_prompt if r["kind"] == "neutral"]
    explicit = [r for r in per_prompt if r["kind"] == "explicit"]
    confusion = [[int(((hue == a) & (clip == b)).sum()) for b in [*range(len(inks)), -1]]
                 for a in [*range(len(inks)), -1]]  # fmt: skip
    return {
        "model": str((opt.out / "pretrain" / "model").relative_to(ROOT))
        if opt.out.is_relative_to(ROOT)
        else str(opt.out / "pretrain" / "model"),
        "settings": {
            "n_per_prompt": n,
            "sampling_steps": opt.sampling_steps,
            "guidance_scale": opt.guidance_scale,
            "scheduler": "DDIM",
            "seeds": f"0..{n - 1}",
        },
        "inks": inks,
        "skew": float(np.mean([abs(r["hue_red"] - 0.5) for r in neutral])),
        "red_share_neutral": {str(r["digit"]): r["hue_red"] for r in neutral},
        "fidelity_neutral": float(np.mean([r["fidelity"] for r in neutral])),
        "fidelity_explicit": float(np.mean([r["fidelity"] for r in explicit])),
        "explicit_kept": float(np.mean([r["explicit_kept"] for r in explicit])),
        "hue_undetermined": float((hue < 0).mean()),
        "clip_vs_hue": judge_agreement(hue, clip, len(inks)),
        "confusion_hue_rows_clip_cols": {"labels": [*inks, "undetermined"], "counts": confusion},
        "coverage": float(np.mean([r["covered"] for r in per_prompt])),
        "coverage_neutral": float(np.mean([r["covered"] for r in neutral])),
        "clip_accuracy_real_heldout": float((cal_clip == cal_true).mean()),
        "hue_accuracy_real_heldout": float((cal_hue == cal_true).mean()),
        "n_real_heldout": int(len(cal_true)),
        "generation_seconds": gen_s,
        "per_prompt": per_prompt,
    }


def base_markdown(r: dict, build: dict) -> str:
    """The base model's table (benchmarks/results/colored_digits_sd_base.md)."""
    s = r["settings"]
    a = r["clip_vs_hue"]
    lines = [
        "# ColoredDigits-SD: the base model (`python benchmarks/colored_digits_sd.py all`)",
        "",
        f"Generated by diffusers' own `StableDiffusionPipeline.from_pretrained` on the pretrained folder "
        f"(no fairtune code), DDIM {s['sampling_steps']} steps, guidance {s['guidance_scale']}, "
        f"{s['n_per_prompt']} images per prompt (seeds {s['seeds']}); the hue judge is the ground truth.",
        "",
        "| measure | value | goal |",
        "|---|---|---|",
        f"| skew: mean over digits of \\|red − 0.5\\| (neutral prompts) | {r['skew']:.3f} | ≥ 0.25 |",
        f"| fidelity (digit CNN), neutral prompts | {r['fidelity_neutral']:.3f} | ≥ 0.90 |",
        f"| fidelity, explicit prompts | {r['fidelity_explicit']:.3f} | |",
        f"| explicit kept ('a red …' judged red) | {r['explicit_kept']:.3f} | |",
        f"| CLIP zero-shot vs hue: agreement (kappa) | {a['agreement']:.3f} ({a['kappa']:.3f}) | ≥ 0.95 |",
        f"| corrected CLIP shares' 95% interval covers the hue share | {r['coverage']:.3f} of "
        f"{len(r['per_prompt'])} prompts ({r['coverage_neutral']:.3f} of neutral) | ≥ 0.90 |",
        f"| CLIP zero-shot accuracy on real held-out renders | {r['clip_accuracy_real_heldout']:.3f} | |",
        "",
        "Red share per digit (neutral prompt, hue judge): "
        + ", ".join(f"{d}: {v:.2f}" for d, v in r["red_share_neutral"].items()) + ".",
        "",
        "| prompt | hue red | CLIP red | corrected [95%] | covered | fidelity |",
        "|---|---|---|---|---|---|",
    ]  # fmt: skip
    for p in r["per_prompt"]:
        interval = f"{p['corrected_red']:.3f} [{p['corrected_low']:.3f}, {p['corrected_high']:.3f}]"
        covered = "yes" if p["covered"] else "no"
        lines.append(f"| {p['prompt']} | {p['hue_red']:.3f} | {p['clip_red']:.3f} | {interval} | {covered} "
                     f"| {p['fidelity']:.3f} |")  # fmt: skip
    conf = r["confusion_hue_rows_clip_cols"]
    labels = conf["labels"]
    lines += ["", "Confusion on the base's images (rows: hue judge, columns: CLIP zero-shot):", "",
              "| | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]  # fmt: skip
    lines += [f"| {lab} | " + " | ".join(map(str, row)) + " |" for lab, row in zip(labels, conf["counts"])]
    times = {k: build[k]["seconds"] for k in ("vae", "clip", "unet") if k in build and "seconds" in build[k]}
    if times:
        lines += ["", "Build time (`build.json`, this machine): "
                  + ", ".join(f"{k} {v / 60:.1f} min" for k, v in times.items()) + "."]  # fmt: skip
    return "\n".join(lines) + "\n"


def ship(opt: Options) -> None:
    """Copy the pretrained model (``colored-digits-sd32``) and the CLIP (``colored-digits-sd32-clip``)
    into colored_digits/checkpoints/, weights as safetensors only."""
    import shutil

    parts = ((opt.out / "pretrain" / "model", "colored-digits-sd32"),
             (opt.out / "clip", "colored-digits-sd32-clip"))  # fmt: skip
    for src, name in parts:
        if not src.is_dir():
            raise FileNotFoundError(f"{src} is missing: run the steps before `ship`")
        _save_atomic(SHIPPED / name, lambda tmp, src=src: shutil.copytree(src, tmp, dirs_exist_ok=True,
                     ignore=shutil.ignore_patterns("*.bin", "*.pt", "*.ckpt")))  # fmt: skip


PAIR_SPEC = Options.pair_spec  # the demo's pair
SD_COMPARE = ROOT / "configs" / "compare" / "colored_digits_sd.yaml"
# (summary key, column, decimals): the demo's columns, and the CLIP's agreement with the hue judge
PAIR_COLUMNS = [
    ("mean_dev_seen", "mean dev seen", 3), ("worst_dev_seen", "worst seen", 3),
    ("mean_dev_named", "named, no data", 3), ("mean_dev_heldout", "never named", 3),
    ("mean_dev_paraphrase", "paraphrase", 3), ("explicit_kept", "explicit kept", 3),
    ("fidelity", "fidelity", 3), ("frechet", "Fréchet", 1), ("undetermined_rate", "mixed", 4),
    ("agreement", "CLIP agrees", 3), ("sec_per_image", "s/img", 3),
    ("unet_evals_per_image", "UNet evals/img", 0),
]  # fmt: skip


def sd_compare_config(opt: Options, adapters: dict[str, Path] | None):
    """configs/compare/colored_digits_sd.yaml with this build's judges and reference data; the class
    adapters given (``None``: the comparison without the pair)."""
    from fairtune.cli import load_compare_config

    cfg = load_compare_config(
        SD_COMPARE,
        "--judges.options", json.dumps({"path": str(opt.out / "judges"), "color_judge": "hue"}),
        "--judges.reference", str(opt.data),
        "--generation.n_per_prompt", str(opt.pair_n_per_prompt),
    )  # fmt: skip
    if adapters is None:
        cfg.methods = [m for m in cfg.methods if m.kind != "class_adapters"]
    for m in cfg.methods:
        if m.kind == "class_adapters":
            m.class_adapters = {c: str(adapters[c]) for c in m.class_adapters}
    return cfg


def pair_scale() -> float:
    """The scale :data:`SD_COMPARE` fuses the pair's adapters at."""
    import yaml

    methods = yaml.safe_load(SD_COMPARE.read_text())["methods"]
    return next(float(m.get("adapter_scale", 1.0)) for m in methods if m["kind"] == "class_adapters")


def _summaries(metrics: dict) -> dict[str, dict]:
    """Per method, the comparison's summary without its per-concept rows (what the results files keep)."""
    methods = metrics["methods"].items()
    return {name: {k: v for k, v in m["summary"].items() if k != "per_concept"} for name, m in methods}


def _train_seconds(run: Path) -> float | None:
    """A sweep run's training seconds, from its status."""
    from fairtune.cli import read_status

    return (read_status(run).get("metrics") or {}).get("train_seconds")


def _results_head(spec, spec_path: Path, opt: Options) -> dict:
    """What every trained arm's results file starts with: the spec, its budget and the comparison."""
    return {
        "name": spec.name,
        "steps": spec_steps(spec),
        "spec": str(Path(spec_path).resolve().relative_to(ROOT)),
        "compare": str(SD_COMPARE.relative_to(ROOT)),
        "n_per_prompt": opt.pair_n_per_prompt,
    }


CALIBRATION_SEED = 1_000_000
"""The calibration's first image seed: far from the comparison's (0 to N − 1), so the draw is never
fitted to the images that score it."""


def calibrated_pair(cfg, opt: Options, cache: Path):
    """The pair with its draw calibrated per concept, as ``fairtune dial --class_adapters --request``
    does it: each adapter alone on every neutral prompt (seen, named, held-out digits;
    ``opt.pair_calibration_n`` images from :data:`CALIBRATION_SEED` on), judged by the shipped CLIP
    zero-shot (the comparison's *second* judge, never the hue judge that scores the comparison), and per
    concept the share of images each adapter draws so that the CLIP-judged mix is the target's
    (:func:`fairtune.eval.mixes_for`). A concept the calibration did not see (none here) keeps the
    target's draw.

    Returns:
        The comparison's ``class_pair`` method as ``class_pair_calibrated`` with that ``mix``, and the
        calibration (per concept: the endpoints and the solved draw).
    """
    import copy
    import dataclasses

    from fairtune.eval import JudgeConfig, mix_endpoints, mixes_for
    from fairtune.models import Backbone

    pair = next(m for m in cfg.methods if m.kind == "class_adapters")
    clip = cfg.judges.second
    classes = list(clip.prompts)
    judges = JudgeConfig(kind="clip", attribute=cfg.target.attributes[0], classes=classes, clip=clip)
    gen = dataclasses.replace(
        cfg.generation, n_per_prompt=opt.pair_calibration_n, seed=CALIBRATION_SEED, batch_size=None
    )
    neutral = [g for g in cfg.prompts if g.role in ("seen", "named", "heldout")]
    backbone = Backbone.from_config(copy.deepcopy(cfg.backbone))
    ends = mix_endpoints(
        class_adapters=pair.class_adapters, prompts=neutral, out=cache, backbone=backbone, judges=judges,
        generation=gen, adapter_scale=pair.adapter_scale, progress=False,
    )  # fmt: skip
    props = cfg.target.proportions  # the comparison's target, for every concept
    uniform = dict.fromkeys(ends["classes"], 1 / len(ends["classes"]))
    mixes = mixes_for(ends, {"*": uniform if props == "uniform" else dict(props)})
    method = dataclasses.replace(
        pair, name="class_pair_calibrated", mix={c: r["mix"] for c, r in mixes.items()}
    )
    calibration = {
        "judge": "CLIP zero-shot (the comparison's second judge)",
        "n_per_prompt": opt.pair_calibration_n,
        "seeds": f"{CALIBRATION_SEED}..{CALIBRATION_SEED + opt.pair_calibration_n - 1}",
        "concepts": {c: {"endpoints": ends["concepts"][c]["share"], **r} for c, r in mixes.items()},
    }
    return method, calibration


def pair(opt: Options, *, log=print) -> dict:
    """The demo's class adapters on ColoredDigits-SD (:data:`PAIR_SPEC`, trained by the sweep runner
    into ``opt.pair_out``: a finished run is skipped, a cut-off one resumes), each seed's pair judged by
    :func:`sd_compare_config` (the base model and the inference-time baselines once: they do not depend
    on the training seed). Returns the results payload."""
    import dataclasses

    from fairtune.cli import load_spec, read_status, run_sweep
    from fairtune.data import atomic_write_json
    from fairtune.eval import compare_methods, seed_summary

    spec = load_spec(opt.pair_spec)
    runs = [r for r in spec.runs if r.train and (opt.pair_seeds is None or r.seed in opt.pair_seeds)]
    run_sweep(dataclasses.replace(spec, runs=runs), opt.pair_out, workers=1, aggregate=False)
    methods: dict[str, dict] = {}
    per_seed: dict[int, dict] = {}
    per_seed_cal: dict[int, dict] = {}
    for seed in sorted({r.seed for r in runs}):
        dirs = {r.arm: opt.pair_out / "runs" / r.hash for r in runs if r.seed == seed}
        if any(read_status(d).get("state") != "done" for d in dirs.values()):
            log(f"[pair] seed {seed}: not every adapter trained; skipped")
            continue
        # keyed by the runs, the images per prompt and the scale (another pair or budget is judged
        # again; judges rebuilt in place are not seen: delete the folder); the base model's and the
        # baselines' images are cached per seed (by what generates them), shared by every spec (a
        # pair's images too, under one name: judging another spec's pair regenerates this one's)
        key = "-".join(sorted(d.name for d in dirs.values())) + f"-n{opt.pair_n_per_prompt}-x{pair_scale():g}"
        key += f"-cal{opt.pair_calibration_n}" if opt.pair_calibration_n else ""
        cache = opt.pair_out / "compare" / f"{key}.json"
        if not cache.is_file():
            cfg = sd_compare_config(opt, {a: d / "adapter" for a, d in dirs.items()})
            calibration = None
            if opt.pair_calibration_n:
                method, calibration = calibrated_pair(cfg, opt, opt.pair_out / "compare" / f"calibrate-{key}")
                cfg.methods.insert(2, method)
            if seed != min(r.seed for r in runs):
                cfg.methods = [m for m in cfg.methods if m.kind == "class_adapters"]
            metrics, _ = compare_methods(
                cfg, cache_dir=opt.pair_out / "compare" / f"seed{seed}", progress=False
            )
            row = _summaries(metrics)
            train_s = sum(_train_seconds(d) or float("nan") for d in dirs.values())
            atomic_write_json(
                cache, {"methods": row, "train_seconds": train_s, "calibration": calibration}, indent=2
            )
        got = json.loads(cache.read_text())
        per_seed[seed] = {**got["methods"]["class_pair"], "train_seconds": got["train_seconds"]}
        if "class_pair_calibrated" in got["methods"]:
            per_seed_cal[seed] = {
                **got["methods"]["class_pair_calibrated"],
                "calibration": got["calibration"],
            }
        methods.update({k: v for k, v in got["methods"].items() if not k.startswith("class_pair")})
    keys = [k for k, _, _ in PAIR_COLUMNS] + ["train_seconds"]
    summary = {k: seed_summary([row.get(k) for row in per_seed.values()]) for k in keys}
    out = {
        **_results_head(spec, opt.pair_spec, opt),
        "adapter_scale": pair_scale(),
        "seeds": sorted(per_seed),
        "class_pair": summary,
        "per_seed": {str(k): v for k, v in per_seed.items()},
        "methods": methods,
    }
    if per_seed_cal:
        out["class_pair_calibrated"] = {
            k: seed_summary([row.get(k) for row in per_seed_cal.values()])
            for k in keys
            if k != "train_seconds"
        }
        out["per_seed_calibrated"] = {str(k): v for k, v in per_seed_cal.items()}
    return out


def pair_markdown(r: dict) -> str:
    """The pair's table (benchmarks/results/<spec name>.md)."""
    head = "| method | seeds | " + " | ".join(c for _, c, _ in PAIR_COLUMNS) + " |"
    demos = r["spec"] == str(PAIR_SPEC.relative_to(ROOT))
    lines = [
        f"# ColoredDigits-SD: {'the demo' if demos else r['spec']}'s class adapters against the "
        "inference-time baselines (`python benchmarks/colored_digits_sd.py pair"
        + ("" if demos else f" --opt.pair_spec {r['spec']}")
        + "`)",
        "",
        f"Spec `{r['spec']}` ({r.get('steps')} steps per adapter), judged by `{r['compare']}`: "
        f"N = {r['n_per_prompt']} per prompt, 15 DDIM steps, guidance 2, the pair fused at "
        f"{r.get('adapter_scale')}, the hue judge at 32 px; CLIP agrees = the CLIP zero-shot "
        "judge's agreement with the hue judge on the images both place. class_pair: mean over training "
        "seeds [95% t-interval]; the other methods do not depend on the training seed.",
        "",
        head,
        "|---" * (len(PAIR_COLUMNS) + 2) + "|",
    ]

    cells = [interval_cell(r["class_pair"].get(k), d) for k, _, d in PAIR_COLUMNS]
    rows = {name: f"| {name} | | " + " | ".join(cell(m.get(k), d) for k, _, d in PAIR_COLUMNS) + " |"
            for name, m in r["methods"].items()}  # fmt: skip
    pair_row = f"| class_pair | {len(r['seeds'])} | " + " | ".join(cells) + " |"
    lines += [rows.pop("base")] if "base" in rows else []
    lines += [pair_row]
    cal = r.get("class_pair_calibrated")
    if cal:
        cells = [interval_cell(cal.get(k), d) for k, _, d in PAIR_COLUMNS]
        lines.append(
            f"| class_pair_calibrated | {len(r['per_seed_calibrated'])} | " + " | ".join(cells) + " |"
        )
    lines += [*rows.values()]
    header = "| seed | " + " | ".join(c for _, c, _ in PAIR_COLUMNS) + " | train s |"
    lines += ["", "class_pair per seed:", "", header, "|---" * (len(PAIR_COLUMNS) + 2) + "|"]
    for seed, row in r["per_seed"].items():
        lines.append(f"| {seed} | " + " | ".join(cell(row.get(k), d) for k, _, d in PAIR_COLUMNS)
                     + f" | {cell(row.get('train_seconds'), 0)} |")  # fmt: skip
    if cal:
        some = next(iter(r["per_seed_calibrated"].values()))["calibration"]
        lines += [
            "",
            "class_pair_calibrated: the same adapters, each image's adapter drawn per concept in the shares "
            f"that give the target's mix as the {some['judge']} judges each adapter alone "
            f"({some['n_per_prompt']} images per neutral prompt and adapter, seeds {some['seeds']}, never "
            "the comparison's): `fairtune dial --class_adapters --request` with that judge. Per seed:",
            "",
            "| seed | " + " | ".join(c for _, c, _ in PAIR_COLUMNS) + " | red adapter's draw, digits 0-9 |",
            "|---" * (len(PAIR_COLUMNS) + 2) + "|",
        ]
        for seed, row in r["per_seed_calibrated"].items():
            draws = ", ".join(f"{c['mix']['red']:.2f}" for c in row["calibration"]["concepts"].values())
            lines.append(f"| {seed} | " + " | ".join(cell(row.get(k), d) for k, _, d in PAIR_COLUMNS)
                         + f" | {draws} |")  # fmt: skip
    return "\n".join(lines) + "\n"


SHIPPED_CLIP = "colored-digits-sd32-clip"


LEVER3_RECIPE = ROOT / "configs" / "colored_digits_sd" / "fairness.yaml"


def color_probe(opt: Options, *, log=print) -> Path:
    """Lever 3's classifier on this model: a linear probe on the shipped CLIP's image embeddings of the
    labelled 32 px renders (``fairtune classifier clip-probe``), in the folder :data:`LEVER3_RECIPE`
    reads it from."""
    import yaml

    from fairtune.models import train_clip_probe

    recipe = yaml.safe_load(LEVER3_RECIPE.read_text())
    out = ROOT / recipe["model"]["fairness"]["classifier"]["init_args"]["probe"]
    if not (out / "probe.json").is_file():
        log(f"[levers] training the CLIP probe into {out}")
        train_clip_probe(
            opt.data / "table", out, clip=SHIPPED_CLIP, attribute="color", classes=["red", "blue"]
        )
    return out


def levers(opt: Options, *, log=print) -> dict:
    """The lever arms of :attr:`Options.levers_spec` trained by the sweep runner into
    ``opt.levers_out`` (a finished run is skipped), each adapter judged by :func:`sd_compare_config`
    beside the base model and the inference-time baselines (their images shared with ``pair``'s cache)."""
    from fairtune.cli import load_spec, read_status, run_sweep
    from fairtune.eval import MethodConfig, compare_methods, seed_summary

    color_probe(opt, log=log)
    spec = load_spec(opt.levers_spec)
    run_sweep(spec, opt.levers_out, workers=1, aggregate=False)
    cfg = sd_compare_config(opt, None)
    runs, seeds = {}, sorted({r.seed for r in spec.runs})
    for r in spec.runs:
        run = opt.levers_out / "runs" / r.hash
        if read_status(run).get("state") != "done":
            log(f"[levers] {r.arm} seed {r.seed}: not trained; skipped")
            continue
        name = r.arm if len(seeds) == 1 else f"{r.arm}_s{r.seed}"
        cfg.methods.append(MethodConfig(name=name, kind="adapter", adapter=str(run / "adapter")))
        runs[name] = run
    metrics, _ = compare_methods(cfg, cache_dir=opt.pair_out / "compare" / "seed0", progress=False)
    methods = {
        name: {**row, "train_seconds": _train_seconds(runs[name]) if name in runs else None}
        for name, row in _summaries(metrics).items()
    }
    # over training seeds: each arm's mean and 95% t-interval (the per-seed rows stay in methods)
    keys = [k for k, _, _ in PAIR_COLUMNS] + ["train_seconds"]
    arms = {}
    if len(seeds) > 1:
        for arm in dict.fromkeys(r.arm for r in spec.runs):
            rows = [methods[f"{arm}_s{s}"] for s in seeds if f"{arm}_s{s}" in methods]
            arms[arm] = {"seeds": len(rows), **{k: seed_summary([m.get(k) for m in rows]) for k in keys}}
    return {
        **_results_head(spec, opt.levers_spec, opt),
        "seeds": seeds,
        "methods": methods,
        **({"arms": arms} if arms else {}),
    }


def levers_markdown(r: dict) -> str:
    """The levers' table (benchmarks/results/<spec name>.md)."""
    cols = [*PAIR_COLUMNS, ("train_seconds", "train s", 0)]
    arms = r.get("arms") or {}
    lines = [
        "# ColoredDigits-SD: the three levers as `fairtune fit` trains them "
        "(`python benchmarks/colored_digits_sd.py levers`)",
        "",
        f"Spec `{r['spec']}` ({r['steps']} steps per adapter, training seeds "
        f"{', '.join(map(str, r['seeds']))}"
        + (
            ": each lever's mean over the seeds [95% t-interval], then every run"
            if arms
            else ": one run per seed, a direction rather than an interval"
        )
        + f"), judged by `{r['compare']}`: N = {r['n_per_prompt']} per prompt, the hue judge at 32 px; "
        "target uniform. The base model and the baselines do not depend on the training seed.",
        "",
        "| method | " + ("seeds | " if arms else "") + " | ".join(c for _, c, _ in cols) + " |",
        "|---|" + "---|" * (len(cols) + (1 if arms else 0)),
    ]
    if arms:
        trained = {f"{a}_s{seed}" for a in arms for seed in r["seeds"]}
        fixed = {n: m for n, m in r["methods"].items() if n not in trained}
        for name, m in fixed.items():
            lines.append(f"| {name} | | " + " | ".join(cell(m.get(k), d) for k, _, d in cols) + " |")
        for arm, a in arms.items():
            lines.append(
                f"| {arm} | {a['seeds']} | "
                + " | ".join(interval_cell(a.get(k), d) for k, _, d in cols)
                + " |"
            )
        lines += ["", "Every run:", "", "| run | " + " | ".join(c for _, c, _ in cols) + " |",
                  "|---|" + "---|" * len(cols)]  # fmt: skip
        runs = {n: m for n, m in r["methods"].items() if n not in fixed}
    else:
        runs = r["methods"]
    for name, m in runs.items():
        lines.append(f"| {name} | " + " | ".join(cell(m.get(k), d) for k, _, d in cols) + " |")
    return "\n".join(lines) + "\n"


def fd_parity(opt: Options, *, n_per_prompt: int = 16, prompts: list[str] | None = None, log=print) -> dict:
    """Fair Diffusion on the shipped model, fairtune's against diffusers': the comparison's
    ``fair_diffusion`` method (configs/compare/colored_digits_sd.yaml: its SEGA settings, DDIM steps,
    guidance and seeds) generated by :func:`fairtune.models.fair_diffusion_sample`, the function
    ``fairtune compare`` calls, and by diffusers' own ``SemanticStableDiffusionPipeline`` over the same
    components, each image pushed toward the ink drawn for it and away from the other. Returns the
    largest pixel difference and how often the hue judge gives both the same ink."""
    import logging

    from diffusers import DDIMScheduler, SemanticStableDiffusionPipeline

    from fairtune.colored_digits import load_judges
    from fairtune.eval import prompt_entries
    from fairtune.models import Backbone, fair_diffusion_sample

    cfg = sd_compare_config(opt, None)
    (fd,) = [m for m in cfg.methods if m.kind == "fair_diffusion"]
    gen = cfg.generation
    bb = Backbone.from_config(cfg.backbone)
    texts = prompts or list(dict.fromkeys(e.prompt for e in prompt_entries(cfg.prompts)))
    ps = [t for t in texts for _ in range(n_per_prompt)]
    seeds = [gen.seed + i for _ in texts for i in range(n_per_prompt)]
    inks = list(fd.fair_diffusion.edit_prompts)
    t0 = time.perf_counter()
    ours, drawn = fair_diffusion_sample(
        bb, ps, seeds=seeds, config=fd.fair_diffusion, target=dict.fromkeys(inks, 1 / len(inks)),
        steps=gen.steps, guidance_scale=gen.guidance_scale,
    )  # fmt: skip
    ours_s = time.perf_counter() - t0
    logging.getLogger("diffusers").setLevel(logging.ERROR)  # the pipeline's deprecation notice
    pipe = SemanticStableDiffusionPipeline(
        vae=bb.vae, text_encoder=bb.text_encoder, tokenizer=bb.tokenizer, unet=bb.unet,
        scheduler=DDIMScheduler.from_config(bb.noise_scheduler.config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    sega = {k: v for k, v in vars(fd.fair_diffusion).items() if k.startswith("edit_") and k != "edit_prompts"}
    theirs = torch.empty_like(ours)
    t0 = time.perf_counter()
    for ink in inks:  # each image toward its drawn ink, away from the others
        idx = [i for i, c in enumerate(drawn) if c == ink]
        for b in range(0, len(idx), 64):
            sl = idx[b : b + 64]
            theirs[sl] = pipe(
                [ps[i] for i in sl], num_inference_steps=gen.steps, guidance_scale=gen.guidance_scale,
                latents=bb.initial_noise([seeds[i] for i in sl]), output_type="pt",
                editing_prompt=[fd.fair_diffusion.edit_prompts[k] for k in inks],
                reverse_editing_direction=[k != ink for k in inks], **sega,
            ).images.float().cpu()  # fmt: skip
    theirs_s = time.perf_counter() - t0
    judges = load_judges(opt.out / "judges")
    a, b = judges.color(ours).numpy(), judges.color(theirs).numpy()
    diff = (ours - theirs).abs()
    return {
        "compare": str(SD_COMPARE.relative_to(ROOT)),
        "model": str(cfg.backbone.pretrained),
        "settings": {
            "steps": gen.steps,
            "guidance_scale": gen.guidance_scale,
            **sega,
            "edit_prompts": dict(fd.fair_diffusion.edit_prompts),
        },  # fmt: skip
        "n_images": len(ps),
        "prompts": texts,
        "n_per_prompt": n_per_prompt,
        "max_abs_pixel_diff": float(diff.max()),
        "mean_abs_pixel_diff": float(diff.mean()),
        "same_hue_label": float((a == b).mean()),
        "drawn_share": {k: float(np.mean([c == k for c in drawn])) for k in inks},
        "fairtune_seconds": ours_s,
        "diffusers_seconds": theirs_s,
    }


def fd_parity_markdown(r: dict) -> str:
    """The parity check's table (benchmarks/results/colored_digits_sd_fd_parity.md)."""
    return "\n".join([
        "# ColoredDigits-SD: Fair Diffusion, fairtune's against diffusers' SemanticStableDiffusionPipeline "
        "(`python benchmarks/colored_digits_sd.py fd_parity`)",
        "",
        f"The `fair_diffusion` method of `{r['compare']}` on `{r['model']}`: {r['n_images']} images "
        f"({len(r['prompts'])} prompts x {r['n_per_prompt']} seeds, each toward the ink drawn for it), "
        f"{r['settings']['steps']} DDIM steps, guidance {r['settings']['guidance_scale']}; pixels in [0, 1].",
        "",
        "| images | max abs pixel diff | mean abs pixel diff | same hue label | fairtune s | diffusers s |",
        "|---|---|---|---|---|---|",
        f"| {r['n_images']} | {r['max_abs_pixel_diff']:.2e} | {r['mean_abs_pixel_diff']:.2e} | "
        f"{cell(r['same_hue_label'])} | {cell(r['fairtune_seconds'], 1)} | "
        f"{cell(r['diffusers_seconds'], 1)} |",
    ]) + "\n"  # fmt: skip


def _record(opt: Options, key: str, value: dict) -> None:
    from fairtune.data import atomic_write_json

    path = opt.out / "build.json"
    rec = json.loads(path.read_text()) if path.is_file() else {}
    rec[key] = value
    rec["options"] = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(opt).items()}
    atomic_write_json(path, rec, indent=2)


STEPS = ("data", "vae", "clip", "assemble", "judges", "unet", "measure")


def main(
    step: Literal[
        "data",
        "vae",
        "clip",
        "assemble",
        "judges",
        "unet",
        "measure",
        "all",
        "ship",
        "pair",
        "fd_parity",
        "levers",
    ],
    opt: Options | None = None,
) -> None:
    """Run one step (``all``: :data:`STEPS` in order); a step whose output exists is skipped
    (``measure`` always runs)."""
    opt = opt or Options()
    torch.set_num_threads(opt.threads)
    opt.out.mkdir(parents=True, exist_ok=True)
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    steps = list(STEPS) if step == "all" else [step]
    if "data" in steps and not (opt.data / "stats.json").is_file():
        from fairtune.colored_digits import ColoredDigitsConfig, build_colored_digits

        log(f"[data] rendering ColoredDigits-Bias at 32 px into {opt.data}")
        build_colored_digits(ColoredDigitsConfig(size=32), opt.data)
    if "vae" in steps and not (opt.out / "vae" / "config.json").is_file():
        t0 = time.perf_counter()
        images, _, _ = load_split(opt.data)
        vae, figures = train_vae(images, opt, log=log)
        _save_atomic(opt.out / "vae", lambda tmp: vae.save_pretrained(tmp, safe_serialization=True))
        _record(opt, "vae", {**figures, "seconds": time.perf_counter() - t0, "images": len(images)})
    if "clip" in steps and not (opt.out / "clip" / "config.json").is_file():
        t0 = time.perf_counter()
        images, digits, colors = load_split(opt.data)
        figures = {}
        _save_atomic(opt.out / "clip", lambda tmp: figures.update(train_clip(images, digits, colors, opt, tmp,
                                                                            log=log)))  # fmt: skip
        figures.update(clip_zero_shot_figures(opt, log=log))
        _record(opt, "clip", {**figures, "seconds": time.perf_counter() - t0})
    if "assemble" in steps and not (opt.out / "init" / "model_index.json").is_file():
        assemble(opt.out / "vae", opt.out / "clip", opt.out / "init", seed=opt.seed)
        log(f"[assemble] {opt.out / 'init'}: pretrain it with configs/base/pretrain_colored_digits_sd.yaml")
    if "judges" in steps and not (opt.out / "judges" / "judges.json").is_file():
        from fairtune.colored_digits import train_judges

        log(f"[judges] training the judges at 32 px into {opt.out / 'judges'}")
        train_judges(opt.data, opt.out / "judges")
    if "unet" in steps and not (opt.out / "pretrain" / "model" / "model_index.json").is_file():
        t0 = time.perf_counter()
        pretrain_unet(opt)
        _record(opt, "unet", {"seconds": time.perf_counter() - t0, "steps": opt.unet_steps or "config"})
    if "measure" in steps:
        r = measure_base(opt, log=log)
        build = json.loads((opt.out / "build.json").read_text()) if (opt.out / "build.json").is_file() else {}
        r["build"] = {k: v for k, v in build.items() if k != "options"}
        write_results("colored_digits_sd_base", r, base_markdown(r, build), opt.results)
    if step == "ship":
        ship(opt)
    if step == "pair":
        r = pair(opt, log=log)
        write_results(r["name"], r, pair_markdown(r), opt.results)
    if step == "levers":
        r = levers(opt, log=log)
        write_results(r["name"], r, levers_markdown(r), opt.results)
    if step == "fd_parity":
        r = fd_parity(opt, log=log)
        write_results("colored_digits_sd_fd_parity", r, fd_parity_markdown(r), opt.results)


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main, as_positional=True)
