"""Residual add + LayerNorm + reduced-precision copy in one Triton kernel (the "triton" fast path).

Each post-LN block of the encoder computes ``LayerNorm(dense(x) + residual)``. Under autocast that
is three memory-bound kernels per block — a mixed-dtype add (bf16 + fp32, not vectorised), the fp32
LayerNorm, and autocast's cast of the result to bf16 for the next matmul — about a fifth of the
engine's GPU time on ner (H100 kernel profile, run 3b). Here one kernel reads the matmul output and
the residual once and writes the fp32 result (the next residual) and its bf16/fp16 copy (the next
matmul's input). The maths is the same as the eager path: the sum and the normalisation in fp32,
biased variance, the reduced copy rounded from the fp32 result; only the reduction order differs.

Used by ``RexModel`` when the "triton" attention is active and the compute dtype is 16-bit; its
failures take the same fallback as the attention kernel (the whole fast path drops to SDPA).
Under ``torch.compile`` the eager expression is used (Inductor fuses it by itself).
"""

from __future__ import annotations

import torch

from rex_stream.engine import triton_attention

triton, tl = triton_attention.triton, triton_attention.tl

_ROWS = 4  # rows per program: 768-wide rows are short, a few per program keep the loads wide

if triton is not None:

    @triton.jit(do_not_specialize=["N"])
    def _add_layer_norm_fwd(Y, RES, W, B, OUT, LOW, N, eps, H: tl.constexpr, BLOCK: tl.constexpr,
                            ROWS: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK)
        in_h = cols < H
        inside = (rows < N)[:, None] & in_h[None, :]
        offs = rows.to(tl.int64)[:, None] * H + cols[None, :]
        x = tl.load(Y + offs, mask=inside, other=0.0).to(tl.float32) + tl.load(RES + offs, mask=inside, other=0.0)
        mean = tl.sum(x, 1) / H
        centred = tl.where(inside, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, 1) / H + eps)
        w = tl.load(W + cols, mask=in_h, other=0.0)
        b = tl.load(B + cols, mask=in_h, other=0.0)
        out = centred * rstd[:, None] * w[None, :] + b[None, :]
        tl.store(OUT + offs, out, mask=inside)
        tl.store(LOW + offs, out.to(LOW.dtype.element_ty), mask=inside)


def add_layer_norm(y: torch.Tensor, residual: torch.Tensor, norm: torch.nn.LayerNorm,
                   low: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``LayerNorm(y + residual)`` and its copy in ``low``; fused when residual and norm are fp32."""
    if (torch.compiler.is_compiling() or y.numel() == 0 or residual.dtype != torch.float32
            or norm.weight.dtype != torch.float32):
        out = norm(y + residual)
        return out, out.to(low)
    reason = triton_attention.triton_unavailable_reason(y.device)
    if reason is not None:
        raise RuntimeError(reason)
    width = y.shape[-1]
    y, residual = y.contiguous(), residual.contiguous()
    out = torch.empty(residual.shape, dtype=torch.float32, device=y.device)
    copy = torch.empty(residual.shape, dtype=low, device=y.device)
    rows = y.numel() // width
    _add_layer_norm_fwd[(triton.cdiv(rows, _ROWS),)](
        y, residual, norm.weight, norm.bias, out, copy, rows, float(norm.eps),
        H=width, BLOCK=triton.next_power_of_2(width), ROWS=_ROWS, num_warps=4,
    )
    return out, copy
