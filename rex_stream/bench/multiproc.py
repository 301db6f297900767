"""Engine throughput with several processes sharing one GPU (or one process per GPU).

The engine's per-message CPU work (tokenising, decoding, Python bookkeeping) runs on one core per
process; with short texts that, not the GPU, is the limit. Several processes per GPU spread it
over the host's cores while their batches share the card — the same layout as
`rex-stream run --gpus all --workers-per-gpu N`.

`python -m rex_stream.bench.multiproc --model DIR --workload ner --procs 1,2,4,8`
All processes load the model, warm up, then start together on one signal; the rate is all
messages over the slowest process's time. With `--device-server` the processes do the host work
only and one device process per GPU (`engine.device_server`) runs every batch on its GPU.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .report import write_json

WARMUP_MESSAGES = 128  # each process's untimed run before the start, unless told otherwise
_TIMEOUT_S = 1800.0


def _device(args: dict[str, Any], rank: int) -> str:
    """Where rank `rank`'s model runs: GPU rank % gpus on CUDA, else `args["device"]`."""
    return f"cuda:{rank % args['gpus']}" if args["device"] == "cuda" else args["device"]


def _child(rank: int, procs: int, args: dict[str, Any], link: Any, go: Any, results: Any) -> None:
    """One process of a layout: every `procs`-th message of the workload, warmed up, then timed from `go`.

    Puts its rank once warmed up, then (rank, messages, seconds, forwards, real tokens, padded tokens,
    batch cost, the outcomes of its messages with index < `args["keep"]` as (index, outcome))."""
    import torch

    from ..engine.engine import Engine
    from .workloads import load_workload

    if args["gpus"] > 1 and args["device"] == "cuda":
        torch.cuda.set_device(rank % args["gpus"])
    items = load_workload(args["workload"], args["shared"], args["messages"])[rank::procs]
    device = _device(args, rank)
    kwargs = {"attention": args["attention"], "batch_cost": args.get("batch_cost"), **args.get("engine_kwargs", {})}
    engine = Engine(args["model"], device=device, dtype=args["dtype"], batch_tokens=args["batch_tokens"],
                    device_link=link, **kwargs)
    engine.infer(items[:args["warmup"]])
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    results.put(rank)
    go.wait(timeout=_TIMEOUT_S)
    start = time.perf_counter()
    chunk, keep, kept = args["chunk"], args.get("keep", 0), []
    for i in range(0, len(items), chunk):
        outcomes = engine.infer(items[i:i + chunk])
        kept += [(rank + procs * (i + j), o) for j, o in enumerate(outcomes) if rank + procs * (i + j) < keep]
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    stats = engine.stats  # the warm-up's counts included
    if link is not None:
        engine.runner.close()
    results.put((rank, len(items), seconds, stats.forwards, stats.real_tokens, stats.padded_tokens,
                 engine.batch_cost, kept))


def run_children(procs: int, args: dict[str, Any], links: list[Any],
                 started: Callable[[], None] = lambda: None) -> tuple[list[tuple], float]:
    """Start `procs` `_child` processes (`links[r]`: rank r's device link, or None), wait until all
    have warmed up, call `started`, let them go, and collect their results.

    Returns the results by rank and the seconds from the go to the last result. A child that dies
    stops this at once (RuntimeError) instead of leaving it waiting, and every child is gone on return.
    """
    ctx = mp.get_context("spawn")
    go, results = ctx.Event(), ctx.Queue()
    children = [ctx.Process(target=_child, args=(r, procs, args, links[r], go, results), daemon=True)
                for r in range(procs)]
    for child in children:
        child.start()
    for link in links:
        if link is not None:
            link.close()  # the children hold their own copies
    got: list[tuple] = []
    try:
        _gather(results, children)  # every child warmed up
        started()
        start = time.perf_counter()
        go.set()
        got = _gather(results, children)
        seconds = time.perf_counter() - start
    finally:
        for child in children:  # after a failure, at once: the others would wait for a go that never comes
            child.join(timeout=60 if got else 0)
            if child.is_alive():
                child.kill()
    return sorted(got), seconds


def _gather(results: Any, children: list[Any]) -> list[Any]:
    """One message from every child; a child that dies first stops the run instead of hanging it."""
    got: list[Any] = []
    deadline = time.monotonic() + _TIMEOUT_S
    while len(got) < len(children):
        try:
            got.append(results.get(timeout=1.0))
        except queue.Empty:
            dead = [c.exitcode for c in children if c.exitcode not in (None, 0)]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"child processes failed (exit codes {dead}) or timed out") from None
    return got


def measure(procs: int, args: dict[str, Any]) -> dict[str, Any]:
    servers, links = [], [None] * procs
    if args["device_server"]:  # one device process per GPU, serving the ranks r with r % gpus == its GPU
        from ..engine.device_server import start_device_server

        for g in range(min(args["gpus"], procs)):
            ranks = range(g, procs, args["gpus"])
            server, server_links, _ = start_device_server(len(ranks), model=args["model"], device=_device(args, g),
                                                          dtype=args["dtype"], attention=args["attention"])
            servers.append(server)
            for r, link in zip(ranks, server_links):
                links[r] = link
    got, _ = run_children(procs, args, links)
    for server in servers:
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
                   help="one process per GPU owns it; the --procs processes only do the host work")
    p.add_argument("--batch-cost", type=int, default=None, help="planner cost per batch, in padded tokens (default: the engine's)")
    p.add_argument("--out", type=Path)
    a = p.parse_args()
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
