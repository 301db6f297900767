"""Fused Triton kernel for the encoder's disentangled attention (``RexModel.set_attention("triton")``).

The default ("sdpa") path materialises, per layer, an int64 [B, H, L, L] gather index, two gathered
bias tensors, their sum and a masked copy, and SDPA then reads the dense bias back. Here none of
that exists, and there is no padding: the model packs its rows back to back on one token axis of T
tokens (``pack_rows``), so every GEMM of the layer runs on real tokens only. The two [H, T, R]
position tables

* ``C2P = q @ pos_k^T`` (content-to-position) and ``P2C = k @ pos_q^T`` (position-to-content),

are computed with one batched matmul per table, head-major so each head is a single tall GEMM
([T, D] x [D, R], reading q/k in place; R <= 2L-1 reachable relative distances, tables pre-scaled;
the table rows are padded to a multiple of 8 entries so the GEMM writes aligned rows),
and one flash-attention style kernel computes, per (row b, head h) and query tile,

    score_ij = scale * q_i.k_j + C2P[i, d_ij] + P2C[j, d_ij],
    d_ij     = clamp(pos[i] - pos[j] + offset, 0, R - 1)        (offset = S - lo),

gathering the two bias scalars by pointer arithmetic, masking with the prompt-isolation rule of
``fast_attention.layout_allowed`` evaluated from the per-token ``group``/``slot``/``valid`` vectors,
and running an online softmax in fp32. A row with no allowed key (padding) comes out exactly 0.
The output is written as [T, H, D], i.e. ready to be viewed as the [T, H*D] layer input.

Row b is the tokens ``starts[b] .. starts[b] + lengths[b] - 1`` (``Rows``); only those are visited,
and query tiles starting at or beyond ``lengths[b]`` do nothing. ``disentangled_attention`` runs the
same kernel on a padded [B, L] batch (row b starting at b * L; the kernel benchmarks and tests use it).

``reference_attention`` computes the same thing densely in torch (tests only). On CPU the kernel
runs under the Triton interpreter when ``TRITON_INTERPRET=1`` was set before this module was
imported (slow; for tests).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from rex_stream.engine.fast_attention import layout_allowed

try:  # an optional dependency: a missing or broken triton only makes this path unavailable
    import triton
    import triton.language as tl

    _IMPORT_ERROR: str | None = None
except Exception as exc:  # noqa: BLE001  # pragma: no cover - any import failure means: no triton
    triton = tl = None  # type: ignore[assignment]
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

# Read when the kernel below is decorated, as triton.jit itself does: setting it later has no effect.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "") == "1"

# Tile configurations per device type, by the rows' width (the batch's longest row): the first entry
# whose bound covers the width applies. The CUDA table is what `bench/tile_sweep.py` derived on an
# H200 from the engine's own ner/re/mix batches (BENCHMARKS run 18, after run 16's first table). The
# kernel is latency-bound and register-heavy (212-255 registers per thread): rows of 81-96 tokens
# fill 32 x 32 tiles better than 64 x 64 ones (a 90-token row fills 4 of 64 x 64 tiles to 49 %, 9 of
# 32 x 32 ones to 88 %), and on one warp per program an SM runs more of them at once (0.70 ms against
# 0.83 on two warps and 0.91 on 64 x 64 tiles, ner's width-90 batch); everywhere else 64 x 64 tiles on
# 4 warps with a single stage were fastest. The CPU entries are for the interpreter (tests): small
# tiles, so short sequences still span several tiles in both directions, and two of them, so the
# tests cross a policy boundary.
TILE_POLICY: dict[str, tuple[tuple[int, dict[str, int]], ...]] = {
    "cuda": (
        (80, {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 1}),
        (96, {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 1, "num_stages": 2}),
        (1 << 30, {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 1}),
    ),
    "cpu": (
        (24, {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}),
        (1 << 30, {"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}),
    ),
}


def tile_config(device_type: str, width: int) -> dict[str, int]:
    """The tile configuration for rows of at most ``width`` tokens on ``device_type`` (unknown: cuda's)."""
    policy = TILE_POLICY.get(device_type, TILE_POLICY["cuda"])
    return dict(next((config for bound, config in policy if width <= bound), policy[-1][1]))


# Runtime integers of ``_disentangled_fwd`` that triton must not specialise on (see there).
DO_NOT_SPECIALIZE = ("B", "H", "L", "N", "R", "RS", "offset")

# Row width of the position tables is padded to a multiple of this: the table GEMM's output rows
# (R = 2L-1 values, odd) would otherwise be misaligned, and cuBLAS then falls back to an old sm75
# kernel (~11% of the engine's GPU time on ner, H100 profile of run 3b).
TABLE_ALIGN = 8


def aligned_rows(rows: int) -> int:
    """``rows`` rounded up to a multiple of ``TABLE_ALIGN``."""
    return rows + (-rows % TABLE_ALIGN)


def triton_unavailable_reason(device: torch.device | str) -> str | None:
    """None if the kernel can run on tensors of ``device``, else why not."""
    if _IMPORT_ERROR is not None:
        return f"triton unavailable ({_IMPORT_ERROR})"
    device = torch.device(device)
    if _INTERPRET:
        return None  # the interpreter runs any device's tensors (through host copies)
    if device.type != "cuda":
        return (f"the triton attention kernel needs a CUDA device, not {device.type!r} "
                "(or TRITON_INTERPRET=1 set before import, for the slow interpreter)")
    if not torch.cuda.is_available():
        return "CUDA is not available"
    return None


if triton is not None:

    @triton.jit
    def _mma(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        """acc + a @ b, accumulated in fp32. UPCAST (interpreter only: its tl.dot is wrong on bf16
        operands) multiplies fp32 copies of the same values instead."""
        if UPCAST:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        return tl.dot(a, b, acc, input_precision=PRECISION)

    # Integer arguments are specialised by triton (value 1 becomes a constant, multiples of 16 get a
    # divisibility hint), so every new (L == 1, L % 16 == 0, R == 1, offset % 16 == 0, ...) combination
    # would compile another kernel: measured on an H100 (triton 3.6), 5 compilations (~1.8 s each) over
    # 64 ragged (B, L) shapes x 2 q/k/v layouts without this list, 1 with it, same kernel time. The
    # strides stay specialised: for the model's q/k/v views (rows of one [T, n*hidden] projection)
    # the token, head and element strides are constants, so they never change the key, and their
    # divisibility is what lets the compiler vectorise the q/k/v loads: also listing the (then)
    # batch and head strides made the bf16 kernel 7-40% slower (B=64 L=128: 129 -> 168 us).
    @triton.jit
    def _token_attributes(POS, GROUP, SLOT, VALID, index, inside):
        """Position id, group, slot and validity of the tokens at `index` of the four vectors (masked: none).

        All as int32 (the inputs are int64; their values are token counts): the tile's comparisons
        then take one instruction each instead of a pair."""
        pos = tl.load(POS + index, mask=inside, other=0).to(tl.int32)
        group = tl.load(GROUP + index, mask=inside, other=-1).to(tl.int32)
        slot = tl.load(SLOT + index, mask=inside, other=-1).to(tl.int32)
        valid = tl.load(VALID + index, mask=inside, other=0) != 0
        return pos, group, slot, valid

    @triton.jit(do_not_specialize=list(DO_NOT_SPECIALIZE))
    def _disentangled_fwd(
        Q, K, V, C2P, P2C, POS, GROUP, SLOT, VALID, STARTS, LENGTHS, OUT,
        stride_qt, stride_qh, stride_qd,
        stride_kt, stride_kh, stride_kd,
        stride_vt, stride_vh, stride_vd,
        B, H, L, N, R, RS, offset, qk_scale,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    ):
        # One program per (query tile, row*head); tiles of one (row, h) are adjacent, sharing K/V in L2.
        # Row b's tokens are tokens STARTS[b] .. STARTS[b] + LENGTHS[b] - 1 of the [N] token axis.
        LOG2E: tl.constexpr = 1.4426950408889634
        num_m = tl.cdiv(L, BLOCK_M)
        pid = tl.program_id(0)
        pid_m = pid % num_m
        pid_bh = pid // num_m
        b = pid_bh // H
        h = (pid_bh % H).to(tl.int64)
        length = tl.load(LENGTHS + b)
        start = tl.load(STARTS + b).to(tl.int64)
        # Everything a program touches lies in its row: scalar 64-bit bases at the row's first token,
        # int32 offsets within the row (fewer 64-bit operations and registers per tile element).
        pos_row, grp_row, slt_row, val_row = POS + start, GROUP + start, SLOT + start, VALID + start
        q_row = Q + h * stride_qh + start * stride_qt
        k_row = K + h * stride_kh + start * stride_kt
        v_row = V + h * stride_vh + start * stride_vt
        # The [H, N, RS] tables are contiguous (R used columns); token t's row of head h is at (h*N + t)*RS.
        c2p_row = C2P + (h * N + start) * RS
        p2c_row = P2C + (h * N + start) * RS

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        in_m = offs_m < length
        in_d = offs_d < HEAD_DIM

        # Per-query-token attributes (the [N] vectors are contiguous). The distance offset is folded
        # into the query positions once, not added per score.
        pos_i, grp_i, slt_i, val_i = _token_attributes(pos_row, grp_row, slt_row, val_row, offs_m, in_m)
        pos_i += offset

        q = tl.load(q_row + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                    mask=in_m[:, None] & in_d[None, :], other=0.0)
        c2p_rows = c2p_row + offs_m[:, None] * RS

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        bias_scale = LOG2E / qk_scale

        # A query tile entirely beyond the row's length visits no key tile and stores nothing.
        n_end = tl.where(pid_m * BLOCK_M < length, length, 0)
        for start_n in range(0, n_end, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            in_n = offs_n < length
            pos_j, grp_j, slt_j, val_j = _token_attributes(pos_row, grp_row, slt_row, val_row, offs_n, in_n)
            kt = tl.load(k_row + offs_n[None, :] * stride_kt + offs_d[:, None] * stride_kd,
                         mask=in_n[None, :] & in_d[:, None], other=0.0)
            v = tl.load(v_row + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd,
                        mask=in_n[:, None] & in_d[None, :], other=0.0)

            # Relative distance, then the two bias gathers (pointer arithmetic, no L x L tensor).
            d = tl.minimum(tl.maximum(pos_i[:, None] - pos_j[None, :], 0), R - 1)
            inside = in_m[:, None] & in_n[None, :]
            c2p = tl.load(c2p_rows + d, mask=inside, other=0.0).to(tl.float32)
            # P2C is gathered as a [keys, queries] tile and transposed: along the queries (the fast
            # axis) the entries of one key's row are adjacent (d grows with pos_i), so a warp's loads
            # share sectors; gathered [queries, keys] they were a table row apart (3.5-8 % slower
            # attention on an H200, bench/results/h200-run6/tile_sweep_p2c.jsonl).
            d_t = tl.minimum(tl.maximum(pos_i[None, :] - pos_j[:, None], 0), R - 1)
            p2c_ptrs = p2c_row + (offs_n[:, None] * RS + d_t)
            p2c = tl.trans(tl.load(p2c_ptrs, mask=in_n[:, None] & in_m[None, :], other=0.0)).to(tl.float32)

            # Prompt isolation (`fast_attention.layout_allowed`): two prompt tokens (group >= 0) see each
            # other only in the same group and, where both have a slot, the same slot. The per-token
            # tests are vectors; `valid` is False outside the row, so it also masks the tile's edges.
            both_prompt = (grp_i >= 0)[:, None] & (grp_j >= 0)[None, :]
            both_slot = (slt_i >= 0)[:, None] & (slt_j >= 0)[None, :]
            apart = (grp_i[:, None] != grp_j[None, :]) | (both_slot & (slt_i[:, None] != slt_j[None, :]))
            allowed = val_i[:, None] & val_j[None, :] & ~(both_prompt & apart)

            # Scores in log2 units (exp2(x * log2 e) == exp(x)): (q.k^T + bias / scale) * qk_scale, the bias
            # as the product's initial accumulator. Added after the product instead, it made triton 3.6
            # keep the softmax in two register layouts and compute every exp2 twice (ptxas for sm_90:
            # 70 ex2 instructions against 34, 255 registers with spills against 216 without).
            s = _mma(q, kt, (c2p + p2c) * bias_scale, PRECISION, UPCAST_DOT) * qk_scale
            s = tl.where(allowed, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing allowed yet: avoid -inf - -inf
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = _mma(p.to(v.dtype), v, acc * alpha[:, None], PRECISION, UPCAST_DOT)
            m_i = m_new

        # Rows with nothing allowed have acc == 0 and l_i == 0: they store exactly 0.
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        # OUT is [N, H, D] contiguous.
        o_ptrs = OUT + (start * H + h) * HEAD_DIM + (offs_m[:, None] * (H * HEAD_DIM) + offs_d[None, :])
        tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=in_m[:, None] & in_d[None, :])


class Rows(NamedTuple):
    """Where a batch's rows lie on the kernel's token axis: row b is tokens
    ``starts[b] .. starts[b] + lengths[b] - 1``."""

    starts: torch.Tensor  # [B] int32
    lengths: torch.Tensor  # [B] int32, at least the row's last valid token's index + 1
    width: int  # the longest row's length: query tiles per row


class Packing(NamedTuple):
    """A padded [B, L] batch's rows packed back to back: ``index`` [T] holds each packed token's
    flat position in [B * L]."""

    index: torch.Tensor
    rows: Rows


def pack_rows(lengths: Sequence[int], width: int, device: torch.device) -> Packing:
    """The packing of rows of ``lengths`` tokens (each a prefix of a ``width``-wide padded row).

    Built on the host from host lengths and sent in one asynchronous copy, so that sizing the packed
    tensors never waits for the device.
    """
    counts = np.asarray(lengths, dtype=np.int64).reshape(-1)
    starts = np.cumsum(counts) - counts
    total = int(counts.sum())
    index = np.arange(total, dtype=np.int64) + np.repeat(np.arange(len(counts)) * width - starts, counts)
    host = torch.from_numpy(np.concatenate([index, starts, counts]))
    if device.type == "cuda":
        host = host.pin_memory()
    buf = host.to(device, non_blocking=True)
    # Two allocations, not two views of one: triton specialises on 16-byte pointer alignment, and the
    # second half of one [2, B] int32 buffer is aligned only when B is a multiple of 4 (a second
    # kernel binary, compiled mid-run: seen on an H200 in the first run of this code).
    starts_d, counts_d = (part.to(torch.int32) for part in buf[total:].view(2, -1).unbind(0))
    return Packing(buf[:total], Rows(starts_d, counts_d, width))


def _launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, c2p: torch.Tensor, p2c: torch.Tensor,
            position_ids: torch.Tensor, group: torch.Tensor, slot: torch.Tensor, valid: torch.Tensor,
            starts: torch.Tensor, lengths: torch.Tensor, width: int, offset: int, scale: float,
            config: dict[str, int], reach: int, zero_rest: bool) -> torch.Tensor:
    """Run the kernel on the [N] token axis (q/k/v [N, H, D], tables [H, N, RS] with the first
    ``reach`` columns used, token attributes [N]); returns a new [N, H, D] tensor. Tokens outside
    every row are not written: zeros with ``zero_rest``, else left uninitialised."""
    tokens, heads, dim = q.shape
    out = (torch.zeros if zero_rest else torch.empty)(tokens, heads, dim, dtype=q.dtype, device=q.device)
    if out.numel() == 0 or starts.numel() == 0:
        return out
    if valid.dtype == torch.bool:
        valid = valid.contiguous().view(torch.int8)  # same bytes, a type triton loads everywhere
    # fp32 inputs follow torch's matmul setting (the engine turns TF32 off: exact fp32, no tensor
    # cores); for 16-bit inputs "tf32" is triton's default and means nothing.
    ieee = q.dtype == torch.float32 and not (q.device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32)
    block_m, block_n = config["BLOCK_M"], config["BLOCK_N"]
    grid = (triton.cdiv(width, block_m) * starts.numel() * heads,)
    _disentangled_fwd[grid](
        q, k, v, c2p, p2c, position_ids.contiguous(), group.contiguous(), slot.contiguous(), valid,
        starts.to(torch.int32).contiguous(), lengths.to(torch.int32).contiguous(), out,
        *q.stride(), *k.stride(), *v.stride(),
        starts.numel(), heads, int(width), tokens, int(reach), c2p.shape[-1], int(offset),
        float(scale) * 1.4426950408889634,
        HEAD_DIM=dim, BLOCK_D=max(16, triton.next_power_of_2(dim)), BLOCK_M=block_m, BLOCK_N=block_n,
        PRECISION="ieee" if ieee else "tf32",
        # The interpreter's tl.dot is wrong on bf16 operands (triton 3.9: garbage even for one 16x16
        # tile); multiplying fp32 copies of the same bf16 values gives what the GPU's MMA gives.
        UPCAST_DOT=_INTERPRET and q.dtype == torch.bfloat16,
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    return out


if triton is not None:
    # Inside a torch.compile-d encoder the launch is an opaque custom op (eager calls skip the op
    # dispatcher's overhead and call _launch directly). The policy's tile configuration applies.
    @torch.library.custom_op("rex_stream::disentangled_attention", mutates_args=())
    def _launch_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, c2p: torch.Tensor, p2c: torch.Tensor,
                   position_ids: torch.Tensor, group: torch.Tensor, slot: torch.Tensor, valid: torch.Tensor,
                   starts: torch.Tensor, lengths: torch.Tensor, width: int, offset: int, scale: float, reach: int,
                   zero_rest: bool) -> torch.Tensor:
        return _launch(q, k, v, c2p, p2c, position_ids, group, slot, valid, starts, lengths, width, offset, scale,
                       tile_config(q.device.type, width), reach, zero_rest)

    @_launch_op.register_fake
    def _(q: torch.Tensor, *args: Any) -> torch.Tensor:
        return q.new_empty(q.shape)


def _aligned(pos: torch.Tensor) -> torch.Tensor:
    """``pos`` [H, R, D] with zero rows appended up to a multiple of ``TABLE_ALIGN`` (a tiny copy)."""
    extra = aligned_rows(pos.shape[-2]) - pos.shape[-2]
    return torch.nn.functional.pad(pos, (0, 0, 0, extra)) if extra else pos


def _table(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """[H, N, R] = x @ pos^T per head for x [N, H, D], as one bmm of H tall GEMMs.

    For the model's projections ([N, n*hidden] outputs viewed as [N, H, D]) the head-major
    [H, N, D] view needs no copy; broadcasting x @ pos^T over the batch instead ran B*H small
    GEMMs on an old kernel plus a copy of x (~14% of GPU time on ner, measured on an H100).
    """
    return torch.bmm(x.transpose(0, 1), pos.transpose(-1, -2))


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos_q: torch.Tensor, pos_k: torch.Tensor,
               position_ids: torch.Tensor, group: torch.Tensor, slot: torch.Tensor, valid: torch.Tensor,
               rows: Rows, offset: int, scale: float, config: dict[str, Any] | None, reach: int | None,
               zero_rest: bool) -> torch.Tensor:
    """Tables and kernel on the token axis (see ``packed_attention``); returns [N, H*D]."""
    reason = triton_unavailable_reason(q.device)
    if reason is not None:
        raise RuntimeError(reason)
    tokens, heads, dim = q.shape
    reach = pos_k.shape[-2] if reach is None else reach
    c2p, p2c = _table(q, _aligned(pos_k)), _table(k, _aligned(pos_q))
    tensors = (q, k, v, c2p, p2c, position_ids, group, slot, valid, rows.starts, rows.lengths)
    if torch.compiler.is_compiling():
        out = _launch_op(*tensors, int(rows.width), int(offset), float(scale), reach, zero_rest)
    else:
        config = dict(config) if config else tile_config(q.device.type, rows.width)
        out = _launch(*tensors, rows.width, offset, scale, config, reach, zero_rest)
    return out.view(tokens, heads * dim)


def packed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos_q: torch.Tensor, pos_k: torch.Tensor,
    position_ids: torch.Tensor, group: torch.Tensor, slot: torch.Tensor, valid: torch.Tensor,
    rows: Rows, offset: int, scale: float, *, config: dict[str, Any] | None = None, reach: int | None = None,
) -> torch.Tensor:
    """Attention context [T, H*D] of rows packed back to back on one token axis (no padding).

    q, k, v: [T, H, D] (any strides; the model's are views of one [T, 3*hidden] projection);
    position_ids, group, slot: [T] int64 (-1: none); valid: [T] bool; ``rows`` says which tokens form
    each row (``pack_rows``). pos_q, pos_k, offset, scale, config and reach as for
    ``disentangled_attention``. Every packed token belongs to a row, so every output row is written.
    """
    return _attention(q, k, v, pos_q, pos_k, position_ids, group, slot, valid, rows, offset, scale, config, reach,
                      zero_rest=False)


def disentangled_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos_q: torch.Tensor, pos_k: torch.Tensor,
    position_ids: torch.Tensor, group: torch.Tensor, slot: torch.Tensor, valid: torch.Tensor,
    lengths: torch.Tensor, offset: int, scale: float, *, config: dict[str, Any] | None = None,
    reach: int | None = None,
) -> torch.Tensor:
    """Attention context [B, L, H*D] (q's dtype) of a padded batch, fused (the kernel benchmarks and
    tests call this; the model packs its rows and calls ``packed_attention``).

    q, k, v: [B, H, L, D] (any strides); pos_q, pos_k: [H, R, D] reachable rows of the pre-scaled
    relative projections; position_ids, group, slot: [B, L] int64 (-1: none); valid: [B, L] bool;
    lengths: [B] int, at least last valid index + 1 per row (positions beyond come out 0);
    ``offset = S - lo``. ``config`` overrides the tile configuration of ``TILE_POLICY``. ``reach``:
    how many of the tables' rows are reachable (default: all). Tables whose row count is already a
    multiple of ``TABLE_ALIGN`` (the model's cached tables carry spare rows for this) are used
    without a padded copy.
    """
    batch, heads, length, dim = q.shape
    starts = torch.arange(batch, device=q.device, dtype=torch.int32) * length
    q, k, v = (t.transpose(1, 2).reshape(batch * length, heads, dim) for t in (q, k, v))
    flat = (t.reshape(-1) for t in (position_ids, group, slot, valid))
    out = _attention(q, k, v, pos_q, pos_k, *flat, Rows(starts, lengths, length), offset, scale, config, reach,
                     zero_rest=True)
    return out.view(batch, length, heads * dim)


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos_q: torch.Tensor, pos_k: torch.Tensor,
    position_ids: torch.Tensor, group: torch.Tensor, slot: torch.Tensor, valid: torch.Tensor,
    lengths: torch.Tensor, offset: int, scale: float, *, reach: int | None = None,
) -> torch.Tensor:
    """Dense torch version of ``disentangled_attention`` (tests only; ``lengths`` only skips work there)."""
    batch, heads, length, dim = q.shape
    rel = position_ids[:, :, None] - position_ids[:, None, :] + offset
    last = (pos_k.shape[-2] if reach is None else reach) - 1
    index = rel.clamp(0, last)[:, None].expand(batch, heads, length, length)
    c2p = torch.gather(q @ pos_k.mT, -1, index)
    p2c = torch.gather(k @ pos_q.mT, -1, index.mT).mT
    scores = (scale * (q @ k.mT) + c2p + p2c).float()
    scores = scores.masked_fill(~layout_allowed(group, slot, valid)[:, None], float("-inf"))
    ctx = torch.softmax(scores, -1).nan_to_num(0.0) @ v.float()
    return ctx.to(q.dtype).transpose(1, 2).reshape(batch, length, heads * dim)


