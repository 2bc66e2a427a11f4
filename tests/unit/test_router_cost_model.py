"""CostModel: formulas, fits (synthetic and the Splitwise table), datasheet roofline, JSON, link learning."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from common.errors import ConfigError
from router.cost_model import (
    CostModel,
    DecodeSample,
    PrefillSample,
    cost_model_from_datasheet,
    cost_model_from_splitwise,
    fit_cost_model,
    fit_r2,
    kv_bytes_per_token,
    load_splitwise_samples,
)
from router.links import LinkState, LinkTable, TransferSample, fit_link, observe_transfer
from router.nnls import nnls

SPLITWISE = Path("/work/shared/traces/splitwise_sim_perf_model/perf_model.csv")
TRUE = CostModel(prefill_base_s=0.012, prefill_per_token_s=1.1e-4, prefill_attn_s=2.5e-9,
                 decode_base_s=0.028, decode_per_request_s=2.8e-4, decode_per_context_token_s=9e-8,
                 link_bandwidth_gbps=20.0, link_latency_s=0.002)


def synthetic_samples(noise: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = []
    for new in (64, 256, 1024, 2048, 4096, 8192, 16384):
        for cached in (0, 1024, 8192, 32768):
            t = TRUE.prefill_time(new, cached)
            out.append(PrefillSample(new, cached, t * (1 + noise * rng.standard_normal())))
    for batch in (1, 4, 16, 64, 128):
        for ctx_per in (256, 2048, 8192):
            t = TRUE.decode_step_time(batch, batch * ctx_per)
            out.append(DecodeSample(batch, batch * ctx_per, t * (1 + noise * rng.standard_normal())))
    for mib in (1, 8, 64, 512, 2048):
        t = TRUE.transfer_time(mib << 20)
        out.append(TransferSample(mib << 20, t * (1 + noise * rng.standard_normal())))
    return out


def test_fit_recovers_known_coefficients_exactly_without_noise():
    fitted = fit_cost_model(synthetic_samples(0.0))
    for name in ("prefill_base_s", "prefill_per_token_s", "prefill_attn_s", "decode_base_s",
                 "decode_per_request_s", "decode_per_context_token_s", "link_bandwidth_gbps", "link_latency_s"):
        assert getattr(fitted, name) == pytest.approx(getattr(TRUE, name), rel=1e-6), name
    assert fitted.prefill_floor_s == 0.0  # a linear truth fits no floor


def test_fit_recovers_known_coefficients_from_noisy_samples():
    # 2% noise proportional to the time, as in profiling: the relative fit is the matching estimator
    samples = synthetic_samples(0.02, seed=1)
    fitted = fit_cost_model(samples, relative=True)
    assert fitted.prefill_base_s == pytest.approx(TRUE.prefill_base_s, rel=0.05)
    assert fitted.prefill_per_token_s == pytest.approx(TRUE.prefill_per_token_s, rel=0.05)
    assert fitted.prefill_attn_s == pytest.approx(TRUE.prefill_attn_s, rel=0.05)
    assert fitted.decode_base_s == pytest.approx(TRUE.decode_base_s, rel=0.05)
    assert fitted.decode_per_context_token_s == pytest.approx(TRUE.decode_per_context_token_s, rel=0.1)
    assert fitted.link_bandwidth_gbps == pytest.approx(TRUE.link_bandwidth_gbps, rel=0.05)
    r2 = fit_r2(fitted, samples)
    assert min(r2.values()) > 0.99, r2
    absolute = fit_cost_model(samples)  # the default: absolute squared error, still close
    assert absolute.prefill_per_token_s == pytest.approx(TRUE.prefill_per_token_s, rel=0.1)
    assert absolute.prefill_attn_s == pytest.approx(TRUE.prefill_attn_s, rel=0.1)
    assert min(fit_r2(absolute, samples).values()) > 0.99


def test_fit_finds_a_floor_when_short_prompts_cost_a_fixed_pass():
    samples = [PrefillSample(n, 0, max(0.05, 1e-4 * n)) for n in (64, 128, 256, 512, 1024, 2048, 4096, 8192)]
    fitted = fit_cost_model(samples)
    assert fitted.prefill_floor_s == pytest.approx(0.05)
    assert fitted.prefill_per_token_s == pytest.approx(1e-4, rel=1e-3)
    assert fitted.prefill_time(100) == pytest.approx(0.05)
    assert fit_r2(fitted, samples)["prefill"] > 0.999


def test_nnls_keeps_coefficients_non_negative():
    x = np.arange(1.0, 11.0)
    a = np.stack([np.ones_like(x), x], axis=1)
    y = 2.0 * x - 3.0  # the unconstrained intercept is -3
    coef = nnls(a, y)
    assert (coef >= 0).all() and coef[0] == 0.0
    assert coef[1] == pytest.approx(np.dot(x, y) / np.dot(x, x))


@pytest.mark.skipif(not SPLITWISE.exists(), reason="Splitwise table not available")
@pytest.mark.parametrize("model,hardware,tp,min_prefill,min_decode", [
    ("llama2-70b", "h100-80gb", 4, 0.995, 0.95),
    ("llama2-70b", "a100-80gb", 4, 0.99, 0.93),
    ("llama2-70b", "h100-80gb", 8, 0.99, 0.95),
    ("bloom-176b", "h100-80gb", 8, 0.99, 0.95),
])
def test_fit_on_the_splitwise_table(model, hardware, tp, min_prefill, min_decode):
    samples = load_splitwise_samples(SPLITWISE, model=model, hardware=hardware, tensor_parallel=tp)
    fitted = cost_model_from_splitwise(SPLITWISE, model=model, hardware=hardware, tensor_parallel=tp)
    r2 = fit_r2(fitted, samples)
    print(f"splitwise {model}/{hardware}/tp{tp}: R2 prefill {r2['prefill']:.4f} decode {r2['decode']:.4f}")
    assert r2["prefill"] > min_prefill and r2["decode"] > min_decode
    assert fitted.source == f"splitwise:{model}/{hardware}/tp{tp}"
    # sanity against the table: llama2-70b on 4 H100s prefills 8k tokens in ~0.95 s, decodes at ~30 ms
    if (model, hardware, tp) == ("llama2-70b", "h100-80gb", 4):
        assert fitted.prefill_time(8192) == pytest.approx(0.94, rel=0.1)
        assert fitted.decode_step_time(1, 640) == pytest.approx(0.0296, rel=0.05)


@pytest.mark.skipif(not SPLITWISE.exists(), reason="Splitwise table not available")
def test_unknown_splitwise_configuration_is_a_config_error():
    with pytest.raises(ConfigError):
        load_splitwise_samples(SPLITWISE, model="llama2-70b", hardware="tpu", tensor_parallel=4)


def test_datasheet_roofline():
    kvb = kv_bytes_per_token(80, 8, 128)
    assert kvb == 327_680
    m = cost_model_from_datasheet(peak_flops=989e12, hbm_bandwidth_gbps=3350, num_params=70e9, num_layers=80,
                                  hidden_size=8192, kv_bytes_per_token=kvb, num_gpus=4, hbm_capacity_gb=80)
    weights_s = 140e9 / (4 * 3350e9 * 0.7)
    assert m.decode_step_time(1, 0) == pytest.approx(weights_s + 2 * 70e9 / (4 * 989e12 * 0.5))
    assert m.prefill_time(1) == pytest.approx(weights_s)  # one token: a read of the weights
    assert m.prefill_time(8192) == pytest.approx(8192 * 140e9 / (4 * 989e12 * 0.5) + 8192**2 * 2 * 80 * 8192 / (
        4 * 989e12 * 0.5))
    # decode reads every context token's KV once per step
    assert m.decode_step_time(8, 80_000) - m.decode_step_time(8, 0) == pytest.approx(80_000 * kvb / (4 * 3350e9 * 0.7))
    assert m.kv_capacity_tokens == int((4 * 80e9 * 0.9 - 140e9) // kvb)
    with pytest.raises(ConfigError):
        cost_model_from_datasheet(peak_flops=989e12, hbm_bandwidth_gbps=3350, num_params=70e9, num_layers=80,
                                  hidden_size=8192, kv_bytes_per_token=kvb, num_gpus=1, hbm_capacity_gb=80)


def test_queue_time_and_marginal_time_agree_with_prefill_time():
    m = CostModel(prefill_base_s=0.01, prefill_per_token_s=1e-4, prefill_attn_s=1e-9, prefill_floor_s=0.03)
    assert m.queue_time(1000, 1) == pytest.approx(m.prefill_time(1000))
    assert m.queue_time(1000, 1, chunk_tokens=2048) == pytest.approx(m.prefill_time(1000))
    assert m.queue_time(4 * 500, 4) == pytest.approx(4 * m.prefill_time(500))
    assert m.queue_time(4 * 500, 4, chunk_tokens=2048) < 4 * m.prefill_time(500)  # one shared step
    assert m.prefill_time(5) == 0.03 and m.prefill_time(0) == 0.0
    assert m.prefill_marginal_time(1000, 500) == pytest.approx(m.prefill_time(1000, 500) - 0.01)


def test_json_round_trip(tmp_path):
    m = fit_cost_model(synthetic_samples(0.01), source="unit test")
    path = tmp_path / "cost.json"
    m.save(path)
    assert CostModel.load(path) == m
    assert CostModel.from_json(m.to_json()) == m
    with pytest.raises(ConfigError) as err:
        CostModel.from_dict({**m.to_dict(), "gpu_vendor": "x"})
    assert err.value.field == "gpu_vendor"
    with pytest.raises(ConfigError) as err:
        CostModel(decode_base_s=-1.0)
    assert err.value.field == "decode_base_s"


def test_link_learning_is_an_ewma_that_returns_a_new_table():
    table = LinkTable(LinkState(10.0, 0.001))
    sample = TransferSample(1_000_000_000, 0.001 + 0.5)  # 2 GB/s observed
    learned = observe_transfer(table, "p0", "d0", sample, alpha=0.5)
    assert table.get("p0", "d0") == LinkState(10.0, 0.001)  # the old table is untouched
    # seconds per byte averaged: (0.1 + 0.5) / 2 ns per byte -> 3.33 GB/s
    assert learned.get("p0", "d0").bandwidth_gbps == pytest.approx(1 / 0.3)
    assert learned.get("p0", "d1") == table.default
    for _ in range(30):
        learned = observe_transfer(learned, "p0", "d0", sample)
    assert learned.get("p0", "d0").bandwidth_gbps == pytest.approx(2.0, rel=0.01)
    assert observe_transfer(learned, "p0", "d0", TransferSample(1000, 0.5)) is learned  # too small to tell
    assert LinkTable.from_dict(learned.to_dict()) == learned
    bw, lat = learned.matrices(("p0", "p1"), ("d0",))
    assert bw[0, 0] == pytest.approx(2.0, rel=0.01) and bw[1, 0] == 10.0 and lat.shape == (2, 1)


def test_fit_link_recovers_latency_and_bandwidth():
    link = LinkState(12.5, 0.003)
    samples = [TransferSample(n, link.transfer_time(n)) for n in (1 << 20, 1 << 24, 1 << 28, 1 << 30)]
    fitted = fit_link(samples)
    assert fitted.bandwidth_gbps == pytest.approx(12.5) and fitted.latency_s == pytest.approx(0.003)
