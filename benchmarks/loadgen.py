"""Open-loop load against pdserve's OpenAI API: Poisson arrivals, lengths from a real trace.

Each request streams (SSE) a completion of a random token-id prompt whose
length, like its output length, is drawn from a trace's requests (Azure
conversation CSV or Mooncake JSONL), so the mix is real but nothing is cached
by accident. Per request it records time to first token and mean inter-token
latency; ``summarize`` turns them into percentiles, SLO attainment and goodput
(requests per second that met both SLOs).

    python benchmarks/loadgen.py --url http://HOST:PORT --rate 8 --duration 60 \\
        --trace ../shared/traces/azure_llm_2023/AzureLLMInferenceTrace_conv.csv --ttft-slo 0.5 --itl-slo 0.05
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import random
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx


@dataclass
class Result:
    prompt_tokens: int
    output_tokens: int
    ok: bool
    ttft_s: float = 0.0
    itl_s: float = 0.0
    e2e_s: float = 0.0
    status: int = 0


def trace_lengths(path: str, max_len: int) -> list[tuple[int, int]]:
    out = []
    if path.endswith(".jsonl"):
        for line in Path(path).read_text().splitlines():
            r = json.loads(line)
            out.append((r["input_length"], r["output_length"]))
    else:
        with open(path) as f:
            for r in csv.DictReader(f):
                out.append((int(r["ContextTokens"]), int(r["GeneratedTokens"])))
    return [(max(1, min(i, max_len - o - 1)), max(1, o)) for i, o in out if o < max_len]


async def one(client: httpx.AsyncClient, url: str, model: str, prompt_len: int, output_len: int, vocab: int,
              rng: random.Random, key: str | None) -> Result:
    prompt = [rng.randrange(100, vocab) for _ in range(prompt_len)]
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0, "ignore_eos": True,
            "stream": True}
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    start = time.perf_counter()
    first = last = None
    tokens = 0
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as r:
            if r.status_code != 200:
                await r.aread()
                return Result(prompt_len, output_len, False, status=r.status_code)
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                now = time.perf_counter()
                if '"text"' in line:
                    tokens += 1  # one chunk per decode step (single-token chunks)
                    first = first or now
                    last = now
    except httpx.HTTPError:
        return Result(prompt_len, output_len, False, status=-1)
    if first is None:
        return Result(prompt_len, output_len, False, status=200)
    itl = (last - first) / max(1, tokens - 1)
    return Result(prompt_len, output_len, True, first - start, itl, last - start, 200)


async def run(url: str, model: str, rate: float, duration: float, lengths: list[tuple[int, int]], *, vocab: int,
              seed: int, key: str | None = None) -> list[Result]:
    rng = random.Random(seed)
    tasks = []
    limits = httpx.Limits(max_connections=4096, max_keepalive_connections=512)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.perf_counter()
        t = 0.0
        while t < duration:
            t += rng.expovariate(rate)
            delay = start + t - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            p, o = rng.choice(lengths)
            tasks.append(asyncio.create_task(one(client, url, model, p, o, vocab, random.Random(rng.random()), key)))
        return list(await asyncio.gather(*tasks))


def summarize(results: list[Result], duration: float, ttft_slo: float, itl_slo: float) -> dict:
    ok = [r for r in results if r.ok]
    good = [r for r in ok if r.ttft_s <= ttft_slo and r.itl_s <= itl_slo]

    def pct(values: list[float], q: float) -> float:
        return sorted(values)[min(len(values) - 1, int(q * len(values)))] if values else float("nan")

    ttft = [r.ttft_s for r in ok]
    itl = [r.itl_s for r in ok]
    return {"requests": len(results), "completed": len(ok), "failed": len(results) - len(ok),
            "ttft_p50_s": pct(ttft, 0.5), "ttft_p90_s": pct(ttft, 0.9), "ttft_p99_s": pct(ttft, 0.99),
            "itl_p50_s": pct(itl, 0.5), "itl_p90_s": pct(itl, 0.9),
            "ttft_mean_s": statistics.mean(ttft) if ttft else float("nan"),
            "slo_attainment": len(good) / len(results) if results else 0.0, "goodput_rps": len(good) / duration,
            "ttft_slo_s": ttft_slo, "itl_slo_s": itl_slo}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--model", default="model")
    parser.add_argument("--rate", type=float, required=True, help="requests per second (Poisson)")
    parser.add_argument("--duration", type=float, default=60)
    parser.add_argument("--trace", required=True)
    parser.add_argument("--max-model-len", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=2000)
    parser.add_argument("--ttft-slo", type=float, default=0.5)
    parser.add_argument("--itl-slo", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json")
    args = parser.parse_args()
    results = asyncio.run(run(args.url, args.model, args.rate, args.duration,
                              trace_lengths(args.trace, args.max_model_len), vocab=args.vocab, seed=args.seed))
    summary = summarize(results, args.duration, args.ttft_slo, args.itl_slo)
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "results": [asdict(r) for r in results]}) + "\n")


if __name__ == "__main__":
    main()
