"""nginx's value syntaxes: times (``ngx_parse_time``), sizes and offsets (``ngx_parse_size``).

Each parser returns None for an invalid value; the caller words the error the way nginx does
for that directive ("invalid value", "invalid parameter ...", ...).
"""

from __future__ import annotations

_MAX_INT = 2**63 - 1  # NGX_MAX_INT_T_VALUE on 64-bit
_MAX_MSEC = 2**64 - 2  # ngx_msec_t, minus NGX_ERROR

# unit -> (seconds, rank): units must appear in decreasing rank, each at most once
_TIME_UNITS = {
    "y": (365 * 24 * 3600, 1),
    "M": (30 * 24 * 3600, 2),
    "w": (7 * 24 * 3600, 3),
    "d": (24 * 3600, 4),
    "h": (3600, 5),
    "m": (60, 6),
    "s": (1, 7),
}
_MS_RANK = 8


def parse_time(value: str, *, seconds_only: bool = False) -> float | None:
    """``1h30m``, ``500ms``, ``30`` (bare = seconds) -> seconds as a float; None if invalid.

    ``seconds_only`` is nginx's ``is_sec`` (e.g. ``fail_timeout``): ``ms`` is then invalid.
    Millisecond values (the default) refuse years and months, as nginx does, since they
    would not fit its millisecond counters.
    """
    total_ms = _parse_time_ms(value, seconds_only)
    if total_ms is None:
        return None
    return total_ms / 1000


def _parse_time_ms(value: str, seconds_only: bool) -> int | None:
    rank = 0 if seconds_only else 2  # msec parsing starts past 'M', so 'y' and 'M' are refused
    number, have_digits, total = 0, False, 0
    i, n = 0, len(value)
    while i < n:
        ch = value[i]
        i += 1
        if "0" <= ch <= "9":
            number = number * 10 + ord(ch) - 48
            if number > _MAX_INT:
                return None
            have_digits = True
            continue
        if ch == "m" and i < n and value[i] == "s":
            if seconds_only or rank >= _MS_RANK:
                return None
            i += 1
            rank, scale_ms = _MS_RANK, 1
        elif ch in _TIME_UNITS:
            seconds, unit_rank = _TIME_UNITS[ch]
            if unit_rank <= rank:
                return None
            rank, scale_ms = unit_rank, seconds * 1000
        else:
            return None
        total += number * scale_ms
        number = 0
        while i < n and value[i] == " ":
            i += 1
    if not have_digits:
        return None
    total += number * 1000  # a trailing bare number is seconds
    if total > _MAX_MSEC:
        return None
    return total


def parse_size(value: str) -> int | None:
    """``ngx_parse_size``: bytes, ``k``/``K``, ``m``/``M``; None if invalid."""
    return _parse_scaled(value, {"k": 1024, "m": 1024 * 1024})


def parse_offset(value: str) -> int | None:
    """``ngx_parse_offset`` (e.g. client_max_body_size): like sizes, plus ``g``/``G``."""
    return _parse_scaled(value, {"k": 1024, "m": 1024 * 1024, "g": 1024**3})


def _parse_scaled(value: str, units: dict[str, int]) -> int | None:
    scale = 1
    digits = value
    if value and value[-1].lower() in units:
        scale = units[value[-1].lower()]
        digits = value[:-1]
    number = parse_int(digits)
    if number is None or number * scale > _MAX_INT:
        return None
    return number * scale


def parse_int(value: str) -> int | None:
    """``ngx_atoi``: decimal digits only (no sign, no spaces); None if invalid."""
    if not value or not value.isascii() or not value.isdigit():
        return None
    number = int(value)
    return number if number <= _MAX_INT else None
