"""Optional encoder fast paths (FlexAttention, torch.compile) against the exact SDPA path, on CPU.

The CUDA kernels themselves are exercised on the device (``python -m rex_stream.engine.fast_attention``);
here we pin the maths (score_mod / mask_mod against the dense path, padding, clamping), the
compiled CPU variants, and the fallback rules (errors and self-check mismatches go back to SDPA).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch

from rex_stream.engine import fast_attention
from rex_stream.engine.layout import attention_allowed, build_layout
from rex_stream.engine.model import RexModel
from rex_stream.engine.tokenizer import RexTokenizer
from rex_stream.engine.weights import load_model

SHARED = Path(os.environ.get("REX_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
TINY = SHARED / "rex" / "tiny-random"
TRACES = SHARED / "rex" / "golden" / "traces.jsonl"
if not (TINY / "config.json").is_file() or not TRACES.is_file():
    pytest.skip(f"REX_SHARED is missing: no tiny model/traces under {SHARED}", allow_module_level=True)
_UNAVAILABLE = fast_attention.flex_unavailable_reason()
if _UNAVAILABLE is not None:
    pytest.skip(f"flex_attention unsupported in this torch build: {_UNAVAILABLE}", allow_module_level=True)

# The SDPA path itself reproduces the fp32 reference to ~1e-4 on logits of ~100-340; the flex path
# must agree with it at the same noise level (brief: <= 1e-3 relative to logits ~100).
REL_TOL = 1e-3

CASES = [json.loads(line) for line in TRACES.read_text(encoding="utf-8").splitlines() if line.strip()]
FORWARDS = [(f"{c['id']}#{f['index']}", f) for c in CASES for f in c["forwards"]]


@pytest.fixture(scope="module")
def special():
    return RexTokenizer(TINY).special


@pytest.fixture
def model() -> RexModel:
    return load_model(TINY)[0]


@pytest.fixture(scope="module")
def sdpa_model() -> RexModel:
    return load_model(TINY)[0]


@pytest.fixture
def flex_model() -> RexModel:
    """Eager flex (the fused kernel needs torch.compile; its CPU variants are tested separately)."""
    model = load_model(TINY)[0]
    assert model.set_attention("flex", compile=False) == "flex"
    return model


def _single(f: dict, special) -> dict[str, torch.Tensor]:
    _, group, slot = build_layout(f["input_ids"], special)
    ids = torch.tensor([f["input_ids"]])
    return {
        "ids": ids, "pos": torch.tensor([f["position_ids"]]),
        "mask": torch.tensor([[ch == "1" for ch in row] for row in f["attention_mask"]]).unsqueeze(0),
        "valid": torch.ones_like(ids, dtype=torch.bool),
        "group": torch.from_numpy(group)[None], "slot": torch.from_numpy(slot)[None],
    }


def _padded(forwards: list[dict], special) -> dict[str, torch.Tensor]:
    """Right-padded batch whose padding region (ids, positions, mask, group, slot) is garbage."""
    gen = torch.Generator().manual_seed(11)
    width = max(len(f["input_ids"]) for f in forwards)
    n = len(forwards)
    t = {
        "ids": torch.randint(0, 12804, (n, width), generator=gen),
        "pos": torch.randint(0, width, (n, width), generator=gen),
        "mask": torch.ones(n, width, width, dtype=torch.bool),
        "valid": torch.zeros(n, width, dtype=torch.bool),
        "group": torch.randint(-1, 3, (n, width), generator=gen),
        "slot": torch.randint(-1, 3, (n, width), generator=gen),
    }
    for b, f in enumerate(forwards):
        one = _single(f, special)
        length = one["ids"].shape[1]
        for key in ("ids", "pos", "valid", "group", "slot"):
            t[key][b, :length] = one[key][0]
        t["mask"][b, :length, :length] = one["mask"][0]
    return t


def _run(model: RexModel, t: dict[str, torch.Tensor], layout: bool = True) -> torch.Tensor:
    with torch.no_grad():
        if layout:
            return model(t["ids"], t["pos"], None, t["valid"], group=t["group"], slot=t["slot"])
        return model(t["ids"], t["pos"], t["mask"], t["valid"])


def _links(logits: torch.Tensor) -> set[tuple[int, int]]:
    return set(map(tuple, (logits > 0).nonzero().tolist()))


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_layout_vectors_reproduce_trace_masks(special) -> None:
    """group/slot from build_layout describe exactly the traces' dense masks and positions."""
    for _, f in FORWARDS:
        one = _single(f, special)
        assert one["pos"][0].tolist() == build_layout(f["input_ids"], special)[0].tolist()
        assert torch.equal(torch.from_numpy(attention_allowed(one["group"][0].numpy(), one["slot"][0].numpy())),
                           one["mask"][0])
        assert torch.equal(fast_attention.layout_allowed(one["group"], one["slot"], one["valid"]), one["mask"])


