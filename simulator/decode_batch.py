"""The requests decoding on one simulated instance, advanced many steps at a time.

Every engine step gives each decoding request one token, so a request that joined the batch at
step ``j`` with ``n`` tokens has ``n + (S - j)`` tokens at step ``S``: one step counter stands
for every request's progress (``tokens(S) = base + S`` with ``base = n - j``). The batch keeps

- a heap of the steps at which requests finish (the next segment ends at the earliest),
- the sum of bases, so the context at any step is ``sum_base + b * S`` in O(1),
- per request only what is needed to count its blocks: ``ceil(tokens(S) / block_size)``, of
  which its leading ``num_reg`` hashed prompt blocks are counted by the ledger instead.

Between changes of membership the batch is fixed, so a step takes
``d_j = d_0 + inc * j`` (``inc = decode_per_context_token_s * b``: the context grows by ``b``
tokens a step) and ``k`` steps take ``k * d_0 + inc * k * (k - 1) / 2``; :func:`segment_time`
and :func:`steps_within` are that sum and its inverse. This is what lets the simulator move a
decode instance from event to event instead of from token to token.
"""

from __future__ import annotations

import heapq
import math

from simulator.job import Job, JobState


def segment_time(k: int, d0: float, inc: float) -> float:
    """Seconds for ``k`` steps whose durations are ``d0, d0 + inc, ...``."""
    return k * d0 + inc * k * (k - 1) / 2.0


def steps_within(dt: float, d0: float, inc: float, k_max: int) -> int:
    """The number of whole steps finished within ``dt`` seconds (at most ``k_max``)."""
    if dt <= 0:
        return 0
    if inc <= 0:
        j = int(dt // d0) if d0 > 0 else k_max
    else:
        a, b = inc / 2.0, d0 - inc / 2.0
        j = int((-b + math.sqrt(b * b + 4 * a * dt)) / (2 * a))
    j = max(0, min(j, k_max))
    while j > 0 and segment_time(j, d0, inc) > dt:
        j -= 1
    while j < k_max and segment_time(j + 1, d0, inc) <= dt:
        j += 1
    return j


class DecodeBatch:
    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.step = 0
        self.jobs: dict[Job, None] = {}  # in join order (the engine's running order)
        self._heap: list[tuple[int, int, Job]] = []
        self._seq = 0
        self.sum_base = 0
        self.sum_reg = 0

    def __len__(self) -> int:
        return len(self.jobs)

    def join(self, job: Job) -> None:
        """Add a job whose prompt is done and whose last sampled token is ``num_tokens``' last."""
        s = self.step
        job.base = job.num_tokens - s
        job.join_step = s
        job.outputs_at_join = job.num_outputs
        job.finish_step = s + (job.num_output_tokens - job.num_outputs)
        job.state = JobState.DECODING
        self.jobs[job] = None
        self.sum_base += job.base
        self.sum_reg += job.num_reg
        self._seq += 1
        job.batch_seq = self._seq
        heapq.heappush(self._heap, (job.finish_step, self._seq, job))

    def outputs(self, job: Job, step: int | None = None) -> int:
        return job.outputs_at_join + ((self.step if step is None else step) - job.join_step)

    def leave(self, job: Job) -> None:
        """Take a job out (finished or preempted); its counts are written back at the current step."""
        del self.jobs[job]
        job.num_tokens = job.base + self.step
        job.num_outputs = self.outputs(job)
        self.sum_base -= job.base
        self.sum_reg -= job.num_reg  # the heap entry goes stale: dropped when it reaches the top

    def context(self, step: int | None = None) -> int:
        return self.sum_base + len(self.jobs) * (self.step if step is None else step)

    def blocks(self, step: int | None = None) -> int:
        """Anonymous blocks the batch's requests hold at the start of ``step``: all their blocks
        less the hashed prompt blocks (the ledger counts those once, however many requests share them)."""
        s = self.step if step is None else step
        bs = self.block_size
        return sum((j.base + s + bs - 1) // bs for j in self.jobs) - self.sum_reg

    def _live(self, entry: tuple[int, int, Job]) -> bool:
        job = entry[2]
        return job.batch_seq == entry[1] and job in self.jobs

    def next_finish(self) -> int | None:
        heap = self._heap
        while heap and not self._live(heap[0]):
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def pop_finished(self) -> list[Job]:
        """Jobs whose last token was produced by the current step count (taken out of the batch)."""
        out = []
        heap = self._heap
        while heap and (not self._live(heap[0]) or heap[0][0] <= self.step):
            entry = heapq.heappop(heap)
            if self._live(entry):
                self.leave(entry[2])
                out.append(entry[2])
        return out

    def latest(self) -> Job:
        """The most recently joined job (the engine's preemption victim among decoding requests)."""
        return next(reversed(self.jobs))
