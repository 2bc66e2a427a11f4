"""The Grafana dashboards and Prometheus rules of ``deploy/`` against a running pdserve.

A real cluster on the demo model (one prefill and two decode workers with ``--metrics-port``, a
router with a small ``--max-concurrency``), a real Prometheus (``tests/prometheus_server.py``)
scraping them every second with ``deploy/prometheus/*.yaml`` loaded, and ``pdserve autoscaler``
reading that Prometheus. The autoscaler runs its Ray Serve actuator against a stub of Serve's REST
API (``tests.fake_ray_serve.FakeServe``), so it decides and actuates without scaling anything: advisory mode would
leave its actuation metrics empty, and ``--actuator local`` is reserved to ``pdserve up``.

Load (openai client and httpx through the router, streaming and not, completions and chat) runs
for the whole module; besides it, once each: a burst over ``--max-concurrency`` (429s, rejection
reason ``concurrency``), bad requests (400, 404), a remote prefill from a dead peer (a
local-prefill fallback) and a decode worker flipped away mid-stream and back (a migration).

Then every target of every dashboard panel is run through Prometheus's ``/api/v1/query`` with
Grafana's variables filled in (``$__rate_interval`` -> 30s, ``$model`` -> the demo model,
``$autoscaler`` -> the autoscaler's target); each must return at least one finite sample, and so
must every recording rule. A failure names the dashboard, the panel and the query.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest
import yaml

from cli.processes import Proc, ServerProcess, pdserve, worker
from cli.prometheus import find_prometheus
from common.rpc import worker_pb2 as pb
from common.rpc import worker_pb2_grpc as pb_grpc
from tests.dashboard_queries import (
    DASHBOARDS,
    GRAFANA,
    dashboard,
    dashboard_queries,
    empty_queries,
    query_finite,
)
from tests.fake_ray_serve import FakeServe
from tests.grpc_clients import generate, load, metric_value
from tests.prometheus_server import PROMETHEUS, PrometheusServer, free_port

ROOT = Path(__file__).resolve().parents[2]
RULES = sorted((ROOT / "deploy" / "prometheus").glob("*.yaml"))
MODEL = "demo"  # the checkpoint directory's name: routers and workers label series with it
WARM_TIMEOUT_S = 75.0
WORKER = ["--num-blocks", "1024", "--max-num-batched-tokens", "512"]
MAX_CONCURRENCY = 6
# the Serve application the autoscaler's Ray actuator sees; the stub answers for it
RAY_APP, RAY_DEPLOYMENTS = "pdserve", {"prefill": "PrefillWorker", "decode": "DecodeWorker"}


def load_generator():
    spec = importlib.util.spec_from_file_location("pdserve_grafana_generate", GRAFANA / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def recording_rules() -> list[str]:
    doc = yaml.safe_load((ROOT / "deploy" / "prometheus" / "recording-rules.yaml").read_text())
    return [rule["record"] for group in doc["groups"] for rule in group["rules"]]


# --- static checks (no processes) -------------------------------------------------------------------


def test_dashboards_are_generated_and_well_formed():
    generated = load_generator().render()
    assert sorted(generated) == sorted(DASHBOARDS)
    uids = set()
    for name in DASHBOARDS:
        assert (GRAFANA / name).read_text() == generated[name], f"{name} is stale: run deploy/grafana/generate.py"
        board = dashboard(name)
        assert board["uid"] not in uids and board["title"] and 36 <= board["schemaVersion"] <= 41, name
        uids.add(board["uid"])
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
        assert variables["model"]["type"] == "query"
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids)), name
        for panel in board["panels"]:
            pos = panel["gridPos"]
            assert pos["x"] + pos["w"] <= 24, (name, panel["title"])
            if panel["type"] == "row":
                continue
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, (name, panel["title"])
            assert panel["targets"] and panel["description"], (name, panel["title"])
            ref_ids = [t["refId"] for t in panel["targets"]]
            assert len(ref_ids) == len(set(ref_ids)), (name, panel["title"])
            for t in panel["targets"]:
                assert t["datasource"]["uid"] == "${datasource}" and t["expr"].strip(), (name, panel["title"])
                ranges = set(re.findall(r"\[([^\]]*)\]", t["expr"]))
                assert ranges <= {"$__rate_interval"}, (name, panel["title"], "range selectors use $__rate_interval")


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not found (apt-get install prometheus)")
    return path


def test_rules_pass_promtool_check():
    result = subprocess.run([_promtool(), "check", "rules", *map(str, RULES)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# promtool unit tests of the alerts whose logic is not a plain threshold
ALERT_UNIT_TESTS = """
rule_files: {rule_files}
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'up{{job="decode", instance="10.0.0.5:9090"}}'
        values: '1 1 1 0x10'
      - series: 'up{{job="decode", instance="10.0.0.6:9090"}}'
        values: '1x13'
      - series: 'pdserve_worker_role_info{{job="decode", instance="10.0.0.5:9090", model="m", role="decode"}}'
        values: '1 1 1'
      - series: 'pdserve_worker_role_info{{job="decode", instance="10.0.0.6:9090", model="m", role="decode"}}'
        values: '1x13'
      - series: 'up{{job="unrelated", instance="10.0.0.9:80"}}'
        values: '0x13'
      # an autoscaler that has not decided yet exports 0 (AutoscalerStuck must not fire on it)
      - series: 'pdserve_autoscaler_last_decision_timestamp_seconds{{job="autoscaler", instance="10.0.2.1:9090", actuator="kubernetes"}}'
        values: '0x13'
      - series: 'pdserve_router_workers{{job="router", instance="10.0.1.1:8000", model="m", role="decode"}}'
        values: '2 1 0x11'
    alert_rule_test:
      - eval_time: 6m
        alertname: PdserveWorkerDown
        exp_alerts:
          - exp_labels: {{severity: warning, job: decode, instance: "10.0.0.5:9090"}}
            exp_annotations:
              summary: "pdserve worker 10.0.0.5:9090 (decode) is down"
              description: >-
                Prometheus has failed to scrape the pdserve worker 10.0.0.5:9090 of job decode for 2 minutes:
                the process is gone, hung or unreachable. Its in-flight requests migrate to other decode
                workers; check the pod's restarts and logs.
      - eval_time: 10m
        alertname: PdserveAutoscalerStuck
        exp_alerts: []
      - eval_time: 4m
        alertname: PdserveNoHealthyDecodeWorkers
        exp_alerts:
          - exp_labels: {{severity: critical, job: router, instance: "10.0.1.1:8000", model: m, role: decode}}
            exp_annotations:
              summary: "m: router 10.0.1.1:8000 sees no healthy decode worker"
              description: >-
                Router 10.0.1.1:8000 has received no load report from any decode worker of m for a minute:
                every generation request fails with 503.
