"""The Triton attention against an earlier version of it, same process, same GPU:
`python bench/attention_ab.py OLD.py` where OLD.py is a previous `rex_stream/engine/triton_attention.py`
(`git show REV:rex_stream/engine/triton_attention.py > OLD.py`).

Shapes are the engine's typical batches of a base-size layer (12 heads, head dim 64, bf16) with
Rex prompt layouts (`fast_attention.synthetic_batch`); each variant runs the whole
`disentangled_attention` call. Prints one JSON line per (shape, variant) with the median time and
the max |difference| from `reference_attention` in fp32, and the current kernel's tile
configurations (`CONFIGS`) are timed too.
"""
import importlib.util
import json
import sys

import torch
import triton.testing

from rex_stream.engine import triton_attention
from rex_stream.engine.fast_attention import synthetic_batch

SHAPES = [(1024, 64), (768, 96), (512, 128), (384, 160), (96, 512)]  # (rows, padded length)
CONFIGS = [(64, 64, 128, 4, 2), (64, 64, 128, 8, 2), (64, 64, 64, 4, 2), (64, 32, 128, 4, 2),
           (32, 64, 128, 4, 2), (128, 64, 256, 8, 2), (64, 64, 128, 4, 3)]  # (M, N, W, warps, stages)
heads, dim, span = 12, 64, 256
spec = importlib.util.spec_from_file_location("old_attention", sys.argv[1])
old = importlib.util.module_from_spec(spec)
spec.loader.exec_module(old)
device = torch.device("cuda")
for batch, length in SHAPES:
    t = {k: v.to(device) for k, v in synthetic_batch(batch, length, torch.device("cpu"), seed=1).items()}
    lo, hi = max(0, span - length + 1), min(2 * span, span + length)
    qkv = torch.randn(batch, length, 3, heads, dim, device=device, dtype=torch.bfloat16)
    q, k, v = (qkv[:, :, n].transpose(1, 2) for n in range(3))
    # The model's tables are [rows, H*D] projections viewed head-major: strides (D, H*D, 1).
    pos_q, pos_k = (torch.randn(hi - lo, heads, dim, device=device, dtype=torch.bfloat16).transpose(0, 1) * 0.3
                    for _ in range(2))
    index = torch.arange(1, length + 1, device=device, dtype=torch.int32)
    lengths = torch.where(t["valid"], index, 0).amax(-1)
    args = (q, k, v, pos_q, pos_k, t["pos"], t["group"], t["slot"], t["valid"], lengths, span - lo, 0.125)
    exact = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    ref = triton_attention.reference_attention(*exact[:5], *args[5:])
    variants = {"old": lambda: old.disentangled_attention(*args)}
    for bm, bn, bw, w, st in CONFIGS:
        config = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_W": bw, "num_warps": w, "num_stages": st}
        variants[json.dumps(config)] = lambda c=config: triton_attention.disentangled_attention(*args, config=c)
    for name, fn in variants.items():
        try:
            err = float((fn().float() - ref).abs().max())
            ms = triton.testing.do_bench(fn, warmup=25, rep=100)
        except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory: report and go on
            print(json.dumps({"shape": [batch, length], "variant": name, "error": f"{type(exc).__name__}: {exc}"[:300]}))
            continue
        print(json.dumps({"shape": [batch, length], "variant": name, "ms": round(ms, 4), "max_abs_err": err}),
              flush=True)
