#!/usr/bin/env bash
# Install (if needed) and run the main job. For now: render the ColoredDigits-Bias benchmark data and
# train its judges into runs/demo (about a minute on 2 CPU cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${1:-runs/demo}
.venv/bin/fairtune data colored-digits --out "$OUT/data"
.venv/bin/fairtune judges train --data "$OUT/data" --out "$OUT/judges"
echo "demo: data in $OUT/data (stats.json), judges in $OUT/judges (judges.json)"