"""


def test_alerts_pass_promtool_unit_tests(tmp_path):
    tests = tmp_path / "alerts_test.yaml"
    tests.write_text(ALERT_UNIT_TESTS.format(rule_files=json.dumps([str(p) for p in RULES])))
    result = subprocess.run([_promtool(), "test", "rules", str(tests)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# --- the running stack ------------------------------------------------------------------------------


def with_rules(prometheus: PrometheusServer, rule_files: list[Path]) -> PrometheusServer:
    """Adds ``rule_files`` to a PrometheusServer's config before it starts (evaluated every scrape interval)."""
    config = json.loads(prometheus.config_path.read_text())
    config["rule_files"] = [str(p) for p in rule_files]
    prometheus.config_path.write_text(json.dumps(config, indent=2))
    return prometheus


@dataclass
class Stack:
    router: Proc
    prefill: Proc
    decodes: list[Proc]
    prometheus: PrometheusServer
    autoscaler_target: str
    ray: FakeServe
    dead_peer: str
    events: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def api(self) -> str:
        return f"{self.router.address}/v1"


def _wait_router_sees(url: str, prefill: int, decode: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            text = httpx.get(f"{url}/metrics", timeout=2).text
            if (metric_value(text, "pdserve_router_workers", role="prefill") == prefill
                    and metric_value(text, "pdserve_router_workers", role="decode") == decode):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"the router at {url} does not see {prefill} prefill + {decode} decode workers")


