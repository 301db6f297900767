"""Fast-path fusions A/B, same process, same card: `python bench/fusion_ab.py MODEL_DIR [N]`.

Runs the engine (bf16, Triton attention, budget 65,536) on the first N ner messages (default
20,000) with no fusion, each fusion alone and all of them (`RexModel.set_fusions`), twice each after
one warm-up pass, and prints one JSON line per variant: messages/s of both runs, the fusions that
stayed on (a failing one switches itself off with a warning), the summed GPU kernel time of a
profiled pass over 4,096 messages (what the fusions change, whether or not the host is the limit)
and, on one batch of a few hundred level-0 forwards, the max |logit| difference from the
no-fusion variant.
"""
import json
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from rex_stream.bench.worker_path import run_engine
from rex_stream.bench.workloads import load_workload
from rex_stream.engine.engine import Engine
from rex_stream.engine.recursion import solve

VARIANTS = [(), ("gelu",), ("head",), ("rotary",), ("gelu", "head", "rotary")]

model = sys.argv[1]
count = int(sys.argv[2]) if len(sys.argv) > 2 else 20_000
engine = Engine(model, device="cuda", dtype="bf16", batch_tokens=65536, attention="triton")
net = engine.runner.model
items = load_workload("ner", None, count)
forwards = [f for text, schema in items[:400] for f in next(solve(engine.tokenizer, text, schema), [])][:300]
batch = engine.runner.tensors(forwards)
keep = batch["valid"][:, :, None] & batch["valid"][:, None, :]
engine.infer(items[:2048])  # warm-up with every fusion on (the default): all kernels compile here
reference = None
for names in VARIANTS:
    net.set_fusions(names)
    logits = engine.runner.logits(batch)
    reference = logits if reference is None else reference
    rates = [round(run_engine(engine, items, len(items)), 1) for _ in range(2)]
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        engine.infer(items[:4096])
        torch.cuda.synchronize()
    kernel_ms = sum(e.self_device_time_total for e in prof.key_averages()) / 1e3
    status = net.fast_path_status()
    print(json.dumps({"fusions": list(names), "active": status["fusions"], "errors": status["fusion_errors"],
                      "attention": status["attention_active"], "messages": len(items), "msgs_s": rates,
                      "kernel_ms_per_1000_msgs": round(kernel_ms * 1000 / min(4096, len(items)), 2),
                      "max_abs_logit_diff": float((logits - reference).abs()[keep].max()),
                      "max_abs_logit": float(reference.abs()[keep].max())}))
