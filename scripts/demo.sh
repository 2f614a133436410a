#!/usr/bin/env bash
# Install (if needed) and run the main job. For now: render the ColoredDigits-Bias benchmark data and
# train its judges and the fairness loss's classifier (about a minute on 2 CPU cores), into the places
# the configs read them from: runs/data/, runs/judges/, runs/classifiers/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
DATA=runs/data/colored-digits-16
[ -f "$DATA/stats.json" ] || .venv/bin/fairtune data colored-digits --out "$DATA"
.venv/bin/fairtune judges train --data "$DATA" --out runs/judges/colored-digits-16
.venv/bin/fairtune classifier train --data "$DATA" --out runs/classifiers/color-train-16
echo "demo: data in $DATA (stats.json), judges in runs/judges/colored-digits-16 (judges.json)"
echo "next: fairtune fit --config configs/colored_digits/lora.yaml --config configs/ablations/sampler.yaml"
