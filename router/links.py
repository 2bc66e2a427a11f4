"""The network between instances: bandwidth and latency per (source, destination) link.

A KV transfer from a prefill instance to a decode instance takes
``latency_s + num_bytes / (bandwidth_gbps * 1e9)``. The :class:`LinkTable` holds one
:class:`LinkState` per pair that differs from the fabric's default (a slow cross-rack pair, a pair
on the same host over NVLink), and learns them from observed transfers: every finished transfer
(``PrefillInfo.kv_transfer_s`` and the bytes moved) goes through :func:`observe_transfer`, which
returns a *new* table (the old one is never changed, so a snapshot a policy is reading stays
consistent). :func:`fit_link` fits a default link from profile samples by least squares.

Units: bandwidth in GB/s (1e9 bytes per second), latency and times in seconds.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.errors import ConfigError
from router.nnls import nnls

DEFAULT_BANDWIDTH_GBPS = 25.0  # a 200 Gb/s RDMA NIC
DEFAULT_LATENCY_S = 0.001
_MEMO_LIMIT = 8


@dataclass(frozen=True, slots=True)
class LinkState:
    bandwidth_gbps: float = DEFAULT_BANDWIDTH_GBPS
    latency_s: float = DEFAULT_LATENCY_S

    def __post_init__(self) -> None:
        if not self.bandwidth_gbps > 0:
            raise ConfigError(f"must be positive, got {self.bandwidth_gbps}", field="bandwidth_gbps")
        if not self.latency_s >= 0:
            raise ConfigError(f"must be >= 0, got {self.latency_s}", field="latency_s")

    def transfer_time(self, num_bytes: float) -> float:
        """Seconds to move ``num_bytes`` (latency only when there is nothing to move)."""
        return self.latency_s + max(0.0, num_bytes) / (self.bandwidth_gbps * 1e9)


@dataclass(frozen=True, slots=True)
class TransferSample:
    """One observed (or profiled) transfer of ``num_bytes`` that took ``seconds``."""

    num_bytes: int
    seconds: float


@dataclass(frozen=True)
class LinkTable:
    """Per-pair links; pairs not listed use ``default``. Treat ``links`` as read-only."""

    default: LinkState = field(default_factory=LinkState)
    links: Mapping[tuple[str, str], LinkState] = field(default_factory=dict)
    _memo: dict = field(default_factory=dict, compare=False, repr=False, hash=False)

    def get(self, src: str, dst: str) -> LinkState:
        return self.links.get((src, dst), self.default)

    def with_link(self, src: str, dst: str, state: LinkState) -> LinkTable:
        links = dict(self.links)
        links[(src, dst)] = state
        return LinkTable(self.default, links)

    def with_default(self, state: LinkState) -> LinkTable:
        return LinkTable(state, self.links)

    def matrices(self, src_ids: tuple[str, ...], dst_ids: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
        """(bandwidth GB/s, latency s) arrays of shape (len(src_ids), len(dst_ids)).

        Memoised per id order: the router asks for the same pools on every request, and a table is
        immutable, so the arrays are built once per table (per pool membership).
        """
        key = (src_ids, dst_ids)
        hit = self._memo.get(key)
        if hit is not None:
            return hit
        bw = np.full((len(src_ids), len(dst_ids)), self.default.bandwidth_gbps)
        lat = np.full((len(src_ids), len(dst_ids)), self.default.latency_s)
        if self.links:
            src_index = {s: i for i, s in enumerate(src_ids)}
            dst_index = {d: j for j, d in enumerate(dst_ids)}
            for (s, d), link in self.links.items():
                i, j = src_index.get(s), dst_index.get(d)
                if i is not None and j is not None:
                    bw[i, j] = link.bandwidth_gbps
                    lat[i, j] = link.latency_s
        bw.setflags(write=False)
        lat.setflags(write=False)
        if len(self._memo) >= _MEMO_LIMIT:
            self._memo.clear()
        self._memo[key] = (bw, lat)
        return bw, lat

    def to_dict(self) -> dict[str, Any]:
        return {
            "default": {"bandwidth_gbps": self.default.bandwidth_gbps, "latency_s": self.default.latency_s},
            "links": [{"src": s, "dst": d, "bandwidth_gbps": v.bandwidth_gbps, "latency_s": v.latency_s}
                      for (s, d), v in sorted(self.links.items())],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LinkTable:
        default = LinkState(**data.get("default", {}))
        links = {(e["src"], e["dst"]): LinkState(e["bandwidth_gbps"], e["latency_s"])
                 for e in data.get("links", [])}
        return cls(default, links)


def link_time_from_visible(visible_s: float, compute_s: float, overlap: float) -> float:
    """The link time ``t`` for which the cost model's visible transfer ``t - overlap * min(compute, t)``
    equals ``visible_s``: the inverse of ``CostModel.visible_transfer_time`` for one observed transfer.

    ``visible_s`` is what the transfer added to the prefill (all KV landed minus the prefill
    worker's queue and compute), ``compute_s`` the prefill's compute time.
    """
    visible_s, compute_s = max(0.0, visible_s), max(0.0, compute_s)
    longer = visible_s + overlap * compute_s  # the branch where the link outlasts the compute
    if longer >= compute_s or overlap >= 1:
        return longer
    return visible_s / (1.0 - overlap)


def observe_transfer(table: LinkTable, src: str, dst: str, sample: TransferSample, *, alpha: float = 0.2,
                     min_bytes: int = 1 << 20) -> LinkTable:
    """The table after one observed transfer ``src -> dst``: an EWMA of the link's time per byte.

    Called by the router's cluster state when a decode worker reports a finished KV transfer. The
    latency stays as configured (it is what small transfers measure; :func:`fit_link` fits it);
    the bandwidth moves towards ``num_bytes / (seconds - latency)``. Averaging seconds per byte
    (not bytes per second) keeps predicted *times* unbiased. Transfers under ``min_bytes`` say
    little about bandwidth and leave the table unchanged (the same object is returned).
    """
    if not 0 < alpha <= 1:
        raise ConfigError(f"must be in (0, 1], got {alpha}", field="alpha")
    if sample.num_bytes < max(1, min_bytes) or sample.seconds <= 0:
        return table
    old = table.get(src, dst)
    payload_s = max(sample.seconds - old.latency_s, 1e-9)
    inv_old = 1.0 / (old.bandwidth_gbps * 1e9)
    inv_obs = payload_s / sample.num_bytes
    inv_new = (1 - alpha) * inv_old + alpha * inv_obs
    return table.with_link(src, dst, LinkState(1.0 / (inv_new * 1e9), old.latency_s))


def fit_link(samples: Iterable[TransferSample]) -> LinkState:
    """Latency and bandwidth fitted to profiled transfers by non-negative least squares."""
    data: Sequence[TransferSample] = list(samples)
    if len(data) < 2:
        raise ValueError("need at least two transfer samples")
    x = np.array([[1.0, s.num_bytes] for s in data])
    y = np.array([s.seconds for s in data])
    latency, per_byte = nnls(x, y)
    if per_byte <= 0:
        raise ValueError("transfer samples show no dependence on size")
    return LinkState(bandwidth_gbps=1.0 / (per_byte * 1e9), latency_s=float(latency))
