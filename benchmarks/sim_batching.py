"""Engine batch policies on one simulated instance: FCFS static, dynamic (SLA), shortest-first.

One colocated instance (prompts and decode on one engine, chunked prefill, 2048-token budget per
step) of Llama-2-70B on 4 x H100 serves the Azure LLM conversation trace (first 3,000 requests,
slowed down to a rate one instance can carry), batched by each of the engine's policies
(``common.batch_policy``, the same objects ``engine/scheduler.py`` runs):

- ``static``: FCFS with a limit of 128 running requests (the baseline; memory-unaware);
- ``dynamic``: memory-aware batch size with SLA feedback (arXiv 2503.05248), TBT target 0.1 s;
- ``shortest_first``: memory-constrained shortest-first, MC-SF (arXiv 2502.07115).

Both memory-aware policies plan with output lengths: the true ones (an oracle) and the router's
length predictor's (``prefix_history``; the Azure trace has no prompt content, so it predicts from
prompt-length buckets). The KV cache is made the constraint: 50,000 tokens at 0.45x the trace's
rate, and 30,000 tokens at 0.3x (a long-context deployment's leftover memory, or a smaller GPU).
SLOs: TTFT 2 s, TPOT 0.1 s.

    python benchmarks/sim_batching.py [--max-requests 3000]
"""

from __future__ import annotations

import argparse

from bench_env import AZURE_CONV
from sim_common import calibration, png, table, write

SCENARIOS = ((50_000, 0.45), (30_000, 0.3))
RUNS = (("static", "true"), ("dynamic", "true"), ("dynamic", "predicted"), ("shortest_first", "true"),
        ("shortest_first", "predicted"))


def main() -> None:
    from simulator import read_azure
    from simulator.batching import run_batching
    from simulator.plots import plot_bars

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-requests", type=int, default=3000)
    args = parser.parse_args()

    cal = calibration()
    results = {}
    for kv, rate in SCENARIOS:
        trace = read_azure(AZURE_CONV, rate_scale=rate, max_requests=args.max_requests)
        rows = []
        for policy, lengths in RUNS:
            result = run_batching(trace, cal, policy=policy, lengths=lengths, kv_capacity_tokens=kv,
                                  ttft_slo_s=2.0, tbt_slo_s=0.1)
            label = policy if policy == "static" else f"{policy} ({lengths})"
            rows.append({"policy": label, **result.summary()})
        key = f"kv{kv // 1000}k_rate{rate}"
        results[key] = rows
        print(f"\n{len(trace)} Azure conversation requests at {rate}x on one instance with {kv} KV tokens; "
              f"{cal.cost.source}")
        print(table(rows, [("policy", "policy", ""), ("e2e_mean_s", "e2e mean s", ".2f"),
                           ("ttft_mean_s", "TTFT mean", ".2f"), ("ttft_p90_s", "TTFT p90", ".2f"),
                           ("tpot_p90_s", "TPOT p90", ".4f"), ("tbt_p90_s", "TBT p90", ".4f"),
                           ("slo_attainment", "SLO att.", ".3f"), ("throughput_tokens_per_s", "tok/s", ".0f"),
                           ("preemptions", "preempt", "d"), ("wall_s", "wall s", ".1f")]))
    labels = [r["policy"] for r in next(iter(results.values()))]
    plot_bars(labels, {k: [r["e2e_mean_s"] for r in rows] for k, rows in results.items()},
              png("sim_batching"), ylabel="mean end-to-end latency (s)",
              title="one instance, Azure conversation trace: engine batch policies")
    write("sim_batching", {
        "trace": AZURE_CONV.name, "max_requests": args.max_requests, "cost_model": cal.cost.source,
        "engine": {"max_num_batched_tokens": 2048, "max_num_requests": 128, "block_size": 16},
        "slo": {"ttft_s": 2.0, "tbt_s": 0.1}, "length_predictor": "prefix_history",
        "scenarios": [{"kv_capacity_tokens": kv, "rate_scale": rate} for kv, rate in SCENARIOS], "results": results})


if __name__ == "__main__":
    main()
