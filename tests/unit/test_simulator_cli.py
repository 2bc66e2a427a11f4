"""``pdserve simulate`` (simulator.cli): arguments, the JSON it prints, plots on request."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from simulator import cli
from tests.unit.test_simulator_trace import write_azure

REQUIRED = ("completed", "rejected", "ttft_mean_s", "ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "tbt_p90_s",
            "slo_attainment", "goodput_rps", "gpu_hours")
SPLITWISE = Path("/work/shared/traces/splitwise_sim_perf_model/perf_model.csv")


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.skipif(not SPLITWISE.exists(), reason="shared Splitwise table not present")
def test_json_output_has_the_documented_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = write_azure(tmp_path / "t.csv")
    args = parse("--trace", str(trace), "--policy", "least_loaded", "--prefill", "2", "--decode", "1",
                 "--rate-scale", "2", "--json", "--plot-dir", str(tmp_path / "plots"))
    assert cli.run(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert all(key in out for key in REQUIRED)
    assert out["completed"] == 3 and out["rejected"] == 0
    assert (tmp_path / "plots" / "latency.png").stat().st_size > 0
    assert (tmp_path / "plots" / "replicas.png").stat().st_size > 0


def test_datasheet_calibration_and_autoscaling(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = write_azure(tmp_path / "t.csv")
    args = parse("--trace", str(trace), "--datasheet", "h100-80gb", "--autoscale", "reactive", "--scale-interval",
                 "1", "--reject", "early", "--json")
    assert cli.run(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["completed"] + out["rejected"] == 3
    assert out["cost_model"].startswith("datasheet:")


def test_profile_calibration(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from router.cost_model import CostModel

    model = tmp_path / "cost.json"
    CostModel(prefill_per_token_s=1e-4, decode_base_s=0.02, decode_per_request_s=1e-4).save(model)
    trace = write_azure(tmp_path / "t.csv")
    args = parse("--trace", str(trace), "--cost-model", str(model), "--kv-bytes-per-token", "131072",
                 "--kv-capacity-tokens", "100000", "--tensor-parallel", "1", "--json")
    assert cli.run(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["completed"] == 3
    assert out["gpu_hours"] > 0


def test_autoscaler_policy_from_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("autoscaler.policy")
    trace = write_azure(tmp_path / "t.csv")
    args = parse("--trace", str(trace), "--datasheet", "h100-80gb", "--autoscale", "policy", "--scale-interval", "1",
                 "--json")
    assert cli.run(args) == 0
    assert json.loads(capsys.readouterr().out)["completed"] == 3
