"""KV transfer between two GPUs: the nccl and grpc transports against plain baselines, bit-exact.

A 4,096-token prompt's KV of a Llama-3-8B-shaped model (32 layers x 256 blocks
of 16 tokens x 8 KV heads x 128 dims, bf16: 512 MiB) goes from a producer
process on cuda:0 to a consumer (this process) on cuda:1 through the real
path (``KVProducer`` hooks as the engine calls them, payload sink, Prefill
stream, ``KVConsumer``), and is checked bit for bit against what was sent.
Baselines in the same run: one ``torch.distributed`` NCCL send/recv of a
512 MiB tensor between the same GPUs (two processes), and a plain gRPC byte
stream of the same bytes in the grpc transport's message sizes.

The nccl transport is timed two ways: end to end (``KVConsumer.fetch``: the
Prefill RPC, the step announcement, the data, ``PrefillDone``), and its data
alone (CUDA events on the consumer: first receive posted to last block
scattered), which is what the torch.distributed baseline's timing covers. It
runs at several message sizes (a prefill worker's ``--kv-nccl-message-mib``;
16 MiB is one layer here), and torch.distributed sends the same bytes in messages of the
same sizes, to separate what the message size costs from what our code costs.
Between the same two ranks it also times the transport's pieces without the
gRPC control path: its ``Channel`` alone (cupy's NCCL, same messages), and
``NcclSink`` into ``NcclSource`` (gathers, ring, scatters; checked bit for bit).

    python benchmarks/gpu_kv_transfer.py --json FILE
    python benchmarks/gpu_kv_transfer.py --nccl-message-mib 64 --trace DIR   # where a transfer's time goes

``--trace`` adds, after the timed runs, one transfer whose Python stages are
stamped in both processes (merged into DIR/timeline.txt and printed) and one
under torch.profiler (DIR/*_trace.json, the kernels of both GPUs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import struct
import subprocess
import sys
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
from kvtransfer.consumer import KVConsumer
from kvtransfer.producer import MAX_CHUNK_BYTES, KVProducer
from kvtransfer.transport import open_sink

LAYERS, BLOCKS, BLOCK_SIZE, HEADS, DIM = 32, 256, 16, 8, 128
DTYPE = torch.bfloat16
MAX_MESSAGE = 1 << 30
TIMEOUT_S = 120.0
TOTAL_BYTES = LAYERS * 2 * BLOCKS * BLOCK_SIZE * HEADS * DIM * 2


def make_cache(seed: int, device: str) -> list[torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(2, BLOCKS, BLOCK_SIZE, HEADS, DIM, generator=g, device=device, dtype=torch.float32).to(DTYPE)
            for _ in range(LAYERS)]


STAMPS: list[tuple[float, str, str]] = []  # --trace: (time.monotonic(), thread, what), both processes


def stamp_methods(cls: type, *names: str) -> None:
    """Record when each call of ``cls.name`` starts and ends (``--trace``); the monotonic clock is shared by
    the two processes of one host, so their stamps merge into one timeline."""
    for name in names:
        fn = getattr(cls, name)
        label = f"{cls.__name__}.{name}"
        if asyncio.iscoroutinefunction(fn):
            async def wrapper(*a, _fn=fn, _label=label, **k):
                STAMPS.append((time.monotonic(), threading.current_thread().name, _label + " start"))
                try:
                    return await _fn(*a, **k)
                finally:
                    STAMPS.append((time.monotonic(), threading.current_thread().name, _label + " end"))
        else:
            def wrapper(*a, _fn=fn, _label=label, **k):
                STAMPS.append((time.monotonic(), threading.current_thread().name, _label + " start"))
                try:
                    return _fn(*a, **k)
                finally:
                    STAMPS.append((time.monotonic(), threading.current_thread().name, _label + " end"))
        setattr(cls, name, wrapper)


def profiler():
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])


async def serve(device: str, message_mib: int, trace: str | None) -> None:
    torch.cuda.set_device(device)
    if trace:
        from kvtransfer import nccl as nccl_transport

        stamp_methods(KVProducer, "begin_step", "layer_done", "prefilled", "close")
        stamp_methods(nccl_transport.NcclSink, "announce", "send_layer")
    kv = make_cache(0, device)
    loop = asyncio.get_running_loop()
    producer = KVProducer(kv, loop, lease_s=60)
    plain_chunk = bytes(producer.max_chunk_bytes)

    def compute(request: pb.PrefillRequest) -> None:  # the engine thread's part, as for a 4,096-token prompt
        torch.cuda.set_device(device)
        step = [ScheduledRequest(request.request_id, list(request.prompt_token_ids), 0, list(range(BLOCKS)), True,
                                 SamplingParams(), None, output_token_ids=[])]
        producer.begin_step(step)
        for layer in range(LAYERS):
            producer.layer_done(layer)
        producer.end_step()
        loop.call_soon_threadsafe(producer.prefilled, request.request_id, 1, None, 0)

    async def prefill(request: pb.PrefillRequest, context):
        tracing = trace and request.request_id.startswith("trace")
        profiling = tracing and request.request_id == "trace-profile"
        if tracing:
            STAMPS.clear()
            STAMPS.append((time.monotonic(), "main", "Prefill handler start"))
        if profiling:
            prof = profiler()
            prof.start()
        sink = await open_sink(request.transport, request.transport_params, producer.layout, checksum=True,
                               device=torch.device(device), nccl_message_bytes=message_mib << 20)
        transfer = producer.open(request.request_id, len(request.prompt_token_ids), list(request.dest_block_ids),
                                 0, sink, request.num_streams)
        threading.Thread(target=compute, args=(request,)).start()
        async for item in producer.relay(transfer, 0):
            if tracing:
                STAMPS.append((time.monotonic(), "main", f"Prefill yields {len(item)} bytes"))
            yield item
        if profiling:
            torch.cuda.synchronize()
            prof.stop()
            prof.export_chrome_trace(f"{trace}/producer_trace.json")
        elif tracing:
            Path(f"{trace}/producer_stamps.json").write_text(json.dumps(STAMPS))

    async def plain(request: bytes, context):
        count, = struct.unpack("<I", request)
        for _ in range(count):
            yield plain_chunk

    def passthrough(m):
        return m if isinstance(m, bytes) else m.SerializeToString()

    server = grpc.aio.server(options=[("grpc.max_send_message_length", MAX_MESSAGE),
                                      ("grpc.max_receive_message_length", MAX_MESSAGE)])
    server.add_generic_rpc_handlers((
        grpc.method_handlers_generic_handler("pdserve.v1.PrefillService", {
            "Prefill": grpc.unary_stream_rpc_method_handler(prefill, pb.PrefillRequest.FromString, passthrough)}),
        grpc.method_handlers_generic_handler("bench.Bytes", {
            "Stream": grpc.unary_stream_rpc_method_handler(plain, bytes, passthrough)}),
    ))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"READY 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


async def run_transport(address: str, transport: int, repeats: int, device: str
                        ) -> tuple[list[float], list[float], bool]:
    """End-to-end seconds, device receive seconds (GPU transports), and whether every byte arrived intact."""
    torch.cuda.set_device(device)
    kv = [torch.zeros(2, BLOCKS, BLOCK_SIZE, HEADS, DIM, dtype=DTYPE, device=device) for _ in range(LAYERS)]
    consumer = KVConsumer(kv, consumer_id="bench", max_message_bytes=MAX_MESSAGE)
    times, receive = [], []
    for i in range(repeats + 1):
        result = await consumer.fetch(
            address=address, transport=transport, num_streams=1, request_id=f"t{transport}-{i}",
            prompt_token_ids=[1] * (BLOCKS * BLOCK_SIZE), sampling=sampling_to_proto(SamplingParams()),
            block_ids=list(range(BLOCKS)), num_cached_tokens=0, timeout_s=TIMEOUT_S)
        if i:
            times.append(result.seconds)
            if result.device_receive_s is not None:
                receive.append(result.device_receive_s)
    expected = make_cache(0, device)
    exact = all(torch.equal(a, b) for a, b in zip(kv, expected))
    await consumer.close()
    return times, receive, exact


async def run_plain(address: str, repeats: int, chunk_bytes: int) -> list[float]:
    count = TOTAL_BYTES // chunk_bytes
    times = []
    async with grpc.aio.insecure_channel(address, options=[("grpc.max_receive_message_length", MAX_MESSAGE)]) as ch:
        call = ch.unary_stream("/bench.Bytes/Stream", request_serializer=bytes, response_deserializer=bytes)
        for i in range(repeats + 1):
            start = time.monotonic()
            async for _ in call(struct.pack("<I", count)):
                pass
            if i:
                times.append(time.monotonic() - start)
    return times


def torch_distributed_baseline(repeats: int, message_mib: list[int]) -> dict:
    """512 MiB sent cuda:0 -> cuda:1 with torch.distributed (NCCL), two processes: as one tensor, and in
    messages of each size of ``message_mib`` (one send after another, as the transport sends them)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sizes = ",".join(str(m) for m in message_mib)
    procs = [subprocess.Popen([sys.executable, __file__, "--dist-rank", str(r), "--dist-port", str(port),
                               "--repeats", str(repeats), "--nccl-message-mib", sizes], stdout=subprocess.PIPE,
                              text=True) for r in (0, 1)]
    out = [p.communicate(timeout=300)[0] for p in procs]
    return json.loads(out[1].strip().splitlines()[-1])


