"""Prometheus metrics of one worker process, on a private registry (``WorkerMetrics.registry``).

Every series carries a ``worker`` label (the worker id); Prometheus adds ``instance``/``pod`` from
the scrape target. Series (all prefixed ``rex_stream_``; other labels in braces):

* ``rex_stream_messages_in_total{topic}`` (counter): input messages accepted from Kafka
* ``rex_stream_results_out_total`` (counter): result records produced and confirmed
* ``rex_stream_dead_letters_total{reason}`` (counter): inputs sent to the dead-letter topic
* ``rex_stream_batches_total`` (counter): engine batches completed
* ``rex_stream_batch_messages`` (histogram): messages per batch
* ``rex_stream_batch_forwards`` (histogram): model forward passes per batch
* ``rex_stream_batch_tokens`` (histogram): estimated tokens per batch
* ``rex_stream_batch_seconds`` (histogram): engine time per batch
* ``rex_stream_latency_seconds`` (histogram): end to end, input record timestamp to result confirmed
* ``rex_stream_consumer_lag{topic,partition}`` (gauge): messages behind the high watermark, owned partitions
* ``rex_stream_gpu_memory_bytes`` (gauge): peak GPU memory allocated by the engine
* ``rex_stream_gpu_utilization_ratio`` (gauge): GPU utilisation 0..1 (absent while unknown)
* ``rex_stream_assigned_partitions`` (gauge): partitions currently assigned to this worker
* ``rex_stream_commit_failures_total`` (counter): offset or transaction commits that failed
* ``rex_stream_rebalances_total{kind}`` (counter): rebalance callbacks, kind ``assign``/``revoke``/``lost``
* ``rex_stream_start_time_seconds`` (gauge): Unix time the worker's metrics were created

Histograms also expose ``_bucket``, ``_sum`` and ``_count``; e.g. p99 latency over 5 minutes::

    histogram_quantile(0.99, sum by (le) (rate(rex_stream_latency_seconds_bucket[5m])))

The Grafana dashboard in ``deploy/grafana/rex-stream-dashboard.json`` uses only these names.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

PREFIX = "rex_stream"

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
BATCH_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_MESSAGES_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
BATCH_FORWARDS_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128)
BATCH_TOKENS_BUCKETS = tuple(float(2 ** k) for k in range(8, 20))  # 256 … 524288


class WorkerMetrics:
    """The worker's Prometheus series. Thread-safe (prometheus-client metrics are)."""

    def __init__(self, worker: str, registry: CollectorRegistry | None = None) -> None:
        self.worker = str(worker)
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        w = ("worker",)

        self._messages_in = Counter(f"{PREFIX}_messages_in", "Input messages accepted from Kafka.",
                                    w + ("topic",), registry=r)
        self._results_out = Counter(f"{PREFIX}_results_out", "Result records produced and confirmed.",
                                    w, registry=r).labels(self.worker)
        self._dead_letters = Counter(f"{PREFIX}_dead_letters", "Inputs sent to the dead-letter topic, by reason.",
                                     w + ("reason",), registry=r)
        self._batches = Counter(f"{PREFIX}_batches", "Engine batches completed.", w, registry=r).labels(self.worker)
        self._batch_messages = Histogram(f"{PREFIX}_batch_messages", "Messages per engine batch.", w,
                                         buckets=BATCH_MESSAGES_BUCKETS, registry=r).labels(self.worker)
        self._batch_forwards = Histogram(f"{PREFIX}_batch_forwards", "Model forward passes per engine batch.", w,
                                         buckets=BATCH_FORWARDS_BUCKETS, registry=r).labels(self.worker)
        self._batch_tokens = Histogram(f"{PREFIX}_batch_tokens", "Estimated tokens per engine batch.", w,
                                       buckets=BATCH_TOKENS_BUCKETS, registry=r).labels(self.worker)
        self._batch_seconds = Histogram(f"{PREFIX}_batch_seconds",
                                        "Seconds from handing a batch to the engine to its results.", w,
                                        buckets=BATCH_SECONDS_BUCKETS, registry=r).labels(self.worker)
        self._latency = Histogram(f"{PREFIX}_latency_seconds",
                                  "End-to-end latency: input record timestamp to result confirmed, seconds.", w,
                                  buckets=LATENCY_BUCKETS, registry=r).labels(self.worker)
        self._lag = Gauge(f"{PREFIX}_consumer_lag", "Consumer lag (messages) of owned partitions.",
                          w + ("topic", "partition"), registry=r)
        self._gpu_memory = Gauge(f"{PREFIX}_gpu_memory_bytes", "Peak GPU memory allocated by the engine, bytes.",
                                 w, registry=r).labels(self.worker)
        self._gpu_util_family = Gauge(f"{PREFIX}_gpu_utilization_ratio", "GPU utilisation, 0..1.", w, registry=r)
        self._assigned = Gauge(f"{PREFIX}_assigned_partitions", "Partitions assigned to this worker.",
                               w, registry=r).labels(self.worker)
        self._commit_failures = Counter(f"{PREFIX}_commit_failures", "Offset or transaction commits that failed.",
                                        w, registry=r).labels(self.worker)
        self._rebalances = Counter(f"{PREFIX}_rebalances", "Rebalance callbacks by kind (assign, revoke, lost).",
                                   w + ("kind",), registry=r)
        Gauge(f"{PREFIX}_start_time_seconds", "Unix time the worker's metrics were created.",
              w, registry=r).labels(self.worker).set(time.time())
        # counters that should read 0 (not be absent) before the first event
        for kind in ("assign", "revoke", "lost"):
            self._rebalances.labels(self.worker, kind)
        self._lag_keys: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ worker calls

    def messages_in(self, n: int, topic: str) -> None:
        self._messages_in.labels(self.worker, topic).inc(n)

    def results_out(self, n: int) -> None:
        self._results_out.inc(n)

    def dead_letter(self, reason: str) -> None:
        self._dead_letters.labels(self.worker, reason or "unknown").inc()

    def batch(self, messages: int, forwards: int, tokens: int, seconds: float) -> None:
        self._batches.inc()
        self._batch_messages.observe(messages)
        self._batch_forwards.observe(forwards)
        self._batch_tokens.observe(tokens)
        self._batch_seconds.observe(seconds)

    def latency(self, seconds: float) -> None:
        """End-to-end latency of one message, in seconds (negative clock skew counts as 0)."""
        self._latency.observe(max(0.0, seconds))

    def lag(self, topic: str, partition: int, lag: int) -> None:
        """Lag of an owned partition; negative values (librdkafka's 'unknown') are ignored."""
        if lag < 0:
            return
        key = (topic, str(partition))
        with self._lock:
            self._lag_keys.add(key)
        self._lag.labels(self.worker, *key).set(lag)

    def forget_partitions(self, partitions: Iterable[tuple[str, int]] | None = None) -> None:
        """Drop lag series of partitions this worker no longer owns (all of them when None)."""
        with self._lock:
            keys = set(self._lag_keys) if partitions is None else {(t, str(p)) for t, p in partitions}
            keys &= self._lag_keys
            self._lag_keys -= keys
        for key in keys:
            with contextlib.suppress(KeyError):
                self._lag.remove(self.worker, *key)

    def gpu(self, memory_bytes: int, utilization: float | None) -> None:
        """GPU memory in bytes; utilisation as a fraction 0..1 (a percentage > 1 is divided by 100)."""
        self._gpu_memory.set(memory_bytes)
        if utilization is not None:
            value = utilization / 100.0 if utilization > 1.0 else utilization
            self._gpu_util_family.labels(self.worker).set(max(0.0, value))

    def assigned(self, partitions: int) -> None:
        self._assigned.set(partitions)

    def commit_failure(self) -> None:
        self._commit_failures.inc()

    def rebalance(self, kind: str) -> None:
        self._rebalances.labels(self.worker, kind).inc()

    # ------------------------------------------------------------------ exposition

    def render(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)

    def series_names(self) -> set[str]:
        """Names of all series the registry can expose (incl. ``_total``, ``_bucket``, ``_sum``, ``_count``)."""
        names: set[str] = set()
        for family in self.registry.collect():
            names.add(family.name)
            if family.type == "counter":
                names.add(family.name + "_total")
            elif family.type == "histogram":
                names.update(family.name + s for s in ("_bucket", "_sum", "_count"))
            for sample in family.samples:
                names.add(sample.name)
        return names
