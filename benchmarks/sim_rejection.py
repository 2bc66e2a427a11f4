"""Early rejection against prediction-based rejection (Mooncake, FAST'25), at 2x replay, 8P+8D.

The Mooncake conversation trace replayed at twice its rate overloads 8 prefill + 8 decode
instances of Llama-2-70B on 4 x H100. Three ways to handle it, all with the router's
``transfer_aware`` placement:

- **none**: serve everything (``RoutingConfig.reject=False``);
- **early** (baseline, ``simulator.rejection``): refuse at arrival on the chosen pair's *current*
  load: TTFT predicted now, the decode step with the request added to today's batch, KV now;
- **predicted**: ``transfer_aware`` with ``reject=True``: refuse on the decode load predicted for
  when the prefill finishes (requests finishing meanwhile, the predicted growth of the rest, the
  request's own predicted lifetime in KV), and on predicted TTFT.

TTFT SLO 30 s; the TBT (TPOT) SLO is swept (0.1 s is loose for this model and trace, so the
decode side rarely binds; at 0.05-0.06 s the decode pool is the bottleneck, the regime Mooncake's
comparison is about). Reported: requests rejected, SLO attainment over all requests (rejected ones
count as misses), goodput (requests meeting both SLOs per second).

    python benchmarks/sim_rejection.py [--tbt-slos 0.1,0.08,0.06,0.05] [--rate-scale 2] [--max-requests N]
"""

from __future__ import annotations

import argparse
import collections

from bench_env import MOONCAKE
from sim_common import calibration, png, table, write

TTFT_SLO_S = 30.0
VARIANTS = (("none", False, "policy"), ("early", False, "early"), ("predicted", True, "policy"))


def main() -> None:
    from router.routing_config import RoutingConfig
    from simulator import Simulation, cluster_config, read_mooncake
    from simulator.plots import plot_bars, plot_latency

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tbt-slos", default="0.1,0.08,0.06,0.05")
    parser.add_argument("--rate-scale", type=float, default=2.0)
    parser.add_argument("--prefill", type=int, default=8)
    parser.add_argument("--decode", type=int, default=8)
    parser.add_argument("--max-requests", type=int, default=None)
    args = parser.parse_args()

    cal = calibration()
    trace = read_mooncake(MOONCAKE, rate_scale=args.rate_scale, max_requests=args.max_requests)
    rows, series = [], {}
    for tbt in (float(x) for x in args.tbt_slos.split(",")):
        for name, reject, rejection in VARIANTS:
            routing = RoutingConfig(policy="transfer_aware", reject=reject, ttft_slo_s=TTFT_SLO_S, tbt_slo_s=tbt)
            config = cluster_config(cal, trace.block_size, num_prefill=args.prefill, num_decode=args.decode,
                                    routing=routing, rejection=rejection)
            result = Simulation(config, cal.cost).run(trace)
            reasons = collections.Counter(r.reject_reason for r in result.records if r.rejected)
            rows.append({"tbt_slo_s": tbt, "rejection": name, **result.summary(), "reject_reasons": dict(reasons)})
            if tbt == 0.06:
                series[name] = result
    print(f"Mooncake conversation trace at {args.rate_scale}x ({len(trace)} requests), {args.prefill}P+{args.decode}D, "
          f"transfer_aware placement; TTFT SLO {TTFT_SLO_S} s; {cal.cost.source}")
    print(table(rows, [("tbt_slo_s", "TBT SLO", ".2f"), ("rejection", "rejection", ""), ("rejected", "rejected", "d"),
                       ("completed", "completed", "d"), ("slo_attainment", "SLO att.", ".4f"),
                       ("goodput_rps", "goodput r/s", ".3f"), ("ttft_mean_s", "TTFT mean", ".2f"),
                       ("ttft_p90_s", "TTFT p90", ".2f"), ("tpot_p90_s", "TPOT p90", ".4f"),
                       ("preemptions", "preempt", "d"), ("wall_s", "wall s", ".1f")]))
    for r in rows:
        if r["rejected"]:
            print(f"  TBT {r['tbt_slo_s']:.2f} {r['rejection']:9s} reasons: {r['reject_reasons']}")
    slos = sorted({r["tbt_slo_s"] for r in rows}, reverse=True)
    labels = [f"TBT {s:.2f}s" for s in slos]
    pick = {(r["tbt_slo_s"], r["rejection"]): r for r in rows}
    plot_bars(labels, {name: [pick[(s, name)]["goodput_rps"] for s in slos] for name, _, _ in VARIANTS},
              png("sim_rejection"), ylabel="goodput (requests/s meeting both SLOs)",
              title=f"Mooncake trace at {args.rate_scale}x, {args.prefill}P+{args.decode}D: rejection policies")
    plot_bars(labels, {name: [pick[(s, name)]["rejected"] for s in slos] for name, _, _ in VARIANTS if name != "none"},
              png("sim_rejection", "rejected"), ylabel="requests rejected", title="requests rejected")
    if series:
        plot_latency(series, png("sim_rejection", "latency_tbt0.06"), bin_s=60.0,
                     title="TBT SLO 0.06 s: TTFT and TPOT p90 per minute")
    write("sim_rejection", {
        "trace": MOONCAKE.name, "requests": len(trace), "rate_scale": args.rate_scale,
        "num_prefill": args.prefill, "num_decode": args.decode, "policy": "transfer_aware",
        "cost_model": cal.cost.source, "slo": {"ttft_s": TTFT_SLO_S, "tbt_s": slos}, "results": rows})


if __name__ == "__main__":
    main()
