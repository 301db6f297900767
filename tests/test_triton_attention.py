"""The fused Triton attention kernel (``set_attention("triton")``) and its fast path's kernels, on CPU.

The kernel itself runs under the Triton interpreter, which must be switched on before triton is
imported: those checks run in subprocesses (this file executed as a script with
``TRITON_INTERPRET=1``) that print their measurements as one JSON line, and the tests here assert
on them, so the rest of the session never sees the interpreter. The model plumbing and the
fallback rules are tested in-process, with the dense ``reference_attention`` standing in for the
kernel where one has to run.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from rex_stream.engine import triton_attention

KERNEL_TOL = 1e-4  # fp32, relative to max |reference|; measured ~4e-7
LOW_PRECISION_TOL = 3e-2  # bf16/fp16 inputs against the fp32 maths on the same rounded inputs
MODEL_TOL = 1e-3  # logits, relative (the flex tests' bound); measured ~1e-6

# ---------------------------------------------------------------------------- interpreter side
# Run as `TRITON_INTERPRET=1 python tests/test_triton_attention.py kernel|model [tiny model dir]`.

KERNEL_CASES = [(length, dim, dtype) for length in (1, 7, 37, 70) for dim in (16, 32) for dtype in ("float32",)]
KERNEL_CASES += [(37, 24, "float32"), (37, 16, "bfloat16"), (70, 32, "float16")]  # D=24: masked head dim
# None: the CPU policy by width (both of its entries: lengths up to 24 and beyond); every CUDA entry
# of the policy; and an odd shape.
TILES: dict[str, dict[str, int] | None] = {
    "cpu": None, "odd": {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}}
TILES.update({f"cuda{n}": config for n, (_, config) in enumerate(triton_attention.TILE_POLICY["cuda"])})


def _case_inputs(length: int, dim: int, dtype: torch.dtype, device: str = "cpu") -> tuple[tuple[Any, ...], torch.Tensor]:
    """A padded batch of 3 rows with prompt groups/slots; span 8 so the distance clamp is active."""
    gen = torch.Generator().manual_seed(1000 * length + dim)
    batch, heads, span = 3, 2, 8
    lo, hi = max(0, span - length + 1), min(2 * span, span + length)
    # q/k/v are strided views of one projection, as in the model.
    qkv = torch.randn(batch, length, 3, heads, dim, generator=gen).to(dtype)
    q, k, v = (qkv[:, :, n].transpose(1, 2) for n in range(3))
    pos_q, pos_k = (torch.randn(heads, hi - lo, dim, generator=gen).to(dtype) for _ in range(2))
    pos = torch.randint(0, length, (batch, length), generator=gen)
    group = torch.randint(-1, 3, (batch, length), generator=gen)
    slot = torch.randint(-1, 3, (batch, length), generator=gen)
    valid = torch.ones(batch, length, dtype=torch.bool)
    valid[1, max(1, length // 2) :] = False  # right padding
    valid[2, 1:] = False  # a single real token
    group[2, 1:] = slot[2, 1:] = -1  # padding as the runner writes it; row 1 keeps garbage
    # Row 0 as the model lays it out: prompt tokens first, then text only (group and slot -1), so
    # some tiles hold no prompt token on one axis.
    group[0, length // 3:] = slot[0, length // 3:] = -1
    lengths = valid.sum(-1).to(torch.int32)
    if device != "cpu":
        base = qkv.to(device)
        q, k, v = (base[:, :, n].transpose(1, 2) for n in range(3))
        pos_q, pos_k, pos, group, slot, valid, lengths = (
            t.to(device) for t in (pos_q, pos_k, pos, group, slot, valid, lengths))
    return (q, k, v, pos_q, pos_k, pos, group, slot, valid, lengths, span - lo, 0.3), valid


# The kernel's runtime ints that change with the batch shape: specialising on them (value 1, a
# multiple of 16) would compile a new kernel for many batches. The strides stay specialised.
SHAPE_INTS = {"B", "H", "L", "N", "R", "RS", "offset"}


def _unspecialised(kernel: Any) -> set[str] | None:
    """Names of the kernel's parameters triton does not specialise on; None if triton does not say."""
    params = getattr(kernel, "params", None)  # JITFunction: the resolved per-parameter flags
    if params and all(hasattr(p, "name") and hasattr(p, "do_not_specialize") for p in params):
        return {p.name for p in params if p.do_not_specialize}
    listed = getattr(kernel, "do_not_specialize", None)
    if listed is None:  # the interpreter's InterpretedFunction keeps the decorator's arguments
        listed = (getattr(kernel, "kwargs", None) or {}).get("do_not_specialize")
    fn = getattr(kernel, "fn", None)
    if listed is None or fn is None:
        return None
    names = list(inspect.signature(fn).parameters)
    return {names[x] if isinstance(x, int) else x for x in listed}