def dist_rank(rank: int, port: int, repeats: int, message_mib: list[int]) -> None:
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    tensor = torch.ones(TOTAL_BYTES, dtype=torch.uint8, device=f"cuda:{rank}")
    op = dist.send if rank == 0 else dist.recv

    def messages(mib: int):
        def run() -> None:
            for part in tensor.split(mib << 20):
                op(part, 1 - rank)
        return run

    runs = [("one_tensor", messages(TOTAL_BYTES >> 20))] + [(f"messages_{m}_mib", messages(m)) for m in message_mib]
    channel, kv = open_channel(rank, dist)
    runs += channel_runs(rank, channel, kv, tensor, message_mib)
    times: dict[str, list[float]] = {}
    for name, fn in runs:
        times[name] = []
        for i in range(repeats + 2):
            dist.barrier()
            torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            if i >= 2:
                times[name].append(time.perf_counter() - start)
    exact = rank == 0 or all(torch.equal(a, b) for a, b in zip(kv, make_cache(0, f"cuda:{rank}")))
    dist.destroy_process_group()
    print(json.dumps({"seconds": times, "sink_source_bit_exact": exact}), flush=True)


def open_channel(rank: int, dist) -> tuple:
    """The nccl transport's ``Channel`` between the two ranks (its id sent with torch.distributed), and a KV
    cache on each: the producer's random, the consumer's zeros."""
    from kvtransfer import nccl as nccl_transport

    device = torch.device(f"cuda:{rank}")
    uid = torch.zeros(128, dtype=torch.uint8, device=device)
    if rank == 0:
        from cupy.cuda import nccl

        uid.copy_(torch.tensor(list(nccl_transport._uid_bytes(nccl.get_unique_id())), dtype=torch.uint8))
    dist.broadcast(uid, 0)
    channel = nccl_transport.Channel("bench", bytes(uid.cpu().tolist()), rank, device)
    kv = make_cache(0, str(device)) if rank == 0 else [torch.zeros(2, BLOCKS, BLOCK_SIZE, HEADS, DIM, dtype=DTYPE,
                                                                   device=device) for _ in range(LAYERS)]
    return channel, kv


