#!/usr/bin/env bash
# One device call: kernel micro-benchmark, golden check of the fused path, then `rex-stream bench`
# for sdpa and triton engines, and the worker path. Usage: bench/gpu_probe.sh OUT_DIR [MESSAGES_RE]
# Expects the package importable and REX_SHARED set (see bench/run_gpu.sh); golden as `bench/golden_gpu.py`.
set -uo pipefail
out=$1
re_messages=${2:-10000}
source bench/device_prologue.sh "$out"
for shape in 64x128 16x512; do
    timeout 120 $py -m rex_stream.engine.fast_attention --device cuda --size base --batch "${shape%x*}" --lengths "${shape#*x}" \
        --dtypes bf16 --cases sdpa,triton --repeats 10 2>&1 | tail -6 | tee -a "$out/kernel.txt"
done
timeout 120 $py bench/golden_gpu.py triton 2>&1 | tail -1 | tee -a "$out/kernel.txt"
for attention in ${REX_PROBE_ATTENTION:-sdpa triton}; do
    mkdir -p "$out/$attention"
    timeout 280 $py -m rex_stream.cli bench --workload ner,re --messages "20000,$re_messages" --model "$base" \
        --device cuda --budgets 65536 --baseline-a-messages 60 --agreement-messages 300 \
        --engine-kwargs "{\"attention\": \"$attention\"}" --out "$out/$attention" 2>&1 | grep -E "^\S*\(|msg/s|FAILED|Error" | tail -14
done
timeout 120 $py -m rex_stream.bench.worker_path --model "$base" --workload ner --messages 20000 --device cuda \
    --attention "${REX_PROBE_WORKER_ATTENTION:-triton}" --out "$out/worker-path-ner.json" 2>&1 | tail -12
