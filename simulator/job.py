"""A request's life inside one simulated engine (the engine's ``Request``, by counts).

Progress is counted as in the engine: ``num_computed`` catches up with ``num_tokens`` (prompt +
outputs so far); a cached prefix and received KV just advance it. Lifecycle (``JobState``)::

    WAITING ─admit─► PREFILLING ─prompt done─► DECODING ─last token─► DONE
       │  ▲             │  (mode PREFILL_ONLY) └──► PREFILLED ─transfer acknowledged─► DONE
       │  └─preempted───┴──────────────────────────────── (from PREFILLING or DECODING)
       └─(mode REMOTE_KV) reserve─► AWAITING_KV ─KV landed─► READY ─next step─► DECODING

A decoding job's counts are implicit while it is in the decode batch (they advance with the
batch's step counter, see :class:`simulator.decode_batch.DecodeBatch`); ``num_tokens`` and
``num_outputs`` are written back when it leaves the batch.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any


class JobMode(enum.IntEnum):
    COLOCATED = 0
    """Compute the prompt here and decode (local prefill, the recompute after a preemption)."""
    PREFILL_ONLY = 1
    """Compute the prompt, sample the first token, hold the blocks until the transfer is done."""
    REMOTE_KV = 2
    """Reserve blocks for the prompt, wait for its KV from a prefill instance, then decode."""


class JobState(enum.IntEnum):
    WAITING = 0
    AWAITING_KV = 1
    READY = 2
    PREFILLING = 3
    DECODING = 4
    PREFILLED = 5
    DONE = 6


@dataclass(slots=True, eq=False)
class Job:
    request_id: str
    mode: JobMode
    num_prompt_tokens: int
    num_output_tokens: int
    """The true output length (the simulator's knowledge; policies see predictions only)."""
    predicted_output_tokens: int
    block_hashes: tuple[int, ...]
    arrival_s: float
    """When it reached this instance (the batch policy's arrival order)."""
    owner: Any = None
    """The cluster's record of the request (opaque to the engine)."""
    state: JobState = JobState.WAITING
    num_tokens: int = 0
    num_outputs: int = 0
    num_computed: int = 0
    num_cached: int = -1
    """Prefix-cache hit at first admission, in tokens; -1 until admitted."""
    num_cached_now: int = 0
    """Prefix-cache hit (plus fetched prefix) at the current admission, in tokens."""
    num_fetched_blocks: int = 0
    """Prefix blocks fetched from another instance before the prefill (global_cache_aware)."""
    num_reg: int = 0
    """Leading prompt blocks held as hashed (prefix-cache) blocks."""
    num_anon: int = 0
    """Anonymous blocks held, while outside the decode batch."""
    num_synced_outputs: int = 0
    """Outputs already reported to the cluster."""
    num_preemptions: int = 0
    # decode batch bookkeeping (see DecodeBatch)
    base: int = 0
    join_step: int = 0
    outputs_at_join: int = 0
    finish_step: int = 0
    batch_seq: int = 0
    prefill_started_s: float = -1.0

    def __post_init__(self) -> None:
        self.num_tokens = self.num_prompt_tokens

    @property
    def num_remaining_prompt(self) -> int:
        return self.num_tokens - self.num_computed
