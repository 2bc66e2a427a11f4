"""Worker discovery: static lists, the Redis registry (a real redis-server), Kubernetes EndpointSlices.

The Kubernetes tests drive the official client against :class:`FakeApiServer`, a strict stand-in of
the API server that implements exactly the EndpointSlice list and watch of one namespace (bearer
token, Accept header, the query parameters the client may send, 410 Gone for a compacted
resourceVersion) and answers 401/403/404/406/400 for everything else, recording every request.
"""

from __future__ import annotations

import asyncio
import copy
import json
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from common.errors import ConfigError
from router.discovery import (
    RedisDiscovery,
    StaticDiscovery,
    WorkerEndpoint,
    parse_static,
    registry_entry_key,
    registry_index_key,
)
from router.discovery_k8s import KubernetesDiscovery, endpoints_from_slice
from tests.k8s_stand_in import NS, TOKEN, StandInApiServer, send_json
from tests.k8s_stand_in import status as _status
from tests.redis_server import RedisServer, redis_server_fixture  # noqa: F401
from worker.registration import RedisRegistration


async def eventually(pred: Callable[[], bool], timeout_s: float = 5.0, what: str = "condition") -> float:
    start = time.monotonic()
    while not pred():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"{what} not met within {timeout_s}s")
        await asyncio.sleep(0.01)
    return time.monotonic() - start


def view(discovery: Any) -> set[tuple[str, str, str]]:
    return {(e.instance_id, e.role, e.address) for e in discovery.endpoints()}


# --- static ---------------------------------------------------------------------------------------


def test_parse_static() -> None:
    assert parse_static("prefill=h1:1, h2:2 ; decode=p3@h3:3;") == [
        WorkerEndpoint("h1:1", "prefill", "h1:1"), WorkerEndpoint("h2:2", "prefill", "h2:2"),
        WorkerEndpoint("p3", "decode", "h3:3")]
    assert parse_static("decode=[::1]:50051") == [WorkerEndpoint("[::1]:50051", "decode", "[::1]:50051")]


@pytest.mark.parametrize("spec", ["", " ; ", "prefill", "prefill=h1", "colocated=h:1", "prefill=h:0",
                                  "prefill=h:x", "prefill=:1", "prefill=h:1;decode=h:1", "decode=@h:1",
                                  "decode=[::1:5"])
