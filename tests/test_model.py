"""RexModel against the reference traces, padding isolation, strict loading and random model dirs."""

from __future__ import annotations

import json
import os
import shutil
import sys
import types
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from rex_stream.engine.model import RexModel
from rex_stream.engine.random_model import write_random_model
from rex_stream.engine.weights import (
    ModelConfig,
    ModelLoadError,
    ModelNotFound,
    UnsupportedConfig,
    load_model,
    resolve_model_dir,
)

SHARED = Path(os.environ.get("REX_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
TINY = SHARED / "rex" / "tiny-random"
TRACES = SHARED / "rex" / "golden" / "traces.jsonl"
if not (TINY / "config.json").is_file() or not TRACES.is_file():
    pytest.skip(f"REX_SHARED is missing: no tiny model/traces under {SHARED}", allow_module_level=True)

# The traces' "prob" field holds the reference's raw logits (values far above 1 occur). The fp32
# reference itself differs from an fp64 evaluation by up to ~1.2e-4 on these inputs, so logits
# are compared with a tolerance at that noise level; link sets must match exactly.
LOGIT_ATOL = 3e-4


def _forwards() -> list[tuple[str, dict]]:
    cases = [json.loads(line) for line in TRACES.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [(f"{c['id']}#{f['index']}", f) for c in cases for f in c["forwards"]]


FORWARDS = _forwards()


def _tensors(f: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = torch.tensor([f["input_ids"]])
    pos = torch.tensor([f["position_ids"]])
    mask = torch.tensor([[ch == "1" for ch in row] for row in f["attention_mask"]]).unsqueeze(0)
    return ids, pos, mask, torch.ones_like(ids, dtype=torch.bool)


@pytest.fixture(scope="module")
def tiny() -> RexModel:
    torch.manual_seed(0)
    return load_model(TINY)[0]


def _links(logits: torch.Tensor) -> set[tuple[int, int]]:
    return set(map(tuple, (logits > 0).nonzero().tolist()))


@pytest.mark.parametrize("f", [f for _, f in FORWARDS], ids=[name for name, _ in FORWARDS])
def test_matches_reference_trace(tiny: RexModel, f: dict) -> None:
    with torch.no_grad():
        logits = tiny(*_tensors(f))[0]
    assert logits.dtype == torch.float32
    assert _links(logits) == set(map(tuple, f["positive"]))
    rows, cols = torch.tensor(f["positive"]).T
    ours = logits[rows, cols].double()
    ref = torch.tensor(f["prob"], dtype=torch.float64)
    assert (ours - ref).abs().max().item() <= LOGIT_ATOL
    assert (ours.sigmoid() - ref.sigmoid()).abs().max().item() <= LOGIT_ATOL / 4


def _padded_batch(forwards: list[dict]) -> tuple[torch.Tensor, ...]:
    """Right-padded batch whose padding region is deliberately filled with garbage."""
    gen = torch.Generator().manual_seed(7)
    width = max(len(f["input_ids"]) for f in forwards)
    n = len(forwards)
    ids = torch.randint(0, 12804, (n, width), generator=gen)
    pos = torch.randint(0, width, (n, width), generator=gen)
    mask = torch.ones(n, width, width, dtype=torch.bool)
    valid = torch.zeros(n, width, dtype=torch.bool)
    for b, f in enumerate(forwards):
        one_ids, one_pos, one_mask, _ = _tensors(f)
        length = one_ids.shape[1]
        ids[b, :length], pos[b, :length], valid[b, :length] = one_ids[0], one_pos[0], True
        mask[b, :length, :length] = one_mask[0]
    return ids, pos, mask, valid


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batch_independence(tiny: RexModel, dtype: torch.dtype) -> None:
    model = tiny if dtype == torch.float32 else load_model(TINY)[0].to(dtype)
    forwards = [f for _, f in FORWARDS[:8]]
    with torch.no_grad():
        batched = model(*_padded_batch(forwards))
        for b, f in enumerate(forwards):
            single = model(*_tensors(f))[0]
            n = single.shape[0]
            diff = (batched[b, :n, :n] - single).abs().max().item()
            # fp64 shows the structure is exact; fp32 only differs by matmul blocking noise.
            assert diff <= (1e-9 if dtype == torch.float64 else LOGIT_ATOL)
            assert _links(batched[b, :n, :n]) == set(map(tuple, f["positive"]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_is_finite_with_padding(tiny: RexModel, dtype: torch.dtype) -> None:
    forwards = [f for _, f in FORWARDS[:4]]
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        logits = tiny(*_padded_batch(forwards))
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    for b, f in enumerate(forwards):  # the decisions mostly survive (tiny logits are ~20 std)
        n = len(f["input_ids"])
        got = _links(logits[b, :n, :n])
        assert len(got ^ set(map(tuple, f["positive"]))) <= 0.02 * n * n


def test_layout_vectors_select_the_same_default_path(tiny: RexModel) -> None:
    """forward(..., attention_mask=None, group=, slot=) builds the dense mask itself: bit-identical."""
    from rex_stream.engine.layout import build_layout
    from rex_stream.engine.tokenizer import RexTokenizer

    special = RexTokenizer(TINY).special
    forwards = [f for _, f in FORWARDS[:6]]
    ids, pos, mask, valid = _padded_batch(forwards)
    group = torch.full_like(ids, -1)
    slot = torch.full_like(ids, -1)
    for b, f in enumerate(forwards):
        _, g, s = build_layout(f["input_ids"], special)
        group[b, : len(g)], slot[b, : len(s)] = torch.from_numpy(g), torch.from_numpy(s)
    assert tiny.attention == "sdpa"
    with torch.no_grad():
        dense = tiny(ids, pos, mask, valid)
        assert torch.equal(tiny(ids, pos, None, valid, group=group, slot=slot), dense)
        assert torch.equal(tiny(ids, pos, mask, valid, group=group, slot=slot), dense)


def test_relative_cache_follows_dtype(tiny: RexModel) -> None:
    model = load_model(TINY)[0]
    assert list(model._rel_cache) == [(torch.device("cpu"), torch.float32)]
    model.to(torch.float64)
    assert not model._rel_cache
    f = FORWARDS[0][1]
    with torch.no_grad():
        assert torch.allclose(model(*_tensors(f)), tiny(*_tensors(f)).double(), atol=LOGIT_ATOL)
    assert list(model._rel_cache) == [(torch.device("cpu"), torch.float64)]


def _copy_tiny(tmp_path: Path, edit: Callable[[dict], object]) -> Path:
    out = tmp_path / "model"
    out.mkdir()
    for source in TINY.iterdir():  # contents only: the shared copy is read-only
        shutil.copyfile(source, out / source.name)
    state = torch.load(out / "pytorch_model.bin", weights_only=True)
    edit(state)
    torch.save(state, out / "pytorch_model.bin")
    return out


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda s: s.__setitem__("ffnq.extra", torch.zeros(3)), "ffnq.extra"),
        (lambda s: s.pop("ffnk.bias"), "ffnk.bias"),
        (
            lambda s: s.__setitem__("plm.encoder.rel_embeddings.weight", torch.zeros(511, 64)),
            "plm.encoder.rel_embeddings.weight: checkpoint [511, 64] vs model [512, 64]",
        ),
    ],
    ids=["extra", "missing", "shape"],
)
def test_loader_rejects_mismatched_checkpoint(tmp_path: Path, edit: Callable[[dict], object], needle: str) -> None:
    with pytest.raises(ModelLoadError) as err:
        load_model(_copy_tiny(tmp_path, edit))
    assert needle in str(err.value)


def test_loader_allows_harmless_extra_and_prefers_safetensors(tiny: RexModel, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    out = _copy_tiny(tmp_path, lambda s: s.__setitem__("plm.embeddings.position_ids", torch.arange(512)[None]))
    state = torch.load(out / "pytorch_model.bin", weights_only=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"))
    (out / "pytorch_model.bin").write_bytes(b"not a checkpoint")  # must not be read
    model, cfg = load_model(out)
    assert cfg.hidden_size == 64 and not model.training
    f = FORWARDS[0][1]
    with torch.no_grad():
        assert torch.equal(model(*_tensors(f)), tiny(*_tensors(f)))


@pytest.mark.parametrize(
    ("key", "value"),
    [("relative_attention", False), ("position_biased_input", True), ("hidden_act", "relu"),
     ("max_relative_positions", 512), ("pos_att_type", "p2c")],
)
def test_config_rejects_unsupported_settings(key: str, value: object) -> None:
    raw = json.loads((TINY / "config.json").read_text())
    ModelConfig.from_dict(raw)
    with pytest.raises(UnsupportedConfig, match=key):
        ModelConfig.from_dict({**raw, key: value})


def test_resolve_model_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_model_dir(str(TINY)) == TINY
    with pytest.raises(ModelNotFound, match="does not exist"):
        resolve_model_dir(str(tmp_path / "nope"))

    def offline(model_id: str, revision: str | None = None, cache_dir: str | None = None) -> str:
        raise ConnectionError("network unreachable")

    monkeypatch.setitem(sys.modules, "modelscope", types.SimpleNamespace(snapshot_download=offline))
    with pytest.raises(ModelNotFound) as err:
        resolve_model_dir("iic/some-model", cache_dir=str(tmp_path / "cache"))
    assert "iic/some-model" in str(err.value) and str(tmp_path / "cache") in str(err.value)

    monkeypatch.setitem(sys.modules, "modelscope", types.SimpleNamespace(snapshot_download=lambda *a, **k: str(TINY)))
    assert resolve_model_dir("iic/some-model") == TINY


def test_random_tiny_model(tmp_path: Path) -> None:
    vocab = TINY / "vocab.txt"
    a = write_random_model(tmp_path / "a", "tiny", seed=1, vocab_path=vocab)
    b = write_random_model(tmp_path / "b", "tiny", seed=1, vocab_path=vocab)
    c = write_random_model(tmp_path / "c", "tiny", seed=2, vocab_path=vocab)
    assert (a / "pytorch_model.bin").read_bytes() == (b / "pytorch_model.bin").read_bytes()
    assert (a / "pytorch_model.bin").read_bytes() != (c / "pytorch_model.bin").read_bytes()
    assert json.loads((a / "config.json").read_text()) == json.loads((TINY / "config.json").read_text())
    for name in ("vocab.txt", "configuration.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (a / name).read_bytes() == (TINY / name).read_bytes()
    model, _ = load_model(a)
    with torch.no_grad():
        logits = model(*_tensors(FORWARDS[0][1]))
    assert torch.isfinite(logits).all()


def test_random_base_model(tmp_path: Path) -> None:
    out = write_random_model(tmp_path, "base", seed=0, vocab_path=TINY / "vocab.txt")
    model, cfg = load_model(out)
    state = model.state_dict()
    assert (cfg.hidden_size, cfg.num_hidden_layers, len(state)) == (768, 12, 207)
    assert sum(t.numel() for t in state.values()) == 98_237_568
    f = FORWARDS[0][1]
    with torch.no_grad():
        logits = model(*_tensors(f))[0]
    assert torch.isfinite(logits).all()
    text = logits[f["token_type_ids"].index(1) :, f["token_type_ids"].index(1) :]
    distance = torch.arange(len(text))[None, :] - torch.arange(len(text))[:, None]
    assert (text[distance.abs() > 3] > 0).float().mean().item() < 0.02  # sparse away from the diagonal
    assert (text.diagonal() > 0).any()  # but not dead


def _unfuse(model: RexModel) -> None:
    """Back to the three q/k/v projections (the pre-fusion reduced-precision path), same weights."""
    model._qkv_dtype = None
    for layer in model.plm.encoder.layer:
        layer.qkv = None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_qkv_matches_three_projections(dtype: torch.dtype) -> None:
    """store_matmul_weights(16-bit) runs one fused QKV GEMM per layer: same logits as three projections."""
    fused, plain = load_model(TINY)[0], load_model(TINY)[0]
    fused.store_matmul_weights(dtype)
    plain.store_matmul_weights(dtype)
    _unfuse(plain)
    h = fused.cfg.hidden_size
    for layer in fused.plm.encoder.layer:
        proj = layer.attention["self"]
        weight, bias = layer.qkv
        assert weight.shape == (3 * h, h) and bias.shape == (3 * h,) and weight.dtype == bias.dtype == dtype
        assert torch.equal(weight, torch.cat([proj[n].weight for n in ("query_proj", "key_proj", "value_proj")]))
        assert torch.equal(bias, torch.cat([proj[n].bias for n in ("query_proj", "key_proj", "value_proj")]))
    batch = _padded_batch([f for _, f in FORWARDS[:8]])
    valid = batch[3]
    keep = valid[:, :, None] & valid[:, None, :]
    calls = {"fused": 0, "plain": 0}
    for name, model in (("fused", fused), ("plain", plain)):
        for layer in model.plm.encoder.layer:
            for proj in layer.attention["self"].values():
                proj.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        got, ref = fused(*batch), plain(*batch)
    assert calls == {"fused": 0, "plain": 3 * fused.cfg.num_hidden_layers}  # the fused path skips the modules
    assert all(layer.qkv is not None for layer in fused.plm.encoder.layer)
    assert all(layer.qkv is None for layer in plain.plm.encoder.layer)
    # Measured on CPU (bf16 and fp16): bit-identical; allow rounding noise of another GEMM blocking.
    diff = (got - ref).abs()[keep].max().item()
    assert diff <= 1e-2 * ref.abs()[keep].max().item(), diff
    assert torch.isfinite(got).all()


def test_fused_qkv_stays_out_of_fp32_and_the_state_dict(tiny: RexModel) -> None:
    f = FORWARDS[0][1]
    with torch.no_grad():
        tiny(*_tensors(f))
    assert all(layer.qkv is None for layer in tiny.plm.encoder.layer)  # an fp32 model never fuses
    fp32 = load_model(TINY)[0]
    fp32.store_matmul_weights(torch.float32)
    with torch.no_grad():
        assert torch.equal(fp32(*_tensors(f)), tiny(*_tensors(f)))
    assert all(layer.qkv is None for layer in fp32.plm.encoder.layer)

    model = load_model(TINY)[0]
    model.store_matmul_weights(torch.bfloat16)
    state = model.state_dict()
    assert list(state) == list(tiny.state_dict())  # same keys, nothing fused among them
    # .to()/load_state_dict clear the fused weights; the next forward rebuilds them from the new weights.
    model.to(torch.device("cpu"))
    assert all(layer.qkv is None for layer in model.plm.encoder.layer)
    other = load_model(TINY)[0]
    with torch.no_grad():
        for p in other.plm.encoder.layer.parameters():
            p.mul_(0.5)
    model.load_state_dict(other.state_dict())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(*_tensors(f))
    h = model.cfg.hidden_size
    for layer, source in zip(model.plm.encoder.layer, other.plm.encoder.layer, strict=True):
        proj = source.attention["self"]
        assert torch.equal(layer.qkv[0], torch.cat([proj[n].weight for n in ("query_proj", "key_proj", "value_proj")])
                           .bfloat16())
        assert torch.equal(layer.qkv[1][2 * h :], proj["value_proj"].bias.bfloat16())
    model.float()  # projections back in fp32: the three-projection path again
    with torch.no_grad():
        model(*_tensors(f))
    assert all(layer.qkv is None for layer in model.plm.encoder.layer)
