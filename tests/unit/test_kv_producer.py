"""KVProducer's stream lifecycle: a consumer that goes away must end the transfer at once."""

from __future__ import annotations

import asyncio

import torch

from kvtransfer.producer import KVProducer
from kvtransfer.transport import GrpcSink


def test_a_cancelled_handler_ends_the_transfer_even_while_its_stream_is_suspended():
    """gRPC cancels the handler task while it awaits a write, i.e. with the relay generator suspended at a
    yield. That generator's ``finally`` then runs only when it is garbage-collected (a cycle can keep it for
    as long as the collector likes), so the transfer, and its blocks, must not wait for it."""

    async def scenario() -> list[tuple[str, bool]]:
        caches = [torch.zeros(2, 4, 4, 2, 8) for _ in range(2)]
        producer = KVProducer(caches, asyncio.get_running_loop(), lease_s=60)
        closed: list[tuple[str, bool]] = []
        producer.on_close = lambda request_id, completed: closed.append((request_id, completed))
        transfer = producer.open("r", 8, [0, 1], 0, GrpcSink(checksum=True), 1)
        stream = producer.relay(transfer, 0)
        transfer.queues[0].put_nowait(b"chunk")
        written = asyncio.Event()

        async def handler() -> None:  # what grpc.aio does with a server-streaming handler's messages
            async for _ in stream:
                written.set()
                await asyncio.sleep(3600)  # a write that never completes: the client is gone

        task = asyncio.create_task(handler())
        await written.wait()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await asyncio.sleep(0)
        result = list(closed)
        await stream.aclose()  # what the collector would do, eventually: must not close the transfer twice
        assert closed == result
        return result

    assert asyncio.run(scenario()) == [("r", False)]
