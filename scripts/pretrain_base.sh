#!/usr/bin/env bash
# Reproduce a shipped biased base model (~15 min on 2 cores each):
#   bash scripts/pretrain_base.sh          models/checkpoints/colored-digits-16 (red/blue, light background)
#   bash scripts/pretrain_base.sh k3bg     models/checkpoints/colored-digits-16-k3bg (red/blue/green inks,
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
    # Dominant ink by digit: 0 red, 1 blue, 2 green, 3 red, ... (0.7, the others 0.15 each);
    # dominant background: even digits light, odd digits dark (0.8).
    data_args=(
      --colors '[red, blue, green]' --background true --renders_per_image 8
      --color_shares '[[0.7,0.15,0.15],[0.15,0.7,0.15],[0.15,0.15,0.7],[0.7,0.15,0.15],[0.15,0.7,0.15],[0.15,0.15,0.7],[0.7,0.15,0.15],[0.15,0.7,0.15],[0.15,0.15,0.7],[0.7,0.15,0.15]]'
      --dark_share '[0.2,0.8,0.2,0.8,0.2,0.8,0.2,0.8,0.2,0.8]'
    )
    ;;
  *)
    echo "usage: bash scripts/pretrain_base.sh [k3bg]" >&2
    exit 2
    ;;
esac
data=runs/data/$name
[ -f "$data/stats.json" ] || .venv/bin/fairtune data colored-digits --out "$data" "${data_args[@]}"
.venv/bin/fairtune fit --config "$config"
rm -rf "models/checkpoints/$name"
mkdir -p models/checkpoints
cp -r "runs/pretrain-$name/model" "models/checkpoints/$name"
echo "base model written to models/checkpoints/$name"
