#!/usr/bin/env bash
# GPU check on a machine with no network (one H200; run by the lead with `run`, carry [".gpu"]):
#
#   bash .gpu/run.sh            # writes "$OUT"/gpu_check.json, run.log, stages.log, nvidia_smi.txt,
#                               # sd_path_cuda.{json,md} (when benchmarks/sd_path.py exists)
#
# Stages (the script stops at the first failure and names it in gpu_check.json and run.log):
#   install  venv over the machine's torch stack + the carried wheels (.gpu/wheels) + fairtune (editable)
#   cuda     torch sees a GPU
#   minilm   unpack the carried all-MiniLM-L6-v2 (.gpu/minilm: fp16, rare-token embeddings int8) to fp32
#   data     render ColoredDigits-Bias (fairtune data colored-digits)
#   classifier  lever 3's colour classifier (fairtune classifier train), for the `all` arm
#   arm_naive, arm_all  the demo's two arms (configs/demo/sweep.yaml: 500 steps, seed 0) with bf16 on
#            one GPU; per-step times from .gpu/steptimer.py
#   sd_path  benchmarks/sd_path.py on CUDA with bf16, if that file exists
#   summary  gpu_check.json
#
# FT_DRY=1: the same stages on CPU with 3 steps (a logic check; FT_BASE_PY picks the Python the venv is
# made from, FT_FIND_LINKS adds a wheel folder, e.g. for another Python version).
set -Eeuo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${OUT:-$ROOT/.gpu/out}
mkdir -p "$OUT"
DRY=${FT_DRY:-0}
BASE_PY=${FT_BASE_PY:-python3}
VENV=${FT_VENV:-/tmp/ft}
WORK=${FT_WORK:-/tmp/ftwork}
rm -rf "$WORK"
mkdir -p "$WORK/logs"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INDEX=1 PIP_CONFIG_FILE=/dev/null
exec > >(tee -a "$OUT/run.log") 2>&1
T0=$(date +%s)
STAGE=start
say() { echo "[run +$(($(date +%s) - T0))s] $*"; }
collect_logs() { # every stage log, in order, into one file ($OUT holds at most 8 files)
  : > "$OUT/stages.log"
  for f in $(ls -tr "$WORK/logs" 2>/dev/null); do
    { echo "===== $f"; tail -c 400000 "$WORK/logs/$f"; } >> "$OUT/stages.log"
  done
}
fail() {
  say "FAILED at stage $STAGE: $*"
  collect_logs
  printf '{"ok": false, "stage": "%s", "error": "%s", "seconds": %d}\n' "$STAGE" "${*//\"/\'}" \
    "$(($(date +%s) - T0))" > "$OUT/gpu_check.json"
  exit 1
}
trap 'fail "unexpected error (exit $?) near line $LINENO"' ERR
stage() { STAGE=$1; say "stage $1"; }
timed() { # name timeout cmd...: run, log to $WORK/logs/name.log, record seconds
  local name=$1 limit=$2 s
  shift 2
  s=$(date +%s%N)
  timeout "$limit" "$@" > "$WORK/logs/$name.log" 2>&1 || return $?
  echo "$name $((($(date +%s%N) - s) / 1000000))" >> "$WORK/seconds.txt"
}
if [ "$DRY" = 1 ]; then
  STEPS=3 ACC=cpu PREC=32-true WARMUP=1
else
  STEPS=500 ACC=gpu PREC=bf16-mixed WARMUP=20
fi
nvidia-smi > "$OUT/nvidia_smi.txt" 2>&1 || echo "no nvidia-smi" > "$OUT/nvidia_smi.txt"

# ---------------------------------------------------------------- install
stage install
# python3 there is itself a venv (/opt/torch/.venv): a venv made from it sees only the base interpreter's
# packages, so a .pth adds python3's own site-packages (after the venv's, which therefore win).
SITES=$("$BASE_PY" -c 'import site; print(" ".join(site.getsitepackages()))') || fail "$BASE_PY does not run"
if "$BASE_PY" -m venv --system-site-packages "$VENV" > "$WORK/logs/venv.log" 2>&1; then
  PIP=("$VENV/bin/python" -m pip)
else # no ensurepip (Debian/Ubuntu without python3-venv): borrow the base's pip
  rm -rf "$VENV"
  "$BASE_PY" -m venv --system-site-packages --without-pip "$VENV" >> "$WORK/logs/venv.log" 2>&1 \
    || fail "cannot make a venv from $BASE_PY: see stages.log"
  PIP=("$BASE_PY" -m pip --python "$VENV/bin/python")
