"""Kafka message ↔ engine request, and the result / dead-letter records (pure, no I/O).

Input value: JSON `{"id"?, "text", "schema"?, "meta"?}`, or plain UTF-8 text when a default
schema is configured. Anything unusable becomes a dead letter carrying the original bytes and a
reason; it is never dropped and never crashes the worker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from ..config import LimitSettings
from ..engine.requests import Limits, Request, RequestError, validate

HEADER_PREFIX = "rex."


@dataclass(frozen=True)
class Source:
    """Where a message came from; everything needed to route, commit and dead-letter it."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]
    timestamp_ms: int | None

    @property
    def tp(self) -> tuple[str, int]:
        return (self.topic, self.partition)

    def default_id(self) -> str:
        return f"{self.topic}-{self.partition}-{self.offset}"


@dataclass(frozen=True)
class Job:
    """A decoded, validated message ready for inference."""

    source: Source
    id: Any
    request: Request
    meta: Any


@dataclass(frozen=True)
class Record:
    """One record to produce (a result or a dead letter) for the input at `source`."""

    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]
    source: Source


def decode(src: Source, limits: LimitSettings, engine_limits: Limits,
           default_schema: dict[str, Any] | None) -> Job:
    """Bytes → Job, or RequestError with a stable code and a readable reason."""
    raw = src.value
    if raw is None:
        raise RequestError("empty_message", "message has no value (tombstone)")
    if len(raw) > limits.max_message_bytes:
        raise RequestError("message_too_large", f"message has {len(raw)} bytes, the limit is {limits.max_message_bytes}")
    try:
        body = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError("bad_encoding", f"value is not UTF-8: {exc}") from None
    stripped = body.lstrip()
    if stripped.startswith("{"):
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise RequestError("bad_json", f"value is not valid JSON: {exc}") from None
        if "text" not in obj:
            raise RequestError("missing_text", "JSON value has no 'text' field")
        schema = obj.get("schema", default_schema)
        if schema is None:
            raise RequestError("missing_schema", "no 'schema' in the message and no default schema configured")
        req = validate(obj["text"], schema, engine_limits)
        return Job(src, obj.get("id", src.default_id()), req, obj.get("meta"))
    if default_schema is None:
        raise RequestError("bad_json", "value is not a JSON object and no default schema is configured for plain text")
    return Job(src, src.default_id(), validate(body, default_schema, engine_limits), None)


def result_record(job: Job, output: list, topic: str, model: dict[str, Any], latency_ms: int | None) -> Record:
    """The output value: the engine's output plus provenance; keyed like the input."""
    value = {
        "id": job.id,
        "output": output,
        "model": model,
        "source": {"topic": job.source.topic, "partition": job.source.partition, "offset": job.source.offset},
        "latency_ms": latency_ms,
        "meta": job.meta,
    }
    return Record(topic, job.source.key, orjson.dumps(value), [], job.source)


def dead_letter_record(src: Source, error: RequestError, topic: str) -> Record:
    """The original bytes, key and headers, plus why and where from, in `rex.*` headers."""
    headers = list(src.headers) + [
        (HEADER_PREFIX + "error.code", error.code.encode()),
        (HEADER_PREFIX + "error.reason", str(error).encode("utf-8", "replace")[:4096]),
        (HEADER_PREFIX + "source.topic", src.topic.encode()),
        (HEADER_PREFIX + "source.partition", str(src.partition).encode()),
        (HEADER_PREFIX + "source.offset", str(src.offset).encode()),
    ]
    return Record(topic, src.key, src.value or b"", headers, src)
