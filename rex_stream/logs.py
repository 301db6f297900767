"""Structured JSON logs (structlog): one object per line on stdout, the monitoring channel."""

from __future__ import annotations

import logging
import sys

import orjson
import structlog


def configure(level: str = "INFO", **context: object) -> structlog.stdlib.BoundLogger:
    """JSON lines with ISO timestamps; `context` (e.g. worker id) is bound to every event."""
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(serializer=lambda obj, **kw: orjson.dumps(obj, default=str).decode()),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level)),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=False,
    )
    return structlog.get_logger().bind(**context)
