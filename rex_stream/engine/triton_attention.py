"""Fused Triton kernel for the encoder's disentangled attention (``RexModel.set_attention("triton")``).

The default ("sdpa") path materialises, per layer, an int64 [B, H, L, L] gather index, two gathered
bias tensors, their sum and a masked copy, and SDPA then reads the dense bias back. Here none of
that exists: the two [H, B, L, R] position tables

* ``C2P = q @ pos_k^T`` (content-to-position) and ``P2C = k @ pos_q^T`` (position-to-content),

are computed with one batched matmul per table, head-major so each head is a single tall GEMM
([B*L, D] x [D, R], reading q/k in place; R <= 2L-1 reachable relative distances, tables pre-scaled;
the table rows are padded to a multiple of 8 entries so the GEMM writes aligned rows),
and one flash-attention style kernel computes, per (batch b, head h) and query tile,

    score_ij = scale * q_i.k_j + C2P[i, d_ij] + P2C[j, d_ij],
    d_ij     = clamp(pos[b, i] - pos[b, j] + offset, 0, R - 1)        (offset = S - lo),

gathering the two bias scalars by pointer arithmetic, masking with the prompt-isolation rule of
``fast_attention.layout_allowed`` evaluated from the [B, L] ``group``/``slot``/``valid`` vectors,
and running an online softmax in fp32. A row with no allowed key (padding) comes out exactly 0.
The output is written as [B, L, H, D], i.e. ready to be viewed as the [B, L, H*D] layer input.

Per batch row only the first ``lengths[b]`` keys are visited, and query tiles starting at or
beyond ``lengths[b]`` store zeros without reading anything (valid tokens form a prefix of a row;
``lengths[b]`` must be at least the index of the row's last valid token + 1).

``reference_attention`` computes the same thing densely in torch (tests only). On CPU the kernel
runs under the Triton interpreter when ``TRITON_INTERPRET=1`` was set before this module was
imported (slow; for tests).
"""

from __future__ import annotations

import os
from typing import Any

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

