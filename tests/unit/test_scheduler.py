"""Scheduler driven by hand: a real KVCacheManager, hand-made requests, fake runner outputs (no model)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from common.batch_policy import BatchDecision, BatchSnapshot, StaticBatchPolicy
from common.config import EngineConfig
from common.sampling import SamplingParams
from engine.kv_cache_manager import KVCacheManager
from engine.request import Request, RequestMode, RequestStatus
from engine.scheduler import RunnerOutput, Scheduler, SchedulerOutput

BS = 4
TOKEN = 7  # what the fake runner samples


def make_scheduler(num_blocks: int = 64, *, budget: int = 32, max_num_requests: int = 8,
                   policy=None, prefix_caching: bool = True) -> Scheduler:
    config = EngineConfig(block_size=BS, num_blocks=num_blocks, max_num_batched_tokens=budget,
                          max_num_requests=max_num_requests, enable_prefix_caching=prefix_caching)
    kv = KVCacheManager(num_blocks, BS, enable_prefix_caching=prefix_caching)
    return Scheduler(config, kv, policy or StaticBatchPolicy())


def make_request(request_id: str, num_prompt_tokens: int, *, max_tokens: int = 4, first: int = 1,
                 mode: RequestMode = RequestMode.COLOCATED, arrival_time: float = 0.0,
                 prompt: list[int] | None = None) -> Request:
    tokens = prompt if prompt is not None else [first + i for i in range(num_prompt_tokens)]
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    return Request(request_id, tokens, sampling, frozenset({0}), max_model_len=1024, mode=mode,
                   arrival_time=arrival_time)


def add(sched: Scheduler, *requests: Request) -> None:
    for r in requests:
        sched.add_request(r)


def step(sched: Scheduler, token: int = TOKEN) -> SchedulerOutput:
    """One step with a fake runner that samples ``token`` wherever a chunk reaches the end."""
    out = sched.schedule()
    assert out.num_tokens == sum(len(s.token_ids) for s in out.scheduled)
    assert out.num_tokens <= sched.config.max_num_batched_tokens
    for s in out.scheduled:  # the block table covers every slot the step writes
        assert len(s.block_ids) * BS >= s.start_pos + len(s.token_ids)
        assert s.block_ids == sched.kv.block_ids(s.request_id)
    sampled = [token if s.sample else None for s in out.scheduled]
    sched.update(out, RunnerOutput(sampled, [None] * len(sampled)))
    return out


def run_to_completion(sched: Scheduler, max_steps: int = 200) -> list[SchedulerOutput]:
    outs = []
    while sched.has_work():
        outs.append(step(sched))
        assert len(outs) < max_steps, "no progress"
    return outs


def chunks(out: SchedulerOutput) -> list[tuple[str, int, int, bool]]:
    return [(s.request_id, s.start_pos, len(s.token_ids), s.sample) for s in out.scheduled]


def assert_clean(sched: Scheduler) -> None:
    assert sched.kv.pool.leaks() == []
    assert sched.kv.owners() == []
    assert not (sched.waiting or sched.running or sched.awaiting_kv or sched.prefilled or sched.requests)
    assert sched.kv.num_free_blocks == sched.kv.num_blocks


# --- budget and order -----------------------------------------------------------------------------


def test_token_budget_and_chunked_prefill() -> None:
    sched = make_scheduler(budget=16)
    a, b = make_request("a", 6, max_tokens=6), make_request("b", 41, first=100, max_tokens=3)
    add(sched, a, b)
    assert chunks(step(sched)) == [("a", 0, 6, True), ("b", 0, 10, False)]  # b's chunk = what is left
    c = make_request("c", 5, first=300, max_tokens=2)
    add(sched, c)
    assert chunks(step(sched)) == [("a", 6, 1, True), ("b", 10, 15, False)]  # c: no budget
    assert c.status == RequestStatus.WAITING
    assert chunks(step(sched)) == [("a", 7, 1, True), ("b", 25, 15, False)]
    assert chunks(step(sched)) == [("a", 8, 1, True), ("b", 40, 1, True), ("c", 0, 5, True)]
    assert b.output_token_ids == [TOKEN] and b.num_computed_tokens == 41
    assert chunks(step(sched)) == [("a", 9, 1, True), ("b", 41, 1, True), ("c", 5, 1, True)]
    outs = run_to_completion(sched)
    assert all(o.num_tokens <= 16 for o in outs)
    assert [r.num_output_tokens for r in (a, b, c)] == [6, 3, 2]
    assert all(r.status == RequestStatus.FINISHED_LENGTH for r in (a, b, c))
    assert_clean(sched)


def test_decodes_go_before_prefills_whatever_the_running_order() -> None:
    """A prefill that would take the whole budget cannot starve a decode admitted after it."""
    sched = make_scheduler(budget=16)
    remote = make_request("remote", 8, first=200, mode=RequestMode.REMOTE_KV, max_tokens=3)
    long = make_request("long", 60, max_tokens=2)
    add(sched, remote, long)
    out = step(sched)
    assert chunks(out) == [("long", 0, 16, False)] and [r.request_id for r in out.reserved] == ["remote"]
    sched.finish_remote_kv("remote", 55)
    assert [r.request_id for r in sched.running] == ["long", "remote"]
    assert chunks(step(sched)) == [("remote", 8, 1, True), ("long", 16, 15, False)]
    run_to_completion(sched)
    assert remote.output_token_ids == [55, TOKEN, TOKEN] and long.num_output_tokens == 2
    assert_clean(sched)


def test_max_num_requests_limits_the_running_batch() -> None:
    sched = make_scheduler(max_num_requests=2)
    requests = [make_request(f"r{i}", 3, first=10 * i + 1, max_tokens=2) for i in range(5)]
    add(sched, *requests)
    seen_running = []
    while sched.has_work():
        out = step(sched)
        assert len({s.request_id for s in out.scheduled}) <= 2
        seen_running.append(len(sched.running))
    assert max(seen_running) == 2
    assert all(r.num_output_tokens == 2 for r in requests)
    assert_clean(sched)


# --- preemption -----------------------------------------------------------------------------------


def test_preemption_picks_the_last_unscheduled_request_and_it_completes() -> None:
    # a, b and c take two blocks each and fill the pool; a's first decode needs a third block
    sched = make_scheduler(num_blocks=6, budget=32, max_num_requests=3)
    a = make_request("a", 8, first=1, max_tokens=4)
    b = make_request("b", 5, first=50, max_tokens=4)
    c = make_request("c", 5, first=100, max_tokens=4)
    w = make_request("w", 4, first=200, max_tokens=2)
    add(sched, a, b, c, w)
    assert [s.request_id for s in step(sched).scheduled] == ["a", "b", "c"]
    assert sched.kv.num_free_blocks == 0
    out = step(sched)
    assert out.preempted_ids == ["c"]  # the lowest priority of b and c, both not yet scheduled
    assert chunks(out) == [("a", 8, 1, True), ("b", 5, 1, True)]  # no admission in a preempting step
    assert list(sched.waiting) == [c, w]  # the victim goes to the front
    assert c.status == RequestStatus.WAITING and c.num_computed_tokens == 0
    assert c.num_preemptions == 1 and sched.stats.num_preemptions == 1
    assert sched.kv.block_ids("c") == [] and c.output_token_ids == [TOKEN]  # its output is kept
    run_to_completion(sched)
    assert [r.num_output_tokens for r in (a, b, c, w)] == [4, 4, 4, 2]
    assert all(r.status == RequestStatus.FINISHED_LENGTH for r in (a, b, c, w))
    assert_clean(sched)


def test_a_request_preempts_itself_when_nothing_else_can_go() -> None:
    sched = make_scheduler(num_blocks=2)
    a, b = make_request("a", 3, max_tokens=2), make_request("b", 4, first=50, max_tokens=3)
    add(sched, a, b)
    step(sched)  # one block each: the pool is full
    out = step(sched)  # a decodes into its block; b needs a second one and only itself to preempt
    assert chunks(out) == [("a", 3, 1, True)] and out.preempted_ids == ["b"]
    assert list(sched.waiting) == [b] and b.num_computed_tokens == 0 and sched.kv.block_ids("b") == []
    assert a.status == RequestStatus.FINISHED_LENGTH  # and a's blocks are free again
    # b comes back on its cached prompt block and recomputes only its sampled token
    assert chunks(step(sched)) == [("b", 4, 1, True)]
    run_to_completion(sched)
    assert b.num_output_tokens == 3 and sched.stats.num_preemptions == 1
    assert_clean(sched)


def test_preempted_request_without_prefix_cache_recomputes_everything() -> None:
    sched = make_scheduler(num_blocks=6, budget=64, prefix_caching=False)
    requests = [make_request(f"r{i}", 6, first=20 * i + 1, max_tokens=10) for i in range(3)]
    add(sched, *requests)
    outs = run_to_completion(sched)
    assert sched.stats.num_preemptions > 0
    readmitted = [s for o in outs for s in o.scheduled if s.start_pos == 0 and len(s.token_ids) > 6]
    assert readmitted, "a preempted request recomputes its prompt and its output so far"
    assert all(r.num_output_tokens == 10 for r in requests)
    assert_clean(sched)


# --- exits ----------------------------------------------------------------------------------------


def test_finishing_frees_blocks() -> None:
    sched = make_scheduler(num_blocks=8)
    r = make_request("r", 9, max_tokens=3)
    add(sched, r)
    step(sched)
    assert len(sched.kv.block_ids("r")) == 3 and sched.kv.num_free_blocks == 5
    step(sched)
    touched_out = sched.schedule()
    touched = sched.update(touched_out, RunnerOutput([TOKEN], [None]))
    assert touched == [r] and r.status == RequestStatus.FINISHED_LENGTH
    assert sched.kv.block_ids("r") == [] and "r" not in sched.requests
    assert_clean(sched)


def test_stop_token_and_eos_finish() -> None:
    sched = make_scheduler()
    r = make_request("r", 5, max_tokens=10)
    add(sched, r)
    step(sched)
    step(sched, token=0)  # eos
    assert r.status == RequestStatus.FINISHED_STOPPED and r.output_token_ids == [TOKEN, 0]
    assert_clean(sched)


def _to_state(sched: Scheduler, status: RequestStatus) -> Request:
    """A request in ``status``, holding blocks where that state holds them."""
    if status == RequestStatus.WAITING:
        blocker = make_request("blocker", 4, first=90, max_tokens=50)
        add(sched, blocker)
        step(sched)
        r = make_request("x", 8)
        add(sched, r)
        step(sched)  # max_num_requests=1 keeps x waiting
        sched.finish_request("blocker", RequestStatus.FINISHED_ABORTED)
        return r
    mode = {RequestStatus.RUNNING: RequestMode.COLOCATED, RequestStatus.WAITING_FOR_KV: RequestMode.REMOTE_KV,
            RequestStatus.PREFILLED: RequestMode.PREFILL_ONLY}[status]
    r = make_request("x", 8, mode=mode, max_tokens=5)
    add(sched, r)
    step(sched)
    return r


@pytest.mark.parametrize("status", [RequestStatus.WAITING, RequestStatus.RUNNING,
                                    RequestStatus.WAITING_FOR_KV, RequestStatus.PREFILLED])
def test_abort_in_every_state_frees_blocks(status: RequestStatus) -> None:
    sched = make_scheduler(num_blocks=16, max_num_requests=1)
    r = _to_state(sched, status)
    assert r.status == status
    assert (sched.kv.block_ids("x") != []) == (status != RequestStatus.WAITING)
    done = sched.finish_request("x", RequestStatus.FINISHED_ABORTED)
    assert done is r and r.status == RequestStatus.FINISHED_ABORTED and r.finish_reason == "abort"
    assert sched.finish_request("x", RequestStatus.FINISHED_ABORTED) is None
    assert not sched.has_work() and sched.num_unfinished == 0
    assert sched.schedule().empty
    assert_clean(sched)


def test_abort_during_a_step_drops_its_result() -> None:
    sched = make_scheduler()
    r = make_request("r", 5)
    add(sched, r)
    out = sched.schedule()
    sched.finish_request("r", RequestStatus.FINISHED_ABORTED)
    assert sched.update(out, RunnerOutput([TOKEN], [None])) == []
    assert r.output_token_ids == [] and r.status == RequestStatus.FINISHED_ABORTED
    assert_clean(sched)


# --- roles ----------------------------------------------------------------------------------------


def test_prefill_only_holds_blocks_until_finished() -> None:
    sched = make_scheduler(budget=8)
    r = make_request("p", 20, mode=RequestMode.PREFILL_ONLY, max_tokens=16)
    add(sched, r)
    assert chunks(step(sched)) == [("p", 0, 8, False)]
    assert chunks(step(sched)) == [("p", 8, 8, False)]
    assert chunks(step(sched)) == [("p", 16, 4, True)]
    assert r.status == RequestStatus.PREFILLED and r.finish_reason == "prefilled"
    assert r.output_token_ids == [TOKEN] and sched.prefilled == {"p": r}
    held = sched.kv.block_ids("p")
    assert len(held) == 5 and all(sched.kv.pool.blocks[i].ref_cnt == 1 for i in held)
    assert not sched.has_work() and sched.schedule().empty and sched.kv.block_ids("p") == held
    sched.finish_request("p", RequestStatus.FINISHED_STOPPED)
    assert_clean(sched)


def test_prefill_only_stops_after_the_first_token_even_if_it_is_eos() -> None:
    sched = make_scheduler()
    r = make_request("p", 6, mode=RequestMode.PREFILL_ONLY)
    add(sched, r)
    step(sched, token=0)
    assert r.status == RequestStatus.PREFILLED  # the decode side applies stop conditions
    sched.finish_request("p", RequestStatus.FINISHED_STOPPED)
    assert_clean(sched)


def test_remote_kv_reservation_uses_no_token_budget() -> None:
    sched = make_scheduler(budget=8)
    busy = make_request("busy", 8, first=300, max_tokens=2)
    remote = make_request("remote", 40, mode=RequestMode.REMOTE_KV, max_tokens=3)
    add(sched, remote, busy)
    out = step(sched)
    assert chunks(out) == [("busy", 0, 8, True)] and out.num_tokens == 8
    (res,) = out.reserved
    assert res.request_id == "remote" and res.num_cached_tokens == 0
    assert res.block_ids == sched.kv.block_ids("remote") and len(res.block_ids) == 10
    assert remote.status == RequestStatus.WAITING_FOR_KV and sched.awaiting_kv == {"remote": remote}
    assert remote.num_computed_tokens == 0 and remote.output_token_ids == []
    for _ in range(3):  # nothing happens to it until the KV arrives
        assert all(s.request_id != "remote" for s in step(sched).scheduled)
    assert sched.num_unfinished == 1 and not sched.has_work()
    sched.finish_remote_kv("remote", 42)
    assert remote.status == RequestStatus.RUNNING and remote.num_computed_tokens == 40
    assert chunks(step(sched)) == [("remote", 40, 1, True)]
    run_to_completion(sched)
    assert remote.output_token_ids == [42, TOKEN, TOKEN]
    assert sched.kv.block_ids("remote") == []
    assert_clean(sched)


def test_remote_kv_with_a_cached_prefix_and_finish() -> None:
    sched = make_scheduler()
    add(sched, make_request("warm", 17, max_tokens=1))
    run_to_completion(sched)
    cached = sched.kv.find_cached_prefix(make_request("probe", 17))[0]
    assert len(cached) == 4
    remote = make_request("remote", 22, mode=RequestMode.REMOTE_KV, max_tokens=1)
    add(sched, remote)
    out = step(sched)
    (res,) = out.reserved
    assert res.num_cached_tokens == 16 and res.block_ids[:4] == [b.block_id for b in cached]
    assert len(res.block_ids) == 6 and remote.num_cached_tokens == 16
    fin = sched.finish_remote_kv("remote", 0)  # eos as the first token: done at once
    assert fin.status == RequestStatus.FINISHED_STOPPED and "remote" not in sched.requests
    # the transferred prompt blocks are now in the prefix cache
    again = make_request("again", 22, max_tokens=1)
    assert sched.kv.find_cached_prefix(again)[1] == 20
    assert_clean(sched)


def test_fail_remote_kv_computes_the_prompt_into_the_reserved_blocks() -> None:
    sched = make_scheduler(budget=8)
    add(sched, make_request("warm", 9, max_tokens=1))
    run_to_completion(sched)
    remote = make_request("remote", 21, mode=RequestMode.REMOTE_KV, max_tokens=2)
    add(sched, remote)
    (res,) = step(sched).reserved
    assert res.num_cached_tokens == 8
    sched.fail_remote_kv("remote")
    assert remote.status == RequestStatus.RUNNING and remote.mode == RequestMode.COLOCATED
    assert chunks(step(sched)) == [("remote", 8, 8, False)]
    assert sched.kv.block_ids("remote") == res.block_ids
    assert chunks(step(sched)) == [("remote", 16, 5, True)]
    assert sched.kv.block_ids("remote") == res.block_ids
    run_to_completion(sched)
    assert remote.output_token_ids == [TOKEN, TOKEN]
    assert_clean(sched)


# --- batch policy ---------------------------------------------------------------------------------


@dataclass
class NewestFirstPolicy:
    """Admits the newest waiting request first, at most two running: a policy the scheduler never saw."""

    name: str = "newest-first"
    needs_waiting: bool = True
    snapshots: list[BatchSnapshot] = field(default_factory=list)

    def decide(self, snapshot: BatchSnapshot) -> BatchDecision:
        self.snapshots.append(snapshot)
        order = sorted(snapshot.waiting, key=lambda w: w.arrival_time, reverse=True)
        return BatchDecision(max_running=2, admission_order=tuple(w.request_id for w in order))


def test_custom_batch_policy_changes_admission() -> None:
    policy = NewestFirstPolicy()
    sched = make_scheduler(policy=policy, max_num_requests=8)
    requests = [make_request(f"r{i}", 3 + i, first=10 * i + 1, max_tokens=2, arrival_time=float(i))
                for i in range(4)]
    add(sched, *requests)
    out = step(sched)
    assert [s.request_id for s in out.scheduled] == ["r3", "r2"]
    snap = policy.snapshots[0]
    assert [w.request_id for w in snap.waiting] == ["r0", "r1", "r2", "r3"]
    assert [w.num_prompt_tokens for w in snap.waiting] == [3, 4, 5, 6]
    assert snap.num_running == 0 and snap.block_size == BS and snap.max_num_requests == 8
    admitted = ["r3", "r2"]
    while sched.has_work():
        out = step(sched)
        assert len(sched.running) <= 2
        admitted += [s.request_id for s in out.scheduled if s.start_pos == 0]
    assert admitted == ["r3", "r2", "r1", "r0"]
    assert all(r.num_output_tokens == 2 for r in requests)
    assert_clean(sched)
