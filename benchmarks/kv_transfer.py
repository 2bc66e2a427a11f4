"""KV transfer: the ``grpc`` transport against a plain gRPC byte stream, and TTFT disaggregated vs colocated.

Part 1 moves 256 MiB of KV blocks (32 layers x 64 blocks of 16 tokens x 8 KV
heads x 128 dims, fp32) from a producer process to this process through the
real transfer path: ``KVProducer`` hooks (called as the engine would after
each layer) -> payload sink -> Prefill stream -> ``KVConsumer`` (verify and
write into a cache). Beside it, in the same run and against the same server
process, a plain gRPC server stream of the same bytes (the producer's KV,
prepared as ``bytes`` beforehand, so sending reads 256 MiB of distinct
memory as the transport does) in the same messages (up to the workers' 8 MiB,
``--message-mib`` to change both), received and dropped. Prints GB/s of each and the ratio. Both processes set malloc up as
workers do (``kvtransfer.host_memory``), unless ``--default-malloc``, and
shorten the GIL switch interval as workers do
(``kvtransfer.packer.set_switch_interval``), unless
``--default-switch-interval``; the producer packs chunks on its packer thread
(``kvtransfer.packer``), as workers do. One more
variant runs the transport with payload checksums off (a worker's
``--no-kv-checksum``), to show what they cost.

Two more variants show what any transport through gRPC's Python API must add
to the plain stream. gRPC sends only ``bytes``, which it copies, and hands
over each received message as fresh ``bytes``, so moving KV between two paged
caches takes, on top of the plain stream, one copy out of the producer's cache
and one into the consumer's. ``copies_only`` is the plain stream plus just
those two copies per message, made with the transport's copy functions
(``gather``, ``write_payload``) but inline on each side's event loop (no
headers, no checks, no threads; the transport packs on its packer thread and
writes on its consumer's pool);
``copies_checksums_only`` adds xxh3 of each payload on both sides, as the
transport's default does. They show the work, not a bound: a transport that
spreads it over threads can beat them on a machine with cores to spare.

Each variant's CPU time (user + system, both processes) per transfer is
reported too. Where the two processes keep every core busy (a 2-vCPU VM),
throughput follows CPU time: the plain stream's CPU time over a variant's is
close to that variant's ratio (0.60 and 0.61 for the grpc transport in
kv_transfer_2026-11-21_vm_final.json).

Part 2 starts a prefill worker and a decode worker on the demo model and times
the first token of requests prefilled remotely (KV moved) against requests the
decode worker prefills itself, for 512- and 2,000-token prompts.

    python benchmarks/kv_transfer.py [--repeats 5] [--json FILE] [--transfer-only] [--message-mib 8]
                                     [--default-malloc] [--default-switch-interval]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.rpc import worker_pb2 as pb
from common.rpc_convert import sampling_to_proto
from common.sampling import SamplingParams
from engine.scheduler import ScheduledRequest
from kvtransfer.codec import payload_checksum
from kvtransfer.consumer import KVConsumer
from kvtransfer.gather import gather
from kvtransfer.host_memory import keep_transfer_buffers
from kvtransfer.layout import KVLayout, payload_views, write_payload
from kvtransfer.packer import set_switch_interval
from kvtransfer.producer import MAX_CHUNK_BYTES, KVProducer
from kvtransfer.transport import make_sink

LAYERS, BLOCKS, BLOCK_SIZE, HEADS, DIM = 32, 64, 16, 8, 128
BYTES_METHOD = "/bench.Bytes/Stream"
COPIES_METHOD = "/bench.Bytes/Copies"
MAX_MESSAGE = 1 << 30
TOTAL_BYTES = LAYERS * 2 * BLOCKS * BLOCK_SIZE * HEADS * DIM * 4
BLOCK_PAYLOAD = 2 * BLOCK_SIZE * HEADS * DIM * 4  # K and V of one block of one layer


def _chunks(message_bytes: int) -> list[tuple[int, list[int]]]:
    """(layer, block ids) of each message the transport sends with ``max_chunk_bytes=message_bytes``, in order."""
    n = max(1, message_bytes // BLOCK_PAYLOAD)
    return [(layer, list(range(i, min(i + n, BLOCKS)))) for layer in range(LAYERS) for i in range(0, BLOCKS, n)]


def _cache(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, BLOCKS, BLOCK_SIZE, HEADS, DIM, generator=g) for _ in range(LAYERS)]


# --- producer process --------------------------------------------------------------------------


async def serve(checksum: bool, message_bytes: int) -> None:
    kv = _cache(0)
    loop = asyncio.get_running_loop()
    producer = KVProducer(kv, loop, lease_s=60, max_chunk_bytes=message_bytes)
    # the same bytes in the same messages as the transport's
    plain_chunks = [b"".join(payload_views(kv[layer], ids)) for layer, ids in _chunks(message_bytes)]

    def compute(request: pb.PrefillRequest) -> None:  # what the engine thread does for one prompt
        n = len(request.prompt_token_ids)
        step = [ScheduledRequest(request.request_id, list(request.prompt_token_ids), 0, list(range(BLOCKS)),
                                 True, SamplingParams(), None, output_token_ids=[])]
        producer.begin_step(step)
        for layer in range(LAYERS):
            producer.layer_done(layer)
        producer.end_step()
        loop.call_soon_threadsafe(producer.prefilled, request.request_id, n % 1000, None, 0)

    async def prefill(request: pb.PrefillRequest, context):
        sink = make_sink(request.transport, request.transport_params, producer.layout, checksum=checksum)
        transfer = producer.open(request.request_id, len(request.prompt_token_ids), list(request.dest_block_ids),
                                 0, sink, request.num_streams)
        threading.Thread(target=compute, args=(request,)).start()
        async for item in producer.relay(transfer, 0):
            yield item

    async def stream_kv(request: pb.StreamKVRequest, context):
        while (transfer := producer.get(request.request_id)) is None:
            await asyncio.sleep(0.001)
        async for item in producer.relay(transfer, request.stream_index):
            yield item

    async def plain(request: bytes, context):
        for chunk in plain_chunks:
            yield chunk

    async def copies(request: bytes, context):  # the reference: each message copied out of the cache (and hashed)
        hashed = request == b"\x01"
        for layer, ids in _chunks(message_bytes):
            parts = [bytes(8), *payload_views(kv[layer], ids)]
            if hashed:  # hashed once copied, as DeferredChunk.pack does
                yield gather(parts, lambda checksum: struct.pack("<Q", checksum))
            else:
                yield gather(parts)

    def passthrough(m):
        return m if isinstance(m, bytes) else m.SerializeToString()

    server = grpc.aio.server(options=[("grpc.max_send_message_length", MAX_MESSAGE),
                                      ("grpc.max_receive_message_length", MAX_MESSAGE)])
    server.add_generic_rpc_handlers((
        grpc.method_handlers_generic_handler("pdserve.v1.PrefillService", {
            "Prefill": grpc.unary_stream_rpc_method_handler(prefill, pb.PrefillRequest.FromString, passthrough),
            "StreamKV": grpc.unary_stream_rpc_method_handler(stream_kv, pb.StreamKVRequest.FromString,
                                                              passthrough)}),
        grpc.method_handlers_generic_handler("bench.Bytes", {
            "Stream": grpc.unary_stream_rpc_method_handler(plain, bytes, passthrough),
            "Copies": grpc.unary_stream_rpc_method_handler(copies, bytes, passthrough)}),
    ))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"PDSERVE_READY role=bench address=127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


# --- consumer side (this process) --------------------------------------------------------------


class TransportRun:
    """One consumer (its cache, channel and threads) fetching the same 256 MiB again and again."""

    def __init__(self, address: str, transport: int, streams: int) -> None:
        self.address, self.transport, self.streams = address, transport, streams
        self.kv = [torch.zeros(2, BLOCKS, BLOCK_SIZE, HEADS, DIM) for _ in range(LAYERS)]
        self.consumer = KVConsumer(self.kv, consumer_id="bench", max_message_bytes=MAX_MESSAGE,
                                   num_threads=max(2, streams))
        self.count = 0

    async def once(self) -> float:
        self.count += 1
        result = await self.consumer.fetch(
            address=self.address, transport=self.transport, num_streams=self.streams,
            request_id=f"t{self.transport}-{self.streams}-{self.count}", prompt_token_ids=[1] * (BLOCKS * BLOCK_SIZE),
            sampling=sampling_to_proto(SamplingParams()), block_ids=list(range(BLOCKS)), num_cached_tokens=0,
            timeout_s=120)
        return result.seconds

    async def close(self) -> None:
        reference = _cache(0)
        assert all(torch.equal(a, b) for a, b in zip(self.kv, reference)), "received KV differs from the sent KV"
        await self.consumer.close()


class PlainRun:
    """The baseline: a plain gRPC server stream of the same bytes in the same message sizes, dropped."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.aio.insecure_channel(address, options=[("grpc.max_receive_message_length", MAX_MESSAGE)])
        self.call = self.channel.unary_stream(BYTES_METHOD, request_serializer=bytes, response_deserializer=bytes)

    async def once(self) -> float:
        start = time.monotonic()
        count = 0
        async for message in self.call(b""):
            count += len(message)
        assert count == TOTAL_BYTES
        return time.monotonic() - start

    async def close(self) -> None:
        await self.channel.close()


