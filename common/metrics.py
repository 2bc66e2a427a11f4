"""Every Prometheus metric pdserve exports, defined once.

Names follow ``pdserve_<component>_<what>_<unit>``; counters end in
``_total``; labels include ``model`` and ``instance`` (and ``role`` where a
metric is shared by prefill and decode workers). Components import the objects
from here and never define their own.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

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
FALLBACK_REASONS = ("timeout", "unavailable", "refused", "stream_broken", "checksum", "incomplete", "unknown_peer")
LOCAL_PREFILL_FALLBACKS = Counter(
    "pdserve_decode_local_prefill_fallbacks_total",
    "Remote prefills that failed and were recomputed locally (reason: timeout, unavailable, refused, "
    "stream_broken, checksum, incomplete, unknown_peer)",
    ("model", "instance", "reason"))

# --- router ------------------------------------------------------------------------------------

ROUTER_LABELS = ("model", "instance")
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                   40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
               0.4, 0.5, 0.75, 1.0, 2.5)

ROUTER_REQUESTS = Counter(
    "pdserve_router_requests_total", "API requests by endpoint and HTTP status", ROUTER_LABELS + ("endpoint", "status"))
ROUTER_TTFT = Histogram(
    "pdserve_router_time_to_first_token_seconds", "Time from request arrival to its first token",
    ROUTER_LABELS, buckets=LATENCY_BUCKETS)
ROUTER_ITL = Histogram(
    "pdserve_router_inter_token_latency_seconds", "Time between consecutive tokens of a request",
    ROUTER_LABELS, buckets=ITL_BUCKETS)
ROUTER_E2E = Histogram(
    "pdserve_router_e2e_request_latency_seconds", "Time from request arrival to its last token",
    ROUTER_LABELS, buckets=LATENCY_BUCKETS)
ROUTER_PROMPT_TOKENS = Counter("pdserve_router_prompt_tokens_total", "Prompt tokens admitted", ROUTER_LABELS)
ROUTER_GENERATION_TOKENS = Counter(
    "pdserve_router_generation_tokens_total", "Tokens generated and streamed to clients", ROUTER_LABELS)
ROUTER_REJECTIONS = Counter(
    "pdserve_router_rejections_total", "Requests refused before reaching a worker, by reason",
    ROUTER_LABELS + ("reason",))
ROUTER_MIGRATIONS = Counter(
    "pdserve_router_migrations_total", "Requests moved to another decode worker after one failed", ROUTER_LABELS)
ROUTER_ROUTING_DECISIONS = Counter(
    "pdserve_router_routing_decisions_total", "Routing decisions by policy and prefill placement (remote, local)",
    ROUTER_LABELS + ("policy", "placement"))
ROUTER_WORKERS = Gauge(
    "pdserve_router_workers", "Workers this router sees as healthy (load reports arriving), by role",
    ROUTER_LABELS + ("role",))

# --- workers (engine state, sampled from load snapshots) ----------------------------------------

WORKER_RUNNING = Gauge("pdserve_worker_num_requests_running", "Requests in the running batch", WORKER_LABELS)
WORKER_AWAITING_KV = Gauge("pdserve_worker_num_requests_awaiting_kv",
                           "Requests holding blocks while their KV arrives from a prefill worker (decode role)",
                           WORKER_LABELS)
WORKER_WAITING = Gauge("pdserve_worker_num_requests_waiting", "Requests waiting to be scheduled", WORKER_LABELS)
WORKER_KV_USAGE = Gauge("pdserve_worker_kv_cache_usage_ratio",
                        "Fraction of KV blocks held by requests (evictable prefix-cache blocks count as free)",
                        WORKER_LABELS)
WORKER_QUEUED_PREFILL = Gauge("pdserve_worker_queued_prefill_tokens", "Prompt tokens not yet computed",
                              WORKER_LABELS)
WORKER_STEP_TIME = Gauge("pdserve_worker_step_time_seconds", "Mean duration of the recent engine steps",
                         WORKER_LABELS)
WORKER_ROLE = Gauge("pdserve_worker_role_info", "1 for the role this worker serves now", WORKER_LABELS)
WORKER_PREFIX_QUERIES = Counter("pdserve_worker_prefix_cache_queries_total",
                                "Prompt tokens looked up in the prefix cache", WORKER_LABELS)
WORKER_PREFIX_HITS = Counter("pdserve_worker_prefix_cache_hits_total",
                             "Prompt tokens found in the prefix cache", WORKER_LABELS)
WORKER_PREEMPTIONS = Counter("pdserve_worker_preemptions_total", "Requests preempted (to be recomputed)",
                             WORKER_LABELS)

# --- per-request phases ---------------------------------------------------------------------------

PHASE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
REQUEST_PHASE = Histogram(
    "pdserve_request_phase_seconds",
    "Time a request spends in each phase: router_queue (arrival to dispatch, router), prefill (arrival at the "
    "decode worker to its first token), kv_transfer (the KV fetch), decode (first token to the last)",
    ("model", "instance", "phase"), buckets=PHASE_BUCKETS)

# --- autoscaler ---------------------------------------------------------------------------------
# role is prefill or decode; signal is a ScalingSignals field name

AUTOSCALER_DESIRED_REPLICAS = Gauge(
    "pdserve_autoscaler_desired_replicas", "Replicas the last decision wants, by role", ("role",))
AUTOSCALER_ACTUAL_REPLICAS = Gauge(
    "pdserve_autoscaler_actual_replicas", "Replicas the actuator reports (what it was asked to run), by role",
    ("role",))
AUTOSCALER_DEMAND_REPLICAS = Gauge(
    "pdserve_autoscaler_demand_replicas",
    "Fractional replicas the predicted load needs before hysteresis, bounds and budget, by role", ("role",))
AUTOSCALER_SLO_CORRECTION = Gauge(
    "pdserve_autoscaler_slo_correction_ratio", "Reactive SLO-drift correction of a role's demand (1 = none)",
    ("role",))
AUTOSCALER_REPLICA_CAPACITY = Gauge(
    "pdserve_autoscaler_replica_capacity",
    "One replica's capacity at the SLO: uncached prompt tokens/s (prefill), concurrent requests (decode)",
    ("role",))
AUTOSCALER_OBSERVED = Gauge(
    "pdserve_autoscaler_observed_value", "Signals as last read from Prometheus (NaN: no signal)", ("signal",))
AUTOSCALER_PREDICTED = Gauge(
    "pdserve_autoscaler_predicted_value", "Signals one horizon ahead, as the policy used them", ("signal",))
AUTOSCALER_DECISIONS = Counter(
    "pdserve_autoscaler_decisions_total", "Sizing decisions by action (hold, scale, flip) and cause",
    ("action", "cause"))
AUTOSCALER_ACTUATIONS = Counter(
    "pdserve_autoscaler_actuations_total",
    "Changes sent to the actuator by role, kind (scale_up, scale_down, flip) and outcome (ok, error, fallback)",
    ("role", "kind", "outcome"))
AUTOSCALER_SIGNAL_ERRORS = Counter(
    "pdserve_autoscaler_signal_errors_total", "Intervals without a usable signal (the sizes were held)",
    ("reason",))
# labelled by actuator so that only a running autoscaler exports them (an unlabelled gauge would appear,
# at 0, in every process that imports this module)
AUTOSCALER_ADVISORY = Gauge(
    "pdserve_autoscaler_advisory", "1 when the autoscaler only reports (advisory mode)", ("actuator",))
AUTOSCALER_LAST_DECISION = Gauge(
    "pdserve_autoscaler_last_decision_timestamp_seconds", "When the last decision was made (seconds since the epoch)",
    ("actuator",))


# --- series that must exist before their first event -------------------------------------------------
# A counter child created by its first inc() starts at 1, so rate() and increase() never count that
# event: the first rejection, migration or fallback of a process would be invisible to every panel
# and alert. Processes create the children they may increment, at 0, when they start.

API_ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models")
API_STATUSES = ("200", "400", "401", "404", "413", "429", "500", "503")
REJECTION_REASONS = ("concurrency", "ttft_slo", "tbt_slo", "kv_capacity", "no_instances")


def api_endpoint(path: str) -> str:
    """The ``endpoint`` label of a request path: one of API_ENDPOINTS or ``other`` (bounded cardinality)."""
    return path if path in API_ENDPOINTS else "other"


def init_router_series(model: str, instance: str) -> None:
    for endpoint in API_ENDPOINTS:
        for status in API_STATUSES:
            ROUTER_REQUESTS.labels(model, instance, endpoint, status)
    for reason in REJECTION_REASONS:
        ROUTER_REJECTIONS.labels(model, instance, reason)
    ROUTER_MIGRATIONS.labels(model, instance)


def init_decode_series(model: str, instance: str) -> None:
    for outcome in ("completed", "failed"):
        KV_TRANSFERS.labels(model, "decode", instance, outcome)
    for reason in FALLBACK_REASONS:
        LOCAL_PREFILL_FALLBACKS.labels(model, instance, reason)