def _kernel_checks() -> list[dict[str, Any]]:
    out = []
    for length, dim, dtype_name in KERNEL_CASES:
        args, valid = _case_inputs(length, dim, getattr(torch, dtype_name))
        exact = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
        ref = triton_attention.reference_attention(*exact)
        for tiles, config in TILES.items():
            got = triton_attention.disentangled_attention(*args, config=config)
            dead = got.view(*valid.shape, -1)[~valid]
            out.append({
                "case": f"L{length}-D{dim}-{dtype_name}-{tiles}",
                "dtype": dtype_name, "shape": list(got.shape), "out_dtype": str(got.dtype).removeprefix("torch."),
                "rel_err": float((got.float() - ref).abs().max() / ref.abs().max()),
                "finite": bool(torch.isfinite(got).all()), "dead_rows_zero": bool((dead == 0).all()),
            })
    out.extend(_packed_checks())
    out.extend(_norm_checks())
    out.extend(_block_checks())
    out.extend(_rotary_checks())
    out.extend(_ffn_checks())
    out.extend(_split_checks())
    # The cases above ran the interpreted kernel for several L (1, 7, 37, 70); the interpreter never
    # compiles, so what can be checked here is that the decorator's list reached the kernel object.
    names = _unspecialised(triton_attention._disentangled_fwd)
    out.append({"case": "do_not_specialize", "names": None if names is None else sorted(names),
                "lengths": sorted({length for length, _, _ in KERNEL_CASES})})
    return out


PACKED_CASES = [(37, 16), (70, 32)]


def _packed_checks() -> list[dict[str, Any]]:
    """The model's layout: the rows of a padded case packed back to back (``pack_rows``) through
    ``packed_attention``, against the padded kernel's output at the same tokens."""
    out = []
    for length, dim in PACKED_CASES:
        args, _ = _case_inputs(length, dim, torch.float32)
        q, k, v, pos_q, pos_k, pos, group, slot, valid, lengths, offset, scale = args
        batch, heads = q.shape[:2]
        padded = triton_attention.disentangled_attention(*args).reshape(batch * length, -1)
        packing = triton_attention.pack_rows(lengths.tolist(), length, torch.device("cpu"))
        tokens = [t.transpose(1, 2).reshape(batch * length, heads, dim).index_select(0, packing.index) for t in (q, k, v)]
        attributes = [t.reshape(-1).index_select(0, packing.index) for t in (pos, group, slot, valid)]
        got = triton_attention.packed_attention(*tokens, pos_q, pos_k, *attributes, packing.rows, offset, scale)
        out.append({"case": f"packed-L{length}-D{dim}", "shape": list(got.shape), "tokens": int(lengths.sum()),
                    "index_is_row_prefixes": packing.index.tolist() == [b * length + i for b, n in enumerate(lengths.tolist())
                                                                       for i in range(n)],
                    "max_diff": float((got - padded.index_select(0, packing.index)).abs().max())})
    return out


NORM_CASES = [(1, 64, "bfloat16"), (7, 768, "bfloat16"), (13, 100, "float16")]  # 100: a masked row tail


def _random_norm(width: int, gen: torch.Generator) -> torch.nn.LayerNorm:
    """A LayerNorm with weights near 1 and biases near 0, drawn from ``gen``."""
    norm = torch.nn.LayerNorm(width, eps=1e-7)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(width, generator=gen))
        norm.bias.copy_(0.1 * torch.randn(width, generator=gen))
    return norm


def _norm_checks() -> list[dict[str, Any]]:
    """The fused residual-add + LayerNorm kernel against torch's LayerNorm of the fp32 sum."""
    from rex_stream.engine import triton_norm

    out = []
    for rows, width, dtype_name in NORM_CASES:
        gen = torch.Generator().manual_seed(rows * width)
        norm = _random_norm(width, gen)
        low = getattr(torch, dtype_name)
        y, residual = torch.randn(2, rows, width, generator=gen).to(low), torch.randn(2, rows, width, generator=gen)
        with torch.no_grad():
            got, got_low = triton_norm.add_layer_norm(y, residual, norm, low)
            ref = norm(y.float() + residual)
        out.append({
            "case": f"norm-{rows}x{width}-{dtype_name}", "dtypes": [str(got.dtype), str(got_low.dtype)],
            "max_err": float((got - ref).abs().max()),
            # the reduced copy is the fp32 result rounded: at most one unit in the last place off
            "low_max_ulps": float(((got_low.float() - ref.to(low).float()).abs() / ref.to(low).float().abs().clamp_min(1e-3)).max()),
        })
    return out


