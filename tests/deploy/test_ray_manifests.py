"""deploy/ray/rayservice.yaml: valid objects, Ray's token authentication on, the dashboard private,
and a Serve config that the application builder and the autoscaler's Ray Serve actuator agree on."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml

from tests.deploy.chart import validate

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "deploy" / "ray" / "rayservice.yaml"
DOCS = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]


def one(kind: str) -> dict:
    found = [d for d in DOCS if d["kind"] == kind]
    assert len(found) == 1, kind
    return found[0]


RAYSERVICE = one("RayService")
CLUSTER = RAYSERVICE["spec"]["rayClusterConfig"]
SERVE_CONFIG = yaml.safe_load(RAYSERVICE["spec"]["serveConfigV2"])
APP = SERVE_CONFIG["applications"][0]


def ray_pod_specs() -> list[dict]:
    return [CLUSTER["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in CLUSTER["workerGroupSpecs"]]


def test_builtin_objects_are_valid():
    for doc in DOCS:
        if not doc["apiVersion"].startswith("ray.io/"):
            validate(doc)


def test_token_authentication_is_on_everywhere():
    assert CLUSTER["authOptions"]["mode"] == "token"
    secret = CLUSTER["authOptions"]["secretName"]
    assert tuple(int(x) for x in CLUSTER["rayVersion"].split(".")) >= (2, 52, 0)  # token auth exists from 2.52
    for spec in ray_pod_specs():
        for container in spec["containers"]:
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            assert env.get("RAY_AUTH_MODE") == "token", container["name"]
    autoscaler = [d for d in DOCS if d["metadata"]["name"] == "pdserve-ray-autoscaler"][0]
    env = {e["name"]: e for e in autoscaler["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": secret, "key": "auth_token"}
    assert not [d for d in DOCS if d["kind"] == "Secret"], "no token in the manifest: create the Secrets by hand"


def test_dashboard_is_not_exposed():
    assert CLUSTER["headGroupSpec"]["serviceType"] == "ClusterIP"
    assert not [d for d in DOCS if d["kind"] in ("Ingress", "Route", "Gateway", "HTTPRoute")]
    assert not [d for d in DOCS if d["kind"] == "Service" and d["spec"].get("type", "ClusterIP") != "ClusterIP"]
    policy = [d for d in DOCS if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "pdserve-ray"][0]
    for rule in policy["spec"]["ingress"]:
        ports = {p["port"] for p in rule.get("ports", [])}
        if 8265 in ports:
            sources = rule["from"]
            assert len(sources) == 2
            assert sources[0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
            assert sources[1]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "ray-autoscaler"
        elif "from" not in rule:
            assert ports == {8000}, "only the Serve proxy is open to everyone"


def test_pods_are_locked_down():
    specs = ray_pod_specs() + [d["spec"]["template"]["spec"] for d in DOCS if d["kind"] == "Deployment"]
    for spec in specs:
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert spec["enableServiceLinks"] is False
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
            assert sc["readOnlyRootFilesystem"] is True
            assert c["resources"]["limits"]["memory"]


def test_serve_config_matches_the_app_and_the_actuator():
    assert APP["import_path"] == "ray_serve.app:build_app"
    assert APP["external_scaler_enabled"] is True
    assert not any("autoscaling_config" in d for d in APP["deployments"])
    names = {d["name"] for d in APP["deployments"]}
    from autoscaler import cli
    from autoscaler.config import AutoscalerConfig
    from common.config import build_config

    autoscaler = [d for d in DOCS if d["metadata"]["name"] == "pdserve-ray-autoscaler"][0]
    args = autoscaler["spec"]["template"]["spec"]["containers"][0]["args"]
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    config = build_config(AutoscalerConfig, parser.parse_args(args[1:]), environ={})
    assert config.actuator == "ray" and config.ray_app_name == APP["name"]
    assert {config.ray_prefill_deployment, config.ray_decode_deployment} <= names
    assert config.ray_dashboard_url == f"http://{RAYSERVICE['metadata']['name']}-head-svc:8265"


def test_serve_config_is_accepted_by_ray_and_the_builder():
    pytest.importorskip("ray", reason="ray is not installed")
    from ray.serve.schema import ServeDeploySchema

    from ray_serve.app import DEPLOYMENTS, AppArgs

    ServeDeploySchema.model_validate(SERVE_CONFIG)
    assert {d["name"] for d in APP["deployments"]} == set(DEPLOYMENTS.values())
    AppArgs.parse(APP["args"])
