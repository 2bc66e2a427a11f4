"""Mutual TLS between router, decode and prefill workers, with real certificates and real processes.

Every component gets a certificate for the shared name ``pdserve-mesh`` (no IP in it, as in a
cluster where pods are dialled by IP) and the CA. The stack must serve the openai client end to
end with KV moving decode <- prefill over mTLS; a peer without a certificate, with one from another
CA, or one that checks the wrong name must be refused; and a renewed certificate must be served to
new connections without a restart.
"""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path

import grpc
import openai
import pytest
from cryptography import x509

from cli.processes import pdserve, worker
from common.rpc import worker_pb2 as pb
from common.rpc import worker_pb2_grpc as pb_grpc
from common.rpc_convert import sampling_to_proto
from common.sampling import SamplingParams
from common.tls import TlsConfig, channel
from tests.tls_certs import CertificateAuthority

MESH = "pdserve-mesh"
WORKER = ["--num-blocks", "1024", "--max-num-batched-tokens", "512"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority(root / "ca")
    rogue = CertificateAuthority(root / "rogue", name="someone else's CA")
    return {"ca": ca, "rogue": rogue.issue("rogue", [MESH]),
            **{name: ca.issue(name, [MESH]) for name in ("router", "prefill", "decode", "client")}}


@pytest.fixture(scope="module")
def stack(pki, tmp_path_factory):
    from engine.demo_model import write_demo_model

    model = write_demo_model(tmp_path_factory.mktemp("demo") / "model")
    logs = tmp_path_factory.mktemp("logs")
    prefill = worker("prefill", model, logs, *WORKER, *pki["prefill"].flags(MESH))
    decode = worker("decode", model, logs, *WORKER, "--prefill-peers", prefill.address, *pki["decode"].flags(MESH))
    router = pdserve(["router", "--model", str(model), "--port", "0", "--workers",
                      f"prefill={prefill.address};decode={decode.address}"], logs / "router.log",
                     env=pki["router"].env(MESH))  # the environment works as well as the flags
    yield {"router": router, "prefill": prefill, "decode": decode}
    for p in (router, decode, prefill):
        p.stop()


def tls_of(leaf, server_name: str = MESH) -> TlsConfig:
    return TlsConfig(cert=str(leaf.cert), key=str(leaf.key), ca=str(leaf.ca), server_name=server_name)


def remote_generate(decode: str, prefill: str, tls: TlsConfig | None, request_id: str) -> pb.PrefillInfo:
    start = 10 + sum(map(ord, request_id)) % 1000  # a prompt per request: nothing cached on the decode side
    request = pb.GenerateRequest(request_id=request_id, prompt_token_ids=list(range(start, start + 190)),
                                 sampling=sampling_to_proto(SamplingParams(max_tokens=4, temperature=0.0,
                                                                           ignore_eos=True)))
    request.prefill.address = prefill
    request.prefill.transport = pb.KV_TRANSPORT_GRPC
    request.prefill.num_streams = 1
    with channel(decode, tls or TlsConfig()) as ch:
        info = None
        for msg in pb_grpc.DecodeServiceStub(ch).Generate(request, timeout=60):
            if msg.HasField("prefill_info"):
                info = msg.prefill_info
        return info


def wait_ready(url: str, timeout: float = 30) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while httpx.get(f"{url}/ready", timeout=2).status_code != 200:
        assert time.monotonic() < deadline, "router never saw its workers over mTLS"
        time.sleep(0.2)


def test_the_stack_serves_over_mutual_tls(stack, pki):
    wait_ready(stack["router"].address)
    client = openai.OpenAI(base_url=f"{stack['router'].address}/v1", api_key="none", max_retries=0, timeout=60)
    out = client.completions.create(model="model", prompt="hello there", max_tokens=8, temperature=0)
    assert out.choices[0].finish_reason in ("length", "stop") and out.usage.completion_tokens > 0
    # decode pulls KV from prefill over mTLS (the prefill worker verifies the decode worker's certificate)
    info = remote_generate(stack["decode"].address, stack["prefill"].address, tls_of(pki["client"]), "remote-1")
    assert info.mode == pb.PrefillInfo.MODE_REMOTE, info


@pytest.mark.parametrize("who", ["plaintext", "rogue", "wrong_name"])
def test_peers_without_a_valid_certificate_are_refused(stack, pki, who):
    tls = {"plaintext": None, "rogue": tls_of(pki["rogue"]),
           "wrong_name": tls_of(pki["client"], server_name="not-the-mesh")}[who]
    with pytest.raises(grpc.RpcError) as e:
        remote_generate(stack["decode"].address, stack["prefill"].address, tls, f"refused-{who}")
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def served_serial(address: str, leaf) -> int:
    host, port = address.rsplit(":", 1)
    ctx = ssl.create_default_context(cafile=str(leaf.ca))
    ctx.load_cert_chain(str(leaf.cert), str(leaf.key))
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection((host, int(port)), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname=MESH) as tls_sock:
        return x509.load_der_x509_certificate(tls_sock.getpeercert(binary_form=True)).serial_number


def test_a_renewed_certificate_is_served_without_a_restart(stack, pki):
    address = stack["prefill"].address
    before = served_serial(address, pki["client"])
    assert before == x509.load_pem_x509_certificate(Path(pki["prefill"].cert).read_bytes()).serial_number
    renewed = pki["ca"].issue("prefill", [MESH])  # same files, new key and certificate (as cert-manager does)
    renewed_serial = x509.load_pem_x509_certificate(Path(renewed.cert).read_bytes()).serial_number
    deadline = time.monotonic() + 15
    while served_serial(address, pki["client"]) != renewed_serial:
        assert time.monotonic() < deadline, "the worker kept serving the old certificate"
        time.sleep(0.5)
    # and the renewed worker still takes KV pulls over mTLS
    info = remote_generate(stack["decode"].address, address, tls_of(pki["client"]), "after-renewal")
    assert info.mode == pb.PrefillInfo.MODE_REMOTE
