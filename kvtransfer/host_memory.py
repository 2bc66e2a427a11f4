"""Host-memory settings for processes that move KV through the CPU (the grpc and local transports).

A transfer allocates and frees a few MiB per chunk message, hundreds of MiB
per prompt. With glibc's defaults an allocation that large is its own
``mmap``, and freeing it returns the pages, so every chunk pays for fresh
zeroed pages again (page faults run at 1-2 GB/s on a small VM, slower than the
network). Serving allocations up to :data:`MMAP_THRESHOLD` from the heap, and
keeping up to :data:`TRIM_THRESHOLD` of freed heap before returning it, makes
those buffers reused memory. Measured with ``benchmarks/kv_transfer.py`` on a
2-vCPU VM, 256 MiB per transfer: the grpc transport moved 0.72 GB/s with
glibc's defaults (``--default-malloc``, kv_transfer_2026-11-21_default_malloc.json)
and 1.45 with these settings (kv_transfer_2026-11-21.json).

The cost is memory held back: up to ``TRIM_THRESHOLD`` of freed memory per
malloc arena stays mapped. Elsewhere than glibc this does nothing.
"""

from __future__ import annotations

import ctypes
import logging
import platform

logger = logging.getLogger(__name__)

MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 128 << 20
_M_TRIM_THRESHOLD = -1  # mallopt parameters, <malloc.h>
_M_MMAP_THRESHOLD = -3


def keep_transfer_buffers() -> bool:
    """Apply the settings above to this process's glibc malloc; returns whether it took them."""
    if platform.libc_ver()[0] != "glibc":  # another libc's mallopt (if any) takes other parameters
        return False
    mallopt = ctypes.CDLL(None).mallopt  # the C library this interpreter is linked against
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if not ok:
        logger.warning("mallopt refused the KV transfer buffer settings")
    return ok
