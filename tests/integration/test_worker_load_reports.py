"""A worker busy with one long engine step keeps sending load reports: busy is not dead to the router."""

from __future__ import annotations

import threading
import time

import grpc

from cli.processes import worker
from common.rpc import worker_pb2 as pb
from common.rpc import worker_pb2_grpc as pb_grpc
from common.sampling import SamplingParams
from engine.demo_model import write_demo_model
from tests.grpc_clients import generate, wait_idle


def test_reports_keep_coming_during_a_long_step(tmp_path):
    # wide enough that one 4,000-token prefill step takes seconds on a CPU
    model = write_demo_model(tmp_path / "model", hidden_size=512, intermediate_size=1536, num_layers=4,
                             num_heads=8, num_kv_heads=4)
    decode = worker("decode", model, tmp_path, "--num-blocks", "512", "--max-num-batched-tokens", "4096")
    try:
        arrivals: list[tuple[float, pb.LoadReport]] = []
        stop = threading.Event()

        def listen() -> None:
            with grpc.insecure_channel(decode.address) as channel:
                stream = pb_grpc.WorkerAdminStub(channel).StreamLoad(pb.LoadRequest(interval_ms=100), timeout=120)
                for report in stream:
                    arrivals.append((time.monotonic(), report))
                    if stop.is_set():
                        stream.cancel()
                        return

        listener = threading.Thread(target=listen, daemon=True)
        listener.start()
        time.sleep(1.0)
        started = time.monotonic()
        out = generate(decode.address, "long-step", [10 + i % 2000 for i in range(4000)], SamplingParams(max_tokens=1,
                                                                                          temperature=0.0))
        took = time.monotonic() - started
        time.sleep(0.5)
        stop.set()
        listener.join(10)
        assert out.finish_reason == "length"
        steps = max(max(r.recent_step_times_s, default=0.0) for _, r in arrivals)
        assert steps > 1.0, f"the prefill step took only {steps:.2f}s; the test needs a longer one"
        during = [t for t, _ in arrivals if started <= t <= started + took]
        gaps = [b - a for a, b in zip([started, *during], [*during, started + took])]
        assert max(gaps) < 0.75, f"reports stopped for {max(gaps):.2f}s during a {steps:.2f}s step"
        wait_idle(decode.address)
    finally:
        decode.stop()
