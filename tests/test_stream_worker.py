"""The worker end to end on a real broker (CPU, tiny model): results, dead letters, commits."""

from __future__ import annotations

import json
import time
from pathlib import Path

import orjson
import yaml

from streamkit import (cheap_cases, committed, end_offsets, produce, read_all, start_worker, stop, values, wait_for,
                       write_config)


BAD = [
    (b"k-json", b"{not json", "bad_json"),
    (b"k-notext", orjson.dumps({"schema": {"a": None}}), "missing_text"),
    (b"k-schema", orjson.dumps({"text": "abc", "schema": [1, 2]}), "bad_schema"),
    (b"k-deep", orjson.dumps({"text": "abc", "schema": {"a": {"b": {"c": {"d": {"e": {"f": {"g": None}}}}}}}}), "schema_too_deep"),
    (b"k-long", orjson.dumps({"text": "长" * 30_000, "schema": {"a": None}}), "text_too_long"),
    (b"k-bytes", b"\xff\xfe\x00garbage", "bad_encoding"),
    (b"k-empty", orjson.dumps({"text": "", "schema": {"a": None}}), "empty_text"),
    (b"k-tomb", None, "empty_message"),
    (b"k-plain", "没有默认模式的纯文本".encode(), "bad_json"),
    (b"k-huge", orjson.dumps({"text": "x" * 120_000, "schema": {"a": None}}), "message_too_large"),
    (b"k-texttype", orjson.dumps({"text": 12345, "schema": {"a": None}}), "bad_text"),
    (b"k-leaf", orjson.dumps({"text": "abc", "schema": {"a": 5}}), "bad_schema"),
    (b"k-array", b"[1, 2, 3]", "bad_json"),
    (b"k-reserved", orjson.dumps({"text": "abc[TYPE]def", "schema": {"a": None}}), "bad_text"),
    (b"k-nulls", orjson.dumps({"text": None, "schema": None}), "missing_schema"),
]


def test_results_dead_letters_and_commits(kafka_broker, kafka_topics, tiny_model, golden_cases, tmp_path: Path):
    topics = kafka_topics(input=3, output=3, dlq=1)
    cases = cheap_cases(golden_cases, 60)
    items = [(c["id"].encode(), orjson.dumps({"id": c["id"], "text": c["text"], "schema": c["schema"],
                                              "meta": {"n": i}})) for i, c in enumerate(cases)]
    items += [(key, value) for key, value, _ in BAD]
    produce(kafka_broker.bootstrap, topics["input"], items)
    cfg = write_config(tmp_path / "cfg.yaml", kafka_broker.bootstrap, topics, tiny_model,
                       limits={"max_message_bytes": 100_000})
    log = tmp_path / "worker.log"
    proc = start_worker(cfg, log)
    try:
        results = read_all(kafka_broker.bootstrap, topics["output"], len(cases), timeout=180)
        dead = read_all(kafka_broker.bootstrap, topics["dlq"], len(BAD), timeout=60)
    finally:
        code = stop(proc)
    assert code == 0, log.read_text()[-3000:]

    by_id = {v["id"]: (v, m) for v, m in zip(values(results), results)}
    assert len(results) == len(cases) and set(by_id) == {c["id"] for c in cases}, log.read_text()[-3000:]
    for i, c in enumerate(cases):
        value, msg = by_id[c["id"]]
        assert value["output"] == c["output"], c["id"]
        assert value["meta"] == {"n": i}
        assert msg.key() == c["id"].encode()  # keyed like the input, so partitioned like it
        assert value["source"]["topic"] == topics["input"]
        assert value["model"]["name"] == tiny_model.name
        assert value["latency_ms"] >= 0

    reasons = {m.key(): dict(m.headers()) for m in dead}
    assert len(dead) == len(BAD)
    for key, value, code_ in BAD:
        headers = reasons[key]
        assert headers["rex.error.code"].decode() == code_, (key, headers)
        assert headers["rex.error.reason"]
        assert headers["rex.source.topic"].decode() == topics["input"]
    originals = {m.key(): m.value() for m in dead}
    assert originals[b"k-bytes"] == b"\xff\xfe\x00garbage"  # original bytes kept

    group = yaml.safe_load(cfg.read_text())["consumer"]["group_id"]
    assert committed(kafka_broker.bootstrap, group, topics["input"], 3) == end_offsets(kafka_broker.bootstrap, topics["input"], 3)

    events = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    names = {e["event"] for e in events}
    assert {"worker_started", "partitions_assigned", "dead_letter", "worker_stopped"} <= names


