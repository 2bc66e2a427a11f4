"""How long one routing decision takes at cluster scale: p50 and p99 per policy.

The cluster: 32 prefill + 32 decode instances (``--prefill``, ``--decode``), a prefix index holding
100,000 (block, instance) entries fed through KV events (a system prompt on every instance,
conversations of 1k-4k tokens cached on 1-3 instances each), a link table where a quarter of the
(prefill, decode) pairs differ from the default, and the Splitwise-fitted cost model of
Llama-2-70B on 4 H100s. Requests continue cached conversations (80%) or start fresh ones.

Per request the benchmark does what the router server does: ``ClusterState.snapshot_for``
(prefix lookup + snapshot), ``route`` and ``on_routed``; after each decision one instance sends a
new load report (so snapshots are rebuilt as often as in a busy cluster) and old requests finish.
It times the prefix lookup alone, the policy alone, and the whole path.

    python benchmarks/router_policy.py [--requests 5000] [--prefill 32] [--decode 32] [--blocks 100000]
        [--cost-model benchmarks/results/cost_model_splitwise_llama2-70b_h100_tp4.json]

Prints a table and writes benchmarks/results/router_policy_<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import time
from pathlib import Path

import numpy as np
from bench_env import RESULTS, SPLITWISE, machine

from router.cluster_state import ClusterState, LoadReport
from router.cost_model import SPLITWISE_KV_BYTES_PER_TOKEN, CostModel, cost_model_from_splitwise
from router.links import LinkState, LinkTable
from router.policy import POLICIES, route, transfer_aware_reference
from router.prefix_index import KVEventBatch
from router.routing_config import RoutingConfig
from router.snapshot import SLO, RoutingRequest

BS = 16


def random_report(rng: random.Random, name: str, role: str) -> LoadReport:
    total = 20_000
    return LoadReport(name, role, num_running=rng.randrange(0, 64), num_waiting=rng.randrange(0, 4),
                      num_queued_prefill_tokens=rng.randrange(0, 16_000) if role == "prefill" else rng.randrange(0, 512),
                      num_free_blocks=rng.randrange(total // 10, total), num_total_blocks=total, block_size=BS,
                      recent_step_times_s=(rng.uniform(0.02, 0.06),))


def build(args, rng: random.Random, cost: CostModel) -> tuple[ClusterState, list[tuple[int, ...]]]:
    prefills = [f"p{i}" for i in range(args.prefill)]
    decodes = [f"d{i}" for i in range(args.decode)]
    links = LinkTable(cost.default_link)
    for p in prefills:
        for d in decodes:
            if rng.random() < 0.25:
                links = links.with_link(p, d, LinkState(rng.uniform(3.0, 12.0), rng.uniform(0.001, 0.004)))
    state = ClusterState(cost=cost, block_size=BS, kv_bytes_per_token=SPLITWISE_KV_BYTES_PER_TOKEN["llama2-70b"],
                         links=links, seed=1)
    for name in prefills:
        state.apply_load_report(random_report(rng, name, "prefill"), 0.0)
    for name in decodes:
        state.apply_load_report(random_report(rng, name, "decode"), 0.0)
    system = tuple(rng.getrandbits(63) for _ in range(8))
    for name in prefills + decodes:
        state.apply_kv_events(KVEventBatch(name, BS, True, system, (0,) + system[:-1]), 0.0)
    conversations = []
    while len(state.prefix_index) < args.blocks:
        conv = system + tuple(rng.getrandbits(63) for _ in range(rng.randrange(56, 248)))
        for name in rng.sample(prefills + decodes, rng.randrange(1, 4)):
            state.apply_kv_events(KVEventBatch(name, BS, False, conv, (0,) + conv[:-1]), 0.0)
        conversations.append(conv)
    return state, conversations


def percentiles(samples: list[float]) -> dict[str, float]:
    arr = np.array(samples) * 1e6
    return {"p50_us": round(float(np.percentile(arr, 50)), 1), "p99_us": round(float(np.percentile(arr, 99)), 1),
            "mean_us": round(float(arr.mean()), 1)}


def run_policy(args, policy: str, cost: CostModel) -> dict:
    rng = random.Random(0)
    state, conversations = build(args, rng, cost)
    config = RoutingConfig(policy=policy)
    names = [(f"p{i}", "prefill") for i in range(args.prefill)] + [(f"d{i}", "decode") for i in range(args.decode)]
    lookup, decide, total = [], [], []
    live: list[str] = []
    prompt_blocks = []
    for n in range(args.requests + args.warmup):
        if rng.random() < 0.8:
            base = rng.choice(conversations)
            hashes = base + tuple(rng.getrandbits(63) for _ in range(rng.randrange(1, 16)))
        else:
            hashes = tuple(rng.getrandbits(63) for _ in range(rng.randrange(64, 256)))
        req = RoutingRequest(f"r{n}", len(hashes) * BS + rng.randrange(BS), block_hashes=hashes,
                             predicted_output_tokens=rng.randrange(16, 1024), slo=SLO(2.0, 0.1))
        now = n * 0.01
        t0 = time.perf_counter()
        snapshot = state.snapshot_for(req, now)
        t1 = time.perf_counter()
        decision = route(req, snapshot, cost, config)
        t2 = time.perf_counter()
        state.on_routed(req, decision, now)
        t3 = time.perf_counter()
        start = time.perf_counter()
        state.prefix_index.longest_prefix(hashes, now)
        t4 = time.perf_counter()
        if n >= args.warmup:
            lookup.append(t4 - start)
            decide.append(t2 - t1)
            total.append((t1 - t0) + (t3 - t1))
            prompt_blocks.append(len(hashes))
        live.append(req.request_id)
        if len(live) > 256:
            state.on_finished(live.pop(0))
        name, role = names[n % len(names)]
        state.apply_load_report(random_report(rng, name, role), now)
    return {"prefix_lookup": percentiles(lookup), "policy": percentiles(decide), "end_to_end": percentiles(total),
            "index_entries": len(state.prefix_index), "prompt_blocks_mean": round(float(np.mean(prompt_blocks)), 1)}


def reference_speed(args, cost: CostModel) -> dict:
    """The scalar reference path of transfer_aware on the same cluster (why the numpy path exists)."""
    rng = random.Random(0)
    state, conversations = build(args, rng, cost)
    config = RoutingConfig()
    times = []
    for n in range(200):
        hashes = rng.choice(conversations)
        req = RoutingRequest(f"r{n}", len(hashes) * BS, block_hashes=hashes, predicted_output_tokens=256)
        snapshot = state.snapshot_for(req, 0.0)
        start = time.perf_counter()
        transfer_aware_reference(req, snapshot, cost, config)
        times.append(time.perf_counter() - start)
    return percentiles(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--prefill", type=int, default=32)
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--blocks", type=int, default=100_000)
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--cost-model", type=Path, help="CostModel JSON (default: fitted to the Splitwise table)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    if args.cost_model:
        cost = CostModel.load(args.cost_model)
    elif SPLITWISE.exists():
        cost = cost_model_from_splitwise(SPLITWISE)
    else:
        raise SystemExit(f"no cost model: pass --cost-model or provide {SPLITWISE}")
    results = {}
    print(f"{args.prefill} prefill + {args.decode} decode instances, {args.blocks} indexed blocks, "
          f"{args.requests} requests; microseconds")
    print(f"{'policy':20s} {'lookup p50':>10s} {'p99':>7s} {'policy p50':>10s} {'p99':>7s} {'total p50':>10s} {'p99':>7s}")
    for policy in args.policies.split(","):
        r = run_policy(args, policy, cost)
        results[policy] = r
        print(f"{policy:20s} {r['prefix_lookup']['p50_us']:10.0f} {r['prefix_lookup']['p99_us']:7.0f} "
              f"{r['policy']['p50_us']:10.0f} {r['policy']['p99_us']:7.0f} "
              f"{r['end_to_end']['p50_us']:10.0f} {r['end_to_end']['p99_us']:7.0f}")
    ref = reference_speed(args, cost)
    print(f"{'(transfer_aware scalar reference)':34s} policy p50 {ref['p50_us']:.0f} p99 {ref['p99_us']:.0f}")

    args.out.mkdir(parents=True, exist_ok=True)
    today = datetime.date.today().isoformat()
    record = {"benchmark": "router_policy", "date": today, "machine": machine(), "numpy": np.__version__,
              "num_prefill": args.prefill, "num_decode": args.decode, "indexed_blocks": args.blocks,
              "requests": args.requests, "cost_model": cost.source, "block_size": BS, "results": results,
              "transfer_aware_reference": ref}
    out = args.out / f"router_policy_{today}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
