"""The chart's copies of deploy/grafana/*.json and deploy/prometheus/*.yaml match their sources."""

from __future__ import annotations

import json
import subprocess
import sys

import yaml

from tests.deploy.chart import CHART, ROOT


def test_chart_copies_match_deploy_sources():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "sync_chart_assets"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_chart_copies_parse():
    """Helm would fail at install on a broken file; fail here first."""
    for path in (CHART / "files" / "grafana").glob("*.json"):
        assert isinstance(json.loads(path.read_text()), dict), path
    for path in (CHART / "files" / "prometheus").glob("*.yaml"):
        doc = yaml.safe_load(path.read_text())
        assert isinstance(doc, dict) and isinstance(doc.get("groups"), list), f"{path}: expected `groups:`"
