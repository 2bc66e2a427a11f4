"""Attention backends on one GPU: decode µs per layer call and KV-read bandwidth, prefill time.

Llama-3-8B attention shapes (32 query heads, 8 KV heads, head_dim 128, bf16),
KV blocks of 16 tokens (256 for flash-attn, which needs it). First a
correctness check of each backend against the torch reference in fp32, then:

* copy bandwidth measured here (a large ``dst.copy_(src)``, bytes read plus
  written over time), the ceiling the decode numbers are read against;
* decode, batch 1/8/32/128 at context 1024 and 8192: µs per layer call
  (``forward``: KV store + attention), eager and replayed from a CUDA graph,
  and the K/V bytes read per call over that time. Small cases rotate over
  several layer caches so the KV is not served from L2;
* prefill of 1x8192 and 8x1024 tokens (empty prefix): µs and TFLOP/s.

    python benchmarks/attention_gpu.py [--json FILE] [--backends torch,triton,flash_attn]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import platform
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.attention.base import AttentionBatch, kv_cache_shape
from engine.attention.torch_backend import TorchAttentionBackend

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 32, 8, 128
SCALE = HEAD_DIM ** -0.5
DTYPE = torch.bfloat16
DEVICE = torch.device("cuda")
ROTATE_BYTES = 512 * 2**20  # KV touched per timed call at least, several times the 60 MB L2


def make_backend(name: str):
    if name == "torch":
        return TorchAttentionBackend(), 16
    if name == "triton":
        from engine.attention.triton_backend import TritonAttentionBackend
        return TritonAttentionBackend(), 16
    if name == "triton-1split":
        from engine.attention.triton_backend import TritonAttentionBackend
        return TritonAttentionBackend(max_splits=1), 16
    if name == "flash_attn":
        from engine.attention.flash_attn_backend import FlashAttnBackend
        return FlashAttnBackend(block_size=256), 256
    raise ValueError(name)


def make_batch(specs: list[tuple[int, int]], block_size: int, seed: int = 0) -> tuple[AttentionBatch, int]:
    """(num_computed, query_len) per request on shuffled blocks; returns the batch and the blocks it needs."""
    gen = torch.Generator().manual_seed(seed)
    counts = [-(-(c + n) // block_size) for c, n in specs]
    num_blocks = sum(counts)
    perm = torch.randperm(num_blocks, generator=gen).int()
    tables = torch.zeros(len(specs), max(counts), dtype=torch.int32)
    slots, used = [], 0
    for i, ((c, n), nb) in enumerate(zip(specs, counts)):
        tables[i, :nb] = perm[used:used + nb]
        used += nb
        pos = torch.arange(c, c + n)
        slots.append(tables[i, pos // block_size].long() * block_size + pos % block_size)
    query_lens = [n for _, n in specs]
    seq_lens = [c + n for c, n in specs]
    starts = torch.zeros(len(specs) + 1, dtype=torch.int32)
    starts[1:] = torch.cumsum(torch.tensor(query_lens), 0)
    batch = AttentionBatch(starts.to(DEVICE), torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
                           tables.to(DEVICE), torch.cat(slots).to(DEVICE), query_lens, seq_lens, block_size)
    return batch, num_blocks


def rand(*shape: int, dtype: torch.dtype = DTYPE) -> torch.Tensor:
    return torch.randn(*shape, device=DEVICE, dtype=torch.float32).to(dtype)


def qkv(num_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return rand(num_tokens, NUM_HEADS, HEAD_DIM), rand(num_tokens, NUM_KV_HEADS, HEAD_DIM), \
        rand(num_tokens, NUM_KV_HEADS, HEAD_DIM)


def time_us(fn: Callable[[], object], *, target_s: float = 0.25, max_reps: int = 200) -> float:
    """Median of per-call CUDA-event times after a warm-up; enough repetitions to fill ``target_s``."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    once = max(start.elapsed_time(end) / 1e3, 1e-6)
    reps = max(5, min(max_reps, int(target_s / once)))
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def copy_bandwidth() -> float:
    """GB/s of a 2 GiB device-to-device copy, counting bytes read plus bytes written."""
    src = rand(2**30)  # bf16: 2 GiB
    dst = torch.empty_like(src)
    us = time_us(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (us * 1e-6) / 1e9


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    diff = (out.float() - ref).flatten(1).norm(dim=1)
    return float((diff / ref.flatten(1).norm(dim=1).clamp_min(1e-6)).max())


def check(name: str) -> float:
    """Worst per-token relative error against the fp32 torch reference on a mixed batch with a window."""
    backend, block_size = make_backend(name)
    specs = [(0, 700), (3000, 300), (5000, 1), (0, 1), (8191, 1), (1000, 64)]
    worst = 0.0
    for window in (None, 1024):
        batch, num_blocks = make_batch(specs, block_size, seed=1)
        cache = rand(*kv_cache_shape(num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM))
        q, k, v = qkv(sum(batch.query_lens_host))
        ref_backend = TorchAttentionBackend()
        ref = ref_backend.forward(q.float(), k.float(), v.float(), cache.float(),
                                  ref_backend.build_metadata(batch), scale=SCALE, sliding_window=window)
        out = backend.forward(q, k, v, cache, backend.build_metadata(batch), scale=SCALE, sliding_window=window)
        worst = max(worst, relative_error(out, ref))
    return worst


def bench_decode(name: str, batch_size: int, context: int) -> dict:
    backend, block_size = make_backend(name)
    batch, num_blocks = make_batch([(context - 1, 1)] * batch_size, block_size, seed=batch_size + context)
    kv_bytes = batch_size * context * NUM_KV_HEADS * HEAD_DIM * 2 * DTYPE.itemsize
    layers = max(1, math.ceil(ROTATE_BYTES / kv_bytes))
    caches = [rand(*kv_cache_shape(num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM)) for _ in range(layers)]
    q, k, v = qkv(batch_size)
    meta = backend.build_metadata(batch)

    def step():
        for cache in caches:
            backend.forward(q, k, v, cache, meta, scale=SCALE, sliding_window=None)

    result = {"backend": name, "batch": batch_size, "context": context, "layers_rotated": layers,
              "kv_bytes_per_call": kv_bytes}
    result["eager_us"] = time_us(step) / layers
    if hasattr(backend, "build_decode_metadata"):
        meta = backend.build_decode_metadata(batch.block_tables, batch.seq_lens, batch.slot_mapping)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        result["graph_us"] = time_us(graph.replay) / layers
        splits = getattr(meta.decode, "splits", None) if hasattr(meta, "decode") else None
        if splits:
            result["num_splits"] = next(iter(splits.values()))[0]
        del graph
    best = min(result.get("graph_us", math.inf), result["eager_us"])
    result["kv_read_gbps"] = kv_bytes / (best * 1e-6) / 1e9
    caches.clear()
    torch.cuda.empty_cache()
    return result


def bench_prefill(name: str, num_requests: int, length: int) -> dict:
    backend, block_size = make_backend(name)
    batch, num_blocks = make_batch([(0, length)] * num_requests, block_size, seed=7)
    cache = rand(*kv_cache_shape(num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM))
    q, k, v = qkv(num_requests * length)
    meta = backend.build_metadata(batch)
    us = time_us(lambda: backend.forward(q, k, v, cache, meta, scale=SCALE, sliding_window=None))
    flops = num_requests * 4 * NUM_HEADS * HEAD_DIM * length * (length + 1) / 2  # causal QK^T and PV
    return {"backend": name, "requests": num_requests, "length": length, "us": us,
            "tflops": flops / (us * 1e-6) / 1e12}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--backends", default="torch,triton,triton-1split,flash_attn")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    names = []
    skipped = {}
    for name in args.backends.split(","):
        if name == "flash_attn" and importlib.util.find_spec("flash_attn") is None:
            skipped[name] = "flash-attn is not installed"
        else:
            names.append(name)
    props = torch.cuda.get_device_properties(DEVICE)
    import triton

    env = {"device": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
           "triton": triton.__version__, "python": platform.python_version()}
    print(env, flush=True)
    if skipped:
        print("skipped:", skipped, flush=True)

    errors = {}
    for name in list(names):
        try:
            errors[name] = check(name)
        except Exception as exc:  # noqa: BLE001 - a backend that fails is reported, the others still run
            errors[name] = f"{type(exc).__name__}: {exc}"
        ok = isinstance(errors[name], float) and errors[name] < 2e-2
        print(f"check {name:14s} worst relative error {errors[name]}  {'ok' if ok else 'FAIL'}", flush=True)
        if not ok:
            names.remove(name)
            skipped[name] = f"failed the check: {errors[name]}"

    copy_gbps = copy_bandwidth()
    print(f"copy bandwidth (read+write): {copy_gbps:.0f} GB/s", flush=True)

    decode = []
    for context in (1024, 8192):
        for batch_size in (1, 8, 32, 128):
            for name in names:
                r = bench_decode(name, batch_size, context)
                r["fraction_of_copy"] = r["kv_read_gbps"] / copy_gbps
                decode.append(r)
                print(f"decode {name:14s} B={batch_size:<4d} ctx={context:<5d} eager {r['eager_us']:8.1f} us"
                      f"  graph {r.get('graph_us', float('nan')):8.1f} us  splits {r.get('num_splits', '-')!s:>3}"
                      f"  KV {r['kv_read_gbps']:6.0f} GB/s ({100 * r['fraction_of_copy']:.0f}% of copy)",
                      flush=True)
    prefill = []
    for num_requests, length in ((1, 8192), (8, 1024)):
        for name in names:
            r = bench_prefill(name, num_requests, length)
            prefill.append(r)
            print(f"prefill {name:14s} {num_requests}x{length:<5d} {r['us']:9.1f} us  {r['tflops']:6.1f} TFLOP/s",
                  flush=True)

    if args.json:
        args.json.write_text(json.dumps({"env": env, "skipped": skipped, "check_rel_error": errors,
                                         "copy_gbps": copy_gbps, "decode": decode, "prefill": prefill},
                                        indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
