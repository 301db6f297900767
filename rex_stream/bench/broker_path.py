"""The stream worker's end-to-end rate through a real Kafka broker, against the bare engine.

`python -m rex_stream.bench.broker_path --model DIR --workload ner --messages 20000 --gpus all
--workers 4 --device-server --out FILE` starts a local broker (`devbroker`), measures the
engine without Kafka first (one engine process, and the same host/device layout as the workers,
`multiproc.measure`), then runs `rex-stream run` with the given layout and times it end to end:
once the workers' group is stable with every worker holding partitions, and after a warm-up whose
results are awaited, the messages are produced at once, and the rate is their count over the time
from the first produce to the broker timestamp of the last result (results carry the worker's
produce time). Every message is checked to have a result. A second figure, the steady rate, counts
only the middle 80 % of the results (``steady_rate``): a short run's rate is pulled down by the
pipeline's fill and drain, which the engine runs have too, but not at the same size.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import Consumer, ConsumerGroupState, KafkaException, Producer
from confluent_kafka.admin import AdminClient

from ..devbroker import LocalBroker, create_topics
from .multiproc import WARMUP_MESSAGES, measure
from .report import emit
from .workloads import load_workload


def _gpu_count(spec: str) -> int:
    import torch

    from ..stream.supervisor import parse_gpus

    return len(parse_gpus(spec, torch.cuda.device_count()))


def _say(line: str) -> None:
    print(f"[broker_path {time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


def _produce(bootstrap: str, topic: str, items: list[tuple[str, dict]], start: int) -> float:
    """Produce messages with ids start, start+1, …; returns the wall time (ms) of the first send."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "batch.size": 1 << 20})
    first = time.time() * 1e3
    for k, (text, schema) in enumerate(items):
        while True:
            try:
                producer.produce(topic, orjson.dumps({"id": str(start + k), "text": text, "schema": schema}),
                                 key=str(start + k).encode())
                break
            except BufferError:
                producer.poll(0.05)
    producer.flush(60)
    return first


def _results(consumer: Consumer, ids: set[str], timeout: float, workers: subprocess.Popen) -> list[float]:
    """Read results until every id in `ids` has one; returns the sorted timestamps (ms) of their first results."""
    stamps: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    while ids and time.monotonic() < deadline:
        if workers.poll() is not None:
            raise RuntimeError(f"the workers exited with {workers.returncode} before all results came")
        for m in consumer.consume(1000, 0.5):
            if m.error() is None:
                key = orjson.loads(m.value())["id"]
                if key in ids:
                    ids.discard(key)
                    stamps[key] = float(m.timestamp()[1])
    if ids:
        raise TimeoutError(f"{len(ids)} results missing after {timeout:.0f} s")
    return sorted(stamps.values())


def steady_rate(stamps: list[float]) -> float | None:
    """Results per second between the 10th and the 90th percentile of their timestamps (ms): the
    rate once the pipeline is full, without its fill at the start and its drain at the end."""
    low, high = int(len(stamps) * 0.1), int(len(stamps) * 0.9)
    span = (stamps[high] - stamps[low]) / 1e3 if high < len(stamps) else 0.0
    return (high - low) / span if span > 0 else None


