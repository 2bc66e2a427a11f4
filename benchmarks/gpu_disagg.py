"""Disaggregation on two GPUs: TTFT against colocated, and goodput against two colocated engines.

Llama-3-8B-shaped model, random bf16 weights (nothing downloaded).

* TTFT: a prefill worker on cuda:0 and a decode worker on cuda:1 (KV over
  NCCL) against the same decode worker prefilling the prompt itself, for
  1k-, 4k- and 16k-token prompts (fresh prompts, median of ``--repeats``).
* Goodput: 1 prefill + 1 decode worker behind a router, against 2 colocated
  engines (decode workers prefilling locally) behind a router, under Poisson
  arrivals whose prompt and output lengths follow the Azure conversation
  trace, at the stated TTFT and inter-token-latency SLOs.

    python benchmarks/gpu_disagg.py --json FILE [--part ttft|goodput|all]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_engine import write_config
from benchmarks.loadgen import run as load_run
from benchmarks.loadgen import summarize, trace_lengths
from cli.processes import pdserve, worker
from common.rpc import worker_pb2 as pb
from common.rpc import worker_pb2_grpc as pb_grpc
from common.rpc_convert import sampling_to_proto
from common.sampling import SamplingParams

TRACE = Path(__file__).resolve().parents[2] / "shared" / "traces" / "azure_llm_2023" / "AzureLLMInferenceTrace_conv.csv"
ENGINE = ["--dtype", "bfloat16", "--load-format", "dummy", "--max-model-len", "20480", "--max-num-batched-tokens",
          "8192", "--max-num-requests", "256", "--max-graph-batch-size", "128"]
DEVICES = ["cuda:0", "cuda:1"]
TRANSPORT = pb.KV_TRANSPORT_NCCL
TRANSPORT_NAME = "nccl"


def dry_run() -> None:
    """Wire everything on the CPU with a small model, to check the script before spending GPU time."""
    global ENGINE, DEVICES, TRANSPORT, TRANSPORT_NAME
    ENGINE = ["--dtype", "float32", "--load-format", "dummy", "--max-model-len", "20480", "--num-blocks", "4096"]
    DEVICES = ["cpu", "cpu"]
    TRANSPORT, TRANSPORT_NAME = pb.KV_TRANSPORT_GRPC, "grpc"


def ttft(decode: str, prefill: str | None, n: int, rid: str) -> float:
    import random

    prompt = [random.randrange(100, 120000) for _ in range(n)]
    request = pb.GenerateRequest(request_id=rid, prompt_token_ids=prompt, sampling=sampling_to_proto(
        SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)))
    if prefill:
        request.prefill.address = prefill
        request.prefill.transport = TRANSPORT
    with grpc.insecure_channel(decode) as channel:
        start = time.perf_counter()
        first = next(iter(pb_grpc.DecodeServiceStub(channel).Generate(request, timeout=120)))
        elapsed = time.perf_counter() - start
    want = pb.PrefillInfo.MODE_REMOTE if prefill else pb.PrefillInfo.MODE_LOCAL
    assert first.prefill_info.mode == want, first.prefill_info
    return elapsed


def part_ttft(model: Path, logs: Path, repeats: int, lengths: list[int]) -> dict:
    p = worker("prefill", model, logs, *ENGINE, "--device", DEVICES[0])
    d = worker("decode", model, logs, *ENGINE, "--device", DEVICES[1], "--prefill-peers", p.address,
               "--local-prefill-max-tokens", "0")
    out = {}
    try:
        for n in lengths:
            for i in range(2):  # warm: NCCL channel, kernels for this shape
                ttft(d.address, p.address, n, f"w{n}-{i}"), ttft(d.address, None, n, f"wl{n}-{i}")
            remote = [ttft(d.address, p.address, n, f"r{n}-{i}") for i in range(repeats)]
            local = [ttft(d.address, None, n, f"l{n}-{i}") for i in range(repeats)]
            out[str(n)] = {"disaggregated_ms": statistics.median(remote) * 1e3,
                           "colocated_ms": statistics.median(local) * 1e3,
                           "ratio": statistics.median(remote) / statistics.median(local)}
            print(f"TTFT {n:6d} tokens: disaggregated {out[str(n)]['disaggregated_ms']:8.1f} ms, colocated "
                  f"{out[str(n)]['colocated_ms']:8.1f} ms, ratio {out[str(n)]['ratio']:.3f}", flush=True)
    finally:
        d.stop()
        p.stop()
    return out


def wait_ready(url: str) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(url)


def part_goodput(model: Path, logs: Path, rates: list[float], duration: float, ttft_slo: float,
                 itl_slo: float, trace: Path) -> dict:
    lengths = trace_lengths(str(trace), 8192)
    out: dict = {"trace": trace.name, "ttft_slo_s": ttft_slo, "itl_slo_s": itl_slo, "duration_s": duration}
    setups = {
        "1 prefill + 1 decode": lambda: (
            [worker("prefill", model, logs, *ENGINE, "--device", DEVICES[0], name="gp")],
            ["--policy", "transfer_aware", "--no-reject", "--no-local-prefill-by-cost", "--kv-transport",
             TRANSPORT_NAME]),
        "2 colocated": lambda: ([], ["--policy", "least_loaded"]),
    }
    for name, make in setups.items():
        prefills, router_args = make()
        peers = ["--prefill-peers", prefills[0].address] if prefills else []
        devices = DEVICES[1:] if prefills else DEVICES
        decodes = [worker("decode", model, logs, *ENGINE, "--device", dev, *peers, name=f"gd{i}")
                   for i, dev in enumerate(devices)]
        workers = f"prefill={','.join(p.address for p in prefills)};decode={','.join(d.address for d in decodes)}"
        router = pdserve(["router", "--model", str(model), "--port", "0", "--workers", workers, *router_args],
                         logs / f"router-{len(prefills)}.log")
        try:
            wait_ready(router.address)
            rows = []
            for rate in rates:
                results = asyncio.run(load_run(router.address, "llama3-8b", rate, duration, lengths,
                                               vocab=120000, seed=int(rate * 10)))
                summary = summarize(results, duration, ttft_slo, itl_slo)
                summary["rate_rps"] = rate
                rows.append(summary)
                print(f"{name:22s} rate {rate:5.1f}/s: goodput {summary['goodput_rps']:6.2f}/s, SLO attainment "
                      f"{summary['slo_attainment']:.2f}, TTFT p90 {summary['ttft_p90_s']*1e3:7.1f} ms, ITL p90 "
                      f"{summary['itl_p90_s']*1e3:6.1f} ms, failed {summary['failed']}", flush=True)
            out[name] = rows
        finally:
            for proc in (router, *decodes, *prefills):
                proc.stop()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", default="all", choices=["ttft", "goodput", "all"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rates", default="8,16")
    parser.add_argument("--duration", type=float, default=40)
    parser.add_argument("--ttft-slo", type=float, default=0.5)
    parser.add_argument("--itl-slo", type=float, default=0.05)
    parser.add_argument("--json")
    parser.add_argument("--trace", type=Path, default=TRACE, help="Azure conversation CSV (or Mooncake JSONL)")
    parser.add_argument("--dry-run", action="store_true", help="a small model on the CPU (checks the wiring)")
    parser.add_argument("--lengths", default="1024,4096,16384", help="TTFT prompt lengths")
    parser.add_argument("--transport", default="nccl", choices=["nccl", "grpc"], help="KV transport")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    overrides = None
    global TRANSPORT, TRANSPORT_NAME
    TRANSPORT, TRANSPORT_NAME = {"nccl": (pb.KV_TRANSPORT_NCCL, "nccl"), "grpc": (pb.KV_TRANSPORT_GRPC, "grpc")}[
        args.transport]
    result_transport = args.transport
    if args.dry_run:
        dry_run()
        overrides = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "num_key_value_heads": 2, "head_dim": 32}
    model = write_config(tmp / "llama3-8b", overrides)
    from engine.demo_model import write_demo_tokenizer

    write_demo_tokenizer(model, 128256, 131072)  # the router needs a tokenizer covering the model's vocabulary
    result: dict = {"date": time.strftime("%Y-%m-%d"), "kv_transport": result_transport}
    if args.part in ("ttft", "all"):
        result["ttft"] = part_ttft(model, tmp, args.repeats, [int(n) for n in args.lengths.split(",")])
    if args.part in ("goodput", "all"):
        result["goodput"] = part_goodput(model, tmp, [float(r) for r in args.rates.split(",")], args.duration,
                                         args.ttft_slo, args.itl_slo, args.trace)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
