"""Continuous batching under a per-step token budget, with chunked prefill and preemption.

Each step, :meth:`Scheduler.schedule` spends ``max_num_batched_tokens`` in
this order: running requests that are decoding (one token each), then running
requests part-way through their prompt (the next chunk), then waiting requests
in the order the batch policy gives, up to its running-request limit. Waiting
requests start from the longest cached prefix of their tokens.

When the pool runs out of blocks, the lowest-priority running request not yet
scheduled in this step is preempted: its blocks are freed and it goes back to
the front of the waiting queue, to be recomputed from its prompt and the tokens
it has generated (cheaply, when its blocks are still in the prefix cache). A
request can always run alone: ``add_request`` refuses one that could not.

The step is plain data: ``schedule()`` returns a :class:`SchedulerOutput`, the
runner turns it into a ``RunnerOutput``, and ``update()`` applies that.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

import torch

from common.batch_policy import BatchPolicy, BatchSnapshot, RunningRequest, WaitingRequest
from common.config import EngineConfig
from common.sampling import SamplingParams
from engine.kv_cache_manager import KVCacheManager
from engine.request import Request, RequestMode, RequestStatus, TokenLogprobs

logger = logging.getLogger(__name__)

STEP_TIME_HISTORY = 32


@dataclass(slots=True)
class ScheduledRequest:
    request_id: str
    token_ids: list[int]  # the tokens to compute this step
    start_pos: int  # position of token_ids[0]
    block_ids: list[int]  # the request's whole block table
    sample: bool  # this chunk reaches the end of the known tokens: sample the next one
    sampling: SamplingParams
    generator: torch.Generator | None
    # the request's own list of generated tokens, for its penalties: read during execute, extended by update
    output_token_ids: list[int]


@dataclass(slots=True)
class KVReservation:
    """Blocks reserved for a REMOTE_KV request: the producer fills tokens from ``num_cached_tokens`` on."""

    request_id: str
    block_ids: list[int]
    num_cached_tokens: int


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    num_tokens: int = 0
    preempted_ids: list[str] = field(default_factory=list)
    reserved: list[KVReservation] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.scheduled


@dataclass(slots=True)
class RunnerOutput:
    sampled_token_ids: list[int | None]  # aligned with SchedulerOutput.scheduled
    logprobs: list[TokenLogprobs | None]


@dataclass(slots=True)
class SchedulerStats:
    num_preemptions: int = 0
    num_steps: int = 0


class Scheduler:
    def __init__(self, config: EngineConfig, kv: KVCacheManager, policy: BatchPolicy) -> None:
        self.config = config
        self.kv = kv
        self.policy = policy
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.awaiting_kv: dict[str, Request] = {}
        self.prefilled: dict[str, Request] = {}
        self.requests: dict[str, Request] = {}
        self.stats = SchedulerStats()
        self._step_times: deque[float] = deque(maxlen=STEP_TIME_HISTORY)

    # --- intake and exits -----------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish_request(self, request_id: str, status: RequestStatus) -> Request | None:
        """End a request in whatever state it is (abort, stop string, release of held blocks)."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        if request.status == RequestStatus.WAITING:
            self.waiting.remove(request)
        elif request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status == RequestStatus.WAITING_FOR_KV:
            del self.awaiting_kv[request_id]
        elif request.status == RequestStatus.PREFILLED:
            del self.prefilled[request_id]
        if not request.status.finished:
            request.status = status
        self.kv.free(request_id)
        return request

    def finish_remote_kv(self, request_id: str, first_token_id: int,
                         logprobs: TokenLogprobs | None = None) -> Request:
        """The producer filled the reserved blocks and sampled the first token: start decoding."""
        request = self.awaiting_kv.pop(request_id)
        request.mode = RequestMode.COLOCATED
        request.num_computed_tokens = request.num_prompt_tokens
        self.kv.cache_full_blocks(request)
        request.append_token(first_token_id, logprobs)
        self.running.append(request)
        request.status = RequestStatus.RUNNING
        stopped = request.check_stop()
        if stopped is not None:
            self.finish_request(request_id, stopped)
        return request

    def fail_remote_kv(self, request_id: str) -> Request:
        """The transfer failed: compute the prompt here, into the blocks already reserved."""
        request = self.awaiting_kv.pop(request_id)
        request.mode = RequestMode.COLOCATED
        request.status = RequestStatus.RUNNING
        self.running.append(request)
        return request

    # --- the step -------------------------------------------------------------------------------

    def _snapshot(self) -> BatchSnapshot:
        waiting: tuple[WaitingRequest, ...] = ()
        running: tuple[RunningRequest, ...] = ()
        if self.policy.needs_waiting:
            waiting = tuple(WaitingRequest(r.request_id, r.num_prompt_tokens, r.sampling.max_tokens,
                                           r.arrival_time, r.predicted_output_tokens, len(r.output_token_ids))
                            for r in self.waiting)
            running = tuple(RunningRequest(r.request_id, r.num_tokens, _remaining(r))
                            for r in (*self.running, *self.awaiting_kv))
        return BatchSnapshot(
            num_running=len(self.running) + len(self.awaiting_kv),
            num_free_blocks=self.kv.num_free_blocks, num_total_blocks=self.kv.num_blocks,
            block_size=self.kv.block_size, max_num_requests=self.config.max_num_requests,
            recent_step_times_s=self.recent_step_times(), waiting=waiting, running=running)

    def record_step_time(self, seconds: float) -> None:
        self._step_times.append(seconds)

    def recent_step_times(self) -> tuple[float, ...]:
        return tuple(self._step_times)

    def _preempt(self, request: Request, out: SchedulerOutput) -> None:
        self.running.remove(request)
        self.kv.free(request.request_id)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.waiting.appendleft(request)
        self.stats.num_preemptions += 1
        out.preempted_ids.append(request.request_id)
        logger.debug("preempted %s (free blocks %d)", request.request_id, self.kv.num_free_blocks)

    def _schedule_one(self, request: Request, num_new: int, out: SchedulerOutput) -> None:
        start = request.num_computed_tokens
        out.scheduled.append(ScheduledRequest(
            request_id=request.request_id,
            token_ids=request.all_token_ids[start:start + num_new],
            start_pos=start,
            block_ids=self.kv.block_ids(request.request_id),
            sample=start + num_new == request.num_tokens,
            sampling=request.sampling,
            generator=request.generator,
            output_token_ids=request.output_token_ids,
        ))
        out.num_tokens += num_new

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        decoding = [r for r in self.running if r.num_output_tokens and r.num_tokens - r.num_computed_tokens == 1]
        prefilling = [r for r in self.running if not (r.num_output_tokens
                                                      and r.num_tokens - r.num_computed_tokens == 1)]
        queue = deque(decoding + prefilling)
        while queue and budget > 0:
            request = queue.popleft()
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            while not self.kv.allocate_slots(request, num_new):
                victim = queue.pop() if queue else request
                self._preempt(victim, out)
                if victim is request:
                    break
            else:
                self._schedule_one(request, num_new, out)
                budget -= num_new
                continue
            break  # the request preempted itself: nothing more fits

        if not out.preempted_ids:
            self._admit_waiting(out, budget)
        return out

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        decision = self.policy.decide(self._snapshot())
        max_running = min(decision.max_running, self.config.max_num_requests)
        candidates: list[Request] = list(self.waiting)
        if decision.admission_order is not None:
            rank = {rid: i for i, rid in enumerate(decision.admission_order)}
            candidates.sort(key=lambda r: rank.get(r.request_id, len(rank)))
        for request in candidates:
            if len(self.running) + len(self.awaiting_kv) >= max_running:
                break
            if budget <= 0 and request.mode != RequestMode.REMOTE_KV:
                continue  # no compute left this step; reservations cost none, so keep looking for them
            first_time = request.num_cached_tokens < 0
            prefix, num_cached = self.kv.find_cached_prefix(request)
            if request.mode == RequestMode.REMOTE_KV:
                num_new = request.num_prompt_tokens - num_cached
            else:
                num_new = min(request.num_tokens - num_cached, budget)
            if not self.kv.allocate_slots(request, num_new, prefix):
                break
            if first_time:
                request.num_cached_tokens = num_cached
                self.kv.record_lookup(request.num_tokens, num_cached)
            self.waiting.remove(request)
            request.num_computed_tokens = num_cached
            if request.mode == RequestMode.REMOTE_KV:
                request.status = RequestStatus.WAITING_FOR_KV
                self.awaiting_kv[request.request_id] = request
                out.reserved.append(KVReservation(request.request_id, self.kv.block_ids(request.request_id),
                                                  num_cached))
                continue
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            self._schedule_one(request, num_new, out)
            budget -= num_new

    def update(self, out: SchedulerOutput, result: RunnerOutput) -> list[Request]:
        """Apply a step's results; returns the requests that got a token (finished ones included)."""
        self.stats.num_steps += 1
        touched: list[Request] = []
        for sched, token, logprobs in zip(out.scheduled, result.sampled_token_ids, result.logprobs):
            request = self.requests.get(sched.request_id)
            if request is None or request.status != RequestStatus.RUNNING:
                continue  # finished while the step ran (an abort)
            request.num_computed_tokens += len(sched.token_ids)
            self.kv.cache_full_blocks(request)
            if token is None:
                continue
            request.append_token(token, logprobs)
            touched.append(request)
            if request.mode == RequestMode.PREFILL_ONLY:
                self.running.remove(request)
                request.status = RequestStatus.PREFILLED
                self.prefilled[request.request_id] = request
                continue
            stopped = request.check_stop()
            if stopped is not None:
                self.finish_request(request.request_id, stopped)
        return touched

    # --- introspection --------------------------------------------------------------------------

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running) + len(self.awaiting_kv)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)


def _remaining(request: Request) -> int:
    """Output tokens a running request is expected still to generate: by the prediction, else the cap."""
    done = len(request.output_token_ids)
    cap = request.sampling.max_tokens - done
    if request.predicted_output_tokens > done:
        return min(cap, request.predicted_output_tokens - done)
    return max(0, cap) if request.predicted_output_tokens == 0 else min(cap, 1)
