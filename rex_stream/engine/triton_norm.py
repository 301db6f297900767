"""The fused fast path's LayerNorm blocks as Triton kernels (used with the "triton" attention in 16 bit).

Each post-LN block of the encoder computes ``LayerNorm(dense(x) + residual)``. Under autocast that
is three memory-bound kernels per block — a mixed-dtype add (bf16 + fp32, not vectorised), the fp32
LayerNorm, and autocast's cast of the result to bf16 for the next matmul — about a fifth of the
engine's GPU time on ner (H100 kernel profile, run 3b). Here one kernel reads the matmul output and
the residual once and writes the fp32 result (the next residual) and its bf16/fp16 copy (the next
matmul's input). The maths is the same as the eager path: the sum and the normalisation in fp32,
biased variance, the reduced copy rounded from the fp32 result; only the reduction order differs.

The two blocks around layer 0 get the same treatment (``embed_layer_norm``, ``conv_mix``): the
embedding LayerNorm and mask, taken straight to the packed tokens, with the conv's 16-bit padded
input written on the way; and the conv's GELU, mask, residual add and LayerNorm on the packed
tokens. Eagerly those are about ten elementwise, gather and cast kernels per forward.

Used by ``RexModel`` when the "triton" attention is active and the compute dtype is 16-bit; its
failures take the same fallback as the attention kernel (the whole fast path drops to SDPA).
Under ``torch.compile`` the eager expressions are used (Inductor fuses them by itself); they are
also the tests' references.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rex_stream.engine import triton_attention

triton, tl = triton_attention.triton, triton_attention.tl

_ROWS = 4  # rows per program: 768-wide rows are short, a few per program keep the loads wide

if triton is not None:

    @triton.jit
    def _row_block(N, H: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr):
        """This program's ROWS rows of N, its BLOCK columns, and which of them are real."""
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        in_r = rows < N
        cols = tl.arange(0, BLOCK)
        in_h = cols < H
        return rows, in_r, cols, in_h, in_r[:, None] & in_h[None, :]

    @triton.jit
    def _normalise(x, inside, W, B, cols, in_h, eps, H: tl.constexpr):
        """LayerNorm of the [ROWS, BLOCK] fp32 rows ``x`` (columns beyond H masked), in fp32."""
        mean = tl.sum(x, 1) / H
        centred = tl.where(inside, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, 1) / H + eps)
        w = tl.load(W + cols, mask=in_h, other=0.0)
        b = tl.load(B + cols, mask=in_h, other=0.0)
        return centred * rstd[:, None] * w[None, :] + b[None, :]

    @triton.jit(do_not_specialize=["N"])
    def _add_layer_norm_fwd(Y, RES, W, B, OUT, LOW, N, eps, H: tl.constexpr, BLOCK: tl.constexpr,
                            ROWS: tl.constexpr):
        rows, in_r, cols, in_h, inside = _row_block(N, H, BLOCK, ROWS)
        offs = rows.to(tl.int64)[:, None] * H + cols[None, :]
        x = tl.load(Y + offs, mask=inside, other=0.0).to(tl.float32) + tl.load(RES + offs, mask=inside, other=0.0)
        out = _normalise(x, inside, W, B, cols, in_h, eps, H)
        tl.store(OUT + offs, out, mask=inside)
        tl.store(LOW + offs, out.to(LOW.dtype.element_ty), mask=inside)

    @triton.jit(do_not_specialize=["N"])
    def _embed_fwd(IDS, KEEP, INDEX, EMB, W, B, OUT, LOW, PADDED, N, eps, H: tl.constexpr, BLOCK: tl.constexpr,
                   ROWS: tl.constexpr):
        # Packed token t is flat position INDEX[t] of the padded batch.
        rows, in_r, cols, in_h, inside = _row_block(N, H, BLOCK, ROWS)
        flat = tl.load(INDEX + rows, mask=in_r, other=0)
        token = tl.load(IDS + flat, mask=in_r, other=0)
        keep = (tl.load(KEEP + flat, mask=in_r, other=0) != 0).to(tl.float32)
        x = tl.load(EMB + token[:, None] * H + cols[None, :], mask=inside, other=0.0).to(tl.float32)
        out = _normalise(x, inside, W, B, cols, in_h, eps, H) * keep[:, None]
        offs = rows.to(tl.int64)[:, None] * H + cols[None, :]
        tl.store(OUT + offs, out, mask=inside)
        out_low = out.to(LOW.dtype.element_ty)
        tl.store(LOW + offs, out_low, mask=inside)
        tl.store(PADDED + flat[:, None] * H + cols[None, :], out_low, mask=inside)

    @triton.jit(do_not_specialize=["N", "L"])
    def _conv_mix_fwd(CONV, LAYER0, INDEX, KEEP, W, B, OUT, LOW, N, L, stride_cb, stride_cl, stride_ch, eps,
                      H: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr):
        rows, in_r, cols, in_h, inside = _row_block(N, H, BLOCK, ROWS)
        flat = tl.load(INDEX + rows, mask=in_r, other=0)
        keep = tl.load(KEEP + flat, mask=in_r, other=0) != 0
        conv_ptrs = CONV + (flat // L)[:, None] * stride_cb + (flat % L)[:, None] * stride_cl + cols[None, :] * stride_ch
        c = tl.load(conv_ptrs, mask=inside & keep[:, None], other=0.0).to(tl.float32)
        gelu = 0.5 * c * (1.0 + tl.erf(c * 0.7071067811865476))  # exact (erf) GELU, as F.gelu
        offs = rows.to(tl.int64)[:, None] * H + cols[None, :]
        x = tl.load(LAYER0 + offs, mask=inside, other=0.0) + gelu
        out = _normalise(x, inside, W, B, cols, in_h, eps, H) * keep.to(tl.float32)[:, None]
        tl.store(OUT + offs, out, mask=inside)
        tl.store(LOW + offs, out.to(LOW.dtype.element_ty), mask=inside)


def _launchable(device: torch.device) -> None:
    reason = triton_attention.triton_unavailable_reason(device)
    if reason is not None:
        raise RuntimeError(reason)


def _grid(rows: int) -> tuple[int]:
    return (triton.cdiv(rows, _ROWS),)


def _as_loadable(mask: torch.Tensor) -> torch.Tensor:
    """The flat mask in a dtype triton loads everywhere (bool as the same bytes in int8)."""
    mask = mask.reshape(-1).contiguous()
    return mask.view(torch.int8) if mask.dtype == torch.bool else mask


def add_layer_norm(y: torch.Tensor, residual: torch.Tensor, norm: torch.nn.LayerNorm,
                   low: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``LayerNorm(y + residual)`` and its copy in ``low``; fused when residual and norm are fp32."""
    if (torch.compiler.is_compiling() or y.numel() == 0 or residual.dtype != torch.float32
            or norm.weight.dtype != torch.float32):
        out = norm(y + residual)
        return out, out.to(low)
    _launchable(y.device)
    width = y.shape[-1]
    y, residual = y.contiguous(), residual.contiguous()
    out = torch.empty(residual.shape, dtype=torch.float32, device=y.device)
    copy = torch.empty(residual.shape, dtype=low, device=y.device)
    rows = y.numel() // width
    _add_layer_norm_fwd[_grid(rows)](
        y, residual, norm.weight, norm.bias, out, copy, rows, float(norm.eps),
        H=width, BLOCK=triton.next_power_of_2(width), ROWS=_ROWS, num_warps=4,
    )
    return out, copy


def reference_embed(input_ids: torch.Tensor, keep: torch.Tensor, embedding: torch.nn.Embedding,
                    norm: torch.nn.LayerNorm) -> torch.Tensor:
    """The embedding block: ``LayerNorm(embedding(ids)) * keep`` over the padded [B, L] batch (fp32; the
    model's exact path runs this)."""
    return norm(embedding(input_ids)) * keep.unsqueeze(-1)


def reference_embed_layer_norm(input_ids: torch.Tensor, keep: torch.Tensor, index: torch.Tensor,
                               embedding: torch.nn.Embedding, norm: torch.nn.LayerNorm,
                               low: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``embed_layer_norm`` eagerly."""
    full = reference_embed(input_ids, keep, embedding, norm)
    out = full.flatten(0, 1).index_select(0, index)
    return out, out.to(low), full.to(low)


def embed_layer_norm(input_ids: torch.Tensor, keep: torch.Tensor, index: torch.Tensor, embedding: torch.nn.Embedding,
                     norm: torch.nn.LayerNorm, low: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``reference_embed`` at the packed tokens ``index`` ([T] flat positions of [B, L]) in one kernel:
    returns the fp32 [T, hidden] block output, its ``low`` copy, and the ``low`` padded [B, L, hidden]
    batch (zero at unpacked positions) that the layer-0 conv reads."""
    if torch.compiler.is_compiling() or embedding.weight.dtype != torch.float32 or norm.weight.dtype != torch.float32:
        return reference_embed_layer_norm(input_ids, keep, index, embedding, norm, low)
    _launchable(input_ids.device)
    width = embedding.weight.shape[-1]
    padded = torch.zeros(*input_ids.shape, width, dtype=low, device=input_ids.device)
    tokens = index.numel()
    out = torch.empty(tokens, width, dtype=torch.float32, device=input_ids.device)
    copy = torch.empty(tokens, width, dtype=low, device=input_ids.device)
    if tokens:
        _embed_fwd[_grid(tokens)](
            input_ids.reshape(-1).contiguous(), _as_loadable(keep), index, embedding.weight, norm.weight, norm.bias,
            out, copy, padded, tokens, float(norm.eps),
            H=width, BLOCK=triton.next_power_of_2(width), ROWS=_ROWS, num_warps=4,
        )
    return out, copy, padded


def reference_conv_mix(conv: torch.Tensor, layer0: torch.Tensor, index: torch.Tensor, keep: torch.Tensor,
                       norm: torch.nn.LayerNorm, low: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``conv_mix`` eagerly: ``LayerNorm(layer0 + gelu(conv masked)) * keep`` at the packed tokens (fp32), and
    its ``low`` copy."""
    out = F.gelu(conv.masked_fill(~keep.bool().unsqueeze(-1), 0)).flatten(0, 1).index_select(0, index)
    kept = keep.reshape(-1).index_select(0, index).unsqueeze(-1)
    out = norm(layer0 + out) * kept
    return out, out.to(low)


def conv_mix(conv: torch.Tensor, layer0: torch.Tensor, index: torch.Tensor, keep: torch.Tensor,
             norm: torch.nn.LayerNorm, low: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``reference_conv_mix`` in one kernel: conv [B, L, hidden] (any strides, 16-bit), layer 0's fp32
    output at the packed tokens [T, hidden], ``index`` their flat positions, ``keep`` [B, L]. Returns
    the fp32 block output and its ``low`` copy (layer 1's input). The GELU is applied in fp32 to the
    conv output as it is (eagerly it is rounded to 16 bit in between)."""
    if torch.compiler.is_compiling() or layer0.dtype != torch.float32 or norm.weight.dtype != torch.float32:
        return reference_conv_mix(conv, layer0, index, keep, norm, low)
    _launchable(conv.device)
    tokens, width = layer0.shape
    layer0 = layer0.contiguous()
    out = torch.empty_like(layer0)
    copy = torch.empty(layer0.shape, dtype=low, device=layer0.device)
    if tokens:
        _conv_mix_fwd[_grid(tokens)](
            conv, layer0, index, _as_loadable(keep), norm.weight, norm.bias, out, copy, tokens, conv.shape[1],
            *conv.stride(), float(norm.eps),
            H=width, BLOCK=triton.next_power_of_2(width), ROWS=_ROWS, num_warps=4,
        )
    return out, copy
