"""Small clusters for the router tests, with round numbers so decisions can be computed by hand.

The cost model: prefill 1 ms per token (no base, no attention term, no floor); a decode step is
10 ms + 1 ms per request in the batch; KV is 1 MB per token; the default link is 10 GB/s with 1 ms
latency, so moving 1000 tokens of KV takes 0.101 s.
"""

from __future__ import annotations

from router.cost_model import CostModel
from router.links import LinkState, LinkTable
from router.routing_config import RoutingConfig
from router.snapshot import SLO, ClusterSnapshot, InstanceState, RoutingRequest

COST = CostModel(prefill_per_token_s=1e-3, decode_base_s=0.010, decode_per_request_s=1e-3,
                 link_bandwidth_gbps=10.0, link_latency_s=0.001)
KV_BYTES = 1_000_000
LINKS = LinkTable(LinkState(10.0, 0.001))
BS = 16


def prefill(name: str, **kw) -> InstanceState:
    kw.setdefault("num_total_blocks", 10_000)
    kw.setdefault("num_free_blocks", kw["num_total_blocks"])
    return InstanceState(name, "prefill", block_size=BS, **kw)


def decode(name: str, **kw) -> InstanceState:
    kw.setdefault("num_total_blocks", 10_000)
    kw.setdefault("num_free_blocks", kw["num_total_blocks"])
    return InstanceState(name, "decode", block_size=BS, **kw)


def request(num_prompt_tokens: int = 1000, predicted_output_tokens: int = 200, *, ttft_s: float = 5.0,
            tbt_s: float = 0.1, request_id: str = "r1") -> RoutingRequest:
    return RoutingRequest(request_id, num_prompt_tokens, predicted_output_tokens=predicted_output_tokens,
                          slo=SLO(ttft_s, tbt_s))


def snapshot(prefills, decodes, cached=None, links: LinkTable = LINKS, **kw) -> ClusterSnapshot:
    return ClusterSnapshot(prefill=tuple(prefills), decode=tuple(decodes), cached_tokens=dict(cached or {}),
                           links=links, kv_bytes_per_token=KV_BYTES, block_size=BS, **kw)


def config(**kw) -> RoutingConfig:
    return RoutingConfig(**kw)
