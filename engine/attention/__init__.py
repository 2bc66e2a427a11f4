"""Attention backends behind one interface (see ``base``); ``select_backend`` picks one."""

from __future__ import annotations

import importlib.util

import torch

from common.errors import ConfigError
from engine.attention.base import AttentionBackend, AttentionBatch, kv_cache_shape
from engine.attention.torch_backend import TorchAttentionBackend

__all__ = ["AttentionBackend", "AttentionBatch", "kv_cache_shape", "select_backend"]


def select_backend(name: str, device: torch.device) -> AttentionBackend:
    """``auto`` takes the fastest backend available on ``device``; the others are explicit."""
    if name == "auto":
        name = "torch"
        if device.type == "cuda":
            for candidate, package in (("flash_attn", "flash_attn"), ("triton", "triton")):
                module = f"engine.attention.{candidate}_backend"
                if importlib.util.find_spec(package) and importlib.util.find_spec(module):
                    name = candidate
                    break
    if name == "torch":
        return TorchAttentionBackend()
    if device.type != "cuda":
        raise ConfigError(f"backend {name!r} needs a CUDA device", field="attention_backend")
    if name == "triton":
        from engine.attention.triton_backend import TritonAttentionBackend
        return TritonAttentionBackend()
    if name == "flash_attn":
        if not importlib.util.find_spec("flash_attn"):
            raise ConfigError("the flash-attn package is not installed", field="attention_backend")
        from engine.attention.flash_attn_backend import FlashAttnBackend
        return FlashAttnBackend()
    raise ConfigError(f"unknown attention backend {name!r}", field="attention_backend")