def test_plain_text_with_default_schema(kafka_broker, kafka_topics, tiny_model, golden_cases, tmp_path: Path):
    topics = kafka_topics(input=1, output=1, dlq=1)
    case = next(c for c in golden_cases if c["task"] == "ner" and c["text"].strip() and c["forwards"] == 1)
    produce(kafka_broker.bootstrap, topics["input"], [(None, case["text"].encode())])
    cfg = write_config(tmp_path / "cfg.yaml", kafka_broker.bootstrap, topics, tiny_model,
                       model={"default_schema": case["schema"]})
    proc = start_worker(cfg, tmp_path / "w.log")
    try:
        got = values(read_all(kafka_broker.bootstrap, topics["output"], 1, timeout=90))
    finally:
        stop(proc)
    assert got and got[0]["output"] == case["output"]
    assert got[0]["id"] == f"{topics['input']}-0-0"


def test_broker_restart_mid_run(kafka_broker_factory, tiny_model, golden_cases, tmp_path: Path):
    from rex_stream.devbroker import create_topics

    broker = kafka_broker_factory()
    topics = {"input": "in", "output": "out", "dlq": "dlq"}
    create_topics(broker.bootstrap, {"in": 2, "out": 2, "dlq": 1})
    cases = cheap_cases(golden_cases, 40)
    first = [(f"a{i}".encode(), orjson.dumps({"id": f"a{i}", "text": c["text"], "schema": c["schema"]})) for i, c in enumerate(cases)]
    second = [(f"b{i}".encode(), orjson.dumps({"id": f"b{i}", "text": c["text"], "schema": c["schema"]})) for i, c in enumerate(cases)]
    produce(broker.bootstrap, "in", first)
    cfg = write_config(tmp_path / "cfg.yaml", broker.bootstrap, topics, tiny_model)
    log = tmp_path / "w.log"
    proc = start_worker(cfg, log)
    try:
        assert len(read_all(broker.bootstrap, "out", len(first), timeout=120)) >= len(first)
        broker.stop()
        time.sleep(3)
        assert proc.poll() is None, "worker died while the broker was down"
        broker.start()
        produce(broker.bootstrap, "in", second)
        got = read_all(broker.bootstrap, "out", 10**9, timeout=180,
                       until=lambda g: {v["id"] for v in values(g)} >= {f"b{i}" for i in range(len(cases))})
    finally:
        code = stop(proc)
    assert code == 0, log.read_text()[-2000:]
    ids = {v["id"] for v in values(got)}
    assert ids == {f"a{i}" for i in range(len(cases))} | {f"b{i}" for i in range(len(cases))}


def test_supervised_cpu_workers_restart_after_crash(kafka_broker, kafka_topics, tiny_model, golden_cases, tmp_path: Path):
    import signal
    import subprocess
    import sys

    topics = kafka_topics(input=4, output=4, dlq=1)
    cases = cheap_cases(golden_cases, 40)
    produce(kafka_broker.bootstrap, topics["input"],
            [(f"s{i}".encode(), orjson.dumps({"id": f"s{i}", "text": c["text"], "schema": c["schema"]})) for i, c in enumerate(cases)])
    cfg = write_config(tmp_path / "cfg.yaml", kafka_broker.bootstrap, topics, tiny_model, consumer={"session_timeout_ms": 6000})
    log = tmp_path / "sup.log"
    sup = subprocess.Popen([sys.executable, "-m", "rex_stream.cli", "run", "--config", str(cfg), "--workers", "2"],
                           stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    def started() -> list[str]:
        """Worker indices of the `worker_started` events so far, in order."""
        events = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
        return [e["worker"].rsplit("-", 1)[1] for e in events if e["event"] == "worker_started"]

    def tail() -> str:
        return log.read_text()[-2000:]

    try:
        assert len(read_all(kafka_broker.bootstrap, topics["output"], len(cases), timeout=120)) >= len(cases)
        # One worker may have done all the work while the other was still loading: kill a running one.
        assert wait_for(lambda: set(started()) == {"0", "1"}), f"both workers started within 60 s:\n{tail()}"
        children = subprocess.run(["pgrep", "-P", str(sup.pid)], capture_output=True, text=True).stdout.split()
        assert len(children) == 2
        subprocess.run(["kill", "-9", children[0]], check=True)
        assert wait_for(lambda: "worker_restarted" in log.read_text()), \
            f"the supervisor restarted the killed worker within 60 s:\n{tail()}"
        assert wait_for(lambda: len(started()) == 3), f"the restarted worker started within 60 s:\n{tail()}"
    finally:
        sup.send_signal(signal.SIGTERM)
        code = sup.wait(90)
    assert code == 0, tail()
    assert sorted(started()) in (["0", "0", "1"], ["0", "1", "1"])
