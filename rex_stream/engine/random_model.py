"""Random-weights RexUniNLU model directories for tests and benchmarks (the real weights are not shipped)."""

from __future__ import annotations

import json
import math
import os
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from rex_stream.engine.model import ADDED_TOKENS, RexModel
from rex_stream.engine.weights import ModelConfig

# The published config.json of iic/nlp_deberta_rex-uninlu_chinese-base, key order kept.
BASE_CONFIG: dict = {
    "model_type": "deberta-v2",
    "architectures": ["DebertaV2ForMaskedLM"],
    "attention_probs_dropout_prob": 0.1,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 768,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "max_position_embeddings": 512,
    "relative_attention": True,
    "position_buckets": 256,
    "norm_rel_ebd": "layer_norm",
    "share_att_key": True,
    "pos_att_type": "c2p|p2c",
    "conv_kernel_size": 3,
    "conv_act": "gelu",
    "layer_norm_eps": 1e-7,
    "max_relative_positions": -1,
    "position_biased_input": False,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "type_vocab_size": 0,
    "vocab_size": 12800,
}
TINY_CONFIG: dict = {
    **BASE_CONFIG,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
}

# Small JSON files of the model repo; written only when the vocab's directory has no copy.
_SIDE_FILES: dict[str, str] = {
    "configuration.json": json.dumps(
        {
            "framework": "pytorch",
            "task": "rex-uninlu",
            "pipeline": {"type": "nlp_deberta_rex-uninlu_chinese-base-pipe"},
            "allow_remote": True,
        },
        separators=(",", ":"),
    ),
    "tokenizer_config.json": json.dumps(
        {
            "do_lower_case": True,
            "do_basic_tokenize": True,
            "never_split": None,
            "unk_token": "[UNK]",
            "sep_token": "[SEP]",
            "pad_token": "[PAD]",
            "cls_token": "[CLS]",
            "mask_token": "[MASK]",
            "tokenize_chinese_chars": True,
            "strip_accents": None,
            "special_tokens_map_file": None,
            "tokenizer_class": "BertTokenizer",
        },
        indent=4,
    ),
    "special_tokens_map.json": json.dumps(
        {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]", "mask_token": "[MASK]"}
    ),
}

DEFAULT_LINK_BIAS = 5.5
_WEIGHT_STD = 0.02
_BIAS_STD = 0.02
_LN_WEIGHT_STD = 0.1
_LN_BIAS_STD = 0.1
# Head shaping (see _shape_head); values tuned on the base size, documented in write_random_model.
_LOGIT_STD = 8.7  # std of the head's content logits, whatever the hidden size
_SPAN_MIN_FREQ = 0.3  # rotary pairs this fast fade within a few tokens: they carry the span kernel
_SPAN_GAIN = 36.0  # logit bonus of the span kernel at distance 0
_TYPE_BONUS = 18.0  # logit bonus of text -> [TYPE] and [TYPE] -> text links
# Token ids of the real vocab layout: [CLS]=1, [SEP]=2, first ordinary token after [unused99];
# the four added tokens follow the vocabulary in the order [PREFIX], [TYPE], [CLASSIFY], [MULTICLASSIFY].
_CLS, _SEP, _FIRST_WORD = 1, 2, 104


def default_vocab_path() -> Path:
    """``$REX_SHARED/rex/tiny-random/vocab.txt``; REX_SHARED defaults to ``../shared`` (from the cwd)."""
    return Path(os.environ.get("REX_SHARED", "../shared")) / "rex" / "tiny-random" / "vocab.txt"


