"""Chained hashes of full KV blocks, shared by the router and the engine.

Block ``i`` of a token sequence hashes its own ``block_size`` tokens together
with the hash of block ``i - 1``, so equal hashes at position ``i`` mean (up to
collisions) equal prefixes of ``(i + 1) * block_size`` tokens. The router uses
the hashes to predict cache hits on workers; the engine uses them as keys of its
prefix cache and verifies the tokens on every hit, so a collision costs a cache
miss, never wrong KV. The hash is deterministic across processes and machines
(BLAKE2b, not Python's salted ``hash``).
"""

from __future__ import annotations

from collections.abc import Sequence
from hashlib import blake2b

import numpy as np

NONE_HASH = 0  # the parent of block 0


def hash_block(parent_hash: int, token_ids: Sequence[int]) -> int:
    """64-bit hash of one block given its parent's hash."""
    h = blake2b(parent_hash.to_bytes(8, "little"), digest_size=8)
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return int.from_bytes(h.digest(), "little")


def hash_blocks(token_ids: Sequence[int], block_size: int, parent_hash: int = NONE_HASH,
                start_block: int = 0) -> list[int]:
    """Hashes of the full blocks of ``token_ids`` from ``start_block`` on.

    ``parent_hash`` must be the hash of block ``start_block - 1`` (or
    :data:`NONE_HASH` when starting at block 0); a caller extending a sequence
    passes its last known hash and gets only the new blocks' hashes.
    """
    arr = np.asarray(token_ids, dtype=np.int64)
    num_full = len(arr) // block_size
    out: list[int] = []
    prev = parent_hash
    for i in range(start_block, num_full):
        prev = hash_block(prev, arr[i * block_size:(i + 1) * block_size])
        out.append(prev)
    return out
