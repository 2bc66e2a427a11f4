"""The local actuator with real ``pdserve prefill-worker`` / ``decode-worker`` processes on the demo model.

It starts and stops workers (the router hears of each change through ``on_change``), gives every
worker the reserved slot addresses as prefill peers (so a decode worker pulls KV from a prefill
worker started after it), drops a worker that died, and flips a worker's role in place through
``WorkerAdmin.SetRole`` (same process, no restart).
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from autoscaler.actuators.base import ActuatorError
from autoscaler.actuators.local import LocalActuator
from common.rpc import worker_pb2 as pb
from router.discovery import WorkerEndpoint
from tests.grpc_clients import generate, health

WORKER_ARGS = ["--num-blocks", "256", "--max-num-batched-tokens", "256"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from engine.demo_model import write_demo_model

    return write_demo_model(tmp_path_factory.mktemp("demo") / "model")


class Changes:
    def __init__(self) -> None:
        self.views: list[list[WorkerEndpoint]] = []

    async def __call__(self, endpoints: list[WorkerEndpoint]) -> None:  # an async callback is awaited
        self.views.append(endpoints)

    def roles(self) -> list[str]:
        return sorted(e.role for e in self.views[-1])


def roles_by_health(actuator: LocalActuator) -> dict[str, str]:
    return {w.address: health(w.address).role for w in actuator.workers()}


def test_start_scale_and_stop_real_workers(model_dir: Path, tmp_path: Path) -> None:
    changes = Changes()
    actuator = LocalActuator(str(model_dir), log_dir=tmp_path, worker_args=WORKER_ARGS, on_change=changes,
                             num_slots=4, drain_timeout_s=10)

    async def body() -> None:
        try:
            await actuator.start(prefill=1, decode=1)
            assert await actuator.current() == {"prefill": 1, "decode": 1}
            assert changes.roles() == ["decode", "prefill"]
            assert sorted(roles_by_health(actuator).values()) == ["decode", "prefill"]
            prefill = next(w for w in actuator.workers() if w.role == "prefill")

            await actuator.scale("decode", 2)
            assert await actuator.current() == {"prefill": 1, "decode": 2}
            assert changes.roles() == ["decode", "decode", "prefill"]
            newest = actuator.workers()[-1]
            assert health(newest.address).role == "decode" and newest.metrics_address
            # the new decode worker pulls KV from the prefill worker (its peers are the reserved slots)
            out = await asyncio.to_thread(generate, newest.address, "r1", list(range(10, 90)), prefill=prefill.address)
            assert out.info is not None and out.info.mode == pb.PrefillInfo.MODE_REMOTE, out.info
            assert len(out.token_ids) == 16

            await actuator.scale("decode", 1)
            assert newest.proc.proc.returncode is not None  # the newest went, after draining
            assert newest.address not in {e.address for e in changes.views[-1]}
            assert await actuator.current() == {"prefill": 1, "decode": 1}

            # a worker that dies is dropped (the loop then replaces it) and reported
            victim = next(w for w in actuator.workers() if w.role == "prefill")
            os.kill(victim.proc.proc.pid, signal.SIGKILL)
            await asyncio.to_thread(victim.proc.proc.wait, 10)
            assert await actuator.current() == {"prefill": 0, "decode": 1}
            assert [w.address for w in actuator.dead()] == [victim.address]
            assert changes.roles() == ["decode"]
            await actuator.scale("prefill", 1)
            assert await actuator.current() == {"prefill": 1, "decode": 1}
            with pytest.raises(ActuatorError, match="slots are in use"):
                await actuator.scale("decode", 4)
        finally:
            workers = actuator.workers()
            await actuator.close()
        assert all(w.proc.proc.returncode is not None for w in workers)

    asyncio.run(body())


def test_flip_in_place(model_dir: Path, tmp_path: Path) -> None:
    changes = Changes()
    actuator = LocalActuator(str(model_dir), log_dir=tmp_path, worker_args=WORKER_ARGS, on_change=changes,
                             num_slots=3, drain_timeout_s=10)

    async def body() -> None:
        try:
            await actuator.start(prefill=1, decode=2)
            flipped = actuator.workers()[-1]  # the newest decode worker goes
            pid = flipped.proc.proc.pid
            assert await actuator.flip("prefill") == flipped.instance_id
            assert await actuator.current() == {"prefill": 2, "decode": 1}
            assert health(flipped.address).role == "prefill"
            assert flipped.proc.proc.poll() is None and flipped.proc.proc.pid == pid  # no restart
            assert changes.roles() == ["decode", "prefill", "prefill"]
            # the remaining decode worker takes KV from the flipped one: it was a peer all along (slots)
            decode = next(w for w in actuator.workers() if w.role == "decode")
            out = await asyncio.to_thread(generate, decode.address, "r2", list(range(20, 100)), prefill=flipped.address)
            assert out.info is not None and out.info.mode == pb.PrefillInfo.MODE_REMOTE, out.info
            # and back
            assert await actuator.flip("decode") is not None
            assert await actuator.current() == {"prefill": 1, "decode": 2}
            assert sorted(roles_by_health(actuator).values()) == ["decode", "decode", "prefill"]
        finally:
            await actuator.close()

    asyncio.run(body())
