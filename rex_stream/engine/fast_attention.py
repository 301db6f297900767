"""FlexAttention route for the encoder's disentangled attention (``RexModel.set_attention("flex")``).

The default ("sdpa") path builds, per layer, two gathered [B, H, L, L] bias tensors from an int64
[B, L, L] relative-distance index and passes them as a dense additive mask. Here the bias is added
inside the attention kernel instead:

* ``c2p[b,h,i,j] = Qp[b,h,i,d(i,j)]`` and ``p2c[b,h,i,j] = Kp[b,h,j,d(i,j)]`` where
  ``Qp = q @ pos_k[lo:hi]^T`` and ``Kp = k @ pos_q[lo:hi]^T`` are [B, H, L, R] tables (R <= 2L-1)
  computed once per layer, and ``d(i,j) = clamp(pos[b,i] - pos[b,j] + S, lo, hi-1) - lo`` is
  computed in ``score_mod`` from the [B, L] position ids (as ``clamp(pos[b,i] - pos[b,j] + S - lo, 0, R-1)``);
* prompt isolation + padding is a ``mask_mod`` over the per-token ``group``/``slot``/``valid``
  vectors (the rule of ``layout.attention_allowed``), or over a dense [B, L, L] mask when the
  caller only has that.

Rows with no allowed key come out as zeros (flex_attention's convention; the caller also zeroes
them explicitly, as the SDPA path does).

On CUDA, flex_attention only becomes a fused kernel under ``torch.compile``; eager calls run an
unfused reference that materialises the scores (fine for CPU tests, slow on a GPU).

The fused Triton kernel (``set_attention("triton")``) computes the same bias in-kernel without any
L×L tensor; see ``triton_attention``.

``python -m rex_stream.engine.fast_attention`` runs a small sdpa/flex/triton/compiled
micro-benchmark (see ``main``).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)

try:  # prototype API; absent or broken builds make the flex path unavailable, never an import error
    from torch.nn.attention.flex_attention import (
        BlockMask,
        create_block_mask,
        flex_attention,
    )

    _IMPORT_ERROR: str | None = None
except Exception as exc:  # noqa: BLE001  # pragma: no cover - any import failure means: no flex
    BlockMask = Any  # type: ignore[misc,assignment]
    create_block_mask = flex_attention = None  # type: ignore[assignment]
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

BLOCK_SIZE = 128


def flex_unavailable_reason() -> str | None:
    """None if flex_attention can be used at all in this torch build, else why not."""
    if _IMPORT_ERROR is not None:
        return f"torch.nn.attention.flex_attention unavailable ({_IMPORT_ERROR})"
    if not torch._dynamo.is_dynamo_supported():
        return "flex_attention needs TorchDynamo, which this Python/torch build does not support"
    return None


def layout_allowed(group: torch.Tensor, slot: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Dense [B, L, L] bool mask from the per-token vectors (same rule as ``layout.attention_allowed``)."""
    gi, gj = group[:, :, None], group[:, None, :]
    si, sj = slot[:, :, None], slot[:, None, :]
    other_group = (gi >= 0) & (gj >= 0) & (gi != gj)
    other_type = (gi >= 0) & (gi == gj) & (si >= 0) & (sj >= 0) & (si != sj)
    valid = valid.bool()
    return ~(other_group | other_type) & valid[:, :, None] & valid[:, None, :]


