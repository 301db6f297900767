"""`rex-stream infer`: JSON Lines in, the reference pipeline's outputs out, in input order.

Each input line is `{"id", "text", "schema"}` (schema optional when `--schema` is given) or, with
`--schema`, a plain text line. A line that cannot be used yields an error record with its line
number and reason; the run goes on.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import IO, Any

import orjson

from .engine.engine import Engine
from .engine.requests import RequestError, parse_schema

CHUNK_LINES = 2048


@dataclass
class Line:
    number: int
    id: Any
    text: Any = None
    schema: Any = None
    error: RequestError | None = None


def parse_line(number: int, raw: str, default_schema: dict | None) -> Line | None:
    """One input line → a request or an error; blank lines are skipped."""
    stripped = raw.strip()
    if not stripped:
        return None
    if not stripped.startswith("{"):
        if default_schema is None:
            return Line(number, number, error=RequestError("bad_line", "plain text lines need --schema"))
        return Line(number, number, text=raw.rstrip("\r\n"), schema=default_schema)
    try:
        obj = orjson.loads(stripped)
    except orjson.JSONDecodeError as exc:
        return Line(number, number, error=RequestError("bad_json", f"invalid JSON: {exc}"))
    if not isinstance(obj, dict):
        return Line(number, number, error=RequestError("bad_json", "a JSON line must be an object"))
    ident = obj.get("id", number)
    if "text" not in obj:
        return Line(number, ident, error=RequestError("missing_text", "no 'text' field"))
    schema = obj.get("schema", default_schema)
    if schema is None:
        return Line(number, ident, error=RequestError("missing_schema", "no 'schema' field and no --schema"))
    return Line(number, ident, text=obj["text"], schema=schema)


def run_lines(engine: Engine, lines: Iterable[str], default_schema: dict | None) -> Iterator[dict]:
    """Records for every non-blank line, in order, processing `CHUNK_LINES` at a time."""
    chunk: list[Line] = []
    for number, raw in enumerate(lines, start=1):
        line = parse_line(number, raw, default_schema)
        if line is not None:
            chunk.append(line)
        if len(chunk) >= CHUNK_LINES:
            yield from _run_chunk(engine, chunk)
            chunk = []
    yield from _run_chunk(engine, chunk)


def _run_chunk(engine: Engine, chunk: list[Line]) -> Iterator[dict]:
    runnable = [line for line in chunk if line.error is None]
    outcomes = iter(engine.infer([(line.text, line.schema) for line in runnable]))
    for line in chunk:
        error = line.error
        if error is None:
            outcome = next(outcomes)
            if outcome.error is None:
                yield {"id": line.id, "output": outcome.output}
                continue
            error = outcome.error
        yield {"id": line.id, "line": line.number, "error": {"code": error.code, "message": str(error)}}


def main(args: Any) -> int:
    default_schema = parse_schema(args.schema) if args.schema else None
    engine = Engine(args.model, device=args.device, dtype=args.dtype, batch_tokens=args.batch_tokens,
                    limits=args.limits, cls_score=args.cls_score, attention=args.attention,
                    compile_encoder=args.compile)
    source: IO[str] = sys.stdin if args.input == "-" else open(args.input, encoding="utf-8")
    sink: IO[bytes] = sys.stdout.buffer if args.output == "-" else open(args.output, "wb")
    try:
        for record in run_lines(engine, source, default_schema):
            sink.write(orjson.dumps(record) + b"\n")
    finally:
        if source is not sys.stdin:
            source.close()
        if sink is not sys.stdout.buffer:
            sink.close()
        else:
            sink.flush()
    return 0
