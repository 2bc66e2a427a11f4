"""KV-cache transfer between a prefill worker (producer) and a decode worker (consumer).

The control channel is always the prefill service's ``Prefill`` stream (protobuf);
transports differ in how the block payloads travel: inside that stream (``grpc``),
through a shared-memory segment on the same host (``local``), or over NCCL
(``nccl``, GPU to GPU). See ``transport`` for the interfaces.
"""
