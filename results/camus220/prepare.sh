#!/usr/bin/env bash
# The real-image 220-patient target site (../shared/data/README.md, splits_camus220.json) as nnU-Net raw datasets:
#   OUT/Dataset520_Camus220Source            210 source patients, original images, labels (train the source model)
#   OUT/Dataset521_Camus220Dev               20 dev patients, original images (the in-domain reference)
#   OUT/Dataset52{2,4,6}_Camus220Dev_<preset>    the dev patients through the target vendor (choose settings here)
#   OUT/Dataset52{3,5,7}_Camus220Target_<preset> the 220 target patients through it (adapt label-free, then score)
#   OUT/Dataset530_Camus220Target            the 220 target patients, original images
#   OUT/Dataset528_Camus220Dev_foreign, OUT/Dataset529_Camus220Target_foreign
#                                            dev and target through a scanner outside the B-mode model (foreign_shift.py)
#   OUT/Dataset531_Camus220Dev_beam, OUT/Dataset532_Camus220Target_beam
#                                            the same through a second one (foreign_shift.py ... beam)
# Usage: results/camus220/prepare.sh [OUT] (default results/runs/camus220/data); needs the venv (make venv).
set -euo pipefail
cd "$(dirname "$0")/../.."
C=${CAMUS:-../shared/data/Dataset501_CAMUS224}
OUT=${1:-results/runs/camus220/data}
S=$C/splits_camus220.json
RL=${RL:-.venv/bin/rl-adapt}
mkdir -p "$OUT"
mk() {  # name preset split seed
  [ -f "$OUT/$1/dataset.json" ] && return 0
  "$RL" shift --data "$C" --preset "$2" --repair-labels --split-file "$S" --split "$3" --seed "$4" --out "$OUT/$1" --no-progress
}
mk Dataset520_Camus220Source none source 0
mk Dataset521_Camus220Dev none dev 0
n=2
for preset in target-blur target-lowgain target-shadow; do
  p=${preset#target-}
  mk "Dataset52${n}_Camus220Dev_${p}" "$preset" dev 1
  mk "Dataset52$((n + 1))_Camus220Target_${p}" "$preset" target 2
  n=$((n + 2))
done
mk Dataset530_Camus220Target none target 0
for pair in 521:Dataset528_Camus220Dev_foreign 530:Dataset529_Camus220Target_foreign \
            521:Dataset531_Camus220Dev_beam 530:Dataset532_Camus220Target_beam; do
  from=$(ls -d "$OUT"/Dataset${pair%%:*}_*/ | head -n 1)
  name=${pair#*:}
  [ -f "$OUT/$name/dataset.json" ] || .venv/bin/python results/camus220/foreign_shift.py "$from" "$OUT/$name" "${name##*_}"
done
ls "$OUT"
