"""One worker process per device, supervised: restart on crash with backoff, forward signals.

Each child sees only its own GPU (`CUDA_VISIBLE_DEVICES`) and joins the same consumer group, so
Kafka spreads partitions over them. A child that keeps crashing (more than `max_restarts` within
`window_s`) stops the whole set with a non-zero exit code, so an outer supervisor (systemd,
Kubernetes) sees the failure instead of a silent restart loop.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import structlog


@dataclass
class Child:
    index: int
    argv: list[str]
    env: dict[str, str]
    proc: subprocess.Popen | None = None
    restarts: deque[float] = field(default_factory=deque)
    next_start: float = 0.0

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, env=self.env)


def parse_gpus(spec: str, available: int) -> list[int]:
    """'all' → every GPU, 'N' → the first N, '0,2' (any list with a comma) → exactly those."""
    if spec == "all":
        chosen = list(range(available))
    elif "," in spec:
        chosen = [int(x) for x in spec.split(",") if x.strip()]
    else:
        chosen = list(range(int(spec)))
    bad = [g for g in chosen if g < 0 or g >= available]
    if bad or not chosen:
        raise ValueError(f"--gpus {spec!r}: GPUs {bad or chosen} not available ({available} visible)")
    return chosen


def default_workers_per_gpu(cpus: int, gpus: int, device_server: bool) -> int:
    """Workers per GPU when `--workers-per-gpu` is not given.

    A worker holding the model (no device process) holds its own copy, so one. With a device process
    the workers do host work only, and more of them keep the device fed: on a 16-core host with one
    H200, 8 workers ran NER 1.27x faster through a broker than 4 (BENCHMARKS.md run 19). About half
    the cores per GPU leaves the rest to the device process, Kafka's client threads and the OS.
    """
    if not device_server:
        return 1
    return max(1, min(8, cpus // (2 * max(1, gpus))))


class Supervisor:
    def __init__(self, argv_for: Sequence[list[str]], envs: Sequence[dict[str, str]], max_restarts: int = 5,
                 window_s: float = 300.0, backoff_s: float = 1.0, backoff_max_s: float = 30.0) -> None:
        self.children = [Child(i, list(a), dict(e)) for i, (a, e) in enumerate(zip(argv_for, envs))]
        self.max_restarts = max_restarts
        self.window_s = window_s
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.stopping = False
        self.log = structlog.get_logger().bind(role="supervisor")

    def _forward(self, signum: int, _frame: object) -> None:
        self.stopping = True
        for c in self.children:
            if c.proc is not None and c.proc.poll() is None:
                c.proc.send_signal(signum)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._forward)
        signal.signal(signal.SIGINT, self._forward)
        for c in self.children:
            c.start()
        self.log.info("supervisor_started", workers=len(self.children), pid=os.getpid())
        failed = False
        while True:
            alive = 0
            for c in self.children:
                code = c.proc.poll() if c.proc is not None else None
                if c.proc is not None and code is None:
                    alive += 1
                    continue
                if self.stopping or failed:
                    continue
                if c.proc is not None:  # it exited on its own: a crash, or a fatal Kafka error
                    now = time.monotonic()
                    c.restarts.append(now)
                    while c.restarts and now - c.restarts[0] > self.window_s:
                        c.restarts.popleft()
                    if len(c.restarts) > self.max_restarts:
                        self.log.error("worker_failing", worker=c.index, exit_code=code, restarts=len(c.restarts))
                        failed = True
                        self._forward(signal.SIGTERM, None)
                        continue
                    delay = min(self.backoff_max_s, self.backoff_s * 2 ** (len(c.restarts) - 1))
                    c.next_start = now + delay
                    c.proc = None
                    self.log.warning("worker_restarting", worker=c.index, exit_code=code, delay_s=delay)
                if time.monotonic() >= c.next_start:
                    c.start()
                    self.log.info("worker_restarted", worker=c.index, pid=c.proc.pid if c.proc else None)
                alive += 1
            if alive == 0:
                break
            time.sleep(0.2)
        codes = [c.proc.returncode if c.proc is not None else 0 for c in self.children]
        self.log.info("supervisor_stopped", exit_codes=codes, failed=failed)
        # A child stopped by the forwarded signal before it installed its handlers exits -SIGTERM.
        clean = (0, -signal.SIGTERM, -signal.SIGINT)
        return 1 if failed or any(code not in clean for code in codes) else 0
