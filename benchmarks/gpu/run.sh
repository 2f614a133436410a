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
source benchmarks/gpu/prelude.sh

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
