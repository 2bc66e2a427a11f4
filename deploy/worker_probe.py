#!/usr/bin/env python3
"""Kubernetes probes and preStop drain of a pdserve worker, over its WorkerAdmin gRPC service.

Kubernetes' native gRPC probe speaks only ``grpc.health.v1``, which the worker does not serve, so
the worker image installs this script as ``pdserve-worker-probe`` and the chart runs it as an exec
probe inside the worker's container:

    pdserve-worker-probe live    exit 0 while the worker answers Health (serving or draining)
    pdserve-worker-probe ready   exit 0 only while it is serving (a draining worker is not ready)
    pdserve-worker-probe drain --timeout-s 60
                                 preStop: stop taking work and wait for in-flight requests
                                 (always exits 0: a failed preStop must not block the shutdown)

The worker's address comes from the same PDSERVE_WORKER_HOST / PDSERVE_WORKER_PORT variables the
worker reads (through common.config), or ``--address HOST:PORT``; with mutual TLS on, the probe
presents the pod's own certificate (PDSERVE_TLS_*), as any peer would.
"""

from __future__ import annotations

import argparse
import sys

import grpc

from common.config import WorkerConfig, build_config
from common.errors import PdserveError
from common.rpc import worker_pb2 as pb
from common.rpc import worker_pb2_grpc as pb_grpc
from common.tls import channel, load_tls

EXIT_OK, EXIT_FAIL = 0, 1


def worker_address(explicit: str | None) -> str:
    if explicit:
        return explicit
    config = build_config(WorkerConfig)
    host = f"[{config.host}]" if ":" in config.host else config.host
    return f"{host}:{config.port}"


def health(address: str, timeout_s: float) -> pb.HealthResponse:
    with channel(address, load_tls()) as ch:
        return pb_grpc.WorkerAdminStub(ch).Health(pb.HealthRequest(), timeout=timeout_s)


def drain(address: str, timeout_s: float) -> pb.DrainResponse:
    with channel(address, load_tls()) as ch:
        return pb_grpc.WorkerAdminStub(ch).Drain(pb.DrainRequest(timeout_s=timeout_s), timeout=timeout_s + 5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pdserve-worker-probe", description=__doc__.splitlines()[0])
    parser.add_argument("check", choices=("live", "ready", "drain"))
    parser.add_argument("--address", default=None, help="worker gRPC address (default: from PDSERVE_WORKER_*)")
    parser.add_argument("--timeout-s", type=float, default=5.0,
                        help="RPC deadline (live, ready) or drain timeout (drain)")
    args = parser.parse_args(argv)
    try:
        address = worker_address(args.address)
    except PdserveError as e:
        print(f"bad worker configuration: {e}", file=sys.stderr)
        return EXIT_FAIL
    try:
        if args.check == "drain":
            result = drain(address, args.timeout_s)
            print(f"drained={result.drained} remaining={result.num_remaining}")
            return EXIT_OK
        status = health(address, args.timeout_s).status
    except grpc.RpcError as e:
        print(f"{address}: {e.code().name} {e.details()}", file=sys.stderr)
        return EXIT_OK if args.check == "drain" else EXIT_FAIL
    name = pb.HealthResponse.Status.Name(status)
    ok = status == pb.HealthResponse.STATUS_SERVING or (
        args.check == "live" and status == pb.HealthResponse.STATUS_DRAINING)
    print(f"{address}: {name}")
    return EXIT_OK if ok else EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())
