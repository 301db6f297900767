"""Experiment: one program per (row, query tile, head group), the key tile covering the whole row.

The distances, table offsets and the prompt-isolation mask depend on the row only, so they are
computed once per program and reused for HEADS heads. Checked against ``reference_attention``, then
timed against the committed kernel in the same process (whole ``disentangled_attention``).

`python bench/attention_heads_ab.py check` (CPU, needs TRITON_INTERPRET=1) or `... time` (CUDA).
"""
import json
import sys

import torch

from rex_stream.engine import triton_attention as ta

triton, tl = ta.triton, ta.tl


@triton.jit(do_not_specialize=list(ta.DO_NOT_SPECIALIZE))
def _fwd_heads(
    Q, K, V, C2P, P2C, POS, GROUP, SLOT, VALID, LENGTHS, OUT,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    B, H, L, R, RS, offset, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEADS: tl.constexpr, PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    LOG2E: tl.constexpr = 1.4426950408889634
    num_m = tl.cdiv(L, BLOCK_M)
    groups = H // HEADS  # the launcher checks HEADS divides H
    pid = tl.program_id(0)
    pid_m = pid % num_m
    rest = pid // num_m
    h0 = (rest % groups) * HEADS
    b = (rest // groups).to(tl.int64)
    length = tl.load(LENGTHS + b)
    length = tl.where(pid_m * BLOCK_M < length, length, 0)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    in_m = offs_m < L
    in_n = offs_n < length
    in_d = offs_d < HEAD_DIM
    pos_i, grp_i, slt_i, val_i = ta._token_attributes(POS, GROUP, SLOT, VALID, b * L + offs_m, in_m)
    pos_j, grp_j, slt_j, val_j = ta._token_attributes(POS, GROUP, SLOT, VALID, b * L + offs_n, in_n)

    # Row-only work, shared by the HEADS heads below.
    d = tl.minimum(tl.maximum(pos_i[:, None] - pos_j[None, :] + offset, 0), R - 1)
    c2p_off = offs_m[:, None] * RS + d
    d_t = tl.minimum(tl.maximum(pos_i[None, :] - pos_j[:, None] + offset, 0), R - 1)
    p2c_off = offs_n[:, None] * RS + d_t
    inside = in_m[:, None] & in_n[None, :]
    inside_t = in_n[:, None] & in_m[None, :]
    other_group = (grp_i[:, None] >= 0) & (grp_j[None, :] >= 0) & (grp_i[:, None] != grp_j[None, :])
    other_type = ((grp_i[:, None] >= 0) & (grp_i[:, None] == grp_j[None, :])
                  & (slt_i[:, None] >= 0) & (slt_j[None, :] >= 0) & (slt_i[:, None] != slt_j[None, :]))
    allowed = inside & val_i[:, None] & val_j[None, :] & ~other_group & ~other_type
    bias = tl.where(allowed, 0.0, float("-inf"))

    for hh in range(HEADS):
        h = (h0 + hh).to(tl.int64)
        table = (h * B + b) * L * RS
        q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                    mask=in_m[:, None] & in_d[None, :], other=0.0)
        kt = tl.load(K + b * stride_kb + h * stride_kh + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                     mask=in_n[None, :] & in_d[:, None], other=0.0)
        qk = ta._mma(q, kt, PRECISION, UPCAST_DOT)
        c2p = tl.load(C2P + table + c2p_off, mask=inside, other=0.0).to(tl.float32)
        p2c = tl.trans(tl.load(P2C + table + p2c_off, mask=inside_t, other=0.0)).to(tl.float32)
        s = qk * qk_scale + (c2p + p2c) * LOG2E + bias
        m = tl.max(s, 1)
        m = tl.where(m == float("-inf"), 0.0, m)
        p = tl.exp2(s - m[:, None])
        l_i = tl.sum(p, 1)
        v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=in_n[:, None] & in_d[None, :], other=0.0)
        acc = ta._mma(p.to(v.dtype), v, PRECISION, UPCAST_DOT)
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        o_ptrs = OUT + ((b * L + offs_m.to(tl.int64)[:, None]) * H + h) * HEAD_DIM + offs_d[None, :]
        tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=in_m[:, None] & in_d[None, :])


