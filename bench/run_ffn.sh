#!/usr/bin/env bash
# The "gelu" fusion on the device: `bench/run_ffn.sh RESULTS_DIR [N]`: the TMA GEMM + GELU sweep and
# engine A/B (`bench/ffn_sweep.py`), then the bf16 fast path's precision against fp32 with the fusion on.
set -uo pipefail
res=$1
source bench/device_prologue.sh "$res"
timeout ${REX_T_FFN:-400} $py bench/ffn_sweep.py "$base" "${2:-20000}" 2>&1 | tee "$res/ffn_sweep.jsonl" \
    | grep -E '"best"|"n_regs"|"workload"|cublas|Error|error' | tail -60
bash bench/precision_pair.sh "$res" "$base" triton gelu,head,rotary
