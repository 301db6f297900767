"""The worker end to end on a real broker (CPU, tiny model): results, dead letters, commits."""

from __future__ import annotations

import json
from pathlib import Path

import orjson
import yaml

from streamkit import committed, end_offsets, produce, read_all, start_worker, stop, values, write_config


def cheap_cases(golden: list[dict], n: int) -> list[dict]:
    picked = [c for c in golden if c["forwards"] <= 2 and c["max_len"] <= 128 and c["text"].strip()]
    return picked[:n]


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
]


def test_results_dead_letters_and_commits(kafka_broker, kafka_topics, tiny_model, golden_cases, tmp_path: Path):
    topics = kafka_topics(input=3, output=3, dlq=1)
    cases = cheap_cases(golden_cases, 60)
    items = [(c["id"].encode(), orjson.dumps({"id": c["id"], "text": c["text"], "schema": c["schema"],
                                              "meta": {"n": i}})) for i, c in enumerate(cases)]
    items += [(key, value) for key, value, _ in BAD]
    produce(kafka_broker.bootstrap, topics["input"], items)
    cfg = write_config(tmp_path / "cfg.yaml", kafka_broker.bootstrap, topics, tiny_model)
    log = tmp_path / "worker.log"
    proc = start_worker(cfg, log)
    try:
        results = read_all(kafka_broker.bootstrap, topics["output"], len(cases), timeout=180)
        dead = read_all(kafka_broker.bootstrap, topics["dlq"], len(BAD), timeout=60)
    finally:
        code = stop(proc)
    assert code == 0, log.read_text()[-3000:]

    by_id = {v["id"]: (v, m) for v, m in zip(values(results), results)}
    assert len(results) == len(cases) and set(by_id) == {c["id"] for c in cases}
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
