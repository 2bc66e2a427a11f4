"""The Grafana dashboards' queries, filled in as Grafana would and run against a real Prometheus.

Shared by the dashboard test (its own small cluster) and the autoscaler end-to-end test (a
``pdserve up --autoscale``): every query of every dashboard must return data.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cli.prometheus import LocalPrometheus

ROOT = Path(__file__).resolve().parents[1]
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARDS = ("pdserve-overview.json", "pdserve-pools.json", "pdserve-kv-transfer.json", "pdserve-autoscaler.json")
RATE_INTERVAL = "30s"


def dashboard(name: str) -> dict[str, Any]:
    return json.loads((GRAFANA / name).read_text())


def panel_targets(board: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(panel title, PromQL) of every target, rows' nested panels included."""
    for panel in board["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            for t in inner.get("targets", []):
                yield inner["title"], t["expr"]


def grafana_regex_value(value: str) -> str:
    """A variable's value as Grafana writes it into a ``=~"..."`` matcher (regex characters escaped
    for the regex, and the backslash escaped again for the PromQL string)."""
    return re.sub(r"[$^*{}\[\]'+?.()|\\]", lambda m: "\\\\" + m.group(0), value)


def fill_variables(expr: str, autoscaler_target: str, model: str) -> str:
    return (expr.replace("$__rate_interval", RATE_INTERVAL).replace("$model", grafana_regex_value(model))
            .replace("$autoscaler", grafana_regex_value(autoscaler_target)))


def query_finite(prometheus: LocalPrometheus, expr: str) -> tuple[bool, str]:
    """(has at least one finite sample, what came back)."""
    data = prometheus.query(expr)
    if data["resultType"] == "scalar":
        samples = [data["result"]]
    else:
        samples = [s["value"] for s in data["result"]]
    values = [float(v[1]) for v in samples]
    return any(math.isfinite(v) for v in values), f"{len(values)} samples {values[:4]}"


def dashboard_queries(names: tuple[str, ...], autoscaler_target: str, model: str) -> list[tuple[str, str, str]]:
    return [(name, title, fill_variables(expr, autoscaler_target, model))
            for name in names for title, expr in panel_targets(dashboard(name))]


def empty_queries(prometheus: LocalPrometheus, queries: list[tuple[str, str, str]]) -> list[str]:
    out = []
    for name, title, expr in queries:
        ok, got = query_finite(prometheus, expr)
        if not ok:
            out.append(f"{name} / {title}: {expr}  -> {got}")
    return out
