#!/usr/bin/env python3
"""Writes pdserve's Grafana dashboards (``deploy/grafana/pdserve-*.json``) from the panel lists below.

    python deploy/grafana/generate.py            # rewrite the JSON files
    python deploy/grafana/generate.py --check    # exit 1 when a file differs from what this writes

Edit the panels here, never the JSON; then run ``scripts/sync_chart_assets`` so the Helm chart
carries the new files. Every dashboard has a ``datasource`` variable (any Prometheus) and a
``model`` variable; every query is PromQL over the metrics of ``common/metrics.py``.
``tests/integration/test_dashboards.py`` runs each query against a Prometheus that scraped a
running pdserve and fails on one that returns nothing.

Conventions: rates use ``$__rate_interval``; latency percentiles are ``histogram_quantile`` over
the bucket rates summed ``by (le)`` (plus the panel's grouping labels); ``instance`` in legends is
the scrape target. Router metrics label ``model`` with the served model name, worker metrics with
the checkpoint directory's name, so the ``model`` variable lists both.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DS = {"type": "prometheus", "uid": "${datasource}"}
M = 'model=~"$model"'
GENERATION = 'endpoint=~"/v1/completions|/v1/chat/completions"'
NON_2XX, OK_2XX, OFFERED = 'status!~"2.."', 'status=~"2.."', 'status=~"2..|429|5.."'
PREFILL, DECODE = 'role="prefill"', 'role="decode"'
REMOTE = 'placement="remote"'
COMPLETED, FAILED, ERROR = 'outcome="completed"', 'outcome="failed"', 'outcome="error"'
QUANTILES = (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))

Panel = dict[str, Any]


# --- PromQL helpers ---------------------------------------------------------------------------------


def sel(*matchers: str) -> str:
    return "{" + ",".join(matchers) + "}"


def rate(metric: str, *matchers: str) -> str:
    return f"rate({metric}{sel(*matchers)}[$__rate_interval])"


def quantile(q: float, histogram: str, *matchers: str, by: str = "") -> str:
    labels = f"{by}, le" if by else "le"
    return f"histogram_quantile({q}, sum by ({labels}) ({rate(histogram + '_bucket', *matchers)}))"


def ratio(numerator: str, denominator: str) -> str:
    """numerator / denominator, with a numerator that has no series yet counting as 0 (a counter
    with extra labels, e.g. errors, exists only after its first increment)."""
    return f"({numerator} or vector(0))\n/\n{denominator}"


def target(expr: str, legend: str = "") -> dict[str, Any]:
    return {"datasource": DS, "editorMode": "code", "expr": expr, "legendFormat": legend or "__auto",
            "range": True}


def quantile_targets(histogram: str, *matchers: str, by: str = "") -> list[dict[str, Any]]:
    prefix = "".join(f"{{{{{label.strip()}}}}} " for label in by.split(",") if label.strip())
    return [target(quantile(q, histogram, *matchers, by=by), f"{prefix}{name}") for name, q in QUANTILES]


# --- panels -----------------------------------------------------------------------------------------


def timeseries(title: str, description: str, targets: list[dict[str, Any]], *, unit: str = "short",
               width: int = 12, height: int = 8, max_value: float | None = None,
               right_axis: tuple[str, ...] = ()) -> Panel:
    """``right_axis``: legends of series drawn against a second axis, in plain numbers."""
    defaults: dict[str, Any] = {
        "unit": unit, "min": 0,
        "custom": {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10, "showPoints": "never",
                   "spanNulls": False, "stacking": {"mode": "none", "group": "A"}},
    }
    if max_value is not None:
        defaults["max"] = max_value
    overrides = [{"matcher": {"id": "byName", "options": legend},
                  "properties": [{"id": "custom.axisPlacement", "value": "right"}, {"id": "unit", "value": "short"}]}
                 for legend in right_axis]
    return {"type": "timeseries", "title": title, "description": description, "datasource": DS,
            "targets": targets, "gridPos": {"w": width, "h": height},
            "fieldConfig": {"defaults": defaults, "overrides": overrides},
            "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                        "tooltip": {"mode": "multi", "sort": "desc"}}}


def stat(title: str, description: str, targets: list[dict[str, Any]], *, unit: str = "short",
         width: int = 4, thresholds: list[tuple[float | None, str]] | None = None) -> Panel:
    steps = [{"color": color, "value": value} for value, color in (thresholds or [(None, "green")])]
    return {"type": "stat", "title": title, "description": description, "datasource": DS,
            "targets": targets, "gridPos": {"w": width, "h": 4},
            "fieldConfig": {"defaults": {"unit": unit, "thresholds": {"mode": "absolute", "steps": steps}},
                            "overrides": []},
            "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                        "colorMode": "value", "graphMode": "area", "justifyMode": "auto", "textMode": "auto",
                        "orientation": "auto"}}


def row(title: str) -> Panel:
    return {"type": "row", "title": title, "collapsed": False, "panels": [], "gridPos": {"w": 24, "h": 1}}


def layout(panels: list[Panel]) -> list[Panel]:
    """Ids and refIds in order; grid positions left to right, wrapping at 24 columns; a row starts a new line."""
    x = y = line_height = 0
    out = []
    for number, panel in enumerate(panels, start=1):
        w, h = panel["gridPos"]["w"], panel["gridPos"]["h"]
        if panel["type"] == "row" or x + w > 24:
            x, y, line_height = 0, y + line_height, 0
        if "targets" in panel:
            panel = {**panel, "targets": [{**t, "refId": chr(ord("A") + i)} for i, t in enumerate(panel["targets"])]}
        out.append({"id": number, **panel, "gridPos": {"h": h, "w": w, "x": x, "y": y}})
        x, line_height = x + w, max(line_height, h)
        if panel["type"] == "row":
            x, y, line_height = 0, y + h, 0
    return out


# --- dashboards -------------------------------------------------------------------------------------


def datasource_variable() -> dict[str, Any]:
    return {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
            "current": {}, "hide": 0, "includeAll": False, "multi": False, "options": [], "refresh": 1,
            "regex": "", "skipUrlSync": False}


def query_variable(name: str, label: str, query: str, *, description: str) -> dict[str, Any]:
    return {"name": name, "label": label, "description": description, "type": "query", "datasource": DS,
            "definition": query, "query": {"query": query, "refId": f"{name}-variable"},
            "current": {}, "hide": 0, "includeAll": True, "allValue": ".*", "multi": True, "options": [],
            "refresh": 2, "regex": "", "sort": 1, "skipUrlSync": False}


MODEL_VARIABLE = query_variable(
    "model", "Model", 'label_values({__name__=~"pdserve_router_requests_total|pdserve_worker_role_info"}, model)',
    description="Routers label series with the served model name, workers with the checkpoint directory's name")


def dashboard(uid: str, title: str, description: str, panels: list[Panel],
              variables: tuple[dict[str, Any], ...] = ()) -> dict[str, Any]:
    return {
        "uid": uid, "title": title, "description": description, "tags": ["pdserve"],
        "schemaVersion": 39, "version": 1, "editable": True, "graphTooltip": 1, "timezone": "browser",
        "refresh": "30s", "time": {"from": "now-1h", "to": "now"}, "timepicker": {},
        "fiscalYearStartMonth": 0, "liveNow": False, "weekStart": "",
        "annotations": {"list": [{"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                                  "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
                                  "name": "Annotations & Alerts", "type": "dashboard"}]},
        "links": [{"title": "pdserve", "type": "dashboards", "tags": ["pdserve"], "asDropdown": True,
                   "includeVars": True, "keepTime": True, "icon": "external link", "targetBlank": False,
                   "tooltip": "", "url": ""}],
        "templating": {"list": [datasource_variable(), MODEL_VARIABLE, *variables]},
        "panels": layout(panels),
    }


REQUESTS = "pdserve_router_requests_total"
TTFT = "pdserve_router_time_to_first_token_seconds"
ITL = "pdserve_router_inter_token_latency_seconds"
E2E = "pdserve_router_e2e_request_latency_seconds"
ROUTE_DECISIONS = "pdserve_router_routing_decisions_total"


def overview() -> dict[str, Any]:
    requests = f"sum({rate(REQUESTS, M, GENERATION)})"
    panels = [
        row("Service level"),
        stat("Request rate", "Completion and chat requests per second, every status",
             [target(requests, "req/s")], unit="reqps"),
        stat("Errors", "Share of API requests answered with a non-2xx status (rejections included)",
             [target(ratio(f'sum({rate(REQUESTS, M, NON_2XX)})', f"sum({rate(REQUESTS, M)})"),
                     "non-2xx")], unit="percentunit", thresholds=[(None, "green"), (0.01, "orange"), (0.05, "red")]),
        stat("Rejected", "Share of generation requests the router refused before reaching a worker",
             [target(ratio(f"sum({rate('pdserve_router_rejections_total', M)})", requests), "rejected")],
             unit="percentunit", thresholds=[(None, "green"), (0.01, "orange"), (0.05, "red")]),
        stat("TTFT p90", "Time to first token, 90th percentile", [target(quantile(0.9, TTFT, M), "p90")], unit="s"),
        stat("ITL p90", "Inter-token latency, 90th percentile", [target(quantile(0.9, ITL, M), "p90")], unit="s"),
        stat("Healthy workers", "Workers the routers see healthy (load reports arriving), by role",
             [target(f'max by (role) (pdserve_router_workers{sel(M)})', "{{role}}")]),
        row("Traffic"),
        timeseries("Requests by endpoint and status", "API requests per second as answered by the routers",
                   [target(f"sum by (endpoint, status) ({rate(REQUESTS, M)})", "{{endpoint}} {{status}}")],
                   unit="reqps"),
        timeseries("Errors (non-2xx) by endpoint and status",
                   "Requests answered with a non-2xx status: 4xx are the client's (429: rejected), 5xx ours",
                   [target(f'sum by (endpoint, status) ({rate(REQUESTS, M, NON_2XX)})',
                           "{{endpoint}} {{status}}")], unit="reqps"),
        timeseries("Rejections by reason",
                   "Requests refused before reaching a worker: concurrency limit, predicted SLO miss "
                   "(ttft_slo, tbt_slo), KV capacity, no instances",
                   [target(f"sum by (reason) ({rate('pdserve_router_rejections_total', M)})", "{{reason}}")],
                   unit="reqps"),
        timeseries("Migrations", "Requests moved to another decode worker after theirs failed, per router",
                   [target(f"sum by (instance) ({rate('pdserve_router_migrations_total', M)})", "{{instance}}")],
                   unit="reqps"),
        row("Latency"),
        timeseries("Time to first token", "From request arrival at the router to its first token",
                   quantile_targets(TTFT, M), unit="s", width=8),
        timeseries("Inter-token latency", "Time between consecutive tokens of a streamed request",
                   quantile_targets(ITL, M), unit="s", width=8),
        timeseries("End-to-end latency", "From request arrival at the router to its last token",
                   quantile_targets(E2E, M), unit="s", width=8),
        row("Tokens and routing"),
        timeseries("Token throughput", "Prompt tokens admitted and tokens generated, per second",
                   [target(f"sum({rate('pdserve_router_prompt_tokens_total', M)})", "prompt"),
                    target(f"sum({rate('pdserve_router_generation_tokens_total', M)})", "generation")],
                   unit="short"),
        timeseries("Tokens per request", "Mean prompt and generated tokens per admitted (2xx) request",
                   [target(f"sum({rate('pdserve_router_prompt_tokens_total', M)})\n/\n"
                           f'sum({rate(REQUESTS, M, GENERATION, OK_2XX)})', "prompt"),
                    target(f"sum({rate('pdserve_router_generation_tokens_total', M)})\n/\n"
                           f'sum({rate(REQUESTS, M, GENERATION, OK_2XX)})', "generation")]),
        timeseries("Routing decisions by policy and placement",
                   "Where prefill runs: remote (a prefill worker, KV transferred) or local (on the decode worker)",
                   [target(f"sum by (policy, placement) ({rate(ROUTE_DECISIONS, M)})", "{{policy}} {{placement}}")],
                   unit="reqps"),
        timeseries("Remote prefill share", "Share of routing decisions that send the prefill to a prefill worker",
                   [target(ratio(f'sum({rate(ROUTE_DECISIONS, M, REMOTE)})',
                                 f"sum({rate(ROUTE_DECISIONS, M)})"), "remote")],
                   unit="percentunit", max_value=1),
    ]
    return dashboard("pdserve-overview", "pdserve / Overview",
                     "Requests, latency, errors and routing as the routers see them", panels)


def by_instance(metric: str, legend: str = "{{role}} {{instance}}") -> dict[str, Any]:
    return target(f"max by (role, instance) ({metric}{sel(M)})", legend)


def pools() -> dict[str, Any]:
    hits = "pdserve_worker_prefix_cache_hits_total"
    queries = "pdserve_worker_prefix_cache_queries_total"
    panels = [
        row("Pools"),
        stat("Prefill workers", "Prefill workers the routers see healthy",
             [target(f'max(pdserve_router_workers{sel(M, PREFILL)})', "prefill")]),
        stat("Decode workers", "Decode workers the routers see healthy",
             [target(f'max(pdserve_router_workers{sel(M, DECODE)})', "decode")],
             thresholds=[(None, "red"), (1, "green")]),
        stat("Decode KV usage", "Mean KV-cache usage of the decode workers",
             [target(f'avg(pdserve_worker_kv_cache_usage_ratio{sel(M, DECODE)})', "decode")],
             unit="percentunit", thresholds=[(None, "green"), (0.8, "orange"), (0.95, "red")]),
        stat("Queued prefill tokens", "Prompt tokens not yet computed, prefill pool",
             [target(f'sum(pdserve_worker_queued_prefill_tokens{sel(M, PREFILL)})', "prefill")]),
        stat("Waiting requests", "Requests waiting to be scheduled, all workers",
             [target(f"sum(pdserve_worker_num_requests_waiting{sel(M)})", "waiting")]),
        stat("Preemptions", "Requests preempted per second, all workers",
             [target(f"sum({rate('pdserve_worker_preemptions_total', M)})", "preempted/s")], unit="reqps",
             thresholds=[(None, "green"), (0.01, "orange")]),
        timeseries("Workers per role",
                   "Healthy as the routers see them (load reports arriving) against workers exporting metrics; "
                   "a gap means workers the routers cannot reach",
                   [target(f"max by (role) (pdserve_router_workers{sel(M)})", "{{role}} healthy (router)"),
                    target(f"count by (role) (pdserve_worker_role_info{sel(M)} == 1)", "{{role}} scraped")]),
        timeseries("Requests per role", "Running (in the batch), awaiting KV from a prefill worker, and waiting "
                   "requests, per role",
                   [target(f"sum by (role) (pdserve_worker_num_requests_running{sel(M)})", "{{role}} running"),
                    target(f"sum by (role) (pdserve_worker_num_requests_awaiting_kv{sel(M)})",
                           "{{role}} awaiting KV"),
                    target(f"sum by (role) (pdserve_worker_num_requests_waiting{sel(M)})", "{{role}} waiting")]),
        row("Workers"),
        timeseries("Running requests", "Requests in the running batch, per worker",
                   [by_instance("pdserve_worker_num_requests_running")]),
        timeseries("Waiting requests", "Requests waiting to be scheduled, per worker",
                   [by_instance("pdserve_worker_num_requests_waiting")]),
        timeseries("KV-cache usage", "Fraction of KV blocks held by requests (evictable prefix-cache blocks "
                   "count as free), per worker", [by_instance("pdserve_worker_kv_cache_usage_ratio")],
                   unit="percentunit", max_value=1),
        timeseries("Queued prefill tokens", "Prompt tokens not yet computed, per worker",
                   [by_instance("pdserve_worker_queued_prefill_tokens")]),
        timeseries("Engine step time", "Mean duration of the recent engine steps, per worker",
                   [by_instance("pdserve_worker_step_time_seconds")], unit="s"),
        timeseries("Prefix-cache hit rate", "Prompt tokens found in the prefix cache / prompt tokens looked up",
                   [target(f"sum by (role) ({rate(hits, M)})\n/\nsum by (role) ({rate(queries, M)})", "{{role}}")],
                   unit="percentunit", max_value=1),
        timeseries("Preemptions", "Requests preempted (to be recomputed) per second, per worker",
                   [target(f"sum by (role, instance) ({rate('pdserve_worker_preemptions_total', M)})",
                           "{{role}} {{instance}}")], unit="reqps"),
        timeseries("Prefix-cache lookups", "Prompt tokens looked up in the prefix cache and found there, per role",
                   [target(f"sum by (role) ({rate(queries, M)})", "{{role}} looked up"),
                    target(f"sum by (role) ({rate(hits, M)})", "{{role}} hit")]),
    ]
    return dashboard("pdserve-pools", "pdserve / Pools",
                     "Prefill and decode worker pools: sizes, queues, KV cache, step time, prefix cache", panels)


def kv_transfer() -> dict[str, Any]:
    transfers = "pdserve_kv_transfers_total"
    moved = "pdserve_kv_transfer_bytes_total"
    fallbacks = "pdserve_decode_local_prefill_fallbacks_total"
    consumed = f"sum({rate(transfers, M, DECODE)})"
    phase = "pdserve_request_phase_seconds"
    panels = [
        row("KV transfer"),
        stat("Throughput", "KV bytes moved per second into decode workers",
             [target(f"sum({rate(moved, M)})", "bytes/s")], unit="Bps", width=6),
        stat("Transfer p90", "KV transfer time, 90th percentile (reserving blocks to the last chunk applied)",
             [target(quantile(0.9, "pdserve_kv_transfer_seconds", M), "p90")], unit="s", width=6),
        stat("Failed transfers", "Share of KV transfers (decode side) that failed and were recomputed locally",
             [target(ratio(f"sum({rate(transfers, M, DECODE, FAILED)})", consumed),
                     "failed")], unit="percentunit", width=6, thresholds=[(None, "green"), (0.01, "orange"),
                                                                          (0.1, "red")]),
        stat("Fallbacks", "Remote prefills recomputed on the decode worker, per second",
             [target(f"sum({rate(fallbacks, M)})", "fallbacks/s")], unit="reqps", width=6,
             thresholds=[(None, "green"), (0.01, "orange")]),
        timeseries("Transfer throughput", "KV payload bytes moved per second, per decode worker",
                   [target(f"sum by (instance) ({rate(moved, M)})", "{{instance}}")], unit="Bps"),
        timeseries("Transfer latency", "From reserving blocks to the last KV chunk applied (decode side)",
                   quantile_targets("pdserve_kv_transfer_seconds", M), unit="s"),
        timeseries("Transfers by outcome", "KV transfers per second by side (role) and outcome",
                   [target(f"sum by (role, outcome) ({rate(transfers, M)})", "{{role}} {{outcome}}")],
                   unit="reqps"),
        timeseries("Mean transfer size", "KV bytes per completed transfer",
                   [target(f"sum({rate(moved, M)})\n/\n"
                           f"sum({rate(transfers, M, DECODE, COMPLETED)})", "bytes")],
                   unit="bytes"),
        row("Prefill placement"),
        timeseries("Local-prefill fallbacks by reason",
                   "Remote prefills that failed and were recomputed on the decode worker (timeout, unavailable, "
                   "refused, stream_broken, checksum, incomplete)",
                   [target(f"sum by (reason) ({rate(fallbacks, M)})", "{{reason}}")], unit="reqps", width=8),
        timeseries("Local prefills by design", "Prompts a decode worker prefilled itself by design (no_target: the "
                   "router chose local; short; cached)",
                   [target(f"sum by (reason) ({rate('pdserve_decode_local_prefills_total', M)})", "{{reason}}")],
                   unit="reqps", width=8),
        timeseries("Prefill placement (router)", "Routing decisions by where the prefill runs",
                   [target(f"sum by (placement) ({rate(ROUTE_DECISIONS, M)})", "{{placement}}")],
                   unit="reqps", width=8),
        row("Request phases"),
        timeseries("Phase latency p90", "router_queue: arrival to dispatch (router); prefill: arrival at the "
                   "decode worker to its first token; kv_transfer: the KV fetch; decode: first token to the last",
                   [target(quantile(0.9, phase, M, by="phase"), "{{phase}}")], unit="s", width=8),
        timeseries("Phase latency p99", "As p90, 99th percentile",
                   [target(quantile(0.99, phase, M, by="phase"), "{{phase}}")], unit="s", width=8),
        timeseries("Mean phase latency", "Mean time per request in each phase",
                   [target(f"sum by (phase) ({rate(phase + '_sum', M)})\n/\n"
                           f"sum by (phase) ({rate(phase + '_count', M)})", "{{phase}}")], unit="s", width=8),
    ]
    return dashboard("pdserve-kv-transfer", "pdserve / KV transfer",
                     "KV transfers between prefill and decode workers, prefill placement and per-phase latency",
                     panels)


def autoscaler() -> dict[str, Any]:
    a = 'instance=~"$autoscaler"'

    def signal(gauge: str, name: str) -> str:
        matcher = f'signal="{name}"'
        return f"max(pdserve_autoscaler_{gauge}_value{sel(a, matcher)})"

    def observed_vs_predicted(*names: str) -> list[dict[str, Any]]:
        out = []
        for name in names:
            out += [target(signal("observed", name), f"{name} observed"),
                    target(signal("predicted", name), f"{name} predicted")]
        return out

    panels = [
        row("Decisions"),
        stat("Advisory", "1: the autoscaler only reports its decisions, it changes nothing",
             [target(f"max(pdserve_autoscaler_advisory{sel(a)})", "advisory")]),
        stat("Since last decision", "Seconds since the last decision (a stuck loop grows without bound)",
             [target(f"time() - max(pdserve_autoscaler_last_decision_timestamp_seconds{sel(a)})", "age")],
             unit="s", thresholds=[(None, "green"), (120, "orange"), (600, "red")]),
        stat("Desired prefill", "Prefill replicas the last decision wants",
             [target(f'max(pdserve_autoscaler_desired_replicas{sel(a, PREFILL)})', "prefill")]),
        stat("Desired decode", "Decode replicas the last decision wants",
             [target(f'max(pdserve_autoscaler_desired_replicas{sel(a, DECODE)})', "decode")]),
        stat("Signal errors", "Intervals without a usable signal per minute (sizes held)",
             [target(f"sum({rate('pdserve_autoscaler_signal_errors_total', a)}) * 60", "errors/min")],
             thresholds=[(None, "green"), (0.5, "orange")]),
        stat("Actuation errors", "Failed changes sent to the actuator per minute",
             [target(f"(sum({rate('pdserve_autoscaler_actuations_total', a, ERROR)}) or vector(0)) * 60",
                     "errors/min")],
             thresholds=[(None, "green"), (0.1, "red")]),
        timeseries("Desired vs actual replicas", "What the last decision wants against what the actuator "
                   "reports it runs, per role",
                   [target(f"max by (role) (pdserve_autoscaler_desired_replicas{sel(a)})", "{{role}} desired"),
                    target(f"max by (role) (pdserve_autoscaler_actual_replicas{sel(a)})", "{{role}} actual")]),
        timeseries("Demand in replicas", "Fractional replicas the predicted load needs, before hysteresis, "
                   "bounds and budget, per role",
                   [target(f"max by (role) (pdserve_autoscaler_demand_replicas{sel(a)})", "{{role}} demand"),
                    target(f"max by (role) (pdserve_router_workers{sel(M)})", "{{role}} healthy (router)")]),
        timeseries("Decisions by action and cause", "Sizing decisions per interval: hold, scale, flip; and why",
                   [target(f"sum by (action, cause) (increase(pdserve_autoscaler_decisions_total{sel(a)}"
                           "[$__rate_interval]))", "{{action}} {{cause}}")]),
        timeseries("Actuations by kind and outcome", "Changes sent to the actuator: scale_up, scale_down, flip; "
                   "ok, error, fallback (cannot flip, scaled instead)",
                   [target(f"sum by (role, kind, outcome) (increase(pdserve_autoscaler_actuations_total{sel(a)}"
                           "[$__rate_interval]))", "{{role}} {{kind}} {{outcome}}")]),
        row("Signals"),
        timeseries("Request rate", "Offered requests per second: as the autoscaler read it from Prometheus, "
                   "as it predicted one horizon ahead, and as the routers count it now",
                   [*observed_vs_predicted("request_rate"),
                    target(f'sum({rate(REQUESTS, M, GENERATION, OFFERED)})', "routers")],
                   unit="reqps", width=8),
        timeseries("Tokens per request", "Mean prompt and output tokens per admitted request, observed and "
                   "predicted", observed_vs_predicted("prompt_tokens_mean", "output_tokens_mean"), width=8),
        timeseries("Prefix hit rate", "Fraction of prompt tokens found in the prefill workers' prefix caches",
                   observed_vs_predicted("prefix_hit_rate"), unit="percentunit", max_value=1, width=8),
        timeseries("Observed latency", "p90 TTFT and ITL as the autoscaler read them (the SLO correction "
                   "compares them with the SLOs)",
                   [target(signal("observed", "ttft_p90_s"), "TTFT p90"),
                    target(signal("observed", "itl_p90_s"), "ITL p90")], unit="s", width=8),
        timeseries("SLO correction", "Reactive SLO-drift correction of each role's demand (1 = none)",
                   [target(f"max by (role) (pdserve_autoscaler_slo_correction_ratio{sel(a)})", "{{role}}")],
                   width=8),
        timeseries("Signal errors by reason", "Intervals without a usable signal: unreachable, warming_up, "
                   "missing_<signal>",
                   [target(f"sum by (reason) (increase(pdserve_autoscaler_signal_errors_total{sel(a)}"
                           "[$__rate_interval]))", "{{reason}}")], width=8),
        timeseries("Observed pool load", "Running and waiting requests per role as the autoscaler read them",
                   [target(signal("observed", f"num_{kind}_{role}"), f"{role} {kind}")
                    for role in ("prefill", "decode") for kind in ("running", "waiting")], width=8),
        timeseries("Observed KV usage and backlog", "Mean KV-cache usage per role; queued prefill tokens on the "
                   "right axis",
                   [target(signal("observed", "kv_usage_prefill"), "prefill KV usage"),
                    target(signal("observed", "kv_usage_decode"), "decode KV usage"),
                    target(signal("observed", "num_queued_prefill_tokens"), "queued prefill tokens")],
                   unit="percentunit", width=8, right_axis=("queued prefill tokens",)),
        timeseries("Replica capacity", "One replica's capacity at the SLO: uncached prompt tokens/s (prefill), "
                   "concurrent requests (decode)",
                   [target(f"max by (role) (pdserve_autoscaler_replica_capacity{sel(a)})", "{{role}}")], width=8),
    ]
    variable = query_variable(
        "autoscaler", "Autoscaler", "label_values(pdserve_autoscaler_observed_value, instance)",
        description="The autoscaler's scrape target (its metrics carry no model label)")
    return dashboard("pdserve-autoscaler", "pdserve / Autoscaler",
                     "Pool sizing: desired against actual replicas, demand, signals read and predicted, decisions "
                     "and actuations", panels, (variable,))


DASHBOARDS = {"pdserve-overview.json": overview, "pdserve-pools.json": pools,
              "pdserve-kv-transfer.json": kv_transfer, "pdserve-autoscaler.json": autoscaler}


def render() -> dict[str, str]:
    return {name: json.dumps(build(), indent=2) + "\n" for name, build in DASHBOARDS.items()}


def main(argv: list[str]) -> int:
    stale = []
    for name, text in render().items():
        path = HERE / name
        if path.exists() and path.read_text() == text:
            continue
        if "--check" in argv:
            stale.append(name)
        else:
            path.write_text(text)
            print(f"wrote {path.relative_to(HERE.parent.parent)}")
    for name in stale:
        print(f"stale: deploy/grafana/{name} (run python deploy/grafana/generate.py)", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
