"""The plain data a routing decision reads and writes.

Lifecycle of one decision::

    LoadReport (worker) ─┐
    router's ledger ─────┼─► InstanceState ─┐
    prefix index ────────┘  cached_tokens ──┼─► ClusterSnapshot ─┐
    tokenizer + hashes + length predictor ──────► RoutingRequest ──┼─► policy ─► RoutingDecision
                                                                   CostModel, RoutingConfig ─┘

Every type here is frozen and holds only values (no live objects), so the router server, the
simulator and the tests build them the same way, and a router sharing state through Redis can
serialise them. ``router.cluster_state.ClusterState`` is the one place that builds them from live
inputs; the simulator may build them by hand.

Conventions: times in seconds, sizes in tokens or blocks (``num_*``), bandwidth in GB/s.
Mappings inside a frozen object are read-only by convention: never mutate one you were given.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from common.errors import InvalidRequestError, OverloadedError, PdserveError, UnavailableError
from router.links import LinkTable

PREFILL = "prefill"
DECODE = "decode"
ROLES = (PREFILL, DECODE)

# RoutingDecision.reject_reason values. UNAVAILABLE maps to HTTP 503, the others to 429 + Retry-After.
REJECT_TTFT = "ttft_slo"
REJECT_TBT = "tbt_slo"
REJECT_KV = "kv_capacity"
REJECT_UNAVAILABLE = "no_instances"


@dataclass(frozen=True, slots=True)
class InstanceState:
    """One worker as the router sees it: its last load report plus the router's own accounting.

    The reported fields mirror ``LoadReport`` (proto/worker.proto). ``num_inflight_*`` count what
    the router has sent there that the worker's reports do not show yet (see ClusterState for when
    an entry stops counting). ``num_predicted_*`` (decode role) sum, over the requests decoding
    there, the output tokens they are predicted still to generate and the KV blocks that growth
    will need beyond what they hold now.
    """

    instance_id: str
    role: str
    address: str = ""
    num_running: int = 0
    num_waiting: int = 0
    num_queued_prefill_tokens: int = 0
    num_free_blocks: int = 0
    num_total_blocks: int = 0
    block_size: int = 16
    step_time_s: float = 0.0
    """Mean of the recent engine step times; 0 when unknown (no calibration against the cost model)."""
    draining: bool = False
    num_inflight_requests: int = 0
    num_inflight_tokens: int = 0
    """Prefill role: prompt tokens still to compute. Decode role: prompt tokens whose KV will land here."""
    num_predicted_remaining_tokens: int = 0
    num_predicted_growth_blocks: int = 0

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise InvalidRequestError(f"must be one of {ROLES}, got {self.role!r}", field="role")
        if self.block_size <= 0:
            raise InvalidRequestError(f"must be positive, got {self.block_size}", field="block_size")
        for name in ("num_running", "num_waiting", "num_queued_prefill_tokens", "num_free_blocks",
                     "num_total_blocks", "num_inflight_requests", "num_inflight_tokens",
                     "num_predicted_remaining_tokens", "num_predicted_growth_blocks"):
            if getattr(self, name) < 0:
                raise InvalidRequestError(f"must be >= 0, got {getattr(self, name)}", field=name)

    @property
    def num_used_blocks(self) -> int:
        """Blocks held by requests (free blocks include evictable prefix-cache blocks)."""
        return max(0, self.num_total_blocks - self.num_free_blocks)

    @property
    def num_inflight_blocks(self) -> int:
        return -(-self.num_inflight_tokens // self.block_size)

    @property
    def num_outstanding_prefill_tokens(self) -> int:
        return self.num_queued_prefill_tokens + self.num_inflight_tokens

    @property
    def num_requests(self) -> int:
        """Requests there now or on their way (running + waiting + in flight)."""
        return self.num_running + self.num_waiting + self.num_inflight_requests


@dataclass(frozen=True, slots=True)
class SLO:
    ttft_s: float
    tbt_s: float

    def __post_init__(self) -> None:
        if not (self.ttft_s > 0 and math.isfinite(self.ttft_s)):
            raise InvalidRequestError(f"must be a positive number, got {self.ttft_s}", field="slo.ttft_s")
        if not (self.tbt_s > 0 and math.isfinite(self.tbt_s)):
            raise InvalidRequestError(f"must be a positive number, got {self.tbt_s}", field="slo.tbt_s")


@dataclass(frozen=True, slots=True)
class RoutingRequest:
    """What the policy knows about one request.

    ``block_hashes`` are the chained hashes of the prompt's *full* blocks at the cluster's block
    size (``common.block_hash.hash_blocks``). ``predicted_output_tokens`` comes from the length
    predictor, already capped at the request's ``max_tokens``. ``slo`` of None means the
    RoutingConfig's default SLO. ``prefix_key`` is an optional session or conversation key.
    """

    request_id: str
    num_prompt_tokens: int
    block_hashes: tuple[int, ...] = ()
    predicted_output_tokens: int = 0
    slo: SLO | None = None
    prefix_key: str | None = None

    def __post_init__(self) -> None:
        if self.num_prompt_tokens < 1:
            raise InvalidRequestError(f"must be >= 1, got {self.num_prompt_tokens}", field="num_prompt_tokens")
        if self.predicted_output_tokens < 0:
            raise InvalidRequestError(f"must be >= 0, got {self.predicted_output_tokens}",
                                      field="predicted_output_tokens")
        if not isinstance(self.block_hashes, tuple):
            object.__setattr__(self, "block_hashes", tuple(self.block_hashes))


@dataclass(frozen=True, slots=True)
class ClusterSnapshot:
    """The cluster at the moment of one decision, specialised to one request.

    ``cached_tokens`` maps instance ids (either role) to the length in tokens of the request's
    prompt prefix that instance holds (from the prefix index; absent means 0). ``rr_cursor`` and
    ``seed`` carry what stateful-looking policies need while staying pure: the caller advances
    ``rr_cursor`` by one after every decision and sets ``seed`` as it likes (the random policy
    mixes it with the request id). ``now_s`` is the caller's clock (virtual in the simulator).
    """

    prefill: tuple[InstanceState, ...]
    decode: tuple[InstanceState, ...]
    cached_tokens: Mapping[str, int] = field(default_factory=dict)
    links: LinkTable = field(default_factory=LinkTable)
    kv_bytes_per_token: int = 0
    block_size: int = 16
    rr_cursor: int = 0
    seed: int = 0
    now_s: float = 0.0

    def __post_init__(self) -> None:
        if self.kv_bytes_per_token < 0:
            raise InvalidRequestError(f"must be >= 0, got {self.kv_bytes_per_token}", field="kv_bytes_per_token")
        if self.block_size <= 0:
            raise InvalidRequestError(f"must be positive, got {self.block_size}", field="block_size")

    def cached(self, instance_id: str) -> int:
        return self.cached_tokens.get(instance_id, 0)

    def instance(self, instance_id: str) -> InstanceState:
        for inst in self.prefill + self.decode:
            if inst.instance_id == instance_id:
                return inst
        raise KeyError(instance_id)


@dataclass(frozen=True, slots=True)
class RoutingDecision:
    """Where one request goes, what the policy predicts for it, or why it is refused.

    ``prefill_id`` None with a ``decode_id`` means "prefill on the decode instance" (send the
    GenerateRequest without a PrefillTarget). ``prefix_source_id`` is set only by
    ``global_cache_aware``: the instance the chosen prefill instance should fetch the cached prefix
    from first (the simulator models it; the data plane has no instance-to-instance prefix fetch
    yet). ``num_cached_tokens`` is what the policy expects the prefill side to find cached.
    """

    request_id: str
    policy: str
    decode_id: str | None
    prefill_id: str | None = None
    predicted_ttft_s: float = 0.0
    predicted_tbt_s: float = 0.0
    predicted_transfer_s: float = 0.0
    num_cached_tokens: int = 0
    prefix_source_id: str | None = None
    rejected: bool = False
    reject_reason: str = ""
    retry_after_s: float = 0.0
    explain: str = ""

    @property
    def local_prefill(self) -> bool:
        return not self.rejected and self.prefill_id is None

    @classmethod
    def reject(cls, request_id: str, policy: str, reason: str, *, retry_after_s: float = 0.0,
               explain: str = "", predicted_ttft_s: float = 0.0, predicted_tbt_s: float = 0.0) -> RoutingDecision:
        return cls(request_id=request_id, policy=policy, decode_id=None, rejected=True, reject_reason=reason,
                   retry_after_s=retry_after_s, explain=explain, predicted_ttft_s=predicted_ttft_s,
                   predicted_tbt_s=predicted_tbt_s)

    def error(self) -> PdserveError | None:
        """The typed error the server answers a rejected request with (None when accepted)."""
        if not self.rejected:
            return None
        if self.reject_reason == REJECT_UNAVAILABLE:
            return UnavailableError(f"no worker can take the request: {self.explain}")
        return OverloadedError(f"overloaded ({self.reject_reason}): {self.explain}",
                               retry_after_s=self.retry_after_s, code=self.reject_reason)
