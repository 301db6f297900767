#!/usr/bin/env bash
# One device call: kernel micro-benchmark, golden check of the fused path, then `rex-stream bench`
# for sdpa and triton engines, and the worker path. Usage: bench/gpu_probe.sh OUT_DIR [MESSAGES_RE]
# Expects the package importable and REX_SHARED set (see bench/run_gpu.sh).
set -uo pipefail
out=$1
re_messages=${2:-10000}
py=${PYTHON:-python3}
shared=${REX_SHARED:-../shared}
base=${REX_BENCH_BASE:-/tmp/rex-random-base}
export PYTHONUNBUFFERED=1
mkdir -p "$out"
[[ -f $base/config.json ]] || $py -m rex_stream.cli model random --out "$base" --size base --seed 0 \
    --vocab "$shared/rex/tiny-random/vocab.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
$py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" | tee -a "$out/gpu.txt"
for shape in 64x128 16x512; do
    timeout 120 $py -m rex_stream.engine.fast_attention --device cuda --size base --batch "${shape%x*}" --lengths "${shape#*x}" \
        --dtypes bf16 --cases sdpa,triton --repeats 10 2>&1 | tail -6 | tee -a "$out/kernel.txt"
done
$py - "$shared" "$out" <<'PY' 2>&1 | tail -3 | tee -a "$out/kernel.txt"
import json, subprocess, sys
shared, out = sys.argv[1], sys.argv[2]
cases = [json.loads(l) for l in open(f"{shared}/rex/golden/public.jsonl")]
with open("/tmp/golden_in.jsonl", "w") as f:
    for c in cases:
        f.write(json.dumps({"id": c["id"], "text": c["text"], "schema": c["schema"]}, ensure_ascii=False) + "\n")
for attention in ("triton",):
    res = "/tmp/golden_out.jsonl"
    subprocess.run([sys.executable, "-m", "rex_stream.cli", "infer", "--model", f"{shared}/rex/tiny-random",
                    "--device", "cuda", "--dtype", "fp32", "--allow-empty-text", "--attention", attention,
                    "--input", "/tmp/golden_in.jsonl", "--output", res], check=True)
    got = [json.loads(l) for l in open(res)]
    same = sum(g.get("output") == c["output"] for g, c in zip(got, cases))
    print(f"golden on the GPU, fp32, {attention}: {same}/{len(cases)} identical")
PY
for attention in ${REX_PROBE_ATTENTION:-sdpa triton}; do
    mkdir -p "$out/$attention"
    timeout 280 $py -m rex_stream.cli bench --workload ner,re --messages "20000,$re_messages" --model "$base" \
        --device cuda --budgets 65536 --baseline-a-messages 60 --agreement-messages 300 \
        --engine-kwargs "{\"attention\": \"$attention\"}" --out "$out/$attention" 2>&1 | grep -E "^\S*\(|msg/s|FAILED|Error" | tail -14
done
timeout 120 $py -m rex_stream.bench.worker_path --model "$base" --workload ner --messages 20000 --device cuda \
    --attention "${REX_PROBE_WORKER_ATTENTION:-triton}" --out "$out/worker-path-ner.json" 2>&1 | tail -12
