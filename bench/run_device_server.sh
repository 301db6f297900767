#!/usr/bin/env bash
# The device-server layout against the one-process engine, in one device call (<10 min on one GPU):
# `bench/run_device_server.sh RESULTS_DIR`. Same card, same host, same base-size random model:
#   1. golden cases in fp32 through a device process (exact equality on this card)
#   2. ner: engine processes sharing the card (1, 3), then 1-6 host processes with one device process
#   3. re and mix: one engine process against host processes with one device process
set -uo pipefail
res=$1
py=${PYTHON:-python3}
base=${REX_BENCH_BASE:-/tmp/rex-random-base}
mp="$py -m rex_stream.bench.multiproc --model $base --batch-tokens 131072 --chunk 100000 --attention triton"
export PYTHONUNBUFFERED=1
bash bench/device_prologue.sh "$res"
timeout 60 $py bench/golden_gpu.py triton served | tee "$res/golden-served.txt"
timeout 120 $mp --workload ner --procs 1,3 --out "$res/ner-engines.json"
timeout 200 $mp --workload ner --procs ${REX_DS_PROCS:-1,2,3,4,6} --device-server --out "$res/ner-served.json"
timeout 60 $mp --workload re --procs 1 --out "$res/re-engines.json"
timeout 90 $mp --workload re --procs 3,5 --device-server --out "$res/re-served.json"
timeout 60 $mp --workload mix --messages 4000 --procs 1 --out "$res/mix-engines.json"
timeout 90 $mp --workload mix --messages 4000 --procs 4 --device-server --out "$res/mix-served.json"