# (rows, padded length, width, conv output layout): ragged rows with a masked token inside one, a
# masked column tail (width 100), and the conv output as the channels-first view the model hands over.
BLOCK_CASES = [(3, 9, 64, "channels_first"), (2, 5, 100, "contiguous")]


def _block_checks() -> list[dict[str, Any]]:
    """The embedding and conv blocks around layer 0 (``embed_layer_norm``, ``conv_mix``) against their
    eager references, at the packed tokens of ragged rows."""
    from rex_stream.engine import triton_norm

    out = []
    for batch, length, width, layout in BLOCK_CASES:
        gen = torch.Generator().manual_seed(batch * length * width)
        embedding = torch.nn.Embedding(50, width)
        with torch.no_grad():
            embedding.weight.normal_(generator=gen)
        norm = _random_norm(width, gen)
        lengths = [length - n for n in range(batch)]
        keep = torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]
        keep[0, 2] = False  # a masked token inside a row: its outputs are 0
        ids = torch.randint(0, 50, (batch, length), generator=gen)
        index = triton_attention.pack_rows(lengths, length, torch.device("cpu")).index
        with torch.no_grad():
            got = triton_norm.embed_layer_norm(ids, keep, index, embedding, norm, torch.bfloat16)
            ref = triton_norm.reference_embed_layer_norm(ids, keep, index, embedding, norm, torch.bfloat16)
            conv = torch.randn(batch, width, length, generator=gen).bfloat16().transpose(1, 2)
            if layout == "contiguous":
                conv = conv.contiguous()
            layer0 = torch.randn(index.numel(), width, generator=gen)
            mixed = triton_norm.conv_mix(conv, layer0, index, keep, norm, torch.bfloat16)
            mixed_ref = triton_norm.reference_conv_mix(conv, layer0, index, keep, norm, torch.bfloat16)
        masked = int(index.tolist().index(2))  # packed position of row 0's masked token
        out.append({
            "case": f"blocks-{batch}x{length}x{width}-{layout}",
            "embed_max_err": float((got[0] - ref[0]).abs().max()),
            "embed_low_max_err": float((got[1].float() - ref[1].float()).abs().max()),
            "padded_max_err": float((got[2].float() - ref[2].float()).abs().max()),
            "padded_dtype": str(got[2].dtype), "padded_shape": list(got[2].shape),
            "conv_max_err": float((mixed[0] - mixed_ref[0]).abs().max()),
            "conv_low_max_err": float((mixed[1].float() - mixed_ref[1].float()).abs().max()),
            "masked_zero": bool((got[0][masked] == 0).all() and (mixed[0][masked] == 0).all()),
        })
    return out


# (batch, length, rotary width, as the two halves of a head output + bias): odd and single-token
# lengths, a masked tail of pairs (50 pairs, 128 per program), the base model's width.
ROTARY_CASES = [(3, 37, 64, False), (2, 13, 100, True), (1, 1, 768, True)]


def _rotary_checks() -> list[dict[str, Any]]:
    """The Triton rotary kernel against ``_Rotary.forward``, positions up to 511."""
    from rex_stream.engine import triton_rotary
    from rex_stream.engine.model import _Rotary

    out = []
    for batch, length, width, halves in ROTARY_CASES:
        gen = torch.Generator().manual_seed(batch * length + width)
        rotary = _Rotary(width)
        pos = torch.randint(0, 512, (batch, length), generator=gen)
        pos[-1, -1] = 511
        if halves:  # q and k as strided views of one [B, L, 2W] tensor, as in the model
            y, bias = 3 * torch.randn(batch, length, 2 * width, generator=gen), torch.randn(2 * width, generator=gen)
            parts = list(zip(y.chunk(2, dim=-1), bias.chunk(2)))
        else:
            parts = [(3 * torch.randn(batch, length, width, generator=gen), None)]
        for n, (x, bias_part) in enumerate(parts):
            with torch.no_grad():
                got = triton_rotary.rotate_pairs(x, pos, rotary.freqs, bias_part)
                ref = rotary(x if bias_part is None else x + bias_part, pos)
            out.append({"case": f"rotary-{batch}x{length}x{width}-{n}", "shape": list(got.shape),
                        "dtype": str(got.dtype), "contiguous": got.is_contiguous(),
                        "rel_err": float((got - ref).abs().max() / ref.abs().max())})
    return out


