"""The model runner: owns the weights and the KV cache tensors, executes one step.

``execute(SchedulerOutput) -> RunnerOutput``: lays the scheduled tokens out as
one flat batch (token ids, positions, slot mapping, block tables), runs the
model, computes logits only for the tokens that sample, and samples them.
Host-side inputs are built in NumPy and copied once, pinned and non-blocking
on GPU; the only device-to-host sync is reading the sampled tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch

from common.config import EngineConfig
from common.errors import ConfigError
from engine.attention import AttentionBatch, kv_cache_shape, select_backend
from engine.models import ForwardContext, ModelConfig, load_model
from engine.sampler import Sampler
from engine.scheduler import RunnerOutput, SchedulerOutput

logger = logging.getLogger(__name__)


def kv_block_bytes(model: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one block across all layers, K and V."""
    return 2 * model.num_layers * block_size * model.num_kv_heads * model.head_dim * dtype.itemsize


class ModelRunner:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, *, device: torch.device,
                 dtype: torch.dtype, max_model_len: int) -> None:
        self.config = config
        self.model_config = model_config
        self.device = device
        self.dtype = dtype
        self.block_size = config.block_size
        self.model = load_model(config.model, model_config, dtype=dtype, device=device,
                                max_position=max_model_len)
        self.backend = select_backend(config.attention_backend, device)
        self.sampler = Sampler(config.seed, device)
        self.kv_caches: list[torch.Tensor] = []
        self._pin = device.type == "cuda"

    def plan_num_blocks(self) -> int:
        """KV blocks that fit the configured memory (called once the weights are loaded)."""
        cfg = self.config
        if cfg.num_blocks is not None:
            return cfg.num_blocks
        block_bytes = kv_block_bytes(self.model_config, cfg.block_size, self.dtype)
        if cfg.kv_cache_memory_gib is not None:
            budget = cfg.kv_cache_memory_gib * 2**30
        elif self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            used_by_others = total - free
            # headroom for activations of one max-size step and the allocator's slack
            budget = total * cfg.gpu_memory_utilization - used_by_others - 2 * 2**30
        else:
            budget = 2**28  # 256 MiB on CPU
        num_blocks = int(budget // block_bytes)
        if num_blocks < 1:
            raise ConfigError("no memory left for the KV cache", field="gpu_memory_utilization")
        return num_blocks

    def allocate_kv_cache(self, num_blocks: int) -> None:
        mc = self.model_config
        shape = kv_cache_shape(num_blocks, self.block_size, mc.num_kv_heads, mc.head_dim)
        self.kv_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(mc.num_layers)]
        logger.info("runner ready: %s on %s, %s, %d KV blocks of %d tokens, attention=%s",
                    mc.architecture, self.device, self.dtype, num_blocks, self.block_size, self.backend.name)

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(array)
        if self._pin:
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    def _prepare(self, out: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, AttentionBatch, torch.Tensor]:
        bs = self.block_size
        num_requests = len(out.scheduled)
        input_ids = np.empty(out.num_tokens, dtype=np.int64)
        positions = np.empty(out.num_tokens, dtype=np.int64)
        slot_mapping = np.empty(out.num_tokens, dtype=np.int64)
        query_start = np.zeros(num_requests + 1, dtype=np.int32)
        seq_lens = np.empty(num_requests, dtype=np.int32)
        max_blocks = max(len(s.block_ids) for s in out.scheduled)
        block_tables = np.zeros((num_requests, max_blocks), dtype=np.int32)
        sample_idx = []
        t = 0
        for i, s in enumerate(out.scheduled):
            n = len(s.token_ids)
            table = np.asarray(s.block_ids, dtype=np.int64)
            block_tables[i, :len(table)] = table
            pos = np.arange(s.start_pos, s.start_pos + n)
            input_ids[t:t + n] = s.token_ids
            positions[t:t + n] = pos
            slot_mapping[t:t + n] = table[pos // bs] * bs + pos % bs
            t += n
            query_start[i + 1] = t
            seq_lens[i] = s.start_pos + n
            if s.sample:
                sample_idx.append(t - 1)
        batch = AttentionBatch(
            query_start_loc=self._to_device(query_start), seq_lens=self._to_device(seq_lens),
            block_tables=self._to_device(block_tables), slot_mapping=self._to_device(slot_mapping),
            query_lens_host=np.diff(query_start).tolist(), seq_lens_host=seq_lens.tolist(), block_size=bs)
        return (self._to_device(input_ids), self._to_device(positions), batch,
                self._to_device(np.asarray(sample_idx, dtype=np.int64)))

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, on_layer_done: Callable[[int], None] | None = None) -> RunnerOutput:
        input_ids, positions, batch, sample_idx = self._prepare(out)
        metadata = self.backend.build_metadata(batch)
        ctx = ForwardContext(self.backend, metadata, self.kv_caches, on_layer_done)
        hidden = self.model(input_ids, positions, ctx)
        sampling = [s for s in out.scheduled if s.sample]
        sampled: list[int | None] = [None] * len(out.scheduled)
        logprobs: list = [None] * len(out.scheduled)
        if sampling:
            logits = self.model.compute_logits(hidden[sample_idx])
            result = self.sampler(logits, [s.sampling for s in sampling], [s.generator for s in sampling])
            j = 0
            for i, s in enumerate(out.scheduled):
                if s.sample:
                    sampled[i], logprobs[i] = result.token_ids[j], result.logprobs[j]
                    j += 1
        return RunnerOutput(sampled, logprobs)
