"""Kubernetes actuator: the ``scale`` subresource of the prefill and decode Deployments.

``current()`` reads ``GET /apis/apps/v1/namespaces/{ns}/deployments/{name}/scale`` for both roles
(``spec.replicas``: what the Deployment is asked to run). ``scale(role, n)`` reads the scale, then
sends ``PATCH`` of the same path with ``Content-Type: application/merge-patch+json`` and the body
``{"metadata": {"resourceVersion": <read>}, "spec": {"replicas": n}}``: the resourceVersion makes
the write conditional (optimistic concurrency), so a change made meanwhile by someone else (a
person, a rollout) answers ``409 Conflict`` instead of being overwritten blindly; the actuator then
re-reads and tries again, at most ``conflict_retries`` times. ``403 Forbidden`` raises at once
(no retries) a ``PermissionDeniedError`` naming the RBAC rule the service account lacks; other
failures raise ``ActuatorError``. The official client is synchronous: calls run in a thread, each
with a request timeout.

Credentials: the pod's service account when running in a pod, else the kubeconfig
(``router.discovery_k8s.load_kubernetes_client``, shared with the router's discovery).

**Role flips.** ``flip()`` returns None: a Deployment's pods are the ReplicaSet's by label, and
moving a running pod from the prefill Deployment to the decode one would take label surgery (the
pod leaves the prefill ReplicaSet, which immediately starts a replacement, and the decode
ReplicaSet cannot adopt it because its ``pod-template-hash`` differs), leaving an orphan pod that
no Deployment updates, drains or counts. So in Kubernetes a flip is "scale one Deployment down by
one, the other up by one" (the loop does this on None, shrinking first so the GPU budget holds):
the removed pod drains on SIGTERM (preStop + terminationGracePeriodSeconds) and the new pod
starts in the other role. In-place flips (``WorkerAdmin.SetRole``) are for backends that own
their workers directly: local processes, and Ray Serve replicas.

RBAC (namespaced Role for the autoscaler's service account)::

    - apiGroups: ["apps"]
      resources: ["deployments/scale"]
      verbs: ["get", "patch"]
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from typing import Any

from autoscaler.actuators.base import DECODE, PREFILL, ROLES, ActuatorError, check_role
from autoscaler.config import AutoscalerConfig
from common.errors import ConfigError, PdserveError, PermissionDeniedError
from router.discovery_k8s import default_namespace, load_kubernetes_client

logger = logging.getLogger(__name__)

PATCH_CONTENT_TYPE = "application/merge-patch+json"
RBAC_RULE = 'apiGroups: ["apps"], resources: ["deployments/scale"], verbs: ["get", "patch"]'


def _message(e: Any) -> str:
    try:
        return str(json.loads(e.body).get("message") or e.reason)
    except (TypeError, ValueError, AttributeError):
        return str(getattr(e, "reason", e))


class KubernetesActuator:
    name = "kubernetes"

    def __init__(self, namespace: str, deployments: Mapping[str, str], *, api_client: Any = None,
                 kubeconfig: str | None = None, request_timeout_s: float = 10.0, conflict_retries: int = 3) -> None:
        if set(deployments) != set(ROLES) or not all(deployments.values()):
            raise ConfigError(f"must name a Deployment for each of {ROLES}", field="deployments")
        if conflict_retries < 0:
            raise ConfigError("must be >= 0", field="k8s_conflict_retries")
        self.namespace = namespace or default_namespace(kubeconfig)
        self.deployments = dict(deployments)
        self._api_client = api_client
        self._own_client = api_client is None
        self._kubeconfig = kubeconfig
        self._timeout_s = request_timeout_s
        self._retries = conflict_retries
        self._api: Any = None

    def _apps(self) -> Any:
        if self._api is None:
            from kubernetes import client

            if self._api_client is None:
                self._api_client = load_kubernetes_client(self._kubeconfig)
            self._api = client.AppsV1Api(self._api_client)
        return self._api

    def close(self) -> None:
        if self._own_client and self._api_client is not None:
            self._api_client.close()

    # --- Actuator -----------------------------------------------------------------------------------

    async def current(self) -> dict[str, int]:
        reads = await asyncio.gather(*(asyncio.to_thread(self._read, role) for role in ROLES))
        return {role: replicas for role, (replicas, _) in zip(ROLES, reads)}

    async def scale(self, role: str, replicas: int) -> None:
        check_role(role)
        if replicas < 0:
            raise ConfigError(f"must be >= 0, got {replicas}", field="replicas")
        await asyncio.to_thread(self._scale, role, replicas)

    async def flip(self, to_role: str) -> str | None:
        check_role(to_role)
        return None  # no in-place flips in Kubernetes: see the module docstring

    # --- the calls (a worker thread) ------------------------------------------------------------------

    def _read(self, role: str) -> tuple[int, str]:
        """(spec.replicas, metadata.resourceVersion) of the role's Deployment scale."""
        name = self.deployments[role]
        scale = self._call("get", role, lambda api: api.read_namespaced_deployment_scale(
            name, self.namespace, _request_timeout=self._timeout_s))
        replicas = scale.spec.replicas if scale.spec is not None and scale.spec.replicas is not None else 0
        return int(replicas), scale.metadata.resource_version

    def _scale(self, role: str, replicas: int) -> None:
        name = self.deployments[role]
        for attempt in range(self._retries + 1):
            now, resource_version = self._read(role)
            if now == replicas:
                return
            body = {"metadata": {"resourceVersion": resource_version}, "spec": {"replicas": replicas}}
            try:
                self._call("patch", role, lambda api, body=body: api.patch_namespaced_deployment_scale(
                    name, self.namespace, body, _content_type=PATCH_CONTENT_TYPE, _request_timeout=self._timeout_s))
            except _Conflict:
                logger.info("deployment %s/%s changed since read (resourceVersion %s); re-reading (%d/%d)",
                            self.namespace, name, resource_version, attempt + 1, self._retries)
                continue
            logger.info("deployment %s/%s scaled %d->%d", self.namespace, name, now, replicas)
            return
        raise ActuatorError(f"deployment {self.namespace}/{name}: the scale kept changing under us "
                            f"({self._retries + 1} conflicts); not scaled to {replicas}")

    def _call(self, verb: str, role: str, call: Any) -> Any:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        name = self.deployments[role]
        where = f"deployments/scale {name!r} in namespace {self.namespace!r}"
        try:
            return call(self._apps())
        except ApiException as e:
            if e.status == 409 and verb == "patch":
                raise _Conflict() from e
            raise self._error(e, verb, where) from e
        except (HTTPError, OSError) as e:
            raise ActuatorError(f"cannot {verb} {where}: the API server is unreachable ({e})") from e

    @staticmethod
    def _error(e: Any, verb: str, where: str) -> PdserveError:
        message = _message(e)
        if e.status == 403:
            return PermissionDeniedError(
                f"Kubernetes refused to {verb} {where} (403 Forbidden: {message}); the autoscaler's "
                f"service account needs a Role rule {RBAC_RULE} bound in that namespace", field="rbac")
        if e.status == 401:
            return ActuatorError(f"Kubernetes rejected the autoscaler's credentials (401) on {verb} {where}")
        if e.status == 404:
            return ActuatorError(f"cannot {verb} {where}: no such Deployment (404: {message})")
        return ActuatorError(f"cannot {verb} {where}: HTTP {e.status} {message}")


class _Conflict(Exception):
    """409: the resourceVersion sent is no longer current."""


def from_config(config: AutoscalerConfig) -> KubernetesActuator:
    """The actuator, its credentials loaded now (a missing kubeconfig is a ConfigError at start, not later)."""
    actuator = KubernetesActuator(config.k8s_namespace, {PREFILL: config.k8s_prefill_deployment,
                                                         DECODE: config.k8s_decode_deployment},
                                  kubeconfig=config.kubeconfig or None,
                                  request_timeout_s=config.k8s_request_timeout_s,
                                  conflict_retries=config.k8s_conflict_retries)
    actuator._apps()
    return actuator
