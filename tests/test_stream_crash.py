"""Crash safety and rebalances on a real broker: kill -9 mid-stream, two workers in one group."""

from __future__ import annotations

import collections
import signal
import time
from pathlib import Path

import orjson
import pytest

from streamkit import end_offsets, produce, read_all, start_worker, stop, values, write_config


def _messages(golden: list[dict], n: int) -> tuple[list[tuple[bytes, bytes]], dict[str, list]]:
    cheap = [c for c in golden if c["forwards"] <= 2 and c["max_len"] <= 96 and c["text"].strip()]
    items, expected = [], {}
    for k in range(n):
        c = cheap[k % len(cheap)]
        ident = f"m{k}"
        items.append((ident.encode(), orjson.dumps({"id": ident, "text": c["text"], "schema": c["schema"]})))
        expected[ident] = c["output"]
    return items, expected


def _wait_progress(bootstrap: str, topic: str, partitions: int, start: int, step: int, timeout: float = 90) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = sum(end_offsets(bootstrap, topic, partitions))
        if now >= start + step:
            return now
        time.sleep(0.2)
    raise AssertionError(f"no progress on {topic}: {start} → {now}")


@pytest.mark.parametrize("mode", ["at-least-once", "exactly-once"])
def test_kill_9_mid_stream(mode, kafka_broker, kafka_topics, tiny_model, golden_cases, tmp_path: Path):
    bootstrap = kafka_broker.bootstrap
    topics = kafka_topics(input=4, output=4, dlq=1)
    items, expected = _messages(golden_cases, 900)
    produce(bootstrap, topics["input"], items)
    cfg = write_config(tmp_path / "cfg.yaml", bootstrap, topics, tiny_model,
                       batch={"max_messages": 8, "max_wait_ms": 5},
                       consumer={"session_timeout_ms": 6000},
                       delivery={"mode": mode})
    log = tmp_path / "worker.log"
    seen = 0
    kills = 0
    for _ in range(3):
        proc = start_worker(cfg, log)
        try:
            seen = _wait_progress(bootstrap, topics["output"], 4, seen, 60)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
            kills += 1
    proc = start_worker(cfg, log)
    try:
        committed_only = mode == "exactly-once"
        ids = lambda got: {orjson.loads(m.value())["id"] for m in got}  # noqa: E731
        got = read_all(bootstrap, topics["output"], 10**9, timeout=240, committed_only=committed_only,
                       until=lambda g: len(ids(g)) >= len(expected))
    finally:
        code = stop(proc)
    assert code == 0
    assert kills == 3
    results = values(got)
    counts = collections.Counter(r["id"] for r in results)
    assert set(counts) == set(expected), f"missing {len(set(expected) - set(counts))} results"
    for r in results:
        assert r["output"] == expected[r["id"]]
    if mode == "exactly-once":
        # read_committed: every input's result exactly once, despite three kills mid-batch
        dupes = {k: v for k, v in counts.items() if v != 1}
        assert not dupes, f"{len(dupes)} duplicated results under exactly-once"
        assert len(results) == len(expected)
    else:
        assert all(v >= 1 for v in counts.values())


def test_two_workers_share_the_group(kafka_broker, kafka_topics, tiny_model, golden_cases, tmp_path: Path):
    """A second worker joins mid-stream (cooperative rebalance) and the first leaves gracefully."""
    bootstrap = kafka_broker.bootstrap
    topics = kafka_topics(input=6, output=6, dlq=1)
    items, expected = _messages(golden_cases, 600)
    produce(bootstrap, topics["input"], items)
    cfg = write_config(tmp_path / "cfg.yaml", bootstrap, topics, tiny_model,
                       batch={"max_messages": 8, "max_wait_ms": 5}, consumer={"session_timeout_ms": 6000})
    first = start_worker(cfg, tmp_path / "w0.log", env={"REX_WORKER_INDEX": "0"})
    second = None
    try:
        _wait_progress(bootstrap, topics["output"], 6, 0, 50)
        second = start_worker(cfg, tmp_path / "w1.log", env={"REX_WORKER_INDEX": "1"})
        _wait_progress(bootstrap, topics["output"], 6, 0, 250)
        assert stop(first) == 0  # graceful: finishes its batch, commits, leaves the group
        got = read_all(bootstrap, topics["output"], 10**9, timeout=180,
                       until=lambda g: len({orjson.loads(m.value())["id"] for m in g}) >= len(expected))
    finally:
        if first.poll() is None:
            first.kill()
        if second is not None:
            assert stop(second) == 0
    assert {r["id"] for r in values(got)} == set(expected)
    log0 = (tmp_path / "w0.log").read_text()
    log1 = (tmp_path / "w1.log").read_text()
    assert "partitions_revoked" in log0 and "partitions_assigned" in log1
    # after a graceful leave nothing was processed twice
    counts = collections.Counter(r["id"] for r in values(got))
    assert max(counts.values()) == 1