def _random_state_dict(cfg: dict, seed: int, link_bias: float) -> OrderedDict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    state: OrderedDict[str, torch.Tensor] = OrderedDict()

    def normal(*shape: int, std: float, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std + mean

    def linear(name: str, n_out: int, n_in: int, std: float = _WEIGHT_STD) -> None:
        state[f"{name}.weight"] = normal(n_out, n_in, std=std)
        state[f"{name}.bias"] = normal(n_out, std=_BIAS_STD)

    def layer_norm(name: str) -> None:
        # Non-trivial affine parameters so padding bugs (LN(E[PAD]) != 0) cannot hide.
        state[f"{name}.weight"] = normal(hidden, std=_LN_WEIGHT_STD, mean=1.0)
        state[f"{name}.bias"] = normal(hidden, std=_LN_BIAS_STD)

    state["plm.embeddings.word_embeddings.weight"] = normal(cfg["vocab_size"] + ADDED_TOKENS, hidden, std=1.0)
    layer_norm("plm.embeddings.LayerNorm")
    for i in range(cfg["num_hidden_layers"]):
        p = f"plm.encoder.layer.{i}."
        for proj in ("query_proj", "key_proj", "value_proj"):
            linear(p + "attention.self." + proj, hidden, hidden)
        linear(p + "attention.output.dense", hidden, hidden)
        layer_norm(p + "attention.output.LayerNorm")
        linear(p + "intermediate.dense", inter, hidden)
        linear(p + "output.dense", hidden, inter)
        layer_norm(p + "output.LayerNorm")
    state["plm.encoder.rel_embeddings.weight"] = normal(2 * cfg["position_buckets"], hidden, std=1.0)
    layer_norm("plm.encoder.LayerNorm")
    state["plm.encoder.conv.conv.weight"] = normal(hidden, hidden, cfg["conv_kernel_size"], std=_WEIGHT_STD)
    state["plm.encoder.conv.conv.bias"] = normal(hidden, std=_BIAS_STD)
    layer_norm("plm.encoder.conv.LayerNorm")
    linear("ffnq", hidden, hidden)  # rescaled by _shape_head
    linear("ffnk", hidden, hidden)
    state["rotary_emb.freqs"] = 1.0 / (10000 ** (torch.arange(0, hidden, 2, dtype=torch.float32) / hidden))
    _shape_head(state, cfg, link_bias, gen)
    return state


def _calibration_states(state: dict[str, torch.Tensor], cfg: dict, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Final hidden states of the text tokens and the mean [TYPE] state on a random level-0 prompt.

    Computed in fp64 and rounded to bf16 precision, so BLAS/thread differences between machines
    cannot change the written bytes.
    """
    with torch.device("meta"):
        model = RexModel.from_config(ModelConfig.from_dict(cfg))
    model.load_state_dict(state, assign=True)
    model.double()
    prefix, type_id = cfg["vocab_size"], cfg["vocab_size"] + 1
    n_types, type_len, text_len = 4, 3, 96
    words = torch.randint(_FIRST_WORD, cfg["vocab_size"], (n_types * type_len + text_len,), generator=gen).tolist()
    ids, pos, span = [_CLS, prefix], [0, 1], [-1, -1]
    for t in range(n_types):  # sibling type spans share positions and do not see each other
        ids += [type_id, *words[t * type_len : (t + 1) * type_len]]
        pos += range(2, 3 + type_len)
        span += [t] * (1 + type_len)
    text_start = len(ids) + 1
    ids += [_SEP, *words[n_types * type_len :], _SEP]
    pos += range(3 + type_len, 3 + type_len + text_len + 2)
    span += [-1] * (text_len + 2)
    s = torch.tensor(span)
    allowed = (s[:, None] < 0) | (s[None, :] < 0) | (s[:, None] == s[None, :])
    ids_t = torch.tensor([ids])
    with torch.no_grad():
        h = model.encode(ids_t, torch.tensor([pos]), allowed[None], torch.ones_like(ids_t, dtype=torch.bool))[0]
    h = h.to(torch.bfloat16).double()
    return h[text_start:-1], h[ids_t[0] == type_id].mean(0)


def _shape_head(state: dict[str, torch.Tensor], cfg: dict, link_bias: float, gen: torch.Generator) -> None:
    """Give the random head the link statistics of a trained one (see write_random_model).

    Rotary pairs are interleaved (dims 2k, 2k+1 rotate by position * freqs[k]); a bias-only
    pair contributes ``q_bias . k_bias * cos(freqs[k] * (pos_i - pos_j))`` to every logit.
    """
    text, type_mean = _calibration_states(state, cfg, gen)
    q_w, k_w = state["ffnq.weight"].double(), state["ffnk.weight"].double()
    q_b, k_b = state["ffnq.bias"], state["ffnk.bias"]
    # Without the shared text direction, content logits are centred at 0 for every seed.
    common = F.normalize(text.mean(0), dim=0)
    q_w -= torch.outer(q_w @ common, common)
    k_w -= torch.outer(k_w @ common, common)
    freqs = state["rotary_emb.freqs"]
    span_pairs = (freqs >= _SPAN_MIN_FREQ).nonzero().flatten()
    gate, shift = len(freqs) - 2, len(freqs) - 1  # lowest frequencies: ~constant over 512 positions
    special = torch.tensor([gate, shift])
    structured = torch.cat([2 * span_pairs, 2 * span_pairs + 1, 2 * special, 2 * special + 1])
    for t in (q_w, q_b, k_w, k_b):
        t[structured] = 0.0
    # Random layers shrink the token-specific part of the hidden states: rescale the content
    # logits between text tokens to std _LOGIT_STD.
    content = (text @ q_w.T) @ (text @ k_w.T).T
    scale = math.sqrt(_LOGIT_STD / content[~torch.eye(len(text), dtype=torch.bool)].std().item())
    q_w *= scale
    k_w *= scale
    # Span kernel: + _SPAN_GAIN * mean_k cos(freqs[k] * d), 1 at d = 0 and fading within a few tokens.
    q_b[2 * span_pairs] = k_b[2 * span_pairs] = math.sqrt(_SPAN_GAIN / len(span_pairs))
    # Type gate: g(h) = projection on the [TYPE] direction (orthogonal to the text mean), ~0 for
    # text and 1 for [TYPE]. (bias 1, g) in one dim and (g, bias 1) in the other add
    # _TYPE_BONUS * (g_i + g_j): head links (text -> [TYPE]) and tail links ([TYPE] -> text) rise.
    type_dir = type_mean - (type_mean @ common) * common
    q_b[2 * gate] = k_b[2 * gate + 1] = 1.0
    k_w[2 * gate] = q_w[2 * gate + 1] = _TYPE_BONUS * type_dir / type_dir.norm() ** 2
    # Link bias: +c / -c on one pair lowers every logit by ~c^2, which sets the overall sparsity.
    q_b[2 * shift], k_b[2 * shift] = link_bias, -link_bias
    state["ffnq.weight"], state["ffnk.weight"] = q_w.float(), k_w.float()


def write_random_model(
    out_dir: Path,
    size: Literal["base", "tiny"],
    seed: int = 0,
    link_bias: float = DEFAULT_LINK_BIAS,
    vocab_path: Path | None = None,
) -> Path:
    """Write a loadable model directory in the ModelScope layout with seeded random weights.

    The real weights are not available; benchmarks need a model of the real size whose links are
    sparse and structured like a trained one's, so the recursion neither explodes nor dies.
    Backbone: N(0, 0.02) linear/conv weights, N(0, 1) word (incl. [PAD]) and relative
    embeddings, LayerNorm weights 1 +- 0.1 and biases N(0, 0.1). The head is shaped by
    ``_shape_head``; ``link_bias`` lowers every logit by ~link_bias^2.

    Measured on the base size with the default link_bias (seeds 0, 1, 2; the level-0/1 inputs of
    the golden traces, and 16 NER + 16 RE dev texts run through the engine): positive-link rate
    1.0e-3 - 5.5e-3 for text x text pairs more than 3 tokens apart, 0.17 - 0.19 at distance 1-3,
    0.66 - 0.76 on the diagonal, 0.05 - 0.12 for text <-> [TYPE]; NER 0.6 - 1.6 decoded spans per
    type (at most 2.7 - 5.7 per text); RE 1 - 3 forwards and 0 - 160 results per text.
    [CLASSIFY] gets no gate, so classification mostly ends in the handshake pass.

    Same seed and arguments give a byte-identical ``pytorch_model.bin``.
    """
    if size not in ("base", "tiny"):
        raise ValueError(f"size must be 'base' or 'tiny', not {size!r}")
    vocab = Path(vocab_path) if vocab_path is not None else default_vocab_path()
    if not vocab.is_file():
        raise FileNotFoundError(f"vocab file {vocab} not found (set REX_SHARED or pass vocab_path)")
    cfg = BASE_CONFIG if size == "base" else TINY_CONFIG
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=4) + "\n", encoding="utf-8")
    shutil.copyfile(vocab, out / "vocab.txt")
    for name, text in _SIDE_FILES.items():
        source = vocab.parent / name
        if source.is_file():
            shutil.copyfile(source, out / name)
        else:
            (out / name).write_text(text, encoding="utf-8")
    torch.save(_random_state_dict(cfg, seed, link_bias), out / "pytorch_model.bin")
    return out
