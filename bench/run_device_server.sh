#!/usr/bin/env bash
# The device-server layout's figures in one device call (<10 min on one GPU):
# `bench/run_device_server.sh RESULTS_DIR`. Same card, same host, same base-size random model:
#   1. golden cases in fp32 through a device process (exact equality on this card; into gpu.txt)
#   2. `rex-stream bench` ner and mix (baselines (a), (b) and the one-process engine, in one process)
#   3. ner: one engine process, then host processes with one device process (REX_DS_PROCS)
#   4. mix: host processes with one device process (REX_DS_MIX_PROCS)
set -uo pipefail
res=$1
source bench/device_prologue.sh "$res"
mp="$py -m rex_stream.bench.multiproc --model $base --batch-tokens 131072 --attention triton"
timeout 60 $py bench/golden_gpu.py triton served | tee -a "$res/gpu.txt"
timeout ${REX_T_BENCH:-240} $py -m rex_stream.cli bench --workload ner,mix --messages 20000,4000 --model "$base" \
    --device cuda --budgets 131072 --baseline-a-messages 60 --agreement-messages 300 --warmup-messages 2048 \
    --engine-kwargs '{"attention": "triton"}' --out "$res" 2>&1 | grep -E "^\[bench|engine best|^\(" | tail -20
timeout 60 $mp --workload ner --messages ${REX_DS_NER:-60000} --procs 1 --chunk 100000 --out "$res/ner-engine.json"
timeout 150 $mp --workload ner --messages ${REX_DS_NER:-60000} --procs ${REX_DS_PROCS:-4,6} --chunk 5000 \
    --device-server --out "$res/ner-served.json"
timeout 120 $mp --workload mix --messages 4000 --procs ${REX_DS_MIX_PROCS:-6,8} --device-server \
    --out "$res/mix-served.json"
