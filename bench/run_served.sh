#!/usr/bin/env bash
# Issue 4's bench with (c) also served from the bench's own process (`rex-stream bench --host-processes`):
# `bench/run_served.sh RESULTS_DIR [WORKLOADS] [MESSAGES] [HOST_PROCESSES]`, e.g. `... DIR re 20000 0,4`.
# One budget (131,072: the engine's default), bf16, Triton attention; (a) on 60 messages.
set -uo pipefail
res=$1
workloads=${2:-ner,mix}
messages=${3:-20000,4000}
hosts=${4:-0,4,8}
source bench/device_prologue.sh "$res"
timeout ${REX_T_BENCH:-540} $py -m rex_stream.cli bench --workload "$workloads" --messages "$messages" \
    --model "$base" --device cuda --budgets 131072 --baseline-a-messages 60 --agreement-messages 300 \
    --warmup-messages 2048 --host-processes "$hosts" --host-chunk "${REX_HOST_CHUNK:-5000}" \
    --engine-kwargs '{"attention": "triton"}' --out "$res" 2>&1 | tee "$res/log.txt" \
    | grep -E "^\[bench|engine best|^\(|Error|error" | tail -40
