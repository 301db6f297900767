"""Profile the engine on one GPU: kernel time table, and how busy the GPU is over the wall time.

`python bench/profile_engine.py MODEL_DIR [WORKLOAD] [ATTENTION] [MESSAGES] [ROWS]` (REX_SHARED must point
at the shared data; ROWS kernels in the table, default 25). Prints the top CUDA kernels by total time, the summed kernel time against the
wall time of the same pass (a lower bound on GPU idleness), and the engine's stats.
"""
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from rex_stream.bench.workloads import load_workload
from rex_stream.engine.engine import Engine

model = sys.argv[1]
workload = sys.argv[2] if len(sys.argv) > 2 else "ner"
attention = sys.argv[3] if len(sys.argv) > 3 else "sdpa"
count = int(sys.argv[4]) if len(sys.argv) > 4 else 8192
rows = int(sys.argv[5]) if len(sys.argv) > 5 else 25
eng = Engine(model, device="cuda", dtype="bf16", batch_tokens=65536, attention=attention)
items = load_workload(workload, None, count)
eng.infer(items)  # warm-up: kernels compiled, allocator warm
torch.cuda.synchronize()
start = time.perf_counter()
eng.infer(items)
torch.cuda.synchronize()
wall = time.perf_counter() - start
print(f"{workload} {attention}: {len(items) / wall:.0f} msg/s unprofiled ({wall * 1e3:.0f} ms)")
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    start = time.perf_counter()
    eng.infer(items)
    torch.cuda.synchronize()
    wall = time.perf_counter() - start
events = prof.key_averages()
kernel = sum(e.self_device_time_total for e in events) / 1e6
print(f"profiled pass: wall {wall * 1e3:.0f} ms, summed CUDA kernel time {kernel * 1e3:.0f} ms "
      f"({kernel / wall:.0%} of wall)")
print(events.table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=70))
print(eng.runner.model.fast_path_status())


def compiled_variants(kernel: object) -> int | None:
    """How many binaries triton compiled for a kernel (None where this triton does not say)."""
    caches = getattr(kernel, "device_caches", None)
    return sum(len(cache[0]) for cache in caches.values()) if isinstance(caches, dict) else None


from rex_stream.engine import triton_attention, triton_norm  # noqa: E402

print({"compiled_variants": {"attention": compiled_variants(triton_attention._disentangled_fwd),
                             "add_layer_norm": compiled_variants(triton_norm._add_layer_norm_fwd)}})