def reference_packed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos_q: torch.Tensor, pos_k: torch.Tensor,
    position_ids: torch.Tensor, group: torch.Tensor, slot: torch.Tensor, valid: torch.Tensor,
    rows: Rows, offset: int, scale: float, *, reach: int | None = None,
) -> torch.Tensor:
    """Dense torch version of ``packed_attention`` (tests only): the rows padded, ``reference_attention``,
    the rows' tokens taken back."""
    lengths = rows.lengths.long()
    batch, width = lengths.numel(), rows.width
    index = (torch.arange(width, device=q.device) < lengths[:, None]).flatten().nonzero().squeeze(1)
    if not torch.equal(rows.starts.long(), torch.cumsum(lengths, 0) - lengths):
        raise ValueError("the reference takes rows packed back to back in order")

    def padded(t: torch.Tensor, fill: int = 0) -> torch.Tensor:
        out = t.new_full((batch * width, *t.shape[1:]), fill)
        return out.index_copy_(0, index, t).view(batch, width, *t.shape[1:])

    q, k, v = (padded(t).transpose(1, 2) for t in (q, k, v))
    attributes = (padded(position_ids), padded(group, -1), padded(slot, -1), padded(valid))
    out = reference_attention(q, k, v, pos_q, pos_k, *attributes, lengths, offset, scale, reach=reach)
    return out.flatten(0, 1).index_select(0, index)
