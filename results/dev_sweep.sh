#!/usr/bin/env bash
# One dev-split experiment of results/synthetic_presets.md: adapt the demo's source model on the demo's unlabelled
# target images with configs/adapt_cpu.yaml plus overrides, then evaluate on a labelled dev split of the same
# preset (10 other patients, ids 7001-7010; the test split is 9001-9020 and is never used to choose settings).
# usage: results/dev_sweep.sh DEMO_DIR PRESET OUT [--set KEY=VALUE ...]
#   DEMO_DIR: made by `rl-adapt demo --out DEMO_DIR --set target_domain=PRESET` (PRESET: target-blur|-lowgain|-shadow)
# Run from the repository root with the virtual environment active; one thread: OMP_NUM_THREADS=1.
set -euo pipefail
DEMO=$1; PRESET=$2; OUT=$3; shift 3
DEV=$DEMO/dev_split
[ -d "$DEV" ] || rl-adapt synth --domain "$PRESET" --patients 10 --first-patient 7001 --seed 0 --size 128 \
    --format nnunet --out "$DEV" --dataset-name "dev_$PRESET"
SRC=$(dirname "$(ls "$DEMO"/source_model/*/*/plans.json)")
rl-adapt adapt --model "$SRC" --target "$DEMO/data/target" --source-data "$DEMO/data/source" --out "$OUT" \
    --config configs/adapt_cpu.yaml --no-progress "$@"
rl-adapt evaluate --model source="$SRC" --model rl_adapted="$(dirname "$(ls "$OUT"/model/*/*/plans.json)")" \
    --data "$DEV" --out "$OUT/eval_dev" --no-progress
