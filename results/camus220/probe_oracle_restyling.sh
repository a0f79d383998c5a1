#!/usr/bin/env bash
# How much of the gap is the restyling's? A ceiling with the true scanner (never available to a user): the source
# patients seen through the target vendor itself (rl-adapt shift, other random draws than dev and target), half of
# them mixed into the source set in place of their original images (the share the engine restyles), then the
# styled-source baseline and the RL loop on that set with no further restyling (styled_fraction 0, one draw).
# Everything else is the committed recipe; the difference to the label-free runs is what a perfect restyling
# would add. Usage (the venv, the data of prepare.sh, the source model of run.sh):
#   results/camus220/probe_oracle_restyling.sh PRESET SOURCE_MODEL DATA OUT [SHAPE_PRIOR]
#   PRESET: blur, lowgain, shadow (rl-adapt shift, seed 3), or foreign, beam (foreign_shift.py on the source set);
#   STAGES=baseline runs the baseline alone (default: the baseline and the RL loop)
# then score OUT/PRESET/{baseline,rl} beside the label-free models with rl-adapt evaluate (dev patients or target).
set -euo pipefail
cd "$(dirname "$0")/../.."
P=${1:?preset: blur, lowgain or shadow}; M=${2:?source model folder}; DATA=${3:?prepare.sh output}
OUT=${4:?output folder}; PRIOR=${5:-}
RL=${RL:-.venv/bin/rl-adapt}
C=${CAMUS:-../shared/data/Dataset501_CAMUS224}
n=$(case $P in blur) echo 23;; lowgain) echo 25;; shadow) echo 27;; foreign) echo 29;; beam) echo 32;;
      *) echo "unknown preset $P" >&2; exit 2;; esac)
TARGET=$(ls -d "$DATA"/Dataset5${n}_Camus220Target_$P)
TRUE=$OUT/Dataset6${n}_Camus220Source_$P
HALF=$OUT/Dataset7${n}_Camus220SourceHalf_$P
mkdir -p "$OUT/$P"
if [ ! -f "$TRUE/dataset.json" ]; then
  case $P in
    foreign|beam) "${PYTHON:-.venv/bin/python}" results/camus220/foreign_shift.py "$DATA/Dataset520_Camus220Source" \
                    "$TRUE" "$P" ;;
    *) "$RL" shift --data "$C" --preset "target-$P" --repair-labels --split-file "$C/splits_camus220.json" \
         --split source --seed 3 --out "$TRUE" --no-progress ;;
  esac
fi
if [ ! -f "$HALF/dataset.json" ]; then  # each source case from the true-vendor set with probability 1/2 (seeded)
  "${PYTHON:-.venv/bin/python}" - "$DATA/Dataset520_Camus220Source" "$TRUE" "$HALF" <<'EOF'
import json, os, random, sys
src, true, half = sys.argv[1:4]
os.makedirs(f"{half}/imagesTr"); os.makedirs(f"{half}/labelsTr")
rng = random.Random(0)
for f in sorted(os.listdir(f"{src}/imagesTr")):
    case = f[: -len("_0000.nii.gz")]
    use = true if rng.random() < 0.5 else src   # the shifted label goes with the shifted image (geometry)
    os.symlink(os.path.abspath(f"{use}/imagesTr/{f}"), f"{half}/imagesTr/{f}")
    os.symlink(os.path.abspath(f"{use}/labelsTr/{case}.nii.gz"), f"{half}/labelsTr/{case}.nii.gz")
meta = json.load(open(f"{src}/dataset.json"))
json.dump(dict(meta, name=os.path.basename(half)), open(f"{half}/dataset.json", "w"), indent=2)
EOF
fi
[ -f "$OUT/$P/baseline/baseline_history.json" ] || "$RL" baseline --method styled-source --model "$M" \
    --target "$TARGET" --source-data "$HALF" --out "$OUT/$P/baseline" --config configs/baseline_cpu_camus.yaml \
    --set styled.styled_fraction=0 --no-progress --resume
[ "${STAGES:-all}" = baseline ] && exit 0
"$RL" adapt --model "$M" --target "$TARGET" --source-data "$HALF" ${PRIOR:+--shape-prior "$PRIOR"} \
    --config configs/adapt_cpu_camus.yaml --set source_teacher.pairs.styled_fraction=0 --set source_teacher.draws=1 \
    --out "$OUT/$P/rl" --no-progress $([ -d "$OUT/$P/rl" ] && echo --resume)