@pytest.mark.parametrize("layout", [True, False], ids=["group-slot", "dense-mask"])
def test_flex_matches_sdpa_on_traces(sdpa_model: RexModel, flex_model: RexModel, special, layout: bool) -> None:
    worst = 0.0
    for name, f in FORWARDS:
        t = _single(f, special)
        ref = _run(sdpa_model, t, layout=False)
        got = _run(flex_model, t, layout=layout)
        worst = max(worst, _rel_diff(got, ref))
        assert _rel_diff(got, ref) <= REL_TOL, name
        assert _links(got[0]) == _links(ref[0]) == set(map(tuple, f["positive"])), name
    assert flex_model.attention == "flex", flex_model.fast_path_status()
    assert flex_model.fast_path_status()["self_checks"]["flex/cpu/float32"] < 1e-5
    assert worst < 1e-5  # measured ~1e-6: only summation order differs


def test_flex_padded_batch(sdpa_model: RexModel, flex_model: RexModel, special) -> None:
    forwards = [f for _, f in FORWARDS[:6]] + [FORWARDS[-1][1]]  # lengths 15..432
    t = _padded(forwards, special)
    ref_dense = _run(sdpa_model, t, layout=False)
    got = _run(flex_model, t)
    got_dense = _run(flex_model, t, layout=False)
    assert flex_model.attention == "flex"
    assert torch.isfinite(got).all() and torch.isfinite(got_dense).all()  # padding rows included
    for b, f in enumerate(forwards):
        n = len(f["input_ids"])
        single = _run(flex_model, _single(f, special))
        for logits in (got, got_dense):
            assert _rel_diff(logits[b, :n, :n], ref_dense[b, :n, :n]) <= REL_TOL
            assert _rel_diff(logits[b, :n, :n], single[0]) <= REL_TOL
            assert _links(logits[b, :n, :n]) == set(map(tuple, f["positive"]))


def _reference_attention(q, k, v, pos_q, pos_k, pos, allowed, scale, span):
    length = q.shape[-2]
    lo, hi = max(0, span - length + 1), min(2 * span, span + length)
    index = ((pos[:, :, None] - pos[:, None, :] + span).clamp(lo, hi - 1) - lo).unsqueeze(1).expand_as(q @ k.mT)
    c2p = torch.gather(q @ pos_k[:, lo:hi].mT, -1, index)
    p2c = torch.gather(k @ pos_q[:, lo:hi].mT, -1, index.mT).mT
    scores = (q @ k.mT * scale + c2p + p2c).masked_fill(~allowed[:, None], float("-inf"))
    return torch.softmax(scores, -1).nan_to_num(0.0) @ v, lo, hi


