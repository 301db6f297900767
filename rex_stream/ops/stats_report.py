"""``rex-stream stats LOGFILE [--png PNG]``: a summary table and a chart from the workers' JSON logs.

The worker logs one JSON object per line (structlog). Every ``monitor.stats_interval_s`` each
worker logs an event with these keys (counters cover the interval only)::

    event="stats", timestamp (ISO 8601 UTC), worker, interval_s, messages_in, results_out,
    dead_letters, batches, mean_batch_messages, mean_batch_tokens, throughput_msgs_s,
    latency_p50_ms, latency_p99_ms, lag_total, lag ({"topic[partition]": int}), gpu_memory_bytes

This command reads such a log (several workers' logs concatenated are fine, also with a
``service | `` prefix per line; other events and non-JSON lines are skipped), prints one row per worker — total messages, mean and peak
throughput, worst p99 latency, final lag, dead letters — and draws a PNG with two panels:
throughput per worker over time and the group's total lag over time (the sum of each worker's
latest ``lag_total``). Needs matplotlib (the ``plot`` extra).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

STATS_KEYS = ("event", "timestamp", "worker", "interval_s", "messages_in", "results_out", "dead_letters", "batches",
              "mean_batch_messages", "mean_batch_tokens", "throughput_msgs_s", "latency_p50_ms", "latency_p99_ms",
              "lag_total", "lag", "gpu_memory_bytes")


@dataclass
class Sample:
    time: datetime
    worker: str
    interval_s: float
    messages_in: int
    results_out: int
    dead_letters: int
    throughput: float
    p99_ms: float | None
    lag_total: int
    gpu_memory_bytes: int | None


@dataclass
class WorkerSummary:
    worker: str
    samples: list[Sample] = field(default_factory=list)

    @property
    def messages_in(self) -> int:
        return sum(s.messages_in for s in self.samples)

    @property
    def results_out(self) -> int:
        return sum(s.results_out for s in self.samples)

    @property
    def dead_letters(self) -> int:
        return sum(s.dead_letters for s in self.samples)

    @property
    def seconds(self) -> float:
        return sum(s.interval_s for s in self.samples)

    @property
    def mean_throughput(self) -> float:
        """Time-weighted: results over the time the intervals cover."""
        seconds = self.seconds
        return sum(s.throughput * s.interval_s for s in self.samples) / seconds if seconds > 0 else 0.0

    @property
    def peak_throughput(self) -> float:
        return max((s.throughput for s in self.samples), default=0.0)

    @property
    def max_p99_ms(self) -> float | None:
        values = [s.p99_ms for s in self.samples if s.p99_ms is not None]
        return max(values) if values else None

    @property
    def final_lag(self) -> int:
        return self.samples[-1].lag_total if self.samples else 0

    @property
    def peak_gpu_memory(self) -> int | None:
        values = [s.gpu_memory_bytes for s in self.samples if s.gpu_memory_bytes is not None]
        return max(values) if values else None


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        ts = datetime.fromisoformat(text)
    except ValueError:
        return None
    return ts if ts.tzinfo else ts.replace(tzinfo=timezone.utc)


def _num(value: Any, default: float = 0.0) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default


def _opt(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def read_stats(lines: Iterable[str]) -> dict[str, WorkerSummary]:
    """Stats events grouped by worker (in time order); everything else is skipped."""
    workers: dict[str, WorkerSummary] = {}
    for line in lines:
        start = line.find("{")  # tolerate prefixes such as `docker compose logs`' "worker-gpu0  | "
        if start < 0 or '"stats"' not in line:
            continue
        try:
            obj = json.loads(line[start:])
        except ValueError:
            continue
        if not isinstance(obj, dict) or obj.get("event") != "stats":
            continue
        ts = _parse_time(obj.get("timestamp"))
        if ts is None:
            continue
        worker = str(obj.get("worker", "?"))
        lag = obj.get("lag") if isinstance(obj.get("lag"), dict) else {}
        lag_total = obj.get("lag_total")
        if not isinstance(lag_total, (int, float)):
            lag_total = sum(v for v in lag.values() if isinstance(v, (int, float)))
        interval = _num(obj.get("interval_s"))
        results = int(_num(obj.get("results_out")))
        throughput = _opt(obj.get("throughput_msgs_s"))
        if throughput is None:
            throughput = results / interval if interval > 0 else 0.0
        gpu = _opt(obj.get("gpu_memory_bytes"))
        workers.setdefault(worker, WorkerSummary(worker)).samples.append(Sample(
            time=ts, worker=worker, interval_s=interval, messages_in=int(_num(obj.get("messages_in"))),
            results_out=results, dead_letters=int(_num(obj.get("dead_letters"))), throughput=throughput,
            p99_ms=_opt(obj.get("latency_p99_ms")), lag_total=int(lag_total),
            gpu_memory_bytes=int(gpu) if gpu is not None else None))
    for summary in workers.values():
        summary.samples.sort(key=lambda s: s.time)
    return dict(sorted(workers.items()))


def total_lag_series(workers: dict[str, WorkerSummary]) -> list[tuple[datetime, int]]:
    """The group's lag over time: at each event, the sum of every worker's latest ``lag_total``."""
    events = sorted((s for w in workers.values() for s in w.samples), key=lambda s: s.time)
    latest: dict[str, int] = {}
    series: list[tuple[datetime, int]] = []
    for s in events:
        latest[s.worker] = s.lag_total
        point = (s.time, sum(latest.values()))
        if series and series[-1][0] == s.time:
            series[-1] = point  # several workers reporting at the same instant: one point
        else:
            series.append(point)
    return series


def _fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def format_table(workers: dict[str, WorkerSummary]) -> str:
    header = ("worker", "intervals", "messages in", "results out", "mean msg/s", "peak msg/s", "max p99 ms",
              "final lag", "dead letters")
    rows: list[tuple[str, ...]] = []
    for w in workers.values():
        rows.append((w.worker, str(len(w.samples)), str(w.messages_in), str(w.results_out),
                     f"{w.mean_throughput:.1f}", f"{w.peak_throughput:.1f}", _fmt_ms(w.max_p99_ms),
                     str(w.final_lag), str(w.dead_letters)))
    if len(workers) > 1:
        series = total_lag_series(workers)
        p99s = [w.max_p99_ms for w in workers.values() if w.max_p99_ms is not None]
        rows.append(("TOTAL", str(sum(len(w.samples) for w in workers.values())),
                     str(sum(w.messages_in for w in workers.values())),
                     str(sum(w.results_out for w in workers.values())),
                     f"{sum(w.mean_throughput for w in workers.values()):.1f}",
                     f"{_peak_group_throughput(workers):.1f}", _fmt_ms(max(p99s) if p99s else None),
                     str(series[-1][1] if series else 0), str(sum(w.dead_letters for w in workers.values()))))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(cells)).rstrip()

    sep = "  ".join("-" * n for n in widths)
    out = [line(header), sep, *(line(r) for r in rows[:len(workers)])]
    if len(rows) > len(workers):
        out += [sep, line(rows[-1])]
    return "\n".join(out)


def _peak_group_throughput(workers: dict[str, WorkerSummary]) -> float:
    """Peak of the sum of every worker's latest throughput."""
    latest: dict[str, float] = {}
    peak = 0.0
    for s in sorted((s for w in workers.values() for s in w.samples), key=lambda s: s.time):
        latest[s.worker] = s.throughput
        peak = max(peak, sum(latest.values()))
    return peak


