"""Conversions between the protobuf messages of ``proto/`` and pdserve's own types (no torch)."""

from __future__ import annotations

from common.errors import InvalidRequestError
from common.rpc import worker_pb2 as pb
from common.sampling import SamplingParams


def sampling_to_proto(p: SamplingParams) -> pb.SamplingParams:
    msg = pb.SamplingParams(
        max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, stop=list(p.stop),
        stop_token_ids=list(p.stop_token_ids), ignore_eos=p.ignore_eos,
        include_stop_str_in_output=p.include_stop_str_in_output, skip_special_tokens=p.skip_special_tokens,
        presence_penalty=p.presence_penalty, frequency_penalty=p.frequency_penalty, logit_bias=dict(p.logit_bias))
    if p.seed is not None:
        msg.seed = p.seed
    if p.logprobs is not None:
        msg.logprobs = p.logprobs
    return msg


def sampling_from_proto(msg: pb.SamplingParams) -> SamplingParams:
    """Every field is taken as sent (proto3 zeros included), so a client must set them all.

    Floats travel as float32: rounding to 6 digits gives back the value the sender meant.
    """
    return SamplingParams(
        max_tokens=msg.max_tokens, temperature=round(msg.temperature, 6), top_p=round(msg.top_p, 6),
        top_k=msg.top_k, seed=msg.seed if msg.HasField("seed") else None, stop=list(msg.stop),
        stop_token_ids=list(msg.stop_token_ids), ignore_eos=msg.ignore_eos,
        logprobs=msg.logprobs if msg.HasField("logprobs") else None,
        include_stop_str_in_output=msg.include_stop_str_in_output, skip_special_tokens=msg.skip_special_tokens,
        presence_penalty=round(msg.presence_penalty, 6), frequency_penalty=round(msg.frequency_penalty, 6),
        logit_bias={token_id: round(bias, 6) for token_id, bias in msg.logit_bias.items()})


def prompt_from_proto(ids: list[int] | object) -> list[int]:
    prompt = list(ids)  # type: ignore[call-overload]
    if not prompt:
        raise InvalidRequestError("must not be empty", field="prompt")
    return prompt
