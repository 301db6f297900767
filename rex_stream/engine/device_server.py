"""One process owns the model on a device; several host processes feed it padded batches.

An engine's host work (schema walk, tokenising, padding, decoding: ~30 µs of Python per `ner`
message) and its device work share one interpreter, and on short texts the host is the limit.
Several engine processes per GPU spread that work over cores, but each then has its own CUDA
context, model copy and activation memory, and their kernels time-slice the card. Here the host
processes ("clients", each a full `Engine` built with `device_link=`) keep everything but the
model: they pack batches (`packing.Packer`) and send them to the one device process, which
uploads, runs and joins the links as the engine would (`ForwardRunner` stages), and sends back
the batch's host arrays (`HostLinks`). The device process keeps up to `depth` batches queued on
the device, from whichever clients sent them; each client gets its answers in the order it sent.

Clients reach it through pipes made when it starts (`start_device_server`: benchmarks, tests) or
through a Unix socket with an authentication key (`DeviceServer.listen` / `connect_device`: the
stream workers of `rex-stream run --device-server`, which come and go independently).

The division of work is the one of text-embeddings-inference's router (tokenise, queue, batch)
and model server (forward only), with batches built by the clients.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import AuthenticationError, Client, Connection, Listener
from pathlib import Path
from typing import Any

import structlog
import torch

from .decode import Links
from .packing import Packed, Packer
from .recursion import Forward
from .runner import HostLinks, split_links
from .tokenizer import SpecialIds

log = structlog.get_logger("rex_stream.device")

_CLOSE = None  # what a client sends when it is done
_ATTACH = "attach"  # the accept thread's note that a new client connected


class DeviceLost(RuntimeError):
    """The device process is gone. Nothing in flight will be answered, and no request has failed:
    the caller must stop (a stream worker exits without committing, and is restarted)."""


@dataclass
class Pending:
    """A batch sent to the device process (what `Engine._pipeline` keeps in flight)."""

    prepared: Packed  # `Engine._count` reads `.prepared.lengths`, as for a local batch


class RemoteRunner:
    """The `ForwardRunner` stages of a client: pack here, run in the device process."""

    def __init__(self, link: Connection, special: SpecialIds) -> None:
        self.link = link
        self.packer = Packer(special)

    def prepare(self, forwards: Sequence[Forward]) -> Packed:
        return self.packer.pack(forwards)

    def launch(self, packed: Packed) -> Pending:
        try:
            self.link.send(packed)
        except OSError as exc:
            raise DeviceLost(f"sending a batch to the device process failed: {exc}") from exc
        return Pending(packed)

    def fetch(self, pending: Pending) -> tuple[Packed, HostLinks]:
        """Wait for this batch's answer; a device error (out of memory included) is raised here."""
        try:
            answer = self.link.recv()
        except (EOFError, OSError) as exc:
            raise DeviceLost(f"the device process closed the connection: {exc!r}") from exc
        if isinstance(answer, BaseException):
            raise answer
        return pending.prepared, answer

    def collect(self, fetched: tuple[Packed, HostLinks]) -> list[Links]:
        packed, links = fetched
        return split_links(links, packed.nh, packed.cls)

    def close(self) -> None:
        try:
            self.link.send(_CLOSE)
        except OSError:
            pass  # the device process is gone already
        self.link.close()


