"""The three measured paths of `rex-stream bench`, and what they are measured with.

All paths run the same model module (RexModel) and the same recursion and decoding
(`recursion.solve`, `decode`), so their outputs are comparable message by message:

(a) `reference_style`: how the ModelScope pipeline runs the model. One request at a time, every
    forward alone (batch 1), fp32, eager, plus the per-query costs the reference pays: the L×L
    attention mask built as nested Python lists (the reference's numpy ``.tolist()``), turned
    into a tensor with ``torch.tensor(list)`` and moved to the device on its own, sigmoid
    probabilities computed over the whole L×L matrix, every positive link copied to the host
    with ``torch.where(logits > 0)`` + ``.tolist()`` and filtered in Python, and the L×L score
    matrix copied to the host for the confidences.
(b) `competent_user`: an HF-style eager forward in bf16 autocast (fp32 on CPU), fixed batches of
    32 forwards in arrival order, each padded to its longest member (no length sorting): the
    engine's wavefront with its batching policy swapped for fixed chunks.
(c) `engine_path`: `Engine.infer` with its own token-budget batching, at one budget.

Every device batch is timed on its own (``ForwardRunner.run``, or the whole per-forward step of
(a)), with ``torch.cuda.synchronize()`` around it on CUDA. Model FLOPs count real tokens only
(`forward_flops`); utilisation is measured against a matmul peak taken in the same process
(`matmul_peak`).
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from rex_stream.engine.decode import Links, join_links, type_positions
from rex_stream.engine.engine import Engine, EngineStats, Outcome
from rex_stream.engine.layout import attention_allowed, build_layout
from rex_stream.engine.recursion import Forward, Solver, solve
from rex_stream.engine.requests import RequestError, validate
from rex_stream.engine.runner import Fetched, ForwardRunner, HostLinks

Item = tuple[Any, Any]


# ---------------------------------------------------------------------------------------- FLOPs


def relative_rows(position_buckets: int, length: int) -> int:
    """Rows of the 2S relative-embedding table a length-L input can reach (what RexModel multiplies)."""
    span = position_buckets
    return min(2 * span, span + length) - max(0, span - length + 1)


def forward_flops(cfg: Any, length: int) -> int:
    """Model FLOPs (2 per multiply-add) of one forward of `length` real tokens.

    With d = hidden_size, f = intermediate_size, N = num_hidden_layers, k = conv_kernel_size,
    S = position_buckets and R = min(2S, S+L) - max(0, S-L+1) relative rows (2L-1 for L <= S:
    the rows a length-L input can reach, which is what RexModel multiplies; HF/the reference
    multiply all 2S = 512):

        dense   = L * (N * (8d^2 + 4df) + 2k d^2 + 4d^2)    # Q,K,V,O + FFN per layer; conv; ffnq+ffnk
        content = N * 4 L^2 d                              # Q K^T and P V
        rel     = N * 4 L R d                              # c2p: Q K_r^T and p2c: K Q_r^T
        head    = 2 L^2 d                                  # rotary q k^T
        total   = dense + content + rel + head

    i.e. 2 x dense parameters x L, plus 4 L^2 d and ~4 L (2L) d per layer (perf.md section 4,
    model.md section 7). The relative-table projections are cached at load and not counted.
    Base size at L = 128: 24.33 GFLOP (perf.md: 25.5 with all 512 relative rows).
    """
    d, f = cfg.hidden_size, cfg.intermediate_size
    n, k = cfg.num_hidden_layers, cfg.conv_kernel_size
    L = int(length)
    rows = relative_rows(cfg.position_buckets, L)
    dense = L * (n * (8 * d * d + 4 * d * f) + 2 * k * d * d + 4 * d * d)
    content = n * 4 * L * L * d
    rel = n * 4 * L * rows * d
    head = 2 * L * L * d
    return dense + content + rel + head


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (nothing on CPU), so a timing covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, size: int | None = None, repeats: int = 5) -> dict[str, Any]:
    """Best measured dense matmul rate: bf16 8192^3 on CUDA, fp32 1024^3 on CPU (best of `repeats`)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    n = size or (8192 if cuda else 1024)
    iters = 10 if cuda else 3
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(2):
        torch.matmul(a, b, out=out)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        for _ in range(iters):
            torch.matmul(a, b, out=out)
        sync(device)
        best = min(best, (time.perf_counter() - start) / iters)
    del a, b, out
    if cuda:
        torch.cuda.empty_cache()
    return {"flops_per_s": 2 * n**3 / best, "size": n, "dtype": str(dtype).removeprefix("torch."),
            "seconds_per_matmul": best}


