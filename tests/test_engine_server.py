"""The engine server: submissions from other threads join one pipeline and get the golden answers."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from rex_stream.engine.engine import Engine
from rex_stream.engine.requests import Limits, RequestError, validate
from rex_stream.engine.server import EngineServer

LIMITS = Limits(allow_empty_text=True)


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> Engine:
    # A small token budget and admission window, so submissions really do share batches and levels.
    return Engine(tiny_model, batch_tokens=2048, limits=LIMITS, admit_batches=2)


def _requests(cases: list[dict]) -> list:
    return [validate(c["text"], c["schema"], LIMITS) for c in cases]


def test_concurrent_submissions_get_golden_outputs(engine: Engine, golden_cases: list[dict]):
    chunks = [golden_cases[i:i + 40] for i in range(0, len(golden_cases), 40)]
    server = EngineServer(engine)
    futures: list = [None] * len(chunks)

    def submit(k: int) -> None:
        futures[k] = server.submit(_requests(chunks[k]))

    threads = [threading.Thread(target=submit, args=(k,)) for k in range(len(chunks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        for chunk, future in zip(chunks, futures):
            outcomes = future.result(timeout=600)
            assert [o.output for o in outcomes] == [c["output"] for c in chunk]
            assert all(o.error is None and o.forwards >= 1 for o in outcomes)
        assert server.submit([]).result(timeout=1) == []
    finally:
        server.close(timeout=60)
    with pytest.raises(RuntimeError, match="closed"):
        server.submit(_requests(golden_cases[:1]))


def test_close_with_cancel_drops_what_was_not_started(engine: Engine, golden_cases: list[dict]):
    server = EngineServer(engine)
    first = server.submit(_requests(golden_cases[:8]))
    first.result(timeout=600)
    # Many submissions at once: close(cancel=True) right away leaves most of them unstarted.
    rest = [server.submit(_requests(golden_cases[i:i + 8])) for i in range(0, len(golden_cases), 8)]
    server.close(timeout=600, cancel=True)
    assert not server._thread.is_alive()
    assert any(f.cancelled() for f in rest)
    for future, start in zip(rest, range(0, len(golden_cases), 8)):
        if not future.cancelled():
            assert [o.output for o in future.result(timeout=1)] == [c["output"] for c in golden_cases[start:start + 8]]


def test_a_pipeline_failure_costs_only_its_culprit(engine: Engine, golden_cases: list[dict], monkeypatch):
    """A batch whose preparation raises fails the whole pipeline; the server reruns what it held on
    halves, so only the request that causes it comes back with an error, and serving goes on."""
    cases = golden_cases[:24]
    poison = "这条消息让批次失败"
    poison_ids = list(engine.tokenizer.pieces(poison)[0])
    prepare = engine.runner.prepare

    def carries_poison(ids: list[int]) -> bool:
        n = len(poison_ids)
        return any(ids[j:j + n] == poison_ids for j in range(len(ids) - n + 1))

    def failing_prepare(forwards):
        if any(carries_poison(f.ids) for f in forwards):
            raise RuntimeError("injected device failure")
        return prepare(forwards)

    poisoned_request = validate(poison + "。", {"人物": None}, LIMITS)
    monkeypatch.setattr(engine.runner, "prepare", failing_prepare)
    server = EngineServer(engine)
    try:
        requests = _requests(cases[:12]) + [poisoned_request] + _requests(cases[12:])
        outcomes = server.submit(requests).result(timeout=600)
        bad = outcomes[12]
        assert isinstance(bad.error, RequestError) and "injected device failure" in str(bad.error)
        good = outcomes[:12] + outcomes[13:]
        assert [o.output for o in good] == [c["output"] for c in cases]
        later = server.submit(_requests(cases[:3])).result(timeout=600)
        assert [o.output for o in later] == [c["output"] for c in cases[:3]]
    finally:
        server.close(timeout=60)


class _Trickle:
    """A source that hands out one request per admission round, as a slow producer would."""

    def __init__(self, requests: list, live: bool) -> None:
        self.items = list(enumerate(requests))
        self.live = live
        self.gave = False

    def take(self):
        if self.gave or not self.items:
            self.gave = False  # the next admission round gets the next one
            return None
        self.gave = True
        return self.items.pop(0)

    def wait(self) -> bool:
        return bool(self.items)


def test_live_source_plans_fuller_batches(tiny_model: Path, golden_cases: list[dict]):
    """From a live queue, arrivals are not planned as a batch of their own while others are in flight."""
    cases = [c for c in golden_cases if c["text"]][:24]
    batches = {}
    for live in (False, True):
        engine = Engine(tiny_model, batch_tokens=65536, limits=LIMITS)
        outcomes = {}
        engine.serve(_Trickle(_requests(cases), live), outcomes.__setitem__)
        assert [outcomes[i].output for i in range(len(cases))] == [c["output"] for c in cases]
        batches[live] = engine.stats.batches
    assert batches[True] < batches[False]


# The device thread ends quietly: the loss reaches the callers, and no raw traceback reaches stderr.
@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_lost_device_process_fails_the_waiting_futures_and_later_submissions_alike(tiny_model: Path,
                                                                                     golden_cases: list[dict]):
    from multiprocessing import Pipe

    from rex_stream.engine.device_server import DeviceLost

    link, peer = Pipe()
    peer.close()  # the device process end is gone before the first batch
    server = EngineServer(Engine(tiny_model, limits=LIMITS, device_link=link))
    first = server.submit(_requests(golden_cases[:4]))
    with pytest.raises(DeviceLost):
        first.result(timeout=60)
    server._thread.join(timeout=30)
    # A worker that submits after the device thread died must see the same cause (its worker then
    # stops with reason device_lost), not a bare "closed".
    with pytest.raises(DeviceLost):
        server.submit(_requests(golden_cases[4:6]))
