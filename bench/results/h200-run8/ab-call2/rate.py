"""Engine msg/s of whatever rex_stream is on sys.path: ner 20k, re 10k (one line of JSON).

The script of the code A/B in BENCHMARKS run 8, exactly as run on device call 2: run 7's code was
exported with `git archive b4d8b8c rex_stream | tar -x -C .old/old`, and the two codes ran in
alternating processes, `PYTHONPATH=/tmp/site:$PWD/.old/old python3 rate.py /tmp/rex-random-base
old-b4d8b8c` then `PYTHONPATH=/tmp/site:$PWD python3 rate.py /tmp/rex-random-base new`, twice.
"""
import json, sys, time, torch
import rex_stream
from rex_stream.bench.workloads import load_workload
from rex_stream.engine.engine import Engine
e = Engine(sys.argv[1], device="cuda", dtype="bf16", batch_tokens=65536, attention="triton")
out = {"code": sys.argv[2]}
for wl, n in (("ner", 20000), ("re", 10000)):
    items = load_workload(wl, None, n)
    e.infer(items[:2048])
    rates = []
    for _ in range(2):
        torch.cuda.synchronize(); t = time.perf_counter(); e.infer(items); torch.cuda.synchronize()
        rates.append(round(n / (time.perf_counter() - t), 1))
    out[wl] = rates
print(json.dumps(out), flush=True)
