"""The test tiers stay complete: every test file is classified (conftest.TIERS), and the table
names no file that is gone, so ``pytest -m unit`` / ``-m protocol`` / ``-m integration`` together
run the whole suite."""

from __future__ import annotations

from pathlib import Path

from conftest import TIER_NAMES, TIERS

TESTS = Path(__file__).resolve().parent


def test_every_test_file_has_a_tier() -> None:
    files = {path.name for path in TESTS.glob("test_*.py")}
    unclassified = sorted(files - TIERS.keys())
    assert not unclassified, f"add these files to TIERS in tests/conftest.py: {unclassified}"
    gone = sorted(TIERS.keys() - files)
    assert not gone, f"TIERS names files that no longer exist: {gone}"


def test_tiers_are_the_registered_ones() -> None:
    assert set(TIERS.values()) <= set(TIER_NAMES)
