"""A man in the middle for KV transfer tests: forwards PrefillService calls to a real prefill
worker and flips one byte of one KV chunk on the way, as a faulty network or NIC would.

    python tests/kv_corrupting_proxy.py UPSTREAM MODE     (MODE: payload | header)

Prints ``PDSERVE_READY role=proxy address=HOST:PORT`` once listening.
"""

from __future__ import annotations

import asyncio
import sys

import grpc

SERVICE = "pdserve.v1.PrefillService"


def _identity(b: bytes) -> bytes:
    return b


async def main(upstream: str, mode: str) -> None:
    channel = grpc.aio.insecure_channel(upstream, options=[("grpc.max_receive_message_length", 1 << 30)])
    corrupted = False

    def relay(method: str):
        call = channel.unary_stream(f"/{SERVICE}/{method}", request_serializer=_identity,
                                    response_deserializer=_identity)

        async def handler(request: bytes, context: grpc.aio.ServicerContext):
            nonlocal corrupted
            upstream_call = call(request)
            try:
                async for message in upstream_call:
                    if not corrupted and message[:1] == b"\x0a" and len(message) > 4096:
                        data = bytearray(message)
                        # header bytes sit right after the two length prefixes; payload is at the end
                        data[12 if mode == "header" else len(data) - 100] ^= 0x5A
                        message = bytes(data)
                        corrupted = True
                    yield message
            finally:
                # the client went away (it rejected the chunk): tell the prefill worker now, as a direct
                # connection would, not whenever this call happens to be garbage-collected
                upstream_call.cancel()

        return grpc.unary_stream_rpc_method_handler(handler, request_deserializer=_identity,
                                                     response_serializer=_identity)

    server = grpc.aio.server(options=[("grpc.max_send_message_length", 1 << 30)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        SERVICE, {"Prefill": relay("Prefill"), "StreamKV": relay("StreamKV")}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"PDSERVE_READY role=proxy address=127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
