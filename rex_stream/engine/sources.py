"""Where the engine's requests come from: a fixed list, or a queue that callers feed while it runs."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Protocol

from .requests import Request


class Source(Protocol):
    """Requests for `Engine.serve`, each under a key its `finish` callback gets back."""

    live: bool  # more requests may still arrive while the engine runs (callers feed a queue)

    def take(self) -> tuple[Hashable, Request] | None:
        """The next waiting request, or None if none waits now (never blocks)."""

    def wait(self) -> bool:
        """Block until a request waits (True), or return False once none will come any more."""


class ListSource:
    """The requests of one `run_requests` call, keyed by their index."""

    live = False

    def __init__(self, requests: Sequence[Request]) -> None:
        self._items = iter(enumerate(requests))

    def take(self) -> tuple[Hashable, Request] | None:
        return next(self._items, None)

    def wait(self) -> bool:
        return False  # nothing is added later: once taken empty, the run is over
