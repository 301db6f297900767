"""Time the Triton attention kernel's tile configurations on this GPU: `python bench/tile_sweep.py`.

Shapes are the engine's typical batches (ner: many short rows, re: medium, mix: few long ones) of a
base-size layer (12 heads, head dim 64) in bf16, built by `fast_attention.synthetic_attention_args`; each
configuration runs the whole `disentangled_attention` (position tables + kernel). Prints one JSON
line per (shape, configuration) with the median time, and the best configuration per shape.
"""
import json

import torch
import triton.testing

from rex_stream.engine import triton_attention
from rex_stream.engine.fast_attention import synthetic_attention_args

SHAPES = [(1024, 64), (384, 160), (96, 512)]  # (rows, padded length): ~65k-token batches
CONFIGS = [(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 2), (32, 64, 4, 2),
           (128, 32, 4, 2), (64, 128, 4, 2), (128, 128, 8, 2)]
device = torch.device("cuda")
best: dict[str, tuple[float, tuple[int, ...]]] = {}
for batch, length in SHAPES:
    args = synthetic_attention_args(batch, length, device)
    for bm, bn, w, st in CONFIGS:
        config = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": st}
        try:
            ms = triton.testing.do_bench(lambda: triton_attention.disentangled_attention(*args, config=config),
                                         warmup=25, rep=100)
        except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory: report and go on
            print(json.dumps({"shape": [batch, length], "config": config, "error": f"{type(exc).__name__}: {exc}"[:200]}))
            continue
        print(json.dumps({"shape": [batch, length], "config": config, "ms": round(ms, 4)}))
        key = f"{batch}x{length}"
        if key not in best or ms < best[key][0]:
            best[key] = (ms, (bm, bn, w, st))
print(json.dumps({"best": {k: {"ms": round(v[0], 4), "config": v[1]} for k, v in best.items()},
                  "current": triton_attention.KERNEL_CONFIGS["cuda"]}))