@pytest.mark.parametrize("length", [5, 23, 40], ids=lambda n: f"L{n}")
def test_flex_context_clamps_and_zeroes_dead_rows(length: int) -> None:
    """A small span (8) so that clamping is active; padded rows must come out exactly zero."""
    span, batch, heads, dim = 8, 3, 2, 16
    gen = torch.Generator().manual_seed(length)
    q, k, v = (torch.randn(batch, heads, length, dim, generator=gen) for _ in range(3))
    pos_q, pos_k = (torch.randn(heads, 2 * span, dim, generator=gen) for _ in range(2))
    pos = torch.randint(-3, length + 3, (batch, length), generator=gen)  # out of range on purpose
    valid = torch.ones(batch, length, dtype=torch.bool)
    valid[1, length // 2 :] = False
    valid[2, 1:] = False
    group = torch.randint(-1, 2, (batch, length), generator=gen)
    slot = torch.randint(-1, 2, (batch, length), generator=gen)
    allowed = fast_attention.layout_allowed(group, slot, valid)
    ref, lo, hi = _reference_attention(q, k, v, pos_q, pos_k, pos, allowed, 0.2, span)
    for block_mask in (fast_attention.layout_block_mask(group, slot, valid), fast_attention.dense_block_mask(allowed)):
        out = fast_attention.flex_context(q, k, v, pos_q[:, lo:hi], pos_k[:, lo:hi], pos, span - lo, block_mask, 0.2,
                                          fast_attention.FlexKernel(compile=False)(q.device))
        assert torch.isfinite(out).all()
        assert (out[1, :, length // 2 :] == 0).all() and (out[2, :, 1:] == 0).all()
        assert (out - ref).abs().max().item() < 1e-5


def test_flex_bf16_autocast_smoke(flex_model: RexModel, special) -> None:
    forwards = [f for _, f in FORWARDS]
    both = union = 0
    for f in forwards:
        t = _single(f, special)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = _run(flex_model, t)
        assert got.dtype == torch.float32 and torch.isfinite(got).all()
        fp32 = set(map(tuple, f["positive"]))
        both += len(_links(got[0]) & fp32)
        union += len(_links(got[0]) | fp32)
    padded = _padded(forwards[:5], special)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(_run(flex_model, padded)).all()
    assert flex_model.attention == "flex", flex_model.fast_path_status()
    assert both / union >= 0.95  # measured 0.994 (plain bf16 SDPA: 0.994)
    assert flex_model.fast_path_status()["self_checks"]["flex/cpu/bfloat16"] < 0.02  # measured ~4e-3


def test_compiled_flex_kernel_on_cpu(model: RexModel, special) -> None:
    """torch.compile(flex_attention) on CPU; the dynamic kernel may hit CPU-inductor bugs and
    degrade to static shapes, but must stay on flex and correct."""
    forwards = [f for _, f in FORWARDS[:3]]
    batches = [_padded(forwards, special), _single(forwards[0], special)]
    refs = [_run(model, t) for t in batches]
    model.set_attention("flex", compile=True, dynamic=True)
    for t, ref in zip(batches, refs):
        got = _run(model, t)
        status = model.fast_path_status()
        if status["flex_error"] is not None:
            pytest.skip(f"compiled flex_attention unsupported on this CPU toolchain: {status['flex_error'][:300]}")
        assert model.attention == "flex"
        valid = t["valid"][:, :, None] & t["valid"][:, None, :]
        assert (got - ref).abs()[valid].max() <= REL_TOL * ref.abs()[valid].max()
    assert status["self_checks"]["flex/cpu/float32"] < 1e-5


@pytest.mark.parametrize("attention", ["sdpa", "flex"])
def test_compile_encoder_on_cpu(model: RexModel, special, attention: str) -> None:
    """Whole-encoder torch.compile (static shapes: the CPU flex template lacks symbolic scalars)."""
    forwards = [f for _, f in FORWARDS[:3]]
    t = _padded(forwards, special)
    ref = _run(model, t)
    model.set_attention(attention, compile=False)
    assert model.compile_encoder(dynamic=False)
    got = _run(model, t)
    status = model.fast_path_status()
    assert status["compile_errors"] == {}, status
    assert status["self_checks"][f"compile/{attention}/cpu/float32"] < 1e-5
    valid = t["valid"][:, :, None] & t["valid"][:, None, :]
    assert (got - ref).abs()[valid].max() <= REL_TOL * ref.abs()[valid].max()
    for b, f in enumerate(forwards):
        n = len(f["input_ids"])
        assert _links(got[b, :n, :n]) == set(map(tuple, f["positive"]))
    model.compile_encoder(enabled=False)
    assert torch.equal(_run(model, t, layout=False), _run(model, t))  # back to eager, same inputs


# ---------------------------------------------------------------------------- fallbacks


def test_flex_error_falls_back_to_sdpa_once(model: RexModel, special, monkeypatch, caplog) -> None:
    t = _single(FORWARDS[0][1], special)
    ref = _run(model, t)

    def broken(*args, **kwargs):
        raise RuntimeError("synthetic flex failure 1f3a")

    monkeypatch.setattr(fast_attention, "flex_context", broken)
    model.set_attention("flex", compile=False)
    with caplog.at_level(logging.WARNING, logger="rex_stream.engine.model"):
        first = _run(model, t)
        second = _run(model, t)
    assert torch.equal(first, ref) and torch.equal(second, ref)
    assert model.attention == "sdpa"
    assert "synthetic flex failure 1f3a" in model.fast_path_status()["flex_error"]
    assert sum("synthetic flex failure 1f3a" in r.getMessage() for r in caplog.records) == 1
    monkeypatch.undo()
    assert model.set_attention("flex", compile=False) == "flex"  # an explicit re-enable retries
    assert _rel_diff(_run(model, t), ref) <= REL_TOL and model.attention == "flex"


def test_self_check_mismatch_falls_back(model: RexModel, special, monkeypatch, caplog) -> None:
    t = _single(FORWARDS[2][1], special)
    ref = _run(model, t)
    real = fast_attention.flex_context
    monkeypatch.setattr(fast_attention, "flex_context", lambda *a, **k: real(*a, **k) * 1.5)
    model.set_attention("flex", compile=False)
    with caplog.at_level(logging.WARNING, logger="rex_stream.engine.model"):
        got = _run(model, t)
    assert torch.equal(got, ref) and model.attention == "sdpa"
    assert "FastPathMismatch" in model.fast_path_status()["flex_error"]
    assert any("self-check flex/cpu/float32" in r.getMessage() for r in caplog.records)


def test_dynamic_kernel_failure_degrades_to_static(model: RexModel, special, monkeypatch) -> None:
    t = _single(FORWARDS[1][1], special)
    ref = _run(model, t)
    model.set_attention("flex", compile=True, dynamic=True)
    kernel = model._flex_kernel

    def failing(*a, **k):
        raise RuntimeError("synthetic dynamic-shape failure 9c1e")

    def call(self, device):  # the static kernel is stood in for by the eager one
        return failing if self.dynamic is not False else fast_attention._eager_flex

    monkeypatch.setattr(fast_attention.FlexKernel, "__call__", call)
    got = _run(model, t)
    assert model.attention == "flex" and kernel.dynamic is False
    assert _rel_diff(got, ref) <= REL_TOL


def test_compile_failure_falls_back_to_eager(model: RexModel, special, monkeypatch) -> None:
    t = _single(FORWARDS[0][1], special)
    ref = _run(model, t)

    def fake_compile(fn, **kwargs):
        def compiled(*a, **k):
            raise RuntimeError("synthetic compile failure 77b2")
        return compiled

    monkeypatch.setattr(torch, "compile", fake_compile)
    assert model.compile_encoder()
    first = _run(model, t)
    assert torch.equal(first, ref)
    assert "77b2" in model.fast_path_status()["compile_errors"]["sdpa"]
    assert torch.equal(_run(model, t), ref)


def test_unavailable_flex_keeps_sdpa(model: RexModel, monkeypatch) -> None:
    monkeypatch.setattr(fast_attention, "flex_unavailable_reason", lambda: "no flex in this build 5d0c")
    assert model.set_attention("flex") == "sdpa"
    assert "5d0c" in model.fast_path_status()["flex_error"]


def test_api_validation(model: RexModel, special) -> None:
    with pytest.raises(ValueError, match="attention must be one of"):
        model.set_attention("flash")
    t = _single(FORWARDS[0][1], special)
    with pytest.raises(ValueError, match="group and slot"):
        model(t["ids"], t["pos"], None, t["valid"])
    assert model.fast_path_status()["attention_active"] == "sdpa"
