"""`rex-stream bench`: one workload (or several), three paths, one process, one device.

Order per workload: fp32 engine reference outputs on the first `--agreement-messages` messages
(untimed); (a) reference-style on the first `--baseline-a-messages`; (b) competent user on all
messages; (c) the engine at every `--budgets` value, in this process and, for each nonzero
`--host-processes` count, with its host work in that many processes served by this one
(`served`). Every timed pass is preceded by an untimed warm-up of the same path on the first
`--warmup-messages` messages. The JSON is rewritten after every pass (``"complete": false`` until
the end), so a run cut short still leaves its numbers.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from rex_stream.bench import baselines, report, served
from rex_stream.bench.workloads import WORKLOADS, load_workload, shared_dir
from rex_stream.engine.engine import Engine

DEFAULTS: dict[str, Any] = {
    "workload": "ner", "model": None, "device": "cuda", "messages": "20000", "baseline_a_messages": 200,
    "out": Path("bench/results"), "budgets": "8192,16384,32768,65536", "dtype": None, "warmup_messages": 64,
    "agreement_messages": 500, "batch": 32, "engine_kwargs": None, "threads": None, "host_processes": "0",
    "host_chunk": 5000,
}


def _log(message: str, t0: float) -> None:
    print(f"[bench {time.perf_counter() - t0:7.1f}s] {message}", file=sys.stderr, flush=True)


def _device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"type": device.type, "torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
                            "cpu": platform.processor() or platform.machine(), "host_cpus": os.cpu_count()}
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        info.update(name=torch.cuda.get_device_name(index), index=index, cuda=torch.version.cuda,
                    capability=f"{props.major}.{props.minor}", memory_bytes=int(props.total_memory),
                    multiprocessors=props.multi_processor_count)
    else:
        info["name"] = f"cpu-{info['cpu']}" if info["cpu"] else "cpu"
    return info


def _int_list(text: Any, minimum: int, error: str) -> list[int]:
    """A comma-separated option of integers, each at least `minimum` (ValueError with `error` if not)."""
    values = [int(v) for v in str(text).replace(" ", "").split(",") if v]
    if not values or any(v < minimum for v in values):
        raise ValueError(f"{error}, got {text!r}")
    return values


def _parse_budgets(text: str) -> list[int]:
    return _int_list(text, 1, "--budgets needs positive integers")


def _parse_workloads(text: str) -> list[str]:
    names = [w for w in str(text).replace(" ", "").split(",") if w]
    unknown = [w for w in names if w not in WORKLOADS]
    if not names or unknown:
        raise ValueError(f"--workload must be one or more of {', '.join(WORKLOADS)} (comma-separated), got {text!r}")
    return names


def _parse_counts(text: Any, workloads: list[str]) -> dict[str, int]:
    error = "--messages needs one positive count, or one per workload"
    counts = _int_list(text, 1, error)
    if len(counts) == 1:
        counts *= len(workloads)
    if len(counts) != len(workloads):
        raise ValueError(f"{error}, got {text!r}")
    return dict(zip(workloads, counts))


def main(args: argparse.Namespace) -> int:
    opts = {**DEFAULTS, **{k: v for k, v in vars(args).items() if v is not None or k not in DEFAULTS}}
    t0 = time.perf_counter()
    try:
        workloads = _parse_workloads(opts["workload"])
        budgets = _parse_budgets(opts["budgets"])
        opts["messages"] = _parse_counts(opts["messages"], workloads)
        opts["host_processes"] = _int_list(opts["host_processes"], 0, "--host-processes needs counts >= 0")
        engine_kwargs = json.loads(opts["engine_kwargs"]) if opts["engine_kwargs"] else {}
    except ValueError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    device = torch.device(opts["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench: --device cuda but no CUDA device is available (use --device cpu)", file=sys.stderr)
        return 2
    threads = torch.get_num_threads()
    if opts["threads"]:
        torch.set_num_threads(int(opts["threads"]))
    try:
        return _main(opts, workloads, budgets, engine_kwargs, device, t0)
    finally:
        torch.set_num_threads(threads)


def _main(opts: dict[str, Any], workloads: list[str], budgets: list[int], engine_kwargs: dict[str, Any],
          device: torch.device, t0: float) -> int:
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    shared = shared_dir()
    engine_dtype = opts["dtype"] or ("bf16" if device.type == "cuda" else "fp32")

    with tempfile.TemporaryDirectory(prefix="rex-bench-") as tmp:
        model_info: dict[str, Any]
        if opts["model"]:
            model_dir = Path(opts["model"])
            model_info = {"dir": str(model_dir.resolve()), "random": "unknown (--model given)"}
        else:
            from rex_stream.engine.random_model import (
                DEFAULT_LINK_BIAS,
                write_random_model,
            )

            vocab = shared / "rex" / "tiny-random" / "vocab.txt"
            model_dir = write_random_model(Path(tmp) / "rex-base-random", "base", seed=0, vocab_path=vocab)
            model_info = {"dir": None, "random": True, "seed": 0, "link_bias": DEFAULT_LINK_BIAS}
            _log(f"wrote a random base-size model (seed 0) to {model_dir}", t0)
        # Baselines (a)/(b) and the agreement reference use a plain fp32 engine; (c) its own
        # engine in the benchmark dtype (with any --engine-kwargs), so fast paths never leak into
        # the baselines.
        ref = Engine(model_dir, device=str(device), dtype="fp32")
        fast = Engine(model_dir, device=str(device), dtype=engine_dtype, **engine_kwargs)
        cfg = ref.config
        model_info.update(name=model_dir.name, size=f"{cfg.num_hidden_layers}x{cfg.hidden_size}",
                          config={k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
                          flops_per_forward_L128=baselines.forward_flops(cfg, 128))
        _log(f"loaded the model twice (fp32 baselines, {engine_dtype} engine) on {device}", t0)
        peak = baselines.matmul_peak(device)
        _log(f"matmul peak {peak['dtype']} {peak['size']}^3: {peak['flops_per_s'] / 1e12:.2f} TFLOP/s", t0)
        dev_info = _device_info(device)
        failed = 0
        for workload in workloads:
            failed += _run_workload(workload, opts, shared, device, dev_info, model_info, ref, fast, engine_dtype,
                                    engine_kwargs, budgets, peak, t0)
    return 1 if failed else 0


def _run_workload(workload: str, opts: dict[str, Any], shared: Path, device: torch.device,
                  dev_info: dict[str, Any], model_info: dict[str, Any], ref: Engine, fast: Engine,
                  engine_dtype: str, engine_kwargs: dict[str, Any], budgets: list[int], peak: dict[str, Any],
                  t0: float) -> int:
    """Run and report one workload; returns how many passes failed (their tracebacks are in the JSON)."""
    messages = opts["messages"][workload]
    items = load_workload(workload, shared, messages)
    n_a = max(1, min(int(opts["baseline_a_messages"]), len(items)))
    n_agree = max(1, min(int(opts["agreement_messages"]), len(items)))
    warm = max(1, min(int(opts["warmup_messages"]), len(items)))
    now = dt.datetime.now(dt.timezone.utc)
    json_path, png_path = report.result_paths(Path(opts["out"]), workload, dev_info["name"], now.strftime("%Y-%m-%d"))
    peak_flops = peak["flops_per_s"]
    result: dict[str, Any] = {
        "workload": workload,
        "complete": False,
        "date_utc": now.isoformat(timespec="seconds"),
        "command": ("rex-stream " + shlex.join(sys.argv[1:])) if sys.argv[1:2] == ["bench"] else shlex.join(sys.argv),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in opts.items()},
        "device": dev_info,
        "model": model_info,
        "engine_dtype": engine_dtype,
        "engine_kwargs": engine_kwargs,
        "messages": len(items),
        "peak": peak,
        "flop_formula": baselines.forward_flops.__doc__,
        "agreement_messages": n_agree,
        "paths": {"reference_style": None, "competent_user": None, "engine": []},
        "agreement": {"reference": f"fp32 engine (budget {ref.batch_tokens}) on the first {n_agree} messages",
                      "engine": {}},
        "ratios": {},
        "errors": {},
    }
    latencies: dict[str, list[float]] = {}

    def save() -> None:
        report.write_json(result, json_path)

    def attempt(name: str, step: Callable[[], None]) -> None:
        """Run one pass; a failure is recorded and logged, and the other passes still run."""
        try:
            step()
        except Exception as exc:
            result["errors"][name] = traceback.format_exc(limit=20)
            _log(f"{name} FAILED: {type(exc).__name__}: {exc}", t0)
        finally:
            _ratios(result)
            save()

    _log(f"{workload}: {len(items)} messages; fp32 reference outputs on the first {n_agree}", t0)
    reference: list = []

    def fp32_reference() -> None:
        reference.extend(baselines.plain_infer(ref, items[:n_agree]))

    attempt("fp32_reference", fp32_reference)

    def path_a() -> None:  # (a) reference-style, on a subset, scaled per message
        baselines.reference_style(ref, items[: min(2, n_a)], keep=0)
        run = baselines.reference_style(ref, items[:n_a], keep=n_agree)
        row = run.summary(peak_flops)
        row.update(subset=n_a < len(items), scaled_to_messages=len(items),
                   projected_seconds_full=len(items) / max(row["messages_per_s"], 1e-12),
                   note=f"measured on the first {n_a} messages; per-message rates stand for the whole workload")
        result["paths"]["reference_style"] = row
        result["agreement"]["reference_style"] = baselines.agreement(run.outcomes, reference)
        latencies["(a) reference-style"] = [b.seconds for b in run.batches]
        _log(f"(a) {row['messages_per_s']:.2f} msg/s on {n_a} messages, {row['forwards_per_message']:.2f} fwd/msg", t0)

    def path_b() -> None:  # (b) competent user
        batch = int(opts["batch"])
        baselines.competent_user(ref, items[:warm], batch=batch, keep=0)
        run = baselines.competent_user(ref, items, batch=batch, keep=n_agree)
        row = run.summary(peak_flops)
        result["paths"]["competent_user"] = row
        result["agreement"]["competent_user"] = baselines.agreement(run.outcomes, reference)
        latencies[f"(b) competent user, {row['dtype']}"] = [b.seconds for b in run.batches]
        _log(f"(b) {row['messages_per_s']:.1f} msg/s, {row['forwards_per_message']:.2f} fwd/msg, "
             f"padding {row['padding_share']:.1%}, MFU {row['mfu'] or 0:.1%}", t0)

    def path_c(budget: int, hosts: int) -> None:  # (c) the engine at one budget, in this process or served
        if hosts:
            run = served.served_path(fast, engine_kwargs, workload, shared, messages, hosts, budget, n_agree, warm,
                                     int(opts["host_chunk"]))
        else:
            baselines.engine_path(fast, items[:warm], budget, keep=0)
            run = baselines.engine_path(fast, items, budget, keep=n_agree)
        row = run.summary(peak_flops)
        key = report.engine_key(row)
        result["paths"]["engine"].append(row)
        result["agreement"]["engine"][key] = baselines.agreement(run.outcomes, reference)
        latencies[f"(c) engine {key}"] = [b.seconds for b in run.batches]
        _log(f"(c) {key}: {row['messages_per_s']:.1f} msg/s, padding {row['padding_share']:.1%}, "
             f"MFU {row['mfu'] or 0:.1%}", t0)

    attempt("reference_style", path_a)
    attempt("competent_user", path_b)
    for hosts in opts["host_processes"]:
        for budget in budgets:
            attempt(f"engine {budget}" + (f" {hosts} hosts" if hosts else ""),
                    lambda budget=budget, hosts=hosts: path_c(budget, hosts))

    if hasattr(fast.runner.model, "fast_path_status"):
        try:
            result["engine_fast_path_status"] = fast.runner.model.fast_path_status()
        except Exception as exc:  # informative only
            result["engine_fast_path_status"] = f"unavailable: {exc}"
    result["complete"] = True
    result["wall_seconds"] = time.perf_counter() - t0
    try:
        report.write_png(result, latencies, png_path)
        result["png"] = str(png_path)
    except Exception as exc:  # e.g. matplotlib missing on the device machine: keep the numbers
        result["png"] = None
        result["errors"]["png"] = f"{type(exc).__name__}: {exc}"
        _log(f"PNG not written: {type(exc).__name__}: {exc}", t0)
    save()
    print(report.table(result))
    print(f"wrote {json_path}" + (f" and {png_path}" if result["png"] else ""))
    return sum(1 for name in result["errors"] if name != "png")


def _ratios(result: dict[str, Any]) -> None:
    engine = result["paths"]["engine"]
    if not engine:
        return
    best = max(engine, key=lambda r: r["messages_per_s"])
    result["engine_best"] = {"budget": best["budget"], "host_processes": best.get("host_processes", 0),
                             "messages_per_s": best["messages_per_s"]}
    ratios: dict[str, Any] = {}
    for key in ("reference_style", "competent_user"):
        base = result["paths"].get(key)
        if base and base["messages_per_s"] > 0:
            ratios[f"engine_vs_{key}"] = best["messages_per_s"] / base["messages_per_s"]
            ratios[f"engine_vs_{key}_by_budget"] = {
                report.engine_key(r): r["messages_per_s"] / base["messages_per_s"] for r in engine}
    result["ratios"] = ratios
