"""Request admission on and off, same process, same card: `python bench/admission_ab.py MODEL [N]`.

For ner, re and mix (first N messages each, default 20,000; mix a tenth of it), runs the engine
(bf16, Triton attention, budget 65,536) with `admit_batches` = None (every request started before
the first batch) and with the default (requests started while the device computes), each after a
warm-up pass, and prints one JSON line per run: messages/s and padding share.
"""
import json
import os
import sys
import time

import torch

from rex_stream.bench.workloads import load_workload
from rex_stream.engine.engine import Engine

model = sys.argv[1]
count = int(sys.argv[2]) if len(sys.argv) > 2 else 20_000
engine = Engine(model, device="cuda", dtype="bf16", batch_tokens=65536, attention="auto")
default = engine.admit_batches
for workload in ("ner", "re", "mix"):
    items = load_workload(workload, os.environ.get("REX_SHARED", "../shared"), count if workload != "mix" else count // 10)
    engine.infer(items[:2048])
    for admit in (None, default):
        engine.admit_batches = admit
        engine.stats.__init__()
        torch.cuda.synchronize()
        start = time.perf_counter()
        engine.infer(items)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        st = engine.stats
        print(json.dumps({"workload": workload, "admit_batches": str(admit), "messages": len(items),
                          "msgs_s": round(len(items) / seconds, 1),
                          "padding": round(1 - st.real_tokens / st.padded_tokens, 4), "batches": st.batches}))
