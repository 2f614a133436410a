#!/usr/bin/env bash
# Reproduce the shipped biased base model models/checkpoints/colored-digits-16 (~15 min on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
[ -f runs/data/colored-digits-16/stats.json ] || .venv/bin/fairtune data colored-digits --out runs/data/colored-digits-16
.venv/bin/fairtune fit --config configs/base/pretrain_colored_digits.yaml
rm -rf models/checkpoints/colored-digits-16
mkdir -p models/checkpoints
cp -r runs/pretrain-colored-digits-16/model models/checkpoints/colored-digits-16
echo "base model written to models/checkpoints/colored-digits-16"