def channel_runs(rank: int, channel, kv: list[torch.Tensor], tensor: torch.Tensor, message_mib: list[int]
                 ) -> list[tuple[str, object]]:
    """The nccl transport's own pieces between the same two ranks, without the gRPC control path.

    ``channel_messages_M_mib``: its ``Channel`` (cupy's NCCL) sends the bytes in M MiB messages, no gather
    or scatter. ``sink_source_M_mib``: ``NcclSink`` (a gather and a send per message) into ``NcclSource``
    (ring of staging buffers, a scatter per message), the step's header built on each side instead of sent. Against
    torch.distributed's messages of the same size they split the transport's data phase into what NCCL
    costs and what gathering and scattering cost."""
    from kvtransfer import nccl as nccl_transport
    from kvtransfer.layout import KVLayout

    device = channel.device
    layout = KVLayout.of_cache(kv)
    ids = list(range(BLOCKS))
    stream = torch.cuda.current_stream(device)

    def raw(mib: int):
        def run() -> None:
            with torch.cuda.stream(channel.stream):
                for part in tensor.split(mib << 20):
                    (channel.send if rank == 0 else channel.recv)(part)
            stream.wait_stream(channel.stream)
        return run

    def sink_source(mib: int):
        def header() -> pb.KVChunkHeader:
            return pb.KVChunkHeader(request_id="bench", layer=0, block_ids=ids, dtype=layout.dtype,
                                    shape=layout.chunk_shape(len(ids)), sequence=0, num_layers=LAYERS)

        def run() -> None:
            if rank == 0:
                sink = nccl_transport.NcclSink(channel, layout, mib << 20)
                sink.announce(header(), ids)
                for layer in range(LAYERS):
                    sink.send_layer(layer, kv[layer])
                stream.wait_stream(channel.stream)
                return
            source = nccl_transport.NcclSource("bench", device)  # takes the channel from the pool
            h = header()
            layer_bytes = 2 * len(ids) * layout.block_bytes
            h.layers_per_message = nccl_transport.layers_per_message(mib << 20, layer_bytes, LAYERS)
            h.payload_bytes = layer_bytes * LAYERS
            source.apply(h, memoryview(b""), kv, layout)
            source.finish(TIMEOUT_S)
            source.close()  # and gives it back
        return run

    if rank == 1:  # the consumer's pool holds this channel, as if a transfer had opened it
        with nccl_transport._pool_lock:
            nccl_transport._free["bench"].append(channel)
            nccl_transport._count["bench"] += 1

    runs = [(f"channel_messages_{m}_mib", raw(m)) for m in message_mib]
    return runs + [(f"sink_source_{m}_mib", sink_source(m)) for m in message_mib]


