"""The encoder's intermediate dense + exact GELU as one persistent TMA GEMM (the "gelu" fusion).

Unfused, each layer's feed-forward runs a cuBLAS GEMM that writes the [tokens, 3072] intermediate in
16 bits, then a bandwidth-bound GELU kernel that reads and writes it again (~8 % of the kernel time
on ner, H200 profile of run 16). cuBLASLt's GELU epilogue is the tanh approximation, which moved
the tiny model's logits past plain bf16's error (run 8), and a plain Triton GEMM with an exact GELU
epilogue ran at ~350 TFLOP/s against cuBLAS's > 518 (run 11). This kernel is Hopper's form of it:
tiles fetched by the TMA unit (tensor descriptors), a persistent grid of one program per SM walking
the output tiles in L2-friendly groups, and the exact (erf) GELU applied to the fp32 accumulator plus
the fp32 bias before the one rounding to the output dtype (the unfused path rounds twice). On an H200
it runs at ~445 TFLOP/s (cuBLAS's GEMM alone: ~590), 11 % faster than the unfused pair (run 17).

The tile configuration is chosen per device type (``KERNEL_CONFIGS``; the CUDA entry measured with
``bench/ffn_sweep.py``). On CPU the kernel runs under the Triton interpreter when
``TRITON_INTERPRET=1`` was set before import (tests).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F

from rex_stream.engine import triton_attention

triton, tl = triton_attention.triton, triton_attention.tl
_INTERPRET = triton_attention._INTERPRET

# The CUDA entry: the fastest of `bench/ffn_sweep.py`'s candidates on an H200 (run 17 calls 1 and 2: ~445
# TFLOP/s at 45,056 tokens, 0.48 ms against 0.535 for cuBLAS's GEMM then torch's GELU; 4-warp, 64-row and
# unsplit-store tiles were slower, triton 3.6's warp specialisation gave nothing here, and 3 or 4 stages
# were within 1-5 %). PROGRAMS_PER_SM > 1 lets programs that fit an SM together overlap one's epilogue
# (the erf) with another's loads and MMAs. The CPU entry is for the interpreter (tests).
KERNEL_CONFIGS: dict[str, dict[str, Any]] = {
    "cuda": {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8, "SPLIT_STORE": True,
             "WARP_SPECIALIZE": False, "PROGRAMS_PER_SM": 1, "num_warps": 8, "num_stages": 3},
    "cpu": {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 2, "SPLIT_STORE": True,
            "WARP_SPECIALIZE": False, "PROGRAMS_PER_SM": 1, "num_warps": 4, "num_stages": 1},
}

if triton is not None:
    from triton.tools.tensor_descriptor import TensorDescriptor

    _TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}
    _mma = triton_attention._mma

    @triton.jit
    def _gelu_store(out_desc, acc, off_m, off_n, OUT_DTYPE: tl.constexpr):
        """Exact GELU of the fp32 tile, rounded once, stored through the descriptor."""
        out = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
        out_desc.store([off_m, off_n], out.to(OUT_DTYPE))

    @triton.jit(do_not_specialize=["M"])
    def _linear_gelu_fwd(x_desc, w_desc, out_desc, BIAS, M, N: tl.constexpr, K: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         GROUP_M: tl.constexpr, SPLIT_STORE: tl.constexpr, PROGRAMS: tl.constexpr,
                         WARP_SPECIALIZE: tl.constexpr, OUT_DTYPE: tl.constexpr, UPCAST_DOT: tl.constexpr):
        # x [M, K], w [N, K] (nn.Linear's layout), out [M, N]. Program p takes tiles p, p + PROGRAMS, ...;
        # tiles are numbered GROUP_M row tiles per column tile, so the programs running at once share
        # x and w tiles in L2. The descriptors zero-fill loads and clip stores beyond M.
        num_m = tl.cdiv(M, BLOCK_M)
        num_n: tl.constexpr = (N + BLOCK_N - 1) // BLOCK_N
        per_group = GROUP_M * num_n
        for tile in tl.range(tl.program_id(0), num_m * num_n, PROGRAMS, flatten=True, warp_specialize=WARP_SPECIALIZE):
            first_m = (tile // per_group) * GROUP_M
            group_rows = tl.minimum(num_m - first_m, GROUP_M)
            off_m = (first_m + tile % group_rows) * BLOCK_M
            off_n = ((tile % per_group) // group_rows) * BLOCK_N
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for k in range(0, K, BLOCK_K):
                a = x_desc.load([off_m, k])
                b = w_desc.load([off_n, k])
                acc = _mma(a, b.T, acc, "tf32", UPCAST_DOT)
            offs_n = off_n + tl.arange(0, BLOCK_N)
            acc += tl.load(BIAS + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
            if SPLIT_STORE:  # two half-width stores: half the epilogue's shared memory, left to the loads
                left, right = tl.split(tl.permute(tl.reshape(acc, [BLOCK_M, 2, BLOCK_N // 2]), [0, 2, 1]))
                _gelu_store(out_desc, left, off_m, off_n, OUT_DTYPE)
                _gelu_store(out_desc, right, off_m, off_n + BLOCK_N // 2, OUT_DTYPE)
            else:
                _gelu_store(out_desc, acc, off_m, off_n, OUT_DTYPE)


def unavailable_reason(device: torch.device | str) -> str | None:
    """None if the kernel can run on tensors of ``device``, else why not (TMA needs compute capability 9)."""
    device = torch.device(device)
    return _unavailable_reason(device.type, device.index)


@functools.cache
def _unavailable_reason(device_type: str, index: int | None) -> str | None:
    if not _INTERPRET and device_type != "cuda":
        return f"the TMA GEMM needs a CUDA device, not {device_type!r} (or TRITON_INTERPRET=1, for tests)"
    reason = triton_attention.triton_unavailable_reason(torch.device(device_type, index))
    if reason is not None or _INTERPRET:
        return reason
    capability = torch.cuda.get_device_capability(torch.device(device_type, index))
    return None if capability >= (9, 0) else f"the TMA GEMM needs compute capability 9.0 or newer, not {capability}"


@functools.cache
def _programs(device_type: str, index: int | None) -> int:
    """The persistent grid's stride: the device's SM count (4 under the interpreter)."""
    if device_type != "cuda":
        return 4
    return torch.cuda.get_device_properties(torch.device(device_type, index)).multi_processor_count


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                config: dict[str, Any] | None = None) -> torch.Tensor:
    """``gelu(x @ weight^T + bias)`` in ``x``'s dtype: exact GELU on the fp32 accumulator, one rounding.

    ``weight`` is cast to ``x``'s dtype if it is not already (the fast path stores it so); ``config``
    overrides the tile configuration of ``KERNEL_CONFIGS``. Raises where ``unavailable_reason`` says so.
    """
    if torch.compiler.is_compiling():  # Inductor fuses the eager expression by itself
        return F.gelu(F.linear(x, weight.to(x.dtype), bias.to(x.dtype)))
    reason = unavailable_reason(x.device)
    if reason is not None:
        raise RuntimeError(reason)
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    if rows.data_ptr() % 16:  # TMA reads from 16-byte aligned bases only (a view at an odd offset)
        rows = rows.clone()
    weight = weight.to(x.dtype).contiguous()
    (m, k), n = rows.shape, weight.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m:
        cfg = dict(config or KERNEL_CONFIGS.get(x.device.type, KERNEL_CONFIGS["cuda"]))
        bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
        store_n = bn // 2 if cfg["SPLIT_STORE"] else bn
        # PROGRAMS_PER_SM programs per SM (fewer for a small x); the stride stays that count, so one binary
        # serves every x.
        programs = _programs(x.device.type, x.device.index) * cfg["PROGRAMS_PER_SM"]
        _linear_gelu_fwd[(min(programs, triton.cdiv(m, bm) * triton.cdiv(n, bn)),)](
            TensorDescriptor.from_tensor(rows, [bm, bk]), TensorDescriptor.from_tensor(weight, [bn, bk]),
            TensorDescriptor.from_tensor(out, [bm, store_n]), bias.contiguous(), m, N=n, K=k,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg["GROUP_M"], SPLIT_STORE=cfg["SPLIT_STORE"],
            WARP_SPECIALIZE=cfg["WARP_SPECIALIZE"],
            PROGRAMS=programs, OUT_DTYPE=_TL_DTYPES[x.dtype], UPCAST_DOT=_INTERPRET and x.dtype == torch.bfloat16,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
    return out.view(*x.shape[:-1], n)
