"""One device process serving host-only engines: golden answers, failures kept to their batch."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from rex_stream.engine.device_server import RemoteRunner, start_device_server
from rex_stream.engine.engine import Engine
from rex_stream.engine.recursion import solve
from rex_stream.engine.requests import Limits
from rex_stream.engine.tokenizer import RexTokenizer

LIMITS = Limits(allow_empty_text=True)


@pytest.fixture(scope="module")
def served(tiny_model: Path):
    proc, links, status = start_device_server(2, model=tiny_model, device="cpu", dtype="fp32")
    yield links, status
    for link in links:
        RemoteRunner(link, RexTokenizer(tiny_model).special).close()
    proc.join(timeout=60)


def test_engines_in_threads_share_the_device_process_and_get_golden_outputs(tiny_model: Path, served,
                                                                             golden_cases: list[dict]):
    links, status = served
    assert status["attention_active"] == "sdpa"  # fp32 on CPU: the exact path the golden data pins
    engine = Engine(tiny_model, batch_tokens=2048, limits=LIMITS, device_link=links[0])
    other = Engine(tiny_model, batch_tokens=2048, limits=LIMITS, device_link=links[1])
    halves = [golden_cases[0::2], golden_cases[1::2]]
    outcomes: list = [None, None]

    def run(k: int, e: Engine) -> None:
        outcomes[k] = e.infer([(c["text"], c["schema"]) for c in halves[k]])

    threads = [threading.Thread(target=run, args=(k, e)) for k, e in enumerate((engine, other))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=900)
    for half, got in zip(halves, outcomes):
        assert [o.error for o in got] == [None] * len(half)
        assert [o.output for o in got] == [c["output"] for c in half]
    assert engine.stats.batches > 1 and other.stats.batches > 1  # both really sent batches
    assert engine.device.type == "cpu" and engine.config.num_hidden_layers >= 1


def test_a_failing_batch_answers_its_error_and_the_next_batch_still_runs(tiny_model: Path, served,
                                                                         golden_cases: list[dict]):
    links, _ = served
    tok = RexTokenizer(tiny_model)
    remote = RemoteRunner(links[0], tok.special)
    case = next(c for c in golden_cases if c["output"])
    forwards = next(solve(tok, case["text"], case["schema"]))
    bad = remote.prepare(forwards)
    bad.arrays[0, 1] = 10**6  # a token id far outside the vocabulary: the embedding lookup fails
    with pytest.raises(RuntimeError, match="IndexError"):
        remote.fetch(remote.launch(bad))
    links_remote = remote.collect(remote.fetch(remote.launch(remote.prepare(forwards))))
    local = Engine(tiny_model, limits=LIMITS).runner
    links_local = local.collect(local.fetch(local.launch(local.prepare(forwards))))
    assert len(links_remote) == len(forwards)
    for a, b in zip(links_remote, links_local):
        np.testing.assert_array_equal(a.spans, b.spans)
        np.testing.assert_array_equal(a.matched, b.matched)
        np.testing.assert_array_equal(a.span_scores, b.span_scores)


def test_the_device_process_exits_once_every_client_has_closed(tiny_model: Path):
    proc, links, _ = start_device_server(2, model=tiny_model, device="cpu", dtype="fp32")
    special = RexTokenizer(tiny_model).special
    RemoteRunner(links[0], special).close()
    proc.join(timeout=2)
    assert proc.is_alive()  # one client is still connected
    links[1].close()  # a client that goes away without saying so counts as closed too
    proc.join(timeout=60)
    assert proc.exitcode == 0


def test_a_device_process_that_cannot_load_its_model_is_reported(tmp_path: Path):
    with pytest.raises(RuntimeError, match="before loading the model"):
        start_device_server(1, model=tmp_path, device="cpu", dtype="fp32")


def test_socket_clients_must_prove_the_key_and_the_server_stops_once_idle(tiny_model: Path, tmp_path: Path,
                                                                         golden_cases: list[dict]):
    from multiprocessing import AuthenticationError

    from rex_stream.engine.device_server import DeviceServer, connect_device

    server = DeviceServer(Engine(tiny_model))
    path = str(tmp_path / "device.sock")
    server.listen(path, b"right key")
    runner = threading.Thread(target=server.run, kwargs={"forever": True}, daemon=True)
    runner.start()
    try:
        with pytest.raises(AuthenticationError):
            connect_device(path, b"wrong key", timeout_s=10)
        engine = Engine(tiny_model, limits=LIMITS, device_link=connect_device(path, b"right key", timeout_s=10))
        cases = golden_cases[:12]
        outcomes = engine.infer([(c["text"], c["schema"]) for c in cases])
        assert [o.output for o in outcomes] == [c["output"] for c in cases]  # the refused client broke nothing
        server.stop_when_idle()
        runner.join(timeout=2)
        assert runner.is_alive()  # a client is still connected: keep serving it
        engine.runner.close()
        runner.join(timeout=30)
        assert not runner.is_alive()
    finally:
        server.stop_when_idle()