class Autoscaler(ServerProcess):
    """``pdserve autoscaler`` as a process (it prints no PDSERVE_READY line: ready once /metrics answers)."""

    name = "pdserve autoscaler"

    def __init__(self, workdir: Path, args: list[str], metrics_port: int) -> None:
        super().__init__(workdir, workdir / "autoscaler.log", sys.executable)
        self.args, self.port = args, metrics_port  # the port Prometheus already scrapes

    def command(self) -> list[str]:
        return [self.binary, "-m", "cli.main", "autoscaler", *self.args, "--metrics-port", str(self.port)]

    def ready(self) -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{self.port}/metrics", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False


# --- load ---------------------------------------------------------------------------------------------

# a shared prefix gives prefix-cache hits; the tails keep most of each prompt uncached, so the router
# sends it to the prefill worker (its mirror of local_prefill_max_tokens is 32 uncached tokens)
SHARED = "The prefill side produces KV and the decode side consumes it. " * 12
WORDS = ("block", "request", "router", "worker", "decode", "prefill", "cache", "token", "batch", "stream",
         "transfer", "policy")


def _tail(i: int, n: int) -> str:
    return " ".join(WORDS[(i * 7 + k * 5) % len(WORDS)] + str((i + k) % 97) for k in range(n))


def _one_request(client: openai.OpenAI, i: int) -> None:
    kind = i % 4
    if kind == 0:  # long prompt, streamed: remote prefill, KV transfer, ITL
        stream = client.completions.create(model=MODEL, prompt=SHARED + _tail(i, 40), max_tokens=12,
                                           temperature=0, stream=True, extra_body={"ignore_eos": True})
        for _ in stream:
            pass
    elif kind == 1:  # short prompt: prefilled on the decode worker by design
        client.completions.create(model=MODEL, prompt=f"hello {i}", max_tokens=8, temperature=0)
    elif kind == 2:  # chat, streamed
        stream = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": SHARED + _tail(i, 30)}], max_tokens=10,
            temperature=0, stream=True)
        for _ in stream:
            pass
    else:  # a longer unique prompt, not streamed
        client.completions.create(model=MODEL, prompt=_tail(i, 120), max_tokens=6, temperature=0)


def _background_load(api: str, stop: threading.Event, counts: dict[str, int], seed: int) -> None:
    client = openai.OpenAI(base_url=api, api_key="none", max_retries=0, timeout=60)
    i = seed
    while not stop.is_set():
        try:
            _one_request(client, i)
            counts["ok"] += 1
        except openai.APIStatusError as e:  # 429s from the small concurrency limit or the SLO predictor
            counts[str(e.status_code)] = counts.get(str(e.status_code), 0) + 1
            time.sleep(0.2)
        i += 2


def _burst_over_concurrency(api: str) -> list[int]:
    """More concurrent requests than --max-concurrency: the excess gets 429 (reason concurrency)."""
    def one(i: int) -> int:
        r = httpx.post(f"{api}/completions", timeout=60, json={
            "model": MODEL, "prompt": f"burst {i}", "max_tokens": 48, "ignore_eos": True})
        return r.status_code

    with ThreadPoolExecutor(3 * MAX_CONCURRENCY) as pool:
        return list(pool.map(one, range(3 * MAX_CONCURRENCY)))


def _bad_requests(api: str) -> list[int]:
    return [httpx.post(f"{api}/completions", timeout=10, json=body).status_code for body in (
        {"model": MODEL, "prompt": "x", "max_tokens": -1},
        {"model": "no-such-model", "prompt": "x", "max_tokens": 4})]


