"""What the engine needs to know about a checkpoint, read from its ``config.json``.

Covers the Llama, Mistral, Qwen2 and Qwen3 families, in both the transformers 4
layout (``rope_theta`` + ``rope_scaling``, ``torch_dtype``) and the
transformers 5 layout (``rope_parameters``, ``dtype``). Unsupported settings
raise :class:`ConfigError` naming the config key, never a silent wrong model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import ConfigError

# architecture name -> (family, q/k/v bias always on, per-head q/k RMSNorm). Where the bias is not
# forced, Llama and Qwen3 follow `attention_bias`; Mistral never has one.
ARCHITECTURES: dict[str, tuple[str, bool, bool]] = {
    "LlamaForCausalLM": ("llama", False, False),
    "MistralForCausalLM": ("mistral", False, False),
    "Qwen2ForCausalLM": ("qwen2", True, False),
    "Qwen3ForCausalLM": ("qwen3", False, True),
}
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
               "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True)
class RopeConfig:
    rope_type: str = "default"
    theta: float = 10000.0
    factor: float = 1.0
    params: dict[str, Any] = field(default_factory=dict)  # the rest (llama3/yarn knobs)


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    sliding_windows: tuple[int | None, ...]  # per layer; None = full attention
    torch_dtype: str
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


def _rope_from_hf(cfg: dict[str, Any]) -> RopeConfig:
    params = cfg.get("rope_parameters")
    if params is None:  # transformers 4 layout
        params = dict(cfg.get("rope_scaling") or {})
        params.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    params = dict(params)
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    theta = float(params.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"rope type {rope_type!r} is not supported (supported: {SUPPORTED_ROPE_TYPES})",
                          field="rope_parameters.rope_type")
    factor = float(params.pop("factor", 1.0))
    return RopeConfig(rope_type=rope_type, theta=theta, factor=factor, params=params)


def _sliding_windows(cfg: dict[str, Any], family: str, num_layers: int) -> tuple[int | None, ...]:
    window = cfg.get("sliding_window")
    if family == "mistral":
        return (window,) * num_layers if window else (None,) * num_layers
    layer_types = cfg.get("layer_types")
    if layer_types is not None:
        if len(layer_types) != num_layers:
            raise ConfigError("must have one entry per layer", field="layer_types")
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    if cfg.get("use_sliding_window") and window:  # qwen2 in transformers 4
        max_window_layers = cfg.get("max_window_layers", num_layers)
        return tuple(window if i >= max_window_layers else None for i in range(num_layers))
    return (None,) * num_layers


def _eos_ids(cfg: dict[str, Any], gen: dict[str, Any]) -> tuple[int, ...]:
    ids: list[int] = []
    for src in (gen.get("eos_token_id"), cfg.get("eos_token_id")):
        if src is None:
            continue
        for i in src if isinstance(src, list) else [src]:
            if i not in ids:
                ids.append(int(i))
    return tuple(ids)


def model_config_from_dict(cfg: dict[str, Any], generation: dict[str, Any] | None = None) -> ModelConfig:
    archs = cfg.get("architectures") or [MODEL_TYPES.get(cfg.get("model_type", ""), "")]
    arch = archs[0]
    if arch not in ARCHITECTURES:
        raise ConfigError(f"architecture {arch!r} is not supported (supported: {sorted(ARCHITECTURES)})",
                          field="architectures")
    family, qkv_bias_forced, qk_norm = ARCHITECTURES[arch]
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"activation {act!r} is not supported", field="hidden_act")
    try:
        num_heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        num_layers = int(cfg["num_hidden_layers"])
        head_dim = int(cfg.get("head_dim") or hidden // num_heads)
        num_kv_heads = int(cfg.get("num_key_value_heads") or num_heads)
        attention_bias = bool(cfg.get("attention_bias", False))
        model = ModelConfig(
            architecture=arch, family=family,
            vocab_size=int(cfg["vocab_size"]), hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]), num_layers=num_layers,
            num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            rope=_rope_from_hf(cfg),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias_forced or (family in ("llama", "qwen3") and attention_bias),
            o_bias=family in ("llama", "qwen3") and attention_bias,
            mlp_bias=family == "llama" and bool(cfg.get("mlp_bias", False)),
            qk_norm=qk_norm,
            sliding_windows=_sliding_windows(cfg, family, num_layers),
            torch_dtype=str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32"),
            eos_token_ids=_eos_ids(cfg, generation or {}),
            bos_token_id=cfg.get("bos_token_id"),
        )
    except KeyError as e:
        raise ConfigError("missing from config.json", field=str(e.args[0])) from e
    if num_heads % num_kv_heads:
        raise ConfigError("num_attention_heads must be a multiple of num_key_value_heads",
                          field="num_key_value_heads")
    return model


def load_model_config(model_dir: str | Path) -> ModelConfig:
    model_dir = Path(model_dir)
    path = model_dir / "config.json"
    if not path.is_file():
        raise ConfigError(f"no config.json in {model_dir}", field="model")
    cfg = json.loads(path.read_text())
    gen_path = model_dir / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    return model_config_from_dict(cfg, gen)