def heads_attention(q, k, v, pos_q, pos_k, position_ids, group, slot, valid, lengths, offset, scale, *,
                    block_m=64, heads=1, num_warps=4, num_stages=1, reach=None):
    batch, nh, length, dim = q.shape
    reach = pos_k.shape[-2] if reach is None else reach
    c2p, p2c = ta._table(q, ta._aligned(pos_k)), ta._table(k, ta._aligned(pos_q))
    out = torch.empty(batch, length, nh, dim, dtype=q.dtype, device=q.device)
    if valid.dtype == torch.bool:
        valid = valid.contiguous().view(torch.int8)
    ieee = q.dtype == torch.float32
    assert nh % heads == 0, (nh, heads)
    block_n = max(16, triton.next_power_of_2(length))
    grid = (triton.cdiv(length, block_m) * batch * triton.cdiv(nh, heads),)
    _fwd_heads[grid](
        q, k, v, c2p, p2c, position_ids.contiguous(), group.contiguous(), slot.contiguous(), valid,
        lengths.to(torch.int32).contiguous(), out, *q.stride(), *k.stride(), *v.stride(),
        batch, nh, length, int(reach), c2p.shape[-1], int(offset), float(scale) * 1.4426950408889634,
        HEAD_DIM=dim, BLOCK_D=max(16, triton.next_power_of_2(dim)), BLOCK_M=block_m, BLOCK_N=block_n,
        HEADS=heads, PRECISION="ieee" if ieee else "tf32", UPCAST_DOT=ta._INTERPRET and q.dtype == torch.bfloat16,
        num_warps=num_warps, num_stages=num_stages)
    return out.view(batch, length, nh * dim)


def _check() -> None:
    sys.path.insert(0, "tests")
    from test_triton_attention import _case_inputs
    for length, dim, dtype in [(1, 16, torch.float32), (7, 32, torch.float32), (37, 16, torch.float32),
                               (70, 32, torch.float32), (37, 16, torch.bfloat16)]:
        args, valid = _case_inputs(length, dim, dtype)
        exact = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
        ref = ta.reference_attention(*exact)
        for block_m, heads in [(16, 1), (32, 2), (16, 2)]:
            got = heads_attention(*args, block_m=block_m, heads=heads)
            err = float((got.float() - ref).abs().max() / ref.abs().max())
            dead = bool((got.view(*valid.shape, -1)[~valid] == 0).all())
            print(json.dumps({"L": length, "D": dim, "dtype": str(dtype), "block_m": block_m, "heads": heads,
                              "rel_err": err, "dead_zero": dead}))
            assert err < (3e-2 if dtype == torch.bfloat16 else 1e-4) and dead


def _time() -> None:
    import triton.testing

    from rex_stream.engine.fast_attention import synthetic_batch
    nh, dim, span = 12, 64, 256
    device = torch.device("cuda")
    configs = [(bm, hd, w, st) for bm in (32, 64) for hd in (1, 2, 4, 12) for w in (4, 8) for st in (1, 2)
               if hd > 1 or st == 1]
    for batch, length in [(1024, 64), (768, 80), (512, 128)]:
        t = {k: v.to(device) for k, v in synthetic_batch(batch, length, torch.device("cpu"), seed=1).items()}
        lo, hi = max(0, span - length + 1), min(2 * span, span + length)
        qkv = torch.randn(batch, length, 3, nh, dim, device=device, dtype=torch.bfloat16)
        q, k, v = (qkv[:, :, n].transpose(1, 2) for n in range(3))
        pos_q, pos_k = (torch.randn(nh, hi - lo, dim, device=device, dtype=torch.bfloat16) for _ in range(2))
        index = torch.arange(1, length + 1, device=device, dtype=torch.int32)
        lengths = torch.where(t["valid"], index, 0).amax(-1)
        args = (q, k, v, pos_q, pos_k, t["pos"], t["group"], t["slot"], t["valid"], lengths, span - lo, 0.125)
        ref = ta.disentangled_attention(*args).float()
        base = triton.testing.do_bench(lambda: ta.disentangled_attention(*args), warmup=25, rep=200)
        tables = triton.testing.do_bench(lambda: (ta._table(q, ta._aligned(pos_k)), ta._table(k, ta._aligned(pos_q))),
                                         warmup=25, rep=200)
        print(json.dumps({"shape": [batch, length], "kernel": "committed", "ms": round(base, 4),
                          "tables_ms": round(tables, 4)}), flush=True)
        for bm, hd, w, st in configs:
            kw = dict(block_m=bm, heads=hd, num_warps=w, num_stages=st)
            try:
                got = heads_attention(*args, **kw).float()
                diff = float((got - ref).abs().max())
                ms = triton.testing.do_bench(lambda: heads_attention(*args, **kw), warmup=25, rep=200)
            except Exception as exc:  # noqa: BLE001 - e.g. out of resources: report and go on
                print(json.dumps({"shape": [batch, length], "config": kw, "error": f"{type(exc).__name__}: {exc}"[:160]}))
                continue
            print(json.dumps({"shape": [batch, length], "config": kw, "ms": round(ms, 4),
                              "vs_committed": round(base / ms, 3), "max_diff": diff}), flush=True)


if __name__ == "__main__":
    {"check": _check, "time": _time}[sys.argv[1]]()
