"""helm/pdserve rendered by Helm's template engine: lint, schema validity, and the properties a
production install relies on (selectors, ports, probes, resources, security context, drain, RBAC,
NetworkPolicy, and environment that the config tree accepts), for the defaults and four other
combinations of values (tests/deploy/chart.py's CASES).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("helm_python", reason="helm-python-sdk is not installed (pip install -e '.[dev]')")
pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed (pip install -e '.[dev]')")

from common.config import EngineConfig, RouterConfig, WorkerConfig, build_config
from common.tls import TlsConfig
from router.routing_config import RoutingConfig
from tests.deploy.chart import (
    CASES,
    CHART,
    NAMESPACE,
    RELEASE,
    ROOT,
    lint,
    name_of,
    named,
    notes_case,
    of_kind,
    render_case,
    render_raw,
    selects,
    validate,
    workloads,
)

CASE_NAMES = list(CASES)
FIELD_VALUES = {"status.podIP": "10.20.30.40", "metadata.name": "pod-0", "metadata.namespace": NAMESPACE}
CONFIG_PREFIXES = {"PDSERVE_ENGINE_": EngineConfig, "PDSERVE_WORKER_": WorkerConfig,
                   "PDSERVE_ROUTER_": RouterConfig, "PDSERVE_ROUTING_": RoutingConfig, "PDSERVE_TLS_": TlsConfig}
TLS_ENV = {"PDSERVE_TLS_CERT", "PDSERVE_TLS_KEY", "PDSERVE_TLS_CA", "PDSERVE_TLS_SERVER_NAME"}


def pods(objects):
    """(workload, pod spec, pod labels) of every workload."""
    return [(w, w["spec"]["template"]["spec"], w["spec"]["template"]["metadata"]["labels"]) for w in workloads(objects)]


def containers(objects):
    return [(w, c) for w, spec, _ in pods(objects) for c in spec["containers"] + spec.get("initContainers", [])]


def values_of(case: str, *path: str):
    node = CASES[case]
    for key in path:
        node = node.get(key, {}) if isinstance(node, dict) else {}
    return node


# --- Helm's own checks ----------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASE_NAMES)
def test_lint_is_clean(case):
    report = lint(CASES[case])
    assert report["errors"] == []
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # 1 is INFO ("icon is recommended")
    assert problems == [], problems


@pytest.mark.parametrize("case", CASE_NAMES)
def test_every_object_is_valid_against_its_schema(case):
    objects = render_case(case)
    assert len(objects) >= 15
    for obj in objects:
        validate(obj)
        assert obj["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE
        assert "namespace" not in obj["metadata"], "the release namespace comes from helm install -n"
    names = [(o["kind"], o["metadata"]["name"]) for o in objects]
    assert len(names) == len(set(names)), "duplicate objects"


def test_schema_is_generated_from_the_config_tree():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_chart_schema"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("values, error", [
    ({"bogus": 1}, "additional properties 'bogus'"),
    ({"engine": {"not_a_field": 1}}, "not_a_field"),
    ({"engine": {"model": "/x"}}, "'model' not allowed"),  # the chart owns it
    ({"worker": {"port": 1}}, "'port' not allowed"),
    ({"kvTransfer": {"transport": "local"}}, "transport"),
    ({"router": {"discovery": "static"}}, "discovery"),
    ({"redis": {"bundled": {"enabled": False}}}, "a Redis is required"),
    ({"redis": {"external": {"url": "redis://r:6379"}}}, "not both"),
    ({"model": {"source": "pvc", "path": "/elsewhere/m"}}, "must lie below"),
    ({"mtls": {"enabled": True}}, "mtls.existingSecret"),
])
def test_bad_values_are_refused(values, error):
    import helm_python

    with pytest.raises(helm_python.HelmError, match=re.escape(error)):
        render_raw(values)


# --- structure ------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASE_NAMES)
def test_selectors_match_labels(case):
    objects = render_case(case)
    pod_labels = [(w["metadata"]["name"], labels) for w, _, labels in pods(objects)]
    for w, _, labels in pods(objects):
        assert selects(w["spec"]["selector"]["matchLabels"], labels), w["metadata"]["name"]
    for svc in of_kind(objects, "Service"):
        matched = [n for n, labels in pod_labels if selects(svc["spec"]["selector"], labels)]
        assert len(matched) == 1, f"Service {svc['metadata']['name']} selects {matched}"
    for pdb in of_kind(objects, "PodDisruptionBudget"):
        assert any(selects(pdb["spec"]["selector"]["matchLabels"], labels) for _, labels in pod_labels)
    for policy in of_kind(objects, "NetworkPolicy"):
        assert any(selects(policy["spec"]["podSelector"]["matchLabels"], labels) for _, labels in pod_labels)
    services = of_kind(objects, "Service")
    for monitor in of_kind(objects, "ServiceMonitor"):
        svc = [s for s in services if selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])]
        assert len(svc) == 1, monitor["metadata"]["name"]
        ports = {p["name"] for p in svc[0]["spec"]["ports"]}
        assert {e["port"] for e in monitor["spec"]["endpoints"]} <= ports
    for binding in of_kind(objects, "RoleBinding"):
        assert binding["roleRef"]["name"] in {r["metadata"]["name"] for r in of_kind(objects, "Role")}
        for subject in binding["subjects"]:
            named(objects, "ServiceAccount", subject["name"])
    for _, spec, _ in pods(objects):
        named(objects, "ServiceAccount", spec["serviceAccountName"])


@pytest.mark.parametrize("case", CASE_NAMES)
def test_router_discovery_finds_the_worker_services(case):
    """EndpointSlices carry their Service's labels: the router's selectors must match the worker Services."""
    objects = render_case(case)
    router = named(objects, "Deployment", name_of("router"))
    env = {e["name"]: e.get("value") for e in router["spec"]["template"]["spec"]["containers"][0]["env"]}
    if env["PDSERVE_ROUTER_DISCOVERY"] != "kubernetes":
        assert "PDSERVE_ROUTER_REDIS_URL" in env
        return
    assert env["PDSERVE_ROUTER_K8S_PORT_NAME"] == "grpc"
    for role in ("prefill", "decode"):
        selector = dict(item.split("=") for item in env[f"PDSERVE_ROUTER_K8S_{role.upper()}_SELECTOR"].split(","))
        matching = [s for s in of_kind(objects, "Service") if selects(selector, s["metadata"]["labels"])]
        assert [s["metadata"]["name"] for s in matching] == [name_of(role)]
        service = matching[0]
        assert service["spec"]["clusterIP"] == "None", "worker Services are headless"
        assert "grpc" in {p["name"] for p in service["spec"]["ports"]}


@pytest.mark.parametrize("case", CASE_NAMES)
def test_service_ports_match_container_ports(case):
    objects = render_case(case)
    for svc in of_kind(objects, "Service"):
        workload = [w for w, _, labels in pods(objects) if selects(svc["spec"]["selector"], labels)][0]
        ports = {(p["name"], p["containerPort"]) for c in workload["spec"]["template"]["spec"]["containers"]
                 for p in c.get("ports", [])}
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            if isinstance(target, str):
                numbers = [n for name, n in ports if name == target]
                assert numbers == [port["port"]], f"{svc['metadata']['name']}: {target} -> {numbers}"
            else:
                assert target in {n for _, n in ports}


# --- pods -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASE_NAMES)
def test_every_container_has_probes_resources_and_a_locked_down_security_context(case):
    objects = render_case(case)
    for w, spec, _ in pods(objects):
        where = w["metadata"]["name"]
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", where
        assert spec["enableServiceLinks"] is False, f"{where}: service links collide with PDSERVE_* variables"
        for c in spec["containers"]:
            where = f"{w['metadata']['name']}/{c['name']}"
            assert "livenessProbe" in c and "readinessProbe" in c, where
            assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"], where
            assert c["resources"]["limits"]["memory"], where
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"], where
            assert sc["seccompProfile"]["type"] == "RuntimeDefault", where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc.get("privileged") is not True and sc["runAsNonRoot"] is True, where
            mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
            assert "/tmp" in mounts or "/data" in mounts, f"{where}: no writable scratch volume"
            image = c["image"]
            assert not image.endswith(":latest") and (":" in image.split("/")[-1] or "@sha256:" in image), image


@pytest.mark.parametrize("case", CASE_NAMES)
def test_workers_drain_before_they_stop(case):
    objects = render_case(case)
    for role in ("prefill", "decode"):
        deployment = named(objects, "Deployment", name_of(role))
        spec = deployment["spec"]["template"]["spec"]
        worker = spec["containers"][0]
        env = {e["name"]: e.get("value") for e in worker["env"]}
        drain = float(env["PDSERVE_WORKER_DRAIN_TIMEOUT_S"])
        expected = float((values_of(case, role, "worker") or {}).get("drain_timeout_s", 60))
        assert drain == expected
        command = worker["lifecycle"]["preStop"]["exec"]["command"]
        assert command[:2] == ["pdserve-worker-probe", "drain"] and float(command[-1]) == drain
        assert spec["terminationGracePeriodSeconds"] > drain
        assert worker["readinessProbe"]["exec"]["command"] == ["pdserve-worker-probe", "ready"]
        assert worker["startupProbe"]["failureThreshold"] * worker["startupProbe"]["periodSeconds"] >= 1800
        gpus = int((values_of(case, role, "gpu") or {}).get("count", 1))
        assert worker["resources"]["limits"].get("nvidia.com/gpu", 0) == gpus
        assert spec["automountServiceAccountToken"] is False
    router = named(objects, "Deployment", name_of("router"))
    spec = router["spec"]["template"]["spec"]
    container = spec["containers"][0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["lifecycle"]["preStop"]["sleep"]["seconds"] > 0
    assert spec["terminationGracePeriodSeconds"] > 30  # uvicorn's graceful shutdown of streams


@pytest.mark.parametrize("case", CASE_NAMES)
def test_environment_and_flags_build_valid_configs(case):
    """What each container gets is accepted by the config tree, as the process will read it."""
    from cli.main import build_parser

    objects = render_case(case)
    for _, c in containers(objects):
        if c["name"] == "redis":
            continue
        env = resolve_env(c.get("env", []))
        for name in env:
            prefix = next((p for p in CONFIG_PREFIXES if name.startswith(p)), None)
            if prefix is None:
                assert not name.startswith("PDSERVE_"), name
                continue
            fields = {f.upper() for f in CONFIG_PREFIXES[prefix].__dataclass_fields__}
            assert name.removeprefix(prefix) in fields, f"{name} is not a {CONFIG_PREFIXES[prefix].__name__} field"
        args = [expand(a, env) for a in c.get("args", [])]
        if c["name"] == "worker":
            build_parser().parse_args(args)
            engine, worker = build_config(EngineConfig, environ=env), build_config(WorkerConfig, environ=env)
            assert worker.host == FIELD_VALUES["status.podIP"] and worker.advertise_address == "10.20.30.40:50051"
            assert worker.instance_id == "pod-0" and worker.redis_url and worker.metrics_port
            assert engine.model == values_of(case, "model").get("path", "/models/model")
        elif c["name"] == "router":
            build_parser().parse_args(args)
            router, routing = build_config(RouterConfig, environ=env), build_config(RoutingConfig, environ=env)
            assert router.redis_url and router.router_id == "pod-0"
            assert (router.api_keys_file != "") == values_of(case, "router", "auth").get("enabled", True)
            if router.discovery == "kubernetes":
                assert router.k8s_namespace == NAMESPACE
            expected_policy = values_of(case, "routing").get("policy", "transfer_aware")
            assert routing.policy == expected_policy
        elif c["name"] == "autoscaler":
            check_autoscaler_flags(args, case)


def check_autoscaler_flags(args: list[str], case: str) -> None:
    from autoscaler import cli
    from autoscaler.config import AutoscalerConfig, SizingConfig

    assert args[0] == "autoscaler"
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    ns = parser.parse_args(args[1:])
    config, sizing = build_config(AutoscalerConfig, ns, environ={}), build_config(SizingConfig, ns, environ={})
    assert config.actuator == "kubernetes" and config.k8s_namespace == NAMESPACE
    assert (config.k8s_prefill_deployment, config.k8s_decode_deployment) == (name_of("prefill"), name_of("decode"))
    assert config.metrics_host == FIELD_VALUES["status.podIP"]
    assert config.advisory == values_of(case, "autoscaler").get("advisory", True)
    assert sizing.gpu_budget == values_of(case, "autoscaler").get("gpuBudget", 8)


def resolve_env(entries: list[dict]) -> dict[str, str]:
    """The environment a container would see: downward API and Secret values faked, $(VAR) expanded."""
    env: dict[str, str] = {}
    for e in entries:
        if "value" in e:
            env[e["name"]] = expand(e["value"], env)
        elif "fieldRef" in e.get("valueFrom", {}):
            env[e["name"]] = FIELD_VALUES[e["valueFrom"]["fieldRef"]["fieldPath"]]
        elif "secretKeyRef" in e.get("valueFrom", {}):
            env[e["name"]] = "redis://redis.example:6379/0" if "REDIS" in e["name"] else "secret"
        else:
            raise AssertionError(f"unexpected env source {e}")
    return env


def expand(text: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), text)


@pytest.mark.parametrize("case", CASE_NAMES)
def test_tls_is_mounted_where_enabled(case):
    objects = render_case(case)
    enabled = values_of(case, "mtls").get("enabled", False)
    for w, c in containers(objects):
        if c["name"] == "redis":
            continue
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        assert (set(env) >= TLS_ENV) == enabled, f"{w['metadata']['name']}/{c['name']}"
        if enabled:
            mount = values_of(case, "mtls").get("mountPath", "/etc/pdserve/tls")
            assert any(m["mountPath"] == mount for m in c["volumeMounts"]), f"{w['metadata']['name']}/{c['name']}"
            assert env["PDSERVE_TLS_CERT"] == f"{mount}/tls.crt" and env["PDSERVE_TLS_CA"] == f"{mount}/ca.crt"
            mesh = env["PDSERVE_TLS_SERVER_NAME"]
    certificates = of_kind(objects, "Certificate")
    if values_of(case, "mtls", "certManager").get("enabled"):
        assert {c["spec"]["secretName"] for c in certificates} == {
            f"{name_of(x)}-tls" for x in ("router", "prefill", "decode", "autoscaler")}
        # every certificate holds the name every peer checks, and serves both ends of a connection
        for cert in certificates:
            assert mesh in cert["spec"]["dnsNames"], cert["metadata"]["name"]
            assert set(cert["spec"]["usages"]) == {"server auth", "client auth"}
    else:
        assert certificates == []


# --- least privilege ------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASE_NAMES)
def test_rbac_is_exactly_what_each_component_needs(case):
    objects = render_case(case)
    assert not [o for o in objects if o["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    roles = {r["metadata"]["name"]: r["rules"] for r in of_kind(objects, "Role")}
    expected = {}
    if values_of(case, "router").get("discovery", "kubernetes") == "kubernetes":
        expected[name_of("router")] = [
            {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]}]
    if values_of(case, "autoscaler").get("enabled"):
        expected[name_of("autoscaler")] = [
            {"apiGroups": ["apps"], "resources": ["deployments/scale"],
             "resourceNames": [name_of("prefill"), name_of("decode")], "verbs": ["get", "patch"]},
            {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get", "list", "watch"]}]
    assert roles == expected
    bindings = {b["metadata"]["name"]: b for b in of_kind(objects, "RoleBinding")}
    assert set(bindings) == set(expected)
    for name, binding in bindings.items():
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name}
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": name, "namespace": NAMESPACE}]
    # tokens only where the Kubernetes API is called
    for w, spec, _ in pods(objects):
        uses_api = w["metadata"]["name"] in expected
        assert spec["automountServiceAccountToken"] is uses_api, w["metadata"]["name"]
    for account in of_kind(objects, "ServiceAccount"):
        assert account["automountServiceAccountToken"] is False


@pytest.mark.parametrize("case", CASE_NAMES)
def test_network_policy_denies_by_default_and_opens_only_served_ports(case):
    objects = render_case(case)
    policies = of_kind(objects, "NetworkPolicy")
    if not values_of(case, "networkPolicy").get("enabled", True):
        assert policies == []
        return
    deny = named(objects, "NetworkPolicy", f"{RELEASE}-pdserve-default-deny")
    assert "ingress" not in deny["spec"] and "egress" not in deny["spec"]
    egress = values_of(case, "networkPolicy", "egress").get("enabled", True)
    assert set(deny["spec"]["policyTypes"]) == ({"Ingress", "Egress"} if egress else {"Ingress"})
    everything = {labels_key(labels) for _, _, labels in pods(objects)}
    assert all(selects(deny["spec"]["podSelector"]["matchLabels"], dict(k)) for k in everything)
    nccl = values_of(case, "kvTransfer").get("transport") == "nccl"
    for policy in policies:
        if policy is deny:
            continue
        selected = [c for w, spec, labels in pods(objects) if selects(policy["spec"]["podSelector"]["matchLabels"], labels)
                    for c in spec["containers"]]
        served = {p["name"] for c in selected for p in c.get("ports", [])} | {
            p["containerPort"] for c in selected for p in c.get("ports", [])}
        for rule in policy["spec"].get("ingress", []):
            if "ports" not in rule:
                assert nccl and policy["metadata"]["name"] == name_of("workers"), "an ingress rule opens every port"
                continue
            for port in rule["ports"]:
                assert port["port"] in served, f"{policy['metadata']['name']} opens {port['port']}"
        if policy["metadata"]["name"] != name_of("workers"):  # only NCCL between workers needs every port
            assert all("ports" in rule for rule in policy["spec"].get("egress", [])), policy["metadata"]["name"]


def labels_key(labels: dict[str, str]) -> tuple:
    return tuple(sorted(labels.items()))


# --- monitoring -----------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASE_NAMES)
def test_service_monitors_scrape_every_component(case):
    objects = render_case(case)
    monitors = {m["metadata"]["name"]: m for m in of_kind(objects, "ServiceMonitor")}
    if not values_of(case, "metrics", "serviceMonitor").get("enabled"):
        assert monitors == {}
        return
    expected = {name_of(x) for x in ("router", "prefill", "decode")}
    if values_of(case, "autoscaler").get("enabled"):
        expected.add(name_of("autoscaler"))
    assert set(monitors) == expected
    router = monitors[name_of("router")]["spec"]["endpoints"][0]
    if values_of(case, "router", "auth").get("enabled", True):
        assert router["authorization"]["credentials"]["key"] == "metrics-api-key"


def test_dashboards_and_rules_from_the_chart_files_are_packaged(tmp_path):
    """The chart ships exactly deploy/grafana/*.json and deploy/prometheus/*.yaml (scripts/sync_chart_assets)."""
    import json

    import yaml

    root = CHART.parent.parent
    out = render_raw({"metrics": {"prometheusRule": {"enabled": True}}})
    objects = [d for p, text in out.items() if p.endswith(".yaml") for d in yaml.safe_load_all(text) if d]
    for obj in objects:
        validate(obj)
    dashboards = named(objects, "ConfigMap", f"{RELEASE}-pdserve-dashboards")
    assert dashboards["metadata"]["labels"]["grafana_dashboard"] == "1"
    sources = {p.name: p for p in (root / "deploy" / "grafana").glob("*.json")}
    assert sources and set(dashboards["data"]) == set(sources)
    for name, path in sources.items():
        assert json.loads(dashboards["data"][name]) == json.loads(path.read_text()), f"{name} is stale in the chart"
    rule = of_kind(objects, "PrometheusRule")[0]
    groups = [g for p in sorted((root / "deploy" / "prometheus").glob("*.yaml"))
              for g in yaml.safe_load(p.read_text())["groups"]]
    assert rule["spec"]["groups"] == groups
    # without files: no empty ConfigMap, no empty PrometheusRule
    bare = tmp_path / "bare"
    shutil.copytree(CHART, bare)
    for f in [*(bare / "files" / "grafana").glob("*.json"), *(bare / "files" / "prometheus").glob("*.yaml")]:
        f.unlink()
    out = render_raw({"metrics": {"prometheusRule": {"enabled": True}}}, chart=bare)
    assert "kind: PrometheusRule" not in "".join(out.values())
    assert "-dashboards" not in "".join(out.values())


# --- the rest -------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASE_NAMES)
def test_notes_say_how_to_reach_the_api(case):
    notes = notes_case(case)
    assert f"port-forward svc/{name_of('router')}" in notes
    assert ("OPENAI_API_KEY=$(kubectl" in notes) == values_of(case, "router", "auth").get("enabled", True)


def test_active_autoscaler_owns_the_worker_replica_counts():
    active = render_case("autoscaler-external-redis-mtls")
    advisory = render_case("advisory-autoscaler-no-netpol-pvc-gpus")
    for role in ("prefill", "decode"):
        assert "replicas" not in named(active, "Deployment", name_of(role))["spec"]
    assert named(advisory, "Deployment", name_of("decode"))["spec"]["replicas"] == 3


def test_whole_numbers_reach_the_environment_without_exponents():
    objects = render_case("advisory-autoscaler-no-netpol-pvc-gpus")
    worker = named(objects, "Deployment", name_of("decode"))["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in worker["env"]}
    assert env["PDSERVE_ENGINE_NUM_BLOCKS"] == "1000000"
    router = named(objects, "Deployment", name_of("router"))["spec"]["template"]["spec"]["containers"][0]
    renv = {e["name"]: e.get("value") for e in router["env"]}
    # the policy's mirrors follow the decode pool
    assert renv["PDSERVE_ROUTING_LOCAL_PREFILL_MAX_TOKENS"] == "64"
    assert renv["PDSERVE_ROUTING_TTFT_SLO_S"] == "1.5" and renv["PDSERVE_ROUTING_REJECT"] == "false"
