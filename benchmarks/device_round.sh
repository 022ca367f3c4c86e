#!/usr/bin/env bash
# The GPU measurements issues 23 and 24 wait on, in calls of under 10 minutes each on the device machine, run from
# the repo root after benchmarks/smollm2_device.sh's set-up calls (wheels .whl, wheels .whlb, the GGUF parts):
#
#   bash benchmarks/device_round.sh pack     # benchmarks/pack.py: every product path (auto, loop, bmm, masked; PRODUCTS)
#                                            # side by side, SmolLM2 and the 1.1B shape at 512; 1.1B at 2048
#   bash benchmarks/device_round.sh pack_135m  # the same at 512 on SmolLM2-135M's shape, random init (no GGUF needed)
#   bash benchmarks/device_round.sh graphs   # the `gpu` tests of tests/test_pack_graphs.py, then benchmarks/pack.py
#                                            # --graphs (captured steps beside steps as they come): 135M shape, k = 1,
#                                            # 2, 4, 8 at 512; 1.1B shape, k = 4 at 512 (KS_1B)
#   bash benchmarks/device_round.sh heads    # the `gpu` tests of tests/test_pack_graphs.py under each pack.HEAD_LOSS,
#                                            # then pack.py --graphs timing the other beside the default (135M, k = 4)
#   bash benchmarks/device_round.sh speed    # benchmarks/speed.py, the 8B r16 headline: the trial path (ATTN=sdpa)
#                                            # (+two-node: LoRA layers on autograd's graph, NOTES.md change 20)
#                                            # beside HF PEFT and + Liger (EXTRA=--no-liger-reference skips it)
#   bash benchmarks/device_round.sh varlen   # benchmarks/speed.py --varlen: TRL, padded, length-grouped, torch_varlen,
#                                            # auto (PATHS=...,flex adds flex attention; HF PEFT + Liger left out:
#                                            # measured, 2,359 tokens/s). GPU_TESTS=1 runs tests/test_varlen.py's
#                                            # `gpu` tests first
#   bash benchmarks/device_round.sh idle     # the trial path alone, 8B fixed-length and varlen length-grouped, for
#                                            # its profiles: kernels and where the GPU waited on the host (idle_*.txt)
#   bash benchmarks/device_round.sh pack_sweep  # benchmarks/pack_sweep.py: 16 trials of the 1.1B shape, ASHA, packed 4
#                                            # to the GPU, then 4 solo sharing it: wall time, endings, frontier (only
#                                            # .whl carried: random base, no golden sets, MLflow off); SHAPE=135m,
#                                            # HOSTS=4 (4 hosts of 4 against 16 solo), TRIALS=32, STEPS=240,
#                                            # ORDER=packed,solo,eager (eager: packed without graphs)
#   bash benchmarks/device_round.sh sweep    # sweeps/smollm2.py packed 4 to a GPU, then solo: wall time and
#                                            # frontier (each stopped with SIGINT at half the call; rerun resumes)
#
# Everything lands in $OUT (JSON per benchmark, one log per step). The GGUF must be in place for `pack` and `sweep`
# (smollm2_device.sh's last part call puts it there); `speed` and `varlen` build random-init shapes.
set -u
export PYTHONPATH=$PWD:/tmp/site HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export LORA_SEARCH_CACHE=/tmp/lscache
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
T0=$SECONDS
LIMIT=${LIMIT:-570}
left() { echo $(( LIMIT - (SECONDS - T0) )); }
step() {  # step NAME CMD...: CMD with the call's time left (SIGINT, then a kill), its log in $OUT/NAME.log
  local name=$1; shift; local rest; rest=$(left)
  [ "$rest" -lt 45 ] && { echo "skip $name: $rest s left"; return; }
  echo "== $name ($rest s left): $*"
  timeout -k 20 -s INT "$rest" "$@" > "$OUT/$name.log" 2>&1
  echo "   rc $? after $(( SECONDS - T0 )) s"; grep -v -i warn "$OUT/$name.log" | tail -6 | cut -c1-400
}

