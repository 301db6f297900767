"""Input construction without the model: windows, hint packing, layout, batching, validation."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from rex_stream.engine.batching import padding_share, plan_batches
from rex_stream.engine.layout import attention_allowed, build_layout
from rex_stream.engine.prompt import HINT_MAX_LEN, build_hints
from rex_stream.engine.requests import Limits, RequestError, validate
from rex_stream.engine.tokenizer import RexTokenizer


@pytest.fixture(scope="module")
def tok(tiny_model) -> RexTokenizer:
    return RexTokenizer(tiny_model)


def test_windows_equal_the_reference_pair_encoding(tok: RexTokenizer, golden_cases: list[dict]):
    """Our split tokenisation gives exactly the overflowing pair windows of the reference call."""
    rng = random.Random(7)
    long_texts = ["".join(rng.choice("中国北京上海的了是在有人和年月日1234abc，。 ") for _ in range(n)) for n in (300, 700, 1500)]
    checked = 0
    for case in golden_cases[::3]:
        for hint in build_hints({(): case["schema"]}, tok.count):
            for text in (case["text"], *long_texts):
                for cls in (False, True):
                    windows = tok.windows(tok.pieces(hint.text), tok.pieces(text), cls)
                    assert windows == tok.reference_windows(hint.text, text, cls)
                    checked += 1
    assert checked > 500


def test_windows_overlap_by_the_stride(tok: RexTokenizer):
    text = "北京" * 600
    hint = tok.pieces("[PREFIX][TYPE]地点")
    windows = tok.windows(hint, tok.pieces(text), classification=False)
    assert len(windows) >= 3 and all(len(w.ids) <= 512 for w in windows)
    first, second = windows[0], windows[1]
    nh = first.num_hint_tokens
    assert first.ids[-1 - 32:-1] == second.ids[nh:nh + 32]  # 32-token overlap for extraction
    no_overlap = tok.windows(hint, tok.pieces(text), classification=True)
    assert no_overlap[0].offsets[-2][1] == no_overlap[1].offsets[nh][0]  # stride 0 for classification


def test_hints_respect_the_token_limit_and_repeat_the_prefix_header(tok: RexTokenizer):
    labels = {f"标签{i:03d}很长的类型名称": None for i in range(120)}
    hints = build_hints({(): labels}, tok.count)
    assert len(hints) > 1
    for hint in hints:
        assert hint.text.startswith("[PREFIX]")
        assert len(tok.windows(tok.pieces(hint.text), tok.pieces(""), False)[0].ids) - 1 <= HINT_MAX_LEN
    assert sum(len(h.slots) for h in hints) == 120
    names = [slot[1] for h in hints for slot in h.slots]
    assert names == sorted(labels)


def test_over_long_type_names_are_skipped(tok: RexTokenizer):
    hints = build_hints({(): {"长" * 130: None, "短": None}}, tok.count)
    assert [slot[1] for h in hints for slot in h.slots] == ["短"]
    assert build_hints({(): {"长" * 130: None}}, tok.count) == []


def test_layout_matches_the_traces(tok: RexTokenizer, shared_dir):
    with open(shared_dir / "rex" / "golden" / "traces.jsonl", encoding="utf-8") as fh:
        traces = [json.loads(line) for line in fh]
    for trace in traces:
        for fw in trace["forwards"]:
            pos, group, slot = build_layout(fw["input_ids"], tok.special)
            assert pos.tolist() == fw["position_ids"]
            expected = np.array([[c == "1" for c in row] for row in fw["attention_mask"]])
            assert (attention_allowed(group, slot) == expected).all()


def test_token_budget_batches():
    lengths = [10, 500, 30, 30, 480, 12]
    batches = plan_batches(lengths, max_tokens=1000)
    assert sorted(i for b in batches for i in b) == list(range(6))
    for b in batches:
        assert len(b) * max(lengths[i] for i in b) <= 1000 or len(b) == 1
    assert batches[0] == [1, 4]  # longest first
    assert 0 <= padding_share(lengths, batches) < 0.2
    assert plan_batches([5] * 10, max_tokens=1000, max_batch=4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_batches_cut_where_lengths_jump():
    """One long forward runs alone instead of padding a budget's worth of short ones."""
    lengths = [50] * 1000 + [400]
    batches = plan_batches(lengths, max_tokens=65536, max_batch=4096, batch_cost=2048)
    assert batches == [[1000], list(range(1000))]
    # Filling the budget would have put the long one with 162 short ones: 7 batches in all.
    assert len(plan_batches(lengths, max_tokens=65536, max_batch=4096, batch_cost=10**9)) == 2


