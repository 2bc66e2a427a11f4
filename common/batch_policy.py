"""Batch-size policies: how many requests may run at once, and who is admitted next.

They live in ``common`` (no torch) because the engine's scheduler and the
cluster simulator run the same functions.

A policy is a pure function of a :class:`BatchSnapshot` the scheduler takes
once per step; it never touches the scheduler. The scheduler asks it for a
:class:`BatchDecision` before admitting waiting requests, so a new policy slots
in by name (``EngineConfig.batch_policy``) without changing the scheduler.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from common.errors import ConfigError


@dataclass(frozen=True, slots=True)
class WaitingRequest:
    request_id: str
    num_prompt_tokens: int
    max_tokens: int
    arrival_time: float


@dataclass(frozen=True, slots=True)
class BatchSnapshot:
    num_running: int
    num_free_blocks: int
    num_total_blocks: int
    block_size: int
    max_num_requests: int  # the configured hard cap
    recent_step_times_s: tuple[float, ...]  # newest last
    waiting: tuple[WaitingRequest, ...]  # only filled for policies with needs_waiting


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


POLICIES: dict[str, Callable[[], BatchPolicy]] = {"static": StaticBatchPolicy}


def make_batch_policy(name: str) -> BatchPolicy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ConfigError(f"unknown batch policy {name!r} (known: {sorted(POLICIES)})",
                          field="batch_policy") from None
