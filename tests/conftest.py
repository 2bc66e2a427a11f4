"""Shared fixtures: tiny random Hugging Face checkpoints built on the fly (nothing is downloaded)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# name -> (config class, overrides). Tiny shapes; each covers a family feature.
TINY_MODELS: dict[str, tuple[str, dict]] = {
    "llama_gqa": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=2)),
    "llama_mha_tied": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=4,
                                           tie_word_embeddings=True)),
    "llama3_rope": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=2, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32})),
    "qwen2": ("Qwen2Config", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                  tie_word_embeddings=False)),
    "mistral_window": ("MistralConfig", dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=24)),
}


def build_tiny_model(path: Path, kind: str, *, vocab_size: int = 512, dtype: str = "float32",
                     max_shard_size: str | None = None, seed: int = 0) -> Path:
    import torch
    import transformers

    cls_name, overrides = TINY_MODELS[kind]
    config_cls = getattr(transformers, cls_name)
    config = config_cls(hidden_size=64, intermediate_size=128, num_hidden_layers=2, vocab_size=vocab_size,
                        max_position_embeddings=1024, rms_norm_eps=1e-6, **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    # random init leaves norms at 1; perturb them so a wrong norm would show
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            elif name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.1)
    model = model.to(getattr(torch, dtype)).eval()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return path


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    cache: dict[tuple, Path] = {}

    def make(kind: str, **kwargs) -> Path:
        key = (kind, tuple(sorted(kwargs.items())))
        if key not in cache:
            path = tmp_path_factory.mktemp(kind)
            cache[key] = build_tiny_model(path, kind, **kwargs)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def llama_dir(tiny_model_factory) -> Path:
    return tiny_model_factory("llama_gqa")
