"""The autoscaler's configuration: the sizing policy's knobs and the service's options.

Two frozen dataclasses in the style of ``common/config.py`` (validated on construction, a
``ConfigError`` naming the field): :class:`SizingConfig` is everything ``policy.decide`` reads (the
simulator builds one directly); :class:`AutoscalerConfig` is the loop around it (Prometheus, the
forecaster, the actuator, the metrics port). Both map one-to-one onto flags and environment
variables through ``common.config.add_config_args`` / ``build_config``:
``SizingConfig.ttft_slo_s`` is ``--ttft-slo-s`` and ``PDSERVE_SIZING_TTFT_SLO_S``;
``AutoscalerConfig.prometheus_url`` is ``--prometheus-url`` and ``PDSERVE_AUTOSCALER_PROMETHEUS_URL``.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.config import check_field_types
from common.errors import ConfigError


def _check(cond: bool, field: str, message: str) -> None:
    if not cond:
        raise ConfigError(message, field=field)


@dataclass(frozen=True)
class SizingConfig:
    """How many prefill and decode workers to run (read by ``autoscaler.policy.decide``)."""

    ttft_slo_s: float = 2.0
    """Time-to-first-token SLO (p90): sizes the prefill pool."""
    itl_slo_s: float = 0.1
    """Inter-token latency SLO (p90): sizes the decode pool."""
    target_utilization: float = 0.8
    """Fraction of one replica's capacity at the SLO to plan for (headroom for bursts and forecast error)."""
    prefill_chunk_tokens: int = 2048
    """The workers' token budget per engine step (max_num_batched_tokens): short prompts share a pass."""
    decode_max_batch_size: int = 128
    """Most requests in one decode worker's batch (the engines' max_num_requests)."""
    backlog_drain_s: float = 60.0
    """Queued prompt tokens should be cleared within this long: adds queued/backlog_drain_s tokens/s."""
    gpu_budget: int = 0
    """GPUs both pools may use together; 0 = no limit."""
    gpus_per_prefill: int = 1
    """GPUs one prefill worker uses (tensor parallel size)."""
    gpus_per_decode: int = 1
    """GPUs one decode worker uses. Role flips need both to be equal."""
    min_prefill: int = 1
    """Fewest prefill workers (0 allowed: decode workers then prefill locally)."""
    max_prefill: int = 8
    min_decode: int = 1
    """Fewest decode workers (at least 1: never scale to zero)."""
    max_decode: int = 8
    hysteresis: float = 0.2
    """Scale down only when demand with this much headroom fits in fewer replicas; rebalance a full
    budget only when it improves the worse role's share by more than this."""
    scale_up_cooldown_s: float = 60.0
    """Least time between a change of a role and the next increase of it."""
    scale_down_cooldown_s: float = 300.0
    """Least time between a change of a role and the next decrease of it (flips included)."""
    max_step: int = 2
    """Most replicas a role gains or loses in one decision."""
    slo_tolerance: float = 0.1
    """Observed p90 within (1 +- this) x the SLO counts as on target (no reactive correction)."""
    slo_correction_max: float = 4.0
    """Largest factor the reactive correction may multiply a role's demand by."""
    slo_correction_min: float = 1.0
    """Smallest factor (below 1 lets latency well under the SLO shrink a pool below the model's size)."""
    prefer_flips: bool = True
    """Move workers between roles (drain + switch, no restart) when one role shrinks while the other grows."""

    def __post_init__(self) -> None:
        check_field_types(self)
        for name in ("ttft_slo_s", "itl_slo_s", "backlog_drain_s"):
            _check(getattr(self, name) > 0, name, f"must be positive, got {getattr(self, name)}")
        _check(0 < self.target_utilization <= 1, "target_utilization",
               f"must be in (0, 1], got {self.target_utilization}")
        _check(self.prefill_chunk_tokens > 0, "prefill_chunk_tokens", "must be positive")
        _check(self.decode_max_batch_size > 0, "decode_max_batch_size", "must be positive")
        _check(self.gpu_budget >= 0, "gpu_budget", f"must be >= 0, got {self.gpu_budget}")
        _check(self.gpus_per_prefill > 0, "gpus_per_prefill", "must be positive")
        _check(self.gpus_per_decode > 0, "gpus_per_decode", "must be positive")
        _check(self.min_prefill >= 0, "min_prefill", f"must be >= 0, got {self.min_prefill}")
        _check(self.min_decode >= 1, "min_decode", f"must be >= 1 (never scale to zero), got {self.min_decode}")
        _check(self.max_prefill >= max(1, self.min_prefill), "max_prefill",
               f"must be >= max(1, min_prefill), got {self.max_prefill}")
        _check(self.max_decode >= self.min_decode, "max_decode", f"must be >= min_decode, got {self.max_decode}")
        _check(self.gpu_budget == 0
               or self.min_prefill * self.gpus_per_prefill + self.min_decode * self.gpus_per_decode
               <= self.gpu_budget, "gpu_budget", "must fit min_prefill and min_decode workers")
        _check(0 <= self.hysteresis < 1, "hysteresis", f"must be in [0, 1), got {self.hysteresis}")
        _check(self.scale_up_cooldown_s >= 0, "scale_up_cooldown_s", "must be >= 0")
        _check(self.scale_down_cooldown_s >= 0, "scale_down_cooldown_s", "must be >= 0")
        _check(self.max_step >= 1, "max_step", f"must be >= 1, got {self.max_step}")
        _check(0 <= self.slo_tolerance < 1, "slo_tolerance", "must be in [0, 1)")
        _check(self.slo_correction_max >= 1, "slo_correction_max", "must be >= 1")
        _check(0 < self.slo_correction_min <= 1, "slo_correction_min", "must be in (0, 1]")

    def bounds(self, role: str) -> tuple[int, int]:
        """(min, max) replicas of ``role``."""
        return (self.min_prefill, self.max_prefill) if role == "prefill" else (self.min_decode, self.max_decode)

    def gpus_per(self, role: str) -> int:
        return self.gpus_per_prefill if role == "prefill" else self.gpus_per_decode


