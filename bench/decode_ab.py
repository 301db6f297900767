"""Host decoding A/B, same process, same card: `python bench/decode_ab.py PREVIOUS.py MODEL_DIR [N]`.

PREVIOUS.py is an earlier `rex_stream/engine/decode.py` (e.g. `git show REV:rex_stream/engine/
decode.py > prev.py`); its `decode_links` is swapped in for the current one where the recursion
calls it. Runs the engine (bf16, Triton attention, budget 131,072) on the first N mix messages
(default 3,000) with each version twice, alternating, after a warm-up, and prints one JSON line per
run: messages/s, and whether the outputs equal the first run's.
"""
import importlib.util
import json
import sys
import time

import torch

from rex_stream.bench.workloads import load_workload
from rex_stream.engine import recursion
from rex_stream.engine.engine import Engine

spec = importlib.util.spec_from_file_location("rex_stream.engine.previous_decode", sys.argv[1])
previous = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = previous  # its dataclasses look their module up there
spec.loader.exec_module(previous)
VERSIONS = {"previous": previous.decode_links, "current": recursion.decode_links}

engine = Engine(sys.argv[2], device="cuda", dtype="bf16", batch_tokens=131072, attention="triton")
items = load_workload("mix", None, int(sys.argv[3]) if len(sys.argv) > 3 else 3000)
engine.infer(items[:1000])
first = None
for version in ("previous", "current", "previous", "current"):
    recursion.decode_links = VERSIONS[version]
    torch.cuda.synchronize()
    start = time.perf_counter()
    outputs = [o.output for o in engine.infer(items)]
    torch.cuda.synchronize()
    rate = len(items) / (time.perf_counter() - start)
    first = first or outputs
    print(json.dumps({"workload": "mix", "decode": version, "messages": len(items), "msgs_s": round(rate, 1),
                      "same_outputs": outputs == first}), flush=True)
