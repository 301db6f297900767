"""Helpers for stream tests against the real broker: configs, worker processes, reading topics."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import yaml
from confluent_kafka import Consumer, Producer, TopicPartition


def wait_for(predicate: Callable[[], Any], timeout: float = 60.0) -> bool:
    """Poll `predicate` until it holds (True) or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.3)
    return False


def cheap_cases(golden: list[dict], n: int) -> list[dict]:
    """Up to n golden cases that are quick on CPU (at most two forwards of at most 128 tokens)."""
    picked = [c for c in golden if c["forwards"] <= 2 and c["max_len"] <= 128 and c["text"].strip()]
    return picked[:n]


def write_config(path: Path, bootstrap: str, topics: dict[str, str], model_dir: Path, **sections: dict[str, Any]) -> Path:
    cfg: dict[str, Any] = {
        "kafka": {"bootstrap_servers": bootstrap},
        "topics": {"input": [topics["input"]], "output": topics["output"], "dead_letter": topics["dlq"]},
        "consumer": {"group_id": f"g-{uuid.uuid4().hex[:8]}", "session_timeout_ms": 10000},
        "model": {"name": str(model_dir), "device": "cpu", "dtype": "fp32", "engine_batch_tokens": 8192},
        "batch": {"max_messages": 32, "max_wait_ms": 20},
        "monitor": {"stats_interval_s": 1.0},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    return path


def start_worker(config: Path, log: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    out = open(log, "ab")
    return subprocess.Popen([sys.executable, "-m", "rex_stream.cli", "run", "--config", str(config), *extra],
                            stdout=out, stderr=subprocess.STDOUT, env=os.environ | (env or {}))


def stop(proc: subprocess.Popen, timeout: float = 60.0) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout)


def produce(bootstrap: str, topic: str, items: list[tuple[bytes | None, bytes | None]]) -> None:
    p = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    for key, value in items:
        p.produce(topic, value, key)
    assert p.flush(30) == 0


def read_all(bootstrap: str, topic: str, expected: int, timeout: float = 120.0, committed_only: bool = False,
             until: Callable[[list], bool] | None = None) -> list:
    """Messages of `topic` from the start until `expected` are read (or `until` holds, or time runs out)."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"reader-{uuid.uuid4().hex[:8]}",
                  "auto.offset.reset": "earliest", "enable.auto.commit": False,
                  "isolation.level": "read_committed" if committed_only else "read_uncommitted"})
    c.subscribe([topic])
    got: list = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and len(got) < expected and not (until and until(got)):
            for m in c.consume(500, 0.5):
                if m.error() is None:
                    got.append(m)
    finally:
        c.close()
    return got


def committed(bootstrap: str, group: str, topic: str, partitions: int) -> list[int]:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        return [tp.offset for tp in c.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)]
    finally:
        c.close()


def end_offsets(bootstrap: str, topic: str, partitions: int) -> list[int]:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"probe-{uuid.uuid4().hex[:8]}"})
    try:
        return [c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in range(partitions)]
    finally:
        c.close()


def values(messages: list) -> list[dict]:
    return [orjson.loads(m.value()) for m in messages]