def _fallback_from_dead_peer(decode: Proc, dead_peer: str) -> pb.PrefillInfo:
    """A remote prefill asked of a peer that does not answer: the decode worker recomputes it."""
    from tests.hf_reference import random_prompts

    prompt = random_prompts([200], 2048, seed=3)[0]
    return generate(decode.address, "dashboards-fallback", prompt, prefill=dead_peer, timeout=60).info


def _migration(api: str, router: str, decodes: list[Proc]) -> tuple[str | None, float]:
    """Flip the decode worker serving a stream to prefill, aborting it (the router migrates the
    request to the other decode worker), then flip it back. Returns (the stream's finish reason,
    the router's migrations counter)."""
    client = openai.OpenAI(base_url=api, api_key="none", max_retries=0, timeout=120)
    stream = client.completions.create(model=MODEL, prompt="Migration moves a request", max_tokens=200,
                                       temperature=0, stream=True, extra_body={"ignore_eos": True})
    finish, flipped = None, False
    for n, chunk in enumerate(stream):
        finish = chunk.choices[0].finish_reason or finish
        if n == 20:
            busy = [d for d in decodes if load(d.address).num_running > 0]
            assert len(busy) == 1, "the stream should run on exactly one decode worker"
            _set_role(busy[0].address, "prefill", drain_timeout_s=0.01)
            _set_role(busy[0].address, "decode", drain_timeout_s=5.0)
            flipped = True
    assert flipped
    return finish, metric_value(httpx.get(f"{router}/metrics", timeout=5).text, "pdserve_router_migrations_total")


def _set_role(address: str, role: str, drain_timeout_s: float) -> pb.SetRoleResponse:
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.WorkerAdminStub(channel).SetRole(
            pb.SetRoleRequest(role=role, drain_timeout_s=drain_timeout_s), timeout=drain_timeout_s + 10)


