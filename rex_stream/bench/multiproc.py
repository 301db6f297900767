"""Engine throughput with several processes sharing one GPU (or one process per GPU).

The engine's per-message CPU work (tokenising, decoding, Python bookkeeping) runs on one core per
process; with short texts that, not the GPU, is the limit. Several processes per GPU spread it
over the host's cores while their batches share the card — the same layout as
`rex-stream run --gpus all --workers-per-gpu N`.

`python -m rex_stream.bench.multiproc --model DIR --workload ner --procs 1,2,4,8`
All processes load the model, warm up, then start together at a barrier; the rate is all
messages over the slowest process's time. With `--device-server` the processes do the host work
only and one device process (`engine.device_server`) runs every batch on the one GPU.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time
from pathlib import Path
from typing import Any

from .report import write_json

WARMUP_MESSAGES = 128  # each process's untimed run before the barrier, unless told otherwise


def _child(rank: int, procs: int, args: dict[str, Any], barrier: Any, results: Any, link: Any) -> None:
    import torch

    from ..engine.engine import Engine
    from .workloads import load_workload

    if args["gpus"] > 1:
        torch.cuda.set_device(rank % args["gpus"])
    items = load_workload(args["workload"], args["shared"], args["messages"])[rank::procs]
    device = f"cuda:{rank % args['gpus']}" if args["device"] == "cuda" else args["device"]
    engine = Engine(args["model"], device=device, dtype=args["dtype"], batch_tokens=args["batch_tokens"],
                    attention=args["attention"], device_link=link, batch_cost=args.get("batch_cost"))
    engine.infer(items[:args["warmup"]])
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    barrier.wait()
    start = time.perf_counter()
    chunk = args["chunk"]
    for i in range(0, len(items), chunk):
        engine.infer(items[i:i + chunk])
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    stats = engine.stats  # the warm-up's counts included
    results.put((rank, len(items), time.perf_counter() - start, stats.forwards, stats.real_tokens, stats.padded_tokens))
    if link is not None:
        engine.runner.close()


def measure(procs: int, args: dict[str, Any]) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(procs)
    results = ctx.Queue()
    server, links = None, [None] * procs
    if args["device_server"]:
        from ..engine.device_server import start_device_server

        server, links, _ = start_device_server(procs, model=args["model"], device=args["device"], dtype=args["dtype"],
                                               attention=args["attention"])
    children = [ctx.Process(target=_child, args=(r, procs, args, barrier, results, links[r])) for r in range(procs)]
    for c in children:
        c.start()
    got = [results.get(timeout=1800) for _ in children]
    for c in children:
        c.join()
    if server is not None:
        server.join(timeout=60)
    messages = sum(g[1] for g in got)
    slowest = max(g[2] for g in got)
    return {"procs": procs, "messages": messages, "seconds": slowest, "msgs_s": messages / slowest,
            "forwards": sum(g[3] for g in got), "padding": 1 - sum(g[4] for g in got) / max(1, sum(g[5] for g in got))}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--workload", default="ner")
    p.add_argument("--messages", type=int, default=20_000)
    p.add_argument("--procs", default="1,2,4,8")
    p.add_argument("--gpus", type=int, default=1, help="processes are spread over this many GPUs")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--batch-tokens", type=int, default=65536)
    p.add_argument("--attention", default="auto", help="engine attention path (auto, sdpa, flex, triton)")
    p.add_argument("--chunk", type=int, default=2048, help="messages per engine.infer call")
    p.add_argument("--warmup", type=int, default=WARMUP_MESSAGES, help="messages each process runs before the timed pass")
    p.add_argument("--device-server", action="store_true",
                   help="one process owns the GPU; the --procs processes only do the host work")
    p.add_argument("--batch-cost", type=int, default=None, help="planner cost per batch, in padded tokens (default: the engine's)")
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    if a.device_server and a.gpus > 1:
        p.error("--device-server runs one device process: use it with --gpus 1")
    args = {"model": a.model, "workload": a.workload, "messages": a.messages, "device": a.device, "dtype": a.dtype,
            "batch_tokens": a.batch_tokens, "chunk": a.chunk, "gpus": a.gpus, "attention": a.attention,
            "device_server": a.device_server, "warmup": a.warmup, "batch_cost": a.batch_cost, "shared": os.environ.get("REX_SHARED", "../shared")}
    rows = [measure(int(n), args) for n in a.procs.split(",")]
    base = rows[0]["msgs_s"]
    for row in rows:
        row["speedup_vs_first"] = row["msgs_s"] / base
        print(f"{row['procs']:>3} processes: {row['msgs_s']:9.1f} msg/s ({row['speedup_vs_first']:.2f}x)", flush=True)
    import torch

    result = {"workload": a.workload, "gpus": a.gpus, "device_server": a.device_server, "dtype": a.dtype,
              "batch_cost": a.batch_cost, "chunk": a.chunk,
              "attention": a.attention, "rows": rows,
              "device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu",
              "cpu_cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d", time.gmtime())}
    if a.out:
        write_json(result, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
