#!/usr/bin/env bash
# The exact-GELU fusion's figures in one device call: `bench/run_gelu.sh RESULTS_DIR`.
#   1. the intermediate dense + GELU alone: unfused, tanh epilogue, Triton tile configurations
#   2. fusion A/B on the engine, same process (kernel ms per 1,000 ner messages, logit differences)
#   3. precision against our fp32 path with the default fusions and with every fusion
set -uo pipefail
res=$1
py=${PYTHON:-python3}
base=${REX_BENCH_BASE:-/tmp/rex-random-base}
export PYTHONUNBUFFERED=1
bash bench/device_prologue.sh "$res"
timeout 120 $py bench/ffn_sweep.py | tee "$res/ffn_sweep.jsonl"
timeout 150 $py bench/fusion_ab.py "$base" 20000 | tee "$res/fusion_ab.jsonl"
bash bench/precision_pair.sh "$res" "$base" triton
bash bench/precision_pair.sh "$res" "$base" triton gelu,head,rotary