# --- queries ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    binary = find_prometheus()
    if binary is None:
        pytest.skip(f"prometheus not found at {PROMETHEUS} or on PATH (apt-get install prometheus)")
    from engine.demo_model import write_demo_model

    started = time.monotonic()
    timings: dict[str, float] = {}
    events: dict[str, Any] = {}
    work = tmp_path_factory.mktemp("dashboards")
    model_dir = write_demo_model(work / MODEL)
    # every worker's gRPC port is picked up front and every worker is a peer of the decode workers,
    # so the decode worker flipped to prefill for the migration is a prefill peer while it lasts
    ports: list[int] = []
    while len(ports) < 7:
        port = free_port()
        ports += [] if port in ports else [port]
    prefill_port, decode_ports, dead_port, metrics_ports = ports[0], ports[1:3], ports[3], ports[4:]
    dead_peer = f"127.0.0.1:{dead_port}"
    peers = ",".join([f"127.0.0.1:{p}" for p in (prefill_port, *decode_ports)] + [dead_peer])
    procs: list[Proc] = []
    autoscaler: Autoscaler | None = None
    ray = FakeServe({RAY_DEPLOYMENTS[r]: n for r, n in (("prefill", 1), ("decode", 2))}, app=RAY_APP)
    stop = threading.Event()
    threads: list[threading.Thread] = []
    prometheus = None
    try:
        with ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(worker, "prefill", model_dir, work, *WORKER, "--port", str(prefill_port),
                                   "--metrics-port", str(metrics_ports[0]))]
            futures += [pool.submit(worker, "decode", model_dir, work, *WORKER, "--port", str(decode_ports[i]),
                                    "--prefill-peers", peers, "--metrics-port", str(metrics_ports[1 + i]),
                                    name=f"decode{i}") for i in range(2)]
            results = [f.exception() or f.result() for f in futures]
        procs += [r for r in results if isinstance(r, Proc)]
        for r in results:
            if isinstance(r, BaseException):
                raise r
        prefill, *decodes = results
        workers = f"prefill={prefill.address};decode={','.join(d.address for d in decodes)}"
        router = pdserve(["router", "--model", str(model_dir), "--port", "0", "--workers", workers,
                          "--max-concurrency", str(MAX_CONCURRENCY), "--no-local-prefill-by-cost"],
                         work / "router.log")
        procs.append(router)
        timings["processes_ready_s"] = time.monotonic() - started

        autoscaler_port = free_port()
        autoscaler_target = f"127.0.0.1:{autoscaler_port}"
        prometheus = with_rules(PrometheusServer(work / "prometheus", {
            "pdserve-router": [router.address.removeprefix("http://")],
            # the last target is a worker that is not there: PdserveWorkerDown must see it
            "pdserve-workers": [f"127.0.0.1:{p}" for p in metrics_ports] + [dead_peer],
            "pdserve-autoscaler": [autoscaler_target],
        }, binary=binary), RULES)
        prometheus.start()
        # min = max = 3 decode replicas against the stub's 2: the first decision actuates a scale-up
        autoscaler = Autoscaler(work, ["--prometheus-url", prometheus.url, "--interval-s", "1", "--rate-window-s", "8",
                                       "--horizon-s", "5", "--actuator", "ray", "--ray-dashboard-url", ray.url,
                                       "--ray-app-name", RAY_APP, "--no-advisory", "--min-decode", "3",
                                       "--max-decode", "3", "--max-prefill", "2", "--scale-up-cooldown-s", "0",
                                       "--scale-down-cooldown-s", "0"], autoscaler_port)
        autoscaler.start(timeout_s=60)
        _wait_router_sees(router.address, 1, 2)
        # one scrape of every live target before the one-off events: their counters' 0 is on record
        prometheus.wait_for('count(up{job=~"pdserve-router|pdserve-workers"} == 1)', lambda v: v >= 4)
        cluster = Stack(router, prefill, decodes, prometheus, autoscaler_target, ray, dead_peer, events, timings)

        cluster.events["migration"] = _migration(cluster.api, router.address, decodes)
        _wait_router_sees(router.address, 1, 2)
        counts: dict[str, int] = {"ok": 0}
        cluster.events["load"] = counts
        threads = [threading.Thread(target=_background_load, args=(cluster.api, stop, counts, seed), daemon=True)
                   for seed in range(2)]
        for t in threads:
            t.start()
        cluster.events["burst"] = _burst_over_concurrency(cluster.api)
        cluster.events["bad_requests"] = _bad_requests(cluster.api)
        cluster.events["fallback"] = _fallback_from_dead_peer(decodes[0], dead_peer)
        timings["events_done_s"] = time.monotonic() - started

        # wait until every query has data (rates need two samples in the window; the autoscaler's
        # signals need one rate window of warm-up); the tests then report what is still empty
        queries = dashboard_queries(DASHBOARDS, autoscaler_target, MODEL)
        queries += [("recording-rules.yaml", record, record) for record in recording_rules()]
        deadline = time.monotonic() + WARM_TIMEOUT_S
        while empty_queries(prometheus, queries) and time.monotonic() < deadline:
            time.sleep(1.0)
        timings["warm_s"] = time.monotonic() - started
        yield cluster
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        if autoscaler is not None:
            autoscaler.stop(timeout_s=15)
        for p in reversed(procs):  # router, then the workers
            p.stop(timeout=15)
        if prometheus is not None:
            prometheus.stop()
        ray.close()
        timings["total_s"] = time.monotonic() - started
        print(f"\ntest_dashboards timings: {timings}")
        print(f"test_dashboards events: {events}")


def test_the_load_did_what_the_dashboards_need(stack):
    """The one-off events happened as designed (else an empty panel would be a load problem)."""
    assert stack.events["migration"] == ("length", 1.0), stack.events["migration"]
    assert 429 in stack.events["burst"] and 200 in stack.events["burst"], stack.events["burst"]
    assert stack.events["bad_requests"] == [400, 404]
    assert stack.events["fallback"].mode == pb.PrefillInfo.MODE_FALLBACK, stack.events["fallback"]
    assert stack.events["load"]["ok"] >= 20, stack.events["load"]