def test_batch_cost_trades_padding_for_batches():
    rng = np.random.default_rng(0)
    lengths = np.minimum(512, rng.lognormal(4.0, 0.5, 3000).astype(int) + 8).tolist()
    batches = plan_batches(lengths, max_tokens=65536, max_batch=4096, batch_cost=2048)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(len(b) * max(lengths[i] for i in b) <= 65536 for b in batches)
    fewest = plan_batches(lengths, max_tokens=65536, max_batch=4096, batch_cost=10**9)
    assert len(fewest) < len(batches)
    assert padding_share(lengths, batches) < 0.5 * padding_share(lengths, fewest)


@pytest.mark.parametrize("text, schema, code", [
    ("", {"a": None}, "empty_text"),
    (None, {"a": None}, "bad_text"),
    ("x", ["a"], "bad_schema"),
    ("x", "{bad json", "bad_schema"),
    ("x", {"a": {"b": {"c": {"d": {"e": {"f": {"g": None}}}}}}}, "schema_too_deep"),
    ("x", {f"t{i}": None for i in range(1001)}, "schema_too_large"),
    ("x" * 20_001, {"a": None}, "text_too_long"),
    ("x", {"a": 3}, "bad_schema"),
])
def test_bad_requests_have_clear_errors(text, schema, code):
    with pytest.raises(RequestError) as err:
        validate(text, schema, Limits())
    assert err.value.code == code and str(err.value)


def test_schema_verdicts_are_cached_per_schema_and_limits():
    """A stream repeats schemas, so their verdict is cached; it must follow the limits it was made
    under, raise afresh every time, and hold for schemas too large to cache as well."""
    three = {"a": None, "b": {"c": None}}
    assert validate("x", three, Limits()).schema == three
    for _ in range(2):  # the cached verdict: a new error each time, with the same code
        with pytest.raises(RequestError) as err:
            validate("x", three, Limits(max_schema_types=2))
        assert err.value.code == "schema_too_large"
    assert validate("x", three, Limits()).schema == three  # the other limits' verdict is kept apart
    big = {f"type-{i:04d}-{'x' * 24}": None for i in range(600)}  # ~22 KB serialised: not cached
    assert validate("x", big, Limits()).schema == big
    with pytest.raises(RequestError, match="more than 500 types"):
        validate("x", big, Limits(max_schema_types=500))
    with pytest.raises(RequestError) as err:  # a Python caller's non-JSON schema is refused, not a crash
        validate("x", {1: None}, Limits())
    assert err.value.code == "bad_schema"
    deep: dict = {"leaf": None}
    for _ in range(300):  # deeper than orjson serialises: still refused as too deep
        deep = {"t": deep}
    with pytest.raises(RequestError) as err:
        validate("x", deep, Limits())
    assert err.value.code == "schema_too_deep"


def test_empty_text_is_allowed_in_reference_mode():
    assert validate("", {"a": None}, Limits(allow_empty_text=True)).text == ""


def test_auto_attention_is_triton_only_for_reduced_precision_on_cuda():
    import torch

    from rex_stream.engine.engine import resolve_attention

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_attention("auto", cuda, "bf16") == "triton"
    assert resolve_attention("auto", cuda, "fp16") == "triton"
    assert resolve_attention("auto", cuda, "fp32") == "sdpa"  # the exact path the golden tests pin
    assert resolve_attention("auto", cpu, "bf16") == "sdpa"
    assert resolve_attention("flex", cpu, "fp32") == "flex"  # an explicit choice is kept


