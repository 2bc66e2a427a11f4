"""Output-length predictors: per-prefix learning, fallbacks, bounded memory; Kendall tau-b."""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path

import numpy as np
import pytest

from common.errors import ConfigError
from router.length_predictor import (
    MedianPredictor,
    PrefixHistoryPredictor,
    PromptLengthRegression,
    RequestFeatures,
    make_predictor,
)

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_length_predictor", ROOT / "benchmarks/length_predictor.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def conversation(conv: int, turn: int, blocks_per_turn: int = 3) -> RequestFeatures:
    """Turn ``turn`` of conversation ``conv``: a shared system block, then the conversation so far."""
    hashes = (1,) + tuple(conv * 1000 + i for i in range(blocks_per_turn * (turn + 1)))
    return RequestFeatures(num_prompt_tokens=16 * len(hashes) + 5, block_hashes=hashes)


def test_learns_output_lengths_per_prefix():
    p = PrefixHistoryPredictor()
    lengths = {1: 40, 2: 400, 3: 1500}
    for turn in range(4):
        for conv, n in lengths.items():
            p.observe(conversation(conv, turn), n)
    for conv, n in lengths.items():
        assert p.predict(conversation(conv, 4)) == n  # the next turn extends a known prefix
    assert p.num_prefix_hits == 3


def test_a_prefix_shared_by_everyone_is_not_evidence():
    p = PrefixHistoryPredictor(max_key_uses=8, bucket_min_samples=4)
    for conv in range(20):
        p.observe(RequestFeatures(100, (1, 2000 + conv)), 10 if conv % 2 else 1000)
    # a new conversation shares only the system block (used 20 times): fall back to the length bucket
    p.predict(RequestFeatures(100, (1, 9999)))
    assert p.num_prefix_hits == 0 and p.num_fallbacks == 1


def test_falls_back_to_session_then_prompt_length_bucket_then_global():
    p = PrefixHistoryPredictor(bucket_min_samples=3)
    assert p.predict(RequestFeatures(100)) == 256  # nothing seen yet
    for _ in range(3):
        p.observe(RequestFeatures(100), 30)
        p.observe(RequestFeatures(5000), 700)
    assert p.predict(RequestFeatures(105)) == 30  # same quarter-octave bucket
    assert p.predict(RequestFeatures(5100)) == 700
    assert p.predict(RequestFeatures(20)) in (30, 700)  # empty bucket: the global median
    p.observe(RequestFeatures(100, prefix_key="user-7"), 333)
    assert p.predict(RequestFeatures(5000, prefix_key="user-7")) == 333
    assert p.num_session_hits == 1


def test_predictions_respect_max_tokens():
    p = PrefixHistoryPredictor()
    p.observe(conversation(1, 0), 900)
    assert p.predict(RequestFeatures(64, conversation(1, 1).block_hashes, max_tokens=128)) == 128


def test_memory_stays_bounded():
    p = PrefixHistoryPredictor(max_keys=100)
    for conv in range(1000):
        p.observe(conversation(conv, 2), conv)
    assert len(p) == 100
    assert p.predict(conversation(999, 3)) == 999  # the most recent survive


def test_baselines():
    m = MedianPredictor()
    for n in (10, 20, 30, 40, 1000):
        m.observe(RequestFeatures(1), n)
    assert m.predict(RequestFeatures(12345)) == 30
    r = PromptLengthRegression()
    for prompt in (10, 100, 1000, 10_000):
        r.observe(RequestFeatures(prompt), prompt // 10)
    assert r.predict(RequestFeatures(100)) < r.predict(RequestFeatures(1000)) < r.predict(RequestFeatures(10_000))
    assert r.predict(RequestFeatures(1000)) == pytest.approx(100, rel=0.15)  # log1p is not quite log
    assert isinstance(make_predictor("median"), MedianPredictor)
    with pytest.raises(ConfigError):
        make_predictor("oracle")
    with pytest.raises(ConfigError) as err:
        PrefixHistoryPredictor(quantile=2.0)
    assert err.value.field == "quantile"


def _tau_b_by_pairs(x, y) -> float:
    conc = disc = tx = ty = 0
    for (x1, y1), (x2, y2) in itertools.combinations(zip(x, y), 2):
        sx, sy = np.sign(x1 - x2), np.sign(y1 - y2)
        if sx == 0 and sy == 0:
            continue
        if sx == 0:
            tx += 1
        elif sy == 0:
            ty += 1
        elif sx == sy:
            conc += 1
        else:
            disc += 1
    return (conc - disc) / np.sqrt((conc + disc + tx) * (conc + disc + ty))


def test_kendall_tau_b_matches_the_definition_with_ties():
    tau_b = _bench().kendall_tau_b
    rng = np.random.default_rng(0)
    for _ in range(5):
        x = rng.integers(0, 6, 300)
        y = x + rng.integers(0, 4, 300)
        assert tau_b(x, y) == pytest.approx(_tau_b_by_pairs(x, y))
    assert tau_b([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert np.isnan(tau_b([5, 5, 5], [1, 2, 3]))  # a constant prediction has no ranking


def test_long_prompts_still_find_shallow_shared_prefixes():
    p = PrefixHistoryPredictor(max_probe_blocks=4)
    a = tuple(range(100, 120))  # 20 blocks: keys stored at depths 0, 1, 3, 7, 15 and 19
    p.observe(RequestFeatures(20 * 16, a), 77)
    b = a[:16] + tuple(range(500, 520))  # shares 16 blocks, then 20 new ones: deeper than the probe window
    assert p.predict(RequestFeatures(36 * 16, b)) == 77
    assert p.num_prefix_hits == 1
