"""Where the benchmarks find the repository, the shared traces and their results; what they ran on.

Every benchmark is run as ``python benchmarks/<name>.py``, which puts this folder first on
``sys.path``; importing this module also puts the repository root there. Standard library only:
``router_policy.py`` also runs on a GPU machine that holds nothing but the repository.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python benchmarks/<name>.py` from anywhere
    sys.path.insert(0, str(ROOT))

TRACES = ROOT.parent / "shared" / "traces"
MOONCAKE = TRACES / "mooncake" / "conversation_trace.jsonl"
AZURE_CONV = TRACES / "azure_llm_2023" / "AzureLLMInferenceTrace_conv.csv"
SPLITWISE = TRACES / "splitwise_sim_perf_model" / "perf_model.csv"
RESULTS = ROOT / "benchmarks" / "results"


def machine() -> str:
    """The CPU model, core count, OS and Python version, for a result record."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cpus, {platform.system()} {platform.release()}, Python {platform.python_version()}"
