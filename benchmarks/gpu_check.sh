#!/usr/bin/env bash
# GPU check for issue 14 (one prepared script; about 3-5 minutes on one H200, no download needed when a
# CUDA torch and fairtune's dependencies are installed). Run from anywhere:
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh
#
# 1. finds a Python whose torch sees a GPU (.venv, python3, python); without one it tries
#    `pip install torch==2.13.0` into .venv-gpu (needs a package index) and fails fast if that fails;
# 2. makes fairtune importable (an editable install that reuses the packages already there);
# 3. runs benchmarks/sd_path.py on CUDA with bf16 (fit vs plain loop, cached latents vs encoding,
#    the shard mix);
# 4. trains two short demo arms on the shipped ColoredDigits base model with bf16 (naive; lever 1,
#    the rebalanced sampler, streamed from webdataset shards) and times them;
# 5. writes "$OUT"/gpu_check.json (and sd_path_cuda.{json,md}, nvidia_smi.txt, logs/).
# Every stage runs under a timeout and the script stops at the first failure, saying which.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${OUT:-$ROOT/benchmarks/results/gpu}
mkdir -p "$OUT/logs"
T0=$(date +%s)
say() { echo "[gpu_check +$(($(date +%s) - T0))s] $*" >&2; }
fail() {
  say "FAILED: $*"
  printf '{"ok": false, "stage": "%s", "seconds": %d}\n' "$STAGE" "$(($(date +%s) - T0))" > "$OUT/gpu_check.json"
  exit 1
}
STAGE=python
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
export PIP_DEFAULT_TIMEOUT=20 PIP_RETRIES=0 PIP_DISABLE_PIP_VERSION_CHECK=1

# ---------------------------------------------------------------- 1. a Python with CUDA torch
has_cuda() { "$1" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; }
PY=""
for cand in "$ROOT/.venv/bin/python" "$ROOT/.venv-gpu/bin/python" python3 python; do
  if command -v "$cand" >/dev/null 2>&1 && has_cuda "$cand"; then PY=$(command -v "$cand"); break; fi
done
if [ -z "$PY" ]; then
  say "no Python with a CUDA torch; trying pip install torch==2.13.0 into .venv-gpu (needs a package index)"
  python3 -m venv --system-site-packages "$ROOT/.venv-gpu" || fail "cannot create .venv-gpu"
  timeout 180 "$ROOT/.venv-gpu/bin/python" -m pip install -q torch==2.13.0 > "$OUT/logs/pip_torch.log" 2>&1 \
    || fail "pip install torch==2.13.0 failed (no package index?): see $OUT/logs/pip_torch.log"
  PY="$ROOT/.venv-gpu/bin/python"
  has_cuda "$PY" || fail "torch installed but it sees no GPU (a CPU wheel?): install a CUDA build of torch"
fi
say "python: $PY ($("$PY" -c 'import torch; print(torch.__version__, torch.cuda.get_device_name())'))"
nvidia-smi > "$OUT/nvidia_smi.txt" 2>&1 || true

# ---------------------------------------------------------------- 2. fairtune importable
STAGE=install
if ! "$PY" -c 'import fairtune.data, fairtune.models, fairtune.train' >/dev/null 2>&1; then
  if [ "$PY" != "$ROOT/.venv-gpu/bin/python" ] && [ "$PY" != "$ROOT/.venv/bin/python" ]; then
    "$PY" -m venv --system-site-packages "$ROOT/.venv-gpu" || fail "cannot create .venv-gpu"
    PY="$ROOT/.venv-gpu/bin/python"
  fi
  say "installing fairtune (editable; the installed torch is kept)"
  timeout 240 "$PY" -m pip install -q -e "$ROOT" > "$OUT/logs/pip_fairtune.log" 2>&1 \
    || fail "pip install -e . failed (missing dependencies and no package index?): see $OUT/logs/pip_fairtune.log"
  "$PY" -c 'import fairtune.data, fairtune.models, fairtune.train' || fail "fairtune does not import"
