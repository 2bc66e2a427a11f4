"""Two processes, one NCCL channel (kvtransfer.nccl.Channel): init, then one send/recv. Prints each stage."""

from __future__ import annotations

import multiprocessing as mp
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def side(rank: int, uid: bytes, out) -> None:
    import torch

    from kvtransfer.nccl import Channel

    torch.cuda.set_device(rank)
    start = time.time()
    ch = Channel("k", uid, rank, torch.device(f"cuda:{rank}"))
    out.put((rank, "init", round(time.time() - start, 2)))
    t = torch.full((1 << 20,), rank + 1.0, device=f"cuda:{rank}")
    with torch.cuda.stream(ch.stream):
        (ch.send if rank == 0 else ch.recv)(t)
    ch.stream.synchronize()
    out.put((rank, "p2p", float(t[0]), round(time.time() - start, 2)))


def main() -> None:
    from cupy.cuda import nccl

    from kvtransfer.nccl import _uid_bytes

    uid = _uid_bytes(nccl.get_unique_id())
    print("uid", type(nccl.get_unique_id()), len(uid), flush=True)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=side, args=(r, uid, out)) for r in (0, 1)]
    for p in procs:
        p.start()
    deadline = time.time() + 40
    while time.time() < deadline and any(p.is_alive() for p in procs):
        while not out.empty():
            print(out.get(), flush=True)
        time.sleep(0.2)
    while not out.empty():
        print(out.get(), flush=True)
    for p in procs:
        if p.is_alive():
            print("still running: rank", procs.index(p), flush=True)
            p.kill()


if __name__ == "__main__":
    main()
