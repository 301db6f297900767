"""Model directory handling: config validation, ModelScope download, strict weight loading."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rex_stream.engine.model import RexModel

# Checkpoint entries that carry no weights and may be present in older exports.
HARMLESS_EXTRA_KEYS = frozenset({"plm.embeddings.position_ids"})


class ModelLoadError(RuntimeError):
    """The model directory cannot be turned into a working model."""


class ModelNotFound(ModelLoadError):
    """Neither a local directory nor a downloadable ModelScope model."""


class UnsupportedConfig(ModelLoadError):
    """config.json asks for an architecture variant this implementation does not compute."""


# Settings our RexModel hard-codes; any other value would silently compute a different network.
_FIXED: dict[str, Any] = {
    "model_type": "deberta-v2",
    "relative_attention": True,
    "position_biased_input": False,
    "hidden_act": "gelu",
    "conv_act": "gelu",
    "share_att_key": True,
    "norm_rel_ebd": "layer_norm",
    "type_vocab_size": 0,
}


@dataclass(frozen=True)
class ModelConfig:
    """The sizes RexModel needs, read from a DeBERTa-v2 ``config.json`` that passed validation."""

    hidden_size: int
    num_attention_heads: int
    num_hidden_layers: int
    intermediate_size: int
    vocab_size: int
    position_buckets: int
    layer_norm_eps: float
    conv_kernel_size: int

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> ModelConfig:
        """Validate and build; raises UnsupportedConfig naming every offending setting."""
        missing = [f for f in cls.__dataclass_fields__ if f not in raw]
        if missing:
            raise UnsupportedConfig(f"config.json lacks {', '.join(missing)}")
        problems = [f"{k}={raw.get(k, '<missing>')!r} (need {v!r})" for k, v in _FIXED.items() if raw.get(k) != v]
        pos_att = raw.get("pos_att_type")
        parts = pos_att.split("|") if isinstance(pos_att, str) else pos_att
        if not isinstance(parts, list) or {p.strip().lower() for p in parts} != {"c2p", "p2c"}:
            problems.append(f"pos_att_type={pos_att!r} (need 'c2p|p2c')")
        # A positive value would switch the reference to log-bucketed relative positions.
        if raw.get("max_relative_positions", -1) > 0:
            problems.append(f"max_relative_positions={raw['max_relative_positions']!r} (need <= 0)")
        cfg = cls(**{f: raw[f] for f in cls.__dataclass_fields__})
        heads, hidden = cfg.num_attention_heads, cfg.hidden_size
        if hidden % heads:
            problems.append(f"hidden_size {hidden} not divisible by num_attention_heads {heads}")
        if hidden % 2:
            problems.append(f"hidden_size {hidden} must be even for the rotary head")
        if cfg.position_buckets <= 0:
            problems.append(f"position_buckets={cfg.position_buckets} (need > 0)")
        if cfg.conv_kernel_size <= 0 or cfg.conv_kernel_size % 2 == 0:
            problems.append(f"conv_kernel_size={cfg.conv_kernel_size} (need a positive odd size)")
        for key, need in (("embedding_size", hidden), ("attention_head_size", hidden // heads), ("conv_groups", 1)):
            if raw.get(key, need) != need:
                problems.append(f"{key}={raw[key]!r} (need {need})")
        if problems:
            raise UnsupportedConfig("unsupported model config: " + "; ".join(problems))
        return cfg

    @classmethod
    def from_json(cls, path: Path) -> ModelConfig:
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot read model config {path}: {exc}") from exc
        return cls.from_dict(raw)


def resolve_model_dir(name_or_path: str, cache_dir: str | None = None, revision: str | None = None) -> Path:
    """Use an existing directory as is, else download the ModelScope model id ``owner/name``.

    ``modelscope`` is imported only here, so the worker runs without it when given a local path.
    """
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        return local
    cache = cache_dir or os.environ.get("MODELSCOPE_CACHE") or "~/.cache/modelscope (modelscope default)"
    looks_like_id = name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/", "~"))
    if not looks_like_id:
        raise ModelNotFound(f"model directory {name_or_path!r} does not exist (and is not a ModelScope id)")
    try:
        from modelscope import snapshot_download
    except ImportError as exc:
        raise ModelNotFound(
            f"{name_or_path!r} is not a local directory and modelscope is not installed to download it "
            f"(pip install modelscope; cache dir {cache})"
        ) from exc
    try:
        path = Path(snapshot_download(name_or_path, revision=revision, cache_dir=cache_dir))
    except Exception as exc:  # network, auth and hub errors all mean "not available here"
        raise ModelNotFound(f"cannot download ModelScope model {name_or_path!r} into cache {cache}: {exc}") from exc
    if not (path / "config.json").is_file():
        raise ModelNotFound(f"ModelScope model {name_or_path!r} downloaded to {path} has no config.json")
    return path


def _read_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    safetensors_path, bin_path = model_dir / "model.safetensors", model_dir / "pytorch_model.bin"
    try:
        if safetensors_path.is_file():
            from safetensors.torch import load_file

            return load_file(str(safetensors_path), device="cpu")
        if bin_path.is_file():
            return torch.load(bin_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or foreign files surface in many exception types
        raise ModelLoadError(f"cannot read weights in {model_dir}: {exc}") from exc
    raise ModelLoadError(f"no model.safetensors or pytorch_model.bin in {model_dir}")


def _check_state_dict(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> None:
    """Fail on any missing, unexpected or wrongly shaped key; a partial load would give garbage links."""
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys() - HARMLESS_EXTRA_KEYS)
    shapes = [
        f"{k}: checkpoint {list(state[k].shape)} vs model {list(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append("missing keys: " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected keys: " + ", ".join(unexpected))
    if shapes:
        problems.append("wrong shapes: " + "; ".join(shapes))
    if problems:
        raise ModelLoadError("checkpoint does not match the model config: " + " | ".join(problems))


def load_model(model_dir: Path, device: str = "cpu") -> tuple[RexModel, ModelConfig]:
    """Build RexModel from ``model_dir`` with fp32 weights, in eval mode, relative cache prepared."""
    model_dir = Path(model_dir)
    cfg = ModelConfig.from_json(model_dir / "config.json")
    state = _read_state_dict(model_dir)
    with torch.device("meta"):  # no throw-away random init of ~100M parameters
        model = RexModel.from_config(cfg)
    _check_state_dict(state, model.state_dict())
    weights = {k: v.float() for k, v in state.items() if k not in HARMLESS_EXTRA_KEYS}
    model.load_state_dict(weights, strict=True, assign=True)
    model.requires_grad_(False).eval().to(device)
    model.prepare()
    return model, cfg
