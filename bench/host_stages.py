"""Where the engine's wall time goes on one GPU: `python bench/host_stages.py MODEL_DIR [N]`.

Runs ner (first N messages, default 20,000; bf16, Triton attention, budget 65,536) after a warm-up
and times each engine stage on the host: preparing batches, launching them, fetching (which waits
for the device), collecting, planning and stepping requests (schema walk, tokenising, decoding).
For the default planner and for the fewest batches, prints one JSON line: wall seconds, seconds
per stage, batches, and the device's summed kernel time (CUDA events around each launch).
"""
import json
import sys
import time
from collections import defaultdict


from rex_stream.bench.worker_path import run_engine
from rex_stream.bench.workloads import load_workload
from rex_stream.engine.engine import Engine

model = sys.argv[1]
count = int(sys.argv[2]) if len(sys.argv) > 2 else 20_000
engine = Engine(model, device="cuda", dtype="bf16", batch_tokens=65536, attention="triton")
items = load_workload("ner", None, count)
spent: dict[str, float] = defaultdict(float)


def timed(owner: object, name: str) -> None:
    inner = getattr(owner, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            spent[name] += time.perf_counter() - start

    setattr(owner, name, wrapper)


for name in ("prepare", "launch", "fetch", "collect"):
    timed(engine.runner, name)
for name in ("plan", "_step"):
    timed(engine, name)
engine.infer(items[:4096])
for cost in (engine.batch_cost, 10**9):
    engine.batch_cost = cost
    engine.infer(items[:4096])
    spent.clear()
    engine.stats.__init__()
    rate = run_engine(engine, items, len(items))
    print(json.dumps({"batch_cost": cost, "messages": len(items), "wall_s": round(len(items) / rate, 3),
                      "msgs_s": round(rate, 1), "batches": engine.stats.batches,
                      "stages_s": {k: round(v, 3) for k, v in spent.items()}}))
