#!/usr/bin/env bash
# The A/Bs that choose the engine's defaults, in one device call (<10 min on one H200/H100), run
# before `bench/run_issue4.sh`: `bench/run_ab.sh RESULTS_DIR`. Needs the package importable and
# REX_SHARED. Each step under its own time limit:
#   1. fusions (GELU epilogue, split-bf16 head, fused rotary): each alone and together, ner
#   2. scheduling (admission on/off, the planner's per-batch cost), ner/re/mix
#   3. precision of the default fast path against our fp32 path (tiny golden cases, base mix cases)
#   4. worker path (engine server, no broker) against the bare engine, ner
#   5. a kernel profile of the engine on ner
set -uo pipefail
res=$1
source bench/device_prologue.sh "$res"

timeout 130 $py bench/fusion_ab.py "$base" 20000 2>&1 | tee "$res/fusion_ab.jsonl" | cut -c1-300
timeout 160 $py bench/scheduler_ab.py "$base" 20000 2>&1 | tee "$res/scheduler_ab.jsonl" | cut -c1-300
bash bench/precision_pair.sh "$res" "$base" triton
timeout 100 $py -m rex_stream.bench.worker_path --model "$base" --workload ner --messages 20000 --device cuda \
    --attention triton --out "$res/worker-path-ner.json" | grep -E "msgs_s|ratio|in_flight"
timeout 45 $py bench/profile_engine.py "$base" ner triton 8192 > "$res/profile-ner-triton.txt" 2>&1
head -4 "$res/profile-ner-triton.txt"
