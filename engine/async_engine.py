"""``AsyncEngine``: an :class:`EngineCore` on its own thread, driven from asyncio.

The worker's gRPC handlers run on an asyncio event loop; the engine runs its
step loop on one dedicated thread, so a long forward pass never blocks the
network. The two meet in two places only:

* commands (add, abort, release, remote-KV results, snapshots) go to the engine
  thread through a queue and resolve an asyncio future there;
* outputs, KV reservations and KV events come back with
  ``loop.call_soon_threadsafe``, in the order the engine produced them.

Every EngineCore call happens on the engine thread, so the core needs no locks.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from common.errors import PdserveError
from common.sampling import SamplingParams
from engine.block_pool import KVEvents
from engine.core import EngineCore
from engine.output import RequestOutput
from engine.request import RequestMode, TokenLogprobs
from engine.scheduler import KVReservation

logger = logging.getLogger(__name__)

T = TypeVar("T")


class EngineStepError(PdserveError):
    """The engine failed while running a step this request was in; the request was aborted."""


@dataclass(slots=True)
class _Stream:
    queue: asyncio.Queue
    finished: bool = False


class AsyncEngine:
    def __init__(self, core: EngineCore, *, idle_wait_s: float = 0.05) -> None:
        self.core = core
        self.idle_wait_s = idle_wait_s
        self.on_reservation: Callable[[KVReservation], None] | None = None
        self.on_kv_events: Callable[[KVEvents], None] | None = None
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.num_step_errors = 0

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._stopping = True
        self._wakeup.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)

    # --- calls onto the engine thread -----------------------------------------------------------

    async def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the engine thread between steps and return its result (or raise its error)."""
        assert self._loop is not None, "start() first"
        future: asyncio.Future = self._loop.create_future()

        def run() -> None:
            try:
                result = fn()
            except BaseException as e:  # noqa: BLE001 (handed to the caller)
                self._loop.call_soon_threadsafe(_settle, future, None, e)
            else:
                self._loop.call_soon_threadsafe(_settle, future, result, None)

        self._commands.put(run)
        self._wakeup.set()
        return await future

    async def generate(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams, *,
                       mode: RequestMode = RequestMode.COLOCATED, predicted_output_tokens: int = 0
                       ) -> AsyncIterator[RequestOutput]:
        """Add a request and yield its outputs until it finishes; leaving early aborts it."""
        stream = _Stream(asyncio.Queue())
        self._streams[request_id] = stream
        try:
            await self.call(lambda: self.core.add_request(request_id, prompt_token_ids, sampling, mode=mode,
                                                          predicted_output_tokens=predicted_output_tokens))
        except BaseException:
            self._streams.pop(request_id, None)
            raise
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    stream.finished = True
                    return
        finally:
            self._streams.pop(request_id, None)
            if not stream.finished:
                await asyncio.shield(self.call(lambda: self.core.abort(request_id)))

    async def abort(self, request_id: str) -> bool:
        return await self.call(lambda: self.core.abort(request_id)) is not None

    async def finish_remote_kv(self, request_id: str, first_token_id: int,
                               logprobs: TokenLogprobs | None) -> bool:
        """Deliver a finished transfer; False if the request is gone (aborted meanwhile)."""
        def run() -> bool:
            if request_id not in self.core.scheduler.awaiting_kv:
                return False
            self._dispatch([self.core.finish_remote_kv(request_id, first_token_id, logprobs)])
            return True
        return await self.call(run)

    async def fail_remote_kv(self, request_id: str) -> bool:
        def run() -> bool:
            if request_id not in self.core.scheduler.awaiting_kv:
                return False
            self.core.fail_remote_kv(request_id)
            return True
        return await self.call(run)

    def loop_call(self, fn: Callable[..., Any], *args: Any) -> None:
        """From the engine thread: run ``fn(*args)`` on the event loop, after what was posted before."""
        self._loop.call_soon_threadsafe(fn, *args)

    # --- the engine thread ----------------------------------------------------------------------

    def _run(self) -> None:
        core = self.core
        if core.device.type == "cuda":
            import torch

            torch.cuda.set_device(core.device)  # the current device is per thread
        while not self._stopping:
            self._run_commands()
            if core.scheduler.has_work() or core.has_pending_outputs():
                try:
                    outputs = core.step()
                except Exception as e:  # noqa: BLE001 (a bad step must not kill the worker)
                    self._fail_step(e)
                    continue
                self._dispatch(outputs)
                reservations = core.take_reservations()
                if reservations and self.on_reservation is not None:
                    for r in reservations:
                        self._loop.call_soon_threadsafe(self.on_reservation, r)
                self._publish_events()
            else:
                self._publish_events()
                self._wakeup.wait(self.idle_wait_s)
                self._wakeup.clear()

    def _run_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            command()

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                self._loop.call_soon_threadsafe(stream.queue.put_nowait, out)

    def _publish_events(self) -> None:
        if self.on_kv_events is None or not self.core.kv.pool.record_events:
            return
        events = self.core.kv.pool.drain_events()
        if events.stored or events.removed:
            self._loop.call_soon_threadsafe(self.on_kv_events, events)

    def _fail_step(self, error: Exception) -> None:
        self.num_step_errors += 1
        logger.exception("engine step failed; aborting the requests in flight")
        for request_id in list(self.core.scheduler.requests):
            self.core.abort(request_id)
            stream = self._streams.get(request_id)
            if stream is not None:
                err = EngineStepError(f"engine step failed: {error}")
                self._loop.call_soon_threadsafe(stream.queue.put_nowait, err)
        time.sleep(0.01)


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
