"""Where the router learns its workers: a static list, a Redis registry, or Kubernetes EndpointSlices.

Every source implements :class:`Discovery`. Lifecycle: construct, ``await start()`` (the first view is
read before it returns; an unreachable backend is logged and retried, never raised), read
``endpoints()`` on the hot path (a cached list, no I/O), get ``on_change`` callbacks on the event
loop when the set changes (an instance added, removed, or its role or address changed), and
``await stop()``. The view is empty until ``start()``.

**Redis registry** (written by ``worker/registration.py``, read by :class:`RedisDiscovery`)::

    {prefix}:workers                  SET of instance ids: the index
    {prefix}:worker:{instance_id}     STRING, JSON {"instance_id", "role", "address", "ttl_s", "ts"}
                                      with PX ttl; rewritten (SET + SADD in one MULTI) every ttl/3

A worker that stops heartbeating vanishes when its key expires; discovery then drops the index
member with a Lua check-and-remove, so a worker re-registering at that moment is not lost. The index
exists because the same Redis holds one key per prompt block (``router/shared_state.py``): a
``SCAN`` for worker keys would walk all of them every poll. After Redis restarts empty (or comes
back after an outage, when every key may have expired) workers re-register within ttl/3; meanwhile
discovery holds on to its last view for one TTL rather than report an empty cluster.

**Kubernetes**: one list + watch of ``discovery.k8s.io/v1`` EndpointSlices per role, each in its own
thread (the official client is synchronous), posting that role's endpoints to the event loop. The
label selectors match the slices' labels, which the EndpointSlice controller copies from the
Service (``kubernetes.io/service-name=<svc>`` always works).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from common.errors import ConfigError

logger = logging.getLogger(__name__)

PREFILL, DECODE = "prefill", "decode"
ROLES = (PREFILL, DECODE)
DEFAULT_PREFIX = "pdserve"
DEFAULT_TTL_S = 10.0
REGISTRY_INDEX_KEY = "{prefix}:workers"
REGISTRY_ENTRY_KEY = "{prefix}:worker:{instance_id}"
REDIS_ERRORS = (RedisError, OSError, asyncio.TimeoutError)


@dataclass(frozen=True)
class WorkerEndpoint:
    instance_id: str
    role: str  # "prefill" | "decode"
    address: str  # host:port of the worker's gRPC server


class Discovery(Protocol):
    async def start(self) -> None:
        """Called once by the router at startup; returns after the first read of the source."""

    async def stop(self) -> None:
        """Called once at shutdown; no callbacks fire afterwards."""

    def endpoints(self) -> list[WorkerEndpoint]:
        """The current view, sorted by (role, instance_id); cheap, called per request."""

    def on_change(self, callback: Callable[[list[WorkerEndpoint]], None]) -> None:
        """Register ``callback(view)``, run on the event loop each time the view changes."""


def valid_address(address: str) -> bool:
    host, sep, port = address.rpartition(":")
    if host.startswith("["):
        host = host[1:-1] if host.endswith("]") else ""
    return bool(sep and host and port.isdigit() and 0 < int(port) < 65536)


def registry_index_key(prefix: str) -> str:
    return REGISTRY_INDEX_KEY.format(prefix=prefix)


def registry_entry_key(prefix: str, instance_id: str) -> str:
    return REGISTRY_ENTRY_KEY.format(prefix=prefix, instance_id=instance_id)


def encode_entry(endpoint: WorkerEndpoint, ttl_s: float) -> str:
    return json.dumps({"instance_id": endpoint.instance_id, "role": endpoint.role,
                       "address": endpoint.address, "ttl_s": ttl_s, "ts": time.time()})


def decode_entry(instance_id: str, raw: str) -> tuple[WorkerEndpoint, float]:
    """(endpoint, ttl_s) of a registry value; ValueError says what is wrong with it."""
    obj = json.loads(raw)
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    if obj.get("instance_id") != instance_id:
        raise ValueError(f"instance_id {obj.get('instance_id')!r} does not match the index")
    role, address, ttl_s = obj.get("role"), obj.get("address"), obj.get("ttl_s", DEFAULT_TTL_S)
    if role not in ROLES:
        raise ValueError(f"role {role!r} is not one of {ROLES}")
    if not isinstance(address, str) or not valid_address(address):
        raise ValueError(f"address {address!r} is not host:port")
    if not isinstance(ttl_s, int | float) or ttl_s <= 0:
        raise ValueError(f"ttl_s {ttl_s!r} is not a positive number")
    return WorkerEndpoint(instance_id, role, address), float(ttl_s)


def open_redis(url: str, *, timeout_s: float, field: str = "redis_url") -> redis.asyncio.Redis:
    """A client that fails fast: short timeouts and no hidden retries (callers own their retry policy)."""
    try:
        return redis.asyncio.from_url(url, decode_responses=True, socket_timeout=timeout_s,
                                      socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0))
    except ValueError as e:  # the message would echo the URL, which may hold a password
        raise ConfigError("must be a redis://, rediss:// or unix:// URL", field=field) from e


class _View:
    """The current endpoint list and the callbacks to tell when it changes (event loop only)."""

    def __init__(self) -> None:
        self.endpoints: list[WorkerEndpoint] = []
        self._callbacks: list[Callable[[list[WorkerEndpoint]], None]] = []

    def add(self, callback: Callable[[list[WorkerEndpoint]], None]) -> None:
        self._callbacks.append(callback)

    def publish(self, endpoints: Iterable[WorkerEndpoint]) -> bool:
        new = sorted(set(endpoints), key=lambda e: (e.role, e.instance_id, e.address))
        if new == self.endpoints:
            return False
        logger.info("workers now: %s", ", ".join(f"{e.instance_id}={e.role}@{e.address}" for e in new) or "none")
        self.endpoints = new
        for callback in list(self._callbacks):
            try:
                callback(list(new))
            except Exception:
                logger.exception("discovery on_change callback failed")
        return True


# --- static ---------------------------------------------------------------------------------------


def parse_static(spec: str, *, field: str = "workers") -> list[WorkerEndpoint]:
    """Parse ``"prefill=h1:1,h2:2;decode=h3:3"``; an item may name its instance: ``p0@h1:1``.

    The instance id defaults to the address (what a worker reports when not given one).
    """
    endpoints: dict[str, WorkerEndpoint] = {}
    for group in (g.strip() for g in spec.split(";")):
        if not group:
            continue
        role, sep, items = group.partition("=")
        role = role.strip()
        if not sep or role not in ROLES:
            raise ConfigError(f"{group!r} is not <role>=<host:port>,... with role in {ROLES}", field=field)
        for item in (i.strip() for i in items.split(",")):
            if not item:
                continue
            name, at, address = item.rpartition("@")
            instance_id = name if at else address
            if not valid_address(address) or not instance_id:
                raise ConfigError(f"{item!r} is not [name@]host:port", field=field)
            if instance_id in endpoints:
                raise ConfigError(f"{instance_id!r} is listed twice", field=field)
            endpoints[instance_id] = WorkerEndpoint(instance_id, role, address)
    if not endpoints:
        raise ConfigError("no workers; expected 'prefill=host:port,...;decode=host:port,...'", field=field)
    return list(endpoints.values())


class StaticDiscovery:
    """A fixed set of workers (``pdserve up``, tests): published at start, never changes."""

    def __init__(self, endpoints: Iterable[WorkerEndpoint]) -> None:
        self._endpoints = list(endpoints)
        for e in self._endpoints:
            if e.role not in ROLES:
                raise ConfigError(f"{e.instance_id}: role {e.role!r} is not one of {ROLES}", field="workers")
        self._view = _View()

    async def start(self) -> None:
        self._view.publish(self._endpoints)

    async def stop(self) -> None:
        pass

    def endpoints(self) -> list[WorkerEndpoint]:
        return list(self._view.endpoints)

    def on_change(self, callback: Callable[[list[WorkerEndpoint]], None]) -> None:
        self._view.add(callback)


# --- Redis registry -------------------------------------------------------------------------------

# KEYS[1]: the index; KEYS[2..]: entry keys; ARGV: the instance ids of KEYS[2..]. Drops the members
# whose entry is (still) gone, atomically, so a concurrent re-registration survives.
_PRUNE_LUA = """
local n = 0
for i = 2, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 0 then n = n + redis.call('SREM', KEYS[1], ARGV[i - 1]) end
end
return n
"""


class RedisDiscovery:
    """Polls the Redis registry every ``poll_interval_s``: SMEMBERS + INFO, then one MGET."""

    def __init__(self, url: str, *, prefix: str = DEFAULT_PREFIX, poll_interval_s: float = 1.0,
                 timeout_s: float = 1.0) -> None:
        if poll_interval_s <= 0:
            raise ConfigError(f"must be positive, got {poll_interval_s}", field="poll_interval_s")
        self._redis = open_redis(url, timeout_s=timeout_s)
        self._prune = self._redis.register_script(_PRUNE_LUA)
        self._prefix = prefix
        self._poll_interval_s = poll_interval_s
        self._view = _View()
        self._task: asyncio.Task[None] | None = None
        self._failing = False
        self._run_id: str | None = None  # Redis's; a new one means it restarted (empty)
        self._hold_until = 0.0  # keep missing workers in the view until then (after an outage)
        self._ttl_s = DEFAULT_TTL_S  # the longest TTL among the entries last read
        self._warned: dict[str, str] = {}  # instance id -> malformed value already logged

    async def start(self) -> None:
        await self._poll()
        self._task = asyncio.create_task(self._run(), name="redis-discovery")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._redis.aclose()

    def endpoints(self) -> list[WorkerEndpoint]:
        return list(self._view.endpoints)

    def on_change(self, callback: Callable[[list[WorkerEndpoint]], None]) -> None:
        self._view.add(callback)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._poll_interval_s)
            try:
                await self._poll()
            except Exception:  # a bug must not end discovery: the router would freeze its view
                logger.exception("redis discovery poll failed")

    async def _poll(self) -> None:
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.smembers(registry_index_key(self._prefix))
                pipe.info("server")
                members, info = await pipe.execute()
            members = sorted(members)
            keys = [registry_entry_key(self._prefix, m) for m in members]
            values = await self._redis.mget(keys) if keys else []
        except REDIS_ERRORS as e:
            if not self._failing:
                logger.warning("worker registry unreachable (%r); keeping the last view of %d workers, "
                               "retrying every %.1fs", e, len(self._view.endpoints), self._poll_interval_s)
            self._failing = True
            return
        run_id = info.get("run_id")
        if self._failing or (self._run_id is not None and run_id != self._run_id):
            logger.info("worker registry %s; holding the last view for %.1fs while workers re-register",
                        "back" if self._failing else "restarted", self._ttl_s)
            self._hold_until = time.monotonic() + self._ttl_s
        self._failing, self._run_id = False, run_id
        found: dict[str, WorkerEndpoint] = {}
        gone: list[str] = []
        ttls = []
        for member, raw in zip(members, values):
            if raw is None:
                gone.append(member)
                continue
            try:
                endpoint, ttl_s = decode_entry(member, raw)
            except ValueError as e:  # json.JSONDecodeError is one
                if self._warned.get(member) != raw:
                    logger.warning("skipping malformed registry entry %s: %s",
                                   registry_entry_key(self._prefix, member), e)
                    self._warned[member] = raw
                continue
            self._warned.pop(member, None)
            ttls.append(ttl_s)
            found[endpoint.instance_id] = endpoint
        if ttls:
            self._ttl_s = max(ttls)
        if time.monotonic() < self._hold_until:
            for endpoint in self._view.endpoints:
                found.setdefault(endpoint.instance_id, endpoint)
        if gone:
            try:
                await self._prune(keys=[registry_index_key(self._prefix)]
                                  + [registry_entry_key(self._prefix, m) for m in gone], args=gone)
            except REDIS_ERRORS as e:
                logger.debug("pruning the worker index failed: %r", e)
        self._view.publish(found.values())


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
