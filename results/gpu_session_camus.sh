#!/usr/bin/env bash
# One GPU session: engine benchmark (bf16) + bare-torch ceiling + real-CAMUS adaptation and evaluation.
# On the device: bash .gpu/run.sh      Rehearsal on CPU here: REHEARSE=1 bash .gpu/run.sh
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
R=/tmp/gpu_runs; rm -rf "$R"; mkdir -p "$R"
exec > >(tee "$OUT/log.txt") 2>&1   # whatever happens, the log comes back
T0=$(date +%s)
stamp() { echo "=== [$(( $(date +%s) - T0 )) s] $*"; }
if [ -z "${REHEARSE:-}" ]; then
  stamp install
  mkdir -p /tmp/site && tar xJf .gpu/sitk.tar.xz -C /tmp/site || exit 3
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl || exit 3
  export PYTHONPATH=/tmp/site PYTHONSAFEPATH=1   # the checkout's rl_adapt/ must not shadow the installed package
  PY=python3; DEV=cuda; BENCH="--size 256 --batch 32 --features 32,64,128,256,512,512,512 --reps ${BENCH_REPS:-5} --device cuda"
  nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv
else
  PY=/work/main/.venv/bin/python; DEV=cpu; BENCH="--size 64 --batch 2 --features 8,16,32 --reps 1 --device cpu"
fi
$PY -c "import torch, SimpleITK, nnunetv2, stable_baselines3, gymnasium, rl_adapt; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')" || exit 4
RL="$PY -m rl_adapt.cli"
C=.gpu/camus; M=$(ls -d $C/model/*/*/ | head -1)
$PY .gpu/split_expert.py $C/Dataset512_CamusValBlur blur && $PY .gpu/split_expert.py $C/Dataset51l_CamusVal_lowgain lowgain || exit 5
stamp "engine benchmark"
timeout 120 $PY -m rl_adapt.benchmarks.engine $BENCH 2>&1 | tee "$R/bench_engine.log"
# variant = target:name:overrides ; expert variants also read <target>_expert10 (10 of the 50 patients)
VARIANTS=${VARIANTS:-"blur:A: blur:B:correction_reward_weight=0.0 blur:C:keep_if_closer=false blur:E:expert lowgain:A: lowgain:E:expert"}
stamp "adapt $VARIANTS (in parallel: the small-plan net leaves the GPU mostly idle)"
PIDS=""
for VV in $VARIANTS; do
  TG=${VV%%:*}; REST=${VV#*:}; V=${REST%%:*}; O=${REST#*:}
  case $TG in blur) T=$C/Dataset512_CamusValBlur ;; lowgain) T=$C/Dataset51l_CamusVal_lowgain ;; esac
  SETS="--set threads=2"; EXTRA=""
  for TOK in ${O//,/ }; do
    if [ "$TOK" = expert ]; then EXTRA="--expert $C/${TG}_expert10"; else SETS="$SETS --set $TOK"; fi
  done
  [ -n "${REHEARSE:-}" ] && SETS="$SETS --set device=cpu --set threads=1 --set iterations=1 --set ppo_images_per_iteration=16 --set reward.steps=10 --set reward.features=4 --set reward.depth=2 --set ppo.n_envs=4 --set ppo.batch_size=4 --set ppo.n_steps=2 --set rollout.batch_size=8 --set ppo.bf16=false"
  ( timeout ${ADAPT_TIMEOUT:-260} $RL adapt --model "$M" --target $T --shape-prior $C/shape_prior.pt $EXTRA --out "$R/${TG}_$V" \
     --config configs/adapt_gpu_camus.yaml $SETS --no-progress > "$R/${TG}_$V.log" 2>&1; echo "$TG $V exit $?" ) &
  PIDS="$PIDS $!"
done
wait $PIDS   # a bare `wait` would also wait for the tee of the log (never ends)
for VV in $VARIANTS; do TG=${VV%%:*}; REST=${VV#*:}; V=${REST%%:*}; echo "--- adapt ${TG}_$V"; grep -E "Error|error|Traceback|iter[0-9]/(correct|ppo)|WARNING|adapted model" "$R/${TG}_$V.log" | cut -c1-300; done
stamp evaluate
PIDS=""
for TG in ${EVAL_TARGETS:-blur lowgain}; do
  case $TG in blur) T=$C/Dataset512_CamusValBlur ;; lowgain) T=$C/Dataset51l_CamusVal_lowgain ;; esac
  MODELS="--model source=$M"
  for F in $(ls -d $R/${TG}_*/model/*/*/ 2>/dev/null); do N=${F#$R/${TG}_}; MODELS="$MODELS --model rl_${N%%/*}=$F"; done
  ( timeout 100 $RL evaluate $MODELS --data ${T}_Test40 --out "$R/eval_${TG}_test40" $( [ -d "$R/${TG}_A" ] && echo --reward "$R/${TG}_A" ) --device $DEV --workers 4 --no-progress > "$R/eval_${TG}_test40.log" 2>&1
    timeout 100 $RL evaluate $MODELS --data $T --out "$R/eval_${TG}_all" --device $DEV --workers 4 --no-progress --no-report > "$R/eval_${TG}_all.log" 2>&1 ) &
  PIDS="$PIDS $!"
done
wait $PIDS
for f in $R/eval_*.log; do echo "--- $f"; grep -v "^INFO" $f | tail -12; done
if [ -z "${REHEARSE:-}${NO_CEILING:-}" ]; then
  stamp "bare-torch ceiling (shared/bench/gpu_ceiling.py)"
  timeout 60 python3 .gpu/gpu_ceiling.py 2>&1 | tee "$R/gpu_ceiling.log"
fi
stamp pack
( cd "$R" && tar czf "$OUT/runs.tgz" --exclude='*.pt' --exclude='*.pth' --exclude='rollout.npz' --exclude='overlays.npz' . )
ls -la "$OUT"; stamp done
