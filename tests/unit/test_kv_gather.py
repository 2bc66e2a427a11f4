"""kvtransfer.gather builds exactly b"".join's bytes, copied (not aliased), without holding the GIL."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import xxhash

from kvtransfer import gather as gather_module
from kvtransfer.codec import CHECKSUM_BIT
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


@pytest.mark.parametrize("sizes", [[12, 5, 9], [12, 1 << 20, 7, (1 << 20) + 3]])
def test_hashed_gather_hashes_what_it_copies_and_writes_the_head_last(sizes):
    """Small messages (one join) and large ones (copied, then the copy hashed) alike: the parts after the first
    are hashed in order, and the first is replaced by what ``head`` makes of their payload checksum."""
    rng = np.random.default_rng(1)
    parts = [memoryview(rng.integers(0, 256, n, dtype=np.uint8)) for n in sizes]
    expected_digest = xxhash.xxh3_64_intdigest(b"".join(parts[1:])) | CHECKSUM_BIT
    seen = []

    def head(digest: int) -> bytes:
        seen.append(digest)
        return digest.to_bytes(8, "little") + b"head"

    out = gather(parts, head)
    assert seen == [expected_digest]
    assert type(out) is bytes and out == b"".join([head(expected_digest), *parts[1:]])
    with pytest.raises(ValueError, match="head"):
        gather(parts, lambda digest: b"too short")