class CopiesOnlyRun:
    """The plain stream plus what any transport into a paged cache must add through gRPC's Python API: the
    producer copies each message out of its cache, this side copies it into one (and, with ``checksums``, both
    hash it: xxh3, in one call each, as DeferredChunk and GrpcSource do). No headers, no checks, no thread
    hops."""

    def __init__(self, address: str, checksums: bool, message_bytes: int) -> None:
        self.checksums, self.message_bytes = checksums, message_bytes
        self.kv = [torch.zeros(2, BLOCKS, BLOCK_SIZE, HEADS, DIM) for _ in range(LAYERS)]
        self.layout = KVLayout.of_cache(self.kv)
        self.channel = grpc.aio.insecure_channel(address, options=[("grpc.max_receive_message_length", MAX_MESSAGE)])
        self.call = self.channel.unary_stream(COPIES_METHOD, request_serializer=bytes, response_deserializer=bytes)

    async def once(self) -> float:
        start = time.monotonic()
        chunks = iter(_chunks(self.message_bytes))
        async for message in self.call(b"\x01" if self.checksums else b"\x00"):
            layer, ids = next(chunks)
            payload = memoryview(message)[8:]
            if self.checksums:  # checked, then written, as GrpcSource does
                assert payload_checksum([payload]) == struct.unpack_from("<Q", message)[0], "payload checksum mismatch"
            write_payload(self.kv[layer], ids, payload, self.layout)
        return time.monotonic() - start

    async def close(self) -> None:
        reference = _cache(0)
        assert all(torch.equal(a, b) for a, b in zip(self.kv, reference)), "received KV differs from the sent KV"
        await self.channel.close()


