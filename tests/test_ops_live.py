"""Health, metrics and the stats report against a real worker on a real broker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import orjson

from rex_stream.devbroker import free_port
from rex_stream.ops.metrics import WorkerMetrics
from streamkit import produce, read_all, start_worker, stop, wait_for, write_config


def health(*args: str) -> int:
    return subprocess.run([sys.executable, "-m", "rex_stream.cli", "health", *args], capture_output=True).returncode


def test_metrics_health_and_stats_on_a_real_run(kafka_broker, kafka_topics, tiny_model, golden_cases, tmp_path: Path):
    topics = kafka_topics(input=2, output=2, dlq=1)
    cases = [c for c in golden_cases if c["forwards"] == 1 and c["text"].strip()][:30]
    produce(kafka_broker.bootstrap, topics["input"],
            [(None, orjson.dumps({"text": c["text"], "schema": c["schema"]})) for c in cases] + [(None, b"{broken")])
    port = free_port()
    beat = tmp_path / "heartbeat.json"
    cfg = write_config(tmp_path / "cfg.yaml", kafka_broker.bootstrap, topics, tiny_model,
                       monitor={"http_port": port, "heartbeat_file": str(beat), "heartbeat_timeout_s": 3.0,
                                "stats_interval_s": 0.5})
    log = tmp_path / "worker.log"
    proc = start_worker(cfg, log)
    url = f"http://127.0.0.1:{port}"
    try:
        got = read_all(kafka_broker.bootstrap, topics["output"], len(cases), timeout=180)
        assert len(got) == len(cases), log.read_text()[-3000:]
        assert wait_for(lambda: health("--url", url, "--ready") == 0), "a healthy, assigned worker must be ready"
        assert health("--heartbeat-file", str(beat), "--max-age", "3") == 0
        body = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
        for series in ("rex_stream_messages_in_total", "rex_stream_results_out_total", "rex_stream_dead_letters_total",
                       "rex_stream_batch_messages_bucket", "rex_stream_latency_seconds_bucket",
                       "rex_stream_assigned_partitions", "rex_stream_consumer_lag"):
            assert series in body, series
        assert f'rex_stream_results_out_total{{worker="{os.uname().nodename}-0"}} {float(len(cases))}' in body
        assert 'reason="bad_json"' in body
        # every documented series is served (GPU utilisation only appears once a GPU reports it)
        missing = [n for n in WorkerMetrics("probe").series_names() if n not in body]
        assert set(missing) <= {"rex_stream_gpu_utilization_ratio"}, missing

        proc.send_signal(signal.SIGSTOP)  # a stuck worker: no heartbeat, no HTTP answers
        try:
            assert wait_for(lambda: health("--heartbeat-file", str(beat), "--max-age", "3") == 1, 20)
            assert health("--url", url) == 1
        finally:
            proc.send_signal(signal.SIGCONT)
        assert wait_for(lambda: health("--url", url) == 0, 20)
    finally:
        assert stop(proc) == 0

    png = tmp_path / "stats.png"
    report = subprocess.run([sys.executable, "-m", "rex_stream.cli", "stats", str(log), "--png", str(png)],
                            capture_output=True, text=True, check=True)
    assert "worker" in report.stdout and str(len(cases)) in report.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_health_reports_a_disconnected_worker(kafka_broker_factory, tiny_model, tmp_path: Path):
    from rex_stream.devbroker import create_topics

    broker = kafka_broker_factory()
    create_topics(broker.bootstrap, {"in": 1, "out": 1, "dlq": 1})
    port = free_port()
    cfg = write_config(tmp_path / "cfg.yaml", broker.bootstrap, {"input": "in", "output": "out", "dlq": "dlq"}, tiny_model,
                       monitor={"http_port": port, "stats_interval_s": 0.5})
    proc = start_worker(cfg, tmp_path / "w.log")
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_for(lambda: health("--url", url, "--ready") == 0, 90)
        broker.stop()
        assert wait_for(lambda: health("--url", url, "--ready") == 1, 60), "broker down must make the worker unready"
        assert health("--url", url) == 0  # still alive: it keeps polling and will reconnect
    finally:
        stop(proc)
