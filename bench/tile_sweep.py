"""Derive the attention kernel's tile policy from the engine's own batches, on this GPU:
`python bench/tile_sweep.py PREVIOUS.py MODEL_DIR [N]`.

1. Runs the engine (bf16, Triton attention, the default 131,072-token budget) on ner, re and mix
   messages in chunks a served host process could plan (5,000 / 2,000 / 200) and records the first
   layer's attention inputs of every forward: real row lengths, prompt layouts and q/k/v.
2. Times the kernel alone on each recorded batch (``triton.testing.do_bench``, position tables
   precomputed): PREVIOUS.py's ``_launch`` (an earlier ``triton_attention.py``, token-axis kernel,
   2cbb96c or later) at a few tile configurations, and the current kernel at every candidate. One
   JSON line per batch and variant (ms, max |difference| from the previous kernel at the
   configuration its own policy gives that batch).
   Then the registers, spills and shared memory of each compiled binary.
3. Derives, for each kernel, a width-bounded policy (per width bucket, the configuration with the
   least summed time over that bucket's batches) and prints both; the current kernel's is the
   ``TILE_POLICY["cuda"]`` to commit.
4. Engine A/B, same process, alternating: the previous kernel with its own policy, and each
   kernel with its derived policy; per workload (ner N messages, default 20,000; re N / 2; mix
   N / 30) messages/s of two passes and the kernel time of a profiled pass per 1,000 messages.
"""
import importlib.util
import json
import sys
from typing import Any

import torch
import triton.testing

from rex_stream.bench.worker_path import engine_ab_pass
from rex_stream.bench.workloads import load_workload
from rex_stream.engine import triton_attention as current
from rex_stream.engine.engine import Engine

CANDIDATES = [(64, 64, 4, 2), (64, 64, 4, 1), (64, 64, 2, 2), (64, 32, 4, 2), (64, 32, 2, 2), (32, 64, 2, 2),
              (32, 32, 2, 2), (32, 32, 1, 2), (16, 32, 1, 2), (16, 64, 1, 2)]
PREVIOUS_CANDIDATES = [(64, 64, 4, 2), (32, 32, 2, 2), (16, 32, 1, 2)]
BUCKETS = [32, 48, 64, 80, 96, 128, 160, 192, 256, 384, 1 << 30]  # width bounds of the derived policy
CHUNKS = {"ner": 5000, "re": 2000, "mix": 200}
# A configuration whose output on any batch differs from the previous kernel's by more than this is
# wrong, not just rounded differently (bf16 outputs of size ~1 differ by <= 0.004 between correct
# tilings): it is reported but never chosen. On an H200 (triton 3.6) 16 x 32 tiles on one warp
# gave 0.09-0.24 in both kernels (BENCHMARKS run 16).
TOLERANCE = 0.02


def config_of(bm: int, bn: int, warps: int, stages: int) -> dict[str, int]:
    return {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages}


Policy = tuple[tuple[int, dict[str, int]], ...]


