"""The attention-backend interface and the flat batch layout every backend reads.

A step's tokens form one flat variable-length batch: request ``i`` owns tokens
``query_start_loc[i]:query_start_loc[i + 1]``, which sit at positions
``num_computed[i] .. seq_lens[i] - 1`` of its sequence. Each token's K and V are
written to ``slot_mapping[t]`` (``block_id * block_size + offset``) of every
layer's paged cache before attention reads the request's blocks through
``block_tables``. The runner builds the layout once per step; each backend turns
it into its own metadata once per step (``build_metadata``) and reuses that for
every layer.

A layer's KV cache is one tensor ``[2, num_blocks, block_size, num_kv_heads,
head_dim]`` (K then V) for every backend, so KV transfer and the prefix cache
need not know which backend filled it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch


@dataclass(slots=True)
class AttentionBatch:
    """Device tensors plus the host-side lists a backend may plan with."""

    query_start_loc: torch.Tensor  # [B + 1] int32
    seq_lens: torch.Tensor  # [B] int32, context length after this step
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0
    slot_mapping: torch.Tensor  # [T] int64
    query_lens_host: list[int]
    seq_lens_host: list[int]
    block_size: int

    @property
    def num_requests(self) -> int:
        return len(self.query_lens_host)

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens_host, default=0)

    @property
    def max_seq_len(self) -> int:
        return max(self.seq_lens_host, default=0)


def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
    return (2, num_blocks, block_size, num_kv_heads, head_dim)


class AttentionBackend(Protocol):
    """Computes causal attention over paged KV for a flat batch.

    The model runner calls ``build_metadata`` once per step; every attention
    layer then calls ``forward`` with that metadata.
    """

    name: str

    def build_metadata(self, batch: AttentionBatch) -> Any: ...

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                metadata: Any, *, scale: float, sliding_window: int | None) -> torch.Tensor:
        """Write ``k``/``v`` ([T, Hkv, D]) into ``kv_cache`` and attend ``q`` ([T, Hq, D]).

        Returns the attention output ``[T, Hq, D]``.
        """
        ...


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Scatter new K/V rows into their slots (shared by backends without a fused writer)."""
    _, num_blocks, block_size, heads, dim = kv_cache.shape
    flat = kv_cache.view(2, num_blocks * block_size, heads, dim)
    flat[0].index_copy_(0, slot_mapping, k)
    flat[1].index_copy_(0, slot_mapping, v)
