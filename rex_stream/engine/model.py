"""RexUniNLU network: a DeBERTa-v2 encoder with a 2-D prompt mask, plus the rotary span head.

Parameter names mirror the reference checkpoint (``plm.*``, ``ffnq.*``, ``ffnk.*``,
``rotary_emb.freqs``) so ``load_state_dict`` works on the published weights unchanged.

Deviations from the reference that do not change single-request results:

* embedding outputs at padding positions are zeroed, so the kernel-3 conv of the last real
  token never sees a padding vector and a request's logits do not depend on its batch;
* relative-position projections are cached (they do not depend on the input);
* only the relative-embedding rows a sequence of length L can reach are used. This relies on
  ``0 <= position_ids < L``, which Rex inputs satisfy (a token's position never exceeds its index).

Optional fast paths, off by default (the default is the exact SDPA path the golden tests pin):
``set_attention("flex")`` (FlexAttention, see ``fast_attention``), ``set_attention("triton")`` (a
fused Triton kernel, see ``triton_attention``; the layers then run on the rows' tokens packed back
to back, without padding; in bf16/fp16 it also fuses each block's residual add, LayerNorm and cast,
see ``triton_norm``) and ``compile_encoder()`` (``torch.compile``). Each
is self-checked against the SDPA path on its first batch per (device type, dtype) and falls back to
it, with one logged warning, on any error or mismatch; ``fast_path_status()`` reports what ran.

On the fused fast path (triton attention, bf16/fp16 compute) three more fusions apply, each
switchable (``set_fusions``; all on by default): "gelu" (intermediate dense + exact GELU as one TMA GEMM
on compute capability 9+, ``triton_ffn``), "head" (ffnq/ffnk as one split-bf16 GEMM and q.k^T as
another, fp32 accumulation: ~2^-16 relative error per product instead of fp32's 2^-24, operands split
by ``triton_split``) and "rotary" (one Triton kernel, ``triton_rotary``).
Elsewhere the span head runs in fp32 (fp64 for an fp64 model); the rotary angles always run in fp32.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from rex_stream.engine import fast_attention, triton_attention, triton_ffn, triton_norm, triton_rotary, triton_split

if TYPE_CHECKING:
    from rex_stream.engine.weights import ModelConfig

# Rows of the word-embedding table beyond the vocabulary: [PREFIX], [TYPE], [CLASSIFY], [MULTICLASSIFY].
ADDED_TOKENS = 4

_RelCache = list[tuple[torch.Tensor, torch.Tensor]]

log = logging.getLogger(__name__)

ATTENTION_MODES = ("sdpa", "flex", "triton")
FUSED_MODES = ("flex", "triton")  # the optional attention paths, self-checked against "sdpa"
_LOW_DTYPES = (torch.bfloat16, torch.float16)
FUSIONS = ("gelu", "head", "rotary")  # what the fused fast path may fuse (RexModel.set_fusions)
# All on by default. "head" and "rotary" change logits by < 1e-3 against their unfused forms; "gelu" (the
# TMA GEMM with the exact GELU on its fp32 accumulator, `triton_ffn`) rounds the intermediate once instead
# of twice: the max logit error against fp32 was 1.222 on the tiny golden model and 0.535 on the base
# model (plain bf16: 1.392 and 0.587; H200, bench/results/h200-run17-ffn). cuBLASLt's tanh-GELU
# epilogue, which it replaces, moved the tiny model's error to 1.41 (run 8).
DEFAULT_FUSIONS = ("gelu", "head", "rotary")
_T = TypeVar("_T")

# Self-check: max |fast - sdpa| over valid tokens' hidden states, relative to max |sdpa|. Measured on
# CPU: fp32 ~5e-7, bf16 ~5e-3 (two kernels' rounding); a wrong bias index or a missing bias gives ~0.3.
SELF_CHECK_TOL = {torch.float64: 1e-4, torch.float32: 1e-3, torch.bfloat16: 0.08, torch.float16: 0.08}
SELF_CHECK_TOL_TF32 = 2e-2  # fp32 on CUDA with TF32 matmuls enabled
_WARNED: set[str] = set()


class FastPathMismatch(RuntimeError):
    """A fast path's self-check disagreed with the SDPA path."""


def _low_dtype(attention: str, compute_dtype: torch.dtype) -> torch.dtype | None:
    """The 16-bit dtype of the fused fast path (triton attention in bf16/fp16), else None."""
    return compute_dtype if attention == "triton" and compute_dtype in _LOW_DTYPES else None


