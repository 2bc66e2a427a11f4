"""Batch-size policies: how many requests may run at once, and who is admitted next.

They live in ``common`` (no torch) because the engine's scheduler and the
cluster simulator run the same functions.

A policy is a function of a :class:`BatchSnapshot` the scheduler takes once per
step; it never touches the scheduler. The scheduler asks it for a
:class:`BatchDecision` before admitting waiting requests, so a new policy slots
in by name (``EngineConfig.batch_policy``) without changing the scheduler.

| name | policy | reads |
|---|---|---|
| ``static`` | FCFS with a fixed limit on running requests (the baseline) | the configured cap |
| ``dynamic`` | memory-aware batch size with SLA feedback (Pang, Li, Wang, arXiv 2503.05248) | free blocks, predicted footprints, recent step times |
| ``shortest_first`` | memory-constrained shortest-first, MC-SF (Jaillet et al., arXiv 2502.07115) | predicted output lengths, running requests' growth |

Predicted output lengths travel in :attr:`WaitingRequest.predicted_output_tokens` and
:attr:`RunningRequest.predicted_remaining_tokens`. The engine's scheduler does not fill them
yet (it fills ``waiting`` but not ``running``): policies then fall back to each request's
``max_tokens``, and estimate the running requests' growth from the waiting ones (documented
per policy).
The simulator fills both, with a length predictor's output or with the true lengths.

``static`` is stateless. ``dynamic`` keeps one number between calls, its current limit (the
controller state of the SLA feedback loop); ``shortest_first`` is a pure function of the snapshot.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from common.errors import ConfigError


@dataclass(frozen=True, slots=True)
class WaitingRequest:
    request_id: str
    num_prompt_tokens: int
    max_tokens: int
    arrival_time: float
    predicted_output_tokens: int = 0
    """Predicted output length; 0 = unknown (policies fall back to ``max_tokens``)."""
    num_output_tokens: int = 0
    """Tokens generated before a preemption sent the request back to the queue."""

    @property
    def expected_output_tokens(self) -> int:
        """The output length a policy plans with: the prediction, else the cap."""
        return max(1, self.predicted_output_tokens or self.max_tokens)


@dataclass(frozen=True, slots=True)
class RunningRequest:
    """A running request as a memory-aware policy sees it (filled by the simulator; the engine not yet)."""

    request_id: str
    num_tokens: int
    """Prompt + generated tokens: the KV it holds (or is about to)."""
    predicted_remaining_tokens: int


@dataclass(frozen=True, slots=True)
class BatchSnapshot:
    num_running: int
    num_free_blocks: int
    num_total_blocks: int
    block_size: int
    max_num_requests: int  # the configured hard cap
    recent_step_times_s: tuple[float, ...]  # newest last
    waiting: tuple[WaitingRequest, ...]  # only filled for policies with needs_waiting
    running: tuple[RunningRequest, ...] = ()  # optional; empty when the caller does not know


@dataclass(frozen=True, slots=True)
class BatchDecision:
    max_running: int
    admission_order: tuple[str, ...] | None = None  # request ids, best first; None = arrival order


class BatchPolicy(Protocol):
    name: str
    needs_waiting: bool

    def decide(self, snapshot: BatchSnapshot) -> BatchDecision: ...


class StaticBatchPolicy:
    """FCFS with a fixed limit on running requests (``max_num_requests``): the baseline."""

    name = "static"
    needs_waiting = False

    def decide(self, snapshot: BatchSnapshot) -> BatchDecision:
        return BatchDecision(max_running=snapshot.max_num_requests)


def _blocks(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def _growth_blocks(snapshot: BatchSnapshot) -> int:
    """Blocks the running requests are predicted still to need beyond what they hold.

    Without per-request data (the engine), each running request is taken to be halfway through
    an output as long as the waiting requests' mean expected output: the traffic is the same.
    """
    bs = snapshot.block_size
    if snapshot.running:
        return sum(_blocks(r.num_tokens + r.predicted_remaining_tokens, bs) - _blocks(r.num_tokens, bs)
                   for r in snapshot.running)
    if not snapshot.waiting or snapshot.num_running <= 0:
        return 0
    mean = sum(w.expected_output_tokens for w in snapshot.waiting) / len(snapshot.waiting)
    return snapshot.num_running * _blocks(int(mean / 2), bs)


class DynamicBatchPolicy:
    """Memory-aware dynamic batch size with SLA feedback (arXiv 2503.05248).

    Two limits, the smaller wins:

    - **memory**: waiting requests are admitted (in arrival order) while their predicted
      footprints, ``blocks(prompt + predicted output)``, fit in the free blocks left after the
      running requests' predicted growth and a safety margin of ``memory_margin`` of the pool;
    - **SLA feedback**: a limit on running requests adjusted from the median of the last
      ``window`` step times against ``tbt_target_s``: multiplicative decrease (``decrease``)
      when above the target, additive increase (``increase``) when below ``headroom`` x target
      while the limit binds. Adjusted once per new step-time observation. The median, not the
      mean: a step carrying a prompt chunk is slow whatever the batch size, and cutting the
      batch would not make it faster.

    A request can always run alone: with nothing running the limit is at least 1.
    """

    name = "dynamic"
    needs_waiting = True

    def __init__(self, *, tbt_target_s: float = 0.1, memory_margin: float = 0.05, decrease: float = 0.8,
                 increase: int = 1, headroom: float = 0.9, window: int = 8, min_running: int = 1) -> None:
        if not tbt_target_s > 0:
            raise ConfigError(f"must be positive, got {tbt_target_s}", field="tbt_target_s")
        if not 0 <= memory_margin < 1:
            raise ConfigError(f"must be in [0, 1), got {memory_margin}", field="memory_margin")
        if not 0 < decrease < 1:
            raise ConfigError(f"must be in (0, 1), got {decrease}", field="decrease")
        if increase < 1 or window < 1 or min_running < 1:
            raise ConfigError("increase, window and min_running must be >= 1", field="increase")
        self.tbt_target_s = tbt_target_s
        self.memory_margin = memory_margin
        self.decrease = decrease
        self.increase = increase
        self.headroom = headroom
        self.window = window
        self.min_running = min_running
        self.limit: int | None = None  # the SLA feedback's current limit (None until the first call)
        self._seen: tuple[float, ...] = ()

    def _feedback(self, snapshot: BatchSnapshot) -> int:
        limit = snapshot.max_num_requests if self.limit is None else min(self.limit, snapshot.max_num_requests)
        steps = snapshot.recent_step_times_s
        if steps and steps != self._seen:
            self._seen = steps
            recent = sorted(steps[-self.window:])
            typical = recent[len(recent) // 2]
            if typical > self.tbt_target_s:
                limit = max(self.min_running, math.floor(min(limit, snapshot.num_running) * self.decrease))
            elif typical < self.headroom * self.tbt_target_s and snapshot.num_running >= limit:
                limit = min(snapshot.max_num_requests, limit + self.increase)
        self.limit = limit
        return limit

    def _memory_limit(self, snapshot: BatchSnapshot) -> int:
        bs = snapshot.block_size
        usable = snapshot.num_free_blocks - self.memory_margin * snapshot.num_total_blocks - _growth_blocks(snapshot)
        admitted = 0
        for w in snapshot.waiting:
            need = _blocks(w.num_prompt_tokens + w.num_output_tokens + w.expected_output_tokens, bs)
            if need > usable and (admitted or snapshot.num_running):
                break
            usable -= need
            admitted += 1
        return snapshot.num_running + admitted

    def decide(self, snapshot: BatchSnapshot) -> BatchDecision:
        limit = min(self._feedback(snapshot), self._memory_limit(snapshot))
        if snapshot.num_running == 0:
            limit = max(limit, 1)
        return BatchDecision(max_running=limit)


class ShortestFirstPolicy:
    """Memory-constrained shortest-first, MC-SF (Jaillet, Jiang, Mellou, Molinaro, Podimata, Zhou,
    arXiv 2502.07115).

    Running requests keep running. Waiting requests are considered in ascending predicted
    output length (ties: arrival) and admitted while the batch stays feasible at every future
    step: a request with ``s`` tokens now and ``r`` predicted tokens to go holds ``s + t`` tokens
    at step ``t <= r`` and nothing after, so the KV in use peaks just before some request ends;
    the check evaluates every such completion point (in blocks, one partial block per request,
    within ``1 - memory_margin`` of the pool). The first request that does not fit ends the scan.
    Without running-request data (the engine) the blocks in use are taken to stay in use for
    the whole horizon, grown by the estimate ``dynamic`` uses too. A request can always run alone.
    """

    name = "shortest_first"
    needs_waiting = True

    def __init__(self, *, memory_margin: float = 0.0) -> None:
        if not 0 <= memory_margin < 1:
            raise ConfigError(f"must be in [0, 1), got {memory_margin}", field="memory_margin")
        self.memory_margin = memory_margin

    def decide(self, snapshot: BatchSnapshot) -> BatchDecision:
        bs = snapshot.block_size
        order = sorted(snapshot.waiting, key=lambda w: (w.expected_output_tokens - w.num_output_tokens,
                                                        w.arrival_time))
        capacity = snapshot.num_total_blocks * (1.0 - self.memory_margin) * bs
        if snapshot.running:
            base = 0.0
            sizes = [r.num_tokens + bs - 1 for r in snapshot.running]
            remaining = [max(1, r.predicted_remaining_tokens) for r in snapshot.running]
        else:  # the engine: the blocks in use stay in use, and grow as _growth_blocks estimates
            base = float((snapshot.num_total_blocks - snapshot.num_free_blocks + _growth_blocks(snapshot)) * bs)
            sizes, remaining = [], []
        s = np.array(sizes, dtype=np.float64)
        r = np.array(remaining, dtype=np.float64)
        chosen: list[str] = []
        for w in order:
            if snapshot.num_running + len(chosen) >= snapshot.max_num_requests:
                break
            s_new = np.append(s, w.num_prompt_tokens + w.num_output_tokens + bs - 1)
            r_new = np.append(r, max(1, w.expected_output_tokens - w.num_output_tokens))
            if not _fits(s_new, r_new, capacity - base) and (chosen or snapshot.num_running):
                break
            s, r = s_new, r_new
            chosen.append(w.request_id)
        ids = tuple(w.request_id for w in order)
        return BatchDecision(max_running=snapshot.num_running + len(chosen), admission_order=ids)


def _fits(sizes: np.ndarray, remaining: np.ndarray, capacity: float) -> bool:
    """Whether sum over {i: r_i >= t} of (s_i + t) <= capacity at every completion point t = r_j."""
    order = np.argsort(-remaining, kind="stable")
    r = remaining[order]
    peak = np.cumsum(sizes[order]) + np.arange(1, len(r) + 1) * r
    return bool(peak.max() <= capacity)


POLICIES: dict[str, Callable[[], BatchPolicy]] = {
    "static": StaticBatchPolicy,
    "dynamic": DynamicBatchPolicy,
    "shortest_first": ShortestFirstPolicy,
}


def make_batch_policy(name: str) -> BatchPolicy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ConfigError(f"unknown batch policy {name!r} (known: {sorted(POLICIES)})",
                          field="batch_policy") from None
