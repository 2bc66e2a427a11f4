"""What a simulation measured: per-request records, the summary, and the time series for plots.

Definitions (state them with every result):

- **TTFT**: arrival at the router to the first token at the decode instance (remote prefill:
  when the KV and the first token land; local prefill: the step that samples it).
- **TPOT** (a request's TBT): ``(finish - first token) / (outputs - 1)``, its mean time between
  tokens; 0 for single-token outputs.
- **tbt_p90_s**: the 90th percentile of all inter-token gaps, weighted by tokens: every step of
  a decode instance is a gap for each request in its batch.
- **SLO attainment**: fraction of *all* requests (rejected ones count as misses) with
  TTFT <= ttft_slo and TPOT <= tbt_slo. **Goodput**: requests meeting both, per second of the
  simulated span (first arrival to last finish).
- **GPU-hours**: provisioned instances x GPUs per instance, integrated over the span.
- **prefix_hit_rate**: prompt tokens the computing instance found cached (or fetched), over all
  prompt tokens of completed requests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(slots=True, eq=False)
class RequestRecord:
    request_id: str
    arrival_s: float
    num_prompt_tokens: int
    num_output_tokens: int
    predicted_output_tokens: int = 0
    prefill_id: str | None = None
    decode_id: str | None = None
    rejected: bool = False
    reject_reason: str = ""
    first_token_s: float = -1.0
    finish_s: float = -1.0
    num_cached_tokens: int = 0
    """Prompt tokens the computing instance found cached (or fetched) at admission."""
    num_decode_cached_tokens: int = 0
    transfer_s: float = 0.0
    predicted_ttft_s: float = 0.0
    num_outcomes: int = 0
    """Times the request was completed or rejected (conservation: exactly 1 at the end)."""

    @property
    def ttft_s(self) -> float:
        return self.first_token_s - self.arrival_s

    @property
    def tpot_s(self) -> float:
        n = self.num_output_tokens
        return (self.finish_s - self.first_token_s) / (n - 1) if n > 1 else 0.0


def weighted_percentile(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    if len(values) == 0 or weights.sum() <= 0:
        return 0.0
    order = np.argsort(values, kind="stable")
    cum = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cum, q * cum[-1])])


def gap_percentile(gaps: list[tuple[float, float, int, int]], q: float, points: int = 8) -> float:
    """Percentile of inter-token gaps from per-segment (first, last, steps, batch) records."""
    if not gaps:
        return 0.0
    g = np.array(gaps, dtype=np.float64)
    first, last, k, b = g[:, 0], g[:, 1], g[:, 2], g[:, 3]
    m = np.minimum(k, points)
    idx = np.repeat(np.arange(len(g)), m.astype(np.int64))
    offset = np.arange(len(idx)) - np.repeat(np.cumsum(m) - m, m.astype(np.int64))
    frac = np.where(m[idx] > 1, offset / np.maximum(m[idx] - 1, 1), 0.0)
    values = first[idx] + (last[idx] - first[idx]) * frac
    weights = b[idx] * k[idx] / m[idx]
    return weighted_percentile(values, weights, q)


@dataclass
class SimResult:
    records: list[RequestRecord]
    ttft_slo_s: float
    tbt_slo_s: float
    gpu_hours: float
    end_s: float
    timeline: list[tuple[float, int, int, int, int]]
    gaps: list[tuple[float, float, int, int]]
    num_preemptions: int = 0
    prefix_queried_tokens: int = 0
    prefix_hit_tokens: int = 0
    wall_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def completed(self) -> list[RequestRecord]:
        return [r for r in self.records if not r.rejected]

    def slo_met(self, r: RequestRecord) -> bool:
        return not r.rejected and r.ttft_s <= self.ttft_slo_s and r.tpot_s <= self.tbt_slo_s

    def summary(self) -> dict[str, Any]:
        done = self.completed()
        ttft = np.array([r.ttft_s for r in done]) if done else np.zeros(1)
        tpot = np.array([r.tpot_s for r in done]) if done else np.zeros(1)
        e2e = np.array([r.finish_s - r.arrival_s for r in done]) if done else np.zeros(1)
        start = min((r.arrival_s for r in self.records), default=0.0)
        span = max(self.end_s - start, 1e-9)
        met = sum(1 for r in self.records if self.slo_met(r))
        total = len(self.records)
        out_tokens = sum(r.num_output_tokens for r in done)

        def pct(a: np.ndarray, q: float) -> float:
            return round(float(np.percentile(a, q)), 4)

        return {
            "requests": total,
            "completed": len(done),
            "rejected": total - len(done),
            "ttft_mean_s": round(float(ttft.mean()), 4),
            "ttft_p50_s": pct(ttft, 50),
            "ttft_p90_s": pct(ttft, 90),
            "ttft_p99_s": pct(ttft, 99),
            "tbt_p90_s": round(gap_percentile(self.gaps, 0.9), 4),
            "tpot_mean_s": round(float(tpot.mean()), 4),
            "tpot_p90_s": pct(tpot, 90),
            "e2e_mean_s": round(float(e2e.mean()), 3),
            "slo_attainment": round(met / total, 4) if total else 0.0,
            "goodput_rps": round(met / span, 4),
            "throughput_tokens_per_s": round(out_tokens / span, 1),
            "gpu_hours": round(self.gpu_hours, 3),
            "span_s": round(span, 1),
            "prefix_hit_rate": round(sum(r.num_cached_tokens for r in done)
                                     / max(1, sum(r.num_prompt_tokens for r in done)), 4),
            "preemptions": self.num_preemptions,
            "ttft_slo_s": self.ttft_slo_s,
            "tbt_slo_s": self.tbt_slo_s,
            "wall_s": round(self.wall_s, 2),
        }

    def latency_series(self, bin_s: float = 60.0) -> dict[str, list[float]]:
        """Per arrival-time bin: TTFT p50/p90 and TPOT p90 of the requests that completed, and rejections."""
        if not self.records:
            return {"t_s": [], "ttft_p50_s": [], "ttft_p90_s": [], "tpot_p90_s": [], "rejected": []}
        arrivals = np.array([r.arrival_s for r in self.records])
        bins = np.floor(arrivals / bin_s).astype(np.int64)
        out: dict[str, list[float]] = {"t_s": [], "ttft_p50_s": [], "ttft_p90_s": [], "tpot_p90_s": [], "rejected": []}
        for b in range(int(bins.max()) + 1):
            members = [self.records[i] for i in np.nonzero(bins == b)[0]]
            done = [r for r in members if not r.rejected]
            out["t_s"].append(b * bin_s)
            ttft = [r.ttft_s for r in done] or [float("nan")]
            out["ttft_p50_s"].append(float(np.percentile(ttft, 50)))
            out["ttft_p90_s"].append(float(np.percentile(ttft, 90)))
            out["tpot_p90_s"].append(float(np.percentile([r.tpot_s for r in done] or [float("nan")], 90)))
            out["rejected"].append(float(len(members) - len(done)))
        return out
