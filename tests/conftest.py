"""Shared pytest fixtures."""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rex_stream import devbroker
from rex_stream.devbroker import LocalBroker

# ============================================================================
# Kafka broker fixtures (rex_stream.devbroker) -- a real single-node KRaft
# broker started from Maven Central jars with `java -cp`.
#
#   kafka_jars            session: path of the cached broker jars
#   kafka_broker          session: a started LocalBroker shared by all tests
#   kafka_topics          function: kafka_topics(input=3, output=1) creates
#                         uniquely named topics on kafka_broker and returns
#                         {"input": "<unique name>", "output": "<unique name>"}
#   kafka_broker_factory  function: make private brokers (for stop/kill tests);
#                         all are killed at test end
#
# No Java 17+, no Maven/network for the first jar download, or no
# confluent-kafka => these fixtures skip, unless REX_REQUIRE_KAFKA=1 (CI), in
# which case they fail. A broker that has its jars but fails to start always
# fails.
# ============================================================================


def _kafka_unavailable(reason: str) -> None:
    if os.environ.get("REX_REQUIRE_KAFKA") == "1":
        pytest.fail(f"Kafka required (REX_REQUIRE_KAFKA=1) but unavailable: {reason}",
                    pytrace=False)
    pytest.skip(f"Kafka broker unavailable: {reason}")


@pytest.fixture(scope="session")
def kafka_jars() -> Path:
    reason: str | None = None
    try:
        import confluent_kafka  # noqa: F401

        devbroker.find_java()
        return devbroker.ensure_kafka_jars()
    except ImportError as exc:
        reason = f"confluent-kafka not importable ({exc})"
    except devbroker.JavaNotFoundError as exc:
        reason = str(exc)
    except devbroker.JarFetchError as exc:
        reason = f"could not fetch the Kafka jars: {exc}"
    _kafka_unavailable(reason)
    raise AssertionError("unreachable")


@pytest.fixture(scope="session")
def kafka_broker(kafka_jars: Path, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[LocalBroker]:
    broker = LocalBroker(data_dir=tmp_path_factory.mktemp("kafka-session"))
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def kafka_broker_factory(kafka_jars: Path, tmp_path: Path
                         ) -> Iterator[Callable[..., LocalBroker]]:
    made: list[LocalBroker] = []

    def make(start: bool = True, **kwargs: Any) -> LocalBroker:
        kwargs.setdefault("data_dir", tmp_path / f"kafka-{len(made)}")
        broker = LocalBroker(**kwargs)
        made.append(broker)
        if start:
            broker.start()
        return broker

    yield make
    for broker in made:
        broker.kill()


def _unique_topic_prefix(request: pytest.FixtureRequest) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", request.node.name).strip("-.")
    return f"t-{name[:80]}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def kafka_topics(kafka_broker: LocalBroker, request: pytest.FixtureRequest
                 ) -> Callable[..., dict[str, str]]:
    prefix = _unique_topic_prefix(request)

    def create(**partitions: int) -> dict[str, str]:
        names = {logical: f"{prefix}-{logical}" for logical in partitions}
        devbroker.create_topics(kafka_broker.bootstrap,
                                {names[k]: n for k, n in partitions.items()})
        return names

    return create

# ============================ end of Kafka broker fixtures ===================


# ============================================================================
# Shared reference data (../shared by default, REX_SHARED to override): the
# tiny model directory and the golden outputs. Not in the repo (third-party
# vocab and dev sets). Missing => skip with the reason, or fail in CI
# (REX_REQUIRE_SHARED=1).
# ============================================================================

REPO_ROOT = Path(__file__).resolve().parent.parent


def shared_path() -> Path:
    return Path(os.environ.get("REX_SHARED", REPO_ROOT.parent / "shared")).resolve()


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    root = shared_path()
    if not (root / "rex" / "tiny-random" / "pytorch_model.bin").is_file():
        reason = f"shared data not found at {root} (set REX_SHARED to the project's shared/ folder)"
        if os.environ.get("REX_REQUIRE_SHARED") == "1":
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    return root


@pytest.fixture(scope="session")
def tiny_model(shared_dir: Path) -> Path:
    return shared_dir / "rex" / "tiny-random"


@pytest.fixture(scope="session")
def golden_cases(shared_dir: Path) -> list[dict[str, Any]]:
    import json

    with open(shared_dir / "rex" / "golden" / "public.jsonl", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]
