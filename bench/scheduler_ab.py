"""Scheduling variants, same process, same card: `python bench/scheduler_ab.py MODEL [N]`.

For ner, re and mix (first N messages each, default 20,000; mix a tenth of it), runs the engine
(bf16, Triton attention, budget 65,536) under each variant of request admission (`admit_batches`:
None starts every request before the first batch, 16 starts them while the device computes) and
of the planner's per-batch cost (`batch_cost`, in padded tokens), each after a warm-up pass, and
prints one JSON line per run: messages/s, padding share and batches.
"""
import json
import os
import sys


from rex_stream.bench.worker_path import run_engine
from rex_stream.bench.workloads import load_workload
from rex_stream.engine.engine import Engine

VARIANTS = [{"admit_batches": None, "batch_cost": 2048}, {"admit_batches": 16, "batch_cost": 2048},
            {"admit_batches": 16, "batch_cost": 8192}, {"admit_batches": None, "batch_cost": 10**9}]

model = sys.argv[1]
count = int(sys.argv[2]) if len(sys.argv) > 2 else 20_000
engine = Engine(model, device="cuda", dtype="bf16", batch_tokens=65536, attention="auto")
for workload in ("ner", "re", "mix"):
    items = load_workload(workload, os.environ.get("REX_SHARED", "../shared"), count if workload != "mix" else count // 10)
    engine.infer(items[:2048])
    for variant in VARIANTS:
        for name, value in variant.items():
            setattr(engine, name, value)
        engine.stats.__init__()
        rate = run_engine(engine, items, len(items))
        st = engine.stats
        print(json.dumps({"workload": workload, **{k: str(v) for k, v in variant.items()}, "messages": len(items),
                          "msgs_s": round(rate, 1),
                          "padding": round(1 - st.real_tokens / st.padded_tokens, 4), "batches": st.batches}))