# Tile configuration per device type. Shared memory on CUDA (bf16, D=64, 2 stages): q 8 KiB +
# k/v 2 x 2 x 8 KiB = 40 KiB (fp32: 80 KiB), far below the H100's 227 KiB. The CPU entry is for the
# interpreter (tests): small tiles, so short sequences still span several tiles in both directions.
KERNEL_CONFIGS: dict[str, dict[str, int]] = {
    "cuda": {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
    "cpu": {"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1},
}


# Runtime integers of ``_disentangled_fwd`` that triton must not specialise on (see there).
DO_NOT_SPECIALIZE = ("B", "H", "L", "R", "RS", "offset")

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
    def _mma(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        """a @ b with fp32 accumulation; UPCAST (interpreter only) multiplies fp32 copies instead."""
        if UPCAST:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        return tl.dot(a, b, input_precision=PRECISION)

    # Integer arguments are specialised by triton (value 1 becomes a constant, multiples of 16 get a
    # divisibility hint), so every new (L == 1, L % 16 == 0, R == 1, offset % 16 == 0, ...) combination
    # would compile another kernel: measured on an H100 (triton 3.6), 5 compilations (~1.8 s each) over
    # 64 ragged (B, L) shapes x 2 q/k/v layouts without this list, 1 with it, same kernel time. The
    # strides stay specialised: for the model's q/k/v views (rows of one [B, L, n*hidden] projection)
    # the head, row and element strides are constants and the batch stride L * row stride is a
    # multiple of 16 for every L (hidden sizes are multiples of 16), so they never change the key,
    # and their divisibility is what lets the compiler vectorise the q/k/v loads: also listing the
    # batch (and head) strides made the bf16 kernel 7-40% slower (B=64 L=128: 129 -> 168 us).
    @triton.jit
    def _token_attributes(POS, GROUP, SLOT, VALID, index, inside):
        """Position id, group, slot and validity of the tokens at flat [B*L] `index` (masked: none).

        All as int32 (the inputs are int64; their values are token counts): the tile's comparisons
        then take one instruction each instead of a pair."""
        pos = tl.load(POS + index, mask=inside, other=0).to(tl.int32)
        group = tl.load(GROUP + index, mask=inside, other=-1).to(tl.int32)
        slot = tl.load(SLOT + index, mask=inside, other=-1).to(tl.int32)
        valid = tl.load(VALID + index, mask=inside, other=0) != 0
        return pos, group, slot, valid

    @triton.jit(do_not_specialize=list(DO_NOT_SPECIALIZE))
    def _disentangled_fwd(
        Q, K, V, C2P, P2C, POS, GROUP, SLOT, VALID, LENGTHS, OUT,
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        B, H, L, R, RS, offset, qk_scale,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    ):
        # One program per (query tile, batch*head); tiles of one (b, h) are adjacent, sharing K/V in L2.
        LOG2E: tl.constexpr = 1.4426950408889634
        num_m = tl.cdiv(L, BLOCK_M)
        pid = tl.program_id(0)
        pid_m = pid % num_m
        pid_bh = pid // num_m
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        length = tl.load(LENGTHS + b)

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        in_m = offs_m < L
        in_d = offs_d < HEAD_DIM

        # Per-query-token attributes (the [B, L] vectors are contiguous).
        pos_i, grp_i, slt_i, val_i = _token_attributes(POS, GROUP, SLOT, VALID, b * L + offs_m, in_m)

        q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
        q = tl.load(q_ptrs, mask=in_m[:, None] & in_d[None, :], other=0.0)

        # The [H, B, L, RS] tables are contiguous (R used columns); row i of (b, h) starts at ((h*B + b)*L + i)*RS.
        table = (h * B + b) * L * RS
        c2p_rows = C2P + table + offs_m.to(tl.int64)[:, None] * RS

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

        # A query tile entirely beyond the row's length visits no key tile and stores zeros.
        n_end = tl.where(pid_m * BLOCK_M < length, length, 0)
        for start_n in range(0, n_end, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            in_n = offs_n < length
            pos_j, grp_j, slt_j, val_j = _token_attributes(POS, GROUP, SLOT, VALID, b * L + offs_n, in_n)

            kt_ptrs = K + b * stride_kb + h * stride_kh + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
            kt = tl.load(kt_ptrs, mask=in_n[None, :] & in_d[:, None], other=0.0)
            qk = _mma(q, kt, PRECISION, UPCAST_DOT)  # [BLOCK_M, BLOCK_N], fp32

            # Relative distance, then the two bias gathers (pointer arithmetic, no L x L tensor).
            d = pos_i[:, None] - pos_j[None, :] + offset
            d = tl.minimum(tl.maximum(d, 0), R - 1)
            inside = in_m[:, None] & in_n[None, :]
            c2p = tl.load(c2p_rows + d, mask=inside, other=0.0).to(tl.float32)
            # P2C is gathered as a [keys, queries] tile and transposed: along the queries (the fast
            # axis) the entries of one key's row are adjacent (d grows with pos_i), so a warp's loads
            # share sectors; gathered [queries, keys] they were a table row apart (3.5-8 % slower
            # attention on an H200, bench/results/h200-run6/tile_sweep_p2c.jsonl).
            d_t = tl.minimum(tl.maximum(pos_i[None, :] - pos_j[:, None] + offset, 0), R - 1)
            p2c_ptrs = P2C + table + offs_n.to(tl.int64)[:, None] * RS + d_t
            p2c = tl.trans(tl.load(p2c_ptrs, mask=in_n[:, None] & in_m[None, :], other=0.0)).to(tl.float32)

            # Prompt isolation (`fast_attention.layout_allowed`): two prompt tokens (group >= 0) see each
            # other only in the same group and, where both have a slot, the same slot. The per-token
            # tests are vectors; `valid` is False outside the row, so it also masks the tile's edges.
            both_prompt = (grp_i >= 0)[:, None] & (grp_j >= 0)[None, :]
            both_slot = (slt_i >= 0)[:, None] & (slt_j >= 0)[None, :]
            apart = (grp_i[:, None] != grp_j[None, :]) | (both_slot & (slt_i[:, None] != slt_j[None, :]))
            allowed = val_i[:, None] & val_j[None, :] & ~(both_prompt & apart)

            # Scores in log2 units: exp2(x * log2 e) == exp(x).
            s = qk * qk_scale + (c2p + p2c) * LOG2E
            s = tl.where(allowed, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing allowed yet: avoid -inf - -inf
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)

            v_ptrs = V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
            v = tl.load(v_ptrs, mask=in_n[:, None] & in_d[None, :], other=0.0)
            acc = acc * alpha[:, None] + _mma(p.to(v.dtype), v, PRECISION, UPCAST_DOT)
            m_i = m_new

        # Rows with nothing allowed have acc == 0 and l_i == 0: they store exactly 0.
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        # OUT is [B, L, H, D] contiguous.
        o_ptrs = OUT + ((b * L + offs_m.to(tl.int64)[:, None]) * H + h) * HEAD_DIM + offs_d[None, :]
        tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=in_m[:, None] & in_d[None, :])


def _config(device: torch.device, config: dict[str, int] | None) -> dict[str, int]:
    return dict(config or KERNEL_CONFIGS.get(device.type, KERNEL_CONFIGS["cuda"]))


def _launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, c2p: torch.Tensor, p2c: torch.Tensor,
            position_ids: torch.Tensor, group: torch.Tensor, slot: torch.Tensor, valid: torch.Tensor,
            lengths: torch.Tensor, offset: int, scale: float, config: dict[str, int], reach: int) -> torch.Tensor:
    """Run the kernel (tables [H, B, L, RS], the first ``reach`` columns used); returns a new [B, L, H, D] tensor."""
    batch, heads, length, dim = q.shape
    out = torch.empty(batch, length, heads, dim, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    if valid.dtype == torch.bool:
        valid = valid.contiguous().view(torch.int8)  # same bytes, a type triton loads everywhere
    # fp32 inputs follow torch's matmul setting (the engine turns TF32 off: exact fp32, no tensor
    # cores); for 16-bit inputs "tf32" is triton's default and means nothing.
    ieee = q.dtype == torch.float32 and not (q.device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32)
    block_m, block_n = config["BLOCK_M"], config["BLOCK_N"]
    grid = (triton.cdiv(length, block_m) * batch * heads,)
    _disentangled_fwd[grid](
        q, k, v, c2p, p2c, position_ids.contiguous(), group.contiguous(), slot.contiguous(), valid,
        lengths.to(torch.int32).contiguous(), out,
        *q.stride(), *k.stride(), *v.stride(),
        batch, heads, length, int(reach), c2p.shape[-1], int(offset), float(scale) * 1.4426950408889634,
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
    # dispatcher's overhead and call _launch directly). The default tile configuration applies.
    @torch.library.custom_op("rex_stream::disentangled_attention", mutates_args=())
    def _launch_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, c2p: torch.Tensor, p2c: torch.Tensor,
                   position_ids: torch.Tensor, group: torch.Tensor, slot: torch.Tensor, valid: torch.Tensor,
                   lengths: torch.Tensor, offset: int, scale: float, reach: int) -> torch.Tensor:
        return _launch(q, k, v, c2p, p2c, position_ids, group, slot, valid, lengths, offset, scale,
                       _config(q.device, None), reach)

    @_launch_op.register_fake
    def _(q: torch.Tensor, *args: Any) -> torch.Tensor:
        batch, heads, length, dim = q.shape
        return q.new_empty(batch, length, heads, dim)


def _aligned(pos: torch.Tensor) -> torch.Tensor:
    """``pos`` [H, R, D] with zero rows appended up to a multiple of ``TABLE_ALIGN`` (a tiny copy)."""
    extra = aligned_rows(pos.shape[-2]) - pos.shape[-2]
    return torch.nn.functional.pad(pos, (0, 0, 0, extra)) if extra else pos


def _table(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """[H, B, L, R] = x @ pos^T per head, as one bmm of H tall GEMMs.

    For the model's projections ([B, L, n*hidden] outputs viewed as [B, H, L, D]) the head-major
    [H, B*L, D] view needs no copy; broadcasting x @ pos^T over the batch instead ran B*H small
    GEMMs on an old kernel plus a copy of x (~14% of GPU time on ner, measured on an H100).
    """
    batch, heads, length, dim = x.shape
    flat = x.permute(1, 0, 2, 3).reshape(heads, batch * length, dim)
    return torch.bmm(flat, pos.transpose(-1, -2)).view(heads, batch, length, -1)


def disentangled_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos_q: torch.Tensor, pos_k: torch.Tensor,
    position_ids: torch.Tensor, group: torch.Tensor, slot: torch.Tensor, valid: torch.Tensor,
    lengths: torch.Tensor, offset: int, scale: float, *, config: dict[str, Any] | None = None,
    reach: int | None = None,
) -> torch.Tensor:
    """Attention context [B, L, H*D] (q's dtype) of the disentangled attention, fused.

    q, k, v: [B, H, L, D] (any strides); pos_q, pos_k: [H, R, D] reachable rows of the pre-scaled
    relative projections; position_ids, group, slot: [B, L] int64 (-1: none); valid: [B, L] bool;
    lengths: [B] int, at least last valid index + 1 per row; ``offset = S - lo``. ``config``
    overrides the tile configuration of ``KERNEL_CONFIGS``. ``reach``: how many of the tables' rows
    are reachable (default: all). Tables whose row count is already a multiple of ``TABLE_ALIGN``
    (the model's cached tables carry spare rows for this) are used without a padded copy.
    """
    reason = triton_unavailable_reason(q.device)
    if reason is not None:
        raise RuntimeError(reason)
    batch, heads, length, dim = q.shape
    reach = pos_k.shape[-2] if reach is None else reach
    c2p, p2c = _table(q, _aligned(pos_k)), _table(k, _aligned(pos_q))
    tensors = (q, k, v, c2p, p2c, position_ids, group, slot, valid, lengths)
    if torch.compiler.is_compiling():
        out = _launch_op(*tensors, int(offset), float(scale), reach)
    else:
        out = _launch(*tensors, offset, scale, _config(q.device, config), reach)
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
