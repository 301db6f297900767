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
py=${PYTHON:-python3}
shared=${REX_SHARED:-../shared}
base=${REX_BENCH_BASE:-/tmp/rex-random-base}
export PYTHONUNBUFFERED=1
mkdir -p "$res"
[[ -f $base/config.json ]] || $py -m rex_stream.cli model random --out "$base" --size base --seed 0 \
    --vocab "$shared/rex/tiny-random/vocab.txt" >/dev/null
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$res/gpu.txt"
$py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$res/gpu.txt"

timeout 130 $py bench/fusion_ab.py "$base" 20000 2>&1 | tee "$res/fusion_ab.jsonl" | cut -c1-300
timeout 160 $py bench/scheduler_ab.py "$base" 20000 2>&1 | tee "$res/scheduler_ab.jsonl" | cut -c1-300
$py - "$shared" "$res/mix_cases.jsonl" <<'PY'
import json, sys
from rex_stream.bench.workloads import load_workload
with open(sys.argv[2], "w") as f:
    for i, (t, s) in enumerate(load_workload("mix", sys.argv[1], 700)):
        f.write(json.dumps({"id": str(i), "text": t, "schema": s}, ensure_ascii=False) + "\n")
PY
for spec in "tiny:$shared/rex/golden/public.jsonl:$shared/rex/tiny-random" "base:$res/mix_cases.jsonl:$base"; do
    IFS=: read -r name cases model <<<"$spec"
    timeout 80 $py -m rex_stream.bench.precision --model "$model" --cases "$cases" --device cuda --dtype bf16 \
        --attention triton --out "$res/precision-$name-bf16-triton.json" \
        | grep -E '"(attention|logit_max_abs_error|identical_share|flip_max_abs_fp32_logit|flips_within_error)"'
done
rm -f "$res/mix_cases.jsonl"  # dev-set texts: not for the repository
timeout 100 $py -m rex_stream.bench.worker_path --model "$base" --workload ner --messages 20000 --device cuda \
    --attention triton --out "$res/worker-path-ner.json" | grep -E "msgs_s|ratio|in_flight"
timeout 45 $py bench/profile_engine.py "$base" ner triton 8192 > "$res/profile-ner-triton.txt" 2>&1
head -4 "$res/profile-ner-triton.txt"
