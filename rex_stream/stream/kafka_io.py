"""Thin confluent-kafka wrappers: client configs and a producer that confirms every delivery."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer

from ..config import Settings
from .messages import Record, Source


def consumer_config(s: Settings, on_stats: Callable[[str], None] | None, eos: bool,
                    on_error: Callable[[KafkaError], None] | None = None) -> dict[str, Any]:
    conf = s.kafka.client_config() | {
        "group.id": s.consumer.group_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": s.consumer.auto_offset_reset,
        "partition.assignment.strategy": "cooperative-sticky",
        "max.poll.interval.ms": s.consumer.max_poll_interval_ms,
        "session.timeout.ms": s.consumer.session_timeout_ms,
        "isolation.level": "read_committed" if eos else "read_uncommitted",
        "statistics.interval.ms": int(s.monitor.stats_interval_s * 1000),
    }
    if s.consumer.group_instance_id:
        conf["group.instance.id"] = s.consumer.group_instance_id
    if on_stats is not None:
        conf["stats_cb"] = on_stats
    if on_error is not None:
        conf["error_cb"] = on_error
    return conf


def producer_config(s: Settings, transactional_id: str | None) -> dict[str, Any]:
    conf = s.kafka.client_config() | {
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
        "compression.type": "lz4",
        "message.max.bytes": max(1_000_000, s.limits.max_message_bytes + 65_536),
    }
    if transactional_id:
        conf["transactional.id"] = transactional_id
        conf["transaction.timeout.ms"] = s.delivery.transaction_timeout_ms
    return conf


def to_source(msg: Message) -> Source:
    ts_type, ts = msg.timestamp()
    return Source(
        topic=msg.topic(), partition=msg.partition(), offset=msg.offset(), key=msg.key(), value=msg.value(),
        headers=tuple((k, v or b"") for k, v in (msg.headers() or [])), timestamp_ms=ts if ts_type else None,
    )


class DeliveryError(RuntimeError):
    """At least one record was not acknowledged by the brokers."""


class ConfirmingProducer:
    """Produces records and, on `flush`, raises unless every one of them was acknowledged."""

    def __init__(self, conf: dict[str, Any]) -> None:
        self.producer = Producer(conf)
        self._failures: list[str] = []

    def _on_delivery(self, err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            self._failures.append(str(err))

    def send(self, records: Sequence[Record]) -> None:
        for r in records:
            while True:
                try:
                    self.producer.produce(r.topic, r.value, r.key, headers=r.headers, on_delivery=self._on_delivery)
                    break
                except BufferError:
                    self.producer.poll(0.05)  # local queue full: serve callbacks, then retry
            self.producer.poll(0)

    def flush(self, timeout_s: float) -> None:
        remaining = self.producer.flush(timeout_s)
        failures, self._failures = self._failures, []
        if remaining:
            raise DeliveryError(f"{remaining} records still unacknowledged after {timeout_s}s")
        if failures:
            raise DeliveryError(f"{len(failures)} records failed: {failures[0]}")


def is_fatal(exc: KafkaException) -> bool:
    err = exc.args[0] if exc.args else None
    return bool(err is not None and hasattr(err, "fatal") and err.fatal())


def is_abortable(exc: KafkaException) -> bool:
    err = exc.args[0] if exc.args else None
    return bool(err is not None and hasattr(err, "txn_requires_abort") and err.txn_requires_abort())


__all__ = ["Consumer", "ConfirmingProducer", "DeliveryError", "consumer_config", "producer_config", "to_source",
           "is_fatal", "is_abortable"]
