"""Router discovery from Kubernetes: watch the worker EndpointSlices of each role.

See ``router.discovery`` for the ``Discovery`` protocol this implements.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common.errors import ConfigError
from router.discovery import DECODE, PREFILL, ROLES, WorkerEndpoint, _View

logger = logging.getLogger(__name__)

# --- Kubernetes EndpointSlices --------------------------------------------------------------------


def endpoints_from_slice(obj: dict[str, Any], role: str, port_name: str) -> list[WorkerEndpoint]:
    """The serving endpoints of one EndpointSlice (its JSON form) on the port named ``port_name``.

    An endpoint counts when ``conditions.ready`` is not false (the API says an absent value means
    ready) and it is not terminating. Its instance id is its pod's name (``targetRef``), else its
    address; the address is its first address and the slice's port of that name.
    """
    port = next((p.get("port") for p in obj.get("ports") or []
                 if (p.get("name") or "") == port_name and p.get("port")), None)
    if port is None:
        return []
    ipv6 = obj.get("addressType") == "IPv6"
    out = []
    for ep in obj.get("endpoints") or []:
        conditions = ep.get("conditions") or {}
        addresses = ep.get("addresses") or []
        if conditions.get("ready") is False or conditions.get("terminating") is True or not addresses:
            continue
        address = f"[{addresses[0]}]:{port}" if ipv6 else f"{addresses[0]}:{port}"
        instance_id = (ep.get("targetRef") or {}).get("name") or address
        out.append(WorkerEndpoint(instance_id, role, address))
    return out


SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def default_namespace(kubeconfig: str | None = None) -> str:
    """This pod's namespace, else the kubeconfig context's, else ``default`` (as kubectl does)."""
    try:
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip()
    except OSError:
        pass
    from kubernetes import config

    try:
        _, context = config.list_kube_config_contexts(config_file=kubeconfig)
        return (context or {}).get("context", {}).get("namespace") or "default"
    except (config.ConfigException, OSError, TypeError):
        return "default"


def load_kubernetes_client(kubeconfig: str | None = None) -> Any:
    """An ``ApiClient``: the pod's service account when in a pod, else the kubeconfig."""
    from kubernetes import client, config

    cfg = client.Configuration()
    try:
        if kubeconfig is not None:
            raise config.ConfigException("kubeconfig given")
        config.load_incluster_config(client_configuration=cfg)
    except config.ConfigException:
        try:
            config.load_kube_config(config_file=kubeconfig, client_configuration=cfg, persist_config=False)
        except (config.ConfigException, OSError, TypeError) as e:
            raise ConfigError(f"not in a pod and no usable kubeconfig: {e}", field="kubeconfig") from e
    return client.ApiClient(cfg)


