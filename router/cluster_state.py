"""The router's live view of the cluster, and the one place that builds snapshots from it.

``ClusterState`` folds three streams into the plain data policies read:

- **load reports** (``LoadReport`` from every worker's ``StreamLoad``): the worker's truth,
- **the router's own ledger**: what it has sent where and the worker does not report yet
  (``num_inflight_*``), and what its decode requests are predicted still to generate
  (``num_predicted_*``),
- **the prefix index** (KV events, or the approximation from routing decisions).

Lifecycle of one request, as the server (or the simulator) drives it::

    snapshot = state.snapshot_for(request, now)
    decision = route(request, snapshot, cost, config)
    state.on_routed(request, decision, now)        # ledger + prefix approximation + rr cursor
    state.on_prefill_done(request_id, now, ...)    # first token: prefill load gone, transfer observed
    state.on_tokens(request_id, n)                 # decode progress (count, not per-token calls if batched)
    state.on_finished(request_id)                  # ledger entry gone

**In-flight rule.** A routed request counts as in flight on its prefill instance (its uncached
prompt tokens) and on its decode instance (its prompt tokens, for KV) until that instance sends a
load report *received* at least ``ack_delay_s`` after the routing decision (the report was then
taken after the worker had the request, so its own counts include it), or, on the prefill side,
until its first token. Receive times are the router's clock, so worker clock skew does not matter.

Single-threaded by design: call it from the server's event loop (or the simulator's). Nothing in
it does I/O; time is always passed in. Instances appear with their first load report (or
``register``) and vanish with ``unregister``; one without a report for ``report_timeout_s`` is left
out of snapshots until it reports again.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

from router.cost_model import CostModel
from router.links import LinkTable, TransferSample, link_time_from_visible, observe_transfer
from router.prefix_index import KVEventBatch, PrefixIndex
from router.snapshot import (
    DECODE,
    PREFILL,
    ROLES,
    ClusterSnapshot,
    InstanceState,
    RoutingDecision,
    RoutingRequest,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LoadReport:
    """A worker's load report (``LoadReport`` of proto/worker.proto, as plain data)."""

    instance_id: str
    role: str
    num_running: int = 0
    num_waiting: int = 0
    num_queued_prefill_tokens: int = 0
    num_free_blocks: int = 0
    num_total_blocks: int = 0
    block_size: int = 16
    recent_step_times_s: tuple[float, ...] = ()
    draining: bool = False

    @classmethod
    def from_proto(cls, msg: Any) -> LoadReport:
        return cls(instance_id=msg.instance_id, role=msg.role, num_running=msg.num_running,
                   num_waiting=msg.num_waiting, num_queued_prefill_tokens=msg.num_queued_prefill_tokens,
                   num_free_blocks=msg.num_free_blocks, num_total_blocks=msg.num_total_blocks,
                   block_size=msg.block_size, recent_step_times_s=tuple(msg.recent_step_times_s),
                   draining=msg.draining)


