#!/usr/bin/env bash
# The CAMUS-220 protocol for one target vendor preset, end to end (CPU; see results/camus220/README.md):
#   data (prepare.sh) -> source model (configs/pretrain_cpu_camus.yaml, on the 210 source patients)
#   -> label-free adaptation on the 220 target patients' images: TENT, pseudo-label (configs/baseline_cpu.yaml),
#      styled-source (configs/baseline_cpu_camus.yaml), RL (configs/adapt_cpu_camus.yaml)
#   -> one evaluation of every model on the same 880 target images with their labels (and the reward network).
# Usage: results/camus220/run.sh PRESET [OUT] [DATA]   PRESET: blur | lowgain | shadow | foreign | beam
#        EVAL_ON=dev results/camus220/run.sh PRESET ...  scores the 20 dev patients instead (to choose settings)
# Every step is skipped when it has finished, and an interrupted one continues with --resume, so an interrupted run
# continues where it stopped.
set -euo pipefail
cd "$(dirname "$0")/../.."
P=${1:?preset: blur, lowgain, shadow, foreign or beam}
OUT=${2:-results/runs/camus220}
DATA=${3:-$OUT/data}
RL=${RL:-.venv/bin/rl-adapt}
EVAL_ON=${EVAL_ON:-target}
results/camus220/prepare.sh "$DATA" > /dev/null
n=$(case $P in blur) echo 522;; lowgain) echo 524;; shadow) echo 526;; foreign) echo 528;; beam) echo 531;;
      *) echo "unknown preset $P" >&2; exit 2;; esac)
SOURCE=$DATA/Dataset520_Camus220Source
TARGET=$DATA/Dataset$((n + 1))_Camus220Target_$P
SCORED=$TARGET
[ "$EVAL_ON" = dev ] && SCORED=$DATA/Dataset${n}_Camus220Dev_$P
ls "$OUT"/source_model/*/*/fold_0/checkpoint_final.pth > /dev/null 2>&1 || "$RL" pretrain --data "$SOURCE" \
    --out "$OUT/source_model" --config configs/pretrain_cpu_camus.yaml --no-progress --resume
M=$(ls -d "$OUT"/source_model/*/*/)
R=$OUT/$P
mkdir -p "$R"
for method in tent pseudo-label; do
  [ -f "$R/$method/baseline_history.json" ] || "$RL" baseline --method $method --model "$M" --target "$TARGET" \
      --out "$R/$method" --config configs/baseline_cpu.yaml --no-progress --resume
done
[ -f "$R/styled-source/baseline_history.json" ] || "$RL" baseline --method styled-source --model "$M" \
    --target "$TARGET" --source-data "$SOURCE" --out "$R/styled-source" --config configs/baseline_cpu_camus.yaml \
    --no-progress --resume
"$RL" adapt --model "$M" --target "$TARGET" --source-data "$SOURCE" --out "$R/rl" \
    --config configs/adapt_cpu_camus.yaml --no-progress $([ -d "$R/rl" ] && echo --resume)
models=(--model source="$M")
for m in tent pseudo-label styled-source; do models+=(--model "$m=$(ls -d "$R/$m"/*/*/)"); done
models+=(--model rl_adapted="$(ls -d "$R"/rl/model/*/*/)")
[ -f "$R/eval_$EVAL_ON/summary.json" ] || "$RL" evaluate "${models[@]}" --data "$SCORED" --out "$R/eval_$EVAL_ON" \
    --reward "$R/rl" --reward-model rl_adapted --compare rl_adapted:styled-source --no-progress --resume
