"""Copying the grpc transport's chunks out of the KV cache ahead of gRPC, on a thread of their own.

gRPC's Python API sends only ``bytes``, so every chunk is copied out of the
cache into one. Made where gRPC serializes the chunk, that copy runs on the
prefill worker's event loop, the one thread that also does all of gRPC's own
sending; on a many-core host that thread is what limits a KV stream. A
:class:`Packer` makes the copies on another thread, at most
:data:`AHEAD_BYTES` ahead of what gRPC has taken, so the loop only picks them
up. When the packer is behind, the loop copies a chunk itself rather than
wait; only a chunk the packer is in the middle of copying is waited for. The
bound keeps the copies in memory the allocator reuses (see
``kvtransfer.host_memory``) and keeps a stalled stream from holding much.

A thread that wants the GIL waits up to ``sys.getswitchinterval()`` (5 ms by
default) before the thread holding it is asked to let go, and a streaming
event loop holds it most of the time. The engine thread that emits chunks and
the packer each need it for a moment per chunk, so worker processes shorten
the interval (:func:`set_switch_interval`).

Measured with ``benchmarks/kv_transfer.py`` on the 16-core H200 host's CPUs
(256 MiB, grpc transport over a plain gRPC stream of the same bytes): 0.72
before (kv_transfer_2026-11-21_h200host_final.json); 0.73 with the packer and
CPython's 5 ms interval (..._h200host_packer_default_switch.json); 0.81,
0.83, 0.78 and 0.81 with both (..._h200host_packer_run1-3.json,
..._packer_full.json). On a 2-vCPU VM, where both processes keep both cores
busy, moving work between threads does not help: 0.61 before, 0.57 after
(..._vm_final.json, ..._vm_packer.json).
"""

from __future__ import annotations

import logging
import sys
import threading
from collections import deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvtransfer.transport import DeferredChunk, GrpcSink

logger = logging.getLogger(__name__)

AHEAD_BYTES = 32 << 20  # four chunks of kvtransfer.producer.MAX_CHUNK_BYTES
SWITCH_INTERVAL_S = 0.0002

PENDING, PACKING, PACKED, TAKEN = range(4)


class Packer:
    """One thread copying submitted chunks into their message bytes, in order, while the bytes packed and not
    yet taken stay under ``ahead_bytes`` (0: never; the loop copies everything).

    A chunk is PENDING until the packer starts it (PACKING, then PACKED) or the loop takes it first (TAKEN, and
    the loop copies it). The loop's :meth:`take` waits only for a PACKING chunk. A transfer that ends before its
    packed chunks are sent gives their bytes back with :meth:`discard`."""

    def __init__(self, ahead_bytes: int = AHEAD_BYTES) -> None:
        self.ahead_bytes = ahead_bytes
        self.outstanding = 0  # bytes packed or being packed, not yet taken or discarded
        self._cond = threading.Condition()
        self._queue: deque[DeferredChunk] = deque()
        self._thread: threading.Thread | None = None

    def submit(self, chunk: DeferredChunk) -> None:
        """Queue a PENDING chunk (the engine thread, as it emits it)."""
        if self.ahead_bytes <= 0:
            return
        with self._cond:
            self._queue.append(chunk)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="kv-pack", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def take(self, chunk: DeferredChunk) -> bytes | None:
        """The chunk's bytes if packed (waiting while it is being packed), else None: the caller copies it."""
        with self._cond:
            while chunk.state == PACKING:
                self._cond.wait()
            state, data = chunk.state, chunk.data
            chunk.state, chunk.data = TAKEN, None
            if state == PACKED:
                chunk.sink.packed.discard(chunk)
                self.outstanding -= chunk.nbytes
                self._cond.notify_all()
        return data

    def discard(self, owner: GrpcSink) -> None:
        """Drop the chunks of a transfer that ended (``owner.closed`` already set): its packed, unsent ones give
        their bytes back, and its queued ones leave the queue (they may hold host copies of GPU blocks)."""
        with self._cond:
            if any(chunk.sink is owner for chunk in self._queue):
                self._queue = deque(chunk for chunk in self._queue if chunk.sink is not owner)
            for chunk in owner.packed:
                chunk.state, chunk.data = TAKEN, None
                self.outstanding -= chunk.nbytes
            owner.packed.clear()
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._queue and self.outstanding < self.ahead_bytes):
                    self._cond.wait()
                chunk = self._queue.popleft()
                if chunk.state != PENDING or chunk.sink.closed:
                    continue
                chunk.state = PACKING
                self.outstanding += chunk.nbytes
            try:
                data = chunk.pack()
            except Exception:  # out of memory, say: the loop copies it when gRPC asks
                logger.exception("packing a KV chunk failed; it will be copied when sent")
                data = None
            with self._cond:
                if data is None or chunk.sink.closed:
                    chunk.state = PENDING if data is None else TAKEN
                    self.outstanding -= chunk.nbytes
                else:
                    chunk.state, chunk.data = PACKED, data
                    chunk.sink.packed.add(chunk)
                self._cond.notify_all()


_default: Packer | None = None
_default_lock = threading.Lock()


def default_packer() -> Packer:
    """This process's packer (one thread serves every transfer)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Packer()
        return _default


def set_switch_interval(seconds: float = SWITCH_INTERVAL_S) -> None:
    """Let a thread waiting for the GIL get it after ``seconds`` rather than CPython's 5 ms (worker processes)."""
    sys.setswitchinterval(seconds)
