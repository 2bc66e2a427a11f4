"""Shared router state: LocalState and RedisState (a real redis-server) against one contract, then
what only Redis does: several routers, crash expiry, one round trip per lookup, Redis going away."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from common.errors import ConfigError
from router.shared_state import LocalState, RedisState, SharedState, leading_blocks
from tests.redis_server import RedisServer, redis_server_fixture  # noqa: F401


async def eventually(pred: Callable[[], bool], timeout_s: float = 5.0, what: str = "condition") -> None:
    start = time.monotonic()
    while not pred():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"{what} not met within {timeout_s}s")
        await asyncio.sleep(0.01)


def run_with(make: Callable[[], SharedState], body: Callable[[SharedState], Awaitable[None]]) -> None:
    async def main() -> None:
        state = make()
        await state.start()
        try:
            await body(state)
        finally:
            await state.stop()

    asyncio.run(main())


@pytest.fixture(params=["local", "redis"])
def make_state(request: pytest.FixtureRequest) -> Callable[[], SharedState]:
    if request.param == "local":
        return LocalState
    server: RedisServer = request.getfixturevalue("redis_server")
    return lambda: RedisState(server.url, "router-a")


def test_leading_blocks() -> None:
    assert leading_blocks(["a", "a", None, "b", "a"]) == {"a": 5, "b": 4}
    assert leading_blocks([None, None]) == {}


def test_contract_in_flight(make_state: Callable[[], SharedState]) -> None:
    async def body(state: SharedState) -> None:
        assert state.in_flight() == {}
        await state.add_in_flight("p0", 1, 100)
        await state.add_in_flight("p0", 1, 50)
        await state.add_in_flight("d0", 2, 10)
        await state.add_in_flight("p0", -1, -100)
        assert state.in_flight() == {"p0": (1, 50), "d0": (2, 10)}
        await state.add_in_flight("d0", -2, -10)
        assert state.in_flight() == {"p0": (1, 50)}

    run_with(make_state, body)


def test_contract_prefix(make_state: Callable[[], SharedState]) -> None:
    async def body(state: SharedState) -> None:
        assert await state.lookup_prefix([]) == {}
        assert await state.lookup_prefix([1, 2, 3]) == {}
        await state.record_prefix("p0", [1, 2, 3], ttl_s=30)
        await state.record_prefix("p1", [1, 2, 9], ttl_s=30)  # the last pick owns blocks 1 and 2
        assert await state.lookup_prefix([1, 2, 3]) == {"p1": 2, "p0": 3}
        assert await state.lookup_prefix([1, 2, 9, 10]) == {"p1": 3}
        assert await state.lookup_prefix([7, 2, 3]) == {"p1": 2, "p0": 3}  # chained: position says prefix
        await state.record_prefix("p2", [(1 << 64) - 1, 5], ttl_s=30)  # the full 64-bit range
        assert await state.lookup_prefix([(1 << 64) - 1, 5]) == {"p2": 2}

    run_with(make_state, body)


def test_contract_prefix_ttl(make_state: Callable[[], SharedState]) -> None:
    async def body(state: SharedState) -> None:
        await state.record_prefix("p0", [11, 12], ttl_s=0.3)
        await state.record_prefix("p1", [21], ttl_s=30)
        assert await state.lookup_prefix([11, 12]) == {"p0": 2}
        await asyncio.sleep(0.45)
        assert await state.lookup_prefix([11, 12]) == {}
        assert await state.lookup_prefix([21]) == {"p1": 1}

    run_with(make_state, body)


def test_local_state_is_bounded() -> None:
    async def body() -> None:
        state = LocalState(max_prefix_entries=100)
        for i in range(50):
            await state.record_prefix(f"p{i}", list(range(i * 10, i * 10 + 10)), ttl_s=60)
        assert len(state._prefixes) == 100
        assert await state.lookup_prefix(list(range(490, 500))) == {"p49": 10}
        assert await state.lookup_prefix(list(range(0, 10))) == {}  # evicted, least recently used

    asyncio.run(body())
    with pytest.raises(ConfigError):
        LocalState(max_prefix_entries=0)


def test_two_routers_share_counts_and_prefixes(redis_server: RedisServer) -> None:
    async def body() -> None:
        a = RedisState(redis_server.url, "router-a")
        b = RedisState(redis_server.url, "router-b", in_flight_ttl_s=0.5)
        await a.start()
        await b.start()
        await a.add_in_flight("p0", 2, 200)
        await b.add_in_flight("p0", 1, 100)
        await b.add_in_flight("d0", 1, 10)
        assert a.in_flight() == {"p0": (2, 200)}  # own counts at once, no Redis in between
        want = {"p0": (3, 300), "d0": (1, 10)}
        await eventually(lambda: a.in_flight() == want and b.in_flight() == want, what="summed counts")

        await b.record_prefix("p0", [5, 6, 7], ttl_s=30)
        assert await a.lookup_prefix([5, 6, 7, 8]) == {"p0": 3}  # written through: no refresh needed
        await a.record_prefix("p1", [5, 6], ttl_s=30)
        assert await b.lookup_prefix([5, 6, 7]) == {"p1": 2, "p0": 3}

        await b.add_in_flight("d0", -1, -10)
        await eventually(lambda: a.in_flight() == {"p0": (3, 300)}, what="a finish seen by the other router")

        b._task.cancel()  # router b crashes: nobody refreshes its hash any more
        await eventually(lambda: a.in_flight() == {"p0": (2, 200)}, timeout_s=2.0, what="b's counts expired")
        assert redis_server.client().exists("pdserve:inflight:router-b") == 0

        await a.add_in_flight("p0", -2, -200)
        await a.stop()  # drained: the final write removes its hash
        assert redis_server.client().exists("pdserve:inflight:router-a") == 0
        assert a.num_errors == 0
        await b._redis.aclose()

    asyncio.run(body())


def test_prefix_records_expire_in_redis(redis_server: RedisServer) -> None:
    async def body() -> None:
        state = RedisState(redis_server.url, "router-a")
        await state.start()
        await state.record_prefix("p0", [0xABC], ttl_s=5)
        pttl = redis_server.client().pttl(f"pdserve:block:{0xABC:016x}")
        assert 4000 < pttl <= 5000
        assert redis_server.client().get(f"pdserve:block:{0xABC:016x}") == "p0"
        await state.stop()

    asyncio.run(body())


def test_lookup_is_one_round_trip(redis_server: RedisServer) -> None:
    async def body() -> None:
        state = RedisState(redis_server.url, "router-a", refresh_interval_s=60, in_flight_ttl_s=120)
        await state.start()
        hashes = list(range(1000, 1064))
        await state.record_prefix("p0", hashes, ttl_s=30)
        assert await state.lookup_prefix(hashes) == {"p0": 64}  # the connection is set up by now
        admin = redis_server.client()
        admin.config_resetstat()
        assert await state.lookup_prefix(hashes) == {"p0": 64}
        stats = {name: s["calls"] for name, s in admin.info("commandstats").items()
                 if not name.startswith(("cmdstat_info", "cmdstat_config"))}
        assert stats == {"cmdstat_mget": 1}
        await state.stop()

    asyncio.run(body())


def test_redis_down_serves_local_knowledge(redis_server: RedisServer) -> None:
    async def body() -> None:
        a = RedisState(redis_server.url, "router-a", retry_after_s=0.2)
        b = RedisState(redis_server.url, "router-b")
        await a.start()
        await b.start()
        await b.add_in_flight("d0", 1, 10)
        await a.record_prefix("p0", [1, 2], ttl_s=30)
        await eventually(lambda: a.in_flight() == {"d0": (1, 10)})

        redis_server.stop()
        await a.add_in_flight("p0", 1, 100)
        await a.record_prefix("p1", [3, 4], ttl_s=30)  # no exception; kept locally
        assert await a.lookup_prefix([1, 2]) == {"p0": 2}
        assert await a.lookup_prefix([3, 4]) == {"p1": 2}
        await eventually(lambda: a.num_errors > 0 and not a.healthy, what="errors counted")
        started = time.monotonic()
        for _ in range(100):  # while Redis is down, the request path does not wait for it
            await a.lookup_prefix([3, 4])
        assert time.monotonic() - started < 0.1
        assert a.in_flight()["p0"] == (1, 100)  # own counts always; b's until they would have expired

        redis_server.start()  # empty: the next refreshes restore both routers' counts
        await eventually(lambda: a.healthy, what="recovery")
        want = {"p0": (1, 100), "d0": (1, 10)}
        await eventually(lambda: a.in_flight() == want and b.in_flight() == want, what="counts restored")
        await a.add_in_flight("p0", -1, -100)
        await b.add_in_flight("d0", -1, -10)
        await a.stop()
        await b.stop()

    asyncio.run(body())


def test_redis_state_starts_while_redis_is_down(redis_server: RedisServer) -> None:
    async def body() -> None:
        redis_server.stop()
        state = RedisState(redis_server.url, "router-a", retry_after_s=0.05)
        await state.start()
        await state.add_in_flight("p0", 1, 1)
        assert state.in_flight() == {"p0": (1, 1)}
        assert await state.lookup_prefix([1]) == {}
        redis_server.start()
        await eventually(lambda: state.healthy)
        await state.stop()

    asyncio.run(body())


@pytest.mark.parametrize("kwargs", [{"router_id": ""}, {"refresh_interval_s": 0}, {"in_flight_ttl_s": 0.01}])
def test_redis_state_config_errors(kwargs: dict[str, Any]) -> None:
    args = {"url": "redis://127.0.0.1:1/0", "router_id": "r", **kwargs}
    with pytest.raises(ConfigError) as e:
        RedisState(**args)
    assert e.value.field == next(iter(kwargs))


def test_stop_ends_the_refresh_whenever_the_cancel_lands(redis_server: RedisServer) -> None:
    """A cancel arriving inside a Redis call must end the refresh task, not come out as a counted error."""
    async def body() -> None:
        rng = random.Random(0)
        for i in range(60):
            state = RedisState(redis_server.url, f"router-{i}", refresh_interval_s=0.001, in_flight_ttl_s=0.5)
            await state.start()
            await state.add_in_flight("p0", 1, 10)
            await asyncio.sleep(rng.uniform(0.0, 0.01))
            async with asyncio.timeout(5):
                await state.stop()

    asyncio.run(body())
