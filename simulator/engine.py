"""One simulated instance: the engine's continuous batching, timed by the cost model.

The model of ``engine/scheduler.py`` (same order of work, same admission, same preemption), on
counts instead of tensors. Each step spends ``max_num_batched_tokens``: every decoding request's
token first, then the next chunk of each running prompt in admission order, then waiting
requests in the order the batch policy gives, up to its running-request limit (the same
``common.batch_policy`` objects the engine runs). Waiting requests start from the longest prefix
this instance caches; blocks are allocated as tokens are computed; when the blocks run out, the
last running request is preempted and later recomputed (cheaply while its prefix stays cached).

Timing (``router.cost_model.CostModel``, the router's own model, as the clock):

- a step with ``b`` decoding requests over ``ctx`` context tokens takes
  ``decode_step_time(b, ctx)`` plus, for each prompt chunk it carries, the chunk's increment of
  the prefill formula (so chunks of one prompt add up to ``prefill_time(n, c)`` less the per-pass
  base: ``per_token * n + attn * n * (n + 2 * done + c)`` for a chunk of ``n`` after ``done``
  computed tokens on top of ``c`` cached ones);
- a step with no decoding request takes ``max(prefill_floor_s, prefill_base_s + chunks)``.

Pure decode steps between two changes of the batch run as one *segment* (see
:mod:`simulator.decode_batch`), ended early by :meth:`SimEngine.interrupt` when new work arrives.
Admission of waiting requests is :mod:`simulator.admission`.

Lifecycle of a step, as the cluster drives it (plain data flowing one way)::

    end = engine.plan(now)        # compose the step or segment; None: idle
    ...                           # (external: add / kv_landed / release, then interrupt(now))
    engine.complete(end)          # apply it
    out = engine.take_output()    # reservations, finished prompts, first tokens, progress, finishes
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from common.batch_policy import BatchPolicy
from router.cluster_state import LoadReport
from router.cost_model import CostModel
from simulator.admission import admit
from simulator.config import EngineSpec
from simulator.decode_batch import DecodeBatch, segment_time, steps_within
from simulator.job import Job, JobMode, JobState
from simulator.kv_blocks import BlockLedger

RECENT_STEPS = 8  # step times kept for load reports and the batch policy


@dataclass(slots=True)
class EngineOutput:
    reserved: list[Job] = field(default_factory=list)
    """REMOTE_KV jobs that got their blocks: the prefill may start."""
    prefilled: list[Job] = field(default_factory=list)
    """PREFILL_ONLY jobs whose prompt is done (first token sampled): the transfer may start."""
    first_tokens: list[Job] = field(default_factory=list)
    """COLOCATED jobs that sampled their first token here (local prefill)."""
    progress: list[tuple[Job, int]] = field(default_factory=list)
    """New output tokens per job since the last report (before its finish, if it finished)."""
    finished: list[Job] = field(default_factory=list)


class SimEngine:
    def __init__(self, instance_id: str, role: str, spec: EngineSpec, cost: CostModel, policy: BatchPolicy) -> None:
        self.instance_id = instance_id
        self.role = role
        self.spec = spec
        self.cost = cost
        self.policy = policy
        self.ledger = BlockLedger(spec.num_blocks, spec.block_size, enable_prefix_caching=spec.enable_prefix_caching)
        self.batch = DecodeBatch(spec.block_size)
        self.waiting: deque[Job] = deque()
        self.prefilling: list[Job] = []
        self.awaiting: dict[str, Job] = {}
        self.ready: list[Job] = []
        self.prefilled: dict[str, Job] = {}
        self.out = EngineOutput()
        self.draining = False
        self.version = 0  # bumped when the segment in progress is cut short
        self.busy = False
        self.recent_step_times: deque[float] = deque(maxlen=RECENT_STEPS)  # newest last
        self._t0 = self._d0 = self._inc = 0.0
        self._k = 0
        self._chunks: list[tuple[Job, int]] = []
        self.busy_s = 0.0
        self.num_steps = 0
        self.num_preemptions = 0
        self.gaps: list[tuple[float, float, int, int]] = []
        """Per segment with decoding requests: (first step s, last step s, steps, batch size)."""

    # --- intake (called by the cluster; follow with interrupt(now)) ----------------------------

    def add(self, job: Job) -> None:
        self.waiting.append(job)

    def kv_landed(self, job: Job) -> None:
        """The prompt's KV and first token arrived (REMOTE_KV): decode from the next step."""
        del self.awaiting[job.request_id]
        job.num_computed = job.num_prompt_tokens
        self._register_computed(job)
        job.num_outputs = 1
        job.num_tokens = job.num_prompt_tokens + 1
        job.num_synced_outputs = 1
        if job.num_outputs >= job.num_output_tokens:
            self._release_blocks(job)
            job.state = JobState.DONE
            self.out.finished.append(job)
            return
        job.state = JobState.READY
        self.ready.append(job)

    def release(self, job: Job) -> None:
        """The transfer of a PREFILLED job was acknowledged: free its blocks (they stay cached)."""
        del self.prefilled[job.request_id]
        self._release_blocks(job)
        job.state = JobState.DONE

    def interrupt(self, now: float) -> float | None:
        """New work arrived at ``now``: cut a decode segment short after the step in progress.

        Returns the segment's new end (the caller reschedules its boundary under the new
        ``version``), or None when nothing changes (idle, or a single step is running).
        """
        if not self.busy or self._chunks or self._k <= 1:
            return None
        k = steps_within(now - self._t0, self._d0, self._inc, self._k) + 1
        if k >= self._k:
            return None
        self._k = k
        self.version += 1
        return self._t0 + segment_time(k, self._d0, self._inc)

    def take_output(self) -> EngineOutput:
        out, self.out = self.out, EngineOutput()
        return out

    # --- introspection --------------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        """Running requests as the engine reports them (running + awaiting KV)."""
        return len(self.batch) + len(self.ready) + len(self.prefilling) + len(self.awaiting)

    def idle(self) -> bool:
        """Nothing held: no request in any state (a draining instance may stop)."""
        return not (self.num_running or self.waiting or self.prefilled or self.busy)

    def load(self, now: float) -> LoadReport:
        """The load report at ``now`` (inside a segment: after the steps finished by then)."""
        batch = self.batch
        step, recent = batch.step, tuple(self.recent_step_times)
        if self.busy and not self._chunks and len(batch):
            j = steps_within(now - self._t0, self._d0, self._inc, self._k)
            if j:
                step += j
                recent = (recent + tuple(self._d0 + self._inc * i for i in range(max(0, j - RECENT_STEPS), j))
                          )[-RECENT_STEPS:]
        queued = sum(j.num_tokens - j.num_computed for j in self.waiting)
        queued += sum(r for j in self.prefilling if (r := j.num_tokens - j.num_computed) > 1)
        return LoadReport(self.instance_id, self.role, self.num_running, len(self.waiting), queued,
                          self.ledger.free(batch.blocks(step)), self.spec.num_blocks, self.spec.block_size, recent,
                          self.draining)

    # --- the step -------------------------------------------------------------------------------

    def _blocks(self, num_tokens: int) -> int:
        return -(-num_tokens // self.spec.block_size)

    def _step_time(self, batch_size: int, context: int, chunks: list[tuple[Job, int]]) -> float:
        cost = self.cost
        extra = 0.0
        for job, n in chunks:
            c = job.num_cached_now
            done = job.num_computed - c
            extra += cost.prefill_per_token_s * n + cost.prefill_attn_s * n * (n + 2 * done + c)
        if batch_size:
            return cost.decode_step_time(batch_size, context) + extra
        return max(cost.prefill_floor_s, cost.prefill_base_s + extra)

    def plan(self, now: float) -> float | None:
        """Compose the step (or segment of decode steps) starting at ``now``; its end, or None if idle."""
        assert not self.busy
        batch, ledger, total = self.batch, self.ledger, self.spec.num_blocks
        for job in self.ready:
            self._join(job)
        self.ready.clear()
        preempted = False
        while ledger.used(batch.blocks()) > total:  # the decode tokens of this step must fit
            self._preempt(self.prefilling[-1] if self.prefilling else batch.latest())
            preempted = True
        batch_blocks = batch.blocks()
        budget = self.spec.max_num_batched_tokens - len(batch)
        chunks: list[tuple[Job, int]] = []
        i = 0
        while i < len(self.prefilling) and budget > 0:
            job = self.prefilling[i]
            n = min(job.num_tokens - job.num_computed, budget)
            need = self._blocks(job.num_computed + n) - job.num_reg - job.num_anon
            while need > ledger.free(batch_blocks) and self.prefilling[-1] is not job:
                self._preempt(self.prefilling[-1])
                preempted = True
            if need > ledger.free(batch_blocks):
                self._preempt(job)
                preempted = True
                break
            job.num_anon += need
            ledger.num_anon += need
            chunks.append((job, n))
            budget -= n
            i += 1
        if self.waiting and (not preempted or not (chunks or len(batch))):
            # the engine admits only in steps without preemption; a step left empty by preemption
            # takes no time, so the next one (which admits) starts at once
            admit(self, now, budget, chunks, batch.blocks() if preempted else batch_blocks)
        ledger.reclaim(batch_blocks)
        b = len(batch)
        if chunks:
            self._k, self._d0, self._inc = 1, self._step_time(b, batch.context(), chunks), 0.0
        elif b:
            k = batch.next_finish() - batch.step
            if self.waiting:
                k = min(k, self.spec.recheck_steps)
            self._k = self._fit_steps(max(1, k))
            self._d0 = self.cost.decode_step_time(b, batch.context())
            self._inc = self.cost.decode_per_context_token_s * b
        else:
            return None
        self._chunks = chunks
        self._t0 = now
        self.busy = True
        return now + segment_time(self._k, self._d0, self._inc)

    def _fit_steps(self, k: int) -> int:
        """The most steps (<= k) the decode batch can take before its blocks outgrow the pool."""
        batch, ledger, total = self.batch, self.ledger, self.spec.num_blocks
        s = batch.step
        if k <= 1 or ledger.used(batch.blocks(s + k - 1)) <= total:
            return k
        lo, hi = 1, k - 1  # step s + lo - 1 fits; s + hi does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if ledger.used(batch.blocks(s + mid - 1)) <= total:
                lo = mid
            else:
                hi = mid
        return lo

    def complete(self, now: float) -> None:
        """Apply the step or segment that ends at ``now``."""
        assert self.busy
        batch, k = self.batch, self._k
        self.busy = False
        self.busy_s += now - self._t0
        self.num_steps += k
        if len(batch):
            self.gaps.append((self._d0, self._d0 + self._inc * (k - 1), k, len(batch)))
        for j in range(max(0, k - RECENT_STEPS), k):
            self.recent_step_times.append(self._d0 + self._inc * j)
        batch.step += k
        out = self.out
        for job, n in self._chunks:
            job.num_computed += n
            self._register_computed(job)
            if job.num_computed < job.num_tokens:
                continue
            self.prefilling.remove(job)
            job.num_outputs += 1  # the step that computes the last known token samples the next one
            job.num_tokens += 1
            if job.mode == JobMode.PREFILL_ONLY:
                job.state = JobState.PREFILLED
                self.prefilled[job.request_id] = job
                out.prefilled.append(job)
                continue
            if job.num_outputs == 1:
                job.num_synced_outputs = 1
                out.first_tokens.append(job)
            if job.num_outputs >= job.num_output_tokens:
                self._finish(job)
            else:
                self._join(job)
        self._chunks = []
        for job in batch.pop_finished():
            self._finish(job)
        for job in batch.jobs:
            new = batch.outputs(job) - job.num_synced_outputs
            if new > 0:
                out.progress.append((job, new))
                job.num_synced_outputs += new

    def _join(self, job: Job) -> None:
        """Into the decode batch: from now on its anonymous blocks are counted by the batch."""
        self.ledger.num_anon -= job.num_anon
        job.num_anon = 0
        self.batch.join(job)

    def audit(self) -> tuple[int, int]:
        """(blocks in use by the ledger's count, blocks in use recounted job by job): equal unless
        the accounting is broken. For tests."""
        bs, batch = self.spec.block_size, self.batch
        hashed: set[int] = set()
        anon = 0
        for job in (*self.prefilling, *self.awaiting.values(), *self.ready, *self.prefilled.values()):
            hashed.update(job.block_hashes[:job.num_reg])
            anon += job.num_anon
        for job in batch.jobs:
            hashed.update(job.block_hashes[:job.num_reg])
            anon += -(-(job.base + batch.step) // bs) - job.num_reg
        return self.ledger.used(batch.blocks()), len(hashed) + anon

    def _finish(self, job: Job) -> None:
        new = job.num_outputs - job.num_synced_outputs
        if new > 0:
            self.out.progress.append((job, new))
            job.num_synced_outputs = job.num_outputs
        self._release_blocks(job)
        job.state = JobState.DONE
        self.out.finished.append(job)

    # --- blocks ---------------------------------------------------------------------------------

    def _release_blocks(self, job: Job) -> None:
        self.ledger.release(job.block_hashes[:job.num_reg])
        self.ledger.num_anon -= job.num_anon
        job.num_reg = job.num_anon = 0

    def _register_computed(self, job: Job) -> None:
        """Cache the prompt's blocks that are now full and computed (engine: cache_full_blocks)."""
        full = min(min(job.num_computed, job.num_prompt_tokens) // self.spec.block_size, len(job.block_hashes))
        ledger = self.ledger
        while job.num_reg < full and job.num_anon > 0 and ledger.register(job.block_hashes[job.num_reg]):
            job.num_reg += 1
            job.num_anon -= 1
            ledger.num_anon -= 1

    def _preempt(self, job: Job) -> None:
        """Free the job's blocks and queue it first, to be recomputed from its tokens so far."""
        if job.state == JobState.DECODING:
            self.batch.leave(job)
            new = job.num_outputs - job.num_synced_outputs
            if new > 0:
                self.out.progress.append((job, new))
                job.num_synced_outputs = job.num_outputs
        else:
            self.prefilling.remove(job)
        self._release_blocks(job)
        job.num_computed = 0
        if job.mode == JobMode.REMOTE_KV:
            job.mode = JobMode.COLOCATED
        job.state = JobState.WAITING
        job.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(job)