def load_previous(path: str) -> tuple[Any, Policy]:
    """PREVIOUS.py's ``_launch`` and its CUDA tile policy (one entry for a file from before the policy)."""
    spec = importlib.util.spec_from_file_location("previous_attention", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["previous_attention"] = module
    spec.loader.exec_module(module)
    if hasattr(module, "TILE_POLICY"):
        return module._launch, tuple(module.TILE_POLICY["cuda"])
    return module._launch, ((BUCKETS[-1], dict(module.KERNEL_CONFIGS["cuda"])),)


def record(engine: Engine, workload: str) -> list[dict[str, Any]]:
    """Layer-0 attention inputs of every forward of one host chunk of ``workload``."""
    layers = len(engine.runner.model.plm.encoder.layer)
    seen: list[dict[str, Any]] = []
    calls = [0]
    original = current.packed_attention

    def spy(q, k, v, pos_q, pos_k, pos, group, slot, valid, rows, offset, scale, **kw):
        if calls[0] % layers == 0:
            base = torch.stack([q, k, v], 1)  # [T, 3, H, D]: q/k/v strided as the model's projection
            seen.append({"q": base[:, 0], "k": base[:, 1], "v": base[:, 2], "pos_q": pos_q, "pos_k": pos_k,
                         "attrs": (pos, group, slot, valid), "rows": rows, "offset": offset, "scale": scale,
                         "reach": kw.get("reach"), "workload": workload})
        calls[0] += 1
        return original(q, k, v, pos_q, pos_k, pos, group, slot, valid, rows, offset, scale, **kw)

    current.packed_attention = spy
    try:
        engine.infer(load_workload(workload, None, CHUNKS[workload]))
    finally:
        current.packed_attention = original
    return seen


def sweep(batches: list[dict[str, Any]], previous: Any, previous_policy: Policy) -> list[dict[str, Any]]:
    rows_out = []
    for n, b in enumerate(batches):
        q, k, v = b["q"], b["k"], b["v"]
        c2p = current._table(q, current._aligned(b["pos_k"]))
        p2c = current._table(k, current._aligned(b["pos_q"]))
        rows = b["rows"]
        reach = b["reach"] if b["reach"] is not None else b["pos_k"].shape[-2]
        lengths = rows.lengths.tolist()

        def launch(fn: Any, config: dict[str, int]) -> torch.Tensor:
            return fn(q, k, v, c2p, p2c, *b["attrs"], rows.starts, rows.lengths, rows.width, b["offset"],
                      b["scale"], config, reach, False)

        own = next(config for bound, config in previous_policy if rows.width <= bound)
        ref = launch(previous, own).float()
        variants = [("previous", config_of(*c)) for c in PREVIOUS_CANDIDATES]
        variants += [("current", config_of(*c)) for c in CANDIDATES]
        for kernel, config in variants:
            fn = previous if kernel == "previous" else current._launch
            try:
                diff = float((launch(fn, config).float() - ref).abs().max())
                ms = triton.testing.do_bench(lambda: launch(fn, config), warmup=10, rep=60)
            except Exception as exc:  # noqa: BLE001 - e.g. out of resources: report and go on
                print(json.dumps({"batch": n, "kernel": kernel, "config": config, "error": str(exc)[:200]}), flush=True)
                continue
            row = {"batch": n, "workload": b["workload"], "rows": len(lengths), "width": rows.width,
                   "tokens": sum(lengths), "mean_length": round(sum(lengths) / len(lengths), 1),
                   "kernel": kernel, "config": config, "ms": round(ms, 4), "max_diff": diff}
            rows_out.append(row)
            print(json.dumps(row), flush=True)
    return rows_out


def kernel_stats(name: str, kernel: Any) -> None:
    """Registers, spills and shared memory of every binary triton compiled for ``kernel``."""
    for device, cache in getattr(kernel, "device_caches", {}).items():
        for key, compiled in cache[0].items():
            meta = getattr(compiled, "metadata", None)
            print(json.dumps({"kernel": name, "key": str(key)[-160:], "n_regs": getattr(compiled, "n_regs", None),
                              "n_spills": getattr(compiled, "n_spills", None),
                              "shared": getattr(meta, "shared", None), "num_warps": getattr(meta, "num_warps", None),
                              "num_stages": getattr(meta, "num_stages", None)}), flush=True)


def derive(rows: list[dict[str, Any]], kernel: str = "current") -> list[tuple[int, dict[str, int]]]:
    """Per width bucket the ``kernel``'s configuration of least summed time (among those within
    ``TOLERANCE`` on every batch); empty buckets take the next wider bucket's choice (the widest,
    the one below it); equal neighbours merge."""
    chosen: list[tuple[int, dict[str, int] | None]] = []
    wrong = {json.dumps(r["config"], sort_keys=True) for r in rows if r["max_diff"] > TOLERANCE}
    low = 0
    for bound in BUCKETS:
        inside = [r for r in rows if r["kernel"] == kernel and low < r["width"] <= bound
                  and json.dumps(r["config"], sort_keys=True) not in wrong]
        totals: dict[str, float] = {}
        counts: dict[str, int] = {}
        for r in inside:
            key = json.dumps(r["config"], sort_keys=True)
            totals[key] = totals.get(key, 0.0) + r["ms"]
            counts[key] = counts.get(key, 0) + 1
        batches = len({r["batch"] for r in inside})
        complete = [key for key in totals if counts[key] == batches]
        chosen.append((bound, json.loads(min(complete, key=totals.__getitem__)) if complete else None))
        low = bound
    policy: list[tuple[int, dict[str, int]]] = []
    later = None
    for bound, config in reversed(chosen):
        later = config or later
        policy.append((bound, later))
    policy.reverse()
    merged: list[tuple[int, dict[str, int]]] = []
    for bound, config in policy:
        if config is None:
            continue
        if merged and merged[-1][1] == config:
            merged[-1] = (bound, config)
        else:
            merged.append((bound, config))
    if merged:
        merged[-1] = (BUCKETS[-1], merged[-1][1])  # the widest choice covers every wider batch
    return merged


def engine_ab(engine: Engine, previous: Any, previous_policy: Policy,
              derived: dict[str, list[tuple[int, dict[str, int]]]], count: int) -> None:
    variants = {
        "previous": (previous, previous_policy),
        "previous-derived": (previous, tuple(derived["previous"])),
        "current-derived": (current._launch, tuple(derived["current"])),
    }
    launch, policy = current._launch, current.TILE_POLICY["cuda"]
    for workload, n in (("ner", count), ("re", count // 2), ("mix", count // 30)):
        items = load_workload(workload, None, n)
        for name in tuple(variants) * 2:
            current._launch, current.TILE_POLICY["cuda"] = variants[name]
            engine.infer(items[:1024])  # this variant's kernels compiled and warm
            print(json.dumps({"workload": workload, "variant": name, **engine_ab_pass(engine, items)}), flush=True)
    current._launch, current.TILE_POLICY["cuda"] = launch, policy


if __name__ == "__main__":
    previous_launch, previous_tiles = load_previous(sys.argv[1])
    eng = Engine(sys.argv[2], device="cuda", dtype="bf16", batch_tokens=131072, attention="triton")
    eng.infer(load_workload("ner", None, 1024))  # warm-up
    recorded = [b for workload in CHUNKS for b in record(eng, workload)]
    swept = sweep(recorded, previous_launch, previous_tiles)
    kernel_stats("previous", sys.modules["previous_attention"]._disentangled_fwd)
    kernel_stats("current", current._disentangled_fwd)
    policies = {kernel: derive(swept, kernel) for kernel in ("previous", "current")}
    print(json.dumps({"derived_policy": policies}), flush=True)
    engine_ab(eng, previous_launch, previous_tiles, policies, int(sys.argv[3]) if len(sys.argv) > 3 else 20_000)
