#!/usr/bin/env bash
# Install (if needed) and run the main job: `fairtune demo --out runs/demo` renders ColoredDigits-Bias,
# trains the judges, fine-tunes the class adapters (one LoRA adapter per ink) on the shipped biased
# base model, compares their mix (each image from one adapter, fused at the compare config's scale)
# with the base model, Fair Diffusion and prompt augmentation on the same prompts, seeds and judges,
# and writes runs/demo/compare/report.{md,html}. Extra options go to `fairtune demo` (e.g. --single
# true adds the single debiased adapter, --control true the naive control; --steps 400 trains each
# adapter twice as long as the default 200).
# Started again, it skips what is finished.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
exec .venv/bin/fairtune demo --out runs/demo "$@"
