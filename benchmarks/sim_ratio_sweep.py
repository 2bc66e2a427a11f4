"""Prefill:decode ratio at a fixed GPU budget, and autoscaling against static pools.

The Azure LLM conversation trace (Patel et al., Splitwise, ISCA'24; 19,366 requests over an hour)
replayed at 4x its rate (so the hour takes 15 minutes, and its 2x swing in arrival rate plays
out in minutes) on Llama-2-70B instances of 4 x H100. SLOs: TTFT 2 s, TBT (TPOT) 0.1 s.

1. **Ratio sweep**: every split of a budget of 8 instances (32 GPUs) into prefill and decode.
2. **Peak provisioning**: the cheapest static split (searched upwards from the budget) that meets
   the SLOs for >= 99% of requests, i.e. sized for the peak.
3. **Autoscaling**, starting from the best split at the budget: the simulator's built-in
   ``ReactiveScaler`` and the autoscaler's own sizing policy (``autoscaler.policy.decide``, through
   ``simulator.autoscaler_policy``), with new instances serving 30 s or 60 s after the decision
   (drained ones stop when empty).

GPU-hours integrate provisioned instances x 4 GPUs over the run (start-up time included).

    python benchmarks/sim_ratio_sweep.py [--budget 8] [--rate-scale 4] [--max-requests N]
"""

from __future__ import annotations

import argparse
import functools

from bench_env import AZURE_CONV
from sim_common import calibration, png, table, write

TTFT_SLO_S, TBT_SLO_S = 2.0, 0.1
PEAK_TARGET = 0.99


