"""Attention backends behind one interface (see ``base``); ``select_backend`` picks one."""

from __future__ import annotations

import importlib.util

import torch

from common.errors import ConfigError
from engine.attention.base import AttentionBackend, AttentionBatch, kv_cache_shape
from engine.attention.torch_backend import TorchAttentionBackend

__all__ = ["AttentionBackend", "AttentionBatch", "kv_cache_shape", "select_backend"]


def select_backend(name: str, device: torch.device, *, block_size: int | None = None) -> AttentionBackend:
    """``auto`` takes the fastest backend available on ``device``; the others are explicit.

    ``block_size`` is the KV cache's: flash-attn's paged kernels need a multiple
    of 256, so ``auto`` takes flash_attn only for such a block size (and not
    when the caller does not say), and an explicit ``flash_attn`` refuses others.
    """
    if name == "auto":
        name = "torch"
        if device.type == "cuda":
            for candidate, package in (("flash_attn", "flash_attn"), ("triton", "triton")):
                module = f"engine.attention.{candidate}_backend"
                if not (importlib.util.find_spec(package) and importlib.util.find_spec(module)):
                    continue
                if candidate == "flash_attn" and not _flash_attn_block_size_ok(block_size):
                    continue
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
        return FlashAttnBackend(block_size)
    raise ConfigError(f"unknown attention backend {name!r}", field="attention_backend")


def _flash_attn_block_size_ok(block_size: int | None) -> bool:
    from engine.attention.flash_attn_backend import block_size_supported
    return block_size is not None and block_size_supported(block_size)
