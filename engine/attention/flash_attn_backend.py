"""Attention backend on the flash-attn 2.x package (Dao-AILab), imported lazily.

flash-attn reads the paged cache in place (``kv_cache[0]`` / ``kv_cache[1]``
are its ``[num_blocks, page_block_size, num_kv_heads, head_dim]`` K and V),
but its paged kernels require ``page_block_size % 256 == 0`` ("Paged KV cache
block size must be divisible by 256", flash_api.cpp, both the varlen and the
kvcache entry points). The backend refuses other block sizes with a
``ConfigError`` naming ``block_size`` when it is built, and ``select_backend``
never picks it for them.

Per step: a batch of decodes only goes through ``flash_attn_with_kvcache``
(``cache_seqlens`` + ``block_table``; no host reads, so it can be captured in a
CUDA graph, see ``build_decode_metadata``); any batch with a prompt chunk goes
through one ``flash_attn_varlen_func`` call over every row, decodes included,
whose causal mask is aligned to the bottom right, i.e. offset by the tokens
already cached. K/V are stored before either call by the Triton writer, which
skips the negative slots of a CUDA graph's padded rows (``index_copy_`` would
fault on them).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

import torch

from common.errors import ConfigError
from engine.attention.base import AttentionBatch

PAGE_MULTIPLE = 256


def block_size_supported(block_size: int) -> bool:
    return block_size % PAGE_MULTIPLE == 0


def _check_block_size(block_size: int) -> None:
    if not block_size_supported(block_size):
        raise ConfigError(
            f"the flash_attn backend needs a block size that is a multiple of {PAGE_MULTIPLE} "
            f"(flash-attn's paged KV kernels), got {block_size}; use attention_backend=triton or "
            f"block_size={PAGE_MULTIPLE}", field="block_size")


def _import_flash_attn() -> ModuleType:
    try:
        return importlib.import_module("flash_attn")
    except ImportError as exc:
        raise ConfigError(f"the flash-attn package is not importable: {exc}", field="attention_backend") from exc


@dataclass(slots=True)
class FlashAttnMetadata:
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor  # [B, max_blocks] int32
    seq_lens: torch.Tensor  # [B] int32
    decode_only: bool  # every row has one query token, row b is token b
    cu_seqlens_q: torch.Tensor | None = None  # [B + 1] int32 (varlen path)
    cu_seqlens_k: torch.Tensor | None = None  # [B + 1] int32 (varlen path)
    max_query_len: int = 1
    max_seq_len: int = 0


class FlashAttnBackend:
    name = "flash_attn"

    def __init__(self, block_size: int | None = None) -> None:
        """``block_size`` is checked here when given; otherwise at the first ``build_metadata``."""
        if block_size is not None:
            _check_block_size(block_size)
        self._fa = _import_flash_attn()
        # flash-attn runs on CUDA, where Triton does
        from engine.attention.triton_kernels import write_kv_cache

        self._write_kv = write_kv_cache
        self._checked_block_size = block_size

    def _check(self, block_size: int) -> None:
        if block_size != self._checked_block_size:
            _check_block_size(block_size)
            self._checked_block_size = block_size

    def build_metadata(self, batch: AttentionBatch) -> FlashAttnMetadata:
        """Called by the runner once per step."""
        self._check(batch.block_size)
        if all(n == 1 for n in batch.query_lens_host):
            return FlashAttnMetadata(batch.slot_mapping, batch.block_tables, batch.seq_lens, True)
        cu_k = torch.zeros(batch.num_requests + 1, dtype=torch.int32, device=batch.seq_lens.device)
        cu_k[1:] = torch.cumsum(batch.seq_lens, 0, dtype=torch.int32)
        return FlashAttnMetadata(batch.slot_mapping, batch.block_tables, batch.seq_lens, False,
                                 batch.query_start_loc, cu_k, batch.max_query_len, batch.max_seq_len)

    def build_decode_metadata(self, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                              slot_mapping: torch.Tensor) -> FlashAttnMetadata:
        """Decode-only metadata from static device tensors (CUDA-graph capture and replay).

        ``slot_mapping`` of padded rows must name a slot no live request reads
        (``index_copy_`` has no skip value); their ``seq_lens`` are 0.
        """
        return FlashAttnMetadata(slot_mapping, block_tables, seq_lens, True)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                metadata: FlashAttnMetadata, *, scale: float, sliding_window: int | None) -> torch.Tensor:
        """Called by every attention layer with the step's metadata."""
        if q.dtype not in (torch.float16, torch.bfloat16):
            raise ConfigError(f"flash-attn runs fp16/bf16 only, got {q.dtype}", field="dtype")
        self._write_kv(kv_cache, k, v, metadata.slot_mapping)
        window = (sliding_window - 1, 0) if sliding_window is not None else (-1, -1)
        if metadata.decode_only:
            out = self._fa.flash_attn_with_kvcache(
                q.unsqueeze(1), kv_cache[0], kv_cache[1], cache_seqlens=metadata.seq_lens,
                block_table=metadata.block_tables, softmax_scale=scale, causal=True, window_size=window)
            return out.squeeze(1)
        return self._fa.flash_attn_varlen_func(
            q, kv_cache[0], kv_cache[1], metadata.cu_seqlens_q, metadata.cu_seqlens_k,
            metadata.max_query_len, metadata.max_seq_len, softmax_scale=scale, causal=True,
            window_size=window, block_table=metadata.block_tables)
