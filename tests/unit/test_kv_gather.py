"""kvtransfer.gather builds exactly b"".join's bytes, copied (not aliased), without holding the GIL."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from kvtransfer import gather as gather_module
from kvtransfer.gather import gather


@pytest.mark.parametrize("sizes", [[], [0], [3, 0, 5], [1 << 20, 7, (2 << 20) + 3], [100 << 10]])
def test_gather_is_join(sizes):
    rng = np.random.default_rng(0)
    data = [rng.integers(0, 256, n, dtype=np.uint8) for n in sizes]
    parts = [memoryview(d) if i % 2 else d.tobytes() for i, d in enumerate(data)]
    expected = b"".join(parts)
    out = gather(parts)
    assert type(out) is bytes and out == expected and hash(out) == hash(expected)
    for d in data:  # a copy: changing the sources afterwards leaves the message as it was
        d[:] = 0
    assert out == expected


def test_gather_lets_other_threads_run_while_it_copies():
    """A thread that needs the GIL makes progress during one large gather (join would hold it throughout)."""
    if gather_module._API is None:
        pytest.skip("not CPython")
    source = memoryview(np.ones(256 << 20, dtype=np.uint8))  # large enough to take milliseconds anywhere
    ticks = []
    stop = threading.Event()

    def ticker() -> None:
        while not stop.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.0005)

    thread = threading.Thread(target=ticker)
    thread.start()
    time.sleep(0.01)
    start = time.perf_counter()
    out = gather([b"h", source])
    end = time.perf_counter()
    stop.set()
    thread.join()
    assert len(out) == source.nbytes + 1
    during = [t for t in ticks if start < t < end]
    assert end - start > 0.005 and len(during) >= 3, (end - start, len(during))
