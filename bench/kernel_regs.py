"""Registers, spills and layouts of the Triton kernels as compiled for Hopper, on a machine without a GPU:
`python bench/kernel_regs.py [attention|ffn] [BM,BN,WARPS,STAGES ...]`.

Triton compiles for a named target without a driver once the active driver is stubbed, and ptxas (shipped
with triton) reports each binary's registers and spill bytes. Install the device's triton version beside
the project to see what the device will run (`pip install --target DIR triton==3.6.0`, then
`PYTHONPATH=DIR:.`). Per configuration: registers, spill stores/loads, shared memory, the `ex2`
instructions in the PTX (the softmax's exponentials) and the layout conversions in the attention loop.
This is how run 18 (BENCHMARKS.md) found the attention softmax computed twice. Timings still need the
device (`tile_sweep.py`, `ffn_sweep.py`).
"""
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.runtime.driver import driver

from rex_stream.engine import triton_attention, triton_ffn

TARGET = GPUTarget("cuda", 90, 32)


class _CompileOnly:
    """The parts of a driver that `JITFunction.warmup` asks for when it only compiles."""

    def get_current_target(self) -> GPUTarget:
        return TARGET

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


def ptxas_stats(ptx: str) -> dict[str, int]:
    """Registers and spill bytes of ``ptx`` for sm_90a, from `ptxas -v`."""
    ptxas = get_ptxas(TARGET.arch).path  # the one triton itself compiles with
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        log = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", str(src), "-o", str(Path(tmp) / "k.cubin")],
                             capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return {"registers": int(regs.group(1)) if regs else -1,
            "spill_stores": int(spills.group(1)) if spills else -1, "spill_loads": int(spills.group(2)) if spills else -1}


def describe(compiled: Any) -> dict[str, Any]:
    loop = compiled.asm["ttgir"].partition("scf.for")[2]
    return {**ptxas_stats(compiled.asm["ptx"]), "shared": compiled.metadata.shared,
            "ex2": compiled.asm["ptx"].count("ex2.approx"), "loop_layout_conversions": loop.count("convert_layout")}


def attention(bm: int, bn: int, warps: int, stages: int) -> dict[str, Any]:
    """The attention kernel on bf16 q/k/v viewed from one [T, 3 * hidden] projection, as the model calls it."""
    tokens, heads, dim, reach = 4096, 12, 64, 512
    proj = torch.empty(tokens, 3 * heads * dim, dtype=torch.bfloat16)
    q, k, v = (proj[:, i * heads * dim:(i + 1) * heads * dim].view(tokens, heads, dim) for i in range(3))
    table = torch.empty(heads, tokens, reach, dtype=torch.bfloat16)
    attr = torch.zeros(tokens, dtype=torch.int64)
    rows = torch.zeros(64, dtype=torch.int32)
    compiled = triton_attention._disentangled_fwd.warmup(
        q, k, v, table, table, attr, attr, attr, attr.to(torch.int8), rows, rows, torch.empty_like(q),
        *q.stride(), *k.stride(), *v.stride(), 64, heads, 100, tokens, 199, reach, 99, 0.18,
        HEAD_DIM=dim, BLOCK_D=dim, BLOCK_M=bm, BLOCK_N=bn, PRECISION="tf32", UPCAST_DOT=False,
        num_warps=warps, num_stages=stages, grid=(1,))
    return describe(compiled)


def ffn() -> dict[str, Any]:
    """The feed-forward GEMM + GELU at its CUDA configuration."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    cfg = triton_ffn.KERNEL_CONFIGS["cuda"]
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    x, w = torch.empty(45056, 768, dtype=torch.bfloat16), torch.empty(3072, 768, dtype=torch.bfloat16)
    out = torch.empty(45056, 3072, dtype=torch.bfloat16)
    compiled = triton_ffn._linear_gelu_fwd.warmup(
        TensorDescriptor.from_tensor(x, [bm, bk]), TensorDescriptor.from_tensor(w, [bn, bk]),
        TensorDescriptor.from_tensor(out, [bm, bn // 2 if cfg["SPLIT_STORE"] else bn]), torch.empty(3072),
        45056, N=3072, K=768, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg["GROUP_M"],
        SPLIT_STORE=cfg["SPLIT_STORE"], PROGRAMS=132, WARP_SPECIALIZE=cfg["WARP_SPECIALIZE"], OUT_DTYPE=tl.bfloat16,
        UPCAST_DOT=False, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], grid=(1,))
    return describe(compiled)


if __name__ == "__main__":
    driver.set_active(_CompileOnly())
    which = sys.argv[1] if len(sys.argv) > 1 else "attention"
    print("triton", triton.__version__, "target sm_90")
    if which == "ffn":
        print("ffn", triton_ffn.KERNEL_CONFIGS["cuda"], ffn())
    else:
        configs = [tuple(int(n) for n in arg.split(",")) for arg in sys.argv[2:]] or sorted(
            {tuple(c[k] for k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"))
             for _, c in triton_attention.TILE_POLICY["cuda"]})
        for config in configs:
            print("attention", config, attention(*config))
