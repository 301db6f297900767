"""A lower bound on the device time per message of a bench workload, from rates measured on this card.

`python bench/floor.py BENCH_JSON [BENCH_JSON ...] [--tokens 65536] [--out FILE]`

Issue 4's `re` target asks for a rate the engine's kernel time does not allow. This script says how
far any implementation of the same arithmetic could go on the card, by timing only work that every
exact implementation must do, at its best measured rate:

* the encoder's four dense projections per layer (q/k/v, attention output, both feed-forward
  matrices) as cuBLAS bf16 GEMMs with their bias, on ``--tokens`` rows (the engine's batches hold
  ~55,000 tokens on `re`); the feed-forward's GELU is left out, so fusing it costs nothing here;
* attention as PyTorch's flash-attention kernel on rows of the workload's mean forward length
  (``flash_seconds_per_token``), without the disentangled bias or the prompt-isolation mask (the
  real kernel does both on top);
* the residual stream around the two LayerNorms of each layer, at the card's measured copy
  bandwidth: the GEMM's bf16 output and the fp32 residual read, the fp32 sum and its bf16 copy for
  the next GEMM written (12 bytes per hidden unit). The residual stays fp32: plain bf16 autocast keeps
  it so, and the precision target is plain bf16's error.

Left out as if free: embeddings, the conv layer, the relative-position terms, the span head,
decoding and every host cost. Each bench JSON gives its workload's real tokens and forwards per
message (the engine path's first row). Prints a line per workload and writes JSON (``--out``).
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

from rex_stream.bench.baselines import matmul_peak


def _seconds(fn: Callable[[], object]) -> float:
    """Fastest time of one call of ``fn`` (``triton.testing.do_bench``, its L2 flushed between calls)."""
    return do_bench(fn, warmup=25, rep=200, return_mode="min") / 1e3


@functools.cache
def gemm_per_token(d: int, f: int, tokens: int) -> dict[str, dict[str, float]]:
    """cuBLAS bf16 time per token of each dense projection of one layer (with bias), and its rate."""
    shapes = {"qkv": (d, 3 * d), "attention_output": (d, d), "ffn_in": (d, f), "ffn_out": (f, d)}
    out: dict[str, dict[str, float]] = {}
    for name, (k, n) in shapes.items():
        x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
        b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        seconds = _seconds(lambda: F.linear(x, w, b)) / tokens
        out[name] = {"seconds": seconds, "flops_per_s": 2 * k * n / seconds}
    return out


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Device memory bytes moved per second (read + write) by a plain copy."""
    src = torch.empty(nbytes, device="cuda", dtype=torch.uint8).random_()
    dst = torch.empty_like(src)
    return 2 * nbytes / _seconds(lambda: dst.copy_(src))


def flash_seconds_per_token(heads: int, head_dim: int, length: int, tokens: int) -> float:
    """Flash attention (no bias, no mask) time per token on rows of ``length`` tokens.

    Timed on rows of ``length`` rounded down to the kernel's 64-token tiles and scaled up linearly
    (each token's work grows with its row): a row of 129 would otherwise pay for a nearly empty tile.
    """
    tiled = max(64, length // 64 * 64)
    rows = max(1, tokens // tiled)
    q, k, v = (torch.randn(rows, heads, tiled, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        seconds = _seconds(lambda: F.scaled_dot_product_attention(q, k, v)) / (rows * tiled)
    return seconds * length / tiled


def floor(bench: dict[str, Any], tokens: int, bandwidth: float) -> dict[str, Any]:
    """The lower bound for one bench result's workload (seconds per message, and the rate it allows)."""
    cfg = bench["model"]["config"]
    d, f, n, heads = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"]
    engine = bench["paths"]["engine"][0]
    per_msg = engine["real_tokens"] / engine["messages"]
    length = round(per_msg / engine["forwards_per_message"])
    gemm = gemm_per_token(d, f, tokens)
    parts = {
        "gemm": per_msg * n * sum(g["seconds"] for g in gemm.values()),
        "attention_flash": per_msg * n * flash_seconds_per_token(heads, d // heads, length, tokens),
        "residual_traffic": per_msg * n * 2 * 12 * d / bandwidth,
    }
    total = sum(parts.values())
    best = max(row["messages_per_s"] for row in bench["paths"]["engine"])
    return {
        "workload": bench["workload"], "tokens_per_message": per_msg, "mean_forward_length": length,
        "gemm_per_token_per_layer": gemm, "parts_seconds_per_message": parts,
        "floor_seconds_per_message": total, "max_messages_per_s": 1 / total,
        "bench_best_messages_per_s": best, "bench_share_of_floor_rate": best * total,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bench_json", nargs="+", type=Path)
    parser.add_argument("--tokens", type=int, default=65536, help="rows of the timed GEMMs and attention")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("floor.py times CUDA kernels: no CUDA device here", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    peak = matmul_peak(torch.device("cuda"))
    bandwidth = copy_bandwidth()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "tokens": args.tokens,
              "matmul_peak_flops_per_s": peak["flops_per_s"], "copy_bandwidth_bytes_per_s": bandwidth,
              "workloads": [floor(json.loads(p.read_text()), args.tokens, bandwidth) for p in args.bench_json]}
    print(f"{result['device']}: bf16 peak {peak['flops_per_s'] / 1e12:.1f} TFLOP/s, "
          f"copy {bandwidth / 1e12:.2f} TB/s")
    for w in result["workloads"]:
        parts = ", ".join(f"{k} {v * 1e6:.1f}" for k, v in w["parts_seconds_per_message"].items())
        rates = ", ".join(f"{k} {g['flops_per_s'] / 1e12:.0f}" for k, g in w["gemm_per_token_per_layer"].items())
        print(f"{w['workload']}: {w['tokens_per_message']:.1f} tokens/msg, rows of {w['mean_forward_length']}: "
              f"floor {w['floor_seconds_per_message'] * 1e6:.1f} us/msg ({parts}) -> at most "
              f"{w['max_messages_per_s']:,.0f} msg/s; the bench's best {w['bench_best_messages_per_s']:,.0f} "
              f"is {w['bench_share_of_floor_rate']:.1%} of that; GEMM TFLOP/s: {rates}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
