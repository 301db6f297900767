"""`rex-stream health` and the worker's HTTP endpoint (/healthz, /readyz, /metrics) against a real
HTTP server on 127.0.0.1, plus the heartbeat-file mode."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from rex_stream.cli import main as cli
from rex_stream.ops.health import HealthState, serve
from rex_stream.ops.metrics import WorkerMetrics


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _ready(state: HealthState) -> HealthState:
    state.model_loaded = True
    state.assignment_received = True
    state.broker_reachable = True
    state.beat()
    return state


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def endpoint(clock: FakeClock) -> Iterator[tuple[str, HealthState, WorkerMetrics]]:
    state = HealthState(heartbeat_timeout_s=30.0, clock=clock)
    metrics = WorkerMetrics("gpu0")
    server = serve(0, state, metrics, host="127.0.0.1")
    try:
        yield f"http://127.0.0.1:{server.port}", state, metrics
    finally:
        server.stop()


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_healthy_worker_exits_0(endpoint, capsys):
    url, state, _ = endpoint
    _ready(state)
    assert cli(["health", "--url", url]) == 0
    assert capsys.readouterr().out.startswith("healthy")
    assert cli(["health", "--url", url, "--ready"]) == 0
    assert capsys.readouterr().out.startswith("ready")
    status, body = _get(url + "/healthz")
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, body = _get(url + "/readyz")
    assert status == 200 and json.loads(body)["checks"] == {
        "live": True, "model_loaded": True, "assignment_received": True, "broker_reachable": True}


def test_stuck_loop_is_unhealthy(endpoint, clock, capsys):
    url, state, _ = endpoint
    _ready(state)
    clock.t += 29.0
    assert cli(["health", "--url", url]) == 0
    clock.t += 2.0  # the loop has not beaten for 31 s > 30 s
    capsys.readouterr()
    assert cli(["health", "--url", url]) == 1
    out = capsys.readouterr().out
    assert out.startswith("unhealthy") and "stuck" in out and out.count("\n") == 1
    status, body = _get(url + "/healthz")
    assert status == 503 and json.loads(body)["status"] == "unhealthy"
    assert cli(["health", "--url", url, "--ready"]) == 1  # not live => not ready
    state.beat()  # the loop recovers
    assert cli(["health", "--url", url]) == 0


def test_stuck_loop_real_time():
    """A real loop thread beating every 10 ms that then blocks: healthy, then unhealthy."""
    state = HealthState(heartbeat_timeout_s=0.3)
    stuck = threading.Event()
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            if stuck.is_set():
                stop.wait()  # a call that never returns
            state.beat()
            time.sleep(0.01)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    server = serve(0, _ready(state), WorkerMetrics("w"), host="127.0.0.1")
    url = f"http://127.0.0.1:{server.port}"
    try:
        time.sleep(0.1)
        assert cli(["health", "--url", url]) == 0
        stuck.set()
        time.sleep(0.5)
        assert cli(["health", "--url", url]) == 1
    finally:
        stop.set()
        server.stop()
        thread.join(2)


def test_not_ready(endpoint, capsys):
    url, state, _ = endpoint
    state.beat()
    state.model_loaded = True  # no assignment yet, broker not confirmed
    assert cli(["health", "--url", url]) == 0  # live
    capsys.readouterr()
    assert cli(["health", "--url", url, "--ready"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("not ready") and "assignment received" in out and "broker reachable" in out
    status, body = _get(url + "/readyz")
    assert status == 503
    assert json.loads(body)["checks"]["model_loaded"] is True
    state.assignment_received = True
    state.broker_reachable = True
    assert cli(["health", "--url", url, "--ready"]) == 0


def test_unreachable_port_exits_1(capsys):
    port = _free_port()
    assert cli(["health", "--url", f"http://127.0.0.1:{port}"]) == 1
    assert capsys.readouterr().out.startswith("unreachable")


def test_metrics_endpoint_serves_documented_series(endpoint):
    url, state, metrics = endpoint
    metrics.messages_in(3, "rex-input")
    metrics.results_out(2)
    metrics.dead_letter("invalid_json")
    metrics.batch(messages=2, forwards=3, tokens=512, seconds=0.04)
    metrics.latency(0.12)
    metrics.lag("rex-input", 4, 17)
    metrics.gpu(1 << 30, 55.0)
    metrics.assigned(6)
    metrics.commit_failure()
    metrics.rebalance("assign")
    status, body = _get(url + "/metrics")
    text = body.decode()
    assert status == 200
    for line in ('rex_stream_messages_in_total{topic="rex-input",worker="gpu0"} 3.0',
                 'rex_stream_results_out_total{worker="gpu0"} 2.0',
                 'rex_stream_dead_letters_total{reason="invalid_json",worker="gpu0"} 1.0',
                 'rex_stream_batches_total{worker="gpu0"} 1.0',
                 'rex_stream_batch_tokens_sum{worker="gpu0"} 512.0',
                 'rex_stream_latency_seconds_count{worker="gpu0"} 1.0',
                 'rex_stream_consumer_lag{partition="4",topic="rex-input",worker="gpu0"} 17.0',
                 'rex_stream_gpu_memory_bytes{worker="gpu0"} 1.073741824e+09',
                 'rex_stream_gpu_utilization_ratio{worker="gpu0"} 0.55',
                 'rex_stream_assigned_partitions{worker="gpu0"} 6.0',
                 'rex_stream_commit_failures_total{worker="gpu0"} 1.0',
                 'rex_stream_rebalances_total{kind="assign",worker="gpu0"} 1.0'):
        assert line in text, line
    metrics.forget_partitions([("rex-input", 4)])
    assert "rex_stream_consumer_lag{" not in _get(url + "/metrics")[1].decode()
    assert _get(url + "/nope")[0] == 404


def test_heartbeat_file_mode(tmp_path: Path, capsys):
    path = tmp_path / "run" / "heartbeat.json"
    wall = FakeClock(1_700_000_000.0)
    mono = FakeClock()
    state = HealthState(heartbeat_timeout_s=30.0, heartbeat_file=path, clock=mono, wall_clock=wall)
    assert cli(["health", "--heartbeat-file", str(path)]) == 1  # no file yet
    assert "no heartbeat file" in capsys.readouterr().out

    state.beat()
    data = json.loads(path.read_text())
    assert data["ts"] == wall.t and data["model_loaded"] is False and data["assigned"] is False
    assert set(data) >= {"ts", "pid", "model_loaded", "assigned", "broker_ok"}
    # a real-time check: the fake wall clock is far in the past => stale
    assert cli(["health", "--heartbeat-file", str(path)]) == 1
    assert "old" in capsys.readouterr().out

    # rate limit: a beat within 1 s does not rewrite the file
    wall.t, mono.t = time.time(), mono.t + 0.5
    _ready(state)
    assert json.loads(path.read_text())["ts"] == 1_700_000_000.0
    mono.t += 0.6
    state.model_loaded = False
    state.beat()
    assert cli(["health", "--heartbeat-file", str(path), "--max-age", "60"]) == 0
    capsys.readouterr()
    assert cli(["health", "--heartbeat-file", str(path), "--ready"]) == 1
    assert "model not loaded" in capsys.readouterr().out
    state.model_loaded = True
    mono.t += 1.0
    state.beat()
    assert cli(["health", "--heartbeat-file", str(path), "--ready"]) == 0
    # stale against --max-age: a stuck loop stops rewriting the file
    data = json.loads(path.read_text())
    data["ts"] = time.time() - 90
    path.write_text(json.dumps(data))
    assert cli(["health", "--heartbeat-file", str(path), "--max-age", "60"]) == 1
    assert cli(["health", "--heartbeat-file", str(path), "--max-age", "120"]) == 0
    path.write_text("{not json")
    assert cli(["health", "--heartbeat-file", str(path)]) == 1
    assert not [p for p in path.parent.iterdir() if p.name != path.name]  # no temp files left


def test_no_target_falls_back_to_settings(monkeypatch, endpoint, capsys):
    url, state, _ = endpoint
    _ready(state)
    monkeypatch.setenv("REX_MONITOR__HTTP_PORT", url.rsplit(":", 1)[1])
    assert cli(["health"]) == 0
    monkeypatch.delenv("REX_MONITOR__HTTP_PORT")
    capsys.readouterr()
    assert cli(["health"]) == 1
    assert "nothing to check" in capsys.readouterr().out


def test_documented_series_are_the_registered_ones():
    import re

    from rex_stream.ops import metrics as metrics_module

    documented = set(re.findall(r"``(rex_stream_[a-z_]+)", metrics_module.__doc__))
    registered = {f.name + ("_total" if f.type == "counter" else "") for f in WorkerMetrics("w").registry.collect()}
    assert documented == registered
