"""The split-bf16 ("bf16x3") operands of the span head's GEMMs in one Triton pass (the "head" fusion).

An fp32 ``x`` splits into hi = bf16(x) and lo = bf16(x - hi) (x - hi is exact in fp32), and hi + lo is x
to ~2^-17 relative. The span head multiplies two such operands as one bf16 GEMM over three K-blocks,
[a_hi | a_hi | a_lo] . [b_hi | b_lo | b_hi], dropping only a_lo . b_lo (``RexModel._split_bf16_head``).
Eagerly the [..., 3, D] operand took three strided elementwise kernels (cast, copy, subtract): 15-20 %
of the engine's non-GEMM, non-attention kernel time on ner (H200 profile of run 16). Here one kernel
reads x once and writes the three blocks in the order asked for.

On CPU the kernel runs under the Triton interpreter when ``TRITON_INTERPRET=1`` was set before import
(tests); elsewhere off CUDA, ``split_bf16x3`` runs the eager expression.
"""

from __future__ import annotations

import torch

from rex_stream.engine import triton_attention

triton, tl = triton_attention.triton, triton_attention.tl

ORDERS = {"hi,hi,lo": 0, "hi,lo,hi": 1}  # the blocks' order: a GEMM's left operand, then its right one
_ROWS = 16  # rows of x per program
_COLUMNS = 256  # columns per program (at most): the base model's 768 in three

if triton is not None:

    @triton.jit(do_not_specialize=["ROWS_TOTAL"])
    def _split_fwd(X, OUT, ROWS_TOTAL, D: tl.constexpr, LO_SECOND: tl.constexpr, ROWS: tl.constexpr,
                   COLUMNS: tl.constexpr):
        # X [rows, D] contiguous, OUT [rows, 3, D]: element (r, c) goes to (r, part, c). Rows and columns
        # are separate axes so that the compiler sees each row's stores as contiguous and vectorises them
        # (one flat axis with r = offset // D made them scalar: 3x slower than torch's three kernels).
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        cols = tl.program_id(1) * COLUMNS + tl.arange(0, COLUMNS)
        inside = (rows < ROWS_TOTAL)[:, None] & (cols < D)[None, :]
        x = tl.load(X + rows[:, None] * D + cols[None, :], mask=inside, other=0.0)
        hi = x.to(tl.bfloat16)
        lo = (x - hi.to(tl.float32)).to(tl.bfloat16)
        out = OUT + rows[:, None] * (3 * D) + cols[None, :]
        tl.store(out, hi, mask=inside)
        tl.store(out + D, lo if LO_SECOND else hi, mask=inside)
        tl.store(out + 2 * D, hi if LO_SECOND else lo, mask=inside)


def reference_split_bf16x3(x: torch.Tensor, order: str = "hi,hi,lo") -> torch.Tensor:
    """``split_bf16x3`` eagerly (any device; the CPU path and the tests' reference)."""
    hi = x.to(torch.bfloat16)
    lo = torch.sub(x, hi).to(torch.bfloat16)  # the difference in fp32 (exact), rounded once
    blocks = {"hi": hi, "lo": lo}
    return torch.stack([blocks[name] for name in order.split(",")], dim=-2)


def split_bf16x3(x: torch.Tensor, order: str = "hi,hi,lo") -> torch.Tensor:
    """[..., 3, D] bf16 blocks of fp32 ``x`` [..., D] in ``order`` ("hi,hi,lo" or "hi,lo,hi")."""
    lo_second = ORDERS[order]
    if triton is None or (x.device.type != "cuda" and not triton_attention._INTERPRET):
        return reference_split_bf16x3(x, order)
    rows = x.contiguous()
    out = torch.empty(*x.shape[:-1], 3, x.shape[-1], dtype=torch.bfloat16, device=x.device)
    if rows.numel():
        width = x.shape[-1]
        columns = min(_COLUMNS, triton.next_power_of_2(width))
        grid = (triton.cdiv(rows.numel() // width, _ROWS), triton.cdiv(width, columns))
        _split_fwd[grid](rows, out, rows.numel() // width, D=width, LO_SECOND=lo_second, ROWS=_ROWS, COLUMNS=columns)
    return out
