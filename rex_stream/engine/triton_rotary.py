"""Rotary position encoding of the span head's q and k in one Triton kernel (the "rotary" fusion).

``_Rotary.forward`` rotates each interleaved pair (x[2i], x[2i+1]) by the angle pos * freqs[i] with
about ten fp32 elementwise kernels and a ``torch.stack`` that runs as a slow CatArrayBatchedCopy:
~1.5 ms per 65k-token batch of the base model on an H200, q and k together. Here one kernel reads
the projection once (adding its bias, if one is given) and writes the rotated copy.

The maths is eager's: the angle is ``pos.float() * freq`` rounded to fp32, then
out_even = even*cos - odd*sin and out_odd = odd*cos + even*sin, each product rounded (FMA contraction
is switched off for this kernel). Only sin/cos differ: the angle (up to ~511 rad) is first reduced to
[-pi, pi] with a two-part 2*pi, which costs ~1e-7 and keeps the result independent of how well this
Triton build's sin/cos handle large arguments.

Used by ``RexModel.link_logits`` on the fused fast path. Its failures are caught there (one warning,
the eager rotary from then on). On CPU the kernel runs under the Triton interpreter when
``TRITON_INTERPRET=1`` was set before import (tests).
"""

from __future__ import annotations

import math

import torch

from rex_stream.engine import triton_attention

triton, tl = triton_attention.triton, triton_attention.tl

_ROWS = 8  # rows per program
_PAIRS = 128  # (even, odd) pairs per program: 1 KiB of fp32 per row

if triton is not None:
    # 2*pi = _TWO_PI_HI + _TWO_PI_LO: the high part has 8 significant bits, so turns * _TWO_PI_HI is
    # exact for the few hundred turns reachable, and so is its difference to the angle (Sterbenz).
    _TWO_PI_HI = tl.constexpr(6.28125)
    _TWO_PI_LO = tl.constexpr(2 * math.pi - 6.28125)
    _INV_TWO_PI = tl.constexpr(0.5 / math.pi)

    @triton.jit(do_not_specialize=["N"])
    def _rotary_fwd(X, BIAS, POS, FREQS, OUT, N, stride_x, P, F, HAS_BIAS: tl.constexpr, ROWS: tl.constexpr,
                    BLOCK: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        pairs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        in_row = pairs < P
        inside = ((rows < N)[:, None] & in_row[None, :])[:, :, None]
        cols = (2 * pairs)[None, :, None] + tl.arange(0, 2)[None, None, :]  # [1, BLOCK, 2]: (even, odd)
        rows64 = rows.to(tl.int64)[:, None, None]
        x = tl.load(X + rows64 * stride_x + cols, mask=inside, other=0.0)
        if HAS_BIAS:
            x += tl.load(BIAS + cols, mask=in_row[None, :, None], other=0.0)
        even, odd = tl.split(x)
        pos = tl.load(POS + rows, mask=rows < N, other=0).to(tl.float32)
        freq = tl.load(FREQS + pairs % F, mask=in_row, other=0.0)
        angle = pos[:, None] * freq[None, :]
        turns = tl.floor(angle * _INV_TWO_PI + 0.5)
        angle = (angle - turns * _TWO_PI_HI) - turns * _TWO_PI_LO
        cos, sin = tl.cos(angle), tl.sin(angle)
        out = tl.join(even * cos - odd * sin, odd * cos + even * sin)
        tl.store(OUT + rows64 * (2 * P) + cols, out, mask=inside)


def rotate_pairs(x: torch.Tensor, position_ids: torch.Tensor, freqs: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """``_Rotary.forward(x + bias, position_ids)`` for fp32 ``x`` [B, L, W], W = 2 * len(freqs).

    ``x`` may be a strided view whose last dimension is contiguous (q or k as one half of the head's
    [B, L, 2W] output); ``bias`` [W] or None. Returns a new contiguous fp32 tensor.
    """
    width = x.shape[-1]
    if (x.dtype != torch.float32 or width != 2 * freqs.numel() or x.stride(-1) != 1
            or position_ids.shape != x.shape[:-1]):
        raise ValueError(f"rotate_pairs needs fp32 [B, L, {2 * freqs.numel()}] with a contiguous last dimension "
                         f"and [B, L] positions, not {x.dtype} {list(x.shape)} strides {x.stride()}, "
                         f"positions {list(position_ids.shape)}")
    reason = triton_attention.triton_unavailable_reason(x.device)
    if reason is not None:
        raise RuntimeError(reason)
    rows = x.reshape(-1, width)  # a view for the head's halves: their rows are evenly spaced
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    n, pairs = rows.shape[0], width // 2
    if n:
        grid = (triton.cdiv(n, _ROWS), triton.cdiv(pairs, _PAIRS))
        _rotary_fwd[grid](
            rows, rows if bias is None else bias.contiguous(), position_ids.reshape(-1), freqs.contiguous(), out,
            n, rows.stride(0), pairs, freqs.numel(), HAS_BIAS=bias is not None, ROWS=_ROWS, BLOCK=_PAIRS,
            num_warps=4, enable_fp_fusion=False,
        )
    return out
