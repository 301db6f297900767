"""`rex-stream` command line: one subcommand per job, each implemented in its own module."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

from .config import DEFAULT_MODEL


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {number}")
    return number


def _engine_flags(p: argparse.ArgumentParser, device: str = "cpu", dtype: str = "fp32") -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="model directory or ModelScope model id")
    p.add_argument("--device", default=device, help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default=dtype, choices=["fp32", "bf16", "fp16"])
    p.add_argument("--batch-tokens", type=int, default=16384, help="padded tokens per device batch")
    p.add_argument("--cls-score", default="logit", choices=["logit", "sigmoid"],
                   help="classification confidence: logit (golden data) or sigmoid (shipped code)")
    p.add_argument("--attention", default="auto", choices=["auto", "sdpa", "flex", "triton"],
                   help="sdpa: exact reference numerics; flex / triton: fused kernels (GPU), self-checked against "
                        "sdpa; auto (default): triton for bf16/fp16 on CUDA, else sdpa")
    p.add_argument("--compile", action="store_true", help="torch.compile the encoder (self-checked, falls back)")


def _settings_flags(p: argparse.ArgumentParser) -> None:
    """Flags that override the configuration of a worker (and of its device process)."""
    p.add_argument("--config", type=Path, help="YAML configuration file (see config/)")
    p.add_argument("--bootstrap-servers")
    p.add_argument("--input-topic", action="append", help="repeat for several topics")
    p.add_argument("--output-topic")
    p.add_argument("--dead-letter-topic")
    p.add_argument("--group-id")
    p.add_argument("--model", dest="model_name")
    p.add_argument("--device")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--delivery", choices=["at-least-once", "exactly-once"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rex-stream", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("infer", help="offline inference over JSON Lines")
    _engine_flags(p)
    p.add_argument("--input", default="-", help="JSON Lines file or - for stdin")
    p.add_argument("--output", default="-", help="output file or - for stdout")
    p.add_argument("--schema", help="default schema (JSON) for lines without one and for plain text lines")
    p.add_argument("--allow-empty-text", action="store_true",
                   help="treat empty text like the reference does (output []) instead of an error")
    p.add_argument("--max-text-chars", type=int, default=20_000)

    p = sub.add_parser("model", help="model utilities")
    msub = p.add_subparsers(dest="model_command", required=True)
    r = msub.add_parser("random", help="write a random-weights model directory in the real layout")
    r.add_argument("--out", required=True, type=Path)
    r.add_argument("--size", choices=["base", "tiny"], default="tiny")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--link-bias", type=float, default=None, help="higher: fewer links fire")
    r.add_argument("--vocab", type=Path, default=None, help="vocab.txt (default: $REX_SHARED/rex/tiny-random/vocab.txt)")

    p = sub.add_parser("run", help="the Kafka stream worker (one process per GPU)")
    _settings_flags(p)
    p.add_argument("--gpus", help="all, N, or a list like 0,2: one worker process per GPU")
    p.add_argument("--workers", type=int, help="number of worker processes (CPU devices)")
    p.add_argument("--workers-per-gpu", type=_positive_int, default=None,
                   help="worker processes per selected GPU (spreads per-message CPU work over more cores); "
                        "default 1, or with --device-server half the CPU cores per GPU, at most 8")
    p.add_argument("--device-server", action="store_true",
                   help="per GPU (or, without --gpus, for all workers) one device process owns the model and the "
                        "workers only do the host work: one model copy and CUDA context per GPU")

    # Started by `run --device-server` with run's own settings flags (it uses the model ones).
    _settings_flags(sub.add_parser("device-server", help="the device process of `run --device-server`"))

    p = sub.add_parser("produce", help="send JSON Lines or text lines to a topic")
    p.add_argument("--bootstrap-servers", help="default: the config file's, or 127.0.0.1:9092")
    p.add_argument("--topic", required=True)
    p.add_argument("--input", default="-")
    p.add_argument("--schema", help="wrap plain text lines as {text, schema}")
    p.add_argument("--config", type=Path, help="take Kafka client/security settings from this file")

    p = sub.add_parser("demo", help="end-to-end demo through a local Kafka broker")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--device", default=None)
    p.add_argument("--messages", type=int, default=40)

    p = sub.add_parser("health", help="exit 0 if a worker is healthy, 1 if not")
    p.add_argument("--url", help="worker HTTP endpoint, e.g. http://127.0.0.1:9400")
    p.add_argument("--heartbeat-file", help="heartbeat file written by the worker")
    p.add_argument("--max-age", type=float, default=60.0, help="seconds before a heartbeat is stale")
    p.add_argument("--ready", action="store_true", help="check readiness, not only liveness")

    p = sub.add_parser("stats", help="summarise a worker's JSON log: table and PNG chart")
    p.add_argument("logfile", type=Path)
    p.add_argument("--png", type=Path, default=None)

    p = sub.add_parser("bench", help="throughput benchmark against baselines, on one device")
    p.add_argument("--workload", default="ner",
                   help="ner, re or mix; a comma-separated list runs several in one process (one JSON each)")
    p.add_argument("--model", default=None, help="model directory (default: a random base-size model)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--messages", default="20000",
                   help="messages per workload; a comma-separated list gives one count per --workload entry")
    p.add_argument("--baseline-a-messages", type=int, default=200)
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--budgets", default="8192,16384,32768,65536")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                   help="engine dtype (default: bf16 on CUDA, fp32 on CPU); baselines are fixed")
    p.add_argument("--warmup-messages", type=int, default=64, help="untimed warm-up pass per path")
    p.add_argument("--agreement-messages", type=int, default=500, help="messages compared with the fp32 engine")
    p.add_argument("--batch", type=int, default=32, help="baseline (b) batch size")
    p.add_argument("--engine-kwargs", default=None, help='JSON of extra Engine(...) arguments for path (c)')
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--host-processes", default="0",
                   help="comma-separated counts: for each nonzero N, (c) again with its host work in N processes "
                        "and this process as their device process (the layout of run --device-server); 0: one process")
    p.add_argument("--host-chunk", type=int, default=5000,
                   help="messages per engine call in each host process (5,000 beat 2,500 and 15,000 on ner, BENCHMARKS run 13)")
    return parser


# Subcommand -> (module, function taking the parsed arguments), imported when used, so that a
# command never loads what only another needs (the Kafka client, the bench, the HTTP server).
_COMMANDS = {
    "run": (".stream.launcher", "main"),
    "device-server": (".stream.launcher", "device_server_main"),
    "produce": (".stream.produce", "main"),
    "demo": (".demo", "main"),
    "health": (".ops.health", "main"),
    "stats": (".ops.stats_report", "main"),
    "bench": (".bench.runner", "main"),
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "infer":
        from .engine.requests import Limits
        from .infer_cli import main as infer_main

        args.limits = Limits(max_text_chars=args.max_text_chars, allow_empty_text=args.allow_empty_text)
        return infer_main(args)
    if args.command == "model":
        from .engine.random_model import write_random_model

        kwargs = {} if args.link_bias is None else {"link_bias": args.link_bias}
        out = write_random_model(args.out, args.size, seed=args.seed, vocab_path=args.vocab, **kwargs)
        print(out)
        return 0
    if args.command in _COMMANDS:
        module, function = _COMMANDS[args.command]
        return getattr(importlib.import_module(module, __package__), function)(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
