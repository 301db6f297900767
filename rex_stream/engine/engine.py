"""The inference engine: many (text, schema) requests in, the reference pipeline's outputs out.

Requests advance level by level together (a wavefront): all level-0 forwards of all requests are
packed into token-budget batches, then the level-1 forwards their decoding asks for, and so on.
Batches run through a pipeline (`Engine._pipeline`): while the device computes the next batches
the host decodes an earlier one and pads the one after. A request's answer never depends on its
batch mates (padding is isolated), and one failing request or forward never fails the others.
Requests come from a `sources.Source`: the list of one `run_requests` call, or the queue of an
`server.EngineServer` that callers feed while the loop runs.
"""

from __future__ import annotations

import atexit
import gc
import math
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch

from .batching import BATCH_COST_TOKENS, plan_batches
from .decode import Links
from .device_server import DeviceLost, RemoteRunner
from .recursion import Forward, Solver, solve
from .requests import Limits, Request, RequestError, validate
from .runner import DTYPES, ForwardRunner, Launched
from .sources import ListSource, Source
from .tokenizer import RexTokenizer
from .weights import ModelConfig, load_model, resolve_model_dir

# A queued forward: (request key, index among the request's current forwards, the forward).
_Item = tuple[Hashable, int, Forward]


_GC_THRESHOLDS = (50_000, 20, 10)

# Requests admitted together: their texts are tokenised in one call (`RexTokenizer.pieces_of`: the
# character table, and one threaded `tokenizers` call for the texts it can't take). A group may take
# the pool past its admission target by a few requests.
ADMIT_GROUP = 32


def resolve_attention(attention: str, device: torch.device, dtype: str) -> str:
    """"auto": the fused Triton kernel for reduced precision on CUDA, else the exact SDPA path.

    fp32 keeps SDPA, whose numbers the golden tests pin; the Triton path is self-checked against
    SDPA on its first batch and falls back to it by itself.
    """
    if attention != "auto":
        return attention
    return "triton" if device.type == "cuda" and dtype != "fp32" else "sdpa"


def relax_gc() -> None:
    """Keep Python's cyclic garbage collector off the hot path of an engine process.

    Every collection of the oldest generation rescans every live container (the model's modules,
    the tokenizer, torch's own objects); with the default thresholds that happened every few
    hundred messages and cost about half of the host time per `ner` message (measured on CPU:
    ~80 -> ~40 µs). What exists once the model is loaded is frozen (never scanned again; unfrozen
    at exit so interpreter shutdown still frees it), and young collections run less often: the
    per-message garbage is acyclic and freed by reference counting anyway.
    """
    if not gc.get_freeze_count():
        atexit.register(gc.unfreeze)
    gc.freeze()
    gc.set_threshold(*_GC_THRESHOLDS)


@dataclass
class Outcome:
    """One request's result: `output` as the reference returns it, or `error`."""

    output: list | None = None
    error: RequestError | None = None
    forwards: int = 0


@dataclass
class EngineStats:
    forwards: int = 0
    batches: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    oom_splits: int = 0


