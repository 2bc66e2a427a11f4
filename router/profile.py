"""``pdserve profile``: measure running workers and fit the router's cost model.

Against a decode worker (and optionally a prefill worker that it may pull KV
from) it measures, with synthetic prompts of fresh random tokens so nothing
is cached by accident:

* prefill time for prompts of several lengths, with nothing cached and with
  half of the prompt cached (the prefix sent once before): time to the first
  token of a locally prefilled request with ``max_tokens=1``;
* decode step time at several batch sizes and context lengths: the steady-state
  gap between tokens of a batch of concurrent requests;
* (with ``--prefill-worker``) KV transfer: remote prefills of several sizes;
  the time the decode worker reports for the transfer, minus the fitted
  prefill time, against the bytes moved.

The samples are fitted by non-negative least squares (``fit_cost_model``) and
the model is written as JSON for ``pdserve router --cost-model``; the fit's R²
per kind is printed so a bad calibration is visible.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time

from common.rpc import worker_pb2 as pb
from common.rpc import worker_pb2_grpc as pb_grpc
from common.rpc_convert import sampling_to_proto
from common.sampling import SamplingParams
from common.tls import add_tls_args, aio_channel, load_tls
from router.cost_model import DecodeSample, PrefillSample, fit_cost_model, fit_r2
from router.links import TransferSample

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class Profiler:
    def __init__(self, decode_address: str, prefill_address: str | None, *, vocab_size: int, seed: int = 0,
                 repeats: int = 3) -> None:
        self.decode_address = decode_address
        self.prefill_address = prefill_address
        self.vocab_size = vocab_size
        self.rng = random.Random(seed)
        self.repeats = repeats
        self._ids = 0

    def _prompt(self, n: int) -> list[int]:
        return [self.rng.randrange(10, self.vocab_size) for _ in range(n)]

    def _rid(self) -> str:
        self._ids += 1
        return f"profile-{time.monotonic_ns()}-{self._ids}"

    async def _first_token(self, stub: pb_grpc.DecodeServiceStub, prompt: list[int], *, remote: bool = False
                           ) -> tuple[float, pb.PrefillInfo]:
        request = pb.GenerateRequest(request_id=self._rid(), prompt_token_ids=prompt, sampling=sampling_to_proto(
            SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)))
        if remote:
            request.prefill.address = self.prefill_address
        start = time.monotonic()
        info = pb.PrefillInfo()
        async for msg in stub.Generate(request, timeout=600):
            if msg.HasField("prefill_info"):
                info = msg.prefill_info
        return time.monotonic() - start, info

    async def prefill_samples(self, stub: pb_grpc.DecodeServiceStub, lengths: list[int], block_size: int
                              ) -> list[PrefillSample]:
        samples = []
        for n in lengths:
            for cached_fraction in (0.0, 0.5):
                times = []
                cached = 0
                for _ in range(self.repeats):
                    prompt = self._prompt(n)
                    cached = int(n * cached_fraction) // block_size * block_size
                    if cached:
                        await self._first_token(stub, prompt[:cached + 1])  # warm the prefix
                    seconds, _ = await self._first_token(stub, prompt)
                    times.append(seconds)
                samples.append(PrefillSample(new_tokens=n - cached, cached_tokens=cached,
                                             seconds=statistics.median(times)))
        return samples

    async def decode_samples(self, stub: pb_grpc.DecodeServiceStub, batches: list[int], contexts: list[int],
                             steps: int = 48) -> list[DecodeSample]:
        samples = []
        for context in contexts:
            for batch in batches:
                arrivals: list[list[float]] = [[] for _ in range(batch)]
                await asyncio.gather(*(self._decode_one(stub, context, steps, arrivals[i]) for i in range(batch)))
                gaps = []
                for times in arrivals:  # the steady state: every request past its prefill
                    window = times[steps // 3: steps - 2]
                    gaps += [b - a for a, b in zip(window, window[1:])]
                if gaps:
                    samples.append(DecodeSample(batch_size=batch, context_tokens=batch * (context + steps // 2),
                                                seconds=statistics.median(gaps)))
        return samples

    async def _decode_one(self, stub: pb_grpc.DecodeServiceStub, context: int, steps: int,
                          arrivals: list[float]) -> None:
        request = pb.GenerateRequest(request_id=self._rid(), prompt_token_ids=self._prompt(context), sampling=(
            sampling_to_proto(SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True))))
        async for msg in stub.Generate(request, timeout=600):
            arrivals.extend([time.monotonic()] * len(msg.token_ids))

    async def transfer_samples(self, stub: pb_grpc.DecodeServiceStub, lengths: list[int], kv_bytes_per_token: int,
                               prefill_model) -> list[TransferSample]:
        samples = []
        for n in lengths:
            visible = []
            for _ in range(self.repeats):
                _, info = await self._first_token(stub, self._prompt(n), remote=True)
                if info.mode != pb.PrefillInfo.MODE_REMOTE:
                    raise RuntimeError(f"the decode worker did not pull KV remotely ({info}); is "
                                       f"{self.prefill_address} one of its --prefill-peers?")
                # what the transfer added to the prefill: the worker reports its queue and compute time
                prefill_s = (info.prefill_queue_s + info.prefill_compute_s if info.prefill_compute_s > 0
                             else prefill_model.prefill_time(n, 0))
                visible.append(max(1e-6, info.kv_transfer_s - prefill_s))
            samples.append(TransferSample(num_bytes=n * kv_bytes_per_token, seconds=statistics.median(visible)))
        return samples


async def profile(args: argparse.Namespace) -> int:
    async with aio_channel(args.decode_worker, load_tls(args)) as channel:
        health = await pb_grpc.WorkerAdminStub(channel).Health(pb.HealthRequest(), timeout=10)
        if health.role != "decode":
            print(f"error: {args.decode_worker} is a {health.role} worker; profile a decode worker",
                  file=sys.stderr)
            return 2
        layout = health.layout
        kv_bytes = 2 * layout.num_layers * layout.num_kv_heads * layout.head_dim * DTYPE_BYTES[layout.dtype]
        profiler = Profiler(args.decode_worker, args.prefill_worker, vocab_size=args.vocab_size,
                            repeats=args.repeats)
        stub = pb_grpc.DecodeServiceStub(channel)
        lengths = [n for n in (16, 64, 256, 512, 1024, 2048, 4096) if n <= args.max_prompt_tokens]
        prefill = await profiler.prefill_samples(stub, lengths, layout.block_size)
        decode = await profiler.decode_samples(stub, [1, 2, 4, 8, 16, 32][:args.max_batch_log2 + 1], [128, 1024])
        model = fit_cost_model([*prefill, *decode], source=f"pdserve profile {args.decode_worker}")
        samples = [*prefill, *decode]
        if args.prefill_worker:
            transfer = await profiler.transfer_samples(stub, [n for n in (512, 1024, 2048) if n <= args.max_prompt_tokens],
                                                       kv_bytes, model)
            try:
                model = fit_cost_model([*samples, *transfer], base=model, source=model.source)
                samples += transfer
            except ValueError as e:  # transfers hidden behind prefill compute show no size dependence
                print(f"note: KV transfer not fitted ({e}); visible transfer times: "
                      + ", ".join(f"{s.num_bytes >> 20} MiB {s.seconds * 1e3:.1f} ms" for s in transfer))
    model.save(args.out)
    r2 = fit_r2(model, samples)
    print(f"wrote {args.out}: " + ", ".join(f"R² {k} {v:.3f}" for k, v in r2.items()))
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--decode-worker", required=True, help="host:port of a decode worker to measure")
    parser.add_argument("--prefill-worker", help="host:port of a prefill worker (one of its peers): measure KV "
                                                 "transfer too")
    parser.add_argument("--out", required=True, help="where to write the cost model (JSON)")
    parser.add_argument("--vocab-size", type=int, default=2000, help="draw prompt tokens below this id")
    parser.add_argument("--max-prompt-tokens", type=int, default=2048)
    parser.add_argument("--max-batch-log2", type=int, default=5, help="largest decode batch is 2**this")
    parser.add_argument("--repeats", type=int, default=3)
    add_tls_args(parser)


def run(args: argparse.Namespace) -> int:
    return asyncio.run(profile(args))