def test_parse_static_rejects(spec: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_static(spec, field="router_workers")
    assert e.value.field == "router_workers"


def test_static_discovery_publishes_on_start() -> None:
    async def body() -> None:
        d = StaticDiscovery(parse_static("prefill=h1:1;decode=h2:2"))
        seen: list[list[WorkerEndpoint]] = []
        d.on_change(seen.append)
        assert d.endpoints() == []
        await d.start()
        assert view(d) == {("h1:1", "prefill", "h1:1"), ("h2:2", "decode", "h2:2")}
        assert len(seen) == 1 and seen[0] == d.endpoints()
        await d.stop()

    asyncio.run(body())
    with pytest.raises(ConfigError):
        StaticDiscovery([WorkerEndpoint("x", "colocated", "h:1")])


# --- Redis registry -------------------------------------------------------------------------------


def test_redis_registry_roles_stop_and_expiry(redis_server: RedisServer) -> None:
    async def body() -> None:
        url = redis_server.url
        p0 = RedisRegistration(url, WorkerEndpoint("p0", "prefill", "10.0.0.1:5001"), ttl_s=3.0)
        d0 = RedisRegistration(url, WorkerEndpoint("d0", "decode", "10.0.0.2:5002"), ttl_s=3.0)
        d1 = RedisRegistration(url, WorkerEndpoint("d1", "decode", "10.0.0.3:5003"), ttl_s=1.0)
        assert await p0.start() and await d0.start() and await d1.start()
        disc = RedisDiscovery(url, poll_interval_s=0.05)
        changes: list[list[WorkerEndpoint]] = []
        disc.on_change(changes.append)
        await disc.start()
        assert view(disc) == {("p0", "prefill", "10.0.0.1:5001"), ("d0", "decode", "10.0.0.2:5002"),
                              ("d1", "decode", "10.0.0.3:5003")}
        assert len(changes) == 1

        assert await p0.set_role("decode")
        await eventually(lambda: ("p0", "decode", "10.0.0.1:5001") in view(disc), what="role change")
        assert changes[-1] == disc.endpoints() and len(changes) == 2

        await d0.stop()  # deleted at once: gone within a poll or two, long before its 3 s TTL
        assert await eventually(lambda: "d0" not in {e for e, _, _ in view(disc)}) < 0.5

        d1._task.cancel()  # a crash: no more heartbeats, no cleanup
        killed_at = time.monotonic()
        await asyncio.sleep(0.2)
        assert "d1" in {e for e, _, _ in view(disc)}
        await eventually(lambda: "d1" not in {e for e, _, _ in view(disc)}, timeout_s=3.0)
        assert 0.6 < time.monotonic() - killed_at < 1.6  # its 1 s TTL, plus a poll
        await eventually(lambda: not redis_server.client().sismember(registry_index_key("pdserve"), "d1"),
                         what="expired member pruned from the index")
        assert view(disc) == {("p0", "decode", "10.0.0.1:5001")}
        await p0.stop()
        await d1.stop()
        await disc.stop()

    asyncio.run(body())


def test_stop_ends_discovery_and_heartbeat_whenever_the_cancel_lands(redis_server: RedisServer) -> None:
    """A cancel arriving inside a Redis call (where redis-py can turn it into its TimeoutError) must end the
    discovery poll and the registration heartbeat, not come out as an unreachable registry."""
    async def body() -> None:
        rng = random.Random(0)
        for i in range(60):
            registration = RedisRegistration(redis_server.url, WorkerEndpoint(f"w{i}", "decode", "10.0.0.9:5001"),
                                             ttl_s=0.06)
            disc = RedisDiscovery(redis_server.url, poll_interval_s=0.0005)
            assert await registration.start()
            await disc.start()
            await asyncio.sleep(rng.uniform(0.0, 0.01))
            async with asyncio.timeout(5):
                await disc.stop()
                await registration.stop()

    asyncio.run(body())


def test_redis_discovery_survives_redis_restart(redis_server: RedisServer) -> None:
    async def body() -> None:
        url = redis_server.url
        regs = [RedisRegistration(url, WorkerEndpoint("p0", "prefill", "10.0.0.1:5001"), ttl_s=0.6),
                RedisRegistration(url, WorkerEndpoint("d0", "decode", "10.0.0.2:5002"), ttl_s=0.6)]
        for r in regs:
            await r.start()
        disc = RedisDiscovery(url, poll_interval_s=0.05, timeout_s=0.2)
        changes: list[list[WorkerEndpoint]] = []
        disc.on_change(changes.append)
        await disc.start()
        before = view(disc)
        assert len(before) == 2

        redis_server.stop()
        await asyncio.sleep(1.0)  # many failed polls and heartbeats, longer than the TTL
        assert view(disc) == before

        redis_server.start()  # same port, empty: the workers must register again
        await eventually(lambda: len(redis_server.client().smembers(registry_index_key("pdserve"))) == 2,
                         what="workers re-registered")
        assert await regs[0].set_role("decode")
        await eventually(lambda: ("p0", "decode", "10.0.0.1:5001") in view(disc), what="recovered view")
        assert all(len(c) == 2 for c in changes), "the view never lost a worker"
        for r in regs:
            await r.stop()
        await disc.stop()

    asyncio.run(body())


def test_redis_discovery_skips_malformed_entries(redis_server: RedisServer) -> None:
    async def body() -> None:
        r = redis_server.client()
        bad = {"bad-json": "{", "not-object": "[1]", "wrong-role": {"role": "colocated"},
               "bad-address": {"address": "no-port"}, "other-id": {"instance_id": "someone-else"},
               "bad-ttl": {"ttl_s": "soon"}}
        for instance_id, value in bad.items():
            if isinstance(value, dict):
                value = json.dumps({"instance_id": instance_id, "role": "decode", "address": "h:1",
                                    "ttl_s": 10, **value})
            r.set(registry_entry_key("pdserve", instance_id), value, px=60_000)
            r.sadd(registry_index_key("pdserve"), instance_id)
        r.sadd(registry_index_key("pdserve"), "expired-long-ago")  # in the index, no entry
        good = RedisRegistration(redis_server.url, WorkerEndpoint("d0", "decode", "h:2"))
        await good.start()
        disc = RedisDiscovery(redis_server.url, poll_interval_s=0.05)
        await disc.start()
        assert view(disc) == {("d0", "decode", "h:2")}
        assert not r.sismember(registry_index_key("pdserve"), "expired-long-ago")
        await asyncio.sleep(0.2)  # polls keep skipping them (and log each only once)
        assert view(disc) == {("d0", "decode", "h:2")}
        await good.stop()
        await disc.stop()

    asyncio.run(body())


def test_redis_discovery_starts_while_redis_is_down(redis_server: RedisServer) -> None:
    async def body() -> None:
        redis_server.stop()
        disc = RedisDiscovery(redis_server.url, poll_interval_s=0.05, timeout_s=0.2)
        await disc.start()  # logs, does not raise
        assert disc.endpoints() == []
        redis_server.start()
        reg = RedisRegistration(redis_server.url, WorkerEndpoint("p0", "prefill", "h:1"))
        await reg.start()
        await eventually(lambda: view(disc) == {("p0", "prefill", "h:1")})
        await reg.stop()
        await disc.stop()

    asyncio.run(body())
    with pytest.raises(ConfigError) as e:
        RedisDiscovery("http://nope")
    assert e.value.field == "redis_url"


# --- Kubernetes -----------------------------------------------------------------------------------

PREFILL_SEL = "app.kubernetes.io/component=prefill"
DECODE_SEL = "app.kubernetes.io/component=decode"
WATCH_TIMEOUT_S = 60
_PATH = re.compile(r"/apis/discovery\.k8s\.io/v1/namespaces/([^/]+)/endpointslices")
_LIST_PARAMS = {"labelSelector"}
_WATCH_PARAMS = {"labelSelector", "watch", "resourceVersion", "timeoutSeconds", "allowWatchBookmarks"}


def make_slice(name: str, component: str, endpoints: list[tuple[str, str, bool | None, bool]],
               port_name: str = "grpc") -> dict[str, Any]:
    """endpoints: (pod name, IP, ready, terminating)."""
    eps = []
    for pod, ip, ready, terminating in endpoints:
        conditions: dict[str, Any] = {"serving": ready is not False, "terminating": terminating}
        if ready is not None:
            conditions["ready"] = ready
        eps.append({"addresses": [ip], "conditions": conditions, "nodeName": "node-1",
                    "targetRef": {"kind": "Pod", "name": pod, "namespace": NS, "uid": f"uid-{pod}"}})
    return {"metadata": {"name": name, "namespace": NS, "labels": {
                "kubernetes.io/service-name": f"pdserve-{component}", "app.kubernetes.io/component": component}},
            "addressType": "IPv4", "endpoints": eps,
            "ports": [{"name": port_name, "port": 50051, "protocol": "TCP"}, {"name": "metrics", "port": 9090}]}


class FakeApiServer(StandInApiServer):
    """The EndpointSlice list + watch of namespace NS, as the real API server answers them."""

    def __init__(self, gone: str = "event") -> None:
        self.gone = gone  # how a stale watch is refused: an ERROR event (usual) or an HTTP 410
        self.cond = threading.Condition()
        self.rv = 100
        self.compacted_rv = self.rv  # watching from an older resourceVersion: 410 Gone
        self.slices: dict[str, dict[str, Any]] = {}
        self.history: list[tuple[int, str, dict[str, Any]]] = []
        self.generation = 0  # bumped to end every open watch
        self.closed = False
        self.requests: list[dict[str, Any]] = []
        super().__init__()

    def _apply(self, kind: str, obj: dict[str, Any], record: bool = True) -> None:
        self.rv += 1
        obj = copy.deepcopy(obj)
        obj["metadata"]["resourceVersion"] = str(self.rv)
        if kind == "DELETED":
            self.slices.pop(obj["metadata"]["name"])
        else:
            self.slices[obj["metadata"]["name"]] = obj
        if record:
            self.history.append((self.rv, kind, obj))
        self.cond.notify_all()

    def put(self, obj: dict[str, Any]) -> None:
        with self.cond:
            self._apply("MODIFIED" if obj["metadata"]["name"] in self.slices else "ADDED", obj)

    def delete(self, name: str) -> None:
        with self.cond:
            self._apply("DELETED", self.slices[name])

    def expire(self, *changes: dict[str, Any]) -> None:
        """Apply ``changes`` unseen by any watch, compact history past them, and end every watch."""
        with self.cond:
            for obj in changes:
                self._apply("MODIFIED" if obj["metadata"]["name"] in self.slices else "ADDED", obj, False)
            self.history.clear()
            self.compacted_rv = self.rv
            self.generation += 1
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        super().close()

    def calls(self, selector: str) -> list[tuple[str, str]]:
        """(kind, answer) of each request for ``selector``, in order."""
        return [(r["kind"], r["answer"]) for r in self.requests if r["query"].get("labelSelector") == selector]

    # --- request handling (handler threads) ---

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        url = urlsplit(h.path)
        raw = parse_qs(url.query, keep_blank_values=True)
        query = {k: v[0] for k, v in raw.items()}
        record: dict[str, Any] = {"method": h.command, "path": url.path, "query": query,
                                  "kind": "watch" if "watch" in query else "list", "answer": None}
        with self.cond:
            self.requests.append(record)
        m = _PATH.fullmatch(url.path)
        accept = [a.split(";")[0].strip() for a in h.headers.get("Accept", "").split(",")]
        if h.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self._error(h, record, _status(401, "Unauthorized", "Unauthorized"))
        if h.command != "GET":
            return self._error(h, record, _status(403, "Forbidden", f"verb {h.command} is forbidden"))
        if m is None:
            return self._error(h, record, _status(404, "NotFound", "the server could not find the resource"))
        if m.group(1) != NS:
            return self._error(h, record, _status(403, "Forbidden", f"cannot list in namespace {m.group(1)}"))
        if "application/json" not in accept:
            return self._error(h, record, _status(406, "NotAcceptable", "only application/json"))
        allowed = _WATCH_PARAMS if "watch" in query else _LIST_PARAMS
        selector = self._selector(query.get("labelSelector", ""))
        if (any(len(v) != 1 for v in raw.values()) or set(query) - allowed or selector is None
                or query.get("watch", "true") != "true"
                or ("watch" in query and not query.get("resourceVersion", "").isdigit())):
            return self._error(h, record, _status(400, "BadRequest", f"unexpected query {url.query}"))
        if "watch" in query:
            return self._watch(h, record, selector, int(query["resourceVersion"]),
                               int(query.get("timeoutSeconds", "1800")))
        with self.cond:
            items = [s for s in self.slices.values() if self._matches(s, selector)]
            record["answer"] = rv = str(self.rv)
        send_json(h, 200, {"kind": "EndpointSliceList", "apiVersion": "discovery.k8s.io/v1",
                            "metadata": {"resourceVersion": rv}, "items": items})

    def _watch(self, h: BaseHTTPRequestHandler, record: dict[str, Any], selector: dict[str, str], rv: int,
               timeout_s: int) -> None:
        with self.cond:
            gone = rv < self.compacted_rv
            generation = self.generation
        record["answer"] = "gone" if gone else "ok"
        gone_status = _status(410, "Expired", f"too old resource version: {rv} ({self.compacted_rv})")
        if gone and self.gone == "status":
            return send_json(h, 410, gone_status)
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()

        def event(kind: str, obj: dict[str, Any]) -> None:
            data = json.dumps({"type": kind, "object": obj}).encode() + b"\n"
            h.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            h.wfile.flush()

        try:
            if gone:
                event("ERROR", gone_status)
            else:
                deadline, bookmarked = time.monotonic() + timeout_s, False
                while True:
                    with self.cond:
                        pending = [e for e in self.history if e[0] > rv]
                        now_rv = self.rv
                        if not pending and (self.closed or generation != self.generation
                                            or time.monotonic() > deadline):
                            break
                        if not pending and bookmarked:
                            self.cond.wait(0.05)
                            continue
                    if not pending:  # idle and every event up to now_rv sent: a bookmark says so
                        event("BOOKMARK", {"kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
                                           "metadata": {"resourceVersion": str(now_rv)}})
                        rv, bookmarked = now_rv, True
                    for event_rv, kind, obj in pending:
                        rv = event_rv
                        if self._matches(obj, selector):
                            event(kind, {"kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1", **obj})
            h.wfile.write(b"0\r\n\r\n")
            h.wfile.flush()
        except OSError:  # the client went away (Watch.stop shuts its socket down)
            h.close_connection = True

    @staticmethod
    def _selector(text: str) -> dict[str, str] | None:
        out = {}
        for term in filter(None, text.split(",")):
            key, sep, value = term.partition("=")
            if not sep or not key or value.startswith("="):
                return None
            out[key] = value
        return out or None

    @staticmethod
    def _matches(obj: dict[str, Any], selector: dict[str, str]) -> bool:
        labels = obj["metadata"].get("labels") or {}
        return all(labels.get(k) == v for k, v in selector.items())

    def _error(self, h: BaseHTTPRequestHandler, record: dict[str, Any], status: dict[str, Any]) -> None:
        record["answer"] = status["code"]
        h.close_connection = True
        send_json(h, status["code"], status)


@pytest.fixture(params=["event", "status"])
def apiserver(request: pytest.FixtureRequest) -> Iterator[FakeApiServer]:
    server = FakeApiServer(gone=request.param)
    yield server
    server.close()


def test_endpoints_from_slice() -> None:
    s = make_slice("s", "decode", [("d0", "10.0.0.1", True, False), ("d1", "10.0.0.2", False, False),
                                   ("d2", "10.0.0.3", True, True), ("d3", "10.0.0.4", None, False)])
    assert endpoints_from_slice(s, "decode", "grpc") == [WorkerEndpoint("d0", "decode", "10.0.0.1:50051"),
                                                         WorkerEndpoint("d3", "decode", "10.0.0.4:50051")]
    assert endpoints_from_slice(s, "decode", "http") == []
    s = {"addressType": "IPv6", "ports": [{"name": "grpc", "port": 7}],
         "endpoints": [{"addresses": ["fd00::1", "fd00::2"], "conditions": {"ready": True}}]}
    assert endpoints_from_slice(s, "prefill", "grpc") == [WorkerEndpoint("[fd00::1]:7", "prefill", "[fd00::1]:7")]


def test_kubernetes_list_watch_and_relist(apiserver: FakeApiServer) -> None:
    apiserver.put(make_slice("prefill-a", "prefill", [("p0", "10.0.0.1", True, False),
                                                      ("p1", "10.0.0.2", False, False),
                                                      ("p2", "10.0.0.3", True, True)]))
    apiserver.put(make_slice("decode-a", "decode", [("d0", "10.0.1.1", True, False)]))
    apiserver.put(make_slice("other", "router", [("r0", "10.0.2.1", True, False)]))

    async def body() -> None:
        disc = KubernetesDiscovery(NS, prefill_selector=PREFILL_SEL, decode_selector=DECODE_SEL,
                                   api_client=apiserver.api_client(), watch_timeout_s=WATCH_TIMEOUT_S)
        changes: list[list[WorkerEndpoint]] = []
        disc.on_change(changes.append)
        await disc.start()
        assert view(disc) == {("p0", "prefill", "10.0.0.1:50051"), ("d0", "decode", "10.0.1.1:50051")}

        # MODIFIED: p1 becomes ready; ADDED: a second decode slice; DELETED: the first one.
        apiserver.put(make_slice("prefill-a", "prefill", [("p0", "10.0.0.1", True, False),
                                                          ("p1", "10.0.0.2", True, False)]))
        apiserver.put(make_slice("decode-b", "decode", [("d1", "10.0.1.2", True, False)]))
        await eventually(lambda: {e for e, _, _ in view(disc)} == {"p0", "p1", "d0", "d1"})
        apiserver.delete("decode-a")
        await eventually(lambda: {e for e, _, _ in view(disc)} == {"p0", "p1", "d1"})

        # A role flip: p1 joins the decode slice, then leaves the prefill one.
        apiserver.put(make_slice("decode-b", "decode", [("d1", "10.0.1.2", True, False),
                                                        ("p1", "10.0.0.2", True, False)]))
        await eventually(lambda: ("p1", "decode", "10.0.0.2:50051") in view(disc))
        assert ("p1", "prefill", "10.0.0.2:50051") not in view(disc)
        apiserver.put(make_slice("prefill-a", "prefill", [("p0", "10.0.0.1", True, False)]))
        await asyncio.sleep(0.1)
        assert view(disc) == {("p0", "prefill", "10.0.0.1:50051"), ("d1", "decode", "10.0.1.2:50051"),
                              ("p1", "decode", "10.0.0.2:50051")}

        # The watches break and history is compacted past a change they never saw: only a re-list finds it.
        apiserver.expire(make_slice("prefill-b", "prefill", [("p3", "10.0.0.9", True, False)]))
        await eventually(lambda: ("p3", "prefill", "10.0.0.9:50051") in view(disc), what="re-list")
        await eventually(lambda: all(len(apiserver.calls(s)) == 5 for s in (PREFILL_SEL, DECODE_SEL)),
                         what="watching again after the re-list")
        assert all(len(c) == len({e.instance_id for e in c}) for c in changes), "an instance in two roles"
        await disc.stop()

    asyncio.run(body())
    count = len(apiserver.requests)
    time.sleep(0.2)
    assert len(apiserver.requests) == count, "requests after stop()"
    for selector in (PREFILL_SEL, DECODE_SEL):
        assert apiserver.calls(selector) == [("list", apiserver.calls(selector)[0][1]), ("watch", "ok"),
                                             ("watch", "gone"), ("list", apiserver.calls(selector)[3][1]),
                                             ("watch", "ok")]
        reqs = [r for r in apiserver.requests if r["query"]["labelSelector"] == selector]
        first_list, first_watch, stale_watch, relist, last_watch = reqs
        for r in reqs:
            assert r["method"] == "GET" and r["path"] == f"/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices"
        assert first_list["query"] == relist["query"] == {"labelSelector": selector}
        watch_query = {"labelSelector": selector, "watch": "true", "timeoutSeconds": str(WATCH_TIMEOUT_S),
                       "allowWatchBookmarks": "true"}
        assert first_watch["query"] == {**watch_query, "resourceVersion": first_list["answer"]}
        assert last_watch["query"] == {**watch_query, "resourceVersion": relist["answer"]}
        assert int(first_list["answer"]) <= int(stale_watch["query"]["resourceVersion"]) < apiserver.compacted_rv
        assert int(relist["answer"]) == apiserver.compacted_rv


def test_kubernetes_bad_token_retries_without_raising(apiserver: FakeApiServer) -> None:
    apiserver.put(make_slice("decode-a", "decode", [("d0", "10.0.1.1", True, False)]))

    async def body() -> None:
        disc = KubernetesDiscovery(NS, prefill_selector=PREFILL_SEL, decode_selector=DECODE_SEL,
                                   api_client=apiserver.api_client("wrong"), backoff_s=(0.05, 0.1))
        await disc.start()
        assert disc.endpoints() == []
        await eventually(lambda: len(apiserver.calls(DECODE_SEL)) >= 3, what="retries with backoff")
        await disc.stop()

    asyncio.run(body())
    assert {answer for _, answer in apiserver.calls(DECODE_SEL)} == {401}
    assert {kind for kind, _ in apiserver.calls(DECODE_SEL)} == {"list"}


def test_kubernetes_kubeconfig(apiserver: FakeApiServer, tmp_path: Any) -> None:
    apiserver.put(make_slice("decode-a", "decode", [("d0", "10.0.1.1", True, False)]))
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "fake", "cluster": {"server": apiserver.url}}],
        "users": [{"name": "u", "user": {"token": TOKEN}}],
        "contexts": [{"name": "test", "context": {"cluster": "fake", "user": "u", "namespace": NS}}]}))

    async def body() -> None:
        disc = KubernetesDiscovery(NS, prefill_selector=PREFILL_SEL, decode_selector=DECODE_SEL,
                                   kubeconfig=str(kubeconfig))
        await disc.start()
        assert view(disc) == {("d0", "decode", "10.0.1.1:50051")}
        await disc.stop()
        missing = KubernetesDiscovery(NS, prefill_selector=PREFILL_SEL, decode_selector=DECODE_SEL,
                                      kubeconfig=str(tmp_path / "missing"))
        with pytest.raises(ConfigError) as e:
            await missing.start()
        assert e.value.field == "kubeconfig"

    asyncio.run(body())


def test_kubernetes_strict_stand_in_refuses_other_requests(apiserver: FakeApiServer) -> None:
    import urllib.request

    def status(path: str, token: str = TOKEN, accept: str = "application/json", method: str = "GET") -> int:
        req = urllib.request.Request(apiserver.url + path, method=method,
                                     headers={"Authorization": f"Bearer {token}", "Accept": accept})
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                return resp.status
        except urllib.error.HTTPError as e:
            return e.code

    base = f"/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices"
    assert status(f"{base}?labelSelector=a%3Db") == 200
    assert status(f"{base}?labelSelector=a%3Db", token="x") == 401
    assert status(f"{base}?labelSelector=a%3Db", accept="application/yaml") == 406
    assert status(f"{base}?labelSelector=a%3Db&limit=5") == 400
    assert status(f"{base}?labelSelector=a%3Db&watch=true") == 400  # a watch needs a resourceVersion
    assert status("/apis/discovery.k8s.io/v1/namespaces/kube-system/endpointslices?labelSelector=a%3Db") == 403
    assert status(f"{base}?labelSelector=a%3Db", method="DELETE") == 403
    assert status("/api/v1/namespaces/serving/pods") == 404