case "${1:-}" in
pack | pack_smollm2 | pack_1b | pack_135m)  # `pack` runs all three; pack_smollm2 (needs the GGUF) and pack_1b (random init) split them
  # PRODUCTS: the product paths timed beside auto (all four took 245 s of a call for k = 1, 2, 4 on the 1.1B shape)
  products=${PRODUCTS:-auto,loop,bmm,masked}
  # PACK_PROFILE=1: each profiled step's kernel and idle tables (pack.py --profile), in $OUT/pack_profiles.tgz
  profile=(); [ -n "${PACK_PROFILE:-}" ] && profile=(--profile /tmp/pack_profiles)
  [ "$1" != pack_1b ] && [ "$1" != pack_135m ] && step pack_smollm2_512 python benchmarks/pack.py --device cuda --base smollm2 --seq 512 \
    --products "$products" --out "$OUT/pack_smollm2_512.json"
  [ "$1" = pack_smollm2 ] && exit 0
  if [ "$1" = pack_135m ]; then  # SmolLM2-135M's shape, random init: no GGUF, no set-up calls
    step pack_135m_512 python benchmarks/pack.py --device cuda --base 135m --seq 512 --products "$products" \
      --out "$OUT/pack_135m_512.json" "${profile[@]}"
    [ -d /tmp/pack_profiles ] && (cd /tmp && tar czf "$OUT/pack_profiles.tgz" pack_profiles)
    exit 0
  fi
  step pack_1b_512 python benchmarks/pack.py --device cuda --base 1b --seq 512 --products "$products" \
    --out "$OUT/pack_1b_512.json" "${profile[@]}"
  # not checkpointed, as the solo trials it is set against (session 13: checkpointed, the k <= 4 packs peaked at 3.8-7.4
  # GB against solo's 9.7-15.4, so they fit without)
  step pack_1b_2048 python benchmarks/pack.py --device cuda --base 1b --seq 2048 --bs 4 --ks 1 2 4 \
    --products "$products" --out "$OUT/pack_1b_2048.json"
  [ -d /tmp/pack_profiles ] && (cd /tmp && tar czf "$OUT/pack_profiles.tgz" pack_profiles)
  ;;
graphs)
  step gpu_tests python -m pytest -q -m gpu tests/test_pack_graphs.py -p no:cacheprovider
  # PACK_PROFILE=1: the 1.1B row's kernel and idle tables, eager and captured, in $OUT/pack_profiles.tgz
  profile=(); [ -n "${PACK_PROFILE:-}" ] && profile=(--profile /tmp/pack_profiles)
  step pack_135m_graphs python benchmarks/pack.py --device cuda --base 135m --seq 512 --ks ${KS_135M:-1 2 4 8} \
    --products auto --graphs --out "$OUT/pack_135m_512_graphs.json"
  step pack_1b_graphs python benchmarks/pack.py --device cuda --base 1b --seq 512 --ks ${KS_1B:-4} --products auto \
    --graphs --out "$OUT/pack_1b_512_graphs.json" "${profile[@]}"
  [ -d /tmp/pack_profiles ] && (cd /tmp && tar czf "$OUT/pack_profiles.tgz" pack_profiles)
  ;;
heads)  # the `gpu` tests of tests/test_pack_graphs.py under each HEAD_LOSS, then pack.py timing the other one
  step gpu_tests python -m pytest -q -m gpu tests/test_pack_graphs.py -p no:cacheprovider
  other=$(python -c 'from lora_search import pack; print({"fused": "checkpointed"}.get(pack.HEAD_LOSS, "fused"))')
  step "gpu_tests_$other" python -c "import sys, pytest; from lora_search import pack; pack.HEAD_LOSS = '$other'; \
sys.exit(pytest.main(['-q', '-m', 'gpu', 'tests/test_pack_graphs.py', '-p', 'no:cacheprovider']))"
  step pack_135m_heads python benchmarks/pack.py --device cuda --base 135m --seq 512 --ks 4 --products auto --graphs \
    --head-loss "$other" --out "$OUT/pack_135m_512_heads.json"
  ;;
