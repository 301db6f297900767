"""Profile one engine run on a GPU (torch.profiler kernel table + cProfile of the host side)."""
import json, time, torch, sys
from torch.profiler import profile, ProfilerActivity
from rex_stream.engine.engine import Engine
from rex_stream.bench.workloads import load_workload
eng = Engine(sys.argv[1], device='cuda', dtype='bf16', batch_tokens=65536)
items = load_workload('ner', '.devdata', 4096)[:4096]
eng.infer(items[:1024]); torch.cuda.synchronize()
t=time.perf_counter(); eng.infer(items); torch.cuda.synchronize(); dt=time.perf_counter()-t
print('engine', len(items)/dt, 'msg/s', eng.stats)
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    eng.infer(items); torch.cuda.synchronize()
ka = prof.key_averages()
print(ka.table(sort_by='cuda_time_total', row_limit=22, max_name_column_width=60))
print(ka.table(sort_by='self_cpu_time_total', row_limit=15, max_name_column_width=60))
# split: time in runner.logits vs rest
import cProfile, pstats
cProfile.run('eng.infer(items); torch.cuda.synchronize()', '/tmp/p.out')
pstats.Stats('/tmp/p.out').sort_stats('cumtime').print_stats(25)