def plot(workers: dict[str, WorkerSummary], png: Path, title: str = "rex_stream") -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    samples = [s for w in workers.values() for s in w.samples]
    t0 = min(s.time for s in samples)
    span = max((s.time - t0).total_seconds() for s in samples)
    unit, scale = ("min", 60.0) if span > 1200 else ("s", 1.0)

    def x(ts: datetime) -> float:
        return (ts - t0).total_seconds() / scale

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 7), sharex=True, constrained_layout=True)
    for w in workers.values():
        ax1.plot([x(s.time) for s in w.samples], [s.throughput for s in w.samples], marker=".", linewidth=1.4,
                 label=w.worker)
    ax1.set_ylabel("results / s")
    ax1.set_title("Throughput per worker")
    ax1.set_ylim(bottom=0)
    ax1.grid(alpha=0.3)
    ax1.legend(loc="upper right", fontsize="small", ncol=min(4, len(workers)))

    series = total_lag_series(workers)
    ax2.plot([x(t) for t, _ in series], [v for _, v in series], drawstyle="steps-post", color="tab:red",
             linewidth=1.8, label="total (all workers)")
    if len(workers) > 1:
        for w in workers.values():
            ax2.plot([x(s.time) for s in w.samples], [s.lag_total for s in w.samples], linewidth=0.8,
                     linestyle="--", alpha=0.7, label=w.worker)
    ax2.set_ylabel("messages behind")
    ax2.set_title("Consumer lag")
    ax2.set_ylim(bottom=0)
    ax2.grid(alpha=0.3)
    ax2.legend(loc="upper right", fontsize="small", ncol=min(4, len(workers) + 1))
    ax2.set_xlabel(f"time since {t0.strftime('%Y-%m-%d %H:%M:%S')} UTC ({unit})")
    fig.suptitle(title)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)


def report(logfile: Path, png: Path | None = None, out: TextIO | None = None) -> int:
    import sys

    out = out or sys.stdout
    try:
        with open(logfile, encoding="utf-8", errors="replace") as f:
            workers = read_stats(f)
    except OSError as exc:
        print(f"error: cannot read {logfile}: {exc}", file=out)
        return 1
    if not workers:
        print(f"no stats events in {logfile}", file=out)
        return 1
    first = min(s.time for w in workers.values() for s in w.samples)
    last = max(s.time for w in workers.values() for s in w.samples)
    print(f"{logfile}: {len(workers)} worker(s), {sum(len(w.samples) for w in workers.values())} stats events, "
          f"{first.isoformat()} .. {last.isoformat()}", file=out)
    print(format_table(workers), file=out)
    png = png or logfile.with_name(logfile.name + ".png")
    plot(workers, png, title=f"rex_stream — {logfile.name}")
    print(f"chart: {png}", file=out)
    return 0


def main(args: Any) -> int:
    return report(Path(args.logfile), Path(args.png) if getattr(args, "png", None) else None)
