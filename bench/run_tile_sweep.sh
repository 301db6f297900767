#!/usr/bin/env bash
# The attention tile-policy sweep on the device: `bench/run_tile_sweep.sh RESULTS_DIR PREVIOUS.py [N]`
# (PREVIOUS.py: an earlier rex_stream/engine/triton_attention.py, e.g. from `git show`, with its custom
# op renamed: `sed -i "s/rex_stream::disentangled_attention\"/rex_stream::disentangled_attention_prev\"/"`).
set -uo pipefail
res=$1
source bench/device_prologue.sh "$res"
timeout ${REX_T_SWEEP:-540} $py bench/tile_sweep.py "$2" "$base" "${3:-20000}" 2>&1 | tee "$res/tile_sweep.jsonl" \
    | grep -E "derived_policy|n_regs|\"workload\": \"[a-z]+\", \"variant\"|Error|error" | tail -40
