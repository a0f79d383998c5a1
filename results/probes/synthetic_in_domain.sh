#!/usr/bin/env bash
# Probe (not part of the engine): how anatomically valid are the raw outputs of an *in-domain* model, trained with
# the true labels of the target preset itself? The reference for the issue-5 validity bar on raw network outputs.
# Trains the demo's network (configs/pretrain_cpu.yaml + the demo's 15 epochs) on the labelled images of the same
# 40 target patients the demo adapts to (ids 5001-5040, regenerated with labels), then evaluates source, RL adapted
# and in-domain models on the demo's 20 held-out test patients with the adapted model's stored postprocessing.
# usage: results/probes/synthetic_in_domain.sh DEMO_DIR PRESET OUT   (PRESET: target-blur|target-lowgain|target-shadow)
# Run from the repository root with the virtual environment active; one thread: OMP_NUM_THREADS=1.
set -euo pipefail
DEMO=$1; PRESET=$2; OUT=$3
mkdir -p "$OUT"
[ -d "$OUT/data" ] || rl-adapt synth --domain "$PRESET" --patients 40 --first-patient 5001 --seed 0 --size 128 \
    --format nnunet --out "$OUT/data" --dataset-name "Dataset920_InDomain"
[ -d "$OUT/model" ] || rl-adapt pretrain --data "$OUT/data" --out "$OUT/model" --config configs/pretrain_cpu.yaml \
    --set train.epochs=15 --set train.val_every=5 --no-progress
first() { dirname "$(ls "$1"/*/*/plans.json | head -n 1)"; }
rl-adapt evaluate --model source="$(first "$DEMO/source_model")" --model rl_adapted="$(first "$DEMO/adapt/model")" \
    --model in_domain="$(first "$OUT/model")" --data "$DEMO/data/target_test" --out "$OUT/eval" --overwrite \
    --no-report --no-progress
