#!/usr/bin/env bash
# Does a label-free signal tell a good restyling draw from a bad one? One adaptation run per seed with the committed
# config, stopped once iteration 0's corrections are recorded (restyling, warm start, rollout and correction done):
# its metrics.jsonl then holds the warm-started policy's label-free figures on the target images (iter0/correct:
# validity_before, mean_dice_to_input) and the guard's held-out restyled Dice (warm_start: held_out_dice). Score each
# warm start on a labelled set with export_stage_weights.py + rl-adapt evaluate to compare.
# usage: results/camus220/probe_restyling_draws.sh SOURCE_MODEL TARGET SOURCE_DATA SHAPE_PRIOR OUT SEED [SEED ...]
set -uo pipefail
SRC=$1; TARGET=$2; SOURCE=$3; PRIOR=$4; OUT=$5; shift 5
mkdir -p "$OUT"
for S in "$@"; do
  rl-adapt adapt --model "$SRC" --target "$TARGET" --source-data "$SOURCE" --shape-prior "$PRIOR" \
      --config configs/adapt_cpu_camus.yaml --set seed="$S" --out "$OUT/s$S" --no-progress > "$OUT/s$S.log" 2>&1 &
  pid=$!
  while kill -0 $pid 2>/dev/null; do
    grep -q '"iter0/correct"' "$OUT/s$S/metrics.jsonl" 2>/dev/null && { kill $pid; break; }
    sleep 5
  done
  wait $pid 2>/dev/null
  grep -h '"warm_start"\|"iter0/correct"' "$OUT/s$S/metrics.jsonl"
done
