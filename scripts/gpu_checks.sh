#!/usr/bin/env bash
# Every GPU measurement the open issues ask for, as one prepared run: under 9 minutes on one
# H100/H200 (give the device tool timeout_s 600):
#   1. kernels: bench_kernels.py (issue 8)            2. prefill/decode vs oracle, full depth bf16 (issue 10)
#   3. scoring overhead of the real towers             4. memory with device_map (none, auto)
#   5. VAR / VHR cost at full depth
# Each step has its own time limit and writes under $OUT (default ./gpu_results), so a slow step
# cannot take the others' results with it.  Usage, from the repository root on the GPU machine:
#   OUT=/some/dir bash scripts/gpu_checks.sh
# Needs torch with CUDA, transformers >= 5.18, triton (all in the device image); vtprune is
# installed here in editable mode without dependencies.
set -u
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}

step() {  # step NAME SECONDS COMMAND...: run with a limit, log to $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s): $*"
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "=== $name: exit $? after $((SECONDS - start))s"
  tail -n 30 "$OUT/$name.log"
}

$PY -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
  $PY -m vtprune.cli info; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

step kernels 75 $PY scripts/bench_kernels.py --out "$OUT/kernels.md"
step prefill 240 $PY scripts/bench_prefill.py --device cuda --dtype bfloat16 --full-depth \
  --keep 1.0,0.25,0.11,0.05 --methods random,fastervlm,fastv,exit --repeats 5 --decode-tokens 16 --out "$OUT/prefill"
step scoring 45 $PY scripts/bench_scoring.py --device cuda --towers clip,internvit,qwen
step memory 75 $PY scripts/bench_memory.py --device cuda --dtype bfloat16 --device-map none,auto \
  --llm-layers 2 --vision-layers 24 --repeats 3
step attention 60 $PY scripts/bench_attention.py --device cuda --dtype bfloat16 --llm-layers 32 --vision-layers 24
echo "=== done in ${SECONDS}s"
