"""Trace readers: Mooncake JSONL and Azure CSV, time scaling, caps, block identities."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.errors import ConfigError
from simulator.trace import (
    AZURE_BLOCK_SIZE,
    MOONCAKE_BLOCK_SIZE,
    chain_ids,
    read_azure,
    read_mooncake,
    read_trace,
)


def write_mooncake(path: Path) -> Path:
    rows = [{"timestamp": 1000, "input_length": 1100, "output_length": 5, "hash_ids": [0, 1, 2]},
            {"timestamp": 0, "input_length": 600, "output_length": 7, "hash_ids": [0, 3]},
            {"timestamp": 3000, "input_length": 1024, "output_length": 9, "hash_ids": [0, 1]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_azure(path: Path) -> Path:
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                    "2023-11-16 18:15:50.5000000,396,109\n"
                    "2023-11-16 18:15:46.2500000,374,44\n"
                    "2023-11-16 18:15:54.2500000,879,55\n")
    return path


def test_mooncake_reader(tmp_path: Path) -> None:
    trace = read_mooncake(write_mooncake(tmp_path / "t.jsonl"))
    assert trace.block_size == MOONCAKE_BLOCK_SIZE
    assert [r.arrival_s for r in trace.requests] == [0.0, 1.0, 3.0]  # sorted, from the first arrival
    assert [r.num_prompt_tokens for r in trace.requests] == [600, 1100, 1024]
    # only full 512-token blocks: 600 -> 1 block, 1100 -> 2, 1024 -> 2
    assert [r.block_hashes for r in trace.requests] == [(0,), (0, 1), (0, 1)]
    assert trace.requests[1].num_output_tokens == 5


def test_time_scaling_and_caps(tmp_path: Path) -> None:
    path = write_mooncake(tmp_path / "t.jsonl")
    fast = read_mooncake(path, rate_scale=2.0)
    assert [r.arrival_s for r in fast.requests] == [0.0, 0.5, 1.5]
    capped = read_mooncake(path, max_requests=2, rate_scale=0.5)
    assert [r.arrival_s for r in capped.requests] == [0.0, 2.0]
    window = read_mooncake(path, start_s=0.5, duration_s=2.0)
    assert [r.num_prompt_tokens for r in window.requests] == [1100]
    with pytest.raises(ConfigError):
        read_mooncake(path, rate_scale=0.0)
    with pytest.raises(ConfigError):
        read_mooncake(path, max_requests=0)


def test_azure_reader(tmp_path: Path) -> None:
    trace = read_azure(write_azure(tmp_path / "t.csv"), rate_scale=2.0)
    assert trace.block_size == AZURE_BLOCK_SIZE
    assert [r.arrival_s for r in trace.requests] == pytest.approx([0.0, 2.125, 4.0])
    assert [(r.num_prompt_tokens, r.num_output_tokens) for r in trace.requests] == [(374, 44), (396, 109), (879, 55)]
    assert all(r.block_hashes == () for r in trace.requests)
    assert len(read_trace(tmp_path / "t.csv", max_requests=1)) == 1


def test_chained_ids_identify_prefixes() -> None:
    a, b = chain_ids([5, 6, 7]), chain_ids([5, 6, 8])
    assert a[:2] == b[:2] and a[2] != b[2]
    assert chain_ids([6])[0] != a[1]  # the same id after a different prefix is a different block


@pytest.mark.skipif(not Path("/work/shared/traces/mooncake/conversation_trace.jsonl").exists(),
                    reason="shared traces not present")
def test_real_traces_read() -> None:
    moon = read_mooncake("/work/shared/traces/mooncake/conversation_trace.jsonl")
    assert len(moon) == 12_031 and 3500 < moon.duration_s < 3600
    azure = read_azure("/work/shared/traces/azure_llm_2023/AzureLLMInferenceTrace_conv.csv", max_requests=100)
    assert len(azure) == 100
