"""Shared test helpers: real sockets on 127.0.0.1 with OS-chosen ports, real processes."""

from __future__ import annotations

import os
import resource
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

# A safety net for the sandbox's memory-bomb tests: should a guard ever miss one, the test run
# fails with MemoryError instead of driving the machine (CI's too) into the OOM killer.
# Processes the tests start inherit it. 12 GiB of address space is far above what the suite uses.
_ADDRESS_SPACE_CAP = 12 << 30
_soft, _hard = resource.getrlimit(resource.RLIMIT_AS)
if _soft == resource.RLIM_INFINITY or _soft > _ADDRESS_SPACE_CAP:
    resource.setrlimit(resource.RLIMIT_AS, (_ADDRESS_SPACE_CAP, _hard))