# (tokens, in, out features, split store): one token, a ragged last row tile, several row groups, and
# an output width that is not a multiple of the tile (the descriptor clips the store).
FFN_CASES = [(1, 48, 96, True), (37, 48, 96, False), (100, 64, 80, True)]


def _ffn_checks() -> list[dict[str, Any]]:
    """The TMA GEMM + exact GELU (``triton_ffn.linear_gelu``) against the fp32 maths on the same bf16 inputs."""
    from rex_stream.engine import triton_ffn

    out = []
    for tokens, k, n, split in FFN_CASES:
        gen = torch.Generator().manual_seed(tokens + k + n)
        x = torch.randn(tokens, k, generator=gen).bfloat16()
        weight, bias = torch.randn(n, k, generator=gen) / k ** 0.5, torch.randn(n, generator=gen)
        got = triton_ffn.linear_gelu(x, weight, bias, dict(triton_ffn.KERNEL_CONFIGS["cpu"], SPLIT_STORE=split))
        ref = torch.nn.functional.gelu(x.float() @ weight.bfloat16().float().t() + bias)
        out.append({"case": f"ffn-{tokens}x{k}x{n}-{split}", "shape": list(got.shape), "dtype": str(got.dtype),
                    # beyond one bf16 unit of the exact value (one rounding; the interpreter's conversion
                    # truncates, the GPU's rounds to nearest): ~0 up to fp32 summation order
                    "excess": float(((got.float() - ref).abs() - 2 ** -7 * ref.abs()).max())})
    return out


SPLIT_CASES = [((3, 5, 48), "hi,hi,lo"), ((7, 300), "hi,lo,hi")]  # 2,100 elements: a ragged last program


def _split_checks() -> list[dict[str, Any]]:
    """The split-bf16 operand kernel (``triton_split``) against its defining properties and the eager split."""
    from rex_stream.engine import triton_split

    out = []
    for shape, order in SPLIT_CASES:
        x = 3 * torch.randn(*shape, generator=torch.Generator().manual_seed(len(shape)))
        got = triton_split.split_bf16x3(x, order)
        ref = triton_split.reference_split_bf16x3(x, order)
        hi, lo = got[..., 0, :].float(), got[..., 2 if order == "hi,hi,lo" else 1, :].float()
        repeated = got[..., 1 if order == "hi,hi,lo" else 2, :]
        out.append({"case": f"split-{'x'.join(map(str, shape))}-{order}", "shape": list(got.shape),
                    "dtype": str(got.dtype), "blocks_repeat": bool(torch.equal(repeated, got[..., 0, :])),
                    "sum_rel_err": float(((hi + lo - x).abs() / x.abs()).max()),
                    # the interpreter's conversion truncates where the GPU's (and torch's) rounds to nearest
                    "hi_vs_eager_ulps": float(((hi - ref[..., 0, :].float()).abs()
                                               / 2 ** (torch.floor(torch.log2(x.abs())) - 7)).max())})
    return out


