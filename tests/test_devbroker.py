"""Tests of rex_stream.devbroker against a real Kafka broker."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from rex_stream import devbroker
from rex_stream.devbroker import LocalBroker, create_topics

confluent_kafka = pytest.importorskip("confluent_kafka")
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition  # noqa: E402


def _producer(bootstrap: str, **conf: object) -> Producer:
    return Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, **conf})


def _produce_all(producer: Producer, topic: str, values: list[str]) -> None:
    errors: list[KafkaError] = []

    def on_delivery(err: KafkaError | None, _msg: object) -> None:
        if err is not None:
            errors.append(err)

    for i, v in enumerate(values):
        producer.produce(topic, key=str(i).encode(), value=v.encode(), on_delivery=on_delivery)
    assert producer.flush(30) == 0
    assert errors == []


def _drain(bootstrap: str, topic: str, *, isolation: str = "read_committed",
           timeout: float = 30.0) -> list[str]:
    """Every record of ``topic`` visible under ``isolation``, read from offset 0 to the end."""
    c = Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": f"drain-{uuid.uuid4().hex}",
        "enable.auto.commit": False,
        "isolation.level": isolation,
        "enable.partition.eof": True,
    })
    try:
        md = c.list_topics(topic, timeout=10)
        parts = sorted(md.topics[topic].partitions)
        c.assign([TopicPartition(topic, p, 0) for p in parts])
        at_end: set[int] = set()
        out: list[str] = []
        deadline = time.monotonic() + timeout
        while len(at_end) < len(parts):
            assert time.monotonic() < deadline, f"no EOF on {topic} after {timeout}s"
            msg = c.poll(0.5)
            if msg is None:
                continue
            if msg.error():
                if msg.error().code() == KafkaError._PARTITION_EOF:
                    at_end.add(msg.partition())
                    continue
                raise AssertionError(f"consume error: {msg.error()}")
            at_end.discard(msg.partition())
            out.append(msg.value().decode())
        return out
    finally:
        c.close()


def _txn_producer(bootstrap: str, txn_id: str) -> Producer:
    p = _producer(bootstrap, **{"transactional.id": txn_id, "transaction.timeout.ms": 30000})
    p.init_transactions(30)
    return p


def _write_committed_and_aborted(bootstrap: str, topic: str, txn_id: str) -> Producer:
    """Commit c0..c4, abort a0..a4, commit c5..c9. Returns the (idle) producer."""
    p = _txn_producer(bootstrap, txn_id)
    for prefix, commit in (("c", True), ("a", False)):
        p.begin_transaction()
        _produce_all(p, topic, [f"{prefix}{i}" for i in range(5)])
        p.commit_transaction(30) if commit else p.abort_transaction(30)
    p.begin_transaction()
    _produce_all(p, topic, [f"c{i}" for i in range(5, 10)])
    p.commit_transaction(30)
    return p


COMMITTED = {f"c{i}" for i in range(10)}
ABORTED = {f"a{i}" for i in range(5)}


# ------------------------------------------------------------------ unit-ish


def test_server_properties_are_single_node(tmp_path: Path) -> None:
    b = LocalBroker(port=19092, controller_port=19093, data_dir=tmp_path)
    props = b.server_properties()
    assert b.bootstrap == "127.0.0.1:19092"
    assert props["process.roles"] == "broker,controller"
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:19092,CONTROLLER://127.0.0.1:19093"
    assert props["offsets.topic.replication.factor"] == "1"
    assert props["transaction.state.log.replication.factor"] == "1"
    assert props["transaction.state.log.min.isr"] == "1"
    assert props["group.initial.rebalance.delay.ms"] == "0"
    assert props["log.dirs"] == str(tmp_path.resolve() / "kraft")
    assert not b.running


def test_ensure_kafka_jars_is_idempotent(kafka_jars: Path) -> None:
    assert (kafka_jars / f"kafka_2.13-{devbroker.PINNED}.jar").is_file()
    names = {p.name for p in kafka_jars.glob("*.jar")}
    assert any(n.startswith("log4j-core-") for n in names)
    assert any(n.startswith(("log4j-slf4j-impl-", "log4j-slf4j2-impl-")) for n in names)
    t0 = time.monotonic()
    assert devbroker.ensure_kafka_jars() == kafka_jars
    assert time.monotonic() - t0 < 1.0  # marker hit: no Maven run


# ------------------------------------------------------------------ real broker


def test_produce_consume_round_trip(kafka_broker: LocalBroker,
                                    kafka_topics: Callable[..., dict[str, str]]) -> None:
    topic = kafka_topics(data=3)["data"]
    values = [f"v{i}" for i in range(30)]
    _produce_all(_producer(kafka_broker.bootstrap, acks="all"), topic, values)

    c = Consumer({"bootstrap.servers": kafka_broker.bootstrap,
                  "group.id": f"g-{uuid.uuid4().hex}", "auto.offset.reset": "earliest",
                  "enable.auto.commit": False})
    got: list[str] = []
    try:
        c.subscribe([topic])
        deadline = time.monotonic() + 60
        while len(got) < len(values) and time.monotonic() < deadline:
            msg = c.poll(0.5)
            if msg is None:
                continue
            assert msg.error() is None, msg.error()
            got.append(msg.value().decode())
        assert sorted(got) == sorted(values)
        c.commit(asynchronous=False)
        committed = c.committed([TopicPartition(topic, p) for p in range(3)], timeout=10)
        assert sum(tp.offset for tp in committed) == len(values)
    finally:
        c.close()


def test_create_topics_is_idempotent(kafka_broker: LocalBroker) -> None:
    name = f"idem-{uuid.uuid4().hex[:8]}"
    create_topics(kafka_broker.bootstrap, {name: 2})
    create_topics(kafka_broker.bootstrap, {name: 2})  # already exists: fine
    c = Consumer({"bootstrap.servers": kafka_broker.bootstrap, "group.id": "x"})
    try:
        assert len(c.list_topics(name, timeout=10).topics[name].partitions) == 2
    finally:
        c.close()


def test_aborted_transaction_invisible_to_read_committed(
        kafka_broker: LocalBroker, kafka_topics: Callable[..., dict[str, str]]) -> None:
    topic = kafka_topics(out=2)["out"]
    _write_committed_and_aborted(kafka_broker.bootstrap, topic, f"tx-{uuid.uuid4().hex}")

    committed_view = _drain(kafka_broker.bootstrap, topic, isolation="read_committed")
    assert sorted(committed_view) == sorted(COMMITTED)
    # The aborted records really are in the log: read_uncommitted shows them.
    raw_view = _drain(kafka_broker.bootstrap, topic, isolation="read_uncommitted")
    assert set(raw_view) == COMMITTED | ABORTED


def test_restart_keeps_committed_data(
        kafka_broker_factory: Callable[..., LocalBroker]) -> None:
    broker = kafka_broker_factory()
    bootstrap = broker.bootstrap
    create_topics(bootstrap, {"events": 2})
    _write_committed_and_aborted(bootstrap, "events", "tx-restart")
    # A consumer group commits offsets, which must survive the restart too.
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "g-restart"})
    c.commit(offsets=[TopicPartition("events", 0, 3)], asynchronous=False)
    c.close()

    assert broker.stop() is not None
    assert not broker.running
    broker.start()
    assert broker.bootstrap == bootstrap  # same ports after a restart

    assert sorted(_drain(bootstrap, "events")) == sorted(COMMITTED)
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "g-restart"})
    try:
        [tp] = c.committed([TopicPartition("events", 0)], timeout=20)
        assert tp.offset == 3
    finally:
        c.close()
    # A fresh LocalBroker on the same data dir (e.g. a new CLI run) reuses it: no re-format.
    broker.stop()
    again = kafka_broker_factory(data_dir=broker.data_dir)
    assert again.bootstrap == bootstrap
    assert sorted(_drain(bootstrap, "events")) == sorted(COMMITTED)


def test_kill_then_start(kafka_broker_factory: Callable[..., LocalBroker]) -> None:
    broker = kafka_broker_factory()
    bootstrap = broker.bootstrap
    create_topics(bootstrap, {"crash": 1})
    _write_committed_and_aborted(bootstrap, "crash", "tx-crash")
    # Leave a transaction open when the broker dies.
    p = _txn_producer(bootstrap, "tx-crash-open")
    p.begin_transaction()
    _produce_all(p, "crash", ["open0", "open1"])

    assert broker.kill() == -9
    assert not broker.running
    del p
    broker.start()

    # A new producer with the same transactional.id fences the old one and aborts
    # its open transaction, as a restarted worker would.
    _txn_producer(bootstrap, "tx-crash-open")
    assert sorted(_drain(bootstrap, "crash")) == sorted(COMMITTED)
    _produce_all(_producer(bootstrap), "crash", ["after"])
    assert "after" in _drain(bootstrap, "crash")


def test_bad_config_raises_start_error(kafka_jars: Path, tmp_path: Path) -> None:
    broker = LocalBroker(data_dir=tmp_path, extra_properties={"node.id": "not-a-number"})
    with pytest.raises(devbroker.BrokerStartError, match="not-a-number"):
        broker.start(timeout=60)
    assert not broker.running