class DeviceServer:
    """Runs the batches its clients send on one engine's device.

    A reader thread per client receives (and unpickles) its batches into one queue, so a client
    never blocks on sending while `run` blocks on answering it. Batches are uploaded and launched as
    they come, up to `depth` queued on the device; the oldest is then finished (its links copied
    out) and answered. A batch that fails answers with its exception, and the server goes on.
    """

    def __init__(self, engine: Any, depth: int = 3) -> None:
        self.runner = engine.runner
        self.depth = depth
        self.inbox: queue.Queue[tuple[Connection, Packed | None]] = queue.Queue()
        self.clients = 0  # attached and not yet closed (counted by `run`, which sees the closes)
        self.forever = False

    def attach(self, conn: Connection) -> None:
        """Serve one more client."""
        self.clients += 1
        threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: Connection) -> None:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                msg = _CLOSE
            self.inbox.put((conn, msg))
            if msg is _CLOSE:
                return

    def listen(self, path: str, authkey: bytes) -> None:
        """Accept clients on a Unix socket (`connect_device`) from a background thread."""
        Path(path).unlink(missing_ok=True)  # left by a device process that was killed
        listener = Listener(path, family="AF_UNIX", authkey=authkey)

        def accept() -> None:
            while True:
                try:
                    self.inbox.put((listener.accept(), _ATTACH))
                except (AuthenticationError, EOFError, OSError) as exc:
                    log.warning("device_client_refused", error=f"{type(exc).__name__}: {exc}")

        threading.Thread(target=accept, daemon=True).start()

    def run(self, forever: bool = False) -> None:
        """Serve until every client has closed. `forever`: clients come and go (a socket's), so serve until
        `stop_when_idle` is called, and then until every client has closed."""
        runner, inflight = self.runner, deque()
        self.forever = forever
        while self.forever or self.clients or inflight:
            if len(inflight) < self.depth:
                try:  # idle: wake now and then to see `forever` cleared
                    conn, msg = self.inbox.get(block=not inflight, timeout=0.5)
                except queue.Empty:
                    if not inflight:
                        continue
                    # nothing new: finish the oldest batch instead
                else:
                    if msg is _ATTACH:
                        self.attach(conn)
                    elif msg is _CLOSE:
                        self.clients -= 1
                    else:
                        inflight.append((conn, _guarded(lambda m=msg: runner.launch(runner.upload(m)))))
                    continue
            conn, launched = inflight.popleft()
            answer = launched if isinstance(launched, BaseException) else \
                _guarded(lambda x=launched: runner.host_links(runner.fetch(x)))
            try:
                conn.send(answer)
            except OSError:
                pass  # that client is gone; its reader thread reports the close

    def stop_when_idle(self) -> None:
        """Let `run` return once its clients have closed (safe in a signal handler: sets a flag only)."""
        self.forever = False


def connect_device(path: str, authkey: bytes, timeout_s: float = 600.0) -> Connection:
    """Connect to a device process's socket, waiting while it starts (loading a model takes a while)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return Client(path, family="AF_UNIX", authkey=authkey)
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() > deadline:
                raise DeviceLost(f"no device process answered on {path} within {timeout_s:.0f} s") from None
            time.sleep(0.2)


def _guarded(stage: Any) -> Any:
    """Run one device stage; a failure is the result, as an exception that pickles.

    Out of memory stays `torch.OutOfMemoryError` (cached memory freed first) so the client's engine
    splits the batch as it would locally; anything else becomes a `RuntimeError` naming it.
    """
    try:
        with torch.inference_mode():
            return stage()
    except torch.OutOfMemoryError as exc:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return torch.OutOfMemoryError(str(exc))
    except Exception as exc:  # noqa: BLE001 - answered to the client that sent the batch
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def _device_main(engine_kwargs: dict[str, Any], links: list[Connection], ready: Connection) -> None:
    from .engine import Engine

    device = torch.device(engine_kwargs.get("device", "cpu"))
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # Triton launches and new streams go to the current device
    engine = Engine(**engine_kwargs)
    ready.send(engine.runner.model.fast_path_status())
    ready.close()
    server = DeviceServer(engine)
    for link in links:
        server.attach(link)
    server.run()


def start_device_server(clients: int, **engine_kwargs: Any) -> tuple[mp.process.BaseProcess, list[Connection], dict]:
    """Start the device process (an `Engine(**engine_kwargs)` that serves `clients` clients).

    Returns the process, one connection per client (pass each to `Engine(device_link=...)` in its
    process) and the device engine's fast-path status, once its model is loaded.
    """
    ctx = mp.get_context("spawn")
    pairs = [ctx.Pipe() for _ in range(clients)]
    ready_recv, ready_send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_device_main, args=(engine_kwargs, [p[1] for p in pairs], ready_send), daemon=True)
    proc.start()
    for _, server_end in pairs:
        server_end.close()
    ready_send.close()
    try:
        status = ready_recv.recv()
    except EOFError:
        proc.join()
        raise RuntimeError(f"the device process exited with code {proc.exitcode} before loading the model") from None
    return proc, [p[0] for p in pairs], status