def peak_memory_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> int | None:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


# ------------------------------------------------------------------------------------ records


@dataclass
class BatchRecord:
    """One device batch. `seconds`: wall latency from padding to links on the host (batches of the
    engine's pipeline overlap); `device_seconds`: from its first kernel to its last on the main
    stream (CUDA events; equal to `seconds` where nothing overlaps)."""

    forwards: int
    width: int
    real_tokens: int
    seconds: float
    flops: int
    device_seconds: float | None = None

    @property
    def busy(self) -> float:
        return self.seconds if self.device_seconds is None else self.device_seconds


@dataclass
class PathRun:
    """One timed pass of one path over a list of messages."""

    path: str
    messages: int
    seconds: float
    batches: list[BatchRecord] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)  # only the first `keep` (for agreement)
    peak_memory_bytes: int | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def forwards(self) -> int:
        return sum(b.forwards for b in self.batches)

    @property
    def real_tokens(self) -> int:
        return sum(b.real_tokens for b in self.batches)

    @property
    def padded_tokens(self) -> int:
        return sum(b.forwards * b.width for b in self.batches)

    @property
    def flops(self) -> int:
        return sum(b.flops for b in self.batches)

    def summary(self, peak_flops: float | None) -> dict[str, Any]:
        secs = max(self.seconds, 1e-12)
        lat = np.array([b.seconds for b in self.batches], dtype=np.float64)
        in_batches = float(sum(b.busy for b in self.batches))
        padded = self.padded_tokens
        return {
            "path": self.path,
            **self.settings,
            "messages": self.messages,
            "seconds": self.seconds,
            "messages_per_s": self.messages / secs,
            "forwards": self.forwards,
            "forwards_per_s": self.forwards / secs,
            "forwards_per_message": self.forwards / max(self.messages, 1),
            "batches": len(self.batches),
            "real_tokens": self.real_tokens,
            "real_tokens_per_s": self.real_tokens / secs,
            "padded_tokens": padded,
            "padding_share": 0.0 if padded == 0 else 1.0 - self.real_tokens / padded,
            "model_flops": self.flops,
            "model_tflops_per_s": self.flops / secs / 1e12,
            "mfu": None if not peak_flops else self.flops / secs / peak_flops,
            "mfu_in_batches": None if not peak_flops or in_batches <= 0 else self.flops / in_batches / peak_flops,
            "seconds_in_batches": in_batches,
            "host_share": max(0.0, 1.0 - in_batches / secs),
            "batch_latency_ms": {
                "p50": float(np.percentile(lat, 50) * 1e3) if lat.size else None,
                "p99": float(np.percentile(lat, 99) * 1e3) if lat.size else None,
                "mean": float(lat.mean() * 1e3) if lat.size else None,
                "max": float(lat.max() * 1e3) if lat.size else None,
            },
            "peak_memory_bytes": self.peak_memory_bytes,
        }


class TimedRunner:
    """A ForwardRunner stand-in that records every batch's shape, latency and device time.

    It does not synchronise, so the engine's pipelining is measured as it runs; device time comes
    from CUDA events around each batch. Anything else is delegated to the wrapped runner.
    """

    def __init__(self, inner: ForwardRunner, flops: Callable[[int], int]) -> None:
        self.inner = inner
        inner.timing = True
        self._flops = flops
        self.records: list[BatchRecord] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def host_links(self, fetched: Fetched) -> HostLinks:
        links = self.inner.host_links(fetched)
        seconds = time.perf_counter() - fetched.prepared.started
        device_seconds = None
        if fetched.gpu_start is not None and fetched.ready is not None:
            device_seconds = fetched.gpu_start.elapsed_time(fetched.ready) / 1e3
        lengths = fetched.prepared.lengths
        self.records.append(BatchRecord(len(lengths), max(lengths), sum(lengths), seconds,
                                        sum(self._flops(n) for n in lengths), device_seconds))
        return links

    collect = ForwardRunner.collect  # the same split, over the recording `host_links` above