def _wait_for_group(bootstrap: str, group: str, members: int, workers: subprocess.Popen, timeout: float) -> None:
    """Wait until the workers' group is stable with every worker holding partitions, so the timed
    phase measures them all, not one worker alone and a rebalance (which the first GPU run did)."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if workers.poll() is not None:
            raise RuntimeError(f"the workers exited with {workers.returncode} before their group formed")
        try:
            described = admin.describe_consumer_groups([group])[group].result(10)
        except (KafkaException, FutureTimeout):
            # The group does not exist yet, or its coordinator is not ready (on a fresh broker the
            # offsets topic is created on first use, which took over 10 s on a loaded 2-core box).
            described = None
        if described is not None and described.state == ConsumerGroupState.STABLE and \
                len(described.members) == members and \
                all(m.assignment.topic_partitions for m in described.members):
            return
        time.sleep(0.5)
    raise TimeoutError(f"the group {group} did not become stable with {members} members in {timeout:.0f} s")


def run_worker_path(args: argparse.Namespace, warm: list[tuple[str, dict]], items: list[tuple[str, dict]],
                    work: Path) -> dict[str, Any]:
    """Start a broker and `rex-stream run`; returns the workers' messages/s over `items` after `warm`."""
    with LocalBroker() as broker:
        boot = broker.bootstrap
        topics = {name: f"bench-{name}-{uuid.uuid4().hex[:6]}" for name in ("in", "out", "dlq")}
        create_topics(boot, {topics["in"]: args.partitions, topics["out"]: args.partitions, topics["dlq"]: 1})
        layout = ["--gpus", args.gpus, "--workers-per-gpu", str(args.workers)] if args.gpus else \
            ["--device", args.device, "--workers", str(args.workers)]
        group = f"bench-{uuid.uuid4().hex[:6]}"
        cmd = [sys.executable, "-m", "rex_stream.cli", "run", "--bootstrap-servers", boot, "--input-topic",
               topics["in"], "--output-topic", topics["out"], "--dead-letter-topic", topics["dlq"], "--group-id",
               group, "--model", args.model, "--dtype", args.dtype, *layout,
               *(["--device-server"] if args.device_server else [])]
        log = args.log or work / "worker.log"
        env = os.environ | {"REX_MODEL__ENGINE_BATCH_TOKENS": str(args.batch_tokens),
                            "REX_MONITOR__STATS_INTERVAL_S": "5"}
        proc = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        consumer = Consumer({"bootstrap.servers": boot, "group.id": f"reader-{uuid.uuid4().hex[:6]}",
                             "auto.offset.reset": "earliest", "enable.auto.commit": False})
        consumer.subscribe([topics["out"]])
        try:
            _say(f"broker up at {boot}; workers started: {' '.join(layout)}")
            members = args.workers * (1 if not args.gpus else _gpu_count(args.gpus))
            _wait_for_group(boot, group, members, proc, args.timeout)
            _produce(boot, topics["in"], warm, 0)
            _results(consumer, {str(i) for i in range(len(warm))}, args.timeout, proc)
            _wait_for_group(boot, group, members, proc, args.timeout)
            _say(f"warm-up done ({len(warm)} messages); the group is stable with {members} workers")
            first = _produce(boot, topics["in"], items, len(warm))
            stamps = _results(consumer, {str(len(warm) + i) for i in range(len(items))}, args.timeout, proc)
        finally:
            consumer.close()
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(120)
    if code != 0:
        raise RuntimeError(f"the workers exited with {code}: {log.read_text()[-2000:]}")
    seconds = (stamps[-1] - first) / 1e3
    return {"msgs_s": len(items) / seconds, "seconds": seconds, "steady_msgs_s": steady_rate(stamps),
            "exit_code": code, "command": " ".join(cmd[1:])}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--workload", default="ner")
    p.add_argument("--messages", type=int, default=20_000)
    p.add_argument("--warmup", type=int, default=2_000)
    p.add_argument("--gpus", help="as for rex-stream run (all, a count, or a list like 0,2); without it: "
                                  "--device with --workers processes")
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=int, default=1, help="workers (per GPU with --gpus)")
    p.add_argument("--device-server", action="store_true")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--batch-tokens", type=int, default=131_072)
    p.add_argument("--partitions", type=int, default=8)
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--log", type=Path, help="keep the workers' log here")
    p.add_argument("--no-engine", action="store_true", help="time the workers only (no engine runs first)")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    shared = os.environ.get("REX_SHARED", "../shared")
    items = load_workload(args.workload, Path(shared), args.messages + args.warmup)
    device = "cuda" if args.gpus else args.device
    base = {"model": args.model, "workload": args.workload, "messages": args.messages, "device": device,
            "dtype": args.dtype, "batch_tokens": args.batch_tokens, "chunk": 100_000, "gpus": 1,
            "attention": "auto", "warmup": WARMUP_MESSAGES, "shared": shared}
    engine: dict[str, Any] = {"msgs_s": None}
    layout: dict[str, Any] = {"msgs_s": None}
    if not args.no_engine:
        engine = measure(1, base | {"device_server": False})
        _say(f"engine, one process: {engine['msgs_s']:.1f} msg/s")
        layout = measure(args.workers, base | {"device_server": args.device_server, "chunk": 5_000})
        _say(f"engine, {args.workers} processes{' + device process' if args.device_server else ''}: "
             f"{layout['msgs_s']:.1f} msg/s")
    with tempfile.TemporaryDirectory(prefix="rex-broker-bench-") as work:
        worker = run_worker_path(args, items[args.messages:], items[: args.messages], Path(work))
    result = {"workload": args.workload, "messages": args.messages, "layout": {
        "workers": args.workers, "device_server": args.device_server, "gpus": args.gpus, "device": device},
        "engine_one_process_msgs_s": engine["msgs_s"], "engine_same_layout_msgs_s": layout["msgs_s"],
        "worker_msgs_s": worker["msgs_s"], "worker_steady_msgs_s": worker["steady_msgs_s"], "worker": worker}
    for name, base_run in (("one_process", engine), ("same_layout", layout)):
        if base_run["msgs_s"]:
            result[f"worker_vs_engine_{name}"] = worker["msgs_s"] / base_run["msgs_s"]
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
