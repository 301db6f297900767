"""Per-interval worker statistics for the `stats` log event (the log-driven monitoring)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None when there is nothing to rank."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100.0 * len(ordered) + 0.5)))
    return ordered[rank - 1]


@dataclass
class WindowStats:
    worker: str
    messages_in: int = 0
    results_out: int = 0
    dead_letters: int = 0
    batches: int = 0
    batch_messages: int = 0
    batch_tokens: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    lag: dict[str, int] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    def result(self, latency_ms: float | None) -> None:
        if latency_ms is not None:
            self.latencies_ms.append(latency_ms)

    def batch(self, messages: int, tokens: int) -> None:
        self.batches += 1
        self.batch_messages += messages
        self.batch_tokens += tokens

    def due(self, interval_s: float) -> bool:
        return time.monotonic() - self.started >= interval_s

    def flush(self, gpu_memory_bytes: int | None) -> dict[str, Any]:
        """The event's fields for the interval just ended; counters restart."""
        elapsed = max(1e-9, time.monotonic() - self.started)
        event = {
            "interval_s": round(elapsed, 3),
            "messages_in": self.messages_in,
            "results_out": self.results_out,
            "dead_letters": self.dead_letters,
            "batches": self.batches,
            "mean_batch_messages": round(self.batch_messages / self.batches, 2) if self.batches else 0.0,
            "mean_batch_tokens": round(self.batch_tokens / self.batches, 1) if self.batches else 0.0,
            "throughput_msgs_s": round(self.results_out / elapsed, 2),
            "latency_p50_ms": percentile(self.latencies_ms, 50),
            "latency_p99_ms": percentile(self.latencies_ms, 99),
            "lag_total": sum(self.lag.values()),
            "lag": dict(self.lag),
            "gpu_memory_bytes": gpu_memory_bytes,
        }
        self.messages_in = self.results_out = self.dead_letters = 0
        self.batches = self.batch_messages = self.batch_tokens = 0
        self.latencies_ms = []
        self.started = time.monotonic()
        return event
