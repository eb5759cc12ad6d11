"""Fault tests: each small and fast; subprocesses where a kill or a second process is the point."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # helpers.py, also for the subprocesses' scripts


@pytest.fixture(autouse=True)
def _quiet() -> None:
    warnings.simplefilter("ignore")  # transformers and Lightning warn about tiny random models
