"""Mooncake's prefill-scheduling ablation, replayed on the FAST'25 conversation trace.

Mooncake (Qin et al., FAST'25) compares four ways to pick the prefill instance: random,
load-balanced, local cache-aware and global cache-aware, and reports mean TTFT falling in that
order. This replays the whole conversation trace (12,031 requests, 1x rate) through the
simulator with the router's own implementations of those four, NVIDIA Dynamo's KV-router cost
(``dynamo``) and pdserve's ``transfer_aware``, on three cluster sizes (6+6, 8+8, 16+16 instances of
Llama-2-70B on 4 x H100), without rejection (every request is served, so TTFT compares placement
alone). Every policy runs with the router's default ``RoutingConfig`` (SLOs TTFT 2 s, TBT 0.1 s,
``decode_weight`` 0.25) except ``reject=False``; the SLO attainment column is against those SLOs
(strict for this long-context trace: a 12k-token prompt alone takes 1.4 s to prefill). One extra
row, ``transfer_aware dw=0``, shows the policy without its decode-pressure term. The 16+16
transfer_aware run is also the speed check (the whole trace, 32 instances, one process).

    python benchmarks/sim_mooncake_ablation.py [--clusters 6,8,16] [--max-requests N]
"""

from __future__ import annotations

import argparse

from bench_env import MOONCAKE
from sim_common import calibration, png, table, write

MOONCAKE_ORDER = ("random", "load_balanced", "local_cache_aware", "global_cache_aware")
POLICIES_PLOTTED = ("random", "load_balanced", "global_cache_aware", "dynamo", "transfer_aware")
# (row label, policy, RoutingConfig overrides besides reject=False)
RUNS = (*((p, p, {}) for p in MOONCAKE_ORDER), ("dynamo", "dynamo", {}), ("transfer_aware", "transfer_aware", {}),
        ("transfer_aware dw=0", "transfer_aware", {"decode_weight": 0.0}))


def main() -> None:
    from router.routing_config import RoutingConfig
    from simulator import Simulation, cluster_config, read_mooncake
    from simulator.plots import plot_bars, plot_latency

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clusters", default="6,8,16", help="instances per pool, comma-separated")
    parser.add_argument("--max-requests", type=int, default=None)
    args = parser.parse_args()

    cal = calibration()
    trace = read_mooncake(MOONCAKE, max_requests=args.max_requests)
    results, checks, latency = {}, {}, {}
    for n in (int(x) for x in args.clusters.split(",")):
        rows = []
        for label, policy, overrides in RUNS:
            routing = RoutingConfig(policy=policy, reject=False, **overrides)
            config = cluster_config(cal, trace.block_size, num_prefill=n, num_decode=n, routing=routing)
            result = Simulation(config, cal.cost).run(trace)
            rows.append({"policy": label, **result.summary()})
            if n == 8 and label in POLICIES_PLOTTED:
                latency[label] = result
        key = f"{n}P{n}D"
        results[key] = rows
        ttft = {r["policy"]: r["ttft_mean_s"] for r in rows}
        order = all(ttft[a] > ttft[b] for a, b in zip(MOONCAKE_ORDER, MOONCAKE_ORDER[1:]))
        checks[key] = {"published_order_holds": order,
                       "transfer_aware_at_least_best_of_four": ttft["transfer_aware"] <= min(ttft[p] for p in MOONCAKE_ORDER),
                       "transfer_aware_beats_dynamo": ttft["transfer_aware"] < ttft["dynamo"]}
        print(f"\n{key}: {len(trace)} requests, Mooncake conversation trace at 1x; {cal.cost.source}")
        print(table(rows, [("policy", "policy", ""), ("ttft_mean_s", "TTFT mean s", ".3f"),
                           ("ttft_p50_s", "p50", ".3f"), ("ttft_p90_s", "p90", ".3f"), ("ttft_p99_s", "p99", ".2f"),
                           ("prefix_hit_rate", "prefix hit", ".3f"), ("tpot_p90_s", "TPOT p90 s", ".4f"),
                           ("slo_attainment", "SLO att.", ".4f"), ("preemptions", "preempt", "d"),
                           ("wall_s", "wall s", ".1f")]))
        print("  " + ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in checks[key].items()))

    speed = next((r for r in results.get("16P16D", []) if r["policy"] == "transfer_aware"), None)
    if speed is not None:
        print(f"\nspeed: whole trace ({speed['requests']} requests), 32 instances, transfer_aware: "
              f"{speed['wall_s']:.1f} s wall (bound: 60 s on 2 cores)")
    labels = [label for label, _, _ in RUNS]
    plot_bars(labels, {k: [next(r["ttft_mean_s"] for r in rows if r["policy"] == p) for p in labels]
                       for k, rows in results.items()},
              png("sim_mooncake_ablation"), ylabel="mean TTFT (s)",
              title="Mooncake conversation trace, 1x: mean TTFT by prefill scheduling policy")
    if latency:
        plot_latency(latency, png("sim_mooncake_ablation", "latency_8P8D"), bin_s=120.0,
                     title="8P+8D, Mooncake conversation trace: TTFT and TPOT p90 per 2 minutes")
    write("sim_mooncake_ablation", {
        "trace": str(MOONCAKE.name), "requests": len(trace), "rate_scale": 1.0, "cost_model": cal.cost.source,
        "kv_capacity_tokens": cal.cost.kv_capacity_tokens, "block_size": trace.block_size,
        "routing": "RoutingConfig defaults (ttft_slo_s 2.0, tbt_slo_s 0.1, decode_weight 0.25), reject=False",
        "rejection": "off", "results": results,
        "checks": checks, "speed_32_instances_wall_s": speed["wall_s"] if speed else None})


if __name__ == "__main__":
    main()
