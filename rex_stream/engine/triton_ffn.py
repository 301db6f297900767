"""The encoder's intermediate dense + exact GELU as one Triton GEMM (the "gelu" fusion).

Unfused, each layer runs a cuBLAS GEMM that writes the [tokens, 3072] intermediate in bf16 and then
a bandwidth-bound GELU kernel that reads and writes it again (~8 % of the GPU time on ner, H200
profile of run 8). cuBLASLt's GELU epilogue is the tanh approximation, which moved the logits past
plain bf16's error (BENCHMARKS.md run 8). Here the epilogue is the exact (erf) GELU, applied to the
fp32 accumulator plus the fp32 bias before the one rounding to the output dtype: the unfused path
rounds twice (GEMM output, then GELU output), so this is at least as close to fp32.

The tile shape is chosen per device type (``KERNEL_CONFIGS``, measured with ``bench/ffn_sweep.py``);
on CPU the kernel runs under the Triton interpreter when ``TRITON_INTERPRET=1`` (tests).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from rex_stream.engine import triton_attention

triton, tl = triton_attention.triton, triton_attention.tl

KERNEL_CONFIGS: dict[str, dict[str, int]] = {
    "cuda": {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3},
    "cpu": {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 2, "num_warps": 4, "num_stages": 1},
}

if triton is not None:
    mma = triton_attention.mma

    @triton.jit(do_not_specialize=["M"])
    def _linear_gelu_fwd(X, W, BIAS, OUT, M, N: tl.constexpr, K: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         GROUP_M: tl.constexpr, UPCAST_DOT: tl.constexpr):
        # X [M, K], W [N, K] (nn.Linear's layout) and OUT [M, N] are contiguous. Programs walk
        # GROUP_M row tiles per column tile so neighbouring programs share X and W tiles in L2.
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n: tl.constexpr = (N + BLOCK_N - 1) // BLOCK_N
        per_group = GROUP_M * num_n
        first_m = (pid // per_group) * GROUP_M
        group_rows = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % group_rows
        pid_n = (pid % per_group) // group_rows

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        in_m = offs_m < M
        in_n = offs_n < N
        x_ptrs = X + offs_m.to(tl.int64)[:, None] * K + offs_k[None, :]
        w_ptrs = W + offs_n.to(tl.int64)[None, :] * K + offs_k[:, None]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            in_k = offs_k + k < K
            a = tl.load(x_ptrs, mask=in_m[:, None] & in_k[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=in_k[:, None] & in_n[None, :], other=0.0)
            acc += mma(a, b, "tf32", UPCAST_DOT)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        acc += tl.load(BIAS + offs_n, mask=in_n, other=0.0).to(tl.float32)[None, :]
        out = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
        o_ptrs = OUT + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
        tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=in_m[:, None] & in_n[None, :])


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                config: dict[str, Any] | None = None) -> torch.Tensor:
    """``gelu(x @ weight^T + bias)`` in ``x``'s dtype (exact GELU, fp32 accumulation and epilogue).

    ``weight`` is cast to ``x``'s dtype if it is not already (the fast path stores it so);
    ``config`` overrides the tile configuration of ``KERNEL_CONFIGS``.
    """
    if torch.compiler.is_compiling():  # Inductor fuses the eager expression by itself
        return F.gelu(F.linear(x, weight.to(x.dtype), bias.to(x.dtype)))
    reason = triton_attention.triton_unavailable_reason(x.device)
    if reason is not None:
        raise RuntimeError(reason)
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    weight = weight.to(x.dtype).contiguous()
    m, k = rows.shape
    n = weight.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m:
        cfg = dict(config or KERNEL_CONFIGS.get(x.device.type, KERNEL_CONFIGS["cuda"]))
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
        _linear_gelu_fwd[grid](
            rows, weight, bias.contiguous(), out, m, N=n, K=k,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"],
            UPCAST_DOT=triton_attention.INTERPRET and x.dtype == torch.bfloat16,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
    return out.view(*x.shape[:-1], n)
