"""`rex-stream stats LOGFILE`: summary table and PNG chart from a generated JSON stats log."""

from __future__ import annotations

import json
import struct
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from rex_stream.cli import main as cli
from rex_stream.ops.stats_report import STATS_KEYS, read_stats

pytest.importorskip("matplotlib")

T0 = datetime(2025, 11, 25, 10, 0, 0, tzinfo=timezone.utc)


def _stats(worker: str, i: int, *, results: int, lag: dict[str, int], dead: int = 0,
           p99: float | None = 80.0, interval: float = 10.0) -> dict:
    ts = T0 + timedelta(seconds=interval * (i + 1) + (0.3 if worker == "gpu1" else 0.0))
    event = {
        "event": "stats",
        "timestamp": ts.isoformat().replace("+00:00", "Z"),
        "worker": worker,
        "interval_s": interval,
        "messages_in": results + dead,
        "results_out": results,
        "dead_letters": dead,
        "batches": max(1, results // 64),
        "mean_batch_messages": 64.0,
        "mean_batch_tokens": 9100.5,
        "throughput_msgs_s": results / interval,
        "latency_p50_ms": None if p99 is None else p99 / 3,
        "latency_p99_ms": p99,
        "lag_total": sum(lag.values()),
        "lag": lag,
        "gpu_memory_bytes": 3_500_000_000 if worker != "cpu" else None,
    }
    assert tuple(event) == STATS_KEYS
    return event


def _write_log(path: Path) -> None:
    lines = [
        "starting up (not JSON)",
        json.dumps({"event": "worker_started", "timestamp": T0.isoformat(), "worker": "gpu0", "level": "info"}),
    ]
    for i in range(12):
        # gpu0 ramps up, gpu1 joins late; lag drains from 6000 to 0
        lag0 = {"rex-input[0]": max(0, 3000 - 300 * i), "rex-input[1]": max(0, 1000 - 100 * i)}
        lines.append(json.dumps(_stats("gpu0", i, results=1000 + 200 * i, lag=lag0,
                                       dead=1 if i == 3 else 0, p99=80.0 + i)))
        if i >= 2:
            lag1 = {"rex-input[2]": max(0, 2000 - 250 * i)}
            prefix = "worker-gpu1  | " if i % 2 else ""  # as `docker compose logs` prints it
            lines.append(prefix + json.dumps(_stats("gpu1", i, results=1500, lag=lag1,
                                                    p99=140.0 if i == 5 else 90.0)))
        lines.append(json.dumps({"event": "partitions_assigned", "worker": "gpu1", "partitions": ["rex-input[2]"]}))
        lines.append("{truncated json")
    lines.append(json.dumps(_stats("cpu", 0, results=0, lag={}, p99=None)))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    assert data.rstrip(b"\x00")[-8:-4] == b"IEND"
    return struct.unpack(">II", data[16:24])


def test_stats_table_and_png(tmp_path: Path, capsys):
    log = tmp_path / "worker.log"
    _write_log(log)
    assert cli(["stats", str(log)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "3 worker(s)" in lines[0] and "23 stats events" in lines[0]
    header = next(line for line in lines if line.startswith("worker"))
    assert header.split() == ["worker", "intervals", "messages", "in", "results", "out", "mean", "msg/s",
                              "peak", "msg/s", "max", "p99", "ms", "final", "lag", "dead", "letters"]
    rows = {line.split()[0]: line.split() for line in lines if line.split() and line.split()[0] in
            ("gpu0", "gpu1", "cpu", "TOTAL")}
    gpu0_results = sum(1000 + 200 * i for i in range(12))
    # worker intervals messages_in results_out mean peak p99 final_lag dead
    assert rows["gpu0"] == ["gpu0", "12", str(gpu0_results + 1), str(gpu0_results),
                            f"{gpu0_results / 120:.1f}", "320.0", "91.0", "0", "1"]
    assert rows["gpu1"] == ["gpu1", "10", "15000", "15000", "150.0", "150.0", "140.0", "0", "0"]
    assert rows["cpu"] == ["cpu", "1", "0", "0", "0.0", "0.0", "-", "0", "0"]
    assert rows["TOTAL"][:4] == ["TOTAL", "23", str(gpu0_results + 15001), str(gpu0_results + 15000)]
    assert rows["TOTAL"][-3:] == ["140.0", "0", "1"]
    png = tmp_path / "worker.log.png"
    assert f"chart: {png}" in out
    width, height = _png_size(png)
    assert width >= 600 and height >= 400
    assert png.stat().st_size > 20_000  # two panels of lines, not an empty canvas


def test_png_flag_and_lag_series(tmp_path: Path, capsys):
    log = tmp_path / "w.jsonl"
    _write_log(log)
    png = tmp_path / "charts" / "out.png"
    assert cli(["stats", str(log), "--png", str(png)]) == 0
    _png_size(png)
    with open(log) as f:
        workers = read_stats(f)
    from rex_stream.ops.stats_report import total_lag_series

    series = total_lag_series(workers)
    at = {t: v for t, v in series}  # last value at each instant
    assert at[T0 + timedelta(seconds=10)] == 4000  # gpu0 alone (cpu owns nothing)
    assert at[T0 + timedelta(seconds=30)] == 3200  # gpu0 at i=2, before gpu1's first event
    assert at[T0 + timedelta(seconds=30.3)] == 3200 + 1500  # gpu1 joins with its own lag
    assert max(at.values()) == 4700 and series[-1][1] == 0


def test_no_stats_events(tmp_path: Path, capsys):
    log = tmp_path / "empty.log"
    log.write_text('not json\n{"event": "worker_started"}\n')
    assert cli(["stats", str(log)]) == 1
    assert "no stats events" in capsys.readouterr().out
    assert not (tmp_path / "empty.log.png").exists()
    assert cli(["stats", str(tmp_path / "missing.log")]) == 1
