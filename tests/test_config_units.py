"""nginx value syntaxes: times (ms/sec flavours), sizes and offsets, plain numbers."""

from __future__ import annotations

import pytest

from scriptlb.config.units import parse_int, parse_offset, parse_size, parse_time


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0", 0.0),
        ("30", 30.0),
        ("500ms", 0.5),
        ("1s", 1.0),
        ("1m", 60.0),
        ("1h", 3600.0),
        ("1d", 86400.0),
        ("2w", 14 * 86400.0),
        ("1m30s", 90.0),
        ("1m30", 90.0),  # a trailing bare number is seconds
        ("1m 30s", 90.0),
        ("1s500ms", 1.5),
        ("1h1m1s1ms", 3661.001),
    ],
)
def test_times(text: str, seconds: float) -> None:
    assert parse_time(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "1.5s", "1s1m", "1S", "1ms1s", "10k", "1y", "1M", "s", "-1", "1mm"])
def test_invalid_millisecond_times(text: str) -> None:
    # years and months do not fit nginx's millisecond timers, so msec directives refuse them
    assert parse_time(text) is None


def test_seconds_only_times_allow_years_but_not_milliseconds() -> None:
    assert parse_time("1y", seconds_only=True) == 365 * 86400
    assert parse_time("1M", seconds_only=True) == 30 * 86400
    assert parse_time("10", seconds_only=True) == 10
    assert parse_time("500ms", seconds_only=True) is None
    assert parse_time("1s1ms", seconds_only=True) is None


@pytest.mark.parametrize(
    ("text", "size"), [("0", 0), ("10", 10), ("10k", 10240), ("10K", 10240), ("1m", 1 << 20), ("2M", 2 << 20)]
)
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size
    assert parse_offset(text) == size


@pytest.mark.parametrize("text", ["", "1.5m", "10kb", "k", "-1", "1t", " 1"])
def test_invalid_sizes(text: str) -> None:
    assert parse_size(text) is None
    assert parse_offset(text) is None


def test_gigabytes_only_for_offsets() -> None:
    assert parse_offset("1g") == parse_offset("1G") == 1 << 30
    assert parse_size("1g") is None


def test_plain_numbers() -> None:
    assert parse_int("42") == 42
    for bad in ("", "-1", "+1", "1.0", "x", "\u0661"):  # the last: a non-ASCII digit
        assert parse_int(bad) is None
    assert parse_int(str(2**63)) is None
