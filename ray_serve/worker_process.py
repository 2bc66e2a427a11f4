"""One pdserve worker process supervised by a Ray Serve replica: start, health, drain, stop.

A replica runs its worker as a child process (``python -m cli.main prefill-worker ...``) rather than
``worker.server.serve`` on the replica's own event loop: ``serve`` installs SIGTERM/SIGINT handlers
(only possible on a main thread, and Serve runs user code on another) and stops only on a signal, so
in a child it keeps exactly the lifecycle it has in a Kubernetes pod: SIGTERM leaves the Redis
registry, drains in-flight requests (``drain_timeout_s``) and exits.

Lifecycle: ``await WorkerProcess.start(...)`` returns once the child printed ``PDSERVE_READY`` (its
output goes on to the replica's log); ``await check()`` raises when the child died or stopped
answering ``WorkerAdmin.Health``; ``await stop()`` sends SIGTERM and waits for the drain. The child
gets SIGTERM too if the replica's process dies first (``PR_SET_PDEATHSIG``), so no worker outlives
its replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import signal
import sys
from collections.abc import Mapping, Sequence

from cli.processes import READY
from common.rpc import worker_pb2 as pb
from common.rpc import worker_pb2_grpc as pb_grpc
from common.tls import aio_channel, load_tls

logger = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class WorkerProcess:
    def __init__(self, proc: asyncio.subprocess.Process, role: str, address: str, forward: asyncio.Task) -> None:
        self.proc = proc
        self.role = role
        self.address = address
        self._forward = forward

    @classmethod
    async def start(cls, role: str, args: Sequence[str], *, ready_timeout_s: float = 600.0,
                    env: Mapping[str, str] | None = None) -> WorkerProcess:
        """Start ``pdserve <role>-worker <args>`` and wait for its PDSERVE_READY line."""
        cmd = [sys.executable, "-m", "cli.main", f"{role}-worker", *args]
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdout=asyncio.subprocess.PIPE, stderr=None, env=dict(env) if env is not None else None,
            preexec_fn=_die_with_parent)
        assert proc.stdout is not None
        ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        async def forward() -> None:  # the child's stdout into the replica's log; never let the pipe fill
            assert proc.stdout is not None
            async for raw in proc.stdout:
                line = raw.decode(errors="replace").rstrip()
                print(line, flush=True)
                m = READY.search(line)
                if m and not ready.done():
                    ready.set_result(m.group(2))
            if not ready.done():
                ready.set_exception(RuntimeError(f"{role} worker exited with {await proc.wait()} before it was ready"))

        task = asyncio.create_task(forward(), name=f"{role}-worker-output")
        try:
            address = await asyncio.wait_for(ready, ready_timeout_s)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            task.cancel()
            raise
        logger.info("%s worker pid %d serving on %s", role, proc.pid, address)
        return cls(proc, role, address, task)

    async def check(self, timeout_s: float = 5.0) -> None:
        """Raise unless the worker process is alive and answers Health."""
        if self.proc.returncode is not None:
            raise RuntimeError(f"{self.role} worker exited with {self.proc.returncode}")
        async with aio_channel(self.address, load_tls()) as channel:
            await pb_grpc.WorkerAdminStub(channel).Health(pb.HealthRequest(), timeout=timeout_s)

    async def stop(self, timeout_s: float) -> int:
        """SIGTERM (leave the registry, drain up to the worker's drain_timeout_s), then SIGKILL at timeout_s."""
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout_s)
            except TimeoutError:
                logger.warning("%s worker %s did not stop within %.0fs; killing it", self.role, self.address, timeout_s)
                self.proc.kill()
                await self.proc.wait()
        with contextlib.suppress(asyncio.CancelledError):
            await self._forward
        return self.proc.returncode if self.proc.returncode is not None else -1
