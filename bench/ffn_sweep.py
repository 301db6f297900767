"""The "gelu" fusion (``triton_ffn``: TMA GEMM + exact GELU) on this GPU: `python bench/ffn_sweep.py MODEL_DIR [N]`.

1. The intermediate dense + GELU of the base model (x [M, 768] bf16 -> [M, 3072]) at the token
   counts of the engine's batches: cuBLAS GEMM then torch's GELU (the unfused path), the cuBLAS GEMM
   alone, cuBLASLt's tanh-GELU epilogue (for reference; not precise enough, BENCHMARKS run 8), and
   the Triton kernel at each candidate tile configuration (``triton.testing.do_bench``, ms). One
   JSON line per (M, variant), with the max error beyond half a bf16 unit of the fp32 result.
2. The registers, spills and shared memory of each compiled binary.
3. The configuration with the least summed time over the token counts is set as
   ``KERNEL_CONFIGS["cuda"]``, and the engine (bf16, Triton attention) is A/B-ed in the same process,
   alternating, without and with the fusion (the default others on): ner N messages (default
   20,000; 0: no A/B), re N / 2, mix N / 30; messages/s of two passes and kernel ms per 1,000 messages.
"""
import json
import sys
from typing import Any

import torch
import torch.nn.functional as F
import triton.testing
from tile_sweep import kernel_stats

from rex_stream.bench.worker_path import engine_ab_pass
from rex_stream.bench.workloads import load_workload
from rex_stream.engine import triton_ffn
from rex_stream.engine.engine import Engine
from rex_stream.engine.model import DEFAULT_FUSIONS

TOKENS = [4096, 24576, 45056, 65536, 131072]
# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, split store, warp-specialised, GROUP_M, programs per SM).
# Run 17 call 1 also had 4-warp and 64-row tiles at one program per SM (290-300 TFLOP/s) and an unsplit
# store (~400), call 2 warp-specialised variants (no gain) and GROUP_M 4 / 16: all slower or equal.
CANDIDATES = [(128, 256, 64, 8, 3, True, False, 8, 1), (128, 256, 64, 8, 4, True, False, 8, 1),
              (256, 128, 64, 8, 3, True, False, 8, 1), (128, 128, 64, 4, 2, True, False, 8, 2),
              (128, 64, 64, 4, 3, True, False, 8, 2), (128, 128, 64, 4, 2, False, False, 8, 2),
              (64, 256, 64, 4, 2, True, False, 8, 2), (128, 128, 32, 4, 4, True, False, 8, 2)]


def config_of(bm: int, bn: int, bk: int, warps: int, stages: int, split: bool, ws: bool, group: int,
              per_sm: int) -> dict[str, Any]:
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group, "SPLIT_STORE": split,
            "WARP_SPECIALIZE": ws, "PROGRAMS_PER_SM": per_sm, "num_warps": warps, "num_stages": stages}


def sweep() -> dict[tuple, float]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    weight = (torch.randn(3072, 768, device="cuda", generator=gen) / 768 ** 0.5).bfloat16()
    bias = torch.randn(3072, device="cuda", generator=gen) * 0.1
    totals: dict[tuple, float] = {}
    for m in TOKENS:
        x = torch.randn(m, 768, device="cuda", generator=gen).bfloat16()
        ref = F.gelu(x[:4096].float() @ weight.float().t() + bias)
        variants = {
            "cublas+gelu": lambda: F.gelu(F.linear(x, weight, bias.bfloat16())),
            "cublas-gemm": lambda: F.linear(x, weight, bias.bfloat16()),
            "cublaslt-tanh": lambda: torch._addmm_activation(bias.bfloat16(), x, weight.t(), use_gelu=True),
        }
        variants.update({c: (lambda c=c: triton_ffn.linear_gelu(x, weight, bias, config_of(*c))) for c in CANDIDATES})
        for name, fn in variants.items():
            try:
                out = fn()
                ms = triton.testing.do_bench(fn, warmup=25, rep=200)
            except Exception as exc:  # noqa: BLE001 - a configuration the card cannot run (shared memory)
                print(json.dumps({"m": m, "variant": str(name), "error": f"{type(exc).__name__}: {exc}"[:300]}), flush=True)
                continue
            excess = float(((out[:4096].float() - ref).abs() - 2 ** -8 * ref.abs()).max())
            print(json.dumps({"m": m, "variant": str(name), "ms": round(ms, 4),
                              "tflops": round(2 * m * 768 * 3072 / ms / 1e9, 1), "excess": excess}), flush=True)
            if isinstance(name, tuple) and excess <= 1e-3:
                totals[name] = totals.get(name, 0.0) + ms
    return totals


def engine_ab(engine: Engine, count: int) -> None:
    net = engine.runner.model
    for workload, n in (("ner", count), ("re", count // 2), ("mix", count // 30)):
        items = load_workload(workload, None, n)
        for fusions in (tuple(set(DEFAULT_FUSIONS) - {"gelu"}), tuple({"gelu", *DEFAULT_FUSIONS})) * 2:
            net.set_fusions(fusions)
            engine.infer(items[:1024])  # this variant's kernels compiled and warm
            print(json.dumps({"workload": workload, "fusions": list(fusions), "active": net.fast_path_status()["fusions"],
                              **engine_ab_pass(engine, items)}), flush=True)


if __name__ == "__main__":
    swept = sweep()
    kernel_stats("linear_gelu", triton_ffn._linear_gelu_fwd)
    best = min(swept, key=swept.get)
    print(json.dumps({"best": config_of(*best), "summed_ms": round(swept[best], 4),
                      "totals": {str(k): round(v, 4) for k, v in sorted(swept.items(), key=lambda kv: kv[1])}}), flush=True)
    triton_ffn.KERNEL_CONFIGS["cuda"] = config_of(*best)
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 20_000
    if count:  # 0: the sweep only
        eng = Engine(sys.argv[1], device="cuda", dtype="bf16", batch_tokens=65536, attention="triton")
        eng.infer(load_workload("ner", None, 1024))  # warm-up
        engine_ab(eng, count)
