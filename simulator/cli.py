"""``pdserve simulate``: replay a trace through a simulated cluster and print what it measured.

    pdserve simulate --trace FILE --policy NAME --prefill N --decode M [--autoscale reactive|policy]
        [--rate-scale K] [--max-requests N] [--json] [--plot-dir DIR]

Wiring (cli/main.py)::

    from simulator import cli as simulate
    p = sub.add_parser("simulate", help="replay a trace through a simulated cluster")
    simulate.add_arguments(p)
    p.set_defaults(handler=simulate.run)

The engine timing comes from ``--cost-model`` (the JSON ``pdserve profile`` writes), else from the
Splitwise table (``--splitwise``, default the shared ``perf_model.csv``), or from ``--datasheet``
rates. With ``--json`` the output is one JSON object (see ``simulator.metrics`` for definitions).
Nothing here imports torch; heavy imports happen in :func:`run`.
"""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("workload")
    g.add_argument("--trace", required=True, help="a Mooncake JSONL or Azure CSV trace")
    g.add_argument("--trace-format", default="auto", choices=("auto", "mooncake", "azure"))
    g.add_argument("--rate-scale", type=float, default=1.0, help="replay at K x the recorded rate")
    g.add_argument("--max-requests", type=int, default=None, help="replay only the first N requests")
    g.add_argument("--start-s", type=float, default=0.0, help="skip the trace's first seconds")
    g.add_argument("--duration-s", type=float, default=None, help="replay only this many seconds of the trace")

    g = parser.add_argument_group("cluster")
    g.add_argument("--policy", default="transfer_aware", help="routing policy (router.policy.POLICIES)")
    g.add_argument("--prefill", type=int, default=8, help="prefill instances")
    g.add_argument("--decode", type=int, default=8, help="decode instances")
    g.add_argument("--reject", default="predicted", choices=("none", "predicted", "early"),
                   help="none; predicted: the policy's own (transfer_aware's prediction-based) early rejection; "
                        "early: the current-load early-rejection baseline")
    g.add_argument("--ttft-slo", type=float, default=2.0, help="TTFT SLO, seconds")
    g.add_argument("--tbt-slo", type=float, default=0.1, help="TBT (time per output token) SLO, seconds")
    g.add_argument("--batch-policy", default="static", help="engine batch policy (common.batch_policy.POLICIES)")
    g.add_argument("--max-num-requests", type=int, default=128)
    g.add_argument("--max-num-batched-tokens", type=int, default=2048)
    g.add_argument("--length-predictor", default="prefix_history",
                   help="prefix_history, median, prompt_regression, or oracle (true lengths)")
    g.add_argument("--block-size", type=int, default=None, help="KV block size (default: the trace's)")
    g.add_argument("--report-period", type=float, default=0.1, help="load report period, seconds")
    g.add_argument("--seed", type=int, default=0)

    g = parser.add_argument_group("calibration")
    g.add_argument("--cost-model", help="CostModel JSON from `pdserve profile`")
    g.add_argument("--splitwise", help="Splitwise perf_model.csv (default: the shared copy)")
    g.add_argument("--datasheet", metavar="HARDWARE", help="roofline from a GPU's datasheet (h100-80gb, a100-80gb, ...)")
    g.add_argument("--model", default="llama2-70b")
    g.add_argument("--hardware", default="h100-80gb", help="for --splitwise")
    g.add_argument("--tensor-parallel", type=int, default=4, help="GPUs per instance")
    g.add_argument("--kv-bytes-per-token", type=int, default=None, help="with --cost-model")
    g.add_argument("--kv-capacity-tokens", type=int, default=None, help="override the KV capacity per instance")
    g.add_argument("--link-bandwidth-gbps", type=float, default=None, help="KV transfer link bandwidth, GB/s")

    g = parser.add_argument_group("autoscaling")
    g.add_argument("--autoscale", choices=("reactive", "policy"), default=None,
                   help="scale the pools: reactive (the simulator's built-in) or policy (autoscaler.policy.decide)")
    g.add_argument("--scale-interval", type=float, default=30.0)
    g.add_argument("--startup-delay", type=float, default=60.0, help="seconds until a new instance serves")
    g.add_argument("--min-prefill", type=int, default=1)
    g.add_argument("--max-prefill", type=int, default=64)
    g.add_argument("--min-decode", type=int, default=1)
    g.add_argument("--max-decode", type=int, default=64)

    g = parser.add_argument_group("output")
    g.add_argument("--json", action="store_true", help="print one JSON object")
    g.add_argument("--plot-dir", help="write latency.png and replicas.png here")