@pytest.mark.parametrize("name", DASHBOARDS[:3])
def test_every_dashboard_query_returns_data(stack, name):
    empty = empty_queries(stack.prometheus, dashboard_queries((name,), stack.autoscaler_target, MODEL))
    assert not empty, "queries without data:\n" + "\n".join(empty)


def test_autoscaler_dashboard_returns_data(stack):
    empty = empty_queries(stack.prometheus, dashboard_queries(("pdserve-autoscaler.json",), stack.autoscaler_target, MODEL))
    assert not empty, "queries without data:\n" + "\n".join(empty)
    assert (RAY_DEPLOYMENTS["decode"], 3) in stack.ray.scaled, f"the autoscaler never actuated its bound: {stack.ray.scaled}"


def test_template_variables_list_the_model_and_the_autoscaler(stack):
    def label_values(query: str) -> list[str]:
        m = re.fullmatch(r"label_values\((.+), (\w+)\)", query)
        assert m, query
        r = httpx.get(f"{stack.prometheus.url}/api/v1/label/{m.group(2)}/values", params={"match[]": m.group(1)})
        r.raise_for_status()
        return r.json()["data"]

    for name in DASHBOARDS:
        for variable in dashboard(name)["templating"]["list"]:
            if variable["type"] != "query":
                continue
            values = label_values(variable["query"]["query"])
            want = {"model": MODEL, "autoscaler": stack.autoscaler_target}[variable["name"]]
            assert want in values, (name, variable["name"], values)


def test_every_recording_rule_has_data(stack):
    empty = []
    for record in recording_rules():
        ok, got = query_finite(stack.prometheus, record)
        if not ok:
            empty.append(f"{record} -> {got}")
    assert not empty, "recording rules without data:\n" + "\n".join(empty)


def test_rules_evaluate_and_a_missing_worker_alerts(stack):
    r = httpx.get(f"{stack.prometheus.url}/api/v1/rules", timeout=5)
    r.raise_for_status()
    rules = [rule for group in r.json()["data"]["groups"] for rule in group["rules"]]
    assert len(rules) == sum(len(g["rules"]) for p in RULES for g in yaml.safe_load(p.read_text())["groups"])
    broken = [f"{rule['name']}: {rule['health']} {rule.get('lastError', '')}" for rule in rules
              if rule["health"] != "ok"]
    assert not broken, broken
    down = [rule for rule in rules if rule["name"] == "PdserveWorkerDown"][0]
    assert [a["labels"]["instance"] for a in down["alerts"]] == [stack.dead_peer], down["alerts"]
    # the load trips the rejection and fallback ratios by design, and may trip the latency SLOs on a
    # small CPU; the autoscaler's first intervals (before the first request) had no request rate
    expected = {"PdserveWorkerDown", "PdserveHighRejectionRate", "PdserveKVTransferFallbacksSpiking",
                "PdserveITLOverSLO", "PdserveTTFTOverSLO", "PdserveAutoscalerSignalErrors"}
    quiet = {rule["name"] for rule in rules if rule["type"] == "alerting" and rule["alerts"]} - expected
    assert not quiet, f"alerts active on a healthy cluster: {quiet}"


def test_one_off_events_show_in_rates(stack):
    """One migration and one fallback happened: the Migrations and Fallbacks panels show them.

    A counter child that came into existence with the value 1 would give rate() nothing to count
    (the first sample already holds the increment), so routers and decode workers create the
    children they may increment at 0 when they start (common.metrics.init_*_series).
    """
    for expr in ("sum(increase(pdserve_router_migrations_total[10m]))",
                 "sum(increase(pdserve_decode_local_prefill_fallbacks_total[10m]))"):
        assert stack.prometheus.value(expr) > 0, expr
