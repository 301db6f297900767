"""The inference engine: many (text, schema) requests in, the reference pipeline's outputs out.

Requests advance level by level together (a wavefront): all level-0 forwards of all requests are
packed into token-budget batches, decoded, then all level-1 forwards, and so on. A request's
answer never depends on its batch mates (padding is isolated), and one failing request or
forward never fails the others.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .batching import plan_batches
from .decode import Links
from .recursion import Forward, Solver, solve
from .requests import Limits, Request, RequestError, validate
from .runner import DTYPES, ForwardRunner
from .tokenizer import RexTokenizer
from .weights import load_model, resolve_model_dir


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
                 cls_score: str = "logit", attention: str = "sdpa", compile_encoder: bool = False) -> None:
        self.model_dir = resolve_model_dir(str(model), cache_dir)
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = False  # fp32 must mean fp32: exact reference answers
            torch.backends.cudnn.allow_tf32 = False
        self.tokenizer = RexTokenizer(self.model_dir)
        net, self.config = load_model(self.model_dir, device=str(self.device))
        net.set_attention(attention)  # falls back to the exact SDPA path if the fused one fails its self-check
        if dtype != "fp32":
            net.store_matmul_weights(DTYPES[dtype])  # same numbers as autocast's per-call casts, once
        if compile_encoder:
            net.compile_encoder()
        self.runner = ForwardRunner(net, self.tokenizer.special, self.device, dtype, cls_score)
        self.dtype = dtype
        self.batch_tokens = batch_tokens
        self.max_batch = max_batch
        self.limits = limits
        self.stats = EngineStats()

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
        solvers: dict[int, Solver] = {}
        pending: dict[int, list[Forward]] = {}
        for i, req in enumerate(requests):
            solvers[i] = solve(self.tokenizer, req.text, req.schema)
            self._advance(i, solvers, pending, outcomes, None)
        while pending:
            order = [(i, f) for i, forwards in pending.items() for f in forwards]
            links = self.run_forwards([f for _, f in order])
            by_request: dict[int, list] = {i: [] for i in pending}
            for (i, _), link in zip(order, links):
                by_request[i].append(link)
            pending = {}
            for i, got in by_request.items():
                failure = next((x for x in got if isinstance(x, BaseException)), None)
                if failure is not None:
                    outcomes[i].error = RequestError("inference_error", f"forward failed: {failure}")
                    solvers.pop(i).close()
                    continue
                outcomes[i].forwards += len(got)
                self._advance(i, solvers, pending, outcomes, got)
        return outcomes

    def _advance(self, i: int, solvers: dict[int, Solver], pending: dict[int, list[Forward]],
                 outcomes: list[Outcome], links: list[Links] | None) -> None:
        """Step request i until it needs forwards (queued in `pending`) or finishes."""
        solver = solvers[i]
        try:
            while True:
                forwards = solver.send(links) if links is not None else next(solver)
                if forwards:
                    pending[i] = forwards
                    return
                links = []
        except StopIteration as done:
            outcomes[i].output = done.value
        except Exception as exc:  # a decoding bug must cost one request, not the batch
            outcomes[i].error = RequestError("inference_error", f"{type(exc).__name__}: {exc}")
        solvers.pop(i)

    def run_forwards(self, forwards: Sequence[Forward]) -> list[Links | BaseException]:
        """Every forward's links; batches that run out of device memory are split and retried."""
        lengths = [len(f.ids) for f in forwards]
        results: list[Links | BaseException] = [RuntimeError("not run")] * len(forwards)
        for batch in plan_batches(lengths, self.batch_tokens, self.max_batch):
            self._run_batch(forwards, batch, results)
        return results

    def _run_batch(self, forwards: Sequence[Forward], batch: list[int], results: list) -> None:
        try:
            links = self.runner.run([forwards[i] for i in batch])
        except torch.OutOfMemoryError as exc:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if len(batch) == 1:
                results[batch[0]] = exc
                return
            self.stats.oom_splits += 1
            half = len(batch) // 2
            self._run_batch(forwards, batch[:half], results)
            self._run_batch(forwards, batch[half:], results)
            return
        width = max(len(forwards[i].ids) for i in batch)
        self.stats.batches += 1
        self.stats.forwards += len(batch)
        self.stats.real_tokens += sum(len(forwards[i].ids) for i in batch)
        self.stats.padded_tokens += width * len(batch)
        for i, link in zip(batch, links):
            results[i] = link
