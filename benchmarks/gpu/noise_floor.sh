#!/usr/bin/env bash
# Issue 15 on one GPU (run by the lead with the device tool: command "bash .gpu/noise_floor.sh",
# carry [".gpu"], timeout_s 600; the bundle as in README.md, plus this file and prelude.sh):
#
#   1. at once: benchmarks/noise_floor.py search (6 candidates of the debiased adapter, seed 0) and
#      adversary (lever 2's forms and the naive control, seeds 0-2);
#   2. then benchmarks/noise_floor.py final (the search's winner on seeds 1-3, uniform and 30/70).
#
# Every run: 500 steps, fp32, one GPU shared by all runs of a step, one CPU thread each; judged on
# the GPU (N = 128 per digit, 15 DDIM steps; the same prompts, seeds and judges as the demo). The
# data, judges and lever 3's classifier are made here by the same commands as on CPU.
# Writes into $OUT: noise_floor_gpu.json (stage times, what finished), run.log, stages.log and
# results.tgz (benchmarks/results/{noise_floor*,adversary_forms*}, benchmarks/specs/noise_floor.yaml,
# each run's status.json and config.yaml). A step cut off by its time limit still reports the runs it
# finished.
#
# FT_DRY=1: the same on CPU with 3 training steps and tiny judging (a logic check).
set -Eeuo pipefail
cd "$(dirname "$0")/.."
SUMMARY=noise_floor_gpu.json
source benchmarks/gpu/prelude.sh

stage judges
JUDGE_ARGS=()
[ "$DRY" = 1 ] && JUDGE_ARGS=(--train.digit_epochs 1 --train.color_epochs 1)
if [ -n "${FT_JUDGES:-}" ]; then # judges trained elsewhere by the same command (carried)
  cp -r "$FT_JUDGES" "$WORK/judges"
else
  timed judges 240 "$FT" judges train --data "$WORK/data" --out "$WORK/judges" "${JUDGE_ARGS[@]}" \
    || fail "fairtune judges train failed"
fi

# The specs name the benchmark's assets by their usual place.
mkdir -p runs/data runs/judges runs/classifiers
ln -sfn "$WORK/data" runs/data/colored-digits-16
ln -sfn "$WORK/judges" runs/judges/colored-digits-16
ln -sfn "$WORK/classifier" runs/classifiers/color-train-16
rm -rf runs/bench

export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
OV="{\"trainer.accelerator\": \"$ACC\", \"trainer.devices\": 1, \"model.backbone.text_encoder\": \"$WORK/minilm\"}"
JO=()
if [ "$DRY" = 1 ]; then
  OV="${OV%\}}, \"trainer.max_steps\": 3}"
  JO=(--judge_options '{"n_per_prompt": 4, "explicit_n": 2, "steps": 2, "reference_n": 64}')
fi
BUDGET_SEARCH=${FT_BUDGET_SEARCH:-250}
BUDGET_FINAL=${FT_BUDGET_FINAL:-190}
GPU_NAME=$("$PY" -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")')
MACHINE="one $GPU_NAME with $(nproc --all) CPU cores (benchmarks/gpu/noise_floor.sh): runs trained side by side on \
it (6 candidates, 9 lever-2 runs, then 6 final runs at a time), fp32, one CPU thread each, judged on the GPU; \
text encoder: the carried all-MiniLM-L6-v2 copy (benchmarks/gpu/README.md)"
[ "$DRY" = 1 ] && MACHINE="a CPU dry run (3 steps, tiny judging): not a result"
NF=("$PY" benchmarks/noise_floor.py)
# step name budget args...: run one step under a time limit; a step cut off is noted, not fatal
step() {
  local name=$1 limit=$2
  shift 2
  timed "$name" "$limit" "${NF[@]}" "$@" --overrides "$OV" --machine "$MACHINE" "${JO[@]}" \
    || say "$name stopped (exit $?): tabulating what finished"
  "${NF[@]}" "$1" --report_only true --overrides "$OV" --machine "$MACHINE" "${JO[@]}" \
    > "$WORK/logs/${name}_report.log" 2>&1 \
    || say "$name: the report failed (see stages.log)"
}

if [ "${FT_QUICK:-0}" = 1 ]; then # the committed noise_floor.yaml alone (no search, no lever 2)
  stage final
  step final "$BUDGET_FINAL" final --workers 7
else
stage search_and_adversary
step adversary "$((BUDGET_SEARCH + BUDGET_FINAL))" adversary --workers 9 &
A=$!
step search "$BUDGET_SEARCH" search --workers 6
[ -f benchmarks/specs/noise_floor.yaml ] || fail "the search wrote no benchmarks/specs/noise_floor.yaml"

stage final
step final "$BUDGET_FINAL" final --workers 6
wait "$A" || true
fi

stage pack
collect_logs
shopt -s nullglob
FILES=(benchmarks/specs/noise_floor.yaml)
for f in benchmarks/results/noise_floor* benchmarks/results/adversary_forms*; do FILES+=("$f"); done
for d in runs/bench/runs/*/; do
  for f in status.json config.yaml fit.log; do [ -f "$d$f" ] && FILES+=("$d$f"); done
done
tar czf "$OUT/results.tgz" "${FILES[@]}"
"$PY" - "$OUT" "$WORK" "$T0" "$DRY" <<'EOF' || fail "writing the summary failed"
import json, sys, time
from pathlib import Path

out, work, t0, dry = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
seconds = dict(line.split() for line in (work / "seconds.txt").read_text().splitlines())
states = {}
for s in Path("runs/bench/runs").glob("*/status.json"):
    st = json.loads(s.read_text())
    states[st.get("label", s.parent.name) + f" seed {st.get('seed')}"] = st.get("state")
summary = {"ok": True, "dry_run": dry == "1", "seconds": round(time.time() - t0),
           "stage_wall_s": {k: int(v) / 1000 for k, v in seconds.items()}, "runs": states}
for name in ("noise_floor_search", "noise_floor", "adversary_forms"):
    p = Path("benchmarks/results") / f"{name}.json"
    if p.is_file():
        summary[name] = {k: v for k, v in json.loads(p.read_text()).items() if k != "per_seed"}
(out / "noise_floor_gpu.json").write_text(json.dumps(summary, indent=2))
print(json.dumps({k: summary[k] for k in ("seconds", "stage_wall_s", "runs")}, indent=2))
EOF
trap - ERR
say "done: $OUT/noise_floor_gpu.json"