class Engine:
    """Loads a RexUniNLU model once and answers batches of requests."""

    def __init__(self, model: str | Path, device: str = "cpu", dtype: str = "fp32", batch_tokens: int = 16384,
                 max_batch: int = 4096, limits: Limits = Limits(), cache_dir: str | None = None,
                 cls_score: str = "logit", attention: str = "auto", compile_encoder: bool = False,
                 admit_batches: float | None = None, fusions: frozenset[str] | None = None,
                 device_link: Connection | None = None, batch_cost: int | None = None) -> None:
        """`device_link`: the model runs in a `device_server` process reached through this connection
        (its settings are the server's; `device`, `dtype`, `cls_score`, `attention`, `fusions` and
        `compile_encoder` are then not used here): this process does the host work only."""
        self.model_dir = resolve_model_dir(str(model), cache_dir)
        self.tokenizer = RexTokenizer(self.model_dir)
        self.runner: ForwardRunner | RemoteRunner
        if device_link is not None:
            self.device = torch.device("cpu")  # this process touches no accelerator
            self.runner = RemoteRunner(device_link, self.tokenizer.special)
            self.config = ModelConfig.from_json(self.model_dir / "config.json")
        else:
            self.device = torch.device(device)
            if self.device.type == "cuda":
                torch.backends.cuda.matmul.allow_tf32 = False  # fp32 must mean fp32: exact reference answers
                torch.backends.cudnn.allow_tf32 = False
            net, self.config = load_model(self.model_dir, device=str(self.device))
            # Falls back to the exact SDPA path if the fused one fails its self-check.
            net.set_attention(resolve_attention(attention, self.device, dtype))
            if fusions is not None:
                net.set_fusions(fusions)  # the fused fast path's fusions (RexModel.set_fusions)
            if dtype != "fp32":
                net.store_matmul_weights(DTYPES[dtype])  # same numbers as autocast's per-call casts, once
            if compile_encoder:
                net.compile_encoder()
            self.runner = ForwardRunner(net, self.tokenizer.special, self.device, dtype, cls_score)
        self.dtype = dtype
        self.batch_tokens = batch_tokens
        self.max_batch = max_batch
        # Planning's fixed cost per batch, in padded tokens (batching.py).
        self.batch_cost = BATCH_COST_TOKENS if batch_cost is None else batch_cost
        self.pipeline_depth = 3  # batches in flight: the one the host decodes and those queued behind it
        # A number: requests are started (schema walked, level 0 tokenised) while the device computes,
        # until the pool of forwards waiting for a plan holds this many batches' tokens (see serve's
        # admit). None (default): every waiting request is started before batches are planned. With
        # the planner's runs that was 25 % faster on ner, 5 % slower on re and equal on mix (one H200,
        # bench/results/h200-run8/scheduler_ab.jsonl).
        self.admit_batches = admit_batches
        self.limits = limits
        self.stats = EngineStats()
        relax_gc()

    @property
    def model_name(self) -> str:
        return self.model_dir.name

    def infer(self, items: Sequence[tuple[Any, Any]]) -> list[Outcome]:
        """Run (text, schema) pairs; invalid ones come back with an error, in input order."""
        outcomes = [Outcome() for _ in items]
        valid: dict[int, Request] = {}
        for i, (text, schema) in enumerate(items):
            try:
                valid[i] = validate(text, schema, self.limits)
            except RequestError as exc:
                outcomes[i].error = exc
        for i, outcome in zip(valid, self.run_requests(list(valid.values()))):
            outcomes[i] = outcome
        return outcomes

    def run_requests(self, requests: Sequence[Request]) -> list[Outcome]:
        """Run requests that already passed `validate` (the worker validates while decoding)."""
        outcomes = [Outcome() for _ in requests]

        def finish(i: Hashable, outcome: Outcome) -> None:
            outcomes[i] = outcome  # type: ignore[index]

        self.serve(ListSource(requests), finish)
        return outcomes

    def run_isolated(self, requests: Sequence[Request]) -> list[Outcome]:
        """`run_requests`, but a failure of the whole call is retried on halves, down to the request
        that causes it, so one bad request costs itself and not its batch mates."""
        try:
            return self.run_requests(requests)
        except DeviceLost:
            raise  # no request failed: the device process is gone, and so must this caller be
        except Exception as exc:  # noqa: BLE001 - any device/runtime failure
            if len(requests) == 1:
                return [Outcome(error=RequestError("inference_error", f"{type(exc).__name__}: {exc}"))]
            half = len(requests) // 2
            return self.run_isolated(requests[:half]) + self.run_isolated(requests[half:])

    def serve(self, source: Source, finish: Callable[[Hashable, Outcome], None]) -> None:
        """Run every request `source` hands out, calling `finish(key, outcome)` as each one ends.

        Returns once the source is exhausted (`take` gives None and `wait` says no more will come)
        and every started request has finished. An exception (not an out-of-memory, which splits
        batches) propagates; the requests started and not yet finished are then lost to this call.
        """
        outcomes: dict[Hashable, Outcome] = {}
        solvers: dict[Hashable, Solver] = {}
        links: dict[Hashable, list[Links | None]] = {}  # per request: its current forwards' links so far
        missing: dict[Hashable, int] = {}
        pool: list[_Item] = []

        def advance(i: Hashable, got: list[Links] | None) -> None:
            forwards = self._step(i, solvers, outcomes, got)
            if forwards:
                links[i] = [None] * len(forwards)
                missing[i] = len(forwards)
                pool.extend((i, k, f) for k, f in enumerate(forwards))
            else:
                finish(i, outcomes.pop(i))

        def admit(step: bool) -> bool:
            """Start requests; returns whether it started any (False once none is waiting).

            Without `step` (the planner found no batch queued): until the pool holds one batch's
            tokens, or every waiting request if `admit_batches` is None. With `step` (after each
            decoded batch): up to two batches' tokens more, until the pool holds `admit_batches`
            batches'. So the device starts at once, this host work overlaps the device's instead of
            preceding it, and the pool grows while the device works: a bigger pool sorts more
            forwards together.
            """
            if self.admit_batches is None:
                target = limit = math.inf
            elif step:
                target, limit = self.batch_tokens * self.admit_batches, 2 * self.batch_tokens
            else:
                target, limit = self.batch_tokens, math.inf
            tokens = sum(len(f.ids) for _, _, f in pool)
            added = 0
            started = False
            while tokens < target and added < limit:
                group = []
                while len(group) < ADMIT_GROUP and (nxt := source.take()) is not None:
                    group.append(nxt)
                if not group:
                    break
                started = True
                drained = len(group) < ADMIT_GROUP  # none waits now: this round ends with this group
                texts = self.tokenizer.pieces_of([req.text for _, req in group])
                for (i, req), text_pieces in zip(group, texts):
                    outcomes[i] = Outcome()
                    solvers[i] = solve(self.tokenizer, req.text, req.schema, text_pieces)
                    before = len(pool)
                    advance(i, None)
                    new = sum(len(f.ids) for _, _, f in pool[before:])
                    tokens += new
                    added += new
                if drained:
                    break
            return started

        def deliver(item: _Item, link: Links | BaseException) -> None:
            i, k, _ = item
            if i not in solvers:
                return  # an earlier forward of this request failed
            if isinstance(link, BaseException):
                outcomes[i].error = RequestError("inference_error", f"forward failed: {link}")
                solvers.pop(i).close()
                finish(i, outcomes.pop(i))
                return
            links[i][k] = link
            missing[i] -= 1
            if missing[i] == 0:
                got = links.pop(i)
                outcomes[i].forwards += len(got)
                advance(i, got)  # type: ignore[arg-type]

        self._pipeline(pool, deliver, admit, source)

    def _step(self, i: Hashable, solvers: dict[Hashable, Solver], outcomes: dict[Hashable, Outcome],
              links: list[Links] | None) -> list[Forward] | None:
        """Step request i until it needs forwards (returned) or finishes (None)."""
        solver = solvers[i]
        try:
            while True:
                forwards = solver.send(links) if links is not None else next(solver)
                if forwards:
                    return forwards
                links = []
        except StopIteration as done:
            outcomes[i].output = done.value
        except Exception as exc:  # a decoding bug must cost one request, not the batch
            outcomes[i].error = RequestError("inference_error", f"{type(exc).__name__}: {exc}")
        solvers.pop(i)
        return None

    def plan(self, forwards: Sequence[Forward]) -> list[list[int]]:
        """Batches (indices into `forwards`): the token-budget policy of `batching.plan_batches`."""
        return plan_batches([len(f.ids) for f in forwards], self.batch_tokens, self.max_batch, self.batch_cost)

    def _pipeline(self, pool: list[_Item], deliver: Callable[[_Item, Links | BaseException], None],
                  admit: Callable[[bool], bool], source: Source) -> None:
        """Run every forward `admit` and `deliver` queue into `pool` (new requests, next levels).

        Up to `pipeline_depth` - 1 batches are queued on the device behind the one the host is
        copying out and decoding (whose results may queue next-level forwards into `pool`), so the
        device keeps computing while the host works. After each decoded batch a slice of new requests
        is started (`admit`), so that host work too overlaps the device instead of preceding all of
        it. Whenever the planned batches run out, the pool is topped up and planned, so a level's
        forwards are mostly batched together as in a wavefront (waiting for the batches in flight to
        join them left the device idle: re -11 %, mix -9 % on an H100, bench/results/run3b). A batch
        that runs out of device memory is split in half and retried; a single forward that does not
        fit fails alone. With nothing left to run, `source.wait` blocks until more requests can be
        admitted (True) or none will come (False: return).

        From a live source (the server's queue), a pool under half a batch budget is planned only
        when nothing is in flight: requests that arrive while the device works join it, and the
        batches come out fuller. Each batch costs 13-16 ms of host dispatch whatever its size
        (bench/host_stages.py), so planning every trickle of arrivals made the worker path pay it
        for batches of a few hundred messages.
        """
        queue: deque[list[_Item]] = deque()
        inflight: deque[tuple[list[_Item], Launched]] = deque()
        while True:
            while len(inflight) < self.pipeline_depth:
                if not queue:
                    admit(False)
                    if pool and (not inflight or not source.live
                                 or 2 * sum(len(f.ids) for _, _, f in pool) >= self.batch_tokens):
                        queue.extend([pool[k] for k in batch] for batch in self.plan([f for _, _, f in pool]))
                        pool.clear()
                if not queue:
                    break
                items = queue.popleft()
                prepared = self.runner.prepare([f for _, _, f in items])
                launched = self._guard(items, queue, deliver, lambda p=prepared: self.runner.launch(p))
                if launched is not None:
                    inflight.append((items, launched))
            if not inflight:
                if not queue and not pool and not admit(False) and not source.wait():
                    return
                continue
            items, launched = inflight.popleft()
            fetched = self._guard(items, queue, deliver, lambda x=launched: self.runner.fetch(x))
            if fetched is not None:
                self._count(launched.prepared.lengths)
                for item, link in zip(items, self.runner.collect(fetched)):
                    deliver(item, link)
                admit(True)

    def _guard(self, items: list[_Item], queue: deque[list[_Item]],
               deliver: Callable[[_Item, Links | BaseException], None], stage: Callable[[], Any]) -> Any:
        """Run one device stage of a batch; out of memory splits the batch back into the queue."""
        try:
            return stage()
        except torch.OutOfMemoryError as exc:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if len(items) == 1:
                deliver(items[0], exc)
                return None
            self.stats.oom_splits += 1
            half = len(items) // 2
            queue.extendleft([items[half:], items[:half]])
            return None

    def _count(self, lengths: list[int]) -> None:
        self.stats.batches += 1
        self.stats.forwards += len(lengths)
        self.stats.real_tokens += sum(lengths)
        self.stats.padded_tokens += max(lengths) * len(lengths)
