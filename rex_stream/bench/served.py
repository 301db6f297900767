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
import threading
import time
from pathlib import Path
from typing import Any

from ..engine.device_server import DeviceServer
from ..engine.engine import Engine
from ..engine.packing import Packed
from .baselines import PathRun, TimedRunner, engine_view, flops_fn, peak_memory, peak_memory_reset
from .multiproc import run_children


class _ArrivalTimedRunner(TimedRunner):
    """`TimedRunner` whose batch latency starts when a batch arrives here (its `started` was stamped
    by the host process that packed it)."""

    def upload(self, packed: Packed) -> Any:
        packed.started = time.perf_counter()
        return self.inner.upload(packed)


def served_path(engine: Engine, engine_kwargs: dict[str, Any], workload: str, shared: Path, messages: int,
                hosts: int, budget: int, keep: int, warm: int, chunk: int) -> PathRun:
    """Time `messages` of `workload` through `hosts` host processes served by `engine` in this process.

    The host processes (`multiproc`'s children) get `engine_kwargs` too (those that concern the
    device are unused there), so settings such as `admit_batches` or `batch_cost` apply on both
    sides of the bench."""
    runner = _ArrivalTimedRunner(engine.runner, flops_fn(engine))
    server = DeviceServer(engine_view(engine, runner=runner))
    pairs = [mp.get_context("spawn").Pipe() for _ in range(hosts)]
    for _, server_end in pairs:
        server.attach(server_end)
    device_thread = threading.Thread(target=server.run, name="bench-device", daemon=True)
    device_thread.start()
    args = {"workload": workload, "shared": str(shared), "messages": messages, "model": str(engine.model_dir),
            "device": "cpu", "gpus": 1, "dtype": engine.dtype, "batch_tokens": budget, "attention": "auto",
            "engine_kwargs": engine_kwargs, "warmup": max(1, warm // hosts), "chunk": max(1, chunk), "keep": keep}

    def started() -> None:  # the warm-up's batches are all answered: time from here
        runner.records.clear()
        peak_memory_reset(engine.device)

    try:
        got, seconds = run_children(hosts, args, [client_end for client_end, _ in pairs], started)
    finally:
        device_thread.join(timeout=60)  # returns once every host's connection has closed
    kept = sorted((pair for g in got for pair in g[7]), key=lambda pair: pair[0])
    return PathRun("engine", sum(g[1] for g in got), seconds, list(runner.records), [o for _, o in kept],
                   peak_memory(engine.device),
                   {"dtype": engine.dtype, "budget": budget, "max_batch": engine.max_batch, "batch_cost": got[0][6],
                    "host_processes": hosts, "host_chunk": args["chunk"]})

