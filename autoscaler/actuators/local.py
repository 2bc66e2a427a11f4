"""Local actuator: worker processes on this machine, for ``pdserve up --autoscale``.

It starts ``pdserve prefill-worker`` / ``pdserve decode-worker`` processes (``cli.processes``),
stops them (SIGTERM: the worker drains its in-flight requests, then exits) and flips a worker's
role in place by calling ``WorkerAdmin.SetRole`` on it over gRPC (the worker drains its old role's
requests, then serves the new one, with no restart). The router learns every change through
``on_change(endpoints)``, called with the full list of live workers (``router.discovery.WorkerEndpoint``)
after each start, stop, flip and death: ``pdserve up`` feeds it to the router's discovery (a Redis
registry, a file); the router also moves a flipped worker between pools from its load reports.

Lifecycle: ``await start(prefill, decode)`` (the initial workers), then the autoscaler's loop calls
``current`` / ``scale`` / ``flip``; ``await close()`` stops every worker. A worker that dies on its
own is dropped at the next ``current()`` (the loop then replaces it) and reported by ``dead()``.

**Peers.** A decode worker pulls KV only from prefill workers it was told about. With
``num_slots > 0`` the actuator reserves that many gRPC ports up front and starts every worker on
one of them with ``--prefill-peers`` naming all of them, so any worker, started later or flipped
to prefill, is a peer of every decode worker (use ``max_prefill + max_decode``; the ports are
picked free at construction, not held, so another process could take one meanwhile). Without slots each worker gets the prefill workers
alive when it starts (pass ``--redis-url`` in ``worker_args`` for peers that follow the registry).
Every worker also gets a ``--metrics-port`` of its own (``metrics_targets()`` lists them for a
Prometheus ``file_sd_configs`` file).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from autoscaler.actuators.base import ROLES, ActuatorError, check_role, other_role
from cli.processes import Proc, free_port, pdserve
from common.errors import ConfigError
from common.rpc import worker_pb2 as pb
from common.rpc import worker_pb2_grpc as pb_grpc
from common.tls import aio_channel, load_tls
from router.discovery import WorkerEndpoint

logger = logging.getLogger(__name__)

OnChange = Callable[[list[WorkerEndpoint]], Any]


@dataclass(slots=True)
class LocalWorker:
    instance_id: str
    role: str
    address: str
    metrics_address: str | None
    proc: Proc

    @property
    def alive(self) -> bool:
        return self.proc.proc.poll() is None

    def endpoint(self) -> WorkerEndpoint:
        return WorkerEndpoint(self.instance_id, self.role, self.address)


class LocalActuator:
    name = "local"

    def __init__(self, model: str, *, log_dir: Path, worker_args: Sequence[str] = (), on_change: OnChange | None = None,
                 host: str = "127.0.0.1", num_slots: int = 0, drain_timeout_s: float = 30.0,
                 metrics_ports: bool = True, ready_timeout_s: float = 120.0) -> None:
        if not model:
            raise ConfigError("must name a checkpoint directory", field="model")
        if num_slots < 0:
            raise ConfigError("must be >= 0", field="num_slots")
        self.model = model
        self.log_dir = Path(log_dir)
        self.worker_args = list(worker_args)
        self.on_change = on_change
        self.host = host
        self.drain_timeout_s = drain_timeout_s
        self.tls = load_tls()  # the workers it starts inherit PDSERVE_TLS_* from this process
        self.metrics_ports = metrics_ports
        self.ready_timeout_s = ready_timeout_s
        self._slots = [free_port(host) for _ in range(num_slots)]
        self._workers: list[LocalWorker] = []  # oldest first
        self._dead: list[LocalWorker] = []
        self._count = 0
        self._lock = asyncio.Lock()

    # --- views ----------------------------------------------------------------------------------------

    def workers(self) -> list[LocalWorker]:
        return list(self._workers)

    def endpoints(self) -> list[WorkerEndpoint]:
        return sorted((w.endpoint() for w in self._workers), key=lambda e: (e.role, e.instance_id))

    def metrics_targets(self) -> list[dict[str, Any]]:
        """The workers' /metrics endpoints in Prometheus ``file_sd_configs`` form."""
        targets = [w.metrics_address for w in self._workers if w.metrics_address]
        return [{"targets": targets, "labels": {"job": "pdserve-workers"}}] if targets else []

    def dead(self) -> list[LocalWorker]:
        """Workers that exited without being asked to (dropped from the pool)."""
        return list(self._dead)

    # --- lifecycle ------------------------------------------------------------------------------------

    async def start(self, prefill: int, decode: int) -> list[WorkerEndpoint]:
        """Start the initial workers (prefill ones first: decode workers name them as peers)."""
        if prefill < 0 or decode < 0:
            raise ConfigError("worker counts must be >= 0", field="replicas")
        async with self._lock:
            await self._spawn("prefill", prefill)
            await self._spawn("decode", decode)
        await self._notify()
        return self.endpoints()

    async def close(self) -> None:
        async with self._lock:
            workers, self._workers = self._workers, []
        await asyncio.gather(*(asyncio.to_thread(w.proc.stop, self.drain_timeout_s + 5) for w in workers))

    # --- Actuator -------------------------------------------------------------------------------------

    async def current(self) -> dict[str, int]:
        if self._prune():
            await self._notify()
        return {role: sum(1 for w in self._workers if w.role == role) for role in ROLES}

    async def scale(self, role: str, replicas: int) -> None:
        check_role(role)
        if replicas < 0:
            raise ConfigError(f"must be >= 0, got {replicas}", field="replicas")
        async with self._lock:
            self._prune()
            mine = [w for w in self._workers if w.role == role]
            if replicas > len(mine):
                try:
                    await self._spawn(role, replicas - len(mine))
                finally:
                    await self._notify()
            elif replicas < len(mine):
                leaving = mine[replicas:]  # the newest go first
                self._workers = [w for w in self._workers if w not in leaving]
                await self._notify()  # the router stops sending them work before they drain
                await asyncio.gather(*(asyncio.to_thread(w.proc.stop, self.drain_timeout_s + 5) for w in leaving))
                logger.info("stopped %s worker(s) %s", role, ", ".join(w.instance_id for w in leaving))

    async def flip(self, to_role: str) -> str | None:
        from_role = other_role(to_role)
        async with self._lock:
            self._prune()
            candidates = [w for w in self._workers if w.role == from_role]
            if not candidates:
                raise ActuatorError(f"no {from_role} worker to flip to {to_role}")
            worker = candidates[-1]
            request = pb.SetRoleRequest(role=to_role, drain_timeout_s=self.drain_timeout_s)
            try:
                async with aio_channel(worker.address, self.tls) as channel:
                    reply = await pb_grpc.WorkerAdminStub(channel).SetRole(request, timeout=self.drain_timeout_s + 10)
            except grpc.RpcError as e:
                code = e.code() if isinstance(e, grpc.Call) else None
                if code == grpc.StatusCode.UNIMPLEMENTED:
                    logger.warning("worker %s cannot switch roles (SetRole unimplemented)", worker.instance_id)
                    return None
                raise ActuatorError(f"SetRole({to_role}) on {worker.instance_id} failed: "
                                    f"{code.name if code else ''} {e.details() if isinstance(e, grpc.Call) else e}") from e
            if reply.role != to_role:
                raise ActuatorError(f"worker {worker.instance_id} answered SetRole({to_role}) with role {reply.role!r}")
            worker.role = to_role
            logger.info("worker %s flipped %s -> %s (drained=%s, aborted=%d)", worker.instance_id, from_role, to_role,
                        reply.drained, reply.num_aborted)
        await self._notify()
        return worker.instance_id

    # --- internals ------------------------------------------------------------------------------------

    def _prune(self) -> bool:
        gone = [w for w in self._workers if not w.alive]
        for w in gone:
            logger.error("%s worker %s exited with %s:\n%s", w.role, w.instance_id, w.proc.proc.returncode,
                         w.proc.log_tail())
            w.proc.stop(0)
        self._workers = [w for w in self._workers if w.alive]
        self._dead.extend(gone)
        return bool(gone)

    def _free_slots(self, n: int) -> list[int]:
        if not self._slots:
            return [0] * n
        used = {int(w.address.rpartition(":")[2]) for w in self._workers}
        free = [p for p in self._slots if p not in used]
        if len(free) < n:
            raise ActuatorError(f"all {len(self._slots)} worker slots are in use; raise num_slots")
        return free[:n]

    def _peers(self) -> list[str]:
        if self._slots:
            return [f"{self.host}:{p}" for p in self._slots]
        return [w.address for w in self._workers if w.role == "prefill"]

    async def _spawn(self, role: str, n: int) -> None:
        if n <= 0:
            return
        ports = self._free_slots(n)
        peers = self._peers()
        args = []
        for port in ports:
            self._count += 1
            cmd = [f"{role}-worker", "--model", self.model, "--host", self.host, "--port", str(port)]
            if peers:
                cmd += ["--prefill-peers", ",".join(peers)]
            metrics_port = free_port(self.host) if self.metrics_ports else None
            if metrics_port is not None:
                cmd += ["--metrics-port", str(metrics_port)]
            args.append((cmd + self.worker_args, self.log_dir / f"worker-{self._count}.log", metrics_port))

        def launch(cmd: list[str], log: Path, metrics_port: int | None) -> LocalWorker:
            proc = pdserve(cmd, log, ready_timeout=self.ready_timeout_s)
            metrics = f"{self.host}:{metrics_port}" if metrics_port is not None else None
            return LocalWorker(proc.address, role, proc.address, metrics, proc)

        results = await asyncio.gather(*(asyncio.to_thread(launch, *a) for a in args), return_exceptions=True)
        errors = []
        for result in results:
            if isinstance(result, LocalWorker):
                self._workers.append(result)
                logger.info("started %s worker %s (log %s)", role, result.instance_id, result.proc.log_path)
            elif isinstance(result, (RuntimeError, TimeoutError, OSError)):
                errors.append(str(result))
            else:
                raise result
        if errors:
            raise ActuatorError(f"{len(errors)} {role} worker(s) failed to start: {errors[0]}")

    async def _notify(self) -> None:
        if self.on_change is None:
            return
        try:
            result = self.on_change(self.endpoints())
            if inspect.isawaitable(result):
                await result
        except Exception:
            logger.exception("on_change callback failed")
