"""The Stable Diffusion training path at scale (issue 14), on a tiny Stable Diffusion built from config:

1. ``fairtune fit`` (naive arm: no lever) against a plain hand-written diffusers + peft LoRA loop on the
   same model, data, batch, LoRA and number of steps (goal: fit <= 1.10x the plain loop's step time);
2. ``fairtune fit`` from cached VAE latents (``data.latents``) against encoding every step (goal >= 2x);
3. the (concept, colour) mix the streaming sampler draws from webdataset shards (2 ranks x 2 workers)
   against the table sampler's, on ColoredDigits-Bias (goal: max deviation within sampling noise).

    python benchmarks/sd_path.py [--steps 40] [--batch-size 32] [--image-size 32] [--device cpu]
                                 [--precision 32-true] [--threads 2] [--name sd_path] [--out DIR]

Step times are the median of the wall time between consecutive training steps after ``--warmup`` steps
(data loading, forward, backward, optimizer: everything a step costs), with each ``fairtune fit`` in its
own process (the installed ``fairtune`` command). Writes ``<out>/<name>.{json,md}``
(default benchmarks/results/sd_path.{json,md}).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CONCEPTS = [f"digit {d}" for d in range(8)]

TIMER = '''
import json, time
import lightning as L


class StepTimer(L.Callback):
    """Appends the wall time of every training step (end of one step to the end of the next), and counts
    the VAE encoder's forward passes during training (written to OUT.encoder at the end)."""

    def __init__(self, out: str):
        self.out, self.last, self.encoder_calls = out, None, 0

    def _now(self, trainer):
        if trainer.strategy.root_device.type == "cuda":
            import torch

            torch.cuda.synchronize()
        return time.perf_counter(), time.process_time()

    def on_train_start(self, trainer, module):
        def count(*_):
            self.encoder_calls += 1

        module.backbone.vae.encoder.register_forward_hook(count)

    def on_train_end(self, trainer, module):
        if trainer.is_global_zero:
            with open(self.out + ".encoder", "w") as f:
                f.write(str(self.encoder_calls))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        now = self._now(trainer)
        if self.last is not None and trainer.is_global_zero:
            with open(self.out, "a") as f:
                f.write(json.dumps([now[0] - self.last[0], now[1] - self.last[1]]) + "\\n")
        self.last = now
