#!/usr/bin/env bash
# The served layout's start-up fill (BENCHMARKS run 17 call 6): `bench/run_ramp_ab.sh RESULTS_DIR`.
#   1. `multiproc --device-server` on ner (60,000 messages, 4 host processes, chunks of 5,000), the
#      hosts' first calls ramped (chunk / 8, / 4, / 2) and not, alternating -> RESULTS_DIR/ramp_ab.jsonl
#   2. the bench on ner with 60,000 and with 200,000 messages (0 and 4 host processes)
set -uo pipefail
res=$(realpath -m "$1")
source bench/device_prologue.sh "$res"
for pass in 1 2; do
    for ramp in "" "--no-ramp"; do
        timeout 100 $py -m rex_stream.bench.multiproc --model "$base" --workload ner --messages 60000 --procs 4 \
            --device-server --chunk 5000 --batch-tokens 131072 --attention triton --warmup 512 $ramp \
            --out "$res/run.json" >/dev/null && $py -c "import json,sys; r=json.load(open(sys.argv[1])); \
print(json.dumps(r, separators=(',', ':')))" "$res/run.json" | tee -a "$res/ramp_ab.jsonl" \
            | $py -c "import json,sys; r=json.loads(sys.stdin.read()); print('ramp', r['ramp'], round(r['rows'][0]['msgs_s'], 1))"
    done
done
rm -f "$res/run.json"
mkdir -p "$res/ner60k" "$res/ner200k"
REX_T_BENCH=${REX_T_BENCH60:-90} bash bench/run_served.sh "$res/ner60k" ner 60000 0,4 | tail -4
REX_T_BENCH=${REX_T_BENCH200:-240} bash bench/run_served.sh "$res/ner200k" ner 200000 0,4 | tail -4
