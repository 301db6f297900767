#!/usr/bin/env bash
# The planner's cost per batch and the engine-call size in the host processes of the device-server
# layout (`python -m rex_stream.bench.multiproc --device-server`), alternating, on one card:
# `bench/run_served_ab.sh RESULTS_DIR` -> RESULTS_DIR/served_ab.jsonl (one JSON object per run).
set -uo pipefail
res=$1
source bench/device_prologue.sh "$res"
run() {  # workload messages procs chunk cost
    timeout 120 $py -m rex_stream.bench.multiproc --model "$base" --workload "$1" --messages "$2" --procs "$3" \
        --device-server --chunk "$4" --batch-cost "$5" --batch-tokens 131072 --attention triton --warmup 512 \
        --out "$res/run.json" >/dev/null && $py -c "import json,sys; r=json.load(open(sys.argv[1])); \
print(json.dumps(r, separators=(',', ':')))" "$res/run.json" | tee -a "$res/served_ab.jsonl" \
        | $py -c "import json,sys; r=json.loads(sys.stdin.read()); print(r['workload'], r['chunk'], r['batch_cost'], \
round(r['rows'][0]['msgs_s'], 1), 'padding', round(r['rows'][0]['padding'], 3))"
}
for pass in 1 2; do
    for variant in "5000 16384" "5000 4096" "5000 2048" "15000 2048" "2500 2048"; do
        run ner 60000 4 $variant
    done
done
for pass in 1 2; do
    for cost in 16384 2048; do run mix 4000 8 1024 $cost; done
done
rm -f "$res/run.json"