def main() -> None:
    from router.routing_config import RoutingConfig
    from simulator import ReactiveScaler, ScalingConfig, Simulation, cluster_config, read_azure
    from simulator.plots import plot_bars, plot_latency, plot_replicas

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=8, help="instances (x4 GPUs)")
    parser.add_argument("--rate-scale", type=float, default=4.0)
    parser.add_argument("--max-requests", type=int, default=None)
    args = parser.parse_args()

    cal = calibration()
    trace = read_azure(AZURE_CONV, rate_scale=args.rate_scale, max_requests=args.max_requests)
    routing = RoutingConfig(policy="transfer_aware", reject=False, ttft_slo_s=TTFT_SLO_S, tbt_slo_s=TBT_SLO_S)

    def run(prefill: int, decode: int, scaler=None, startup_s: float = 60.0):
        config = cluster_config(cal, trace.block_size, num_prefill=prefill, num_decode=decode, routing=routing)
        return Simulation(config, cal.cost, scaler=scaler, scaling=ScalingConfig(startup_delay_s=startup_s)).run(trace)

    run_static = functools.cache(run)  # (prefill, decode): a run is a function of its inputs, the plots reuse them

    sweep = []
    for p in range(1, args.budget):
        r = run_static(p, args.budget - p).summary()
        sweep.append({"config": f"{p}:{args.budget - p}", "prefill": p, "decode": args.budget - p, **r})
    best = max(sweep, key=lambda r: (r["slo_attainment"], r["goodput_rps"]))
    print(f"Azure conversation trace at {args.rate_scale}x ({len(trace)} requests); budget {args.budget} instances "
          f"({4 * args.budget} GPUs); SLO TTFT {TTFT_SLO_S} s, TPOT {TBT_SLO_S} s; {cal.cost.source}")
    columns = [("config", "P:D", ""), ("slo_attainment", "SLO att.", ".4f"), ("goodput_rps", "goodput r/s", ".3f"),
               ("ttft_p90_s", "TTFT p90", ".3f"), ("tpot_p90_s", "TPOT p90", ".4f"), ("gpu_hours", "GPU-h", ".2f"),
               ("wall_s", "wall s", ".1f")]
    print(table(sweep, columns))
    print(f"best split at the budget: {best['config']}")

    bp, bd = best["prefill"], best["decode"]
    peak = best if best["slo_attainment"] >= PEAK_TARGET else None
    candidates = sorted({(bp + a, bd + b) for a in range(0, 3) for b in range(0, 3)} - {(bp, bd)},
                        key=lambda c: (c[0] + c[1], c))
    static = []
    for p, d in candidates:
        if peak is not None and p + d >= peak["prefill"] + peak["decode"]:
            break
        r = run_static(p, d).summary()
        row = {"config": f"{p}:{d}", "prefill": p, "decode": d, **r}
        static.append(row)
        if r["slo_attainment"] >= PEAK_TARGET and (peak is None or r["slo_attainment"] > peak["slo_attainment"]):
            peak = row  # the smallest size that meets the target; at equal size the best attainment
    print("\nstatic pools above the budget (peak provisioning: the cheapest with SLO attainment >= "
          f"{PEAK_TARGET}):")
    print(table(static, columns))

    from autoscaler.config import SizingConfig
    from simulator.autoscaler_policy import AutoscalerPolicyScaler

    def reactive():
        return ReactiveScaler(interval_s=15.0, ttft_slo_s=TTFT_SLO_S, tbt_slo_s=TBT_SLO_S, prefill_target=0.8,
                              kv_target=0.7, down_cooldown_s=30.0, max_prefill=12, max_decode=12)

    def policy():
        sizing = SizingConfig(ttft_slo_s=TTFT_SLO_S, itl_slo_s=TBT_SLO_S, gpus_per_prefill=4, gpus_per_decode=4,
                              max_prefill=12, max_decode=12, scale_up_cooldown_s=30.0, scale_down_cooldown_s=60.0)
        return AutoscalerPolicyScaler(cal.cost, sizing, interval_s=15.0)

    scaled, timelines = [], {}
    for label, make, startup in (("reactive, 30 s start", reactive, 30.0), ("reactive, 60 s start", reactive, 60.0),
                                 ("autoscaler policy, 30 s start", policy, 30.0),
                                 ("autoscaler policy, 60 s start", policy, 60.0)):
        result = run(bp, bd, make(), startup)
        scaled.append({"config": label, **result.summary(), "scaling": result.extra["scaling"]})
        timelines[label] = result
    rows = [{**best, "config": f"best static {best['config']}"}]
    if peak is not None:
        rows.append({**peak, "config": f"peak static {peak['config']}"})
    rows += scaled
    print("\nautoscaling, from the best split at the budget:")
    print(table(rows, columns))

    plot_bars([r["config"] for r in sweep], {"SLO attainment": [r["slo_attainment"] for r in sweep]},
              png("sim_ratio_sweep"), ylabel="SLO attainment",
              title=f"Azure conversation trace at {args.rate_scale}x, {args.budget} instances: prefill:decode")
    plot_bars([r["config"] for r in rows], {"GPU-hours": [r["gpu_hours"] for r in rows]},
              png("sim_ratio_sweep", "gpu_hours"), ylabel="GPU-hours", title="static vs autoscaled")
    peak_label = f"peak static {peak['config']}" if peak else None
    shown = {k: v for k, v in timelines.items() if "30 s" in k}
    if peak is not None:
        shown[peak_label] = run_static(peak["prefill"], peak["decode"])
    shown[f"best static {best['config']}"] = run_static(bp, bd)
    plot_replicas(shown, png("sim_ratio_sweep", "replicas"), title="instances over time")
    plot_latency(shown, png("sim_ratio_sweep", "latency"), bin_s=30.0, title="TTFT and TPOT p90 per 30 s")
    write("sim_ratio_sweep", {
        "trace": AZURE_CONV.name, "requests": len(trace), "rate_scale": args.rate_scale,
        "budget_instances": args.budget, "gpus_per_instance": cal.gpus_per_instance, "cost_model": cal.cost.source,
        "slo": {"ttft_s": TTFT_SLO_S, "tbt_s": TBT_SLO_S}, "policy": "transfer_aware", "ratio_sweep": sweep,
        "best_split": best["config"], "static_above_budget": static,
        "peak_provisioning": peak["config"] if peak else None, "autoscaling": scaled})


if __name__ == "__main__":
    main()
