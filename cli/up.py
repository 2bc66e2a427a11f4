"""``pdserve up``: the embedded default, router + prefill and decode workers as local processes.

Starts ``--prefill N`` prefill workers and ``--decode M`` decode workers (each
decode worker may pull KV from every prefill worker), then a router that knows
them all, on the demo model unless ``--model`` is given (created on first
use). Prints one line, with the URL, once the router's ``/ready`` answers 200.
Ctrl-C or SIGTERM stops every process, router first so in-flight requests
finish; if any process dies on its own, the others are stopped too.

With ``--autoscale`` the workers belong to the autoscaler's local actuator,
which starts, stops and flips them; the router follows a workers file the
actuator rewrites on every change, and a local Prometheus (the ``prometheus``
binary, or ``--prometheus-url``) scrapes router and workers for the
autoscaler to read. Autoscaler flags (``--gpu-budget``, ``--ttft-slo-s``,
``--interval-s``, ...) are accepted here as well.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from cli.processes import Proc, pdserve

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="checkpoint directory (default: the demo model, written on first use)")
    parser.add_argument("--host", default="127.0.0.1", help="address of the router's HTTP API")
    parser.add_argument("--port", type=int, default=8000, help="port of the router's HTTP API")
    parser.add_argument("--prefill", type=int, default=1, help="number of prefill workers")
    parser.add_argument("--decode", type=int, default=1, help="number of decode workers")
    parser.add_argument("--policy", default="transfer_aware", help="routing policy")
    parser.add_argument("--worker-arg", action="append", default=[],
                        help="extra flag for every worker, e.g. --worker-arg=--num-blocks=2048 (repeatable)")
    parser.add_argument("--router-arg", action="append", default=[], help="extra flag for the router (repeatable)")
    parser.add_argument("--log-dir", help="where process logs go (default: a new temporary directory)")
    parser.add_argument("--autoscale", action="store_true",
                        help="let the autoscaler size and flip the pools (needs Prometheus: see --prometheus-url)")
    from autoscaler.config import AutoscalerConfig, SizingConfig
    from common.config import add_config_args

    add_config_args(parser, AutoscalerConfig, skip=("actuator",))
    add_config_args(parser, SizingConfig)


def _wait_ready(url: str, procs: list[Proc], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.proc.poll() is not None:
                raise RuntimeError(f"{p.args[3]} exited early:\n{p.log_tail()}")
        try:
            with urllib.request.urlopen(f"{url}/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise TimeoutError(f"the router at {url} was not ready after {timeout}s")


def run(args: argparse.Namespace) -> int:
    if args.prefill < 0 or args.decode < 1:
        print("error: --decode must be at least 1 and --prefill at least 0", file=sys.stderr)
        return 2
    if not args.model:
        from engine.demo_model import ensure_demo_model

        args.model = str(ensure_demo_model())
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="pdserve-up-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    logger.info("logs in %s", log_dir)
    if args.autoscale:
        from cli.up_autoscale import run_autoscaled

        return run_autoscaled(args, log_dir)
    procs: list[Proc] = []
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        prefills = [pdserve(["prefill-worker", "--model", args.model, "--port", "0", *args.worker_arg],
                            log_dir / f"prefill-{i}.log") for i in range(args.prefill)]
        procs += prefills
        peers = ",".join(p.address for p in prefills)
        peer_args = ["--prefill-peers", peers] if peers else []
        decodes = [pdserve(["decode-worker", "--model", args.model, "--port", "0", *peer_args, *args.worker_arg],
                           log_dir / f"decode-{i}.log") for i in range(args.decode)]
        procs += decodes
        workers = f"prefill={peers};decode={','.join(d.address for d in decodes)}"
        router = pdserve(["router", "--model", args.model, "--host", args.host, "--port", str(args.port),
                          "--workers", workers, "--policy", args.policy, *args.router_arg], log_dir / "router.log")
        procs.insert(0, router)
        _wait_ready(router.address, procs)
        print(f"pdserve is ready: {router.address}/v1 (OpenAI API; model {Path(args.model).name}; "
              f"{args.prefill} prefill + {args.decode} decode workers)", flush=True)
        while not stop.wait(0.5):
            for p in procs:
                if p.proc.poll() is not None:
                    logger.error("%s exited with %s; stopping the rest\n%s", p.args[3], p.proc.returncode,
                                 p.log_tail())
                    return 1
        return 0
    except (RuntimeError, TimeoutError) as e:
        logger.error("%s", e)
        return 1
    finally:
        for p in procs:  # router first: it drains before the workers go
            p.stop(timeout=30)
