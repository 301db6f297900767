#!/usr/bin/env bash
# Every issue-4 figure in one device call (<10 min on one H100): `bench/run_issue4.sh RESULTS_DIR`.
# Needs the package importable and REX_SHARED (rex/tiny-random, rex/golden, rex/data). Steps, most
# important first, each under its own time limit so one slow step cannot lose the others:
#   1. rex-stream bench ner,re,mix (one process; engine = bf16 + triton attention, budgets REX_BENCH_BUDGETS)
#   2. precision of that engine path against our fp32 path (tiny golden cases, base-model mix cases)
#   3. worker path (no broker) against the bare engine, ner
#   4. a kernel profile of the engine on ner
set -uo pipefail
res=$1
attention=${REX_BENCH_ATTENTION:-triton}
source bench/device_prologue.sh "$res"

timeout ${REX_T_BENCH:-360} $py -m rex_stream.cli bench --workload ner,re,mix \
    --messages "${REX_BENCH_MESSAGES:-20000,20000,4000}" --model "$base" --device cuda --budgets "${REX_BENCH_BUDGETS:-65536}" \
    --baseline-a-messages 60 --agreement-messages 300 --warmup-messages ${REX_BENCH_WARMUP:-2048} --engine-kwargs "{\"attention\": \"$attention\"${REX_BENCH_ADMIT:+, \"admit_batches\": $REX_BENCH_ADMIT}}" \
    --out "$res" 2>&1 | grep -vE "^\s*$" | grep -E "^\[bench|engine best|^\(" | tail -30

bash bench/precision_pair.sh "$res" "$base" "$attention"
timeout 75 $py -m rex_stream.bench.worker_path --model "$base" --workload ner --messages 20000 --device cuda \
    --attention "$attention" --out "$res/worker-path-ner.json" | grep -E "msgs_s|ratio"
timeout 45 $py bench/profile_engine.py "$base" ner "$attention" 8192 > "$res/profile-ner-$attention.txt" 2>&1
head -4 "$res/profile-ner-$attention.txt"
