"""Attention kernel A/B, same process, same card: `python bench/attention_ab.py PREVIOUS.py MODEL_DIR [N]`.

PREVIOUS.py is an earlier `rex_stream/engine/triton_attention.py` (e.g. `git show REV:rex_stream/
engine/triton_attention.py > prev.py`); its `_launch` is swapped in for the current one, so it must
take the same arguments (REV 2cbb96c or later: the token-axis kernel). Prints JSON lines:

1. per synthetic bf16 batch of the base model (rows x padded length): the whole
   `disentangled_attention` (tables + kernel) with the previous and the current kernel (and any
   `EXTRA_CONFIGS` of the current one), median ms (`triton.testing.do_bench`);
2. per workload (ner: N messages, default 20,000; re: N / 2; mix: N / 10): the engine (bf16, default
   fusions) with each kernel: messages/s of two passes, the summed GPU kernel time of a profiled pass
   per 1,000 messages, and the max |logit| difference between the kernels on one batch.
"""
import importlib.util
import json
import sys

import torch
import triton.testing

from rex_stream.bench.worker_path import engine_ab_pass
from rex_stream.bench.workloads import load_workload
from rex_stream.engine import triton_attention as current
from rex_stream.engine.engine import Engine
from rex_stream.engine.fast_attention import synthetic_attention_args
from rex_stream.engine.recursion import solve

spec = importlib.util.spec_from_file_location("previous_attention", sys.argv[1])
previous = importlib.util.module_from_spec(spec)
spec.loader.exec_module(previous)
KERNELS = {"previous": previous._launch, "current": current._launch}
# Further tile configurations of the current kernel to time (d530c79 swept its HEADS and num_stages here).
EXTRA_CONFIGS: list[dict] = []


def use(kernel: str) -> None:
    current._launch = KERNELS[kernel]


def micro() -> None:
    device = torch.device("cuda")
    variants = [("previous", None), ("current", None)] + [("current", config) for config in EXTRA_CONFIGS]
    for batch, length in [(1024, 64), (768, 80), (512, 128), (256, 256), (96, 512)]:
        args = synthetic_attention_args(batch, length, device)
        use("previous")
        ref = current.disentangled_attention(*args).float()
        base = None
        for kernel, config in variants:
            use(kernel)
            got = current.disentangled_attention(*args, config=config).float()
            ms = triton.testing.do_bench(lambda: current.disentangled_attention(*args, config=config),
                                         warmup=25, rep=200)
            base = base or ms
            print(json.dumps({"shape": [batch, length], "kernel": kernel, "config": config, "ms": round(ms, 4),
                              "speedup": round(base / ms, 3), "max_diff": float((got - ref).abs().max())}),
                  flush=True)
    use("current")


def engine_ab(model: str, count: int) -> None:
    engine = Engine(model, device="cuda", dtype="bf16", batch_tokens=65536, attention="triton")
    for workload, n in (("ner", count), ("re", count // 2), ("mix", count // 10)):
        items = load_workload(workload, None, n)
        forwards = [f for text, schema in items[:400] for f in next(solve(engine.tokenizer, text, schema), [])][:300]
        batch = engine.runner.tensors(forwards)
        keep = batch["valid"][:, :, None] & batch["valid"][:, None, :]
        engine.infer(items[:2048])  # warm-up: the kernels compile here
        logits = {}
        for kernel in ("previous", "current", "previous", "current"):
            use(kernel)
            logits[kernel] = engine.runner.logits(batch)
            engine.infer(items[:1024])
            print(json.dumps({"workload": workload, "kernel": kernel, **engine_ab_pass(engine, items),
                              "max_abs_logit_diff": float((logits[kernel] - logits["previous"]).abs()[keep].max())}),
                  flush=True)
    use("current")


if __name__ == "__main__":
    micro()
    engine_ab(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 20_000)