def test_device_join_equals_the_host_join(tiny_model, golden_cases, tmp_path):
    """The runner's on-device three-link join gives exactly `decode.join_links` of the same logits."""
    import torch

    from rex_stream.engine.decode import join_links, type_positions
    from rex_stream.engine.random_model import write_random_model
    from rex_stream.engine.recursion import solve
    from rex_stream.engine.runner import ForwardRunner
    from rex_stream.engine.weights import load_model

    # A random model whose links are dense enough that many spans match several slots.
    model_dir = tmp_path / "dense-links"
    write_random_model(model_dir, size="tiny", seed=3, link_bias=5.0, vocab_path=tiny_model / "vocab.txt")
    tok = RexTokenizer(model_dir)
    forwards = [f for case in golden_cases[::4] for f in next(solve(tok, case["text"], case["schema"]))]
    assert any(f.want_cls_probs for f in forwards) and any(not f.want_cls_probs for f in forwards)
    runner = ForwardRunner(load_model(model_dir)[0], tok.special, torch.device("cpu"), "fp32")
    launched = runner.launch(runner.prepare(forwards))
    got = runner.collect(runner.fetch(launched))
    scores = launched.logits.numpy()
    matches = 0
    for b, (f, links) in enumerate(zip(forwards, got)):
        n, nh = len(f.ids), f.num_hint_tokens
        positive = np.argwhere(scores[b, :n, :n] > 0)
        want = join_links(positive, scores[b, :n, :n], nh, type_positions(f.ids[:nh], tok.special.type))
        assert np.array_equal(links.spans, want.spans) and np.array_equal(links.span_scores, want.span_scores)
        width = want.matched.shape[1]  # this forward's slots; the batch's matrix is as wide as its widest
        assert np.array_equal(links.matched[:, :width], want.matched) and not links.matched[:, width:].any()
        if f.want_cls_probs:
            assert np.array_equal(links.head_scores[:, :width], want.head_scores)
            assert np.array_equal(links.tail_scores[:, :width], want.tail_scores)
        matches += int(want.matched.sum())
    assert matches > 100  # the join was exercised, not vacuous


@pytest.mark.parametrize("count", [3, 4])  # odd and even rows x width
def test_prepared_arrays_are_16_byte_aligned(tiny_model, golden_cases, count):
    """Triton specialises on pointer alignment: every [B, L] input must start on a 16-byte boundary."""
    import torch

    from rex_stream.engine.recursion import solve
    from rex_stream.engine.runner import ForwardRunner
    from rex_stream.engine.weights import load_model

    tok = RexTokenizer(tiny_model)
    forwards = [f for case in golden_cases for f in next(solve(tok, case["text"], case["schema"]))]
    width = max(len(f.ids) for f in forwards if len(f.ids) % 2)  # odd: rows x width is odd for 3 rows
    batch = [f for f in forwards if len(f.ids) == width][:1] + [f for f in forwards if len(f.ids) < width][: count - 1]
    runner = ForwardRunner(load_model(tiny_model)[0], tok.special, torch.device("cpu"), "fp32")
    tensors = runner.prepare(batch).tensors
    assert tensors["ids"].shape == (count, width)
    assert all(t.data_ptr() % 16 == 0 and t.is_contiguous() for t in tensors.values())


def test_leaf_paths_are_exactly_the_root_to_leaf_type_paths(shared_dir: Path) -> None:
    from rex_stream.bench.workloads import TASKS, load_task
    from rex_stream.engine.recursion import is_leaf_path

    def leaves(node: dict, path: tuple = ()) -> set[tuple]:
        return {path} if not node else set().union(*(leaves(node[k], path + (k,)) for k in node))

    schema = {"组织机构": {"创始人(人物)": None, "总部": {}}, " 人物 ": None}
    assert is_leaf_path(schema, ("组织机构", "创始人(人物)")) and is_leaf_path(schema, ("组织机构", "总部"))
    assert not is_leaf_path(schema, ("组织机构",))  # an inner node is no output type path
    assert not is_leaf_path(schema, ("人物",))  # keys are matched as written (the reference strips prefixes only)
    assert not is_leaf_path(schema, ("组织机构", "创始人(人物)", "x")) and not is_leaf_path(schema, ())
    for task in TASKS:
        for _, schema in load_task(task, shared_dir)[:50]:
            paths = leaves(schema)
            assert all(is_leaf_path(schema, p) for p in paths)
            inner = {p[:k] for p in paths for k in range(len(p))} - paths  # proper prefixes: inner nodes
            assert not any(is_leaf_path(schema, p) for p in inner)


def test_vectorised_confidences_equal_the_per_hit_rule():
    """`decode._confidences` gives exactly `_confidence` of each triple (float32 sums, Python rounding)."""
    from rex_stream.engine.decode import _confidence, _confidences

    rng = np.random.default_rng(5)
    for dtype in (np.float32, np.float64):
        a, b, c = (rng.uniform(-1.0, 1.0, 20_000).astype(dtype) for _ in range(3))
        # Values near a rounding boundary of the fourth decimal as well as generic ones.
        a[:2000] = np.round(a[:2000], 4) + dtype(5e-5)
        want = [_confidence(x, y, z) for x, y, z in zip(a, b, c)]
        assert _confidences(a, b, c) == want
