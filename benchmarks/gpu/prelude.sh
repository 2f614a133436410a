# Sourced by the GPU scripts (run.sh, noise_floor.sh) after `cd` to the repository root: the stages
# every device run shares. Defines say/fail/stage/timed and PY, FT, WORK, OUT, DRY; makes the venv over
# the machine's torch stack, checks CUDA, unpacks the text encoder (WORK/minilm), renders the data
# (WORK/data) and trains lever 3's classifier (WORK/classifier). SUMMARY names the JSON that `fail`
# writes into OUT (default gpu_check.json).
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
    "$(($(date +%s) - T0))" > "$OUT/${SUMMARY:-gpu_check.json}"
  exit 1
}
trap 'fail "unexpected error (exit $?) near line $LINENO"' ERR
stage() { STAGE=$1; say "stage $1"; }
timed() { # name timeout cmd...: run, log to $WORK/logs/name.log, record seconds
  local name=$1 limit=$2 s
  shift 2
  s=$(date +%s%N)
  timeout -k 30 "$limit" "$@" > "$WORK/logs/$name.log" 2>&1 || return $?
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
if [ -n "${FT_CLASSIFIER:-}" ]; then # one trained elsewhere by the same command (carried)
  cp -r "$FT_CLASSIFIER" "$WORK/classifier"
else
  timed classifier 240 "$FT" classifier train --data "$WORK/data" --out "$WORK/classifier" "${CLF_EPOCHS[@]}" \
    || fail "fairtune classifier train failed"
fi
[ -f "$WORK/classifier/classifier.safetensors" ] || fail "no classifier.safetensors"

