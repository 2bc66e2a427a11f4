"""Request traces: the Mooncake JSONL and Azure (Splitwise) CSV readers, time scaling and caps.

A trace is a list of :class:`TraceRequest` sorted by arrival, times in seconds from the first
arrival. Readers take the same options:

- ``rate_scale`` k: replay at k x the recorded rate (arrival times divided by k);
- ``max_requests``: keep only the first n requests (after sorting by arrival);
- ``start_s`` / ``duration_s``: a window of the recorded time line, before scaling.

**Mooncake block ids.** Each request lists ``hash_ids``, one per 512-token block of its prompt
(the last one possibly partial); equal ids at the same position of two prompts mean a shared
prefix up to and including that block. The ids are already prefix identities (in the FAST'25
conversation trace every id appears at one position after one predecessor), so they are used
as the chained block hashes the router and the simulated prefix caches see, unchanged, at a
cluster block size of 512 tokens (:data:`MOONCAKE_BLOCK_SIZE`). Only *full* blocks count (an
engine caches full blocks only): ``block_hashes = hash_ids[:input_length // 512]``.
:func:`chain_ids` turns ids that are *not* prefix-unique into chained identities, for other traces.

The Azure trace has no prompt content, so its requests have no block hashes (no prefix reuse).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

from common.block_hash import NONE_HASH, hash_block
from common.errors import ConfigError

MOONCAKE_BLOCK_SIZE = 512
AZURE_BLOCK_SIZE = 16  # no hashes: any block size works; 16 keeps the KV accounting fine-grained


@dataclass(frozen=True, slots=True)
class TraceRequest:
    request_id: str
    arrival_s: float
    num_prompt_tokens: int
    num_output_tokens: int
    block_hashes: tuple[int, ...] = ()
    """Chained identities of the prompt's full blocks at the trace's block size."""


@dataclass(frozen=True, slots=True)
class Trace:
    requests: tuple[TraceRequest, ...]
    block_size: int
    name: str = ""

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def duration_s(self) -> float:
        return self.requests[-1].arrival_s - self.requests[0].arrival_s if self.requests else 0.0


def chain_ids(ids: Sequence[int]) -> tuple[int, ...]:
    """Chained identities of a block-id sequence: equal outputs at i mean equal ids at 0..i.

    Each id stands for its block's tokens in the router's and engine's block hash.
    """
    out, h = [], NONE_HASH
    for block_id in ids:
        h = hash_block(h, (block_id,))
        out.append(h)
    return tuple(out)


def _finish(rows: list[tuple[float, int, int, tuple[int, ...]]], *, name: str, block_size: int, rate_scale: float,
            max_requests: int | None, start_s: float, duration_s: float | None) -> Trace:
    if not rate_scale > 0:
        raise ConfigError(f"must be positive, got {rate_scale}", field="rate_scale")
    if max_requests is not None and max_requests < 1:
        raise ConfigError(f"must be >= 1, got {max_requests}", field="max_requests")
    rows.sort(key=lambda r: r[0])
    if rows:
        t0 = rows[0][0]
        rows = [(t - t0, *rest) for t, *rest in rows]
    rows = [r for r in rows if r[0] >= start_s and (duration_s is None or r[0] < start_s + duration_s)]
    if max_requests is not None:
        rows = rows[:max_requests]
    t0 = rows[0][0] if rows else 0.0
    requests = tuple(TraceRequest(f"{name}-{i}", (t - t0) / rate_scale, max(1, n_in), max(1, n_out), hashes)
                     for i, (t, n_in, n_out, hashes) in enumerate(rows))
    return Trace(requests, block_size, name)


def read_mooncake(path: str | Path, *, rate_scale: float = 1.0, max_requests: int | None = None,
                  start_s: float = 0.0, duration_s: float | None = None, chain: bool = False) -> Trace:
    """A Mooncake JSONL trace (``timestamp`` ms, ``input_length``, ``output_length``, ``hash_ids``).

    ``chain`` passes the ids through :func:`chain_ids` (for traces whose ids are per-block content,
    not per-prefix).
    """
    rows = []
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            r = json.loads(line)
            n_in = int(r["input_length"])
            ids = [int(x) for x in r.get("hash_ids", ())][: n_in // MOONCAKE_BLOCK_SIZE]
            rows.append((float(r["timestamp"]) / 1000.0, n_in, int(r["output_length"]),
                         chain_ids(ids) if chain else tuple(ids)))
    return _finish(rows, name=Path(path).stem, block_size=MOONCAKE_BLOCK_SIZE, rate_scale=rate_scale,
                   max_requests=max_requests, start_s=start_s, duration_s=duration_s)


def _azure_time(text: str) -> float:
    day, _, frac = text.strip().partition(".")
    t = datetime.strptime(day, "%Y-%m-%d %H:%M:%S").timestamp()
    return t + (float("0." + frac) if frac else 0.0)


def read_azure(path: str | Path, *, rate_scale: float = 1.0, max_requests: int | None = None,
               start_s: float = 0.0, duration_s: float | None = None) -> Trace:
    """An Azure LLM inference trace CSV (``TIMESTAMP``, ``ContextTokens``, ``GeneratedTokens``)."""
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            rows.append((_azure_time(r["TIMESTAMP"]), int(r["ContextTokens"]), int(r["GeneratedTokens"]), ()))
    return _finish(rows, name=Path(path).stem, block_size=AZURE_BLOCK_SIZE, rate_scale=rate_scale,
                   max_requests=max_requests, start_s=start_s, duration_s=duration_s)


def read_trace(path: str | Path, *, fmt: str = "auto", **options) -> Trace:
    """Read a trace by format (``mooncake``, ``azure``, or ``auto`` from the file extension)."""
    if fmt == "auto":
        suffix = Path(path).suffix.lower()
        fmt = {".jsonl": "mooncake", ".json": "mooncake", ".csv": "azure"}.get(suffix, "")
        if not fmt:
            raise ConfigError(f"cannot tell the trace format of {path}; pass --trace-format", field="trace_format")
    if fmt == "mooncake":
        return read_mooncake(path, **options)
    if fmt == "azure":
        return read_azure(path, **options)
    raise ConfigError(f"unknown trace format {fmt!r} (mooncake, azure)", field="trace_format")


def from_requests(requests: Iterable[TraceRequest], *, block_size: int, name: str = "synthetic") -> Trace:
    """A trace from hand-made requests (tests, synthetic workloads), sorted by arrival."""
    return Trace(tuple(sorted(requests, key=lambda r: r.arrival_s)), block_size, name)


def scaled(trace: Trace, rate_scale: float) -> Trace:
    """The same trace replayed at ``rate_scale`` x its rate."""
    if not rate_scale > 0:
        raise ConfigError(f"must be positive, got {rate_scale}", field="rate_scale")
    return Trace(tuple(replace(r, arrival_s=r.arrival_s / rate_scale) for r in trace.requests),
                 trace.block_size, trace.name)
