"""Decode steps replayed from CUDA graphs captured at padded batch sizes.

A decode-only step (every scheduled request computes one token and samples)
of ``B`` requests replays the graph of the smallest captured size ``>= B``.
Each graph runs the whole model and the logits on static input tensors:
token ids, positions, block tables ``[size, max_blocks]``, context lengths
and KV slots. ``max_blocks`` covers the longest context a graph serves
(steps with longer contexts run eagerly). Padded rows have
context length 0 and slot -1: the attention backend neither stores nor reads
their KV, and their logits are ignored. Graphs share one memory pool,
captured largest first so the smaller ones reuse its memory.

Only backends with a device-only decode path (``build_decode_metadata``) can
be captured; with any other backend, or ``enforce_eager``, steps run eagerly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import numpy as np
import torch

from engine.models import CausalLM, ForwardContext

logger = logging.getLogger(__name__)


def padded_sizes(max_batch: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, 64, 8)) + list(range(64, 256, 16)) + list(range(256, 1025, 32))
    return [s for s in sizes if s <= max_batch] or [1]


class DecodeGraphs:
    def __init__(self, model: CausalLM, backend, kv_caches: list[torch.Tensor], *, max_batch: int,
                 max_blocks: int, device: torch.device) -> None:
        self.model = model
        self.backend = backend
        self.kv_caches = kv_caches
        self.sizes = padded_sizes(max_batch)
        self.max_batch = self.sizes[-1]
        self.max_blocks = max_blocks
        self.device = device
        n = self.max_batch
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.block_tables = torch.zeros(n, max_blocks, dtype=torch.int32, device=device)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        # host staging (pinned): filled with NumPy, copied in one non-blocking transfer each
        self._host_ids = torch.zeros(n, dtype=torch.int64, pin_memory=True)
        self._host_pos = torch.zeros(n, dtype=torch.int64, pin_memory=True)
        self._host_tables = torch.zeros(n, max_blocks, dtype=torch.int32, pin_memory=True)
        self._host_lens = torch.zeros(n, dtype=torch.int32, pin_memory=True)
        self._host_slots = torch.full((n,), -1, dtype=torch.int64, pin_memory=True)
        # per size: the graph, its logits output, and the attention metadata whose scratch buffers the graph
        # writes into (it must live as long as the graph)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, object]] = {}
        self._pool = None

    @torch.inference_mode()
    def capture(self) -> None:
        start = time.perf_counter()
        self._pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):
            metadata = self.backend.build_decode_metadata(self.block_tables[:size], self.seq_lens[:size],
                                                          self.slot_mapping[:size])
            ctx = ForwardContext(self.backend, metadata, self.kv_caches)
            ids, pos = self.input_ids[:size], self.positions[:size]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up outside the graph: Triton compiles, scratch is allocated
                for _ in range(2):
                    self.model.compute_logits(self.model(ids, pos, ctx))
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                logits = self.model.compute_logits(self.model(ids, pos, ctx))
            self._graphs[size] = (graph, logits, metadata)
        torch.cuda.synchronize()
        logger.info("captured %d decode graphs (batch %d..%d) in %.1fs", len(self._graphs), self.sizes[0],
                    self.max_batch, time.perf_counter() - start)

    def fits(self, num_requests: int, block_tables: Iterable[list[int]]) -> bool:
        return num_requests <= self.max_batch and all(len(t) <= self.max_blocks for t in block_tables)

    @torch.inference_mode()
    def run(self, token_ids: np.ndarray, positions: np.ndarray, block_tables: list[list[int]],
            slots: np.ndarray) -> torch.Tensor:
        """Logits ``[B, vocab]`` of one decode step of ``B = len(token_ids)`` requests."""
        b = len(token_ids)
        size = next(s for s in self.sizes if s >= b)
        ids = self._host_ids.numpy()
        pos = self._host_pos.numpy()
        lens = self._host_lens.numpy()
        slot = self._host_slots.numpy()
        tables = self._host_tables.numpy()
        ids[:b], pos[:b], slot[:b] = token_ids, positions, slots
        lens[:b] = positions + 1
        ids[b:size], pos[b:size], lens[b:size], slot[b:size] = 0, 0, 0, -1
        # entries past a row's length are never read (nor are padded rows): no need to clear them
        for i, table in enumerate(block_tables):
            tables[i, :len(table)] = table
        self.input_ids[:size].copy_(self._host_ids[:size], non_blocking=True)
        self.positions[:size].copy_(self._host_pos[:size], non_blocking=True)
        self.seq_lens[:size].copy_(self._host_lens[:size], non_blocking=True)
        self.slot_mapping[:size].copy_(self._host_slots[:size], non_blocking=True)
        self.block_tables[:size].copy_(self._host_tables[:size], non_blocking=True)
        graph, logits, _ = self._graphs[size]
        graph.replay()
        return logits[:b]
