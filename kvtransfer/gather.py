"""Build a ``bytes`` message from several buffers without holding the GIL while the bytes are copied.

gRPC's Python API sends only ``bytes``, so the grpc transport copies each
chunk out of the KV cache into one (``DeferredChunk``: on the packer's thread,
``kvtransfer.packer``, or on the event loop when gRPC serializes a chunk the
packer has not reached). ``b"".join`` over memoryviews copies with the GIL held,
and in a prefill worker streaming KV the GIL is what the process runs short
of: gRPC's own sends hold it for their copies too. So the message is
allocated uninitialized, as CPython's C code does, and filled by
``numpy.copyto``, which releases the GIL while it copies; the worker's other
threads (gRPC's poller, the engine) run meanwhile. On the 16-core H200 host
``benchmarks/kv_transfer.py`` had the grpc transport at 0.62 of a plain gRPC
stream before (kv_transfer_2026-11-21_h200host_kv_baseline.json) and at 0.79
and 0.72 in two runs after (..._gil_free_copy.json, ..._final.json); on a
2-vCPU VM, where both cores are busy anyway, it makes no difference. (Those
runs predate the packer; it is what lets this copy leave the event loop.)

A chunk's payload checksum is taken here too, when asked: the copy is hashed
right after it is written, while it is still in the CPU's caches, in one call
(each call that releases the GIL must take it back, and in a streaming worker
that can mean waiting for the busy event loop: hashing 256 KiB pieces as they
were copied took the grpc transport from 0.81 to 0.61-0.66 of a plain stream
on the H200 host, kv_transfer_2026-11-21_h200host_hash_pieces_*.json). The frame stating the checksum is written in front last
(``kvtransfer.codec.chunk_frame`` keeps its length fixed).

The new object is written only here, before anyone else holds a reference
to it; it is a plain immutable ``bytes`` from then on. Elsewhere than CPython
this falls back to ``b"".join``.
"""

from __future__ import annotations

import ctypes
import platform
from collections.abc import Callable, Sequence

import numpy as np

from kvtransfer.codec import payload_checksum

_SMALL = 64 << 10  # below this a join is as cheap as anything


def _cpython_api():
    if platform.python_implementation() != "CPython":
        return None
    new = ctypes.pythonapi.PyBytes_FromStringAndSize
    new.restype, new.argtypes = ctypes.py_object, [ctypes.c_void_p, ctypes.c_ssize_t]
    address = ctypes.pythonapi.PyBytes_AsString
    address.restype, address.argtypes = ctypes.c_void_p, [ctypes.py_object]
    return new, address


_API = _cpython_api()


def gather(parts: Sequence[bytes | memoryview], seal: Callable[[int], bytes] | None = None) -> bytes:
    """``b"".join(parts)``, copying large parts with the GIL released.

    With ``seal``, the first part is then replaced by ``seal(payload_checksum(the copies of the others))``, which
    must be as long: a frame stating the checksum of what follows it."""
    sizes = [p.nbytes if isinstance(p, memoryview) else len(p) for p in parts]
    total = sum(sizes)
    if _API is None or total < _SMALL:
        if seal is None:
            return b"".join(parts)
        return b"".join([_sealed(seal, payload_checksum(parts[1:]), sizes[0]), *parts[1:]])
    new, address = _API
    out = new(None, total)  # uninitialized; nobody else has it yet
    dest = np.ctypeslib.as_array((ctypes.c_ubyte * total).from_address(address(out)))
    pos = 0
    for part, size in zip(parts, sizes):
        if size:
            np.copyto(dest[pos:pos + size], np.frombuffer(part, dtype=np.uint8))
        pos += size
    if seal is not None:  # one hashing call, reading what was just written (still in cache)
        dest[:sizes[0]] = np.frombuffer(_sealed(seal, payload_checksum([dest[sizes[0]:]]), sizes[0]), dtype=np.uint8)
    del dest  # the only writable view of ``out`` goes before ``out`` leaves
    return out


def _sealed(seal: Callable[[int], bytes], checksum: int, size: int) -> bytes:
    head = seal(checksum)
    if len(head) != size:
        raise ValueError(f"the head is {len(head)} bytes, the room for it {size}")
    return head