ACTUATORS = ("kubernetes", "ray", "local")
FORECASTERS = ("holt", "last")


@dataclass(frozen=True)
class AutoscalerConfig:
    """Options of the autoscaler process (the policy's are in SizingConfig)."""

    prometheus_url: str = "http://127.0.0.1:9090"
    """Prometheus HTTP API that scrapes the router and the workers."""
    prometheus_timeout_s: float = 5.0
    """Deadline of one PromQL query."""
    served_model_name: str = ""
    """Only count series whose model label is this (default: every series). Routers label with their
    served model name, workers with their checkpoint directory's name: filter only where they agree."""
    rate_window_s: float = 60.0
    """Range of rate() and histogram_quantile() (at least 4 scrape intervals)."""
    interval_s: float = 15.0
    """How often to read, forecast and decide."""
    horizon_s: float = 60.0
    """How far ahead to forecast (about how long a new worker takes to become ready)."""
    forecaster: str = "holt"
    """holt (EWMA with trend) or last (the last observed value)."""
    holt_alpha: float = 0.5
    """Holt level smoothing (1 = follow each observation)."""
    holt_beta: float = 0.2
    """Holt trend smoothing (0 = no trend: a plain EWMA)."""
    cost_model: str = ""
    """JSON cost model written by `pdserve profile` (default: the router's demo_cpu.json)."""
    advisory: bool = False
    """Only report: log and export every decision, change nothing."""
    actuator: str = "kubernetes"
    """kubernetes, ray, or local (local only inside `pdserve up --autoscale`)."""
    metrics_host: str = "127.0.0.1"
    """Address of the /metrics endpoint (the pod IP in Kubernetes)."""
    metrics_port: int | None = 9400
    """Serve Prometheus /metrics on this port; none = off."""
    drain_timeout_s: float = 60.0
    """How long a role flip may wait for a worker's in-flight requests."""
    k8s_namespace: str = ""
    """Namespace of the worker Deployments (default: this pod's)."""
    k8s_prefill_deployment: str = "pdserve-prefill"
    k8s_decode_deployment: str = "pdserve-decode"
    kubeconfig: str = ""
    """Kubeconfig file outside a pod (default: in-cluster credentials, else ~/.kube/config)."""
    k8s_request_timeout_s: float = 10.0
    """Deadline of one Kubernetes API request."""
    k8s_conflict_retries: int = 3
    """Re-reads after a 409 Conflict before a scale fails."""
    ray_dashboard_url: str = "http://127.0.0.1:8265"
    """Ray actuator: the Ray dashboard (Serve REST API)."""
    ray_app_name: str = "pdserve"
    ray_prefill_deployment: str = "PrefillWorker"
    ray_decode_deployment: str = "DecodeWorker"

    def __post_init__(self) -> None:
        check_field_types(self)
        _check(self.prometheus_url.startswith(("http://", "https://")), "prometheus_url",
               f"must be an http(s) URL, got {self.prometheus_url!r}")
        for name in ("prometheus_timeout_s", "rate_window_s", "interval_s", "horizon_s", "drain_timeout_s",
                     "k8s_request_timeout_s"):
            _check(getattr(self, name) > 0, name, f"must be positive, got {getattr(self, name)}")
        _check(self.rate_window_s >= 1, "rate_window_s", "must be at least 1s")
        _check(self.forecaster in FORECASTERS, "forecaster", f"must be one of {FORECASTERS}")
        _check(0 < self.holt_alpha <= 1, "holt_alpha", f"must be in (0, 1], got {self.holt_alpha}")
        _check(0 <= self.holt_beta <= 1, "holt_beta", f"must be in [0, 1], got {self.holt_beta}")
        _check(self.actuator in ACTUATORS, "actuator", f"must be one of {ACTUATORS}, got {self.actuator!r}")
        _check(self.metrics_port is None or 0 <= self.metrics_port < 65536, "metrics_port",
               "must be in [0, 65535]")
        _check(self.k8s_conflict_retries >= 0, "k8s_conflict_retries", "must be >= 0")
        _check(bool(self.k8s_prefill_deployment), "k8s_prefill_deployment", "must not be empty")
        _check(bool(self.k8s_decode_deployment), "k8s_decode_deployment", "must not be empty")
