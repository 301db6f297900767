"""The fused fast path's optional fusions (``RexModel.set_fusions``), in-process on CPU.

The Triton rotary kernel, and the whole model with every fusion on and off, run under the Triton
interpreter in test_triton_attention.py. Here: the split-bf16 head's maths (its CPU emulation), the
GELU epilogue on a fused path whose kernels are stood in for by their eager equivalents, that none of
it reaches the default path, the switch, and the fallbacks.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from rex_stream.engine import model as model_module
from rex_stream.engine import triton_attention, triton_ffn, triton_norm
from rex_stream.engine.fast_attention import synthetic_batch
from rex_stream.engine.model import DEFAULT_FUSIONS, RexModel

LINEAR_GELU = triton_ffn.linear_gelu


@pytest.fixture
def model(tiny_model: Path) -> RexModel:
    from rex_stream.engine.weights import load_model

    return load_model(tiny_model)[0]


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    return synthetic_batch(3, 29, torch.device("cpu"), seed=3)


def _hidden(model: RexModel, t: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model.encode(t["ids"], t["pos"], None, t["valid"], group=t["group"], slot=t["slot"])


def _fp32_logits(model: RexModel, hidden: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """The span head as it was before the fusions: two fp32 linears, eager rotary, q.k^T."""
    with torch.no_grad():
        q = model.rotary_emb(F.linear(hidden, model.ffnq.weight, model.ffnq.bias), pos)
        k = model.rotary_emb(F.linear(hidden, model.ffnk.weight, model.ffnk.bias), pos)
        return q @ k.transpose(-1, -2)


def _relative(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.float() - ref.float()).abs().max() / ref.float().abs().max())


# ------------------------------------------------------------------ split-bf16 head


def test_split_bf16_head_matches_fp32_head(model, batch) -> None:
    hidden = _hidden(model, batch)
    heads = (model.ffnq, model.ffnk)
    ref = torch.cat([F.linear(hidden, lin.weight, lin.bias) for lin in heads], dim=-1)
    with torch.no_grad():
        got = model._split_bf16_head(hidden) + torch.cat([lin.bias for lin in heads])
        plain_bf16 = torch.cat([F.linear(hidden.bfloat16(), lin.weight.bfloat16(), lin.bias.bfloat16())
                                for lin in heads], dim=-1)
    err = _relative(got, ref)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert 0 < err <= 1e-4, err  # ~8e-6 measured (2^-17); 0 would mean the fp32 head ran
    assert err < _relative(plain_bf16, ref) / 50  # one plain bf16 GEMM: ~4e-3
    split = model._head_split  # cached: [W_hi | W_lo | W_hi], bf16
    weight = torch.cat([lin.weight for lin in heads])
    width = weight.shape[1]
    assert split.dtype == torch.bfloat16 and split.shape == (weight.shape[0], 3 * width)
    assert torch.equal(split[:, :width], weight.bfloat16()) and torch.equal(split[:, 2 * width:], weight.bfloat16())
    model.clear_cache()
    assert model._head_split is None


def test_default_path_is_the_fp32_head(model, batch) -> None:
    """Fusions on (the default) change nothing off the fused fast path: bit for bit the fp32 head."""
    assert model.fusions == frozenset(DEFAULT_FUSIONS)
    hidden = _hidden(model, batch)
    ref = _fp32_logits(model, hidden, batch["pos"])
    with torch.no_grad():
        assert torch.equal(model.link_logits(hidden, batch["pos"]), ref)
        assert torch.equal(model(batch["ids"], batch["pos"], None, batch["valid"], group=batch["group"],
                                 slot=batch["slot"]), ref)
        model.set_fusions(())
        assert torch.equal(model.link_logits(hidden, batch["pos"], fused=True), ref)
        model.set_fusions({"head"})
        split = model.link_logits(hidden, batch["pos"], fused=True)
    assert not torch.equal(split, ref) and _relative(split, ref) <= 1e-4
    assert model.fast_path_status()["fusion_errors"] == {}


def test_head_failure_falls_back_to_fp32_once(model, batch, monkeypatch, caplog) -> None:
    def no_out_dtype(h: torch.Tensor) -> torch.Tensor:
        raise TypeError("mm() got an unexpected keyword argument 'out_dtype' 9c1e")

    monkeypatch.setattr(model, "_split_bf16_head", no_out_dtype)
    hidden = _hidden(model, batch)
    ref = _fp32_logits(model, hidden, batch["pos"])
    model.set_fusions({"head"})
    with caplog.at_level(logging.WARNING, logger="rex_stream.engine.model"), torch.no_grad():
        assert torch.equal(model.link_logits(hidden, batch["pos"], fused=True), ref)
        assert torch.equal(model.link_logits(hidden, batch["pos"], fused=True), ref)
    assert sum("9c1e" in r.getMessage() for r in caplog.records) == 1
    status = model.fast_path_status()
    assert status["fusions"] == [] and "9c1e" in status["fusion_errors"]["head"]
    model.set_fusions({"head"})  # clears the failure: the next call tries again
    assert model.fast_path_status()["fusion_errors"] == {}


def test_head_out_of_memory_propagates(model, batch, monkeypatch) -> None:
    """The engine splits a batch on OOM: a fusion must not swallow it (nor switch itself off)."""
    def oom(h: torch.Tensor) -> torch.Tensor:
        raise torch.OutOfMemoryError("synthetic")

    monkeypatch.setattr(model, "_split_bf16_head", oom)
    with pytest.raises(torch.OutOfMemoryError), torch.no_grad():
        model.link_logits(_hidden(model, batch), batch["pos"], fused=True)
    assert model.fast_path_status()["fusion_errors"] == {}


def test_rotary_kernel_failure_falls_back_to_eager(model, batch, monkeypatch) -> None:
    monkeypatch.setattr(triton_attention, "_INTERPRET", False)  # CPU without the interpreter: no kernel
    hidden = _hidden(model, batch)
    model.set_fusions({"rotary"})
    with torch.no_grad():
        assert torch.equal(model.link_logits(hidden, batch["pos"], fused=True), _fp32_logits(model, hidden, batch["pos"]))
    assert "rotary" in model.fast_path_status()["fusion_errors"]


def test_set_fusions_and_engine_keyword(model, tiny_model: Path) -> None:
    from rex_stream.engine.engine import Engine

    with pytest.raises(ValueError, match="unknown fusions"):
        model.set_fusions({"gelu", "softmax"})
    assert model.set_fusions(["gelu", "rotary"]) == frozenset({"gelu", "rotary"}) == model.fusions
    assert Engine(tiny_model, fusions=frozenset({"head"})).runner.model.fusions == frozenset({"head"})
    assert Engine(tiny_model).runner.model.fusions == frozenset(DEFAULT_FUSIONS)


# ------------------------------------------------------------------ GELU epilogue


@pytest.fixture
def fused_path(monkeypatch) -> list[int]:
    """The triton path on CPU with its kernels replaced by their eager equivalents; counts fused GELU GEMMs."""
    def add_layer_norm(y: torch.Tensor, residual: torch.Tensor, norm: Any, low: torch.dtype) -> Any:
        out = norm(y + residual)
        return out, out.to(low)

    calls = []

    def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        calls.append(True)
        return F.gelu(F.linear(x, weight.to(x.dtype), bias.to(x.dtype)))

    monkeypatch.setattr(triton_attention, "triton_unavailable_reason", lambda device: None)
    monkeypatch.setattr(triton_attention, "packed_attention", triton_attention.reference_packed_attention)
    monkeypatch.setattr(triton_norm, "add_layer_norm", add_layer_norm)
    monkeypatch.setattr(triton_norm, "embed_layer_norm", triton_norm.reference_embed_layer_norm)
    monkeypatch.setattr(triton_norm, "conv_mix", triton_norm.reference_conv_mix)
    monkeypatch.setattr(triton_ffn, "linear_gelu", linear_gelu)
    return calls


def test_gelu_epilogue_on_fused_path_only(model, batch, fused_path) -> None:
    layers = model.cfg.num_hidden_layers
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sdpa = _hidden(model, batch)
        assert fused_path == []  # SDPA in bf16: not the fused path
        assert model.set_attention("triton") == "triton"
        model.set_fusions({"gelu"})
        on = _hidden(model, batch)
        assert fused_path == [True] * layers
        model.set_fusions(())
        off = _hidden(model, batch)
    assert fused_path == [True] * layers and model.attention == "triton"
    _hidden(model, batch)  # fp32 on the triton path: no 16-bit copies, no fused GELU
    assert fused_path == [True] * layers
    keep = batch["valid"].unsqueeze(-1)
    assert _relative(on * keep, off * keep) <= 2e-2  # bf16 (CPU: the same erf GELU, so ~0)
    assert _relative(on * keep, sdpa * keep) <= model_module.SELF_CHECK_TOL[torch.bfloat16]


def test_gelu_gemm_unavailable_runs_unfused(model, batch, fused_path, monkeypatch) -> None:
    """Without the TMA GEMM (CPU, no interpreter; or a GPU before compute capability 9) the fused path
    switches the gelu fusion off once, says why, and runs the eager GEMM and GELU."""
    monkeypatch.setattr(triton_ffn, "linear_gelu", LINEAR_GELU)  # the real one again, not fused_path's
    monkeypatch.setattr(triton_ffn, "_INTERPRET", False)
    triton_ffn._unavailable_reason.cache_clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.set_attention("triton") == "triton"
        model.set_fusions(())
        off = _hidden(model, batch)
        model.set_fusions({"gelu"})
        on = _hidden(model, batch)
    triton_ffn._unavailable_reason.cache_clear()
    status = model.fast_path_status()
    assert status["fusions"] == [] and "needs a CUDA device" in status["fusion_errors"]["gelu"], status
    assert torch.equal(on, off) and fused_path == []
