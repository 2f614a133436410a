#!/usr/bin/env bash
# Reproduce a shipped biased base model (~15 min on 2 cores each):
#   bash scripts/pretrain_base.sh          colored_digits/checkpoints/colored-digits-16 (red/blue, light background)
#   bash scripts/pretrain_base.sh k3bg     colored_digits/checkpoints/colored-digits-16-k3bg (red/blue/green inks,
#                                          light/dark backgrounds; per digit a dominant ink and background)
set -euo pipefail
cd "$(dirname "$0")/.."
variant=${1:-}
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
case "$variant" in
  "")
    name=colored-digits-16
    config=configs/base/pretrain_colored_digits.yaml
    data_args=()
    ;;
  k3bg)
    name=colored-digits-16-k3bg
    config=configs/base/pretrain_colored_digits_k3bg.yaml
    data_args=(--config configs/data/colored_digits_k3bg.yaml)  # inks, backgrounds, their shares
    ;;
  *)
    echo "usage: bash scripts/pretrain_base.sh [k3bg]" >&2
    exit 2
    ;;
esac
data=runs/data/$name
[ -f "$data/stats.json" ] || .venv/bin/fairtune data colored-digits --out "$data" "${data_args[@]}"
.venv/bin/fairtune fit --config "$config"
rm -rf "colored_digits/checkpoints/$name"
mkdir -p colored_digits/checkpoints
cp -r "runs/pretrain-$name/model" "colored_digits/checkpoints/$name"
echo "base model written to colored_digits/checkpoints/$name"