def layout_block_mask(group: torch.Tensor, slot: torch.Tensor, valid: torch.Tensor) -> BlockMask:
    """BlockMask for prompt isolation + padding, evaluated from [B, L] vectors (no L×L input)."""
    valid = valid.bool()

    def mask_mod(b: torch.Tensor, h: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        gi, gj = group[b, i], group[b, j]
        si, sj = slot[b, i], slot[b, j]
        other_group = (gi >= 0) & (gj >= 0) & (gi != gj)
        other_type = (gi >= 0) & (gi == gj) & (si >= 0) & (sj >= 0) & (si != sj)
        return valid[b, i] & valid[b, j] & ~other_group & ~other_type

    batch, length = group.shape
    return create_block_mask(mask_mod, batch, None, length, length, device=group.device, BLOCK_SIZE=BLOCK_SIZE)


def dense_block_mask(allowed: torch.Tensor) -> BlockMask:
    """BlockMask over an already materialised [B, L, L] bool mask (callers without group/slot)."""

    def mask_mod(b: torch.Tensor, h: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        return allowed[b, i, j]

    batch, length, _ = allowed.shape
    return create_block_mask(mask_mod, batch, None, length, length, device=allowed.device, BLOCK_SIZE=BLOCK_SIZE)


class FlexKernel:
    """Chooses eager or ``torch.compile``-d flex_attention and keeps the compiled callable."""

    def __init__(self, compile: bool | None = None, dynamic: bool | None = True) -> None:
        self.compile = compile  # None: compile on CUDA only
        self.dynamic = dynamic
        self._compiled: Callable[..., torch.Tensor] | None = None

    def compiled_on(self, device: torch.device) -> bool:
        return self.compile if self.compile is not None else device.type == "cuda"

    def degrade(self, device: torch.device) -> bool:
        """After a failure of the shape-polymorphic kernel: switch to static shapes (one kernel per
        (B, L), dynamo's recompile limit applies). False when there is nothing left to degrade."""
        if not self.compiled_on(device) or self.dynamic is False:
            return False
        self.dynamic = False
        self._compiled = None
        return True

    def __call__(self, device: torch.device) -> Callable[..., torch.Tensor]:
        if torch.compiler.is_compiling():  # inside a compiled encoder: dynamo fuses it in place
            return flex_attention
        if not self.compiled_on(device):
            return _eager_flex
        if self._compiled is None:
            # Separate code objects, so the static kernel gets its own dynamo recompile budget.
            target = _flex_dynamic if self.dynamic is not False else _flex_static
            self._compiled = torch.compile(target, dynamic=self.dynamic)
        return self._compiled


# Smaller tiles and one pipeline stage: with the bias tables the score_mod reads, the default
# tiles need more shared memory than an H100 has (249,856 > 232,448 bytes, seen on the card).
CUDA_KERNEL_OPTIONS = {"BLOCK_M": 64, "BLOCK_N": 64, "num_stages": 1}


def _flex_dynamic(*args: Any, **kwargs: Any) -> torch.Tensor:
    if args and args[0].is_cuda:
        kwargs.setdefault("kernel_options", CUDA_KERNEL_OPTIONS)
    return flex_attention(*args, **kwargs)


def _flex_static(*args: Any, **kwargs: Any) -> torch.Tensor:
    if args and args[0].is_cuda:
        kwargs.setdefault("kernel_options", CUDA_KERNEL_OPTIONS)
    return flex_attention(*args, **kwargs)


def _eager_flex(*args: Any, **kwargs: Any) -> torch.Tensor:
    with warnings.catch_warnings():  # "called without torch.compile": intended on CPU
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        return flex_attention(*args, **kwargs)


def flex_context(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pos_q: torch.Tensor,
    pos_k: torch.Tensor,
    pos: torch.Tensor,
    offset: int,
    block_mask: BlockMask,
    scale: float,
    kernel: Callable[..., torch.Tensor],
) -> torch.Tensor:
    """Attention context [B, H, L, D] with the disentangled bias added in ``score_mod``.

    ``pos_q``/``pos_k``: the reachable rows [H, R, D] of the (pre-scaled) relative projections;
    ``offset = S - lo``, so ``d(i, j) = clamp(pos[b, i] - pos[b, j] + offset, 0, R - 1)``. Both ints
    become symbols under ``dynamic=True``; every captured tensor is a graph input or a matmul output
    (the CPU inductor template rejects captured pointwise results).
    """
    if q.device.type == "cpu" and torch.compiler.is_compiling():
        # The CPU inductor template reads q/k/v sizes from a 4-D buffer, not a view of the projection.
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    qp = q @ pos_k.transpose(-1, -2)  # [B, H, L, R]
    kp = k @ pos_q.transpose(-1, -2)
    top = pos_k.shape[-2] - 1  # a plain int: dynamo makes it symbolic under dynamic=True

    def score_mod(score: torch.Tensor, b: torch.Tensor, h: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        d = (pos[b, i] - pos[b, j] + offset).clamp(0, top)
        return score + qp[b, h, i, d] + kp[b, h, j, d]

    return kernel(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale)


# ---------------------------------------------------------------------------------------------
# micro-benchmark (not a test): python -m rex_stream.engine.fast_attention [--device cuda] ...


def synthetic_batch(batch: int, length: int, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """Rex-shaped padded batch: ``[CLS]`` + 3 prefix groups with 2-4 ``[TYPE]`` spans + ``[SEP]`` text ``[SEP]``.

    Row 0 is exactly ``length`` long, the others 50-100 % of it (right padding). Layouts come from
    ``layout.build_layout``, i.e. the runner's rule.
    """
    from rex_stream.engine.layout import build_layout
    from rex_stream.engine.tokenizer import SpecialIds

    sp = SpecialIds(cls=1, sep=2, pad=0, prefix=12800, type=12801, classify=12802, multi_classify=12803)
    gen = torch.Generator().manual_seed(seed)
    def word() -> int:
        return int(torch.randint(100, 12000, (1,), generator=gen))

    hint = [sp.cls]
    for g in range(3):
        hint += [sp.prefix] + [word() for _ in range(g)]
        for _ in range(2 + g):
            hint += [sp.type] + [word() for _ in range(2)]
    hint = hint[: max(2, length // 3)] + [sp.sep]
    out = {
        "ids": torch.full((batch, length), sp.pad), "pos": torch.zeros(batch, length, dtype=torch.long),
        "group": torch.full((batch, length), -1), "slot": torch.full((batch, length), -1),
        "valid": torch.zeros(batch, length, dtype=torch.bool),
    }
    for b in range(batch):
        n = length if b == 0 else int(torch.randint(max(len(hint) + 2, length // 2), length + 1, (1,), generator=gen))
        ids = hint + [word() for _ in range(n - len(hint) - 1)] + [sp.sep]
        layout = build_layout(ids, sp)
        out["ids"][b, :n] = torch.tensor(ids)
        for key, arr in zip(("pos", "group", "slot"), layout):
            out[key][b, :n] = torch.from_numpy(arr)
        out["valid"][b, :n] = True
    return {k: t.to(device) for k, t in out.items()}


def synthetic_attention_args(batch: int, length: int, device: torch.device, heads: int = 12, dim: int = 64,
                             span: int = 256, dtype: torch.dtype = torch.bfloat16) -> tuple[Any, ...]:
    """Positional arguments of ``triton_attention.disentangled_attention`` for one layer of a
    ``synthetic_batch`` (base-size defaults): what the kernel benchmarks time."""
    t = {k: v.to(device) for k, v in synthetic_batch(batch, length, torch.device("cpu"), seed=1).items()}
    lo, hi = max(0, span - length + 1), min(2 * span, span + length)
    qkv = torch.randn(batch, length, 3, heads, dim, device=device, dtype=dtype)
    q, k, v = (qkv[:, :, n].transpose(1, 2) for n in range(3))  # strided views, as the model's
    pos_q, pos_k = (torch.randn(heads, hi - lo, dim, device=device, dtype=dtype) for _ in range(2))
    index = torch.arange(1, length + 1, device=device, dtype=torch.int32)
    lengths = torch.where(t["valid"], index, 0).amax(-1)
    return q, k, v, pos_q, pos_k, t["pos"], t["group"], t["slot"], t["valid"], lengths, span - lo, 0.125


def _time(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> None:
    """Compare sdpa / flex / triton (/ compiled encoder) forwards of a random model; one JSON line per case."""
    import tempfile
    from pathlib import Path

    from rex_stream.engine.random_model import default_vocab_path, write_random_model
    from rex_stream.engine.weights import load_model

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--size", default="base", choices=("base", "tiny"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", default="fp32", help="comma-separated subset of fp32,bf16,fp16 (autocast)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lengths", default="128", help="comma-separated sequence lengths")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cases", default="sdpa,flex",
                   help="subset of sdpa,flex,triton,sdpa+compile,flex+compile,triton+compile")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode of the compiled-encoder cases")
    p.add_argument("--flex-compile", default="auto", choices=("auto", "on", "off"),
                   help="compile the flex kernel (auto: on CUDA only)")
    p.add_argument("--static", action="store_true", help="static shapes (dynamic=False) for all compilation")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message).600s")

    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        vocab = default_vocab_path()
        if not vocab.is_file():  # the benchmark never tokenises: any vocab file will do
            vocab = Path(tmp) / "vocab.txt"
            vocab.write_text("[PAD]\n[CLS]\n[SEP]\n[UNK]\n[MASK]\n", encoding="utf-8")
        model, _ = load_model(write_random_model(Path(tmp) / "model", args.size, seed=0, vocab_path=vocab))
    model.to(device).eval()
    dynamic = not args.static
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    dtypes = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    batches = {length: synthetic_batch(args.batch, length, device) for length in map(int, args.lengths.split(","))}
    refs: dict[tuple[str, int], torch.Tensor] = {}
    # Cases outermost: each configuration compiles once and then serves every dtype and length.
    for case in args.cases.split(","):
        attention, _, compiled = case.partition("+")
        model.set_attention(attention, compile={"auto": None, "on": True, "off": False}[args.flex_compile],
                            dynamic=dynamic)
        model.compile_encoder(mode=args.compile_mode, dynamic=dynamic, enabled=bool(compiled))
        for dtype_name in args.dtypes.split(","):
            dtype = dtypes[dtype_name]
            for length, t in batches.items():
                def forward(t: dict[str, torch.Tensor] = t, dtype: torch.dtype | None = dtype) -> torch.Tensor:
                    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                        return model(t["ids"], t["pos"], None, t["valid"], group=t["group"], slot=t["slot"])

                t0 = time.perf_counter()
                logits = forward()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                first = time.perf_counter() - t0
                seconds = _time(forward, device, args.repeats)
                status = model.fast_path_status()
                row: dict[str, Any] = {
                    "case": case, "device": name, "size": args.size, "dtype": dtype_name, "B": args.batch, "L": length,
                    "real_tokens": int(t["valid"].sum()), "first_call_s": round(first, 3),
                    "best_ms": round(seconds * 1e3, 3), "seq_per_s": round(args.batch / seconds, 1),
                    "fast_path_used": model.attention == attention and (not compiled or not status["compile_errors"]),
                    "status": status,
                }
                if device.type == "cuda":
                    row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                ref = refs.setdefault((dtype_name, length), logits)
                if ref is not logits:
                    mask = t["valid"][:, :, None] & t["valid"][:, None, :]
                    row["max_abs_logit_diff_vs_first_case"] = float((logits - ref).abs()[mask].max())
                    row["max_abs_logit_first_case"] = float(ref.abs()[mask].max())
                    row["link_disagreement"] = float(((logits > 0) != (ref > 0))[mask].float().mean())
                print(json.dumps(row), flush=True)
    model.set_attention("sdpa")
    model.compile_encoder(enabled=False)


if __name__ == "__main__":
    main()