def _calibration(args: argparse.Namespace):
    import dataclasses

    from common.errors import ConfigError
    from router.cost_model import SPLITWISE_KV_BYTES_PER_TOKEN
    from simulator import calibration as cal

    if args.cost_model:
        kv = args.kv_bytes_per_token or SPLITWISE_KV_BYTES_PER_TOKEN.get(args.model)
        if kv is None:
            raise ConfigError("pass --kv-bytes-per-token with --cost-model", field="kv_bytes_per_token")
        result = cal.from_profile(args.cost_model, kv_bytes=kv, kv_capacity_tokens=args.kv_capacity_tokens or 0,
                                  gpus_per_instance=args.tensor_parallel)
    elif args.datasheet:
        result = cal.from_datasheet(hardware=args.datasheet, model=args.model, num_gpus=args.tensor_parallel)
    else:
        result = cal.from_splitwise(args.splitwise or None, model=args.model,
                                    hardware=args.hardware, tensor_parallel=args.tensor_parallel)
    updates = {}
    if args.kv_capacity_tokens:
        updates["kv_capacity_tokens"] = args.kv_capacity_tokens
    if args.link_bandwidth_gbps:
        updates["link_bandwidth_gbps"] = args.link_bandwidth_gbps
    if updates:
        result = dataclasses.replace(result, cost=dataclasses.replace(result.cost, **updates))
    return result


def run(args: argparse.Namespace) -> int:
    from router.routing_config import RoutingConfig
    from simulator.calibration import cluster_config
    from simulator.cluster import Simulation
    from simulator.scaling import ReactiveScaler, ScalingConfig
    from simulator.trace import read_trace

    trace = read_trace(args.trace, fmt=args.trace_format, rate_scale=args.rate_scale,
                       max_requests=args.max_requests, start_s=args.start_s, duration_s=args.duration_s)
    if args.block_size and args.block_size != trace.block_size:
        if trace.requests and any(r.block_hashes for r in trace.requests):
            print("error: this trace's block hashes are at block size "
                  f"{trace.block_size}; --block-size cannot change it", file=sys.stderr)
            return 2
        trace = type(trace)(trace.requests, args.block_size, trace.name)
    calibration = _calibration(args)
    routing = RoutingConfig(policy=args.policy, reject=args.reject == "predicted", ttft_slo_s=args.ttft_slo,
                            tbt_slo_s=args.tbt_slo, chunk_tokens=args.max_num_batched_tokens)
    config = cluster_config(calibration, trace.block_size, num_prefill=args.prefill, num_decode=args.decode,
                            routing=routing, batch_policy=args.batch_policy, max_num_requests=args.max_num_requests,
                            max_num_batched_tokens=args.max_num_batched_tokens,
                            rejection="early" if args.reject == "early" else "policy",
                            report_period_s=args.report_period, length_predictor=args.length_predictor,
                            seed=args.seed)
    scaler = None
    if args.autoscale == "reactive":
        scaler = ReactiveScaler(interval_s=args.scale_interval, ttft_slo_s=args.ttft_slo, tbt_slo_s=args.tbt_slo,
                                min_prefill=args.min_prefill, max_prefill=args.max_prefill,
                                min_decode=args.min_decode, max_decode=args.max_decode)
    elif args.autoscale == "policy":
        from autoscaler.config import SizingConfig
        from simulator.autoscaler_policy import AutoscalerPolicyScaler

        sizing = SizingConfig(ttft_slo_s=args.ttft_slo, itl_slo_s=args.tbt_slo,
                              prefill_chunk_tokens=args.max_num_batched_tokens,
                              decode_max_batch_size=args.max_num_requests,
                              gpus_per_prefill=calibration.gpus_per_instance,
                              gpus_per_decode=calibration.gpus_per_instance, min_prefill=args.min_prefill,
                              max_prefill=args.max_prefill, min_decode=args.min_decode, max_decode=args.max_decode)
        scaler = AutoscalerPolicyScaler(calibration.cost, sizing, interval_s=args.scale_interval)
    result = Simulation(config, calibration.cost, scaler=scaler,
                        scaling=ScalingConfig(startup_delay_s=args.startup_delay)).run(trace)
    summary = {"trace": trace.name, "policy": args.policy, "prefill": args.prefill, "decode": args.decode,
               "rate_scale": args.rate_scale, "reject": args.reject, "autoscale": args.autoscale or "none",
               "cost_model": calibration.source, **result.summary()}
    if args.plot_dir:
        from pathlib import Path

        from simulator.plots import plot_latency, plot_replicas

        out = Path(args.plot_dir)
        out.mkdir(parents=True, exist_ok=True)
        label = f"{args.policy} {args.prefill}P{args.decode}D"
        summary["plots"] = [str(plot_latency({label: result}, out / "latency.png")),
                            str(plot_replicas({label: result}, out / "replicas.png"))]
    if args.json:
        print(json.dumps(summary))
    else:
        width = max(len(k) for k in summary)
        for key, value in summary.items():
            print(f"{key:<{width}}  {value}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m simulator.cli`` until ``pdserve simulate`` is wired."""
    parser = argparse.ArgumentParser(prog="pdserve simulate", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