def flops_fn(engine: Engine) -> Callable[[int], int]:
    """Model FLOPs of one forward by its length, for `engine`'s config (cached per length)."""
    cache: dict[int, int] = {}

    def flops(length: int) -> int:
        if length not in cache:
            cache[length] = forward_flops(engine.config, length)
        return cache[length]

    return flops


def engine_view(engine: Engine, cls: type[Engine] = Engine, **attrs: Any) -> Engine:
    """A shallow copy of `engine` (same model and tokenizer), optionally of a subclass, with attrs set."""
    view = cls.__new__(cls)
    view.__dict__.update(copy.copy(engine.__dict__))
    view.stats = EngineStats()
    for key, value in attrs.items():
        setattr(view, key, value)
    return view


def _timed_infer(path: str, view: Engine, runner: TimedRunner, items: Sequence[Item], keep: int,
                 settings: dict[str, Any]) -> PathRun:
    device = view.device
    peak_memory_reset(device)
    sync(device)
    start = time.perf_counter()
    outcomes = view.infer(items)
    sync(device)
    seconds = time.perf_counter() - start
    return PathRun(path, len(items), seconds, list(runner.records), outcomes[:keep], peak_memory(device), settings)


# ------------------------------------------------------------------------------ (a) reference


def _reference_forward(engine: Engine, forward: Forward) -> Links:
    """One forward as the reference pipeline runs it (batch 1, fp32, Python-built L×L mask)."""
    device = engine.device
    special = engine.tokenizer.special
    runner = engine.runner
    ids = list(forward.ids)
    positions, group, slot = build_layout(ids, special)
    # The reference builds the 2-D prompt mask with numpy and returns attention_mask.tolist().
    mask = attention_allowed(group, slot).astype(np.int64).tolist()
    input_ids = torch.tensor([ids]).to(device)
    position_ids = torch.tensor([positions.tolist()]).to(device)
    attention_mask = torch.tensor([mask]).to(device)
    token_mask = torch.ones(1, len(ids), dtype=torch.bool).to(device)
    with torch.inference_mode():
        logits = runner.model(input_ids, position_ids, attention_mask, token_mask).float()
        probs = torch.sigmoid(logits)  # the reference's head returns sigmoid probabilities ...
        hits = torch.where(logits > 0)  # ... and torch.where(logits > 0), used via .tolist()
        rows, cols = hits[1].tolist(), hits[2].tolist()
        host = logits[0].cpu().numpy()  # the score matrix, read per link on the host
        del probs
    nh = forward.num_hint_tokens
    score = runner.score
    scores = score(torch.from_numpy(host)).numpy()
    positive = np.array(list(zip(rows, cols)), dtype=np.int64).reshape(-1, 2)
    links = join_links(positive, scores, nh, type_positions(ids[:nh], special.type))
    if forward.want_cls_probs:
        links.cls_row, links.cls_col = scores[nh, : nh + 1].copy(), scores[: nh + 1, nh].copy()
    return links


