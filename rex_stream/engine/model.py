"""RexUniNLU network: a DeBERTa-v2 encoder with a 2-D prompt mask, plus the rotary span head.

Parameter names mirror the reference checkpoint (``plm.*``, ``ffnq.*``, ``ffnk.*``,
``rotary_emb.freqs``) so ``load_state_dict`` works on the published weights unchanged.

Deviations from the reference that do not change single-request results:

* embedding outputs at padding positions are zeroed, so the kernel-3 conv of the last real
  token never sees a padding vector and a request's logits do not depend on its batch;
* relative-position projections are cached (they do not depend on the input);
* only the relative-embedding rows a sequence of length L can reach are used. This relies on
  ``0 <= position_ids < L``, which Rex inputs satisfy (a token's position never exceeds its index).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from rex_stream.engine.weights import ModelConfig

# Rows of the word-embedding table beyond the vocabulary: [PREFIX], [TYPE], [CLASSIFY], [MULTICLASSIFY].
ADDED_TOKENS = 4

_RelCache = list[tuple[torch.Tensor, torch.Tensor]]


class _DenseLayerNorm(nn.Module):
    """Post-LN residual block: ``LayerNorm(dense(x) + residual)``."""

    def __init__(self, n_in: int, n_out: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(n_in, n_out)
        self.LayerNorm = nn.LayerNorm(n_out, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


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

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, length, _ = x.shape
        return x.view(b, length, self.heads, -1).transpose(1, 2)

    def project_relative(self, rel: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Project the normalised relative table with this layer's own query/key weights (share_att_key)."""
        proj = self.attention["self"]
        pos_q = proj["query_proj"](rel).view(rel.shape[0], self.heads, -1).transpose(0, 1)
        pos_k = proj["key_proj"](rel).view(rel.shape[0], self.heads, -1).transpose(0, 1)
        return pos_q * scale, pos_k * scale

    def forward(
        self,
        x: torch.Tensor,
        rel_index: torch.Tensor,
        pos_q: torch.Tensor,
        pos_k: torch.Tensor,
        allowed: torch.Tensor,
        row_alive: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        proj = self.attention["self"]
        q = self._split(proj["query_proj"](x))
        k = self._split(proj["key_proj"](x))
        v = self._split(proj["value_proj"](x))
        # c2p[i, j] = q_i . posK[d_ij];  p2c[i, j] = k_j . posQ[d_ij]  (pos tables are pre-scaled)
        index = rel_index.unsqueeze(1).expand(-1, self.heads, -1, -1)
        c2p = torch.gather(q @ pos_k.transpose(-1, -2), -1, index)
        p2c = torch.gather(k @ pos_q.transpose(-1, -2), -1, index.transpose(-1, -2)).transpose(-1, -2)
        bias = (c2p + p2c).masked_fill(~allowed, float("-inf"))
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
        # A row with no allowed key gets zero context (the reference's masked softmax does the same).
        ctx = (ctx * row_alive).transpose(1, 2).flatten(2)
        attn = self.attention["output"](ctx, x)
        return self.output(F.gelu(self.intermediate["dense"](attn)), attn)


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
    ``prepare()`` fills the cache eagerly. The cache is cleared on ``.to()``/``.half()``/...
    and on ``load_state_dict``; call ``clear_cache()`` after editing weights in place.
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
        self.register_load_state_dict_post_hook(lambda module, _keys: module.clear_cache())

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> RexModel:
        """Randomly initialised model of the configured size (load weights afterwards)."""
        return cls(cfg)

    def clear_cache(self) -> None:
        self._rel_cache.clear()

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], *args: Any, **kwargs: Any) -> RexModel:
        # Every .to()/.cuda()/.half() goes through here: cached tables would be on the old device/dtype.
        self.clear_cache()
        return super()._apply(fn, *args, **kwargs)

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
            self._rel_cache[key] = [(q.to(dtype), k.to(dtype)) for q, k in tables]
        return self._rel_cache[key]

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Link logits [B, L, L], fp32 (fp64 for an fp64 model); padding rows/columns are meaningless."""
        hidden = self.encode(input_ids, position_ids, attention_mask, token_mask)
        return self.link_logits(hidden, position_ids)

    def encode(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Backbone hidden states [B, L, hidden] (autocast dtype or the weights' dtype)."""
        device = input_ids.device
        compute_dtype = (
            torch.get_autocast_dtype(device.type)
            if torch.is_autocast_enabled(device.type)
            else self.ffnq.weight.dtype
        )
        tables = self._relative_tables(device, compute_dtype)
        length = input_ids.shape[1]

        allowed = attention_mask.bool() & token_mask[:, None, :] & token_mask[:, :, None]
        row_alive = allowed.any(-1)
        col_alive = allowed.any(-2).unsqueeze(-1)
        # A row with nothing to attend (padding) attends to itself instead, so no softmax row is all
        # -inf (NaN would leak through 0 * NaN in later layers); its output is zeroed afterwards.
        eye = torch.eye(length, dtype=torch.bool, device=device)
        allowed = (allowed | (eye & ~row_alive.unsqueeze(-1))).unsqueeze(1)
        row_alive = row_alive[:, None, :, None]

        # Relative distance d_ij = clamp(pos_i - pos_j + S, 0, 2S-1), shifted to the reachable rows.
        span = self.cfg.position_buckets
        lo, hi = max(0, span - length + 1), min(2 * span, span + length)
        rel = position_ids[:, :, None] - position_ids[:, None, :]
        rel_index = (rel + span).clamp(lo, hi - 1) - lo

        emb = self.plm.embeddings
        x = emb["LayerNorm"](emb["word_embeddings"](input_ids)) * token_mask.unsqueeze(-1)
        embedded = x
        for i, layer in enumerate(self.plm.encoder.layer):
            pos_q, pos_k = tables[i]
            x = layer(x, rel_index, pos_q[:, lo:hi], pos_k[:, lo:hi], allowed, row_alive, self._scale)
            if i == 0:
                x = self._conv(embedded, x, col_alive)
        return x

    def link_logits(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Span head in at least fp32 whatever the autocast state: links are signs of large dot products."""
        dtype = torch.promote_types(self.ffnq.weight.dtype, torch.float32)
        with torch.autocast(hidden.device.type, enabled=False):
            h = hidden.to(dtype)
            q = self.rotary_emb(F.linear(h, self.ffnq.weight.to(dtype), self.ffnq.bias.to(dtype)), position_ids)
            k = self.rotary_emb(F.linear(h, self.ffnk.weight.to(dtype), self.ffnk.bias.to(dtype)), position_ids)
            return q @ k.transpose(-1, -2)

    def _conv(self, embedded: torch.Tensor, layer0: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Mix the kernel-3 conv of the embeddings into layer 0's output (DeBERTa-v2 ConvLayer)."""
        conv = self.plm.encoder.conv
        out = conv["conv"](embedded.transpose(1, 2)).transpose(1, 2)
        out = F.gelu(out.masked_fill(~keep, 0))
        return conv["LayerNorm"](layer0 + out) * keep