fi
FAIRTUNE=$(dirname "$PY")/fairtune
[ -x "$FAIRTUNE" ] || FAIRTUNE=$(command -v fairtune || true)
[ -n "$FAIRTUNE" ] || fail "no fairtune command next to $PY"

# ---------------------------------------------------------------- 3. sd_path on CUDA, bf16
STAGE=data
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
say "rendering ColoredDigits-Bias into $WORK/data"
timeout 120 "$PY" -c "
from fairtune.data import ColoredDigitsConfig, build_colored_digits
build_colored_digits(ColoredDigitsConfig(), '$WORK/data')
" > "$OUT/logs/data.log" 2>&1 || fail "rendering the data failed: see $OUT/logs/data.log"

STAGE=sd_path
say "sd_path on CUDA (bf16)"
timeout 240 "$PY" benchmarks/sd_path.py --device cuda --precision bf16-mixed --steps 60 --warmup 10 \
  --batch-size 64 --image-size 64 --threads 8 --workers 4 --data "$WORK/data" --name sd_path_cuda \
  --out "$OUT" > "$OUT/logs/sd_path.log" 2>&1 || fail "sd_path failed or ran over 240 s: see $OUT/logs/sd_path.log"

# ---------------------------------------------------------------- 4. demo arms, bf16
STAGE=demo
STEPS=300
arm() { # name, extra args...
  local name=$1
  shift
  local start
  start=$(date +%s%N)
  timeout 150 "$FAIRTUNE" fit --config configs/colored_digits/lora.yaml --config configs/launch/bf16.yaml \
    --trainer.accelerator gpu --trainer.devices 1 --trainer.max_steps "$STEPS" \
    --trainer.default_root_dir "$WORK/$name" --trainer.enable_progress_bar false \
    --data.num_workers 4 --data.samples_per_epoch 6400 "$@" > "$OUT/logs/$name.log" 2>&1 \
    || fail "demo arm $name failed or ran over 150 s: see $OUT/logs/$name.log"
  [ -f "$WORK/$name/adapter/pytorch_lora_weights.safetensors" ] || fail "demo arm $name wrote no adapter"
  echo "$name $((($(date +%s%N) - start) / 1000000))" >> "$WORK/arms.txt"
  say "demo arm $name done"
}
arm naive --config configs/ablations/naive.yaml --data.source.path "$WORK/data/table"
arm sampler_shards --config configs/ablations/sampler.yaml \
  --data.source.path "$WORK/data/shards/train-*.tar" --data.source.shuffle_buffer 1000

# ---------------------------------------------------------------- 5. summary
STAGE=summary
"$PY" - "$OUT" "$WORK" "$STEPS" "$T0" <<'EOF' || fail "writing the summary failed"
import csv, json, sys, time
from pathlib import Path

import torch

out, work, steps, t0 = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
arms = {}
for line in (work / "arms.txt").read_text().splitlines():
    name, ms = line.split()
    rows = list(csv.DictReader(open(work / name / "logs" / "version_0" / "metrics.csv")))
    losses = [float(r["train/diffusion_loss"]) for r in rows if r.get("train/diffusion_loss")]
    arms[name] = {
        "steps": steps,
        "wall_seconds_with_startup": int(ms) / 1000,
        "last_logged_diffusion_loss": losses[-1] if losses else None,
    }
sd = json.loads((out / "sd_path_cuda.json").read_text())
summary = {
    "ok": True,
    "device": torch.cuda.get_device_name(),
    "torch": torch.__version__,
    "seconds": round(time.time() - t0),
    "sd_path": {
        "fit_step_s": sd["fit"]["step_s"],
        "plain_step_s": sd["plain"]["step_s"],
        "fit_over_plain": sd["fit_over_plain"],
        "cached_step_s": sd["cached"]["step_s"],
        "cached_speedup": sd["cached_speedup"],
        "mix_max_abs_z_streamed": sd["mix"]["max_abs_z_streamed"],
    },
    "demo_arms_bf16": arms,
}
(out / "gpu_check.json").write_text(json.dumps(summary, indent=2))
print(json.dumps(summary, indent=2))
EOF
say "done: $OUT/gpu_check.json"
