"""ColoredDigits-SD (issue 25), first part: a latent diffusion model's frozen parts, trained on the
benchmark's own images and saved in Stable Diffusion's layout.

    python benchmarks/colored_digits_sd.py data      # render ColoredDigits-Bias at 32 px (same skew)
    python benchmarks/colored_digits_sd.py vae       # AutoencoderKL: 32x32x3 <-> 8x8x4 latents
    python benchmarks/colored_digits_sd.py clip      # CLIPModel (vision + text) trained contrastively
    python benchmarks/colored_digits_sd.py assemble  # OUT/init: the SD folder (trained VAE, CLIP's text
                                                     # tower as text encoder, a random UNet)
    python benchmarks/colored_digits_sd.py all       # the four in order, each skipped when done

Then the UNet is pretrained on latents by the product's own trainer, as a user pretrains on SD:
``fairtune fit --config configs/base/pretrain_colored_digits_sd.yaml`` (its ``model/`` folder is the
biased base model; ``StableDiffusionPipeline.from_pretrained`` loads it with no fairtune code).

The CLIP (``OUT/clip``, the hub layout ``CLIPModel`` loads) is the judge that "really sees": its text
tower is the SD model's text encoder, as in SD. Captions name the ink and the digit ("a red
handwritten digit 3") for most images and only the digit for the rest, so the text tower also
encodes the neutral prompts the model is asked for. Every write goes to a temporary folder first, so
a killed step leaves nothing half-written and runs again from the start.
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

ROOT = Path(__file__).resolve().parent.parent
CAPTIONS = ("a {color} handwritten digit {digit}", "a handwritten digit {digit} in {color} ink")
NEUTRAL = "a handwritten digit {digit}"


@dataclass
class Options:
    """How ColoredDigits-SD's frozen parts are trained.

    Attributes:
        data: ColoredDigits-Bias rendered at 32 px (``data`` renders it).
        out: Output folder: ``vae/``, ``clip/``, ``init/`` (the SD folder to pretrain), ``build.json``.
        vae_steps: AutoencoderKL optimizer steps.
        clip_steps: CLIP optimizer steps.
        batch_size: Images per step (both).
        lr: AdamW learning rate (both; cosine decay).
        kl_weight: Weight of the VAE's KL term (small: a near-deterministic autoencoder, as SD's).
        neutral_share: Share of CLIP captions naming only the digit.
        width: Width of the CLIP towers (the SD UNet's cross-attention width).
        seed: Seed of the initialisation and the batches.
        threads: torch CPU threads.
        device: ``auto``: a GPU where there is one.
    """

    data: Path = ROOT / "runs" / "data" / "colored-digits-32"
    out: Path = ROOT / "runs" / "colored-digits-sd32"
    vae_steps: int = 3000
    clip_steps: int = 3000
    batch_size: int = 128
    lr: float = 1e-3
    kl_weight: float = 1e-6
    neutral_share: float = 0.2
    width: int = 64
    seed: int = 0
    threads: int = 2
    device: Literal["auto", "cpu", "cuda"] = "auto"


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
    """The AutoencoderKL: three encoder blocks (32 -> 16 -> 8), 4 latent channels, as SD's but small."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
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
        x = images[torch.randint(len(images), (opt.batch_size,), generator=g)].to(dev)
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
        z = torch.cat([vae.encode(images[i : i + 256].to(dev)).latent_dist.mean for i in range(0, 2048, 256)])
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


def zero_shot(folder: Path, images: torch.Tensor, classes: list[str], template: str) -> np.ndarray:
    """Each image's class by the CLIP in ``folder`` as a zero-shot judge (the product's
    :class:`fairtune.models.CLIPZeroShotClassifier`, the judge users run), ``template`` with
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


def _record(opt: Options, key: str, value: dict) -> None:
    from fairtune.data import atomic_write_json

    path = opt.out / "build.json"
    rec = json.loads(path.read_text()) if path.is_file() else {}
    rec[key] = value
    rec["options"] = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(opt).items()}
    atomic_write_json(path, rec, indent=2)


def main(step: Literal["data", "vae", "clip", "assemble", "all"], opt: Options | None = None) -> None:
    """Run one step (or ``all`` in order); a step whose output exists is skipped."""
    opt = opt or Options()
    torch.set_num_threads(opt.threads)
    opt.out.mkdir(parents=True, exist_ok=True)
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    steps = ["data", "vae", "clip", "assemble"] if step == "all" else [step]
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
        held, hd, hc = load_split(opt.data, "heldout")
        inks = sorted(set(hc))
        pred = zero_shot(opt.out / "clip", held, inks, "a {label} handwritten digit")
        figures["zero_shot_ink_accuracy_heldout"] = float(
            np.mean([p >= 0 and inks[p] == c for p, c in zip(pred, hc)])
        )
        pred = zero_shot(opt.out / "clip", held, [str(d) for d in range(10)], "a handwritten digit {label}")
        figures["zero_shot_digit_accuracy_heldout"] = float(np.mean(pred == np.asarray(hd)))
        log(f"[clip] held-out zero-shot: ink {figures['zero_shot_ink_accuracy_heldout']:.3f}, "
            f"digit {figures['zero_shot_digit_accuracy_heldout']:.3f}")  # fmt: skip
        _record(opt, "clip", {**figures, "seconds": time.perf_counter() - t0})
    if "assemble" in steps and not (opt.out / "init" / "model_index.json").is_file():
        assemble(opt.out / "vae", opt.out / "clip", opt.out / "init", seed=opt.seed)
        log(f"[assemble] {opt.out / 'init'}: pretrain it with configs/base/pretrain_colored_digits_sd.yaml")


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main, as_positional=True)
