"""Where the served layout's device time goes: `python bench/profile_served.py MODEL [WORKLOAD] [MESSAGES] [HOSTS]`.

The bench's served pass (`rex_stream.bench.served`: this process is the device process, a
`DeviceServer` thread over one engine, fed by HOSTS spawned host processes) under a CUDA profile.
Prints the summed kernel time against the timed pass's wall time (the host processes' warm-up
batches are in the sum too, a few per cent), the batches' device spans ("busy"), and the top kernels.
"""
import os
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from rex_stream.bench.served import served_path
from rex_stream.bench.workloads import load_workload
from rex_stream.engine.engine import Engine

model = sys.argv[1]
workload = sys.argv[2] if len(sys.argv) > 2 else "ner"
messages = int(sys.argv[3]) if len(sys.argv) > 3 else 60_000
hosts = int(sys.argv[4]) if len(sys.argv) > 4 else 4
shared = Path(os.environ.get("REX_SHARED", "../shared"))
engine = Engine(model, device="cuda", dtype="bf16", batch_tokens=131_072, attention="triton")
engine.infer(load_workload(workload, shared, 2048))  # kernels compiled, allocator warm
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    run = served_path(engine, {"attention": "triton"}, workload, shared, messages, hosts, 131_072, keep=0,
                      warm=512, chunk=5000)
    torch.cuda.synchronize()
events = prof.key_averages()
kernel = sum(e.self_device_time_total for e in events) / 1e6
spans = sum(b.busy for b in run.batches)
print(f"{workload}, {hosts} hosts: {run.messages / run.seconds:.0f} msg/s over {run.seconds:.2f} s; kernel time "
      f"{kernel:.2f} s ({kernel / run.seconds:.0%} of the timed wall); batch device spans {spans:.2f} s "
      f"({spans / run.seconds:.0%}); {len(run.batches)} batches")
print(events.table(sort_by="self_device_time_total", row_limit=20, max_name_column_width=60))
