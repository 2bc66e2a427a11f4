"""Every Prometheus metric pdserve exports, defined once.

Names follow ``pdserve_<component>_<what>_<unit>``; counters end in
``_total``; labels include ``model`` and ``instance`` (and ``role`` where a
metric is shared by prefill and decode workers). Components import the objects
from here and never define their own.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

WORKER_LABELS = ("model", "role", "instance")
TRANSFER_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

KV_TRANSFERS = Counter(
    "pdserve_kv_transfers_total", "KV transfers by side and outcome (completed, failed)",
    WORKER_LABELS + ("outcome",))
KV_TRANSFER_BYTES = Counter(
    "pdserve_kv_transfer_bytes_total", "KV payload bytes moved", WORKER_LABELS)
KV_TRANSFER_SECONDS = Histogram(
    "pdserve_kv_transfer_seconds", "Time from reserving blocks to the last KV chunk applied (decode side)",
    WORKER_LABELS, buckets=TRANSFER_BUCKETS)
LOCAL_PREFILLS = Counter(
    "pdserve_decode_local_prefills_total",
    "Prompts a decode worker prefilled itself by design (reason: no_target, short, cached)",
    ("model", "instance", "reason"))
LOCAL_PREFILL_FALLBACKS = Counter(
    "pdserve_decode_local_prefill_fallbacks_total",
    "Remote prefills that failed and were recomputed locally (reason: timeout, unavailable, refused, "
    "stream_broken, checksum, incomplete)",
    ("model", "instance", "reason"))