def reference_style(engine: Engine, items: Sequence[Item], keep: int = 500) -> PathRun:
    """Baseline (a): requests one after another, each forward alone (see the module docstring).

    `engine` must hold fp32 weights and run fp32 (its model is called directly, no autocast).
    """
    device = engine.device
    flops = flops_fn(engine)
    records: list[BatchRecord] = []
    outcomes: list[Outcome] = []
    peak_memory_reset(device)
    sync(device)
    start = time.perf_counter()
    for text, schema in items:
        outcome = Outcome()
        outcomes.append(outcome)
        try:
            req = validate(text, schema, engine.limits)
        except RequestError as exc:
            outcome.error = exc
            continue
        solver: Solver = solve(engine.tokenizer, req.text, req.schema)
        links: list[Links] | None = None
        try:
            while True:
                forwards = solver.send(links) if links is not None else next(solver)
                links = []
                for forward in forwards:
                    sync(device)
                    t0 = time.perf_counter()
                    links.append(_reference_forward(engine, forward))
                    sync(device)
                    n = len(forward.ids)
                    records.append(BatchRecord(1, n, n, time.perf_counter() - t0, flops(n)))
                outcome.forwards += len(forwards)
        except StopIteration as done:
            outcome.output = done.value
        except Exception as exc:  # as the engine does: one failing request costs only itself
            outcome.error = RequestError("inference_error", f"{type(exc).__name__}: {exc}")
    sync(device)
    seconds = time.perf_counter() - start
    return PathRun("reference_style", len(items), seconds, records, outcomes[:keep], peak_memory(device),
                   {"dtype": "fp32", "batch": 1})


# ------------------------------------------------------------------------ (b) competent user


class FixedBatchEngine(Engine):
    """The engine's wavefront with fixed batches of `fixed_batch` forwards in arrival order.

    No length sorting: each batch is padded to its own longest forward. OOM handling and stats
    are the engine's (`_pipeline`).
    """

    fixed_batch: int = 32

    def plan(self, forwards: Sequence[Forward]) -> list[list[int]]:
        return [list(range(s, min(s + self.fixed_batch, len(forwards)))) for s in range(0, len(forwards), self.fixed_batch)]


def competent_user_dtype(device: torch.device) -> str:
    return "bf16" if torch.device(device).type == "cuda" else "fp32"


def competent_user(engine: Engine, items: Sequence[Item], batch: int = 32, keep: int = 500,
                   dtype: str | None = None) -> PathRun:
    """Baseline (b): bf16 autocast (fp32 on CPU), fixed batches of `batch` in arrival order, eager,
    one batch at a time, every request started before the first batch (no host/device overlap, as a
    plain batched loop runs).

    `engine` should be a plain fp32 engine (no fast paths enabled on its model).
    """
    dtype = dtype or competent_user_dtype(engine.device)
    inner = ForwardRunner(engine.runner.model, engine.tokenizer.special, engine.device, dtype)
    inner.score = engine.runner.score
    runner = TimedRunner(inner, flops_fn(engine))
    view = engine_view(engine, FixedBatchEngine, runner=runner, fixed_batch=batch, pipeline_depth=1,
                        admit_batches=None)
    return _timed_infer("competent_user", view, runner, items, keep, {"dtype": dtype, "batch": batch})


# ----------------------------------------------------------------------------------- (c) engine


def engine_path(engine: Engine, items: Sequence[Item], budget: int, keep: int = 500) -> PathRun:
    """The engine (`Engine.infer`, token-budget batching) at `budget` padded tokens per batch."""
    runner = TimedRunner(engine.runner, flops_fn(engine))
    view = engine_view(engine, runner=runner, batch_tokens=budget)
    return _timed_infer("engine", view, runner, items, keep,
                        {"dtype": engine.dtype, "budget": budget, "max_batch": engine.max_batch,
                         "batch_cost": engine.batch_cost})


def plain_infer(engine: Engine, items: Sequence[Item]) -> list[Outcome]:
    """Untimed `Engine.infer` on a throw-away view (fresh stats), e.g. for warm-up or references."""
    return engine_view(engine).infer(items)


# -------------------------------------------------------------------------------- agreement


def canonical(outcome: Outcome) -> str:
    """A comparable form of one outcome: its output, or its error code."""
    if outcome.error is not None:
        return json.dumps({"error": getattr(outcome.error, "code", type(outcome.error).__name__)})
    return json.dumps({"output": outcome.output}, sort_keys=True, ensure_ascii=False, default=str)


def agreement(outcomes: Sequence[Outcome], reference: Sequence[Outcome]) -> dict[str, Any]:
    """Share of messages whose outcome is identical to the reference's (over the common prefix)."""
    n = min(len(outcomes), len(reference))
    same = sum(canonical(a) == canonical(b) for a, b in zip(outcomes[:n], reference[:n]))
    return {"messages": n, "identical": same, "share": (same / n) if n else None}