def _cpu_seconds(servers: list[subprocess.Popen]) -> float:
    """User + system CPU of this process and the producer processes so far (Linux /proc; 0 for them elsewhere)."""
    total = sum(os.times()[:2])
    for server in servers:
        try:
            fields = Path(f"/proc/{server.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def part1(repeats: int, default_malloc: bool, default_switch: bool, message_mib: int) -> dict:
    """Runs interleave (plain, grpc x1, grpc x2, local, grpc x1 without payload checksums, the two copies-only
    references, then again), so a slow patch of a shared machine hits every variant alike; each ratio is the
    median of the per-round ratios to the plain stream. The last variant (a worker's ``--no-kv-checksum``) is served by a second producer
    process, and shows what the payload checksums cost."""
    extra = (["--default-malloc"] if default_malloc else []) + (["--default-switch-interval"] if default_switch else [])
    extra += ["--message-mib", str(message_mib)]
    servers = [subprocess.Popen([sys.executable, __file__, "--serve", *extra, *flag], stdout=subprocess.PIPE,
                                text=True) for flag in ([], ["--no-checksum"])]
    try:
        address, unchecked = (s.stdout.readline().split("address=")[1].strip() for s in servers)
        size = TOTAL_BYTES

        async def all_runs() -> dict:
            variants = {"plain_grpc_stream": PlainRun(address),
                        "grpc_1_stream": TransportRun(address, pb.KV_TRANSPORT_GRPC, 1),
                        "grpc_2_streams": TransportRun(address, pb.KV_TRANSPORT_GRPC, 2),
                        "local_shm": TransportRun(address, pb.KV_TRANSPORT_LOCAL, 1),
                        "grpc_1_stream_no_checksum": TransportRun(unchecked, pb.KV_TRANSPORT_GRPC, 1),
                        "copies_only": CopiesOnlyRun(address, False, message_mib << 20),
                        "copies_checksums_only": CopiesOnlyRun(address, True, message_mib << 20)}
            out: dict[str, list[float]] = {name: [] for name in variants}
            cpu: dict[str, float] = {name: 0.0 for name in variants}
            for i in range(repeats + 1):
                for name, variant in variants.items():
                    before = _cpu_seconds(servers)
                    seconds = await variant.once()
                    if i:  # the first round warms channels and allocators
                        out[name].append(seconds)
                        cpu[name] += _cpu_seconds(servers) - before
            for variant in variants.values():
                await variant.close()
            return out, cpu

        runs, cpu = asyncio.run(all_runs())
    finally:
        for server in servers:
            server.kill()
    result = {"bytes": size, "message_bytes": message_mib << 20, "rounds": repeats, "gb_per_s": {},
              "cpu_ms_per_transfer": {}, "seconds": {}}
    for name, times in runs.items():
        result["gb_per_s"][name] = round(size / statistics.median(times) / 1e9, 3)
        result["cpu_ms_per_transfer"][name] = round(cpu[name] / repeats * 1e3, 1)
        result["seconds"][name] = [round(t, 4) for t in times]
    plain = runs["plain_grpc_stream"]
    for name in ("grpc_1_stream", "grpc_2_streams", "grpc_1_stream_no_checksum", "copies_only",
                 "copies_checksums_only"):
        result[f"ratio_{name}"] = round(statistics.median(p / t for p, t in zip(plain, runs[name])), 3)
        result[f"cpu_ratio_{name}"] = round(cpu["plain_grpc_stream"] / cpu[name], 3) if cpu[name] else None
    return result


# --- part 2: TTFT through real workers ---------------------------------------------------------


def part2(repeats: int) -> dict:
    from cli.processes import worker
    from engine.demo_model import write_demo_model

    tmp = Path(tempfile.mkdtemp())
    model = write_demo_model(tmp / "model")
    engine = ["--num-blocks", "2048", "--max-num-batched-tokens", "2048", "--device", "cpu"]  # on a GPU host too
    prefill = worker("prefill", model, tmp, *engine)
    decode = worker("decode", model, tmp, *engine, "--prefill-peers", prefill.address,
                    "--local-prefill-max-tokens", "0")
    g = torch.Generator().manual_seed(0)
    sampling = sampling_to_proto(SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    out: dict = {}
    try:
        stub_channel = grpc.insecure_channel(decode.address)
        from common.rpc import worker_pb2_grpc as pb_grpc

        stub = pb_grpc.DecodeServiceStub(stub_channel)

        def ttft(n: int, remote: bool, i: int) -> float:
            prompt = torch.randint(10, 2000, (n,), generator=g).tolist()  # fresh: nothing cached
            request = pb.GenerateRequest(request_id=f"{n}-{remote}-{i}", prompt_token_ids=prompt, sampling=sampling)
            if remote:
                request.prefill.address = prefill.address
            start = time.monotonic()
            first = next(iter(stub.Generate(request, timeout=60)))
            elapsed = time.monotonic() - start
            assert first.prefill_info.mode == (pb.PrefillInfo.MODE_REMOTE if remote else pb.PrefillInfo.MODE_LOCAL)
            return elapsed

        for n in (512, 2000):
            ttft(n, True, -1), ttft(n, False, -1)  # warm-up
            remote, local = [], []
            for i in range(repeats):
                remote.append(ttft(n, True, i))
                local.append(ttft(n, False, i))
            out[str(n)] = {"disaggregated_ms": round(statistics.median(remote) * 1e3, 2),
                           "colocated_ms": round(statistics.median(local) * 1e3, 2),
                           "ratio": round(statistics.median(remote) / statistics.median(local), 3)}
    finally:
        decode.stop()
        prefill.stop()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-checksum", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--message-mib", type=int, default=MAX_CHUNK_BYTES >> 20,
                        help="part 1: the transport's largest chunk (KVProducer's max_chunk_bytes) and so the plain "
                             "stream's message size (default: the workers', kvtransfer.producer.MAX_CHUNK_BYTES)")
    parser.add_argument("--transfer-only", action="store_true", help="part 1 only (no TTFT through workers)")
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc malloc as it is (workers call kvtransfer.host_memory.keep_transfer_buffers, "
                             "and so do both processes of this benchmark unless this is given)")
    parser.add_argument("--default-switch-interval", action="store_true",
                        help="leave CPython's GIL switch interval (5 ms) as it is in both processes (workers call "
                             "kvtransfer.packer.set_switch_interval)")
    args = parser.parse_args()
    if not args.default_malloc:
        keep_transfer_buffers()
    if not args.default_switch_interval:
        set_switch_interval()
    if args.serve:
        asyncio.run(serve(not args.no_checksum, args.message_mib << 20))
        return
    transfer = part1(args.repeats, args.default_malloc, args.default_switch_interval, args.message_mib)
    transfer["malloc"] = "glibc defaults" if args.default_malloc else "keep_transfer_buffers"
    transfer["switch_interval_s"] = sys.getswitchinterval()
    print(f"256 MiB of KV blocks, median of {args.repeats} interleaved rounds:")
    for name, rate in transfer["gb_per_s"].items():
        print(f"  {name:26s} {rate:7.3f} GB/s   CPU {transfer['cpu_ms_per_transfer'][name]:6.1f} ms per transfer")
    print("  ratio grpc transport / plain gRPC stream (median of per-round ratios): "
          f"{transfer['ratio_grpc_1_stream']:.2f} (1 stream), "
          f"{transfer['ratio_grpc_2_streams']:.2f} (2 streams), "
          f"{transfer['ratio_grpc_1_stream_no_checksum']:.2f} (1 stream, no payload checksums)")
    print("  plain stream's CPU time / the grpc transport's: "
          f"{transfer['cpu_ratio_grpc_1_stream']:.2f} (1 stream), {transfer['cpu_ratio_grpc_2_streams']:.2f} (2 streams)")
    print("  plain stream + only a copy out of one cache and into another: "
          f"{transfer['ratio_copies_only']:.2f} (CPU {transfer['cpu_ratio_copies_only']:.2f}), with xxh3 both sides "
          f"{transfer['ratio_copies_checksums_only']:.2f} (CPU {transfer['cpu_ratio_copies_checksums_only']:.2f})")
    ttft = part2(args.repeats) if not args.transfer_only else {}
    if ttft:
        print("time to first token, demo model (median):")
    for n, r in ttft.items():
        print(f"  {n:>5} tokens: disaggregated {r['disaggregated_ms']:8.2f} ms   colocated {r['colocated_ms']:8.2f} ms"
              f"   ratio {r['ratio']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} {platform.node()}",
            "cpus": len(os.sched_getaffinity(0)), "transfer": transfer, "ttft": ttft},
            indent=2) + "\n")


if __name__ == "__main__":
    main()