class KubernetesDiscovery:
    """Watches the EndpointSlices of the prefill and decode Services."""

    def __init__(self, namespace: str, *, prefill_selector: str, decode_selector: str, port_name: str = "grpc",
                 api_client: Any = None, kubeconfig: str | None = None, watch_timeout_s: int = 300,
                 request_timeout_s: float = 30.0, backoff_s: tuple[float, float] = (0.5, 30.0)) -> None:
        for name, value in (("namespace", namespace), ("prefill_selector", prefill_selector),
                            ("decode_selector", decode_selector)):
            if not value:
                raise ConfigError("must not be empty", field=name)
        self._namespace = namespace
        self._selectors = {PREFILL: prefill_selector, DECODE: decode_selector}
        self._port_name = port_name
        self._api_client, self._own_client = api_client, api_client is None
        self._kubeconfig = kubeconfig
        self._watch_timeout_s = int(watch_timeout_s)
        self._request_timeout_s = request_timeout_s
        self._backoff_s = backoff_s
        self._view = _View()
        self._by_role: dict[str, dict[str, WorkerEndpoint]] = {PREFILL: {}, DECODE: {}}
        self._since: dict[tuple[str, str], int] = {}  # (role, instance) -> when it appeared there
        self._seq = 0
        self._first_read = {role: asyncio.Event() for role in ROLES}
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # guards _watches against stop()
        self._watches: dict[str, Any] = {}
        self._threads: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        from kubernetes import client

        self._loop = asyncio.get_running_loop()
        if self._api_client is None:
            self._api_client = await asyncio.to_thread(load_kubernetes_client, self._kubeconfig)
        api = client.DiscoveryV1Api(self._api_client)
        for role in ROLES:
            thread = threading.Thread(target=self._watch_role, args=(api, role), daemon=True,
                                      name=f"k8s-discovery-{role}")
            thread.start()
            self._threads.append(thread)
        waits = [asyncio.create_task(e.wait()) for e in self._first_read.values()]
        _, pending = await asyncio.wait(waits, timeout=self._request_timeout_s)
        for task in pending:  # the first list is still failing; the threads keep trying
            task.cancel()

    async def stop(self) -> None:
        with self._lock:
            self._stopping.set()
            for w in self._watches.values():
                w.stop()  # shuts the socket down, so a blocked read returns now
        deadline = time.monotonic() + 5.0  # a client without Watch.stop's socket shutdown waits longer
        for thread in self._threads:
            await asyncio.to_thread(thread.join, max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                logger.warning("%s did not stop within 5s; abandoning it (a daemon thread)", thread.name)
        if self._own_client and self._api_client is not None:
            self._api_client.close()

    def endpoints(self) -> list[WorkerEndpoint]:
        return list(self._view.endpoints)

    def on_change(self, callback: Callable[[list[WorkerEndpoint]], None]) -> None:
        self._view.add(callback)

    def _watch_role(self, api: Any, role: str) -> None:
        """Thread body: list, then watch from the list's resourceVersion; re-list on 410 Gone."""
        from kubernetes import watch
        from kubernetes.client.rest import ApiException
        from urllib3.exceptions import HTTPError

        selector = self._selectors[role]
        slices: dict[str, dict[str, Any]] = {}
        resource_version: str | None = None
        backoff, failing = self._backoff_s[0], False
        timeout = (min(5.0, self._request_timeout_s), self._request_timeout_s)
        while not self._stopping.is_set():
            try:
                if resource_version is None:
                    resp = api.list_namespaced_endpoint_slice(self._namespace, label_selector=selector,
                                                              _preload_content=False, _request_timeout=timeout)
                    body = json.loads(resp.data)
                    slices = {s["metadata"]["name"]: s for s in body.get("items") or []}
                    resource_version = body["metadata"]["resourceVersion"]
                    self._post(role, slices)
                with self._lock:
                    if self._stopping.is_set():
                        return
                    # raw dicts: no model parsing that a field newer than the client could break
                    w = self._watches[role] = watch.Watch(return_type="object")
                started = time.monotonic()
                for event in w.stream(api.list_namespaced_endpoint_slice, self._namespace,
                                      label_selector=selector, resource_version=resource_version,
                                      allow_watch_bookmarks=True, timeout_seconds=self._watch_timeout_s,
                                      _request_timeout=(timeout[0], self._watch_timeout_s + 30)):
                    obj = event["raw_object"]
                    resource_version = obj["metadata"].get("resourceVersion") or resource_version
                    if event["type"] in ("ADDED", "MODIFIED"):
                        slices[obj["metadata"]["name"]] = obj
                    elif event["type"] == "DELETED":
                        slices.pop(obj["metadata"]["name"], None)
                    else:
                        continue  # BOOKMARK: only the resourceVersion moves
                    self._post(role, slices)
                if time.monotonic() - started < 1.0:  # closed at once (a proxy?): do not hammer the API
                    self._stopping.wait(backoff)
                    backoff = min(2 * backoff, self._backoff_s[1])
                    continue
                if failing:
                    logger.info("EndpointSlice watch for %s workers recovered", role)
                backoff, failing = self._backoff_s[0], False
            except ApiException as e:
                if e.status == 410:
                    logger.info("EndpointSlice watch for %s workers expired (410 Gone); re-listing", role)
                    resource_version = None
                    continue
                failing = self._backoff(role, f"HTTP {e.status} {e.reason}", backoff, failing)
                backoff = min(2 * backoff, self._backoff_s[1])
            except (HTTPError, OSError, ValueError, KeyError, TypeError) as e:  # connection, bad JSON
                if self._stopping.is_set():
                    return
                failing = self._backoff(role, repr(e), backoff, failing)
                backoff = min(2 * backoff, self._backoff_s[1])
            except Exception:  # a bug must not end the watch: the router would freeze its view
                logger.exception("EndpointSlice watch for %s workers failed", role)
                failing = self._backoff(role, "see the traceback above", backoff, failing)
                backoff = min(2 * backoff, self._backoff_s[1])

    def _backoff(self, role: str, error: str, delay: float, failing: bool) -> bool:
        (logger.debug if failing else logger.warning)(
            "EndpointSlice list/watch for %s workers failed (%s); retrying in %.1fs", role, error, delay)
        if self._loop is not None and not failing:  # let start() return: the first read is done, badly
            self._loop.call_soon_threadsafe(self._first_read[role].set)
        self._stopping.wait(delay)
        return True

    def _post(self, role: str, slices: dict[str, dict[str, Any]]) -> None:
        """Thread side: hand this role's endpoints to the event loop."""
        endpoints = [e for s in slices.values() for e in endpoints_from_slice(s, role, self._port_name)]
        try:
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._apply, role, endpoints)
        except RuntimeError:  # the loop is closed: we are shutting down
            pass

    def _apply(self, role: str, endpoints: list[WorkerEndpoint]) -> None:
        """Loop side. An instance in both roles (mid role flip) counts in the role it joined last."""
        self._first_read[role].set()
        if self._stopping.is_set():
            return
        new = {e.instance_id: e for e in endpoints}
        for instance_id in new.keys() - self._by_role[role].keys():
            self._seq += 1
            self._since[(role, instance_id)] = self._seq
        for instance_id in self._by_role[role].keys() - new.keys():
            self._since.pop((role, instance_id), None)
        self._by_role[role] = new
        merged: dict[str, WorkerEndpoint] = {}
        for r, by_id in self._by_role.items():
            for instance_id, e in by_id.items():
                other = merged.get(instance_id)
                if other is None or self._since[(r, instance_id)] > self._since[(other.role, instance_id)]:
                    merged[instance_id] = e
        self._view.publish(merged.values())
