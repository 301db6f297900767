"""The write-up's multi-GPU strategy as a baseline: the engine's forward under ``torch.nn.DataParallel``.

One process; every batch is split across the GPUs, the replicas are re-broadcast from GPU 0 on each
forward and the logits gathered back on GPU 0. Everything else is the engine's (token-budget
batches, pipelining, the device-side link join on GPU 0), so against one engine process per GPU
(`rex_stream.bench.multiproc --gpus N --procs N`) only the parallel strategy differs. The same
process first times the engine on GPU 0 alone.

`python -m rex_stream.bench.dataparallel --model DIR --workload ner --messages 20000 [--gpus 2]`
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..engine.engine import Engine
from .report import emit
from .worker_path import run_engine
from .workloads import load_workload


class _Autocast(nn.Module):
    """Runs the model under autocast to ``dtype``: DataParallel's worker threads default to fp16."""

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.model = model
        self.dtype = dtype

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        with torch.autocast("cuda", dtype=self.dtype):
            return self.model(*args, **kwargs)


class DataParallelModel(nn.DataParallel):
    """``DataParallel`` over a RexModel that still answers the runner's questions about the model.

    RexModel caches tensors derived from its weights outside the state dict (relative tables, the
    stacked QKV and split head weights); a replica's shallow copy would point at GPU 0's. Replicas
    on the other GPUs drop them and rebuild them from their own weights on their forward: part of
    what DataParallel's per-forward replication costs here.
    """

    def replicate(self, module: nn.Module, device_ids: list[int]) -> list[nn.Module]:
        replicas = super().replicate(module, device_ids)
        for replica in replicas[1:]:
            replica.model._rel_cache = {}  # its own (the copy shares GPU 0's dict)
            replica.model.clear_cache()
        return replicas

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "module":  # not set yet: no inner model to ask
                raise
            return getattr(self.module.model, name)


def _rate(engine: Engine, items: list) -> float:
    """Messages/s of a second whole run (the first one warms the kernels)."""
    run_engine(engine, items, len(items))
    return run_engine(engine, items, len(items))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--workload", default="ner")
    p.add_argument("--messages", type=int, default=20_000)
    p.add_argument("--gpus", type=int, default=torch.cuda.device_count())
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--batch-tokens", type=int, default=131_072)
    p.add_argument("--attention", default="triton")
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    items = load_workload(a.workload, os.environ.get("REX_SHARED", "../shared"), a.messages)
    engine = Engine(a.model, device="cuda:0", dtype=a.dtype, batch_tokens=a.batch_tokens, attention=a.attention)
    one = _rate(engine, items)
    model = engine.runner.model
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(a.dtype, torch.float32)
    engine.runner.model = DataParallelModel(_Autocast(model, dtype), device_ids=list(range(a.gpus)))
    parallel = _rate(engine, items)
    emit({"workload": a.workload, "messages": len(items), "gpus": a.gpus, "dtype": a.dtype,
          "batch_tokens": a.batch_tokens, "attention_active": model.fast_path_status()["attention_active"],
          "engine_one_gpu_msgs_s": round(one, 1), "dataparallel_msgs_s": round(parallel, 1),
          "dataparallel_vs_one_gpu": round(parallel / one, 3)}, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
