"""The engine as a service: callers submit request lists at any time, one thread runs the device.

A worker that called `Engine.run_requests` once per consumed batch drained the device's pipeline
at the end of every call: with small batches the device idled between them, and each call sorted
only its own requests into padded batches. Here one background thread keeps a single
`Engine.serve` loop running; submitted requests join the pool that loop admits from, so batch k+1
is planned and padded together with what is left of batch k, and the device never waits for a
caller. Each submission gets a `Future` that resolves once all of its requests have finished
(results in submission order). The queue (this module) and the inference (`Engine`) stay apart,
as in text-embeddings-inference.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Hashable, Sequence
from concurrent.futures import Future

import structlog

from .device_server import DeviceLost
from .engine import Engine, Outcome
from .requests import Request

log = structlog.get_logger()


class _Ticket:
    """One submission: its requests' outcomes as they finish, and the future they resolve."""

    def __init__(self, requests: Sequence[Request]) -> None:
        self.requests = list(requests)
        self.outcomes: list[Outcome | None] = [None] * len(requests)
        self.remaining = len(requests)
        self.future: Future[list[Outcome]] = Future()

    def finish(self, index: int, outcome: Outcome) -> None:
        self.outcomes[index] = outcome
        self.remaining -= 1
        if self.remaining == 0 and not self.future.cancelled():
            self.future.set_result(self.outcomes)  # type: ignore[arg-type]


class EngineServer:
    """One engine, one device thread, any number of submitting threads."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._waiting: deque[tuple[Hashable, Request]] = deque()
        self._started: dict[Hashable, Request] = {}  # taken by the engine and not finished yet
        self._ready = threading.Condition()
        self._closed = False
        self._failure: BaseException | None = None  # what ended the device thread, if anything did
        self._thread = threading.Thread(target=self._run, name="rex-engine", daemon=True)
        self._thread.start()

    def submit(self, requests: Sequence[Request]) -> Future[list[Outcome]]:
        """Queue requests (already validated); the future holds their outcomes, in order."""
        ticket = _Ticket(requests)
        if not requests:
            ticket.future.set_result([])
            return ticket.future
        with self._ready:
            if self._failure is not None:
                raise self._failure  # as its own futures got it: a caller sees why, not just "closed"
            if self._closed:
                raise RuntimeError("the engine server is closed")
            self._waiting.extend(((ticket, i), r) for i, r in enumerate(requests))
            self._ready.notify()
        return ticket.future

    def close(self, timeout: float | None = None, cancel: bool = False) -> None:
        """Finish what was submitted (with `cancel`, only what the engine has started: the futures of
        the rest are cancelled), then stop the device thread, waiting up to `timeout` for it."""
        with self._ready:
            self._closed = True
            if cancel:
                for (ticket, _), _request in self._waiting:
                    ticket.future.cancel()
                self._waiting.clear()
            self._ready.notify()
        self._thread.join(timeout)

    # ------------------------------------------------------------------ the engine's source

    @property
    def live(self) -> bool:
        return not self._closed

    def take(self) -> tuple[Hashable, Request] | None:
        with self._ready:
            if not self._waiting:
                return None
            key, request = self._waiting.popleft()
        self._started[key] = request
        return key, request

    def wait(self) -> bool:
        with self._ready:
            while not self._waiting and not self._closed:
                self._ready.wait()
            return bool(self._waiting)

    def _finish(self, key: Hashable, outcome: Outcome) -> None:
        del self._started[key]
        ticket, index = key  # type: ignore[misc]
        ticket.finish(index, outcome)

    # ------------------------------------------------------------------ the device thread

    def _run(self) -> None:
        try:
            while True:
                try:
                    self.engine.serve(self, self._finish)
                    return
                except DeviceLost:
                    raise  # not any request's fault: every waiting future gets it (below)
                except Exception as exc:  # noqa: BLE001 - a whole-pipeline failure: isolate the culprit
                    self._isolate(exc)
        except BaseException as exc:  # the thread is dying: no future may wait forever
            with self._ready:
                self._closed = True
                self._failure = exc
                pending = list(self._started) + [key for key, _ in self._waiting]
                self._waiting.clear()
            for ticket in {key[0] for key in pending}:  # type: ignore[index]
                if not ticket.future.done():
                    ticket.future.set_exception(exc)
            # A lost device process is expected (the worker logs it as worker_stopped, reason
            # device_lost); anything else is a bug, and the thread's own report shows where. Only the
            # latter goes to stderr as a raw traceback, which would split other processes' JSON lines.
            if not isinstance(exc, DeviceLost):
                raise

    def _isolate(self, exc: Exception) -> None:
        """Rerun the requests the failed pipeline held, halving until only the culprit fails."""
        started, self._started = self._started, {}
        log.warning("engine_pipeline_failed", error=f"{type(exc).__name__}: {exc}"[:500], requests=len(started))
        keys = list(started)
        for (ticket, index), outcome in zip(keys, self.engine.run_isolated([started[k] for k in keys])):  # type: ignore[misc]
            ticket.finish(index, outcome)
