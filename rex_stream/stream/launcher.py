"""`rex-stream run`: settings → one worker in this process, or a supervised set of them."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import sys
import tempfile
from typing import Any

from ..config import Settings, load_settings, redacted
from ..logs import configure
from .supervisor import Supervisor, default_workers_per_gpu, parse_gpus


def settings_from_args(args: Any) -> Settings:
    overrides: dict[str, Any] = {}

    def put(section: str, key: str, value: Any) -> None:
        if value is not None:
            overrides.setdefault(section, {})[key] = value

    for section, key, flag in (("kafka", "bootstrap_servers", "bootstrap_servers"), ("topics", "input", "input_topic"),
                               ("topics", "output", "output_topic"), ("topics", "dead_letter", "dead_letter_topic"),
                               ("consumer", "group_id", "group_id"), ("model", "name", "model_name"),
                               ("model", "device", "device"), ("model", "dtype", "dtype"),
                               ("delivery", "mode", "delivery")):
        put(section, key, getattr(args, flag))
    return load_settings(args.config, overrides)


def _child_argv(command: str) -> list[str]:
    """This `run` command line as `command` (run, device-server) without the launcher's own flags."""
    argv, skip = [], False
    for arg in sys.argv[2:]:
        if skip:
            skip = False
            continue
        if arg in ("--gpus", "--workers", "--workers-per-gpu"):
            skip = True
            continue
        if arg.startswith(("--gpus=", "--workers=", "--workers-per-gpu=")) or arg == "--device-server":
            continue
        argv.append(arg)
    return [sys.executable, "-m", "rex_stream.cli", command, *argv]


def main(args: Any) -> int:
    settings = settings_from_args(args)
    log = configure(settings.monitor.log_level)
    if not (args.gpus or (args.workers and args.workers > 1) or args.device_server):
        return run_worker(settings, log)
    # Device groups: per GPU, or one group of CPU workers; each with its workers (and device process).
    if args.gpus:
        import torch

        groups = [(str(g), {"CUDA_VISIBLE_DEVICES": str(g), "REX_MODEL__DEVICE": "cuda"})
                  for g in parse_gpus(args.gpus, torch.cuda.device_count())]
        per_group = args.workers_per_gpu or default_workers_per_gpu(
            len(os.sched_getaffinity(0)), len(groups), args.device_server)
    else:
        groups, per_group = [("cpu", {})], max(1, args.workers or 1)
    argv: list[list[str]] = []
    envs: list[dict[str, str]] = []
    sockets = tempfile.mkdtemp(prefix="rex-device-") if args.device_server else None  # mode 0700
    authkey = secrets.token_hex(16)
    workers = 0
    for name, device_env in groups:
        extra = dict(device_env)
        if sockets is not None:
            extra |= {"REX_MODEL__DEVICE_SOCKET": os.path.join(sockets, f"{name}.sock"),
                      "REX_MODEL__DEVICE_AUTHKEY": authkey}
            argv.append(_child_argv("device-server"))
            envs.append(dict(os.environ) | extra)
        for _ in range(per_group):
            argv.append(_child_argv("run"))
            envs.append(child_env(settings, workers) | extra)
            workers += 1
    try:
        return Supervisor(argv, envs).run()
    finally:
        if sockets is not None:
            shutil.rmtree(sockets, ignore_errors=True)


def device_server_main(args: Any) -> int:
    """`rex-stream device-server`: load the model and serve the workers on `model.device_socket`."""
    from ..engine.device_server import DeviceServer

    settings = settings_from_args(args)
    log = configure(settings.monitor.log_level).bind(role="device")
    m = settings.model
    if not m.device_socket or m.device_authkey is None:
        log.error("device_server_unconfigured", reason="model.device_socket and model.device_authkey are required")
        return 2
    server = DeviceServer(_engine(settings, remote=False))
    server.listen(m.device_socket, m.device_authkey.get_secret_value().encode())
    # Stopping: keep serving until the workers (stopped by the same signal) have drained and closed.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: server.stop_when_idle())
    log.info("device_server_started", socket=m.device_socket, device=m.device, dtype=m.dtype,
             fast_path=server.runner.model.fast_path_status())
    server.run(forever=True)
    log.info("device_server_stopped")
    return 0


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


def _engine(settings: Settings, remote: bool) -> Any:
    """The engine of a worker or of a device process; `remote`: host-only, the model runs in the
    device process on `model.device_socket`."""
    from ..engine.device_server import connect_device
    from ..engine.engine import Engine

    m = settings.model
    link = None
    if remote:
        if not m.device_socket or m.device_authkey is None:
            raise ValueError("model.device_socket and model.device_authkey are both required")
        link = connect_device(m.device_socket, m.device_authkey.get_secret_value().encode())
    return Engine(m.name, device=m.device, dtype=m.dtype, batch_tokens=m.engine_batch_tokens,
                  limits=settings.limits.engine_limits(), cache_dir=m.cache_dir, attention=m.attention,
                  compile_encoder=m.compile, fusions=frozenset(m.fusions), device_link=link)


def run_worker(settings: Settings, log: Any) -> int:
    """Load the model and run one worker until it is stopped."""
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
    worker = Worker(settings, _engine(settings, remote=settings.model.device_socket is not None), worker_id, metrics=metrics, health=health)
    worker.install_signal_handlers()
    try:
        return worker.run()
    finally:
        if server is not None:
            server.shutdown()
