"""Time the intermediate dense + GELU of a base-size layer on this GPU: `python bench/ffn_sweep.py`.

Per row count (the engine's batch sizes in tokens), in bf16: the unfused path the engine runs by
default (cuBLAS GEMM with bias, then the GELU kernel), cuBLASLt's tanh-GELU epilogue, and the Triton
exact-GELU kernel (`triton_ffn`) in each tile configuration. Prints one JSON line per (rows, variant)
with the median time, the achieved TFLOP/s and the max |difference| from fp32 torch, then the best
Triton configuration per row count.
"""
import json

import torch
import torch.nn.functional as F
import triton.testing

from rex_stream.engine import triton_ffn

ROWS = [16_384, 65_536, 131_072]
# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages)
CONFIGS = [(128, 256, 64, 8, 8, 3), (128, 256, 64, 8, 8, 4), (128, 128, 64, 8, 4, 4), (128, 128, 64, 8, 8, 3),
           (256, 128, 64, 8, 8, 3), (64, 256, 64, 8, 4, 4), (128, 256, 32, 8, 8, 4), (128, 128, 128, 8, 8, 3)]
hidden, inter = 768, 3072
device = torch.device("cuda")
gen = torch.Generator(device=device).manual_seed(0)
weight = (torch.randn(inter, hidden, device=device, generator=gen) * 0.03).bfloat16()
bias = torch.randn(inter, device=device, generator=gen) * 0.1
best: dict[int, tuple[float, dict]] = {}
for rows in ROWS:
    x = torch.randn(rows, hidden, device=device, generator=gen).bfloat16()
    ref = F.gelu(F.linear(x.float(), weight.float(), bias))
    flop = 2 * rows * hidden * inter
    variants = {
        "cublas+gelu": lambda: F.gelu(F.linear(x, weight, bias.bfloat16())),
        "cublaslt-tanh-epilogue": lambda: torch._addmm_activation(bias.bfloat16(), x, weight.t(), use_gelu=True),
    }
    for bm, bn, bk, gm, w, st in CONFIGS:
        config = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": gm, "num_warps": w, "num_stages": st}
        variants[json.dumps(config)] = lambda c=config: triton_ffn.linear_gelu(x, weight, bias, c)
    for name, fn in variants.items():
        try:
            err = float((fn().float() - ref).abs().max())
            ms = triton.testing.do_bench(fn, warmup=25, rep=100)
        except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory: report and go on
            print(json.dumps({"rows": rows, "variant": name, "error": f"{type(exc).__name__}: {exc}"[:200]}))
            continue
        print(json.dumps({"rows": rows, "variant": name, "ms": round(ms, 4), "tflops": round(flop / ms / 1e9, 1),
                          "max_abs_err": err}), flush=True)
        if name.startswith("{") and (rows not in best or ms < best[rows][0]):
            best[rows] = (ms, json.loads(name))
print(json.dumps({"best": {rows: {"ms": round(ms, 4), "config": c} for rows, (ms, c) in best.items()}}))
