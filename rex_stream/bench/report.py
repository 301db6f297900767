"""Benchmark report: a fixed-width table, the raw JSON and a PNG (throughput vs budget, latency CDF)."""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path
from typing import Any

PATH_LABELS = {"reference_style": "(a) reference-style", "competent_user": "(b) competent user", "engine": "(c) engine"}


def slug(text: str) -> str:
    """File-name form of a device name: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def result_paths(out_dir: Path, workload: str, device_name: str, date: str) -> tuple[Path, Path]:
    """`<out>/<workload>-<device-slug>-<UTC date>.json` (and .png); a later run the same day gets -2, -3, ..."""
    out_dir = Path(out_dir)
    stem = f"{workload}-{slug(device_name)}-{date}"
    n = 1
    while (out_dir / f"{stem}.json").exists():
        n += 1
        stem = f"{workload}-{slug(device_name)}-{date}-{n}"
    return out_dir / f"{stem}.json", out_dir / f"{stem}.png"


def _fmt(value: Any, spec: str, scale: float = 1.0) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value * scale, spec)


def _rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    paths = result["paths"]
    rows = []
    if paths.get("reference_style"):
        rows.append(paths["reference_style"])
    if paths.get("competent_user"):
        rows.append(paths["competent_user"])
    rows.extend(paths.get("engine", []))
    return rows


def engine_key(row: dict[str, Any]) -> str:
    """A (c) row's name in the result's per-pass maps: its budget, and its host processes if served."""
    hosts = row.get("host_processes")
    return f"{row['budget']}" + (f"+{hosts}hosts" if hosts else "")


def _setting(row: dict[str, Any]) -> str:
    if row["path"] == "engine":
        return f"budget {engine_key(row)}"
    return f"batch {row['batch']}"


def table(result: dict[str, Any]) -> str:
    """The summary table, plain fixed-width text."""
    head = (f"{'path':<20} {'dtype':<5} {'setting':<21} {'msg/s':>10} {'fwd/s':>10} {'tok/s':>11} {'pad%':>5} "
            f"{'MFU%':>6} {'p50ms':>8} {'p99ms':>8} {'peakMiB':>8} {'fwd/msg':>7} {'agree':>6}")
    lines = [
        (f"workload {result['workload']}: {result['messages']} messages on {result['device']['name']} "
         f"({result['device']['type']}), torch {result['device']['torch']}, {result['date_utc']}"),
        (f"model {result['model']['name']} ({result['model']['size']}); peak {result['peak']['dtype']} "
         f"{result['peak']['size']}^3 matmul {result['peak']['flops_per_s'] / 1e12:.1f} TFLOP/s"),
        head,
        "-" * len(head),
    ]
    agree = result.get("agreement", {})
    for row in _rows(result):
        if row["path"] == "engine":
            share = agree.get("engine", {}).get(engine_key(row), {}).get("share")
        else:
            share = agree.get(row["path"], {}).get("share")
        mem = row.get("peak_memory_bytes")
        lat = row["batch_latency_ms"]
        name = PATH_LABELS[row["path"]] + ("*" if row.get("subset") else "")
        lines.append(
            f"{name:<20} {row['dtype']:<5} {_setting(row):<21} {_fmt(row['messages_per_s'], '10.1f')} "
            f"{_fmt(row['forwards_per_s'], '10.1f')} {_fmt(row['real_tokens_per_s'], '11.0f')} "
            f"{_fmt(row['padding_share'], '5.1f', 100)} {_fmt(row['mfu'], '6.2f', 100)} {_fmt(lat['p50'], '8.2f')} "
            f"{_fmt(lat['p99'], '8.2f')} {_fmt(mem, '8.0f', 1 / 2**20)} {_fmt(row['forwards_per_message'], '7.2f')} "
            f"{_fmt(share, '6.3f')}"
        )
    ref = result["paths"].get("reference_style")
    if ref and ref.get("subset"):
        lines.append(f"* (a) measured on the first {ref['messages']} of {result['messages']} messages; its per-message "
                     f"rates are taken as the full workload's (full run ~{ref['projected_seconds_full']:.0f} s).")
    ratios = result.get("ratios", {})
    best = result.get("engine_best")
    if best:
        lines.append(
            f"engine best: budget {best['budget']}"
            + (f", {best['host_processes']} host processes" if best.get("host_processes") else ", one process")
            + f", {best['messages_per_s']:.1f} msg/s = "
            f"{_fmt(ratios.get('engine_vs_reference_style'), '.1f')}x (a), "
            f"{_fmt(ratios.get('engine_vs_competent_user'), '.2f')}x (b)"
        )
    lines.append("agree = share of the first messages (up to "
                 f"{result.get('agreement_messages', '-')}) whose output equals the fp32 engine's; "
                 "MFU = model FLOPs on real tokens / (wall time x measured peak).")
    return "\n".join(lines)


def write_json(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def emit(result: dict[str, Any], out: Path | None) -> None:
    """The end of a bench script: its result, dated, on stdout and (with `out`) as a JSON file."""
    result.setdefault("date", time.strftime("%Y-%m-%d", time.gmtime()))
    print(json.dumps(result, ensure_ascii=False, indent=1))
    if out:
        write_json(result, out)


def write_png(result: dict[str, Any], latencies: dict[str, list[float]], path: Path) -> None:
    """Left: engine messages/s vs token budget, baselines as horizontal lines. Right: batch latency CDFs.

    `latencies` maps a legend label to that path's per-batch seconds.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    engine = result["paths"].get("engine", [])
    for n, hosts in enumerate(sorted({row.get("host_processes") or 0 for row in engine})):
        rows = [row for row in engine if (row.get("host_processes") or 0) == hosts]
        label = f"(c) engine, {rows[0]['dtype']}" + (f", {hosts} host processes" if hosts else "")
        left.plot([row["budget"] for row in rows], [row["messages_per_s"] for row in rows], "o-",
                  color=f"C{2 + n}", label=label)
    if engine:
        budgets = sorted({row["budget"] for row in engine})
        left.set_xscale("log", base=2)
        left.set_xticks(budgets, [str(b) for b in budgets])
    colors = {"reference_style": "C0", "competent_user": "C1"}
    for key in ("reference_style", "competent_user"):
        row = result["paths"].get(key)
        if row:
            left.axhline(row["messages_per_s"], color=colors[key], linestyle="--",
                         label=f"{PATH_LABELS[key]}, {row['dtype']}" + (" (subset)" if row.get("subset") else ""))
    left.set_yscale("log")
    left.set_xlabel("engine token budget (padded tokens per batch)")
    left.set_ylabel("messages / s")
    left.set_title(f"{result['workload']}: throughput ({result['device']['name']})")
    left.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=8)

    for label, secs in latencies.items():
        if not secs:
            continue
        ms = np.sort(np.asarray(secs, dtype=np.float64)) * 1e3
        right.step(ms, np.arange(1, ms.size + 1) / ms.size, where="post", label=f"{label} (n={ms.size})")
    right.set_xscale("log")
    right.set_xlabel("device batch latency (ms)")
    right.set_ylabel("share of batches <= x")
    right.set_title("batch latency CDF")
    right.grid(True, which="both", alpha=0.3)
    right.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