def _model_checks(tiny: Path) -> dict[str, Any]:
    from rex_stream.engine.fast_attention import layout_allowed
    from rex_stream.engine.model import FUSIONS
    from rex_stream.engine.layout import build_layout
    from rex_stream.engine.tokenizer import RexTokenizer
    from rex_stream.engine.weights import load_model

    traces = tiny.parent / "golden" / "traces.jsonl"
    forwards = [f for line in traces.read_text(encoding="utf-8").splitlines() if line.strip()
                for f in json.loads(line)["forwards"]]
    forwards = [f for f in forwards[:7] if len(f["input_ids"]) <= 40]  # lengths 28..37: the interpreter is slow
    special = RexTokenizer(tiny).special
    width, n = max(len(f["input_ids"]) for f in forwards), len(forwards)
    gen = torch.Generator().manual_seed(5)
    t = {"ids": torch.randint(0, 12804, (n, width), generator=gen), "pos": torch.randint(0, width, (n, width), generator=gen),
         "group": torch.randint(-1, 3, (n, width), generator=gen), "slot": torch.randint(-1, 3, (n, width), generator=gen),
         "valid": torch.zeros(n, width, dtype=torch.bool)}  # the padding region is garbage on purpose
    for b, f in enumerate(forwards):
        size = len(f["input_ids"])
        _, group, slot = build_layout(f["input_ids"], special)
        t["ids"][b, :size], t["pos"][b, :size] = torch.tensor(f["input_ids"]), torch.tensor(f["position_ids"])
        t["group"][b, :size], t["slot"][b, :size] = torch.from_numpy(group), torch.from_numpy(slot)
        t["valid"][b, :size] = True

    def run(model: Any, dense: bool = False) -> torch.Tensor:
        with torch.no_grad():
            if dense:
                return model(t["ids"], t["pos"], layout_allowed(t["group"], t["slot"], t["valid"]), t["valid"])
            return model(t["ids"], t["pos"], None, t["valid"], group=t["group"], slot=t["slot"])

    sdpa = load_model(tiny)[0]
    fused = load_model(tiny)[0]
    result: dict[str, Any] = {"mode": fused.set_attention("triton")}
    ref, got = run(sdpa), run(fused)
    keep = t["valid"][:, :, None] & t["valid"][:, None, :]
    result["rel_err"] = float((got - ref).abs()[keep].max() / ref.abs()[keep].max())
    result["finite"] = bool(torch.isfinite(got).all())
    result["links_match_traces"] = all(
        set(map(tuple, (got[b, : len(f["input_ids"]), : len(f["input_ids"])] > 0).nonzero().tolist()))
        == set(map(tuple, f["positive"])) for b, f in enumerate(forwards))
    result["dense_mask_call_equals_sdpa"] = bool(torch.equal(run(fused, dense=True), run(sdpa, dense=True)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused.set_fusions(FUSIONS)  # gelu GEMM, split-bf16 head, rotary kernel
        all_fusions = run(fused)
        result["fusion_status"] = fused.fast_path_status()
        fused.set_fusions(())
        no_fusions = run(fused)
    result["bf16_finite"] = bool(torch.isfinite(all_fusions).all())
    result["fusions_rel_err"] = float((all_fusions - no_fusions).abs()[keep].max() / no_fusions.abs()[keep].max())
    result["status"] = fused.fast_path_status()
    return result


def _interpreter_main(argv: list[str]) -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    result = _kernel_checks() if argv[0] == "kernel" else _model_checks(Path(argv[1]))
    print(json.dumps(result))


# ---------------------------------------------------------------------------- pytest side


def _run_interpreter(*args: str) -> Any:
    if triton_attention._IMPORT_ERROR is not None:
        pytest.skip(f"triton not importable: {triton_attention._IMPORT_ERROR}")
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, __file__, *args], check=False, env=env, capture_output=True, text=True, timeout=600,
                          cwd=root)
    assert proc.returncode == 0, f"interpreter run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def kernel_results() -> dict[str, dict[str, Any]]:
    return {row["case"]: row for row in _run_interpreter("kernel")}


@pytest.fixture(scope="module")
def model_results(tiny_model: Path) -> dict[str, Any]:
    if not (tiny_model.parent / "golden" / "traces.jsonl").is_file():
        pytest.skip(f"no golden traces beside {tiny_model}")
    return _run_interpreter("model", str(tiny_model))


@pytest.mark.parametrize("tiles", list(TILES))
@pytest.mark.parametrize(("length", "dim", "dtype"), KERNEL_CASES, ids=lambda x: str(x))
def test_kernel_matches_reference(kernel_results, length: int, dim: int, dtype: str, tiles: str) -> None:
    row = kernel_results[f"L{length}-D{dim}-{dtype}-{tiles}"]
    assert row["shape"] == [3, length, 2 * dim] and row["out_dtype"] == dtype
    assert row["finite"] and row["dead_rows_zero"], row
    assert row["rel_err"] <= (KERNEL_TOL if dtype == "float32" else LOW_PRECISION_TOL), row


