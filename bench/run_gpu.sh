#!/usr/bin/env bash
# The GPU figures of BENCHMARKS.md, on one card: `bench/run_gpu.sh PART RESULTS_DIR`.
#   PART=precision: golden cases in fp32 on the GPU, bf16/fp16 against our fp32 path, fast-path check
#   PART=ner|re|mix: `rex-stream bench` on that workload (base-size random model), + worker path for ner
# Needs REX_SHARED (rex/tiny-random, rex/golden, rex/data) and the package importable.
set -uo pipefail
part=$1
res=${2:-bench/results}
mkdir -p "$res"
shared=${REX_SHARED:-../shared}
tiny=$shared/rex/tiny-random
base=${REX_BENCH_BASE:-/tmp/rex-random-base}
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

[[ -f $base/config.json ]] || $py -m rex_stream.cli model random --out "$base" --size base --seed 0 --vocab "$tiny/vocab.txt"

case $part in
precision)
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$res/gpu.txt"
    $py -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$res/gpu.txt"
    $py - "$shared" "$res" <<'EOF'
import json, subprocess, sys
shared, res = sys.argv[1], sys.argv[2]
cases = [json.loads(l) for l in open(f"{shared}/rex/golden/public.jsonl")]
with open(f"{res}/golden_in.jsonl", "w") as f:
    for c in cases:
        f.write(json.dumps({"id": c["id"], "text": c["text"], "schema": c["schema"]}, ensure_ascii=False) + "\n")
for attention in ("sdpa", "flex"):
    out = f"{res}/golden_gpu_fp32_{attention}.jsonl"
    subprocess.run([sys.executable, "-m", "rex_stream.cli", "infer", "--model", f"{shared}/rex/tiny-random",
                    "--device", "cuda", "--dtype", "fp32", "--allow-empty-text", "--attention", attention,
                    "--input", f"{res}/golden_in.jsonl", "--output", out], check=True)
    got = [json.loads(l) for l in open(out)]
    same = sum(g.get("output") == c["output"] for g, c in zip(got, cases))
    print(f"golden on the GPU, fp32, {attention}: {same}/{len(cases)} identical")
EOF
    for dtype in bf16 fp16; do
        $py -m rex_stream.bench.precision --model "$tiny" --cases "$shared/rex/golden/public.jsonl" --device cuda \
            --dtype $dtype --out "$res/precision-tiny-$dtype.json" | grep -E '"(logit|identical|flip|max_error)'
    done
    $py - "$shared" "$res/mix_cases.jsonl" <<'EOF'
import json, sys
from rex_stream.bench.workloads import load_workload
items = load_workload("mix", sys.argv[1], 700)[:700]
with open(sys.argv[2], "w") as f:
    for i, (t, s) in enumerate(items):
        f.write(json.dumps({"id": str(i), "text": t, "schema": s}, ensure_ascii=False) + "\n")
EOF
    $py -m rex_stream.bench.precision --model "$base" --cases "$res/mix_cases.jsonl" --device cuda --dtype bf16 \
        --out "$res/precision-base-bf16.json" | grep -E '"(logit|identical|flip|max_error)'
    ;;
ner|re|mix)
    budgets=${REX_BENCH_BUDGETS:-8192,16384,32768,65536}
    $py -m rex_stream.cli bench --workload "$part" --model "$base" --device cuda --messages "${REX_BENCH_MESSAGES:-20000}" \
        --budgets "$budgets" --out "$res" ${REX_BENCH_ENGINE_KWARGS:+--engine-kwargs "$REX_BENCH_ENGINE_KWARGS"}
    if [[ $part == ner ]]; then
        $py -m rex_stream.bench.worker_path --model "$base" --workload ner --messages 20000 --device cuda \
            --out "$res/worker-path-ner.json"
    fi
    ;;
*) echo "unknown part $part" >&2; exit 2 ;;
esac
