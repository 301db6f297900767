"""Path (c) in the layout of `rex-stream run --device-server`, with the bench process as the device.

One process's engine is host-bound on `mix` and `ner` (schema walk, tokenising and decoding share
one interpreter lock with the device work). The product's answer is several host processes feeding
one process that owns the model (`engine.device_server`). Here that one process is the bench
itself: its engine serves `hosts` spawned host processes from a thread, so (a), (b) and this (c)
run on the same card, the same model object and the same CUDA context, as the bench promises.

Each host process takes every `hosts`-th message and warms up on the first `warm / hosts` of its
share (the one-process pass's warm-up, shared out). It then says so, waits for the bench's go, and
runs its share in calls of `chunk` messages, so the device is fed before a host has walked its
whole share. The time runs from the go to the last host's answer. Batches are recorded in the
device thread as in the one-process pass; their latency runs from the batch's arrival in this
process to its links on the host.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import threading
import time
from pathlib import Path
from typing import Any

from ..engine.device_server import DeviceServer
from ..engine.engine import Engine, Outcome
from ..engine.packing import Packed
from .baselines import PathRun, TimedRunner, engine_view, flops_fn, sync, peak_memory, peak_memory_reset
from .workloads import load_workload

_TIMEOUT_S = 1800.0


class _ArrivalTimedRunner(TimedRunner):
    """`TimedRunner` whose batch latency starts when a batch arrives here (its `started` was stamped
    by the host process that packed it)."""

    def upload(self, packed: Packed) -> Any:
        packed.started = time.perf_counter()
        return self.inner.upload(packed)


def _host(rank: int, hosts: int, spec: dict[str, Any], link: Any, go: Any, results: Any) -> None:
    """One host process: an engine without a model, fed its share of the workload."""
    items = load_workload(spec["workload"], Path(spec["shared"]), spec["messages"])[rank::hosts]
    engine = Engine(spec["model"], dtype=spec["dtype"], batch_tokens=spec["budget"], device_link=link,
                    **spec["engine_kwargs"])
    engine.infer(items[:spec["warm"]])
    results.put(rank)
    go.wait(timeout=_TIMEOUT_S)
    outcomes: list[Outcome] = []
    for i in range(0, len(items), spec["chunk"]):
        outcomes.extend(engine.infer(items[i:i + spec["chunk"]]))
    engine.runner.close()
    kept = [(rank + hosts * j, outcome) for j, outcome in enumerate(outcomes) if rank + hosts * j < spec["keep"]]
    results.put((rank, len(items), kept, engine.batch_cost))


def served_path(engine: Engine, engine_kwargs: dict[str, Any], workload: str, shared: Path, messages: int,
                hosts: int, budget: int, keep: int, warm: int, chunk: int) -> PathRun:
    """Time `messages` of `workload` through `hosts` host processes served by `engine` in this process.

    The host processes' engines get `engine_kwargs` too (those that concern the device are unused
    there), so settings such as `admit_batches` or `batch_cost` apply on both sides of the bench."""
    runner = _ArrivalTimedRunner(engine.runner, flops_fn(engine))
    server = DeviceServer(engine_view(engine, runner=runner))
    ctx = mp.get_context("spawn")
    pairs = [ctx.Pipe() for _ in range(hosts)]
    for _, server_end in pairs:
        server.attach(server_end)
    device_thread = threading.Thread(target=server.run, name="bench-device", daemon=True)
    device_thread.start()
    go, results = ctx.Event(), ctx.Queue()
    spec = {"workload": workload, "shared": str(shared), "messages": messages, "model": str(engine.model_dir),
            "dtype": engine.dtype, "budget": budget, "engine_kwargs": engine_kwargs, "warm": max(1, warm // hosts),
            "chunk": max(1, chunk), "keep": keep}
    procs = [ctx.Process(target=_host, args=(r, hosts, spec, pairs[r][0], go, results), daemon=True)
             for r in range(hosts)]
    for proc in procs:
        proc.start()
    for client_end, _ in pairs:
        client_end.close()  # the host processes hold their own copies
    got: list[Any] = []
    try:
        _gather(results, procs)  # every host warmed up (and has all its warm-up answers)
        runner.records.clear()
        peak_memory_reset(engine.device)
        start = time.perf_counter()
        go.set()
        got = _gather(results, procs)
        sync(engine.device)
        seconds = time.perf_counter() - start
    finally:
        for proc in procs:  # after a failure, at once: the others would wait for a go that never comes
            proc.join(timeout=60 if got else 0)
            if proc.is_alive():
                proc.kill()
        device_thread.join(timeout=60)  # returns once every host's connection has closed
    kept = sorted((pair for g in got for pair in g[2]), key=lambda pair: pair[0])
    return PathRun("engine", sum(g[1] for g in got), seconds, list(runner.records), [o for _, o in kept],
                   peak_memory(engine.device),
                   {"dtype": engine.dtype, "budget": budget, "max_batch": engine.max_batch, "batch_cost": got[0][3],
                    "host_processes": hosts, "host_chunk": spec["chunk"]})


def _gather(results: Any, procs: list[Any]) -> list[Any]:
    """One message from every host process; a host that dies first stops the pass instead of hanging it."""
    got: list[Any] = []
    deadline = time.monotonic() + _TIMEOUT_S
    while len(got) < len(procs):
        try:
            got.append(results.get(timeout=1.0))
        except queue.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"host processes failed (exit codes {dead}) or timed out") from None
    return got


def parse_hosts(text: str) -> list[int]:
    """`--host-processes`: a comma-separated list of counts; 0 is the one-process engine."""
    counts = [int(c) for c in str(text).replace(" ", "").split(",") if c]
    if not counts or any(c < 0 for c in counts):
        raise ValueError(f"--host-processes needs counts >= 0, got {text!r}")
    return counts
