"""`rex-stream produce`: JSON Lines or plain text lines → an input topic."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

import orjson

from ..config import load_settings
from ..engine.requests import parse_schema
from .kafka_io import ConfirmingProducer, producer_config
from .messages import Record, Source

_NO_SOURCE = Source("", -1, -1, None, None, (), None)


def records(lines: Iterable[str], topic: str, schema: dict | None) -> Iterable[Record]:
    """One record per non-blank line; text lines are wrapped as {text, schema} when a schema is given."""
    for line in lines:
        body = line.rstrip("\r\n")
        if not body.strip():
            continue
        if schema is not None and not body.lstrip().startswith("{"):
            value = orjson.dumps({"text": body, "schema": schema})
        else:
            value = body.encode("utf-8")
        key = None
        if body.lstrip().startswith("{"):
            try:
                ident = orjson.loads(value).get("id")
                key = None if ident is None else str(ident).encode()
            except (orjson.JSONDecodeError, AttributeError):
                key = None  # sent as is: the worker dead-letters it with the reason
        yield Record(topic, key, value, [], _NO_SOURCE)


def main(args: Any) -> int:
    overrides = {"kafka": {"bootstrap_servers": args.bootstrap_servers}} if args.bootstrap_servers else {}
    settings = load_settings(args.config, overrides)
    producer = ConfirmingProducer(producer_config(settings, None))
    schema = parse_schema(args.schema) if args.schema else None
    source = sys.stdin if args.input == "-" else open(args.input, encoding="utf-8")
    count = 0
    try:
        batch: list[Record] = []
        for record in records(source, args.topic, schema):
            batch.append(record)
            if len(batch) >= 1000:
                producer.send(batch)
                count += len(batch)
                batch = []
        producer.send(batch)
        count += len(batch)
        producer.flush(60.0)
    finally:
        if source is not sys.stdin:
            source.close()
    print(f"produced {count} messages to {args.topic}", file=sys.stderr)
    return 0
