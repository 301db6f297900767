"""Worker health: a heartbeat the poll loop beats, an HTTP endpoint, a heartbeat file, and ``rex-stream health``.

Liveness means the worker's poll loop is turning: it calls :meth:`HealthState.beat` every
iteration, so a loop stuck in a call (a hung device, a deadlock) stops beating and turns
unhealthy once the last beat is older than ``monitor.heartbeat_timeout_s``. Before the first
beat, the state's creation time counts as the last beat (a grace period for start-up).

Readiness additionally needs the model loaded, a first partition assignment received (an empty
one counts: a worker beyond the partition count is idle but fine) and the broker reachable.

HTTP (:func:`serve`, port ``monitor.http_port``), JSON bodies:

* ``GET /healthz`` — 200 ``{"status": "ok", ...}`` or 503 ``{"status": "unhealthy", "reason": ...}``
* ``GET /readyz``  — 200 when live and ready, else 503 with the failing checks
* ``GET /metrics`` — the Prometheus text format of :class:`~rex_stream.ops.metrics.WorkerMetrics`

Heartbeat file (``monitor.heartbeat_file``): JSON ``{"ts", "pid", "model_loaded", "assigned",
"broker_ok", "error"}`` (``ts`` = Unix wall time of the beat), replaced atomically, at most once
per second. ``rex-stream health --heartbeat-file F [--max-age S] [--ready]`` reads it; ``rex-stream
health --url http://HOST:PORT [--ready]`` asks the endpoint. Exit status 0 healthy, 1 not (with a
one-line reason on stdout).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

HEARTBEAT_FILE_MIN_INTERVAL_S = 1.0


class HealthState:
    """Thread-safe health facts of one worker; the poll loop calls :meth:`beat`.

    ``model_loaded``, ``assignment_received``, ``broker_reachable`` and ``last_error`` are plain
    attributes to the caller (``state.model_loaded = True``) backed by a lock.
    """

    def __init__(self, heartbeat_timeout_s: float = 60.0, heartbeat_file: str | Path | None = None,
                 clock: Callable[[], float] = time.monotonic, wall_clock: Callable[[], float] = time.time) -> None:
        self.heartbeat_timeout_s = float(heartbeat_timeout_s)
        self.heartbeat_file = Path(heartbeat_file) if heartbeat_file else None
        self._clock = clock
        self._wall = wall_clock
        self._lock = threading.Lock()
        self._started = clock()
        self._last_beat: float | None = None
        self._last_beat_wall: float | None = None
        self._last_file_write: float | None = None
        self._beats = 0
        self._model_loaded = False
        self._assignment_received = False
        self._broker_reachable = False
        self._last_error: str | None = None

    @classmethod
    def from_settings(cls, monitor: Any) -> HealthState:
        """From a :class:`rex_stream.config.MonitorSettings`."""
        return cls(heartbeat_timeout_s=monitor.heartbeat_timeout_s, heartbeat_file=monitor.heartbeat_file)

    # ------------------------------------------------------------------ updates

    def beat(self) -> None:
        """The loop is alive. Also writes the heartbeat file when one is configured and ≥ 1 s passed."""
        now = self._clock()
        with self._lock:
            self._last_beat = now
            self._last_beat_wall = self._wall()
            self._beats += 1
            due = self.heartbeat_file is not None and (
                self._last_file_write is None or now - self._last_file_write >= HEARTBEAT_FILE_MIN_INTERVAL_S)
            if due:
                self._last_file_write = now
                payload = self._file_payload()
        if due:
            self._write_file(payload)

    def _flag(name: str, doc: str) -> property:  # noqa: N805 - a property factory used in the class body
        attr = "_" + name

        def get(self: HealthState) -> Any:
            with self._lock:
                return getattr(self, attr)

        def set_(self: HealthState, value: Any) -> None:
            with self._lock:
                setattr(self, attr, value)

        return property(get, set_, doc=doc)

    model_loaded = _flag("model_loaded", "The engine (model weights) is loaded on its device.")
    assignment_received = _flag("assignment_received", "A first partition assignment (possibly empty) arrived.")
    broker_reachable = _flag("broker_reachable", "The last poll reached the broker.")
    last_error = _flag("last_error", "The last error worth reporting (a string), or None.")
    del _flag

    def error(self, message: str | None) -> None:
        self.last_error = message

    # ------------------------------------------------------------------ checks

    def heartbeat_age(self) -> float:
        """Seconds since the last beat (since creation before the first beat)."""
        with self._lock:
            since = self._last_beat if self._last_beat is not None else self._started
        return max(0.0, self._clock() - since)

    def live(self) -> tuple[bool, dict[str, Any]]:
        age = self.heartbeat_age()
        with self._lock:
            beats = self._beats
        ok = age <= self.heartbeat_timeout_s
        body: dict[str, Any] = {"status": "ok" if ok else "unhealthy", "heartbeat_age_s": round(age, 3),
                                "heartbeat_timeout_s": self.heartbeat_timeout_s, "beats": beats}
        if not ok:
            body["reason"] = (f"no loop heartbeat for {age:.1f} s (timeout {self.heartbeat_timeout_s:g} s):"
                              " the poll loop is stuck")
        return ok, body

    def ready(self) -> tuple[bool, dict[str, Any]]:
        live, live_body = self.live()
        with self._lock:
            checks = {"live": live, "model_loaded": self._model_loaded,
                      "assignment_received": self._assignment_received, "broker_reachable": self._broker_reachable}
            error = self._last_error
        ok = all(checks.values())
        body: dict[str, Any] = {"status": "ok" if ok else "not_ready", "checks": checks,
                                "heartbeat_age_s": live_body["heartbeat_age_s"]}
        if error:
            body["last_error"] = error
        if not ok:
            failing = [name for name, value in checks.items() if not value]
            body["reason"] = "not " + ", not ".join(f.replace("_", " ") for f in failing)
            if not live:
                body["reason"] = live_body["reason"]
        return ok, body

    # ------------------------------------------------------------------ heartbeat file

    def _file_payload(self) -> dict[str, Any]:
        return {"ts": self._last_beat_wall, "pid": os.getpid(), "model_loaded": self._model_loaded,
                "assigned": self._assignment_received, "broker_ok": self._broker_reachable,
                "error": self._last_error}

    def _write_file(self, payload: dict[str, Any]) -> None:
        path = self.heartbeat_file
        assert path is not None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump(payload, f)
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError:
            # a full or read-only disk must not kill the poll loop; the file just goes stale
            pass


# ---------------------------------------------------------------------- HTTP endpoint


def _handler(state: HealthState, metrics: Any) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "rex-stream"

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, status: int, obj: dict[str, Any]) -> None:
            self._send(status, json.dumps(obj).encode() + b"\n", "application/json")

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            path = self.path.split("?", 1)[0].rstrip("/") or "/"
            if path == "/healthz":
                ok, body = state.live()
                self._json(200 if ok else 503, body)
            elif path == "/readyz":
                ok, body = state.ready()
                self._json(200 if ok else 503, body)
            elif path == "/metrics" and metrics is not None:
                from prometheus_client import CONTENT_TYPE_LATEST

                self._send(200, metrics.render(), CONTENT_TYPE_LATEST)
            elif path == "/":
                self._json(200, {"endpoints": ["/healthz", "/readyz", "/metrics"]})
            else:
                self._json(404, {"status": "not_found", "path": path})

        do_HEAD = do_GET  # noqa: N815

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - probes every few seconds: no access log
            pass

    return Handler


class HealthServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


def serve(port: int, state: HealthState, metrics: Any = None, host: str = "0.0.0.0") -> HealthServer:
    """Start the HTTP endpoint on a daemon thread and return the server (``port=0``: any free port,
    read it back from ``server.port``). Stop it with ``server.stop()``."""
    server = HealthServer((host, port), _handler(state, metrics))
    thread = threading.Thread(target=server.serve_forever, args=(0.1,), name=f"rex-http-{server.port}", daemon=True)
    thread.start()
    return server


# ---------------------------------------------------------------------- rex-stream health


def check_url(url: str, ready: bool, timeout: float = 5.0) -> tuple[bool, str]:
    base = url.rstrip("/")
    if not base.endswith(("/healthz", "/readyz")):
        base += "/readyz" if ready else "/healthz"
    try:
        with urllib.request.urlopen(base, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return False, f"unreachable: {base}: {reason}"
    try:
        body = json.loads(raw)
    except ValueError:
        body = {}
    if status == 200:
        age = body.get("heartbeat_age_s")
        return True, f"{'ready' if ready else 'healthy'}: {base} (heartbeat {age} s ago)"
    return False, f"{'not ready' if ready else 'unhealthy'}: {base} HTTP {status}: {body.get('reason', raw[:200])}"


def check_file(path: str | Path, max_age: float, ready: bool, now: float | None = None) -> tuple[bool, str]:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        ts = float(data["ts"])
    except FileNotFoundError:
        return False, f"unhealthy: no heartbeat file {path}"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return False, f"unhealthy: unreadable heartbeat file {path}: {exc}"
    age = (time.time() if now is None else now) - ts
    if age > max_age:
        return False, (f"unhealthy: heartbeat {age:.1f} s old (max {max_age:g} s), pid {data.get('pid')}:"
                       " loop stuck or worker gone")
    if ready:
        missing = [label for key, label in (("model_loaded", "model not loaded"), ("assigned", "no assignment yet"),
                                            ("broker_ok", "broker unreachable")) if not data.get(key)]
        if missing:
            error = f" (last error: {data['error']})" if data.get("error") else ""
            return False, f"not ready: {', '.join(missing)}{error}"
    return True, f"{'ready' if ready else 'healthy'}: heartbeat {age:.1f} s old, pid {data.get('pid')}"


def main(args: Any) -> int:
    """``rex-stream health``: 0 healthy, 1 unhealthy or unreachable; prints one line."""
    url = getattr(args, "url", None)
    heartbeat_file = getattr(args, "heartbeat_file", None)
    max_age = float(getattr(args, "max_age", 60.0) or 60.0)
    ready = bool(getattr(args, "ready", False))
    if not url and not heartbeat_file:
        # fall back to the worker's own settings (REX_MONITOR__HTTP_PORT / REX_MONITOR__HEARTBEAT_FILE)
        try:
            from ..config import load_settings

            monitor = load_settings().monitor
        except Exception as exc:  # noqa: BLE001 - any config problem is 'cannot check'
            print(f"unhealthy: no --url/--heartbeat-file and the settings do not load: {exc}")
            return 1
        if monitor.http_port:
            url = f"http://127.0.0.1:{monitor.http_port}"
        elif monitor.heartbeat_file:
            heartbeat_file = monitor.heartbeat_file
        else:
            print("unhealthy: nothing to check: give --url or --heartbeat-file "
                  "(or set REX_MONITOR__HTTP_PORT / REX_MONITOR__HEARTBEAT_FILE)")
            return 1
    results = []
    if url:
        results.append(check_url(url, ready))
    if heartbeat_file:
        results.append(check_file(heartbeat_file, max_age, ready))
    failed = [msg for ok, msg in results if not ok]
    print(failed[0] if failed else "; ".join(msg for _, msg in results))
    return 1 if failed else 0
