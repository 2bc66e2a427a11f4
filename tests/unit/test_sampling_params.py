"""SamplingParams: validation that names the field, and the worker wire format (both directions)."""

from __future__ import annotations

import pytest

from common.errors import InvalidRequestError
from common.rpc_convert import sampling_from_proto, sampling_to_proto
from common.sampling import SamplingParams


@pytest.mark.parametrize("kwargs, field", [
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -2.01}, "frequency_penalty"),
    ({"frequency_penalty": "1"}, "frequency_penalty"),
    ({"presence_penalty": float("inf")}, "presence_penalty"),
    ({"logit_bias": {"a": 1}}, "logit_bias"),
    ({"logit_bias": {"-1": 1}}, "logit_bias"),
    ({"logit_bias": {"1.5": 1}}, "logit_bias"),
    ({"logit_bias": {"5_0": 1}}, "logit_bias"),  # int() would take these three
    ({"logit_bias": {" 7": 1}}, "logit_bias"),
    ({"logit_bias": {"\u0663": 1}}, "logit_bias"),
    ({"logit_bias": {-2: 1}}, "logit_bias"),
    ({"logit_bias": {"1": 100.5}}, "logit_bias"),
    ({"logit_bias": {"1": "x"}}, "logit_bias"),
    ({"logit_bias": {"1": True}}, "logit_bias"),
    ({"logit_bias": {1: 1, "1": 2}}, "logit_bias"),
    ({"logit_bias": [1, 2]}, "logit_bias"),
    ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
])
def test_bad_penalties_and_logit_bias_name_the_field(kwargs, field) -> None:
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(**kwargs)
    assert err.value.field == field


def test_logit_bias_is_normalised_to_sorted_pairs() -> None:
    p = SamplingParams(presence_penalty=1, logit_bias={"7": 1, 3: -2.5, "0": 100})
    assert p.presence_penalty == 1.0 and isinstance(p.presence_penalty, float)
    assert p.logit_bias == ((0, 100.0), (3, -2.5), (7, 1.0))
    assert p == SamplingParams(presence_penalty=1.0, logit_bias=((7, 1), (0, 100), (3, -2.5)))
    assert hash(p) == hash(SamplingParams(presence_penalty=1.0, logit_bias={0: 100, 3: -2.5, 7: 1}))
    assert p.has_penalties and not SamplingParams(logit_bias={1: 1}).has_penalties
    assert SamplingParams(logit_bias={str(i): 1 for i in range(300)}).logit_bias[-1] == (299, 1.0)
    assert SamplingParams(**p.to_dict()) == p


@pytest.mark.parametrize("params", [
    SamplingParams(),
    SamplingParams(presence_penalty=0.3, frequency_penalty=-1.7, logit_bias={"5": 0.1, 7: -100, 50000: 100}),
    SamplingParams(max_tokens=9, temperature=0.7, top_p=0.9, top_k=5, seed=3, stop=["x"], stop_token_ids=[4],
                   logprobs=2, frequency_penalty=2.0, logit_bias={1: -0.25}),
])
def test_worker_wire_round_trip(params) -> None:
    msg = sampling_to_proto(params)
    assert sampling_from_proto(type(msg).FromString(msg.SerializeToString())) == params
