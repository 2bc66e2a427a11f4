"""Rendering and validating helm/pdserve for the deploy tests.

``render(values)`` runs Helm's own template engine (Helm's Go library through the helm-python-sdk
wheel; no helm binary here) and returns the manifests as dicts. ``validate(obj)`` checks one object:
built-in kinds against Kubernetes' OpenAPI schema (kubernetes-validate, strict: unknown fields are
errors), the CRD kinds the chart emits against the strict schemas below, written for the fields the
chart uses (ServiceMonitor and PrometheusRule of prometheus-operator v1, cert-manager's Certificate).
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "pdserve"
RELEASE, NAMESPACE = "demo", "llm"
KUBE_VERSION = "1.37.0"

# The combinations the tests render (besides the defaults); each turns on a different set of features.
CASES: dict[str, dict[str, Any]] = {
    "defaults": {},
    "autoscaler-external-redis-mtls": {
        "autoscaler": {"enabled": True, "advisory": False},
        "redis": {"bundled": {"enabled": False}, "external": {"existingSecret": "redis-url"}},
        "mtls": {"enabled": True, "certManager": {"enabled": True,
                                                  "issuerRef": {"name": "pdserve-ca", "kind": "ClusterIssuer"}}},
        "router": {"grpcPort": 50061, "discovery": "redis", "replicas": 3},
        "metrics": {"serviceMonitor": {"enabled": True}},
    },
    "hostpath-bundled-redis-servicemonitors-nccl": {
        "model": {"source": "hostPath", "hostPath": {"path": "/mnt/models"}, "path": "/models/llama"},
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus"}},
                    "prometheusRule": {"enabled": True}},
        "kvTransfer": {"transport": "nccl", "numStreams": 4},
        "networkPolicy": {"apiFrom": [{"namespaceSelector": {"matchLabels": {
            "kubernetes.io/metadata.name": "gateway"}}}], "egress": {"apiServerCIDRs": ["10.0.0.1/32"]}},
    },
    "advisory-autoscaler-no-netpol-pvc-gpus": {
        "autoscaler": {"enabled": True, "advisory": True, "gpuBudget": 16},
        "networkPolicy": {"enabled": False},
        "model": {"source": "pvc", "pvc": {"claimName": "llama-70b", "subPath": "v1"}, "path": "/models/llama"},
        "engine": {"dtype": "bfloat16", "num_blocks": 1000000, "max_num_requests": 256},
        "prefill": {"gpu": {"count": 4}, "engine": {"max_num_batched_tokens": 8192},
                    "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H200"},
                    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                    "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
                        "weight": 100, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname",
                                                           "labelSelector": {"matchLabels": {
                                                               "app.kubernetes.io/component": "prefill"}}}}]}}},
        "decode": {"gpu": {"count": 2}, "replicas": 3, "worker": {"drain_timeout_s": 120,
                                                                  "local_prefill_max_tokens": 64},
                   "resources": {"requests": {"cpu": "8", "memory": "64Gi"}, "limits": {"memory": "128Gi"}}},
        "router": {"auth": {"existingSecret": "my-api-keys"}, "config": {"max_concurrency": 512},
                   "costModel": {"json": json.dumps({"source": "profile"})}},
        "routing": {"policy": "round_robin", "ttft_slo_s": 1.5, "reject": False},
    },
    "image-model-no-auth-tls-secret-external-url": {
        "model": {"source": "image", "path": "/opt/models/demo"},
        "router": {"auth": {"enabled": False}, "podDisruptionBudget": {"enabled": False}},
        "mtls": {"enabled": True, "existingSecret": "pdserve-tls"},
        "networkPolicy": {"egress": {"enabled": False}},
        "redis": {"bundled": {"enabled": False}, "external": {"url": "rediss://redis.example:6380/0"}},
        "images": {"worker": {"repository": "registry.example/pdserve-worker",
                              "digest": "sha256:" + "a" * 64}},
    },
}


def _helm():
    import helm_python

    return helm_python


def render_raw(values: dict[str, Any] | None, chart: Path = CHART) -> dict[str, str]:
    helm = _helm()
    with helm.Chart.load(str(chart)) as loaded:
        return loaded.render(values=copy.deepcopy(values) if values else None, name=RELEASE,
                             namespace=NAMESPACE, is_install=True)


@functools.cache
def _render_case(name: str) -> tuple[tuple[dict[str, Any], ...], str]:
    out = render_raw(CASES[name])
    objects = []
    for path, text in sorted(out.items()):
        if not path.endswith((".yaml", ".yml")):
            continue
        objects += [doc for doc in yaml.safe_load_all(text) if doc]
    notes = next((text for path, text in out.items() if path.endswith("NOTES.txt")), "")
    return tuple(objects), notes


def render_case(name: str) -> list[dict[str, Any]]:
    return copy.deepcopy(list(_render_case(name)[0]))


def notes_case(name: str) -> str:
    return _render_case(name)[1]


def lint(values: dict[str, Any] | None) -> dict[str, Any]:
    return _helm().lint(str(CHART), copy.deepcopy(values) if values else None, strict=True, namespace=NAMESPACE,
                        kube_version=f"v{KUBE_VERSION}")


# --- CRD schemas (strict, for the fields the chart uses) ------------------------------------------

def _obj(props: dict, required: list[str] | None = None) -> dict:
    out: dict = {"type": "object", "additionalProperties": False, "properties": props}
    if required:
        out["required"] = required
    return out


_STR = {"type": "string"}
_STRMAP = {"type": "object", "additionalProperties": {"type": "string"}}
_LABEL_SELECTOR = _obj({"matchLabels": _STRMAP, "matchExpressions": {"type": "array"}})
_METADATA = _obj({"name": _STR, "namespace": _STR, "labels": _STRMAP, "annotations": _STRMAP}, ["name"])


def _crd(api_version: str, kind: str, spec: dict) -> dict:
    return _obj({"apiVersion": {"const": api_version}, "kind": {"const": kind}, "metadata": _METADATA,
                 "spec": spec}, ["apiVersion", "kind", "metadata", "spec"])


CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): _crd("monitoring.coreos.com/v1", "ServiceMonitor", _obj({
        "selector": _LABEL_SELECTOR,
        "namespaceSelector": _obj({"matchNames": {"type": "array", "items": _STR}, "any": {"type": "boolean"}}),
        "endpoints": {"type": "array", "minItems": 1, "items": _obj({
            "port": _STR, "path": _STR, "scheme": {"enum": ["http", "https"]},
            "interval": {"type": "string", "pattern": "^(0|(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"},
            "scrapeTimeout": {"type": "string", "pattern": "^(0|(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"},
            "authorization": _obj({"type": _STR, "credentials": _obj({"name": _STR, "key": _STR}, ["key"])}),
            "relabelings": {"type": "array", "items": _obj({
                "sourceLabels": {"type": "array", "items": _STR}, "targetLabel": _STR, "action": _STR,
                "regex": _STR, "replacement": _STR})},
        }, ["port"])},
    }, ["selector", "endpoints"])),
    ("monitoring.coreos.com/v1", "PrometheusRule"): _crd("monitoring.coreos.com/v1", "PrometheusRule", _obj({
        "groups": {"type": "array", "minItems": 1, "items": _obj({
            "name": {"type": "string", "minLength": 1}, "interval": _STR, "labels": _STRMAP,
            "rules": {"type": "array", "items": {"type": "object", "additionalProperties": False,
                                                 "required": ["expr"], "properties": {
                "alert": _STR, "record": _STR, "expr": {"type": ["string", "integer"]}, "for": _STR,
                "keep_firing_for": _STR, "labels": _STRMAP, "annotations": _STRMAP},
                "oneOf": [{"required": ["alert"]}, {"required": ["record"]}]}},
        }, ["name", "rules"])},
    }, ["groups"])),
    ("cert-manager.io/v1", "Certificate"): _crd("cert-manager.io/v1", "Certificate", _obj({
        "secretName": _STR, "commonName": _STR, "dnsNames": {"type": "array", "items": _STR},
        "duration": _STR, "renewBefore": _STR,
        "privateKey": _obj({"algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]}, "size": {"type": "integer"},
                            "rotationPolicy": {"enum": ["Never", "Always"]}}),
        "usages": {"type": "array", "items": {"enum": ["server auth", "client auth", "digital signature",
                                                       "key encipherment"]}},
        "issuerRef": _obj({"name": {"type": "string", "minLength": 1}, "kind": {"enum": ["Issuer", "ClusterIssuer"]},
                           "group": _STR}, ["name"]),
    }, ["secretName", "issuerRef"])),
}


def validate(obj: dict[str, Any]) -> None:
    """Raise AssertionError naming the object and the first schema violation."""
    name = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
    schema = CRD_SCHEMAS.get((obj.get("apiVersion"), obj.get("kind")))
    if schema is not None:
        import jsonschema

        try:
            jsonschema.validate(obj, schema)
        except jsonschema.ValidationError as e:
            raise AssertionError(f"{name}: {e.message} at {list(e.absolute_path)}") from e
        return
    import kubernetes_validate

    try:
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        detail = getattr(e, "caught", e)
        raise AssertionError(f"{name}: {getattr(detail, 'message', detail)} at "
                             f"{list(getattr(detail, 'absolute_path', []))}") from e


# --- reading rendered objects ---------------------------------------------------------------------

def of_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def named(objects: list[dict], kind: str, name: str) -> dict:
    found = [o for o in of_kind(objects, kind) if o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def workloads(objects: list[dict]) -> list[dict]:
    return [o for o in objects if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet")]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def name_of(component: str) -> str:
    return f"{RELEASE}-pdserve-{component}"