@pytest.mark.parametrize(("length", "dim"), PACKED_CASES, ids=lambda x: str(x))
def test_packed_rows_match_the_padded_kernel(kernel_results, length: int, dim: int) -> None:
    row = kernel_results[f"packed-L{length}-D{dim}"]
    # Rows of 3 tokens: L, half of L and one; packed, they are those tokens only, with the same context.
    assert row["shape"] == [row["tokens"], 2 * dim] and row["tokens"] == length + max(1, length // 2) + 1, row
    assert row["index_is_row_prefixes"], row
    assert row["max_diff"] <= 1e-6, row


@pytest.mark.parametrize(("batch", "length", "width", "halves"), ROTARY_CASES, ids=lambda x: str(x))
def test_rotary_kernel_matches_eager(kernel_results, batch: int, length: int, width: int, halves: bool) -> None:
    for n in range(2 if halves else 1):
        row = kernel_results[f"rotary-{batch}x{length}x{width}-{n}"]
        assert row["shape"] == [batch, length, width] and row["dtype"] == "torch.float32" and row["contiguous"], row
        assert row["rel_err"] <= 1e-6, row  # fp32 maths, sin/cos of the reduced angle: ~1e-7 measured


@pytest.mark.parametrize(("rows", "width", "dtype"), NORM_CASES, ids=lambda x: str(x))
def test_fused_add_layer_norm_matches_torch(kernel_results, rows: int, width: int, dtype: str) -> None:
    row = kernel_results[f"norm-{rows}x{width}-{dtype}"]
    assert row["dtypes"] == ["torch.float32", f"torch.{dtype}"], row
    assert row["max_err"] <= 1e-5, row  # fp32 maths, only the reduction order differs (~5e-7 measured)
    assert row["low_max_ulps"] <= (2 ** -7 if dtype == "bfloat16" else 2 ** -10), row


@pytest.mark.parametrize(("batch", "length", "width", "layout"), BLOCK_CASES, ids=lambda x: str(x))
def test_fused_blocks_around_layer0_match_eager(kernel_results, batch: int, length: int, width: int,
                                                 layout: str) -> None:
    row = kernel_results[f"blocks-{batch}x{length}x{width}-{layout}"]
    assert row["padded_dtype"] == "torch.bfloat16" and row["padded_shape"] == [batch, length, width], row
    assert row["masked_zero"], row
    # fp32 maths; the embedding differs only in reduction order, the conv block also by the GELU taken
    # on the unrounded conv output (eagerly its 16-bit output is rounded before the add)
    assert row["embed_max_err"] <= 1e-5 and row["padded_max_err"] <= 2 ** -6, row
    assert row["embed_low_max_err"] <= 2 ** -6, row
    assert row["conv_max_err"] <= 2e-2 and row["conv_low_max_err"] <= 4e-2, row


@pytest.mark.parametrize(("tokens", "k", "n", "split"), FFN_CASES, ids=lambda x: str(x))
def test_ffn_gemm_gelu_matches_fp32(kernel_results, tokens: int, k: int, n: int, split: bool) -> None:
    row = kernel_results[f"ffn-{tokens}x{k}x{n}-{split}"]
    assert row["shape"] == [tokens, n] and row["dtype"] == "torch.bfloat16", row
    assert row["excess"] <= 1e-5, row  # one rounding of the fp32 result: within one bf16 unit


@pytest.mark.parametrize(("shape", "order"), SPLIT_CASES, ids=lambda x: str(x))
def test_split_kernel_matches_the_split(kernel_results, shape: tuple[int, ...], order: str) -> None:
    row = kernel_results[f"split-{'x'.join(map(str, shape))}-{order}"]
    assert row["shape"] == [*shape[:-1], 3, shape[-1]] and row["dtype"] == "torch.bfloat16", row
    assert row["blocks_repeat"], row  # hi written twice, at the places `order` names
    assert row["sum_rel_err"] <= 2 ** -15, row  # hi + lo is x to ~2^-17 (2^-15 with truncation)
    assert row["hi_vs_eager_ulps"] <= 1.0, row  # hi is x in bf16: within one unit of torch's rounding


def test_interpreted_kernel_does_not_specialise_on_shapes(kernel_results) -> None:
    row = kernel_results["do_not_specialize"]
    assert len(row["lengths"]) >= 2  # the interpreter ran the same kernel object for these L
    if row["names"] is None:
        pytest.skip("this triton's InterpretedFunction does not expose do_not_specialize")
    assert SHAPE_INTS <= set(row["names"]), row


def test_kernel_does_not_specialise_on_shapes() -> None:
    """The compiled (non-interpreter) kernel object: B, H, L, N, R, RS, offset unspecialised, strides specialised."""
    if triton_attention._IMPORT_ERROR is not None:
        pytest.skip(f"triton not importable: {triton_attention._IMPORT_ERROR}")
    names = _unspecialised(triton_attention._disentangled_fwd)
    if names is None:
        pytest.skip("this triton's JITFunction exposes neither params[].do_not_specialize nor do_not_specialize")
    assert names == SHAPE_INTS
    assert set(triton_attention.DO_NOT_SPECIALIZE) == SHAPE_INTS


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the interpreter never compiles")
def test_kernel_compiles_once_across_batch_shapes() -> None:
    if triton_attention._IMPORT_ERROR is not None or triton_attention._INTERPRET:
        pytest.skip("needs the compiling triton (not the interpreter)")
    kernel = triton_attention._disentangled_fwd
    caches = getattr(kernel, "device_caches", None)
    if not isinstance(caches, dict):
        pytest.skip("this triton's JITFunction has no device_caches to count compiled kernels in")

    def run(length: int) -> float:
        args, _ = _case_inputs(length, 64, torch.bfloat16, "cuda")
        got = triton_attention.disentangled_attention(*args).float()
        exact = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
        ref = triton_attention.reference_attention(*exact)
        return float((got - ref).abs().max() / ref.abs().max())

    run(37)
    compiled = sum(len(cache[0]) for cache in caches.values())
    # L = 1 (R = 1, offset = 0), multiples of 16 and not, beyond the span: all one compiled kernel.
    errors = {length: run(length) for length in (1, 2, 16, 17, 32, 48, 63, 64, 130)}
    assert sum(len(cache[0]) for cache in caches.values()) == compiled
    # Against the fp32 maths: the [B, H, L, R] position tables come out of cuBLAS in bf16 here
    # (H100: up to ~0.032 at D=64), a sanity bound only; test_kernel_matches_reference pins the maths.
    assert max(errors.values()) <= 0.06, errors


def test_model_forward_matches_sdpa(model_results) -> None:
    r = model_results
    assert r["mode"] == "triton" and r["status"]["attention_active"] == "triton", r["status"]
    assert r["finite"] and r["rel_err"] <= MODEL_TOL, r
    assert r["links_match_traces"]
    assert r["dense_mask_call_equals_sdpa"]  # no group/slot: SDPA runs, the mode stays on
    assert r["status"]["self_checks"]["triton/cpu/float32"] < 1e-5
    assert r["bf16_finite"] and r["status"]["self_checks"]["triton/cpu/bfloat16"] < 0.02


def test_model_fusions_run_and_agree(model_results) -> None:
    """bf16 fast path with every fusion (rotary kernel interpreted, head emulated on CPU) against none."""
    r = model_results
    assert r["fusion_status"]["fusions"] == ["gelu", "head", "rotary"], r["fusion_status"]
    assert r["fusion_status"]["fusion_errors"] == {}  # neither the head nor the rotary kernel fell back
    assert r["status"]["fusions"] == [] and r["status"]["attention_active"] == "triton"
    # Logits relative to max |logit|: the split-bf16 head is ~1e-5 off fp32 and the rotary kernel ~1e-7;
    # the gelu GEMM rounds the intermediate once where the unfused path rounds twice (and the interpreter
    # truncates), so the two differ by bf16 rounding: 3.2e-3 measured.
    assert 0 < r["fusions_rel_err"] <= LOW_PRECISION_TOL, r["fusions_rel_err"]


# ------------------------------------------------------------------ in-process: plumbing, fallbacks


def _batch() -> dict[str, torch.Tensor]:
    from rex_stream.engine.fast_attention import synthetic_batch

    return synthetic_batch(3, 29, torch.device("cpu"), seed=3)


def _forward(model: Any, t: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(t["ids"], t["pos"], None, t["valid"], group=t["group"], slot=t["slot"])


@pytest.fixture
def model(tiny_model: Path) -> Any:
    from rex_stream.engine.weights import load_model

    return load_model(tiny_model)[0]


def test_no_cuda_no_interpreter_falls_back(model, tiny_model: Path, monkeypatch) -> None:
    monkeypatch.setattr(triton_attention, "_INTERPRET", False)
    reason = triton_attention.triton_unavailable_reason("cpu")
    assert reason is not None
    t = _batch()
    ref = _forward(model, t)
    assert model.set_attention("triton") == "sdpa"
    status = model.fast_path_status()
    assert status["attention_requested"] == "triton" and status["attention_active"] == "sdpa"
    assert status["attention_error"] == reason and status["flex_error"] is None
    assert torch.equal(_forward(model, t), ref)


def test_model_plumbing_with_reference_kernel(model, tiny_model: Path, monkeypatch) -> None:
    """The model's triton route (packed rows, offset, [T, H*D] output) with the dense reference as kernel."""
    calls = []

    def kernel(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(args)
        return triton_attention.reference_packed_attention(*args, **kwargs)

    monkeypatch.setattr(triton_attention, "triton_unavailable_reason", lambda device: None)
    monkeypatch.setattr(triton_attention, "packed_attention", kernel)
    t = _batch()
    ref = _forward(model, t)
    assert model.set_attention("triton") == "triton"
    got = _forward(model, t)
    assert model.attention == "triton" and len(calls) == model.cfg.num_hidden_layers  # the self-check reruns SDPA only
    keep = t["valid"][:, :, None] & t["valid"][:, None, :]
    assert (got - ref).abs()[keep].max() <= 1e-5 * ref.abs()[keep].max()
    # The layers ran on the valid tokens only (they are row prefixes here), packed back to back.
    lengths = t["valid"].sum(-1)
    q, rows = calls[0][0], calls[0][9]
    assert q.shape[0] == int(lengths.sum()) < t["valid"].numel()
    assert rows.lengths.dtype == torch.int32 and rows.lengths.tolist() == lengths.tolist()
    assert rows.starts.tolist() == (torch.cumsum(lengths, 0) - lengths).tolist() and rows.width == t["valid"].shape[1]
    assert model.fast_path_status()["self_checks"]["triton/cpu/float32"] < 1e-5


def test_encode_packs_host_lengths_without_reading_the_mask(model, monkeypatch) -> None:
    """Lengths given on the host (as the runner gives them) size the packing: the same hidden states
    as lengths read from the mask, and a row shortened on the host is cut there."""
    monkeypatch.setattr(triton_attention, "triton_unavailable_reason", lambda device: None)
    monkeypatch.setattr(triton_attention, "packed_attention", triton_attention.reference_packed_attention)
    t = _batch()
    model.set_attention("triton")
    args = (t["ids"], t["pos"], None, t["valid"])
    with torch.no_grad():
        read = model.encode(*args, group=t["group"], slot=t["slot"])
        given = model.encode(*args, group=t["group"], slot=t["slot"], lengths=t["valid"].sum(-1).tolist())
        short = model.encode(*args, group=t["group"], slot=t["slot"], lengths=[5, 5, 5])
    assert torch.equal(read, given)
    assert (short[:, 5:] == 0).all() and (short[:, :5] != 0).any(-1).all()


def test_kernel_error_falls_back_once(model, tiny_model: Path, monkeypatch, caplog) -> None:
    def broken(*args: Any, **kwargs: Any) -> torch.Tensor:
        raise RuntimeError("synthetic triton failure 4b7e")

    monkeypatch.setattr(triton_attention, "triton_unavailable_reason", lambda device: None)
    monkeypatch.setattr(triton_attention, "packed_attention", broken)
    t = _batch()
    ref = _forward(model, t)
    model.set_attention("triton")
    with caplog.at_level(logging.WARNING, logger="rex_stream.engine.model"):
        assert torch.equal(_forward(model, t), ref)
        assert torch.equal(_forward(model, t), ref)
    assert model.attention == "sdpa"
    assert "4b7e" in model.fast_path_status()["attention_error"]
    assert sum("4b7e" in r.getMessage() and "triton attention disabled" in r.getMessage()
               for r in caplog.records) == 1


def test_self_check_mismatch_falls_back(model, tiny_model: Path, monkeypatch) -> None:
    monkeypatch.setattr(triton_attention, "triton_unavailable_reason", lambda device: None)
    monkeypatch.setattr(triton_attention, "packed_attention",
                        lambda *a, **k: triton_attention.reference_packed_attention(*a, **k) * 1.5)
    t = _batch()
    ref = _forward(model, t)
    model.set_attention("triton")
    assert torch.equal(_forward(model, t), ref) and model.attention == "sdpa"
    assert "FastPathMismatch" in model.fast_path_status()["attention_error"]


def test_cli_and_settings_accept_triton() -> None:
    from rex_stream.cli import build_parser
    from rex_stream.config import ModelSettings
    from rex_stream.engine.model import ATTENTION_MODES

    assert "triton" in ATTENTION_MODES
    assert build_parser().parse_args(["infer", "--attention", "triton"]).attention == "triton"
    assert ModelSettings(attention="triton").attention == "triton"


if __name__ == "__main__":
    _interpreter_main(sys.argv[1:])


def test_tile_policy_by_width() -> None:
    """Each width gets the first entry whose bound covers it; the last entry covers every wider batch;
    a returned configuration is a copy (a caller's change never reaches the table)."""
    for device_type in ("cuda", "cpu"):
        policy = triton_attention.TILE_POLICY[device_type]
        assert [bound for bound, _ in policy] == sorted(bound for bound, _ in policy)
        low = 0
        for bound, config in policy:
            for width in {low + 1, bound} if bound < 1 << 30 else {low + 1, 1 << 20}:
                assert triton_attention.tile_config(device_type, width) == config, (device_type, width)
            low = bound
    assert triton_attention.tile_config("cpu", 24) != triton_attention.tile_config("cpu", 25)
    assert triton_attention.tile_config("mps", 90) == triton_attention.tile_config("cuda", 90)
    got = triton_attention.tile_config("cuda", 90)
    got["BLOCK_M"] = 1
    assert triton_attention.tile_config("cuda", 90)["BLOCK_M"] != 1