speed)
  # ATTN: the trial paths (+two-node measured no gain, NOTES.md change 20); EXTRA: e.g. --no-liger-reference
  step speed_8b python benchmarks/speed.py --out "$OUT/speed" --work /tmp/w --configs 8b:16 --bs 2 --accum 4 \
    --steps 16 --attn "${ATTN:-sdpa}" ${EXTRA:-}
  ;;
idle)  # no references: each trial's figure is indicative only; ratios come from `speed` and `varlen`
  step idle_8b python -c "
import json, sys; sys.path.insert(0, 'benchmarks'); import speed; from pathlib import Path
r = speed.ours('8b', 16, 2048, 2, 16, Path('/tmp/w'), accum=4)
for k in ('idle', 'kernel'): Path('$OUT/' + k + '_lora_search_8b_r16_sdpa.txt').write_text(r.pop(k + '_profile') or '')
print(json.dumps(r))"
  grep -v "^ " "$OUT/idle_lora_search_8b_r16_sdpa.txt" 2>/dev/null | head -14 | cut -c1-250
  step idle_varlen python benchmarks/speed.py --out "$OUT/varlen" --work /tmp/w --varlen --configs 8b:16 --bs 2 \
    --accum 4 --steps 16 --paths grouped
  head -14 "$OUT"/varlen/idle_*grouped* 2>/dev/null | cut -c1-250
  ;;
varlen)
  [ -n "${GPU_TESTS:-}" ] && step gpu_tests_varlen python -m pytest -q -m gpu -p no:cacheprovider tests/test_varlen.py
  step varlen_8b python benchmarks/speed.py --out "$OUT/varlen" --work /tmp/w --varlen --configs 8b:16 --bs 2 \
    --accum 4 --steps 16 --paths "${PATHS:-trl,padded,grouped,varlen,auto}"
  ;;
pack_sweep)
  step pack_sweep python benchmarks/pack_sweep.py --shape "${SHAPE:-1b}" --seq 512 --pack "${PACK:-4}" \
    --bs "${BS:-8}" --hosts "${HOSTS:-1}" --trials "${TRIALS:-16}" --steps "${STEPS:-60}" --order "${ORDER:-packed,solo}" \
    --work /tmp/pack_sweep --out "$OUT"
  # the host journals: where each host's time went (load, attaches, steps, graph replays)
  (cd /tmp/pack_sweep && find . -name "pack_host_*.jsonl" | tar czf "$OUT/journals.tgz" -T -) 2>/dev/null
  ;;
sweep)
  export LORA_SEARCH_OUTPUT_DIR=/tmp/reports  # smollm2-pack4/ and smollm2/ (the solo sweep took 254 s, 2026-12-04)
  half=$(( ($(left) - 30) / 2 ))
  LIMIT=$(( SECONDS - T0 + half )) step sweep_packed env SMOLLM2_PACK=4 python sweeps/smollm2.py
  step sweep_solo python sweeps/smollm2.py
  (cd /tmp/reports && find smollm2-pack4 smollm2 -maxdepth 2 -type f -size -20M -not -path "*/ray/*" \
     -not -path "*/adapters/*" | tar czf "$OUT/sweeps.tgz" -T -) && ls -l "$OUT"
  ;;
*)
  echo "usage: bash benchmarks/device_round.sh pack|pack_smollm2|pack_1b|pack_135m|graphs|heads|speed|varlen|idle|pack_sweep|sweep" >&2
  exit 2
  ;;
esac
if [ -n "${LORA_SEARCH_PROFILE_TRACE:-}" ]; then  # the kept Chrome traces, for Perfetto
  find /tmp/w -name "*.json*" -path "*profile_*" -newer "$0" 2>/dev/null | tar czf "$OUT/traces_$1.tgz" -T - 2>/dev/null
fi
nvidia-smi --query-gpu=name,memory.used --format=csv 2>/dev/null
