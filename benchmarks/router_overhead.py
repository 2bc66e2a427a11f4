"""The router's added latency per request over calling a decode worker directly.

Starts a decode worker (demo model) and a router in front of it, then sends
the same requests both ways, alternating: straight to the decode worker's
gRPC ``Generate`` (the baseline), and through the router's OpenAI HTTP API
(non-streaming and streaming). Prompts are short token-id lists, decoded
locally on the worker either way, so the difference is the router: HTTP,
validation, detokenization, routing decision and the extra gRPC hop.

    python benchmarks/router_overhead.py [--requests 200] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cli.processes import pdserve, worker
from common.rpc import worker_pb2 as pb
from common.rpc import worker_pb2_grpc as pb_grpc
from common.rpc_convert import sampling_to_proto
from common.sampling import SamplingParams


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    from engine.demo_model import write_demo_model

    tmp = Path(tempfile.mkdtemp())
    model = write_demo_model(tmp / "model")
    decode = worker("decode", model, tmp, "--num-blocks", "2048")
    router = pdserve(["router", "--model", str(model), "--port", "0", "--workers", f"decode={decode.address}"],
                     tmp / "router.log")
    rng = random.Random(0)
    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    times: dict[str, list[float]] = {"direct_grpc": [], "router_http": [], "router_http_stream_ttft": []}
    try:
        deadline = time.monotonic() + 30
        while httpx.get(f"{router.address}/ready").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        channel = grpc.insecure_channel(decode.address)
        stub = pb_grpc.DecodeServiceStub(channel)
        http = httpx.Client(timeout=60)
        for i in range(args.requests + 10):
            prompt = [rng.randrange(10, 2000) for _ in range(32)]
            start = time.perf_counter()
            list(stub.Generate(pb.GenerateRequest(request_id=f"direct-{i}", prompt_token_ids=prompt,
                                                  sampling=sampling_to_proto(sampling)), timeout=60))
            direct = time.perf_counter() - start
            prompt = [rng.randrange(10, 2000) for _ in range(32)]
            body = {"model": "model", "prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0,
                    "ignore_eos": True}
            start = time.perf_counter()
            assert http.post(f"{router.address}/v1/completions", json=body).status_code == 200
            routed = time.perf_counter() - start
            prompt = [rng.randrange(10, 2000) for _ in range(32)]
            start = time.perf_counter()
            with http.stream("POST", f"{router.address}/v1/completions",
                             json={**body, "prompt": prompt, "stream": True}) as r:
                lines = r.iter_lines()
                for line in lines:
                    if line.startswith("data: {"):
                        break
                ttft = time.perf_counter() - start
                for _ in lines:
                    pass
            if i >= 10:  # warm-up
                times["direct_grpc"].append(direct)
                times["router_http"].append(routed)
                times["router_http_stream_ttft"].append(ttft)
    finally:
        router.stop()
        decode.stop()
    result = {name: {"p50_ms": round(statistics.median(v) * 1e3, 3), "p99_ms": round(pct(v, 0.99) * 1e3, 3)}
              for name, v in times.items()}
    added = [r - d for r, d in zip(times["router_http"], times["direct_grpc"])]
    result["added_latency_ms"] = {"p50": round(statistics.median(added) * 1e3, 3),
                                  "p99": round(pct(added, 0.99) * 1e3, 3)}
    print(f"{args.requests} requests, 32-token prompts, {args.max_tokens} new tokens (median / p99 ms):")
    for name in times:
        print(f"  {name:26s} {result[name]['p50_ms']:8.2f} {result[name]['p99_ms']:8.2f}")
    print(f"  router added per request   {result['added_latency_ms']['p50']:8.2f} "
          f"{result['added_latency_ms']['p99']:8.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "machine": platform.node(),
                                               "cpus": len(__import__("os").sched_getaffinity(0)),
                                               **result}, indent=2) + "\n")


if __name__ == "__main__":
    main()
