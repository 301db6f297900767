"""The worker's per-message path without a broker, against the bare engine, in one process.

Where no Kafka broker can run next to the GPU (the benchmark machine has no Java), this measures
everything the worker adds on top of the engine except the network: message decoding and
validation from raw bytes, size/token/time-bounded batching, inference on a background thread
while the next batch fills (as `Worker` does), and building the keyed JSON result records.

`python -m rex_stream.bench.worker_path --model DIR --workload ner --messages 20000 --device cuda`
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import orjson
import torch

from ..config import LimitSettings
from ..engine.engine import Engine
from ..stream.batcher import Accumulator, BatchPolicy, estimate_tokens
from ..stream.messages import Source, decode, result_record
from .report import write_json
from .workloads import load_workload


def _sources(items: list[tuple[str, dict]]) -> list[Source]:
    now = int(time.time() * 1000)
    return [Source("in", i % 12, i, str(i).encode(), orjson.dumps({"id": i, "text": t, "schema": s}), (), now)
            for i, (t, s) in enumerate(items)]


def run_worker_path(engine: Engine, sources: list[Source], policy: BatchPolicy) -> float:
    """Messages/s through decode → batches → engine (overlapped) → result records."""
    limits = LimitSettings()
    acc: Accumulator = Accumulator(policy, time.monotonic)
    pool = ThreadPoolExecutor(1)
    inflight = None
    produced = 0
    start = time.perf_counter()

    def finish(flight) -> int:
        jobs, future = flight
        outcomes = future.result()
        records = [result_record(j, o.output, "out", {"name": "bench"}, 0) for j, o in zip(jobs, outcomes)]
        return len(records)

    def submit() -> None:
        """Start the next batch, after collecting the one in flight (one batch on the device at a time)."""
        nonlocal inflight, produced
        batch = acc.take()
        if inflight is not None:
            produced += finish(inflight)
        inflight = (batch, pool.submit(engine.run_requests, [j.request for j in batch]))

    for src in sources:
        job = decode(src, limits, engine.limits, None)
        acc.add(job, estimate_tokens(job.request))
        if len(acc) >= policy.max_messages:
            submit()
    while len(acc):
        submit()
    if inflight is not None:
        produced += finish(inflight)
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    pool.shutdown()
    assert produced == len(sources)
    return len(sources) / elapsed


def run_engine(engine: Engine, items: list[tuple[str, dict]], chunk: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(items), chunk):
        engine.infer(items[i:i + chunk])
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    return len(items) / (time.perf_counter() - start)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--workload", default="ner")
    p.add_argument("--messages", type=int, default=20_000)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--batch-messages", type=int, default=2048)
    p.add_argument("--batch-tokens", type=int, default=65536)
    p.add_argument("--attention", default="auto", help="engine attention path (auto, sdpa, flex, triton)")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    shared = Path(os.environ.get("REX_SHARED", "../shared"))
    items = load_workload(args.workload, shared, args.messages)
    engine = Engine(args.model, device=args.device, dtype=args.dtype, batch_tokens=args.batch_tokens,
                    attention=args.attention)
    engine.infer(items[:256])  # warm-up
    policy = BatchPolicy(args.batch_messages, 10**9, 1000)
    engine_rate = run_engine(engine, items, args.batch_messages)
    worker_rate = run_worker_path(engine, _sources(items), policy)
    result = {"workload": args.workload, "messages": len(items), "device": torch.cuda.get_device_name()
              if engine.device.type == "cuda" else "cpu", "dtype": args.dtype, "attention": engine.runner.model.attention,
              "batch_messages": args.batch_messages,
              "engine_msgs_s": engine_rate, "worker_path_msgs_s": worker_rate, "ratio": worker_rate / engine_rate,
              "date": time.strftime("%Y-%m-%d", time.gmtime())}
    print(json.dumps(result, indent=1))
    if args.out:
        write_json(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
