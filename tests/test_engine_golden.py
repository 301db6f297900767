"""The engine against the reference's golden outputs (fp32, CPU): every public case, exactly."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from rex_stream.engine.engine import Engine
from rex_stream.engine.requests import Limits


@pytest.fixture(scope="module")
def batched_outputs(tiny_model: Path, golden_cases: list[dict], tmp_path_factory) -> list[dict]:
    """One `rex-stream infer` invocation over all cases (the command the README documents)."""
    tmp = tmp_path_factory.mktemp("golden")
    src = tmp / "in.jsonl"
    src.write_text("".join(json.dumps({"id": c["id"], "text": c["text"], "schema": c["schema"]}, ensure_ascii=False) + "\n"
                           for c in golden_cases), encoding="utf-8")
    out = tmp / "out.jsonl"
    subprocess.run([sys.executable, "-m", "rex_stream.cli", "infer", "--model", str(tiny_model), "--device", "cpu",
                    "--dtype", "fp32", "--allow-empty-text", "--input", str(src), "--output", str(out)], check=True)
    return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]


def test_every_golden_case_exactly(batched_outputs: list[dict], golden_cases: list[dict]):
    assert [r["id"] for r in batched_outputs] == [c["id"] for c in golden_cases]
    wrong = [c["id"] for c, r in zip(golden_cases, batched_outputs) if r.get("output") != c["output"]]
    assert not wrong, f"{len(wrong)} of {len(golden_cases)} differ, e.g. {wrong[:5]}"


def test_one_by_one_equals_batched(tiny_model: Path, golden_cases: list[dict], batched_outputs: list[dict]):
    """Batch independence: a request's answer does not depend on its batch mates (padding, order)."""
    engine = Engine(tiny_model, limits=Limits(allow_empty_text=True))
    for case, batched in zip(golden_cases, batched_outputs):
        alone = engine.infer([(case["text"], case["schema"])])[0]
        assert alone.output == batched["output"], case["id"]
        assert alone.forwards == case["forwards"], case["id"]  # same hint packing and windows


def test_each_request_tokenises_its_text_once(tiny_model: Path, golden_cases: list[dict]):
    """A text is tokenised once per request over all its levels, and again for the next request with
    the same text: no text cache is shared by requests (benchmarks repeat a dev set's texts)."""
    extraction = [c for c in golden_cases if "[CLASSIFY]" not in c["text"] and "[MULTICLASSIFY]" not in c["text"]]
    case = max(extraction, key=lambda c: (c["levels"], c["forwards"]))
    assert case["levels"] >= 3
    engine = Engine(tiny_model, limits=Limits(allow_empty_text=True))
    encoded: Counter[str] = Counter()
    pieces, pieces_of = engine.tokenizer.pieces, engine.tokenizer.pieces_of

    def counted(text: str):
        encoded[text] += 1
        return pieces(text)

    def counted_batch(texts: list[str]):
        encoded.update(texts)
        return pieces_of(texts)

    engine.tokenizer.pieces, engine.tokenizer.pieces_of = counted, counted_batch
    first, second = engine.infer([(case["text"], case["schema"])] * 2)
    assert first.output == second.output == case["output"]
    assert first.forwards == case["forwards"]
    assert encoded[case["text"]] == 2
    assert encoded.total() > 2  # the deeper levels' hints (they quote spans) are this request's too


def test_sigmoid_scoring_changes_only_classification(tiny_model: Path, golden_cases: list[dict]):
    """`--cls-score sigmoid` (the shipped code's scoring) never touches extraction outputs."""
    engine = Engine(tiny_model, limits=Limits(allow_empty_text=True), cls_score="sigmoid")
    outcomes = engine.infer([(c["text"], c["schema"]) for c in golden_cases])
    for case, outcome in zip(golden_cases, outcomes):
        if not case["task"].startswith("tc_"):
            assert outcome.output == case["output"], case["id"]
    differing = sum(o.output != c["output"] for c, o in zip(golden_cases, outcomes))
    assert 0 < differing < 40


@pytest.mark.parametrize("depth,budget,admit", [(1, 16384, None), (3, 600, 2), (5, 2048, 0.5)])
def test_pipeline_depth_and_budget_do_not_change_answers(tiny_model: Path, golden_cases: list[dict],
                                                        depth: int, budget: int, admit: float | None):
    """Small budgets force many batches per level and plans made while batches are in flight; small
    admission chunks start requests while earlier ones are mid-recursion."""
    engine = Engine(tiny_model, limits=Limits(allow_empty_text=True), batch_tokens=budget)
    engine.pipeline_depth = depth
    engine.admit_batches = admit
    outcomes = engine.infer([(c["text"], c["schema"]) for c in golden_cases])
    wrong = [c["id"] for c, o in zip(golden_cases, outcomes) if o.output != c["output"] or o.forwards != c["forwards"]]
    assert not wrong, wrong[:5]
    assert engine.stats.forwards == sum(c["forwards"] for c in golden_cases)
    if budget < 1000:
        assert engine.stats.batches > 100  # the pipeline really ran many overlapping batches


def test_engine_freezes_gc_after_load(tiny_model: Path):
    import gc

    from rex_stream.engine import engine as engine_module

    Engine(tiny_model)
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold() == engine_module._GC_THRESHOLDS
