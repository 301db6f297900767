"""`rex-stream produce` and `rex-stream demo` against real brokers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson

from streamkit import read_all


def test_produce_json_and_plain_lines(kafka_broker, kafka_topics, tmp_path: Path):
    topics = kafka_topics(input=2)
    src = tmp_path / "in.txt"
    src.write_text('{"id": "j1", "text": "甲", "schema": {"人物": null}}\n\n北京欢迎你\n', encoding="utf-8")
    subprocess.run([sys.executable, "-m", "rex_stream.cli", "produce", "--bootstrap-servers", kafka_broker.bootstrap,
                    "--topic", topics["input"], "--input", str(src), "--schema", '{"地点": null}'], check=True)
    got = read_all(kafka_broker.bootstrap, topics["input"], 2, timeout=30)
    values = sorted((orjson.loads(m.value()) for m in got), key=lambda v: v["text"])
    assert len(got) == 2  # the blank line is skipped
    assert {"text": "北京欢迎你", "schema": {"地点": None}} in values  # plain text wrapped with the schema
    assert any(m.key() == b"j1" for m in got)  # JSON lines keyed by their id


def test_demo_runs_end_to_end(kafka_jars, tiny_model):
    run = subprocess.run([sys.executable, "-m", "rex_stream.cli", "demo", "--model", str(tiny_model), "--device", "cpu",
                          "--messages", "7"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "demo: 7 results" in run.stdout
    assert run.stdout.count("demo: dead letter:") == 2
    assert "worker exited with 0" in run.stdout
