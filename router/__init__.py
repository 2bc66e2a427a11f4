"""The router's control plane: what it knows about the cluster and how it picks workers.

Modules, one concept each (no torch anywhere in this package)::

    snapshot.py          InstanceState, RoutingRequest, ClusterSnapshot, RoutingDecision: the plain data
    links.py             LinkState / LinkTable: bandwidth and latency per (prefill, decode) pair, EWMA-learned
    cost_model.py        CostModel: prefill, decode-step and transfer time; fitted from profiles or datasheets
    nnls.py              the small non-negative least squares the fits use
    length_predictor.py  output-length predictors (per-prefix history, quantiles, baselines)
    prefix_index.py      which instance holds which prompt blocks (KV events + approximate fallback)
    routing_config.py    RoutingConfig: the policy name, SLOs, weights and thresholds
    estimates.py         the per-instance and per-pair predictions every policy shares
    policy.py            route(): the policy registry; transfer_aware lives in policy_transfer_aware.py,
                         the baselines in policy_baselines.py
    cluster_state.py     the stateful glue: load reports + in-flight ledger + prefix index -> snapshots

Per request, the server (or the simulator) does::

    snapshot = state.snapshot_for(request, now)            # ClusterState: no I/O
    decision = route(request, snapshot, cost, config)       # a pure function
    state.on_routed(request, decision, now)                 # in-flight accounting, prefix approximation

and feeds ``state`` with every LoadReport, KVEventBatch, first token and finish it sees.
"""
