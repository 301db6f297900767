"""The stream worker: Kafka in → bounded batches → engine → results out → offsets committed.

One process, one device. The main thread owns the Kafka clients and never stops polling; the
engine runs on its own thread (`EngineServer`), and up to `batch.max_in_flight` consumed batches
are handed to it at once: their requests join one pipeline, sorted and padded together, so the
device never drains between batches. Batches complete in order. Records (results and dead
letters) are produced at a checkpoint after completed batches, and offsets advance only over
inputs whose record is durable:

* at-least-once: produce → flush and check every delivery → commit the contiguous done offsets;
* exactly-once: begin → produce → send the offsets to the transaction → commit; an abortable
  error aborts and rewinds the consumer to the committed offsets; a fatal one (fenced) exits 3.

Rebalances: on revoke, the in-flight batches are finished (bounded wait) and everything done is
committed before the partitions go; on lost, nothing is committed.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import orjson
import structlog
from confluent_kafka import (OFFSET_BEGINNING, OFFSET_END, OFFSET_INVALID, Consumer, KafkaError, KafkaException,
                             TopicPartition)

from ..config import Settings
from ..engine.engine import Engine, Outcome
from ..engine.requests import RequestError
from ..engine.device_server import DeviceLost
from ..engine.server import EngineServer
from .batcher import Accumulator, BatchPolicy, estimate_tokens
from .kafka_io import (ConfirmingProducer, DeliveryError, consumer_config, is_abortable, is_fatal,
                       producer_config, to_source)
from .messages import Job, Record, dead_letter_record, decode, result_record
from .offsets import OffsetTracker
from .stats import WindowStats

EXIT_OK = 0
EXIT_FATAL_KAFKA = 3
EXIT_DEVICE_LOST = 4  # the device process of `rex-stream run --device-server` went away


class FatalKafkaError(RuntimeError):
    """The producer was fenced or hit a fatal error: this process must restart."""


@dataclass
class _InFlight:
    jobs: list[Job]
    tokens: int  # their token estimate, as the accumulator counted it
    future: Future
    started: float = field(default_factory=time.monotonic)


class Worker:
    """Runs until stopped; `run()` returns the process exit code."""

    def __init__(self, settings: Settings, engine: Engine, worker_id: str, metrics: Any = None,
                 health: Any = None) -> None:
        self.s = settings
        self.engine = engine
        self.worker_id = worker_id
        self.metrics = metrics
        self.health = health
        self.eos = settings.delivery.mode == "exactly-once"
        self.log = structlog.get_logger().bind(worker=worker_id)
        self.stats = WindowStats(worker_id)
        self.model_info = {"name": engine.model_name, "revision": settings.model.revision}
        self.engine_limits = settings.limits.engine_limits()
        self.acc: Accumulator[Job] = Accumulator(
            BatchPolicy(settings.batch.max_messages, settings.batch.max_tokens, settings.batch.max_wait_ms),
            time.monotonic)
        self.tracker = OffsetTracker()
        self.owned: set[tuple[str, int]] = set()
        self.paused = False
        self.outputs: list[Record] = []
        self.inflight: deque[_InFlight] = deque()  # oldest first: batches complete in this order
        self._stop = threading.Event()
        self.server = EngineServer(engine)
        self.consumer = Consumer(consumer_config(settings, self._on_stats, self.eos, self._on_client_error))
        txn_id = None
        if self.eos:
            txn_id = settings.delivery.transactional_id or f"{settings.consumer.group_id}-{worker_id}"
        self.producer = ConfirmingProducer(producer_config(settings, txn_id))

    # ----------------------------------------------------------------------------- lifecycle

    def stop(self, *_: Any) -> None:
        self._stop.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)

    def run(self) -> int:
        try:
            if self.eos:
                self.producer.producer.init_transactions(self.s.delivery.commit_timeout_s)
            self.consumer.subscribe(self.s.topics.subscription(), on_assign=self._on_assign,
                                    on_revoke=self._on_revoke, on_lost=self._on_lost)
            self.log.info("worker_started", topics=self.s.topics.subscription(), delivery=self.s.delivery.mode,
                          device=str(self.engine.device), dtype=self.engine.dtype, model=self.model_info)
            if self.health is not None:
                self.health.model_loaded = True
            while not self._stop.is_set():
                self._step()
            self._drain()
            self.consumer.close()
            self.log.info("worker_stopped", reason="signal")
            return EXIT_OK
        except FatalKafkaError as exc:
            self.log.error("worker_stopped", reason="fatal_kafka_error", error=str(exc))
            return EXIT_FATAL_KAFKA
        except DeviceLost as exc:  # nothing in flight was committed: a restarted worker redoes it
            self.log.error("worker_stopped", reason="device_lost", error=str(exc))
            return EXIT_DEVICE_LOST
        finally:
            # Let the device thread end before the interpreter does (a daemon thread still inside
            # torch at exit aborts the process); bounded, so a stuck device cannot hold a stop.
            self.server.close(timeout=self.s.delivery.revoke_timeout_s, cancel=True)

    def _step(self) -> None:
        if self.health is not None:
            self.health.beat()
        wait = self.acc.wait_s()
        timeout = 0.005 if self.inflight else min(0.1, wait if wait is not None else 0.1)
        messages = self.consumer.consume(num_messages=self.s.consumer.fetch_max_messages, timeout=timeout)
        for msg in messages:
            self._accept(msg)
        completed = False
        while self.inflight and self.inflight[0].future.done():
            self._complete()
            completed = True
        if len(self.inflight) < self.s.batch.max_in_flight and self.acc.ready():
            self._submit()
        if self.outputs and (completed or not self.inflight):
            self._checkpoint()
        self._backpressure()
        if self.stats.due(self.s.monitor.stats_interval_s):
            self.log.info("stats", **self.stats.flush(self._gpu_memory()))

    def _drain(self) -> None:
        """Graceful stop: finish the in-flight batches and commit; buffered inputs are left for redelivery."""
        while self.inflight:
            self.inflight[0].future.result()
            self._complete()
        self._checkpoint()

    # ----------------------------------------------------------------------------- intake

    def _accept(self, msg: Any) -> None:
        if msg.error():
            self.log.warning("consume_error", error=str(msg.error()))
            return
        src = to_source(msg)
        if src.tp not in self.owned:
            return
        self.tracker.received(src.tp, src.offset)
        self.stats.messages_in += 1
        if self.metrics is not None:
            self.metrics.messages_in(1, src.topic)
        try:
            job = decode(src, self.s.limits, self.engine_limits, self.s.model.default_schema)
        except RequestError as exc:
            self._dead_letter(src, exc)
            return
        self.acc.add(job, estimate_tokens(job.request))

    def _dead_letter(self, src: Any, exc: RequestError) -> None:
        self.outputs.append(dead_letter_record(src, exc, self.s.topics.dead_letter))
        self.stats.dead_letters += 1
        if self.metrics is not None:
            self.metrics.dead_letter(exc.code)
        self.log.warning("dead_letter", topic=src.topic, partition=src.partition, offset=src.offset,
                         code=exc.code, reason=str(exc)[:300])

    # ----------------------------------------------------------------------------- inference

    def _submit(self) -> None:
        """Hand the next batch to the engine thread (a failure of its pipeline is retried on halves
        there, so only the request that causes it is dead-lettered)."""
        tokens = self.acc.tokens
        jobs = self.acc.take()
        self.inflight.append(_InFlight(jobs, tokens - self.acc.tokens, self.server.submit([j.request for j in jobs])))

    def _complete(self) -> None:
        """Turn the oldest in-flight batch, finished, into records."""
        flight = self.inflight.popleft()
        outcomes: list[Outcome] = flight.future.result()
        now_ms = int(time.time() * 1000)
        for job, outcome in zip(flight.jobs, outcomes):
            if job.source.tp not in self.owned:
                continue  # revoked while running: the new owner processes it again
            if outcome.error is not None:
                self._dead_letter(job.source, outcome.error)
                continue
            ts = job.source.timestamp_ms
            latency = None if ts is None else max(0, now_ms - ts)
            self.outputs.append(result_record(job, outcome.output, self.s.topics.output, self.model_info, latency))
            self.stats.result(latency)
            if self.metrics is not None and latency is not None:
                self.metrics.latency(latency / 1000.0)
        seconds = time.monotonic() - flight.started
        forwards = sum(o.forwards for o in outcomes)
        self.stats.batch(len(flight.jobs), flight.tokens)
        if self.metrics is not None:
            self.metrics.batch(len(flight.jobs), forwards, flight.tokens, seconds)
        self.log.debug("batch_done", messages=len(flight.jobs), forwards=forwards, seconds=round(seconds, 4))

    # ----------------------------------------------------------------------------- commit

    def _checkpoint(self) -> None:
        """Make pending records durable, then commit the offsets they cover."""
        if not self.outputs and not self.tracker.committable():
            return
        records, self.outputs = self.outputs, []
        try:
            if self.eos:
                self._checkpoint_transaction(records)
            else:
                self._checkpoint_at_least_once(records)
        except DeliveryError as exc:
            # Nothing was committed: restarting re-delivers these inputs (at-least-once holds).
            raise FatalKafkaError(f"records not delivered: {exc}") from exc
        produced = sum(1 for r in records if r.topic == self.s.topics.output)
        self.stats.results_out += produced
        if self.metrics is not None:
            self.metrics.results_out(produced)

    def _checkpoint_at_least_once(self, records: list[Record]) -> None:
        self.producer.send(records)
        self.producer.flush(self.s.delivery.commit_timeout_s)
        for r in records:
            self.tracker.done(r.source.tp, r.source.offset)
        positions = self.tracker.committable()
        if not positions:
            return
        try:
            self.consumer.commit(offsets=_tps(positions), asynchronous=False)
        except KafkaException as exc:
            self._commit_failed(exc)
            return
        self.tracker.mark_committed(positions)

    def _checkpoint_transaction(self, records: list[Record]) -> None:
        p = self.producer.producer
        timeout = self.s.delivery.commit_timeout_s
        try:
            p.begin_transaction()
            self.producer.send(records)
            for r in records:
                self.tracker.done(r.source.tp, r.source.offset)
            positions = self.tracker.committable()
            if positions:
                p.send_offsets_to_transaction(_tps(positions), self.consumer.consumer_group_metadata(), timeout)
            p.commit_transaction(timeout)
            self.producer.flush(timeout)
            self.tracker.mark_committed(positions)
        except KafkaException as exc:
            if is_fatal(exc):
                raise FatalKafkaError(str(exc)) from exc
            self._commit_failed(exc)
            try:  # abortable or not, an open transaction must end before the next one begins
                p.abort_transaction(timeout)
            except KafkaException as abort_exc:
                if is_fatal(abort_exc) or not is_abortable(exc):
                    raise FatalKafkaError(f"cannot abort after {exc}: {abort_exc}") from abort_exc
            self._rewind()

    def _commit_failed(self, exc: Exception) -> None:
        self.log.warning("commit_failed", error=str(exc))
        if self.metrics is not None:
            self.metrics.commit_failure()

    def _rewind(self) -> None:
        """After an aborted transaction: forget uncommitted work and re-read from the committed offsets."""
        while self.inflight:
            self.inflight.popleft().future.result()
        self.acc.drop(lambda _job: False)
        self.outputs = []
        owned = sorted(self.owned)
        self.tracker.forget(owned)
        if not owned:
            return
        committed = self.consumer.committed([TopicPartition(t, p) for t, p in owned], timeout=self.s.delivery.commit_timeout_s)
        reset = OFFSET_BEGINNING if self.s.consumer.auto_offset_reset == "earliest" else OFFSET_END
        for tp in committed:
            self.consumer.seek(TopicPartition(tp.topic, tp.partition, tp.offset if tp.offset != OFFSET_INVALID else reset))
        self.log.warning("rewound", partitions=[f"{t}[{p}]" for t, p in owned])

    # ----------------------------------------------------------------------------- rebalance

    def _on_assign(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.owned |= {(p.topic, p.partition) for p in partitions}
        if self.health is not None:
            self.health.assignment_received = True
        if self.metrics is not None:
            self.metrics.assigned(len(self.owned))
            self.metrics.rebalance("assign")
        self.log.info("partitions_assigned", partitions=_names(partitions), owned=len(self.owned))

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        revoked = {(p.topic, p.partition) for p in partitions}
        deadline = time.monotonic() + self.s.delivery.revoke_timeout_s
        try:
            while self.inflight:
                self.inflight[0].future.result(timeout=max(0.0, deadline - time.monotonic()))
                self._complete()
        except TimeoutError:
            self.log.warning("revoke_timeout", partitions=_names(partitions))
        self._checkpoint()
        self._release(revoked)
        if self.metrics is not None:
            self.metrics.rebalance("revoke")
        self.log.info("partitions_revoked", partitions=_names(partitions), owned=len(self.owned))

    def _on_lost(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        lost = {(p.topic, p.partition) for p in partitions}
        self.outputs = [r for r in self.outputs if r.source.tp not in lost]
        self._release(lost)
        if self.metrics is not None:
            self.metrics.rebalance("lost")
        self.log.warning("partitions_lost", partitions=_names(partitions), owned=len(self.owned))

    def _release(self, tps: set[tuple[str, int]]) -> None:
        self.owned -= tps
        self.acc.drop(lambda job: job.source.tp not in tps)
        self.tracker.forget(list(tps))
        if self.metrics is not None:
            self.metrics.assigned(len(self.owned))
            self.metrics.forget_partitions(tps)

    # ----------------------------------------------------------------------------- flow control

    def _backpressure(self) -> None:
        """Pause fetching while too much is buffered; keep polling so the group stays alive."""
        buffered = len(self.acc) + sum(len(flight.jobs) for flight in self.inflight)
        limit = self.s.consumer.max_buffered_messages
        if not self.paused and buffered >= limit:
            self.consumer.pause(self.consumer.assignment())
            self.paused = True
        elif self.paused and buffered < limit // 2:
            self.consumer.resume(self.consumer.assignment())
            self.paused = False

    def _on_client_error(self, err: KafkaError) -> None:
        if err.code() == KafkaError._ALL_BROKERS_DOWN and self.health is not None:
            self.health.broker_reachable = False
        self.log.warning("kafka_error", error=str(err))

    def _on_stats(self, raw: str) -> None:
        stats = orjson.loads(raw)
        if self.health is not None:
            self.health.broker_reachable = any(b.get("state") == "UP" for b in stats.get("brokers", {}).values())
        lag = {}
        for topic, t in stats.get("topics", {}).items():
            for pid, part in t.get("partitions", {}).items():
                value = part.get("consumer_lag", -1)
                if int(pid) >= 0 and value >= 0 and (topic, int(pid)) in self.owned:
                    lag[f"{topic}[{pid}]"] = value
                    if self.metrics is not None:
                        self.metrics.lag(topic, int(pid), value)
        self.stats.lag = lag

    def _gpu_memory(self) -> int | None:
        if self.engine.device.type != "cuda":
            return None
        import torch

        memory = int(torch.cuda.max_memory_allocated(self.engine.device))
        if self.metrics is not None:
            self.metrics.gpu(memory, None)
        return memory


def _tps(positions: dict[tuple[str, int], int]) -> list[TopicPartition]:
    return [TopicPartition(t, p, o) for (t, p), o in positions.items()]


def _names(partitions: list[TopicPartition]) -> list[str]:
    return [f"{p.topic}[{p.partition}]" for p in partitions]


def worker_id_from_env() -> str:
    """'<host>-<index>': unique across hosts and pods, stable across restarts of the same slot."""
    return f"{socket.gethostname()}-{os.environ.get('REX_WORKER_INDEX', '0')}"
