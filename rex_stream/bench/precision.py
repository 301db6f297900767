"""Reduced precision against our own fp32 path: logit error, output agreement, and flip analysis.

`python -m rex_stream.bench.precision --model DIR --cases FILE.jsonl --device cuda --dtype bf16`

1. Every forward the fp32 engine runs for the cases is run again, on the same inputs, in the
   reduced dtype; over the decodable region (text×text upper triangle, text×hint, hint×text) we
   record the max and p99 absolute logit error and the spread (std) of the fp32 logits.
2. Both engines answer all cases; the share with identical outputs is reported.
3. Every link whose sign differs between the two is a "flip"; we report the largest |fp32 logit|
   among flips. If it is below the measured max error, every output difference is explained by
   links that were within the error of zero in fp32.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ..engine.engine import Engine
from ..engine.recursion import Forward
from ..engine.requests import Limits
from .report import emit


def _region(t: dict[str, torch.Tensor], width: int) -> torch.Tensor:
    idx = torch.arange(width, device=t["ids"].device)
    nh = t["nh"][:, None, None]
    text_row, text_col = idx[None, :, None] >= nh, idx[None, None, :] >= nh
    valid = t["valid"][:, :, None] & t["valid"][:, None, :]
    return ((text_row & text_col & (idx[:, None] <= idx[None, :])) | (text_row ^ text_col)) & valid


def compare(model: str, cases: list[dict], device: str, dtype: str, batch_tokens: int = 32768,
            attention: str = "auto", fusions: frozenset[str] | None = None) -> dict:
    limits = Limits(allow_empty_text=True)
    ref = Engine(model, device=device, dtype="fp32", batch_tokens=batch_tokens, limits=limits)
    low = Engine(model, device=device, dtype=dtype, batch_tokens=batch_tokens, limits=limits, attention=attention,
                 fusions=fusions)
    items = [(c["text"], c["schema"]) for c in cases]

    captured: list[Forward] = []
    original = ref.plan

    def capture(forwards):  # the fp32 engine's forwards, all levels (each is planned once)
        captured.extend(forwards)
        return original(forwards)

    ref.plan = capture  # type: ignore[method-assign]
    t0 = time.perf_counter()
    out_ref = ref.infer(items)
    t_ref = time.perf_counter() - t0
    ref.plan = original  # type: ignore[method-assign]
    t0 = time.perf_counter()
    out_low = low.infer(items)
    t_low = time.perf_counter() - t0

    max_err, spread_sq, count, flips, flip_max_abs = 0.0, 0.0, 0, 0, 0.0
    samples: list[torch.Tensor] = []
    gen = torch.Generator(device="cpu").manual_seed(0)
    for start in range(0, len(captured), 16):
        chunk = captured[start:start + 16]
        t = ref.runner.tensors(chunk)
        a = ref.runner.logits(t)
        b = low.runner.logits(t)
        region = _region(t, a.shape[1])
        ra, rb = a[region], b[region]
        err = (ra - rb).abs()
        max_err = max(max_err, float(err.max())) if err.numel() else max_err
        spread_sq += float((ra.double() ** 2).sum())
        count += ra.numel()
        flipped = (ra > 0) != (rb > 0)
        flips += int(flipped.sum())
        if flipped.any():
            flip_max_abs = max(flip_max_abs, float(ra[flipped].abs().max()))
        if err.numel():
            pick = torch.randint(0, err.numel(), (min(200_000, err.numel()),), generator=gen).to(err.device)
            samples.append(err[pick].float().cpu())
    all_samples = torch.cat(samples) if samples else torch.zeros(1)
    p99 = float(torch.quantile(all_samples[:16_000_000], 0.99))
    spread = (spread_sq / max(count, 1)) ** 0.5
    same = sum(x.output == y.output for x, y in zip(out_ref, out_low))
    differing = [c["id"] for c, x, y in zip(cases, out_ref, out_low) if x.output != y.output]
    return {
        "model": model, "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "dtype": dtype, "attention": low.runner.model.attention,
        "fusions": low.runner.model.fast_path_status()["fusions"], "cases": len(cases), "forwards": len(captured),
        "logit_max_abs_error": max_err, "logit_p99_abs_error": p99, "logit_rms_fp32": spread,
        "max_error_over_rms": max_err / spread if spread else None,
        "identical_outputs": same, "identical_share": same / len(cases),
        "differing_cases": differing[:50],
        "link_flips": flips, "flip_max_abs_fp32_logit": flip_max_abs,
        "flips_within_error": flip_max_abs <= max_err,
        "seconds_fp32": t_ref, "seconds_low": t_low,
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d", time.gmtime()),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--cases", required=True, help="JSON Lines with text and schema (e.g. golden/public.jsonl)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--attention", default="auto", help="reduced-precision engine attention path (auto: triton on CUDA)")
    p.add_argument("--fusions", help="comma-separated fast-path fusions (default: the model's default set)")
    p.add_argument("--limit", type=int, default=0)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    cases = [json.loads(line) for line in open(args.cases, encoding="utf-8")]
    cases = [c if "id" in c else {**c, "id": str(i)} for i, c in enumerate(cases)]
    if args.limit:
        cases = cases[: args.limit]
    fusions = None if args.fusions is None else frozenset(filter(None, args.fusions.split(",")))
    result = compare(args.model, cases, args.device, args.dtype, attention=args.attention, fusions=fusions)
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
