"""The worker's per-message path without a broker, against the bare engine, in one process.

Where no Kafka broker can run next to the GPU (the benchmark machine has no Java), this measures
everything the worker adds on top of the engine except the network: message decoding and
validation from raw bytes, size/token/time-bounded batches handed to the engine server with up to
`--in-flight` of them unfinished (as `Worker` does), and building the keyed JSON result records.
The engine's own rate is measured on the whole workload in one call (as `rex-stream bench` runs
it) and, for reference, in calls of one worker batch each (the worker's path before the server).

`python -m rex_stream.bench.worker_path --model DIR --workload ner --messages 20000 --device cuda`
"""

from __future__ import annotations

import argparse
import os
import time
from collections import deque
from pathlib import Path
from typing import Any

import orjson
import torch

from ..config import BatchSettings, LimitSettings, ModelSettings
from ..engine.engine import Engine
from ..engine.server import EngineServer
from ..stream.batcher import Accumulator, BatchPolicy, estimate_tokens
from ..stream.messages import Source, decode, result_record
from .report import emit
from .workloads import load_workload


def _sources(items: list[tuple[str, dict]]) -> list[Source]:
    now = int(time.time() * 1000)
    return [Source("in", i % 12, i, str(i).encode(), orjson.dumps({"id": i, "text": t, "schema": s}), (), now)
            for i, (t, s) in enumerate(items)]


def run_worker_path(engine: Engine, sources: list[Source], policy: BatchPolicy, in_flight: int) -> float:
    """Messages/s through decode → batches → engine server (up to `in_flight` batches) → records."""
    limits = LimitSettings()
    acc: Accumulator = Accumulator(policy, time.monotonic)
    server = EngineServer(engine)
    flights: deque = deque()
    produced = 0
    start = time.perf_counter()

    def complete() -> int:
        jobs, future = flights.popleft()
        records = [result_record(j, o.output, "out", {"name": "bench"}, 0) for j, o in zip(jobs, future.result())]
        return len(records)

    def submit() -> None:
        """Hand the next batch over; at the in-flight limit, first wait for the oldest (as `Worker` does)."""
        nonlocal produced
        while flights and (flights[0][1].done() or len(flights) >= in_flight):
            produced += complete()
        batch = acc.take()
        flights.append((batch, server.submit([j.request for j in batch])))

    for src in sources:
        job = decode(src, limits, engine.limits, None)
        acc.add(job, estimate_tokens(job.request))
        if len(acc) >= policy.max_messages:
            submit()
    while len(acc):
        submit()
    while flights:
        produced += complete()
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    server.close()
    assert produced == len(sources)
    return len(sources) / elapsed


def run_engine(engine: Engine, items: list[tuple[str, dict]], chunk: int) -> float:
    """Messages/s of the bare engine over `items` in `infer` calls of `chunk` messages."""
    start = time.perf_counter()
    for i in range(0, len(items), chunk):
        engine.infer(items[i:i + chunk])
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    return len(items) / (time.perf_counter() - start)


def engine_ab_pass(engine: Engine, items: list[tuple[str, dict]]) -> dict[str, Any]:
    """One variant's turn in a same-process A/B on a GPU: messages/s of two whole-workload passes, and
    the summed kernel time (all kernels, and the fused attention's) of one profiled pass of up to
    4,096 messages, per 1,000 messages. The caller warms the variant up first."""
    from torch.profiler import ProfilerActivity, profile

    rates = [round(run_engine(engine, items, len(items)), 1) for _ in range(2)]
    profiled = min(4096, len(items))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        engine.infer(items[:profiled])
        torch.cuda.synchronize()
    events = prof.key_averages()
    kernel_ms = sum(e.self_device_time_total for e in events) / 1e3
    attention_ms = sum(e.self_device_time_total for e in events if e.key == "_disentangled_fwd") / 1e3
    return {"messages": len(items), "msgs_s": rates,
            "kernel_ms_per_1000_msgs": round(kernel_ms * 1000 / profiled, 2),
            "attention_ms_per_1000_msgs": round(attention_ms * 1000 / profiled, 2)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--workload", default="ner")
    p.add_argument("--messages", type=int, default=20_000)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--batch-messages", type=int, default=BatchSettings().max_messages)
    p.add_argument("--in-flight", type=int, default=BatchSettings().max_in_flight)
    p.add_argument("--batch-tokens", type=int, default=ModelSettings().engine_batch_tokens)
    p.add_argument("--attention", default="auto", help="engine attention path (auto, sdpa, flex, triton)")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    shared = Path(os.environ.get("REX_SHARED", "../shared"))
    items = load_workload(args.workload, shared, args.messages)
    engine = Engine(args.model, device=args.device, dtype=args.dtype, batch_tokens=args.batch_tokens,
                    attention=args.attention)
    engine.infer(items[:256])  # warm-up
    policy = BatchPolicy(args.batch_messages, 10**9, 1000)
    engine_rate = run_engine(engine, items, len(items))
    chunked_rate = run_engine(engine, items, args.batch_messages)
    worker_rate = run_worker_path(engine, _sources(items), policy, args.in_flight)
    result = {"workload": args.workload, "messages": len(items), "device": torch.cuda.get_device_name()
              if engine.device.type == "cuda" else "cpu", "dtype": args.dtype, "attention": engine.runner.model.attention,
              "batch_messages": args.batch_messages, "in_flight": args.in_flight,
              "engine_msgs_s": engine_rate, "engine_per_batch_msgs_s": chunked_rate, "worker_path_msgs_s": worker_rate,
              "ratio": worker_rate / engine_rate}
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
