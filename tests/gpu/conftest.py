"""Tests that need a CUDA GPU: skipped as a whole where ``torch.cuda.is_available()`` is false.

Modules here import the Triton kernels inside the tests, not at import time:
on a CPU machine the unit tests import them first, in Triton's interpreter.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = None if torch.cuda.is_available() else pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if _HERE in item.path.resolve().parents:
            item.add_marker(pytest.mark.gpu)
            if skip is not None:
                item.add_marker(skip)
