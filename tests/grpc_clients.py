"""Small synchronous clients for the workers' gRPC services, used by integration tests."""

from __future__ import annotations

import time
import urllib.request
from dataclasses import dataclass, field

import grpc

from cli.processes import free_port  # noqa: F401 (re-exported for tests)
from common.rpc import worker_pb2 as pb
from common.rpc import worker_pb2_grpc as pb_grpc
from common.rpc_convert import sampling_to_proto
from common.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


@dataclass
class Generation:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = ""
    info: pb.PrefillInfo | None = None


def generate(address: str, request_id: str, prompt: list[int], sampling: SamplingParams = GREEDY, *,
             prefill: str | None = None, transport: int = 0, num_streams: int = 0,
             timeout: float = 120.0) -> Generation:
    with grpc.insecure_channel(address) as channel:
        request = pb.GenerateRequest(request_id=request_id, prompt_token_ids=prompt,
                                     sampling=sampling_to_proto(sampling))
        if prefill is not None:
            request.prefill.address = prefill
            request.prefill.transport = transport
            request.prefill.num_streams = num_streams
        out = Generation()
        for msg in pb_grpc.DecodeServiceStub(channel).Generate(request, timeout=timeout):
            out.token_ids += msg.token_ids
            out.text += msg.text
            if msg.HasField("prefill_info"):
                out.info = msg.prefill_info
            if msg.finished:
                out.finish_reason = msg.finish_reason
        return out


def load(address: str) -> pb.LoadReport:
    with grpc.insecure_channel(address) as channel:
        stream = pb_grpc.WorkerAdminStub(channel).StreamLoad(pb.LoadRequest(interval_ms=50), timeout=10)
        report = next(iter(stream))
        stream.cancel()
        return report


def health(address: str) -> pb.HealthResponse:
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.WorkerAdminStub(channel).Health(pb.HealthRequest(), timeout=10)


def wait_idle(address: str, timeout: float = 10.0) -> pb.LoadReport:
    """Wait until a worker has nothing running and every block is free; returns the last report."""
    deadline = time.monotonic() + timeout
    while True:
        report = load(address)
        idle = (report.num_running == 0 and report.num_waiting == 0 and report.num_transfers_in_flight == 0
                and report.num_free_blocks == report.num_total_blocks)
        if idle or time.monotonic() > deadline:
            return report
        time.sleep(0.05)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, value = line.rsplit(" ", 1)
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total