fi
PY=$VENV/bin/python
PURE=$("$PY" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
for s in $SITES; do echo "import site; site.addsitedir(r'$s')"; done > "$PURE/zz_base_site.pth"
"$PY" -c 'import torch' || fail "torch is not importable in the venv (sites: $SITES)"
LINKS=(--find-links "$ROOT/.gpu/wheels")
[ -n "${FT_FIND_LINKS:-}" ] && LINKS+=(--find-links "$FT_FIND_LINKS")
WANT=(diffusers==0.42.1 datasets==5.2.0 webdataset==1.0.2 "jsonargparse[signatures]==4.53.0" sqlalchemy==2.1.9)
# Resolve against what the machine has (installs only the missing or too-new dependencies from the
# carried wheels); if that cannot resolve, install every carried wheel as is.
if ! timed pip_deps 240 "${PIP[@]}" install --no-index "${LINKS[@]}" "${WANT[@]}"; then
  say "resolving failed (see stages.log); installing every carried wheel with --no-deps"
  timed pip_nodeps 240 "${PIP[@]}" install --no-index --no-deps "${LINKS[@]}" "${WANT[@]}" \
    dill multiprocess braceexpand docstring-parser typeshed-client importlib-metadata zipp requests \
    urllib3 idna charset-normalizer certifi fsspec lazy-importer || fail "pip install of the carried wheels failed"
fi
if ! timed pip_fairtune 240 "${PIP[@]}" install --no-index --no-deps --no-build-isolation -e "$ROOT"; then
  say "editable install failed; trying a plain install"
  timed pip_fairtune2 240 "${PIP[@]}" install --no-index --no-deps --no-build-isolation "$ROOT" \
    || fail "pip install of fairtune failed"
fi
"${PIP[@]}" list > "$WORK/logs/pip_list.log" 2>&1 || true
timed import 120 "$PY" -c "import fairtune.cli, fairtune.data, fairtune.models, fairtune.train, fairtune.eval" \
  || fail "import fairtune.cli failed"
FT=$VENV/bin/fairtune
[ -x "$FT" ] || fail "no fairtune command in $VENV/bin"
export PATH=$VENV/bin:$PATH

# ---------------------------------------------------------------- cuda
stage cuda
VERSIONS=$("$PY" -c "
import json, torch, transformers, diffusers, datasets, huggingface_hub, lightning, peft
print(json.dumps({'torch': torch.__version__, 'cuda': torch.version.cuda, 'transformers': transformers.__version__,
  'diffusers': diffusers.__version__, 'datasets': datasets.__version__, 'huggingface_hub': huggingface_hub.__version__,
  'lightning': lightning.__version__, 'peft': peft.__version__,
  'gpu': torch.cuda.get_device_name() if torch.cuda.is_available() else None}))") || fail "version probe failed"
say "versions: $VERSIONS"
[ "$DRY" = 1 ] || "$PY" -c 'import torch; assert torch.cuda.is_available(); torch.ones(1).cuda()' \
  || fail "torch sees no usable GPU"

# ---------------------------------------------------------------- minilm
stage minilm
timed minilm 120 "$PY" "$ROOT/.gpu/pack_minilm.py" unpack "$ROOT/.gpu/minilm" "$WORK/minilm" \
  || fail "unpacking the text encoder failed"

# ---------------------------------------------------------------- data + classifier
stage data
timed data 240 "$FT" data colored-digits --out "$WORK/data" || fail "fairtune data colored-digits failed"
[ -f "$WORK/data/stats.json" ] || fail "no $WORK/data/stats.json"
stage classifier
CLF_EPOCHS=()
[ "$DRY" = 1 ] && CLF_EPOCHS=(--epochs 1)
timed classifier 240 "$FT" classifier train --data "$WORK/data" --out "$WORK/classifier" "${CLF_EPOCHS[@]}" \
  || fail "fairtune classifier train failed"
[ -f "$WORK/classifier/classifier.safetensors" ] || fail "no classifier.safetensors"

# ---------------------------------------------------------------- demo arms
BF16=configs/launch/bf16.yaml
arm() { # name, overlay config, extra args...
  local name=$1 overlay=$2
  shift 2
  stage "arm_$name"
  local prec=(--trainer.precision "$PREC")
  [ "$DRY" != 1 ] && [ -f "$BF16" ] && prec=(--config "$BF16")
  cat > "$WORK/timer_$name.yaml" <<EOF
trainer:
  callbacks:
    - class_path: steptimer.StepTimer
      init_args: {out: $WORK/steps_$name.json, warmup: $WARMUP}
EOF
  PYTHONPATH="$ROOT/.gpu${PYTHONPATH:+:$PYTHONPATH}" timed "arm_$name" 300 "$FT" fit \
    --config configs/colored_digits/lora.yaml --config "configs/ablations/$overlay.yaml" "${prec[@]}" \
    --config "$WORK/timer_$name.yaml" \
    --trainer.accelerator "$ACC" --trainer.devices 1 --trainer.max_steps "$STEPS" \
    --trainer.default_root_dir "$WORK/arms/$name" --trainer.enable_progress_bar false \
    --seed_everything 0 --model.seed 0 --data.seed 0 \
    --model.backbone.text_encoder "$WORK/minilm" \
    --data.source.path "$WORK/data/table" "$@" || fail "fairtune fit ($name) failed or ran over 300 s"
  [ -f "$WORK/steps_$name.json" ] || fail "arm $name wrote no step times"
  say "arm $name: $(tr -d '\n ' < "$WORK/steps_$name.json")"
}
arm naive naive
arm all all --model.fairness.classifier.weights "$WORK/classifier/classifier.safetensors"

# ---------------------------------------------------------------- sd_path
SD_PATH=skipped
if [ -f benchmarks/sd_path.py ]; then
  stage sd_path
  if [ "$DRY" = 1 ]; then
    SD=(--device cpu --precision 32-true --steps 4 --warmup 1 --batch-size 4 --image-size 32 --threads 1
      --workers 0 --draws 200)
  else
    SD=(--device cuda --precision bf16-mixed --steps 60 --warmup 10 --batch-size 64 --image-size 64
      --threads 8 --workers 4)
  fi
  timed sd_path 360 "$PY" benchmarks/sd_path.py "${SD[@]}" --data "$WORK/data" --name sd_path_cuda \
    --out "$OUT" || fail "benchmarks/sd_path.py failed or ran over 360 s"
  SD_PATH=done
fi

# ---------------------------------------------------------------- summary
stage summary
collect_logs
"$PY" - "$OUT" "$WORK" "$T0" "$DRY" "$SD_PATH" "$VERSIONS" <<'EOF' || fail "writing the summary failed"
import csv, json, sys, time
from pathlib import Path

out, work, t0, dry, sd_state, versions = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6]
seconds = dict(line.split() for line in (work / "seconds.txt").read_text().splitlines())
arms = {}
for name in ("naive", "all"):
    steps = json.loads((work / f"steps_{name}.json").read_text())
    csvs = list((work / "arms" / name).rglob("metrics.csv"))
    rows = list(csv.DictReader(open(csvs[0]))) if csvs else []
    losses = [float(r["train/diffusion_loss"]) for r in rows if r.get("train/diffusion_loss")]
    adapters = sorted(str(p.relative_to(work)) for p in (work / "arms" / name).rglob("*.safetensors"))
    arms[name] = {**steps, "wall_s_with_startup": int(seconds[f"arm_{name}"]) / 1000,
                  "first_logged_diffusion_loss": losses[0] if losses else None,
                  "last_logged_diffusion_loss": losses[-1] if losses else None, "safetensors_written": adapters}
summary = {
    "ok": True, "dry_run": dry == "1", "seconds": round(time.time() - t0), "versions": json.loads(versions),
    "stage_wall_s": {k: int(v) / 1000 for k, v in seconds.items()},
    "demo_arms": {"settings": "configs/demo/sweep.yaml arms naive + all (500 steps, seed 0), bf16-mixed, 1 GPU",
                  **arms},
    "sd_path": sd_state,
}
if sd_state == "done":
    sd = json.loads((out / "sd_path_cuda.json").read_text())
    pick = {}
    for k in ("fit", "plain", "cached"):
        if isinstance(sd.get(k), dict):
            pick[k] = {kk: sd[k][kk] for kk in ("step_s", "wall_step_s", "wall_s") if kk in sd[k]}
    for k in ("fit_over_plain", "cached_speedup"):
        if k in sd:
            pick[k] = sd[k]
    if isinstance(sd.get("mix"), dict):
        pick["mix"] = {k: v for k, v in sd["mix"].items() if not isinstance(v, (list, dict))}
    summary["sd_path"] = pick
(out / "gpu_check.json").write_text(json.dumps(summary, indent=2))
print(json.dumps(summary, indent=2))
EOF
trap - ERR
say "done: $OUT/gpu_check.json"