@dataclass(slots=True)
class _Routed:
    """The ledger entry of one routed request."""

    prefill_id: str  # the instance computing the prompt (the decode instance itself for local prefill)
    decode_id: str
    routed_at: float
    num_prefill_tokens: int
    num_prompt_tokens: int
    predicted_output_tokens: int
    block_size: int
    num_output_tokens: int = 0
    prefill_pending: bool = True  # still counted in flight on prefill_id
    decode_pending: bool = True  # still counted in flight on decode_id

    def remaining(self) -> int:
        return max(0, self.predicted_output_tokens - self.num_output_tokens)

    def growth_blocks(self) -> int:
        bs = self.block_size
        final = -(-(self.num_prompt_tokens + self.predicted_output_tokens) // bs)
        now = -(-(self.num_prompt_tokens + self.num_output_tokens) // bs)
        return max(0, final - now)


@dataclass(slots=True)
class _Instance:
    instance_id: str
    role: str
    address: str = ""
    report: LoadReport | None = None
    reported_at: float = float("-inf")
    inflight: dict[str, int] = field(default_factory=dict)  # request id -> tokens
    inflight_since: dict[str, float] = field(default_factory=dict)
    remaining_tokens: int = 0
    growth_blocks: int = 0
    state: InstanceState | None = None  # cached; None when something changed

    def build(self) -> InstanceState:
        if self.state is None:
            r = self.report or LoadReport(self.instance_id, self.role)
            steps = r.recent_step_times_s
            self.state = InstanceState(
                instance_id=self.instance_id, role=self.role, address=self.address, num_running=r.num_running,
                num_waiting=r.num_waiting, num_queued_prefill_tokens=r.num_queued_prefill_tokens,
                num_free_blocks=r.num_free_blocks, num_total_blocks=r.num_total_blocks, block_size=r.block_size,
                step_time_s=sum(steps) / len(steps) if steps else 0.0, draining=r.draining,
                num_inflight_requests=len(self.inflight), num_inflight_tokens=sum(self.inflight.values()),
                num_predicted_remaining_tokens=self.remaining_tokens, num_predicted_growth_blocks=self.growth_blocks)
        return self.state


class ClusterState:
    """The live cluster view (see the module docstring). Not thread-safe: one event loop drives it."""

    def __init__(self, *, cost: CostModel, block_size: int, kv_bytes_per_token: int,
                 prefix_index: PrefixIndex | None = None, links: LinkTable | None = None,
                 ack_delay_s: float = 0.25, report_timeout_s: float = 10.0, link_alpha: float = 0.2,
                 seed: int = 0) -> None:
        self.cost = cost
        self.block_size = block_size
        self.kv_bytes_per_token = kv_bytes_per_token
        self.prefix_index = prefix_index if prefix_index is not None else PrefixIndex(block_size)
        self.links = links if links is not None else LinkTable(cost.default_link)
        self.ack_delay_s = ack_delay_s
        self.report_timeout_s = report_timeout_s
        self.link_alpha = link_alpha
        self.seed = seed
        self.rr_cursor = 0
        self._instances: dict[str, _Instance] = {}
        self._requests: dict[str, _Routed] = {}
        self._pools: tuple[tuple[InstanceState, ...], tuple[InstanceState, ...]] | None = None
        self._fresh: tuple[str, ...] = ()  # the instances in _pools (reported within report_timeout_s)

    # --- membership and reports ----------------------------------------------------------------

    def register(self, instance_id: str, role: str, address: str = "") -> None:
        """Called by discovery when an instance appears (its reports may come later)."""
        inst = self._instances.get(instance_id)
        if inst is None:
            self._instances[instance_id] = _Instance(instance_id, role, address)
        else:
            inst.role, inst.address, inst.state = role, address or inst.address, None
        self._pools = None

    def unregister(self, instance_id: str) -> None:
        """Called by discovery when an instance is gone. Its requests stay in the ledger until finished."""
        self._instances.pop(instance_id, None)
        self.prefix_index.remove_instance(instance_id)
        self._pools = None

    def apply_load_report(self, report: LoadReport, now: float) -> None:
        """Called for every load report, with the router's receive time."""
        if report.role not in ROLES:
            logger.warning("load report from %s with role %r ignored", report.instance_id, report.role)
            return
        if report.block_size <= 0:
            report = dataclasses.replace(report, block_size=self.block_size)
        inst = self._instances.get(report.instance_id)
        if inst is None:
            inst = self._instances[report.instance_id] = _Instance(report.instance_id, report.role)
        inst.report, inst.reported_at, inst.role = report, now, report.role
        acked = [rid for rid, t in inst.inflight_since.items() if t <= now - self.ack_delay_s]
        for rid in acked:
            self._settle(inst, rid)
        inst.state = None
        self._pools = None

    def apply_kv_events(self, batch: KVEventBatch, now: float) -> None:
        self.prefix_index.apply_events(batch, now)

    def kv_events_lost(self, instance_id: str, now: float) -> None:
        """Called when an instance's KV event stream breaks."""
        self.prefix_index.mark_stale(instance_id, now)

    def _settle(self, inst: _Instance, request_id: str) -> None:
        inst.inflight.pop(request_id, None)
        inst.inflight_since.pop(request_id, None)
        entry = self._requests.get(request_id)
        if entry is not None:
            if inst.instance_id == entry.prefill_id:
                entry.prefill_pending = False
            if inst.instance_id == entry.decode_id:
                entry.decode_pending = False

    # --- snapshots -----------------------------------------------------------------------------

    def instances(self) -> tuple[InstanceState, ...]:
        return tuple(i.build() for i in self._instances.values())

    def snapshot_for(self, request: RoutingRequest, now: float) -> ClusterSnapshot:
        """The snapshot a policy routes ``request`` with."""
        fresh = tuple(i.instance_id for i in self._instances.values() if now - i.reported_at <= self.report_timeout_s)
        if self._pools is None or fresh != self._fresh:
            members = [self._instances[i] for i in fresh]
            self._pools = (tuple(i.build() for i in members if i.role == PREFILL),
                           tuple(i.build() for i in members if i.role == DECODE))
            self._fresh = fresh
        cached = self.prefix_index.longest_prefix(request.block_hashes, now)
        return ClusterSnapshot(prefill=self._pools[0], decode=self._pools[1], cached_tokens=cached, links=self.links,
                               kv_bytes_per_token=self.kv_bytes_per_token, block_size=self.block_size,
                               rr_cursor=self.rr_cursor, seed=self.seed, now_s=now)

    # --- the ledger ----------------------------------------------------------------------------

    def on_routed(self, request: RoutingRequest, decision: RoutingDecision, now: float) -> None:
        """Called right after a decision is taken (accepted or not: the cursor advances either way)."""
        self.rr_cursor += 1
        if decision.rejected or decision.decode_id is None:
            return
        decode = self._instances.get(decision.decode_id)
        if decode is None:
            return
        prefill_id = decision.prefill_id if decision.prefill_id is not None else decision.decode_id
        prefill = self._instances.get(prefill_id)
        bs = decode.report.block_size if decode.report else self.block_size
        entry = _Routed(prefill_id, decision.decode_id, now, request.num_prompt_tokens - decision.num_cached_tokens,
                        request.num_prompt_tokens, request.predicted_output_tokens, bs)
        self._requests[request.request_id] = entry
        decode.inflight[request.request_id] = request.num_prompt_tokens
        decode.inflight_since[request.request_id] = now
        decode.remaining_tokens += entry.remaining()
        decode.growth_blocks += entry.growth_blocks()
        decode.state = None
        if prefill is not None and prefill is not decode:
            prefill.inflight[request.request_id] = entry.num_prefill_tokens
            prefill.inflight_since[request.request_id] = now
            prefill.state = None
            self.prefix_index.record_routed(prefill_id, request.block_hashes, now)
        self.prefix_index.record_routed(decision.decode_id, request.block_hashes, now)
        self._pools = None

    def on_prefill_done(self, request_id: str, now: float, *, num_decode_cached_tokens: int | None = None,
                        kv_transfer_s: float | None = None, prefill_queue_s: float = 0.0,
                        prefill_compute_s: float = 0.0) -> None:
        """Called on the request's first token (``PrefillInfo``): the prompt no longer loads its prefill
        instance; a remote transfer's time teaches the link table.

        ``kv_transfer_s`` runs from the decode worker's request to the last KV landing, so it holds
        the prefill worker's queue and compute too; what the link table learns is the link time
        that, under the cost model's overlap, leaves the part the transfer added on top of them
        (:func:`router.links.link_time_from_visible`)."""
        entry = self._requests.get(request_id)
        if entry is None:
            return
        prefill = self._instances.get(entry.prefill_id)
        if prefill is not None and entry.prefill_pending and entry.prefill_id != entry.decode_id:
            self._settle(prefill, request_id)
            prefill.state = None
            self._pools = None
        if kv_transfer_s and num_decode_cached_tokens is not None and entry.prefill_id != entry.decode_id:
            num_bytes = (entry.num_prompt_tokens - num_decode_cached_tokens) * self.kv_bytes_per_token
            visible = max(0.0, kv_transfer_s - prefill_queue_s - prefill_compute_s)
            link_s = link_time_from_visible(visible, prefill_compute_s, self.cost.transfer_overlap)
            self.links = observe_transfer(self.links, entry.prefill_id, entry.decode_id,
                                          TransferSample(num_bytes, link_s), alpha=self.link_alpha)

    def on_tokens(self, request_id: str, num_new_tokens: int) -> None:
        """Called as output tokens stream back (batch them: once per response message is plenty)."""
        entry = self._requests.get(request_id)
        if entry is None or num_new_tokens <= 0:
            return
        before_remaining, before_growth = entry.remaining(), entry.growth_blocks()
        entry.num_output_tokens += num_new_tokens
        decode = self._instances.get(entry.decode_id)
        if decode is not None:
            decode.remaining_tokens = max(0, decode.remaining_tokens + entry.remaining() - before_remaining)
            decode.growth_blocks = max(0, decode.growth_blocks + entry.growth_blocks() - before_growth)
            decode.state = None
            self._pools = None

    def on_finished(self, request_id: str) -> None:
        """Called when the request ends for any reason (finished, aborted, failed, migrated away)."""
        entry = self._requests.pop(request_id, None)
        if entry is None:
            return
        for instance_id in {entry.prefill_id, entry.decode_id}:
            inst = self._instances.get(instance_id)
            if inst is None:
                continue
            inst.inflight.pop(request_id, None)
            inst.inflight_since.pop(request_id, None)
            if instance_id == entry.decode_id:  # clamped: the instance may have re-registered meanwhile
                inst.remaining_tokens = max(0, inst.remaining_tokens - entry.remaining())
                inst.growth_blocks = max(0, inst.growth_blocks - entry.growth_blocks())
            inst.state = None
        self._pools = None

    def num_tracked_requests(self) -> int:
        return len(self._requests)