def _matmul_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` of bf16 operands (2-D or batched 3-D) with fp32 accumulation and output.

    On CUDA one tensor-core GEMM (``out_dtype=``; a torch without it raises, see ``_guarded``); elsewhere
    (tests) the same product of the same bf16 values in fp32.
    """
    if a.device.type != "cuda":
        return a.float() @ b.float()
    return (torch.mm if a.dim() == 2 else torch.bmm)(a, b, out_dtype=torch.float32)


def _relative_error(out: torch.Tensor, ref: torch.Tensor, token_mask: torch.Tensor) -> float:
    keep = token_mask.bool().unsqueeze(-1)
    out, ref = out.double(), ref.double()
    diff = torch.where(keep, out - ref, 0).abs().max()
    if not torch.isfinite(torch.where(keep, out, 0)).all():
        return math.inf
    return float(diff / torch.where(keep, ref, 0).abs().max().clamp_min(1e-6))


class _DenseLayerNorm(nn.Module):
    """Post-LN residual block: ``LayerNorm(dense(x) + residual)``."""

    def __init__(self, n_in: int, n_out: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(n_in, n_out)
        self.LayerNorm = nn.LayerNorm(n_out, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor,
                low: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The block's output, and with ``low`` also its copy in that dtype (one fused Triton kernel)."""
        if low is None:
            return self.LayerNorm(self.dense(x) + residual), None
        return triton_norm.add_layer_norm(self.dense(x), residual, self.LayerNorm, low)


class _Layer(nn.Module):
    """One encoder layer with disentangled (content + relative position) attention."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.attention = nn.ModuleDict(
            {
                "self": nn.ModuleDict({name: nn.Linear(h, h) for name in ("query_proj", "key_proj", "value_proj")}),
                "output": _DenseLayerNorm(h, h, cfg.layer_norm_eps),
            }
        )
        self.intermediate = nn.ModuleDict({"dense": nn.Linear(h, cfg.intermediate_size)})
        self.output = _DenseLayerNorm(cfg.intermediate_size, h, cfg.layer_norm_eps)
        # (weight [3h, h], bias [3h]): query/key/value projections stacked, in the reduced matmul dtype
        # (``RexModel.store_matmul_weights``). A plain attribute, so never in the state_dict; the three
        # modules above stay the source of truth (``RexModel.clear_cache`` drops this copy).
        self.qkv: tuple[torch.Tensor, torch.Tensor] | None = None

    def fuse_qkv(self) -> None:
        """Stack the query/key/value weights and biases, as they are now, into ``self.qkv``."""
        linears = [self.attention["self"][name] for name in ("query_proj", "key_proj", "value_proj")]
        with torch.no_grad():
            self.qkv = (torch.cat([lin.weight for lin in linears]), torch.cat([lin.bias for lin in linears]))

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, hidden] -> [B, H, L, D]; packed tokens (the triton path) [T, hidden] -> [T, H, D]."""
        if x.dim() == 2:
            return x.view(x.shape[0], self.heads, -1)
        b, length, _ = x.shape
        return x.view(b, length, self.heads, -1).transpose(1, 2)

    def project_relative(self, rel: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Project the normalised relative table with this layer's own query/key weights (share_att_key)."""
        proj = self.attention["self"]
        # In the weights' precision, but never below fp32 (matmul weights may be stored in bf16).
        dtype = torch.promote_types(rel.dtype, proj["query_proj"].weight.dtype)
        q_lin, k_lin = proj["query_proj"], proj["key_proj"]
        pos_q = F.linear(rel.to(dtype), q_lin.weight.to(dtype), q_lin.bias.to(dtype))
        pos_k = F.linear(rel.to(dtype), k_lin.weight.to(dtype), k_lin.bias.to(dtype))
        pos_q = pos_q.view(rel.shape[0], self.heads, -1).transpose(0, 1)
        pos_k = pos_k.view(rel.shape[0], self.heads, -1).transpose(0, 1)
        return pos_q * scale, pos_k * scale

    def forward(
        self,
        x: torch.Tensor,
        pos_q: torch.Tensor,
        pos_k: torch.Tensor,
        attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
        x_low: torch.Tensor | None = None,
        low: torch.dtype | None = None,
        intermediate: Callable[[torch.Tensor, nn.Linear], torch.Tensor | None] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The layer's output and, with ``low`` (fused norms), its copy in that dtype.

        ``x`` is [B, L, hidden], or [T, hidden] packed tokens on the triton path.
        ``attend(q, k, v, pos_q, pos_k)`` returns the [B, L, H*D] ([T, H*D]) context, dead rows already zero;
        ``x_low``, if given, is ``x`` already in the matmul dtype (saves autocast's cast);
        ``intermediate(x, dense)``, if given, computes ``gelu(dense(x))`` in one kernel (None: it failed,
        run it unfused).
        """
        inp = x if x_low is None else x_low
        if self.qkv is not None:
            # One GEMM (and, under autocast, one cast of x) instead of three; q, k, v are strided views
            # of its [B, L, 3h] output, the same row-wise products as the three projections.
            q, k, v = (self._split(t) for t in F.linear(inp, *self.qkv).chunk(3, dim=-1))
        else:
            proj = self.attention["self"]
            q = self._split(proj["query_proj"](inp))
            k = self._split(proj["key_proj"](inp))
            v = self._split(proj["value_proj"](inp))
        ctx = attend(q, k, v, pos_q, pos_k)
        attn, attn_low = self.attention["output"](ctx, x, low)
        inter_in, dense = attn if attn_low is None else attn_low, self.intermediate["dense"]
        inter = None if intermediate is None else intermediate(inter_in, dense)
        if inter is None:
            inter = F.gelu(dense(inter_in))
        return self.output(inter, attn, low)


def _sdpa_attend(
    rel_index: torch.Tensor, allowed: torch.Tensor, row_alive: torch.Tensor, scale: float
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """The exact default path: gathered c2p/p2c bias as a dense additive SDPA mask."""

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos_q: torch.Tensor, pos_k: torch.Tensor) -> torch.Tensor:
        # c2p[i, j] = q_i . posK[d_ij];  p2c[i, j] = k_j . posQ[d_ij]  (pos tables are pre-scaled)
        index = rel_index.unsqueeze(1).expand(-1, q.shape[1], -1, -1)
        c2p = torch.gather(q @ pos_k.transpose(-1, -2), -1, index)
        p2c = torch.gather(k @ pos_q.transpose(-1, -2), -1, index.transpose(-1, -2)).transpose(-1, -2)
        bias = (c2p + p2c).masked_fill(~allowed, float("-inf"))
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
        # A row with no allowed key gets zero context (the reference's masked softmax does the same).
        return (ctx * row_alive).transpose(1, 2).flatten(2)

    return attend


def _flex_attend(
    pos: torch.Tensor, offset: int, block_mask: Any, row_alive: torch.Tensor, scale: float,
    kernel: Callable[..., torch.Tensor],
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """FlexAttention with the c2p/p2c bias in score_mod and prompt isolation in the BlockMask."""

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos_q: torch.Tensor, pos_k: torch.Tensor) -> torch.Tensor:
        ctx = fast_attention.flex_context(q, k, v, pos_q, pos_k, pos, offset, block_mask, scale, kernel)
        # flex_attention already returns 0 for fully masked rows; where() also stops a NaN.
        return torch.where(row_alive, ctx, 0).transpose(1, 2).flatten(2)

    return attend


def _triton_attend(
    pos: torch.Tensor, group: torch.Tensor, slot: torch.Tensor, valid: torch.Tensor,
    packing: triton_attention.Packing, offset: int, scale: float, reach: int,
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """The fused Triton kernel on packed tokens: bias gathered in-kernel, isolation from group/slot,
    q/k/v [T, H, D] in, context [T, H*D] out.

    The position tables it gets may hold rows beyond the ``reach`` reachable ones (see ``_encode_core``).
    """
    pos, group, slot, valid = (t.reshape(-1).index_select(0, packing.index) for t in (pos, group, slot, valid))

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos_q: torch.Tensor, pos_k: torch.Tensor) -> torch.Tensor:
        return triton_attention.packed_attention(q, k, v, pos_q, pos_k, pos, group, slot, valid, packing.rows,
                                                 offset, scale, reach=reach)

    return attend


class _Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.layer = nn.ModuleList(_Layer(cfg) for _ in range(cfg.num_hidden_layers))
        self.rel_embeddings = nn.Embedding(2 * cfg.position_buckets, h)
        self.LayerNorm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        k = cfg.conv_kernel_size
        self.conv = nn.ModuleDict(
            {"conv": nn.Conv1d(h, h, k, padding=(k - 1) // 2), "LayerNorm": nn.LayerNorm(h, eps=cfg.layer_norm_eps)}
        )


class _Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embeddings = nn.ModuleDict(
            {
                "word_embeddings": nn.Embedding(cfg.vocab_size + ADDED_TOKENS, cfg.hidden_size),
                "LayerNorm": nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps),
            }
        )
        self.encoder = _Encoder(cfg)


class _Rotary(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        freqs = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        self.freqs = nn.Parameter(freqs, requires_grad=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Rotate interleaved pairs (x[2k], x[2k+1]) by position * freqs[k], in x's dtype (>= fp32)."""
        angles = position_ids.to(x.dtype).unsqueeze(-1) * self.freqs.to(x.dtype)
        cos, sin = angles.cos(), angles.sin()
        even, odd = x.unflatten(-1, (-1, 2)).unbind(-1)
        return torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1).flatten(-2)


class RexModel(nn.Module):
    """RexUniNLU: encoder -> ffnq/ffnk -> rotary -> unscaled q.k^T link logits.

    The relative-position projections are cached per (device, compute dtype) on first use;
    ``prepare()`` fills the cache eagerly. After ``store_matmul_weights`` with a 16-bit dtype each
    layer also holds its fused QKV weight (``_Layer.qkv``), rebuilt from the three projections on the
    next forward after a clear; the split-bf16 head weight of the "head" fusion is built on its first
    use. The caches are cleared on ``.to()``/``.half()``/... and on ``load_state_dict``; call
    ``clear_cache()`` after editing weights in place.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.plm = _Backbone(cfg)
        self.ffnq = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.ffnk = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.rotary_emb = _Rotary(cfg.hidden_size)
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        self._scale = 1.0 / math.sqrt(head_dim * 3)  # content + c2p + p2c
        self._rel_cache: dict[tuple[torch.device, torch.dtype], _RelCache] = {}
        self._qkv_dtype: torch.dtype | None = None  # fuse q/k/v while their weights are stored in this dtype
        self._qkv_fresh = False  # the layers' fused QKV weights match the current weights (or are not wanted)
        self.register_load_state_dict_post_hook(lambda module, _keys: module.clear_cache())
        # Optional fast paths (set_attention / compile_encoder); the defaults are the exact SDPA path.
        self._attention = "sdpa"
        self._flex_kernel: fast_attention.FlexKernel | None = None
        self._fused_error: str | None = None  # why the requested fused mode (flex/triton) was abandoned
        self._self_check = True
        self._compiled: Callable[..., torch.Tensor] | None = None
        self._compile_errors: dict[str, str] = {}  # attention mode -> why its compiled encoder failed
        self._compile_options: tuple[Any, ...] = ()
        self._checks: dict[tuple[str, ...], float] = {}
        self.fusions: frozenset[str] = frozenset(DEFAULT_FUSIONS)  # see set_fusions
        self._fusion_errors: dict[str, str] = {}  # fusion -> why it was switched off
        self._head_split: torch.Tensor | None = None  # [W_hi | W_lo | W_hi] of W = [ffnq; ffnk] (bf16)

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> RexModel:
        """Randomly initialised model of the configured size (load weights afterwards)."""
        return cls(cfg)

    def clear_cache(self) -> None:
        self._rel_cache.clear()
        for layer in self.plm.encoder.layer:
            layer.qkv = None
        self._qkv_fresh = False
        self._head_split = None

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], *args: Any, **kwargs: Any) -> RexModel:
        # Every .to()/.cuda()/.half() goes through here: cached tables would be on the old device/dtype.
        self.clear_cache()
        return super()._apply(fn, *args, **kwargs)

    def store_matmul_weights(self, dtype: torch.dtype) -> None:
        """Keep the encoder's Linear/Conv weights in the autocast dtype instead of casting per call.

        Autocast would cast these fp32 weights to `dtype` on every forward (a fifth of the GPU time
        on an H100, measured); storing the cast once gives the same numbers. LayerNorms and
        embeddings stay fp32 (autocast runs them in fp32), and so do the head and rotary freqs. The
        relative tables are computed first, from the fp32 weights.

        For a 16-bit ``dtype`` each layer's query/key/value projections are also stacked into one
        [3*hidden, hidden] weight in that dtype (``_Layer.qkv``, not in the state_dict): one GEMM and
        one autocast cast of the layer input instead of three (an extra copy of those weights: ~42 MB
        in bf16 for the base model). Rebuilt after ``clear_cache()`` (so after ``.to()`` and
        ``load_state_dict``) whenever the projections are still stored in ``dtype``.
        """
        self.prepare(dtype)
        for module in self.plm.modules():
            if isinstance(module, (nn.Linear, nn.Conv1d)):
                module.to(dtype)
        self._qkv_dtype = dtype if dtype in (torch.float16, torch.bfloat16) else None
        self._qkv_fresh = False
        self._fuse_qkv()

    def _fuse_qkv(self) -> None:
        """(Re)build the fused QKV weights if wanted and the projections are in the wanted dtype."""
        if not self._qkv_fresh:
            self._qkv_fresh = True
            for layer in self.plm.encoder.layer:
                proj = layer.attention["self"]
                tensors = [t for name in ("query_proj", "key_proj", "value_proj")
                           for t in (proj[name].weight, proj[name].bias)]
                if self._qkv_dtype is not None and all(t.dtype == self._qkv_dtype for t in tensors):
                    layer.fuse_qkv()
                else:
                    layer.qkv = None  # e.g. .float() after store_matmul_weights: back to the fp32 path

    def prepare(self, dtype: torch.dtype | None = None) -> None:
        """Fill the relative-projection cache for ``dtype`` (default: the weights' dtype)."""
        device = self.ffnq.weight.device
        self._relative_tables(device, dtype or self.ffnq.weight.dtype)

    def _relative_tables(self, device: torch.device, dtype: torch.dtype) -> _RelCache:
        key = (device, dtype)
        if key not in self._rel_cache:
            enc = self.plm.encoder
            with torch.no_grad(), torch.autocast(device.type, enabled=False):
                rel = enc.LayerNorm(enc.rel_embeddings.weight)
                tables = [layer.project_relative(rel, self._scale) for layer in enc.layer]
            # TABLE_ALIGN spare zero rows at the end: the triton path slices whole aligned row counts.
            spare = (0, 0, 0, triton_attention.TABLE_ALIGN)
            self._rel_cache[key] = [(F.pad(q, spare).to(dtype), F.pad(k, spare).to(dtype)) for q, k in tables]
        return self._rel_cache[key]

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        token_mask: torch.Tensor,
        *,
        group: torch.Tensor | None = None,
        slot: torch.Tensor | None = None,
        lengths: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Link logits [B, L, L], fp32 (fp64 for an fp64 model); padding rows/columns are meaningless.

        ``attention_mask`` [B, L, L] (bool) is the prompt-isolation pattern; it may be None when the
        per-token ``group``/``slot`` vectors ([B, L] long, as from ``layout.build_layout``, padding
        -1) are given, and the fused (flex, triton) paths ignore it whenever they are given.
        ``lengths``: see ``encode``.
        """
        hidden = self.encode(input_ids, position_ids, attention_mask, token_mask, group=group, slot=slot,
                             lengths=lengths)
        # self.attention is still "triton" only if the triton path ran (a failure falls back to sdpa).
        fused = (group is not None and slot is not None
                 and _low_dtype(self.attention, self._compute_dtype(input_ids.device)) is not None)
        return self.link_logits(hidden, position_ids, fused=fused)

    # ------------------------------------------------------------------ fast-path selection

    def set_attention(
        self, mode: str = "sdpa", *, compile: bool | None = None, dynamic: bool | None = True, self_check: bool = True
    ) -> str:
        """Choose the encoder attention: "sdpa" (default, exact reference path), "flex" or "triton".

        triton: one fused Triton kernel (``triton_attention``) gathering the disentangled bias
        in-kernel and evaluating prompt isolation from the per-token group/slot vectors (CUDA, or
        CPU under ``TRITON_INTERPRET=1``); forwards given only a dense mask (no group/slot) run SDPA.
        flex: FlexAttention with the disentangled bias in ``score_mod`` and prompt isolation in a
        BlockMask. ``compile`` (None: on CUDA only) wraps flex_attention in ``torch.compile(...,
        dynamic=dynamic)``; eager flex is an unfused reference, slow on GPUs. With ``self_check``, the
        first fused forward per (device type, dtype) is compared against the SDPA path on the same
        batch. Any failure (unavailable, exception, self-check mismatch) logs one warning and
        permanently falls back to SDPA for this model, until ``set_attention`` is called again.
        Returns the mode now in effect.
        """
        if mode not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, not {mode!r}")
        self._attention = mode
        self._fused_error = None
        self._self_check = self_check
        self._checks = {key: err for key, err in self._checks.items() if not set(FUSED_MODES) & set(key)}
        reason = None
        if mode == "flex":
            reason = fast_attention.flex_unavailable_reason()
            if reason is None and (self._flex_kernel is None
                                   or (self._flex_kernel.compile, self._flex_kernel.dynamic) != (compile, dynamic)):
                self._flex_kernel = fast_attention.FlexKernel(compile=compile, dynamic=dynamic)  # else: keep its kernels
        elif mode == "triton":
            reason = triton_attention.triton_unavailable_reason(self.ffnq.weight.device)
        if reason is not None:
            self._fused_failed(reason)
        return self.attention

    def set_fusions(self, names: Iterable[str] = DEFAULT_FUSIONS) -> frozenset[str]:
        """Choose the fusions of the fused fast path (triton attention, bf16/fp16); default all three.

        "gelu": intermediate dense + GELU in one GEMM (``triton_ffn``); "head": ffnq/ffnk as one
        split-bf16 GEMM (``_split_bf16_head``); "rotary": the Triton rotary kernel (``triton_rotary``).
        They never apply to other paths, so the exact default path is the same whatever is chosen.
        A fusion that fails (or cannot run here) is switched off with one warning; this call clears that.
        """
        chosen = frozenset(names)
        if unknown := chosen - set(FUSIONS):
            raise ValueError(f"unknown fusions {sorted(unknown)}; choose from {FUSIONS}")
        self.fusions = chosen
        self._fusion_errors = {}
        return chosen

    @property
    def attention(self) -> str:
        """The attention path forwards use now (a fused mode only while it has not failed)."""
        return "sdpa" if self._fused_error is not None else self._attention

    def compile_encoder(
        self, mode: str | None = None, *, dynamic: bool | None = True, fullgraph: bool = False, enabled: bool = True
    ) -> bool:
        """``torch.compile`` the encoder (embeddings .. last layer; the fp32 head stays eager).

        ``dynamic=True`` (default) compiles shape-polymorphic graphs so ragged batch widths do not
        recompile per length; ``mode`` is passed through ("reduce-overhead", "max-autotune", ...).
        Guarded: a compile/run error or a failed self-check against the eager SDPA path on the first
        call per (attention, device type, dtype) logs one warning and falls back to eager for that
        attention path. ``enabled=False`` removes the compiled encoder. Returns whether it is set.
        """
        options = (mode, dynamic, fullgraph)
        if enabled and self._compiled is not None and self._compile_options == options:
            return True  # already compiled this way: keep its graphs
        self._compiled = None
        self._compile_options = options
        self._compile_errors = {}
        self._checks = {key: err for key, err in self._checks.items() if key[0] != "compile"}
        if not enabled:
            return False
        try:
            self._compiled = torch.compile(self._encode_core, mode=mode, dynamic=dynamic, fullgraph=fullgraph)
        except Exception as exc:  # noqa: BLE001 - e.g. an unknown mode, or no dynamo on this Python
            self._warn_once(f"torch.compile of the encoder unavailable, staying eager: {type(exc).__name__}: {exc}")
            return False
        return True

    def fast_path_status(self) -> dict[str, Any]:
        """What the last forwards could use, the fallbacks taken and the self-check errors seen."""
        kernel = self._flex_kernel
        return {
            "attention_requested": self._attention,
            "attention_active": self.attention,
            "attention_error": self._fused_error,
            "flex_error": self._fused_error if self._attention == "flex" else None,  # older readers
            "flex_compile": None if kernel is None else ("cuda-only" if kernel.compile is None else kernel.compile),
            "flex_dynamic": None if kernel is None else kernel.dynamic,
            "compiled_encoder": self._compiled is not None,
            "compile_errors": dict(self._compile_errors),
            "self_checks": {"/".join(map(str, key)): err for key, err in self._checks.items()},
            "fusions": sorted(self.fusions - self._fusion_errors.keys()),
            "fusion_errors": dict(self._fusion_errors),
        }

    def _warn_once(self, message: str) -> None:
        if message not in _WARNED:
            _WARNED.add(message)
            log.warning("%s", message)

    def _fused_failed(self, error: BaseException | str) -> None:
        reason = error if isinstance(error, str) else f"{type(error).__name__}: {str(error)[:2000]}"
        self._fused_error = reason
        self._warn_once(f"{self._attention} attention disabled, falling back to sdpa: {reason}")

    def _check(
        self, path: tuple[str, ...], out: torch.Tensor, args: tuple[Any, ...], compute_dtype: torch.dtype
    ) -> None:
        """Once per (path, device type, dtype): compare a fast path's hidden states with eager SDPA."""
        key = (*path, args[0].device.type, str(compute_dtype).removeprefix("torch."))
        if not self._self_check or key in self._checks:
            return
        with torch.no_grad():
            ref = self._encode_core(*args, attention="sdpa")
        err = _relative_error(out, ref, args[3])
        self._checks[key] = err
        tol = SELF_CHECK_TOL.get(compute_dtype, SELF_CHECK_TOL[torch.float16])
        if compute_dtype == torch.float32 and args[0].device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
            tol = SELF_CHECK_TOL_TF32
        if not err <= tol:  # also catches NaN
            raise FastPathMismatch(f"self-check {'/'.join(key)}: relative hidden error {err:.3g} > {tol:g}")
        log.info("fast path %s passed its self-check: relative hidden error %.3g", "/".join(key), err)

    def _run(self, args: tuple[Any, ...], attention: str, compute_dtype: torch.dtype) -> torch.Tensor:
        if self._compiled is not None and attention not in self._compile_errors:
            try:
                out = self._compiled(*args, attention=attention)
                self._check(("compile", attention), out, args, compute_dtype)
                return out
            except Exception as exc:  # noqa: BLE001 - any compile/run failure: fall back to eager
                reason = f"{type(exc).__name__}: {str(exc)[:2000]}"
                self._compile_errors[attention] = reason
                self._warn_once(f"compiled encoder ({attention}) failed, running eager: {reason}")
        out = self._encode_core(*args, attention=attention)
        if attention != "sdpa":
            self._check((attention,), out, args, compute_dtype)
        return out

    # ------------------------------------------------------------------ encoder

    def encode(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        token_mask: torch.Tensor,
        *,
        group: torch.Tensor | None = None,
        slot: torch.Tensor | None = None,
        lengths: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Backbone hidden states [B, L, hidden] (autocast dtype or the weights' dtype).

        ``lengths``: each row's length on the host (its valid tokens are a prefix of it), for the
        triton path's packing; without them it reads them from ``token_mask`` (one device sync).
        """
        if attention_mask is None and (group is None or slot is None):
            raise ValueError("pass attention_mask, or both group and slot")
        device = input_ids.device
        compute_dtype = self._compute_dtype(device)
        self._fuse_qkv()  # no-op unless the fused QKV weights were wanted and cleared since
        packing = None
        if self.attention == "triton" and group is not None and slot is not None:
            if lengths is None:
                index = torch.arange(1, token_mask.shape[1] + 1, device=device)
                lengths = torch.where(token_mask.bool(), index, 0).amax(-1).tolist() if token_mask.numel() else []
            packing = triton_attention.pack_rows(lengths, input_ids.shape[1], device)
        args = (input_ids, position_ids, attention_mask, token_mask, group, slot,
                self._relative_tables(device, compute_dtype), packing)
        # The triton kernel needs group/slot; a forward given only a dense mask runs SDPA instead.
        while (mode := self.attention) != "sdpa" and not (mode == "triton" and (group is None or slot is None)):
            try:
                return self._run(args, mode, compute_dtype)
            except Exception as exc:  # noqa: BLE001 - any fused failure: degrade (flex), then fall back to SDPA
                if mode == "flex" and self._flex_kernel is not None and self._flex_kernel.degrade(device):
                    self._warn_once(f"dynamic-shape flex kernel failed, retrying with static shapes: "
                                    f"{type(exc).__name__}: {str(exc)[:2000]}")
                    self._checks = {k: e for k, e in self._checks.items() if k[0] != "flex"}
                else:
                    self._fused_failed(exc)
        return self._run(args, "sdpa", compute_dtype)

    def _compute_dtype(self, device: torch.device) -> torch.dtype:
        """The encoder's matmul dtype: autocast's if it is on, else the weights'."""
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
        return self.ffnq.weight.dtype

    def _encode_core(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        token_mask: torch.Tensor,
        group: torch.Tensor | None,
        slot: torch.Tensor | None,
        tables: _RelCache,
        packing: triton_attention.Packing | None = None,
        attention: str = "sdpa",
    ) -> torch.Tensor:
        """Hidden states [B, L, hidden]. The triton path runs the layers on ``packing``'s tokens only
        and scatters them back (padding positions come out 0)."""
        device = input_ids.device
        length = input_ids.shape[1]
        # Relative distance d_ij = clamp(pos_i - pos_j + S, 0, 2S-1), shifted to the reachable rows.
        span = self.cfg.position_buckets
        lo, hi = max(0, span - length + 1), min(2 * span, span + length)
        width = hi - lo  # table rows handed to the attention

        if attention in FUSED_MODES and group is not None and slot is not None:
            # Every valid token may attend itself, so live rows/columns are exactly the valid tokens.
            valid = token_mask.bool()
            col_alive = valid.unsqueeze(-1)
            if attention == "triton":
                if packing is None:
                    raise ValueError("the triton path runs on packed rows: call encode(), which packs them")
                attend = _triton_attend(position_ids, group, slot, valid, packing, span - lo, self._scale, hi - lo)
                # Slice the tables to a whole number of TABLE_ALIGN rows (their spare zero rows keep
                # that in range): the kernel reads only the reachable ones, and no padded copy is made
                # per layer and forward.
                width = triton_attention.aligned_rows(hi - lo)
            else:
                block_mask = fast_attention.layout_block_mask(group, slot, valid)
                attend = _flex_attend(position_ids, span - lo, block_mask, valid[:, None, :, None],
                                      self._scale, self._flex_kernel(device))
        elif attention == "triton":
            raise ValueError("the triton attention needs the group and slot vectors")
        else:
            if attention_mask is None:
                attention_mask = fast_attention.layout_allowed(group, slot, token_mask)
            allowed = attention_mask.bool() & token_mask[:, None, :] & token_mask[:, :, None]
            row_alive = allowed.any(-1)
            col_alive = allowed.any(-2).unsqueeze(-1)
            if attention == "flex":
                attend = _flex_attend(position_ids, span - lo, fast_attention.dense_block_mask(allowed),
                                      row_alive[:, None, :, None], self._scale, self._flex_kernel(device))
            else:
                # A row with nothing to attend (padding) attends to itself instead, so no softmax row is
                # all -inf (NaN would leak through 0 * NaN in later layers); its output is zeroed afterwards.
                eye = torch.eye(length, dtype=torch.bool, device=device)
                allowed = (allowed | (eye & ~row_alive.unsqueeze(-1))).unsqueeze(1)
                rel = position_ids[:, :, None] - position_ids[:, None, :]
                rel_index = (rel + span).clamp(lo, hi - 1) - lo
                attend = _sdpa_attend(rel_index, allowed, row_alive[:, None, :, None], self._scale)

        emb = self.plm.embeddings
        index = packing.index if attention == "triton" else None
        # The triton path in 16-bit also fuses each block's residual add, LayerNorm and cast, and the
        # blocks around layer 0 (triton_norm); x_low is x in that dtype, the next GEMM's input.
        low = _low_dtype(attention, tables[0][0].dtype)
        if low is not None:
            x, x_low, embedded = triton_norm.embed_layer_norm(input_ids, token_mask, index, emb["word_embeddings"],
                                                              emb["LayerNorm"], low)
        else:
            x = triton_norm.reference_embed(input_ids, token_mask, emb["word_embeddings"], emb["LayerNorm"])
            embedded, x_low = x, None
            if index is not None:
                x = x.flatten(0, 1).index_select(0, index)  # [T, hidden]: the rows' tokens, no padding
        gelu = low is not None and "gelu" in self.fusions - self._fusion_errors.keys()
        intermediate = self._intermediate if gelu else None
        for i, layer in enumerate(self.plm.encoder.layer):
            pos_q, pos_k = tables[i]
            x, x_low = layer(x, pos_q[:, lo:lo + width], pos_k[:, lo:lo + width], attend, x_low, low, intermediate)
            if i == 0:
                x, x_low = self._conv(embedded, x, col_alive, index, low)
        if index is not None:
            x = x.new_zeros(input_ids.numel(), x.shape[-1]).index_copy_(0, index, x).view(*input_ids.shape, -1)
        return x

    def link_logits(self, hidden: torch.Tensor, position_ids: torch.Tensor, fused: bool = False) -> torch.Tensor:
        """Span head in at least fp32 whatever the autocast state: links are signs of large dot products.

        ``fused`` (the encoder ran the fused fast path) lets the "head" and "rotary" fusions apply to an
        fp32 head: "head" runs the projections and the product q.k^T as split-bf16 GEMMs (each product
        ~2^-16 relative off fp32's); the rotary angles stay fp32 either way.
        """
        dtype = torch.promote_types(self.ffnq.weight.dtype, torch.float32)
        fusions = self.fusions - self._fusion_errors.keys() if fused and dtype == torch.float32 else frozenset()
        with torch.autocast(hidden.device.type, enabled=False):
            parts = self._project(hidden.to(dtype), "head" in fusions)
            rotated = None
            if "rotary" in fusions:
                rotated = self._guarded("rotary", lambda: [
                    triton_rotary.rotate_pairs(x, position_ids, self.rotary_emb.freqs, bias) for x, bias in parts])
            q, k = rotated or [self.rotary_emb(x if bias is None else x + bias, position_ids) for x, bias in parts]
            product = None
            if "head" in fusions:
                product = self._guarded("head", lambda: _matmul_fp32(
                    triton_split.split_bf16x3(q, "hi,hi,lo").flatten(-2),
                    triton_split.split_bf16x3(k, "hi,lo,hi").flatten(-2).transpose(-1, -2)))
            return q @ k.transpose(-1, -2) if product is None else product

    def _project(self, h: torch.Tensor, split: bool) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """q and k before the rotary, each with its bias still to add (None: already added)."""
        y = self._guarded("head", lambda: self._split_bf16_head(h)) if split else None
        if y is None:
            return [(F.linear(h, lin.weight.to(h.dtype), lin.bias.to(h.dtype)), None) for lin in (self.ffnq, self.ffnk)]
        return list(zip(y.chunk(2, dim=-1), (self.ffnq.bias, self.ffnk.bias)))

    def _split_bf16_head(self, h: torch.Tensor) -> torch.Tensor:
        """``h @ [ffnq; ffnk].weight^T`` (no bias) for fp32 ``h``, as one bf16 GEMM: [..., 2 * hidden] fp32.

        The fp32 GEMMs ran on the SIMT fp32 kernel (3.2 ms per 65k-token batch of the base model on an
        H200); [h_hi | h_hi | h_lo] @ [W_hi | W_lo | W_hi]^T (``triton_split``, K = 3 * hidden) runs on
        tensor cores with fp32 accumulation and output (``_matmul_fp32``). It drops only h_lo.W_lo, so
        each product is off by ~2^-16 relative instead of fp32's 2^-24, far below the bf16/fp16 encoder's
        own error.
        """
        if self._head_split is None:
            with torch.no_grad():
                weight = torch.cat([self.ffnq.weight, self.ffnk.weight]).float()
                self._head_split = triton_split.split_bf16x3(weight, "hi,lo,hi").flatten(1)
        a = triton_split.split_bf16x3(h, "hi,hi,lo").view(-1, 3 * h.shape[-1])
        return _matmul_fp32(a, self._head_split.t()).view(*h.shape[:-1], -1)

    def _intermediate(self, x: torch.Tensor, dense: nn.Linear) -> torch.Tensor | None:
        """The "gelu" fusion: ``gelu(dense(x))`` as one TMA GEMM with an exact GELU epilogue (``triton_ffn``)."""
        return self._guarded("gelu", lambda: triton_ffn.linear_gelu(x, dense.weight, dense.bias))

    def _guarded(self, fusion: str, run: Callable[[], _T]) -> _T | None:
        """``run()``; None if it raised, which also switches ``fusion`` off (one warning; OOM propagates).

        None at once if ``fusion`` is off already: a failure switches it off for the rest of the forward
        too (the later layers' GELUs, the head's product after its projection)."""
        if fusion in self._fusion_errors:
            return None
        try:
            return run()
        except torch.OutOfMemoryError:
            raise  # the engine splits the batch
        except Exception as exc:  # noqa: BLE001 - e.g. no mm(out_dtype=) in this torch, a Triton compile error
            reason = f"{type(exc).__name__}: {str(exc)[:2000]}"
            self._fusion_errors[fusion] = reason
            self._warn_once(f"{fusion} fusion disabled, running it unfused: {reason}")
            return None

    def _conv(self, embedded: torch.Tensor, layer0: torch.Tensor, keep: torch.Tensor, index: torch.Tensor | None = None,
              low: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Mix the kernel-3 conv of the embeddings into layer 0's output (DeBERTa-v2 ConvLayer); with
        ``low`` (the fused 16-bit path, packed) also the result in that dtype, in one kernel.

        The conv runs on the padded [B, L] embeddings (a row's neighbours are its own); with
        ``index`` (layer 0 ran on packed tokens) its output is packed the same way."""
        conv = self.plm.encoder.conv
        out = conv["conv"](embedded.transpose(1, 2)).transpose(1, 2)
        if low is not None and index is not None:
            return triton_norm.conv_mix(out, layer0, index, keep.squeeze(-1), conv["LayerNorm"], low)
        out = F.gelu(out.masked_fill(~keep, 0))
        if index is not None:
            out, keep = out.flatten(0, 1).index_select(0, index), keep.flatten(0, 1).index_select(0, index)
        return conv["LayerNorm"](layer0 + out) * keep, None
