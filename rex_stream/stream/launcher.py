"""`rex-stream run`: settings → one worker in this process, or a supervised set of them."""

from __future__ import annotations

import os
import sys
from typing import Any

from ..config import Settings, load_settings, redacted
from ..logs import configure
from .supervisor import Supervisor, parse_gpus


def settings_from_args(args: Any) -> Settings:
    overrides: dict[str, Any] = {}

    def put(section: str, key: str, value: Any) -> None:
        if value is not None:
            overrides.setdefault(section, {})[key] = value

    put("kafka", "bootstrap_servers", args.bootstrap_servers)
    put("topics", "input", args.input_topic)
    put("topics", "output", args.output_topic)
    put("topics", "dead_letter", args.dead_letter_topic)
    put("consumer", "group_id", args.group_id)
    put("model", "name", args.model_name)
    put("model", "device", args.device)
    put("model", "dtype", args.dtype)
    put("delivery", "mode", args.delivery)
    return load_settings(args.config, overrides)


def _child_argv() -> list[str]:
    """This command line without --gpus/--workers, for the children."""
    argv, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
            continue
        if arg in ("--gpus", "--workers", "--workers-per-gpu"):
            skip = True
            continue
        if arg.startswith(("--gpus=", "--workers=", "--workers-per-gpu=")):
            continue
        argv.append(arg)
    return [sys.executable, "-m", "rex_stream.cli", *argv]


def main(args: Any) -> int:
    settings = settings_from_args(args)
    log = configure(settings.monitor.log_level)
    if args.gpus or (args.workers and args.workers > 1):
        if args.gpus:
            import torch

            devices = parse_gpus(args.gpus, torch.cuda.device_count()) * max(1, args.workers_per_gpu)
            envs = [child_env(settings, i) | {"CUDA_VISIBLE_DEVICES": str(g), "REX_MODEL__DEVICE": "cuda"}
                    for i, g in enumerate(devices)]
        else:
            envs = [child_env(settings, i) for i in range(args.workers)]
        argv = _child_argv()
        return Supervisor([argv] * len(envs), envs).run()
    return run_worker(settings, log)


def child_env(settings: Settings, index: int) -> dict[str, str]:
    """Per-child settings that must differ: worker index, HTTP port, static id, heartbeat file."""
    env = dict(os.environ) | {"REX_WORKER_INDEX": str(index)}
    mon, consumer = settings.monitor, settings.consumer
    if mon.http_port:
        env["REX_MONITOR__HTTP_PORT"] = str(mon.http_port + index)
    if mon.heartbeat_file:
        env["REX_MONITOR__HEARTBEAT_FILE"] = f"{mon.heartbeat_file}.{index}"
    if consumer.group_instance_id:
        env["REX_CONSUMER__GROUP_INSTANCE_ID"] = f"{consumer.group_instance_id}-{index}"
    return env


def run_worker(settings: Settings, log: Any) -> int:
    """Load the model and run one worker until it is stopped."""
    from ..engine.engine import Engine
    from .worker import Worker, worker_id_from_env

    worker_id = worker_id_from_env()
    log = log.bind(worker=worker_id)
    log.info("config", settings=redacted(settings))
    metrics = health = server = None
    if settings.monitor.http_port is not None or settings.monitor.heartbeat_file:
        from ..ops.health import HealthState, serve
        from ..ops.metrics import WorkerMetrics

        metrics = WorkerMetrics(worker_id)
        health = HealthState.from_settings(settings.monitor)
        if settings.monitor.http_port is not None:
            server = serve(settings.monitor.http_port, health, metrics)
    engine = Engine(settings.model.name, device=settings.model.device, dtype=settings.model.dtype,
                    batch_tokens=settings.model.engine_batch_tokens, limits=settings.limits.engine_limits(),
                    cache_dir=settings.model.cache_dir, attention=settings.model.attention,
                    compile_encoder=settings.model.compile, fusions=frozenset(settings.model.fusions))
    worker = Worker(settings, engine, worker_id, metrics=metrics, health=health)
    worker.install_signal_handlers()
    try:
        return worker.run()
    finally:
        if server is not None:
            server.shutdown()
