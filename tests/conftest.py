"""Shared test helpers: real sockets on 127.0.0.1 with OS-chosen ports, real processes."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


@pytest.fixture
def root() -> Path:
    return ROOT


def scriptlb_cmd(*args: str) -> list[str]:
    """The command line that runs scriptlb from this checkout with the test interpreter."""
    return [PYTHON, "-m", "scriptlb", *args]


os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