async def measure(address: str, mib: int, with_grpc: bool, repeats: int, seconds: dict, exact: dict,
                  trace: str | None) -> None:
    """The nccl transport against one server (its message size ``mib``); the grpc ones too if ``with_grpc``;
    with ``trace``, one more nccl transfer under the profiler, and the stamps of both processes."""
    times, receive, exact[f"nccl_{mib}_mib"] = await run_transport(address, pb.KV_TRANSPORT_NCCL, repeats, "cuda:1")
    seconds[f"nccl_{mib}_mib"], seconds[f"nccl_{mib}_mib_data"] = times, receive
    if trace:
        await trace_transfer(address, trace)
    if with_grpc:
        seconds["grpc"], _, exact["grpc"] = await run_transport(address, pb.KV_TRANSPORT_GRPC, repeats, "cuda:1")
        seconds["plain_grpc"] = await run_plain(address, repeats, MAX_CHUNK_BYTES)


async def trace_transfer(address: str, trace: str) -> None:
    """One nccl transfer (after a warm one) under torch.profiler, its Python stages stamped on both sides;
    writes the traces and stamps under ``trace`` and prints the merged host timeline."""
    from kvtransfer import nccl as nccl_transport

    stamp_methods(KVConsumer, "fetch", "_apply")
    stamp_methods(nccl_transport.NcclSource, "apply", "finish", "close")
    torch.cuda.set_device("cuda:1")
    kv = [torch.zeros(2, BLOCKS, BLOCK_SIZE, HEADS, DIM, dtype=DTYPE, device="cuda:1") for _ in range(LAYERS)]
    consumer = KVConsumer(kv, consumer_id="bench", max_message_bytes=MAX_MESSAGE)

    async def fetch(request_id: str) -> None:
        await consumer.fetch(address=address, transport=pb.KV_TRANSPORT_NCCL, num_streams=1, request_id=request_id,
                             prompt_token_ids=[1] * (BLOCKS * BLOCK_SIZE),
                             sampling=sampling_to_proto(SamplingParams()), block_ids=list(range(BLOCKS)),
                             num_cached_tokens=0, timeout_s=TIMEOUT_S)
        torch.cuda.synchronize()

    await fetch("warm")
    STAMPS.clear()
    await fetch("trace")  # stamped only: the profiler slows every host step several times
    stamps = list(STAMPS)
    prof = profiler()
    prof.start()
    await fetch("trace-profile")
    prof.stop()
    await consumer.close()
    prof.export_chrome_trace(f"{trace}/consumer_trace.json")
    producer = [(t, "prefill " + thread, what) for t, thread, what in json.loads(
        Path(f"{trace}/producer_stamps.json").read_text())]
    merged = sorted([(t, "decode " + thread, what) for t, thread, what in stamps] + producer)
    start = merged[0][0]
    lines = [f"{(t - start) * 1e3:9.3f} ms  {thread:24s} {what}" for t, thread, what in merged]
    Path(f"{trace}/timeline.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def start_server(message_mib: int, extra: list[str]) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0"}
    server = subprocess.Popen([sys.executable, __file__, "--serve", "cuda:0", "--nccl-message-mib", str(message_mib),
                               *extra], stdout=subprocess.PIPE, text=True, env=env)
    return server, server.stdout.readline().split()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--dist-rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--dist-port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--nccl-message-mib", default="16,64,128,512",
                        help="nccl transport message sizes to run (a prefill worker's --kv-nccl-message-mib); 64, "
                             "the default, gives the headline figure")
    parser.add_argument("--json")
    parser.add_argument("--timeout", type=float, default=120)
    parser.add_argument("--trace", help="a directory: profile one nccl transfer at the first message size, "
                        "write both processes' traces and a merged timeline of their stages there")
    parser.add_argument("--dump-stacks-after", type=float, help="print every thread's stack after this many s")
    args = parser.parse_args()
    message_mib = [int(m) for m in args.nccl_message_mib.split(",")]
    if args.dump_stacks_after:
        import faulthandler

        faulthandler.dump_traceback_later(args.dump_stacks_after, exit=False)
    if args.serve:
        asyncio.run(serve(args.serve, message_mib[0], args.trace))
        return
    global TIMEOUT_S
    TIMEOUT_S = args.timeout
    if args.dist_rank is not None:
        dist_rank(args.dist_rank, args.dist_port, args.repeats, message_mib)
        return
    extra = ["--dump-stacks-after", str(args.dump_stacks_after)] if args.dump_stacks_after else []
    if args.trace:
        Path(args.trace).mkdir(parents=True, exist_ok=True)
    seconds: dict[str, list[float]] = {}
    exact: dict[str, bool] = {}
    for i, mib in enumerate(message_mib):
        server, address = start_server(mib, extra + (["--trace", args.trace] if args.trace and i == 0 else []))
        try:
            asyncio.run(measure(address, mib, i == 0, args.repeats, seconds, exact, args.trace if i == 0 else None))
        finally:
            server.kill()
    pair = torch_distributed_baseline(args.repeats, message_mib)
    for name, times in pair["seconds"].items():  # the transport's own pieces keep their names
        seconds[name if name.startswith(("channel", "sink_source")) else
                "torch_distributed" if name == "one_tensor" else f"torch_distributed_{name}"] = times
    exact["sink_source"] = pair["sink_source_bit_exact"]
    gbs = {name: TOTAL_BYTES / statistics.median(times) / 1e9 for name, times in seconds.items()}
    base = gbs["torch_distributed"]
    head = 64 if 64 in message_mib else message_mib[0]
    result = {"date": time.strftime("%Y-%m-%d"), "gpu": torch.cuda.get_device_name(0),
              "gpus_on_host": torch.cuda.device_count(), "bytes": TOTAL_BYTES, "nccl_message_mib": head, "gb_per_s": gbs,
              "nccl_vs_torch_distributed": gbs[f"nccl_{head}_mib"] / base,
              "nccl_data_vs_torch_distributed": gbs[f"nccl_{head}_mib_data"] / base,
              "grpc_vs_plain_grpc": gbs["grpc"] / gbs["plain_grpc"], "bit_exact": exact, "seconds": seconds}
    for name, rate in gbs.items():
        print(f"{name:42s} {rate:8.2f} GB/s")
    print(f"nccl ({head} MiB messages) / torch.distributed: end to end {result['nccl_vs_torch_distributed']:.2f}, "
          f"data {result['nccl_data_vs_torch_distributed']:.2f}; grpc / plain gRPC "
          f"{result['grpc_vs_plain_grpc']:.2f}; bit-exact {exact}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
