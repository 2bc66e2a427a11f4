"""Admission of waiting requests into one simulated engine (``Scheduler._admit_waiting``'s model).

Once per step with waiting requests, the engine's batch policy (``common.batch_policy``, the
objects the real scheduler runs) gets a ``BatchSnapshot`` and answers how many requests may run
and in which order to admit; :func:`admit` then takes waiting requests in that order, each from
the longest prefix the instance caches, while the running-request limit, the step's token
budget and the free blocks allow (head-of-line: the first that does not fit stops admission).
REMOTE_KV requests only reserve blocks for their prompt (no compute; the prefill instance fills
them); a prefix fetched from another instance (``global_cache_aware``) counts as cached.

The snapshot carries what the simulator knows and the engine does not report yet: the waiting
requests' predicted output lengths and the running requests' predicted remaining tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from common.batch_policy import BatchSnapshot, RunningRequest, WaitingRequest
from simulator.job import Job, JobMode, JobState

if TYPE_CHECKING:
    from simulator.engine import SimEngine


def batch_snapshot(engine: SimEngine) -> BatchSnapshot:
    batch = engine.batch
    waiting: tuple[WaitingRequest, ...] = ()
    running: tuple[RunningRequest, ...] = ()
    if engine.policy.needs_waiting:
        waiting = tuple(WaitingRequest(j.request_id, j.num_prompt_tokens, j.predicted_output_tokens, j.arrival_s,
                                       j.predicted_output_tokens, j.num_outputs) for j in engine.waiting)
        s = batch.step
        running = tuple(RunningRequest(j.request_id, j.base + s, max(1, j.predicted_output_tokens - batch.outputs(j)))
                        for j in batch.jobs)
        running += tuple(RunningRequest(j.request_id, j.num_tokens, max(1, j.predicted_output_tokens - j.num_outputs))
                         for j in (*engine.ready, *engine.prefilling, *engine.awaiting.values()))
    spec = engine.spec
    return BatchSnapshot(num_running=engine.num_running, num_free_blocks=engine.ledger.free(batch.blocks()),
                         num_total_blocks=spec.num_blocks, block_size=spec.block_size,
                         max_num_requests=spec.max_num_requests, recent_step_times_s=tuple(engine.recent_step_times),
                         waiting=waiting, running=running)


def admit(engine: SimEngine, now: float, budget: int, chunks: list[tuple[Job, int]], batch_blocks: int) -> None:
    """Admit waiting requests into the step being planned (their first chunks go into ``chunks``)."""
    decision = engine.policy.decide(batch_snapshot(engine))
    max_running = min(decision.max_running, engine.spec.max_num_requests)
    candidates = list(engine.waiting)
    if decision.admission_order is not None:
        rank = {rid: i for i, rid in enumerate(decision.admission_order)}
        candidates.sort(key=lambda j: rank.get(j.request_id, len(rank)))
    ledger, bs = engine.ledger, engine.spec.block_size
    for job in candidates:
        if engine.num_running >= max_running:
            break
        remote = job.mode == JobMode.REMOTE_KV
        if budget <= 0 and not remote:
            continue  # no compute left this step; reservations cost none
        limit = (job.num_tokens - 1) // bs
        hits, hits_free = ledger.lookup(job.block_hashes, limit)
        fetched = 0
        if job.mode == JobMode.PREFILL_ONLY:
            fetched = max(0, min(job.num_fetched_blocks, limit, len(job.block_hashes)) - hits)
        cached = (hits + fetched) * bs
        num_new = job.num_prompt_tokens - cached if remote else min(job.num_tokens - cached, budget)
        need = -(-(cached + num_new) // bs) - hits
        if need > ledger.free(batch_blocks) - hits_free:
            break
        ledger.acquire(job.block_hashes[:hits])
        job.num_reg, job.num_anon = hits, need
        ledger.num_anon += need
        for h in job.block_hashes[hits:hits + fetched]:  # a fetched prefix arrives with its hashes
            if not ledger.register(h):
                break
            job.num_reg += 1
            job.num_anon -= 1
            ledger.num_anon -= 1
        if job.num_cached < 0:
            job.num_cached = cached
            ledger.num_queried_tokens += job.num_tokens
            ledger.num_hit_tokens += cached
        job.num_cached_now = job.num_computed = cached
        engine.waiting.remove(job)
        if remote:
            job.state = JobState.AWAITING_KV
            engine.awaiting[job.request_id] = job
            engine.out.reserved.append(job)
            continue
        if job.prefill_started_s < 0:
            job.prefill_started_s = now
        job.state = JobState.PREFILLING
        engine.prefilling.append(job)
        chunks.append((job, num_new))
        budget -= num_new