'''


def fairtune_command() -> list[str]:
    exe = Path(sys.executable).with_name("fairtune")
    return [str(exe)] if exe.exists() else [shutil.which("fairtune") or "fairtune"]


def fit_step_times(
    args, work: Path, sd: Path, data: Path, name: str, backbone_over: dict | None = None, **data_over
) -> dict:
    """Run ``fairtune fit`` (naive arm) and return its step times and wall time."""
    times = work / f"{name}.steps"
    times.unlink(missing_ok=True)
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "gpu" if args.device == "cuda" else "cpu",
            "devices": 1,
            "precision": args.precision,
            "max_steps": args.steps,
            "default_root_dir": str(work / name),
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "log_every_n_steps": 10,
            "callbacks": [{"class_path": "sd_path_timer.StepTimer", "init_args": {"out": str(times)}}],
        },
        "model": {
            "backbone": {"kind": "sd", "pretrained": str(sd), **(backbone_over or {})},
            "lora": {"rank": args.rank, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]},
            "optim": {"lr": 1e-4, "warmup_steps": 0, "schedule": "constant"},
        },
        "data": {
            "source": {"path": str(data / "table")},
            "attributes": {"color": ["red", "blue"]},
            "concepts": CONCEPTS,
            "image_size": args.image_size,
            "batch_size": args.batch_size,
            "samples_per_epoch": args.batch_size * args.steps,  # one epoch: one checkpoint at the end
            "num_workers": args.workers,
            **data_over,
        },
        "export": {"dirpath": str(work / name / "adapter")},
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(work), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": str(args.threads),
    }
    t0 = time.perf_counter()
    res = subprocess.run(
        [*fairtune_command(), "fit", "--config", str(path)], env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        sys.exit(f"sd_path: fairtune fit ({name}) failed:\n{res.stderr[-3000:]}")
    steps = np.array([json.loads(x) for x in times.read_text().splitlines()])[args.warmup :]
    return {
        **step_stats(args, steps),
        "wall_s": wall,
        "vae_encoder_calls_in_training": int(Path(str(times) + ".encoder").read_text()),
    }


def step_stats(args, steps: np.ndarray) -> dict:
    """Medians of per-step wall and CPU seconds; ``step_s`` is the one compared: CPU seconds on the CPU
    (robust to other jobs sharing the machine), wall seconds (synchronised) on CUDA."""
    wall, cpu = float(np.median(steps[:, 0])), float(np.median(steps[:, 1]))
    return {
        "step_s": wall if args.device == "cuda" else cpu,
        "wall_step_s": wall,
        "cpu_step_s": cpu,
        "steps_timed": len(steps),
    }


def plain_loop_step_times(args, sd: Path, data: Path) -> dict:
    """A hand-written diffusers + peft LoRA loop: same model, data, batch, LoRA and steps."""
    import datasets
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    from PIL import Image
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    device = torch.device(args.device)
    unet = UNet2DConditionModel.from_pretrained(sd, subfolder="unet").to(device)
    vae = AutoencoderKL.from_pretrained(sd, subfolder="vae").to(device).requires_grad_(False)
    text = CLIPTextModel.from_pretrained(sd, subfolder="text_encoder").to(device).requires_grad_(False)
    tok = CLIPTokenizer.from_pretrained(sd, subfolder="tokenizer")
    sched = DDPMScheduler.from_pretrained(sd, subfolder="scheduler")
    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    )
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    table = datasets.load_from_disk(str(data / "table"))["train"]
    table = table.filter(lambda c: c in CONCEPTS, input_columns="concept")

    def transform(batch):
        imgs = [im.convert("RGB").resize((args.image_size,) * 2, Image.BICUBIC) for im in batch["image"]]
        px = torch.stack(
            [torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1) for im in imgs]
        )
        return {"pixels": px, "prompt": batch["prompt"]}

    table.set_transform(transform)
    loader = torch.utils.data.DataLoader(
        table,
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=args.workers,
        generator=torch.Generator().manual_seed(0),
    )
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision.startswith("bf16"))
    stamps = []
    step = 0
    while step < args.steps:
        for batch in loader:
            pixels = batch["pixels"].to(device)
            ids = tok(
                batch["prompt"],
                padding="max_length",
                max_length=tok.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(device)
            with torch.no_grad(), autocast:
                ctx = text(ids)[0]
                lat = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
            noise = torch.randn_like(lat)
            t = torch.randint(0, sched.config.num_train_timesteps, (lat.shape[0],), device=device)
            with autocast:
                pred = unet(sched.add_noise(lat, noise, t), t, encoder_hidden_states=ctx).sample
            loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            stamps.append((time.perf_counter(), time.process_time()))
            step += 1
            if step >= args.steps:
                break
    return step_stats(args, np.diff(np.array(stamps), axis=0)[args.warmup :])


def mix(data: Path, n: int) -> dict:
    """Per (concept, colour) bucket: the table sampler's expected share, its draw and the streamed draw."""
    from fairtune.data import (
        AttributeDataModule,
        RebalanceConfig,
        ShardLoader,
        SourceConfig,
        StreamingRebalancedDataset,
        WeightedEpochSampler,
    )

    dm = AttributeDataModule(
        source=SourceConfig(path=str(data / "table")),
        attributes={"color": ["red", "blue"]},
        rebalance=RebalanceConfig(),
        concepts=CONCEPTS,
    )
    dm.setup("fit")
    w = dm.weights.numpy()
    expected: dict = collections.defaultdict(float)
    for c, g, wi in zip(dm.record_concepts, dm.record_groups, w):
        expected[(c, g)] += wi / w.sum()
    table = collections.Counter(
        (dm.record_concepts[i], dm.record_groups[i])
        for i in WeightedEpochSampler(dm.weights, num_samples=n, seed=0, rank=0, world_size=1)
    )
    ds = StreamingRebalancedDataset(
        str(data / "shards" / "train-*.tar"),
        dm.spec,
        dm.target,
        concepts=CONCEPTS,
        batch_size=50,
        samples_per_epoch=n,
    )
    t0 = time.perf_counter()
    streamed = collections.Counter(ds.drawn(0, 2, 2) + ds.drawn(1, 2, 2))
    plan_s = time.perf_counter() - t0
    # and what a real pass over the shards delivers (one rank of two, two workers: it reads every member)
    ds_small = StreamingRebalancedDataset(
        str(data / "shards" / "train-*.tar"),
        dm.spec,
        dm.target,
        concepts=CONCEPTS,
        batch_size=50,
        samples_per_epoch=4000,
    )
    os.environ.update(RANK="0", WORLD_SIZE="2")
    try:
        loader = ShardLoader(
            ds_small,
            collate_fn=lambda b: [(r.concept, ds_small.target.group_of(r.attributes)) for r in b],
            num_workers=2,
        )
        t0 = time.perf_counter()
        delivered = collections.Counter(x for batch in loader for x in batch)
        stream_s = time.perf_counter() - t0
    finally:
        del os.environ["RANK"], os.environ["WORLD_SIZE"]
    planned = collections.Counter(ds_small.drawn(0, 2, 2))
    rows = []
    for b in sorted(expected):
        p = expected[b]
        se = np.sqrt(p * (1 - p) / n)
        rows.append(
            {
                "concept": b[0],
                "group": dm.target.groups[b[1]] if b[1] >= 0 else "unknown",
                "expected": p,
                "table": table[b] / n,
                "streamed": streamed[b] / n,
                "z_table": (table[b] / n - p) / se,
                "z_streamed": (streamed[b] / n - p) / se,
            }
        )
    return {
        "draws": n,
        "buckets": rows,
        "max_abs_dev_streamed": max(abs(r["streamed"] - r["expected"]) for r in rows),
        "max_abs_dev_table": max(abs(r["table"] - r["expected"]) for r in rows),
        "max_abs_z_streamed": max(abs(r["z_streamed"]) for r in rows),
        "max_abs_z_table": max(abs(r["z_table"]) for r in rows),
        "plan_seconds": plan_s,
        "real_pass": {
            "records": sum(delivered.values()),
            "equals_plan": delivered == planned,
            "seconds": stream_s,
        },
    }


def _ratio(r: dict, key: str) -> str:
    """A ratio: one run's, or the median over the repeats with their range."""
    runs = (r.get("ratios") or {}).get(key) or [r[key]]
    if len(runs) == 1:
        return f"{r[key]:.2f}x"
    return f"{r[key]:.2f}x (median of {len(runs)} runs, {min(runs):.2f}-{max(runs):.2f})"


def markdown(r: dict) -> str:
    a = r["args"]
    m = r["mix"]
    fit, cached, plain = r["fit"], r["cached"], r["plain"]
    unit = "wall s" if a["device"] == "cuda" else "CPU s"
    uncached = r.get("uncached")
    n = len((r.get("ratios") or {}).get("fit_over_plain") or [None])
    lines = [
        f"# sd_path: {r.get('model', 'tiny Stable Diffusion')}, {a['image_size']} px, "
        f"batch {a['batch_size']}, "
        f"LoRA rank {a['rank']}, {a['steps']} steps, {a['device']} {a['precision']}, {a['threads']} threads",
        "",
        "Produced by `python benchmarks/sd_path.py " + " ".join(r["argv"]) + "`.",
        "",
        f"| path | {unit} / step (median) | wall s / step (median) | ratio ({unit}) | goal |",
        "|---|---|---|---|---|",
        f"| plain diffusers + peft loop | {plain['step_s']:.4f} | {plain['wall_step_s']:.4f} | 1.00 | |",
        f"| `fairtune fit` (naive arm) | {fit['step_s']:.4f} | {fit['wall_step_s']:.4f} | "
        f"{_ratio(r, 'fit_over_plain')} plain | <= 1.10x |",
        f"| `fairtune fit`, cached latents | {cached['step_s']:.4f} | {cached['wall_step_s']:.4f} | "
        f"{_ratio(r, 'cached_speedup')} faster than encoding the images every step | >= 2x |",
        *(
            [
                f"| `fairtune fit`, images and prompts encoded every step (`prompt_cache: 0`) | "
                f"{uncached['step_s']:.4f} | {uncached['wall_step_s']:.4f} | cached latents + text "
                f"embeddings {_ratio(r, 'cached_all_speedup')} faster than this | >= 2x |",
            ]
            if uncached
            else []
        ),
        "",
        (
            f"Step times in the table: the last of {n} runs (each path timed once per run, interleaved); "
            "ratios: the median over the runs and their range. "
            if n > 1
            else ""
        )
        + f"Step time: the median over {fit['steps_timed']} steps after {a['warmup']} warm-up steps of "
        + (
            "the wall time between steps (CUDA synchronised)."
            if a["device"] == "cuda"
            else f"the process's CPU seconds between steps (`time.process_time`, {a['threads']} thread(s), "
            f"{a['workers']} DataLoader workers: the machine is shared, and CPU time does not count other "
            "jobs' share of it; wall times are beside it)."
        ),
        "",
        f"Both loops: the same model ({r.get('model', 'tiny Stable Diffusion')}), data (ColoredDigits-Bias "
        "digits 0-7), batch, LoRA (rank, attention projections), AdamW and steps. They differ where a plain "
        "loop usually does: it shuffles the table uniformly and encodes every prompt at every step; "
        "`fairtune fit` draws with its epoch sampler, drops 10% of prompts for guidance and keeps prompt "
        "encodings in an LRU cache (`model.backbone.prompt_cache`; the run with `prompt_cache: 0` encodes "
        "them at every step, in one batch, as the plain loop does).",
        "",
        f"Latent cache: built once in {r['cache']['encode_seconds']:.2f} s for {r['cache']['records']} "
        f"records ({r['cache']['variants']} variant(s)) in the cached run's setup; VAE encoder calls during "
        f"the training steps: {cached['vae_encoder_calls_in_training']} cached, "
        f"{fit['vae_encoder_calls_in_training']} encoding every step. The cache saves what the VAE encoder "
        f"and the image decode cost per step: here {100 * (1 - 1 / r['cached_speedup']):.0f}% of it, "
        "the rest is the UNet's forward and backward passes.",
        "",
        f"## Mix drawn from shards vs the table sampler ({m['draws']} draws, 2 ranks x 2 workers)",
        "",
        f"Max |share - expected| over the {len(m['buckets'])} (digit, colour) buckets: streamed "
        f"{m['max_abs_dev_streamed']:.4f} (max |z| {m['max_abs_z_streamed']:.2f}), table sampler "
        f"{m['max_abs_dev_table']:.4f} (max |z| {m['max_abs_z_table']:.2f}); z in binomial standard errors "
        f"(|z| < 3.4 for 16 buckets at 99%). A real pass over the shards (rank 0 of 2, 2 workers, "
        f"{m['real_pass']['records']} records, {m['real_pass']['seconds']:.2f} s) delivered exactly the "
        f"planned draw: {m['real_pass']['equals_plan']}.",
        "",
        "| digit | colour | expected | table | streamed | z table | z streamed |",
        "|---|---|---|---|---|---|---|",
    ]
    for b in m["buckets"]:
        lines.append(
            f"| {b['concept']} | {b['group']} | {b['expected']:.4f} | {b['table']:.4f} | {b['streamed']:.4f} "
            f"| {b['z_table']:+.2f} | {b['z_streamed']:+.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--latent-size", type=int, default=None, help="tiny SD latent side (default image/2)")
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--draws", type=int, default=50000)
    ap.add_argument("--repeats", type=int, default=1, help="time every path this many times (interleaved)")
    ap.add_argument(
        "--data", default=None, help="a ColoredDigits-Bias folder (default: rendered to a temp dir)"
    )
    ap.add_argument(
        "--pretrained",
        default=None,
        help="an SD folder or shipped name (e.g. colored-digits-sd32) instead of a tiny SD from config",
    )
    ap.add_argument("--name", default="sd_path")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    argv = sys.argv[1:] if argv is None else argv
    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("sd_path: --device cuda but torch sees no CUDA device")

    from fairtune.colored_digits import ColoredDigitsConfig, build_colored_digits
    from fairtune.models import make_tiny_stable_diffusion

    work = Path(tempfile.mkdtemp(prefix="sd_path-"))
    try:
        (work / "sd_path_timer.py").write_text(TIMER)
        data = Path(args.data) if args.data else work / "data"
        if not (data / "table").exists():
            build_colored_digits(ColoredDigitsConfig(), data)
        if args.pretrained:  # (--latent-size is the tiny SD's; a model's own size is its UNet's)
            from fairtune.models import resolve_shipped

            sd = Path(resolve_shipped(args.pretrained))
        else:
            sd = make_tiny_stable_diffusion(work / "sd", sample_size=args.latent_size or args.image_size // 2)

        runs = []  # every path once per repeat, interleaved, so a slow spell of the machine hits them all
        for k in range(args.repeats):
            cache_dir = work / f"latents-{k}"  # a fresh cache each repeat: its build is timed each time
            print(f"sd_path: run {k + 1}/{args.repeats}: plain diffusers + peft loop ...", file=sys.stderr)
            plain = plain_loop_step_times(args, sd, data)
            print("sd_path: fairtune fit (encoding every step) ...", file=sys.stderr)
            fit = fit_step_times(args, work, sd, data, f"fit-{k}")  # a run folder each: a done one skips
            print("sd_path: fairtune fit (encoding images and prompts every step) ...", file=sys.stderr)
            uncached = fit_step_times(
                args, work, sd, data, f"uncached-{k}", backbone_over={"prompt_cache": 0}
            )
            print("sd_path: fairtune fit (cached latents, built in its setup) ...", file=sys.stderr)
            cached = fit_step_times(args, work, sd, data, f"cached-{k}", latents={"dir": str(cache_dir)})
            runs.append({"plain": plain, "fit": fit, "uncached": uncached, "cached": cached})
        meta = json.loads(next(cache_dir.glob("*/meta.json")).read_text())
        ratios = {
            "fit_over_plain": [r["fit"]["step_s"] / r["plain"]["step_s"] for r in runs],
            "cached_speedup": [r["fit"]["step_s"] / r["cached"]["step_s"] for r in runs],
            "cached_all_speedup": [r["uncached"]["step_s"] / r["cached"]["step_s"] for r in runs],
        }
        print("sd_path: mix from shards vs the table sampler ...", file=sys.stderr)
        result = {
            "argv": argv,
            "args": vars(args),
            "torch": torch.__version__,
            "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
            "plain": plain,
            "fit": fit,
            "model": args.pretrained or "tiny Stable Diffusion",
            "cached": cached,
            "uncached": uncached,
            # each ratio: the median over the repeats (one run's ratio with --repeats 1); every run's in
            # "runs" and "ratios"; each path's step times above are the last run's
            **{k: float(np.median(v)) for k, v in ratios.items()},
            "ratios": ratios,
            "runs": runs,
            "cache": {
                "encode_seconds": meta["encode_seconds"],
                "records": meta["count"],
                "variants": meta["shape"][1],
            },
            "mix": mix(data, args.draws),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from fairtune.data import atomic_write_json, atomic_write_text

    atomic_write_json(out / f"{args.name}.json", result, indent=2)
    md = markdown(result)
    atomic_write_text(out / f"{args.name}.md", md)
    print(md)
    print(f"wrote {out / args.name}.json and .md", file=sys.stderr)


if __name__ == "__main__":
    main()
