"""``map`` and ``split_clients`` in stream: variables whose value is chosen by another's
(ngx_stream_map_module, ngx_stream_split_clients_module).

Exact keys are compared case-insensitively; with ``hostnames``, ``*.example.com`` /
``.example.com`` / ``www.example.*`` masks come next (the longest match wins, as nginx's
wildcard hash), then the regexes in file order, then ``default`` (else the empty string).
The value is evaluated once per session and cached on it, as nginx caches a map's value (a
``set`` of the same name overwrites that cache). A regex match leaves its captures on the
session: ``$1``... and named groups read them, in the value and after.

``split_clients`` hashes its source with MurmurHash2 (nginx's) and takes the first part whose
bound is above the hash.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Protocol

from scriptlb.config.model import StreamMapConf, StreamSplitConf, Template
from scriptlb.config.regex import compile_nginx_regex


class MapSession(Protocol):
    """What a map reads on a session besides the variables its templates read."""

    ctx_cache: dict[str, str | None]  # the session's variable values, evaluated once
    captures: tuple[str, ...]  # the last regex match: the whole match, then its groups


Renderer = Callable[[Any], str]  # a value template, rendered for a session
Getter = Callable[[MapSession], "str | None"]
Compile = Callable[[Template], Renderer]


def map_getter(conf: StreamMapConf, compile_value: Compile) -> Getter:
    """The getter of ``$conf.variable``; ``compile_value`` renders a value template."""
    source = compile_value(conf.source)
    exact = {key: compile_value(value) for key, value in conf.exact}
    wildcards = sorted(((key, compile_value(value)) for key, value in conf.wildcards),
                       key=lambda item: -len(item[0]))
    regexes = [(compile_nginx_regex(pattern, caseless), compile_value(value))
               for pattern, caseless, value in conf.regexes]
    default = compile_value(conf.default) if conf.default is not None else None
    slot = conf.variable

    def get(session: MapSession) -> str | None:
        cache = session.ctx_cache
        if slot in cache:
            return cache[slot]
        key = source(session)
        value = _choose(session, key, exact, wildcards, regexes, default, conf.hostnames)
        result = value(session) if value is not None else ""
        cache[slot] = result
        return result

    return get


def _choose(session: MapSession, key: str, exact: dict[str, Renderer],
            wildcards: list[tuple[str, Renderer]], regexes: list[tuple[re.Pattern[str], Renderer]],
            default: Renderer | None, hostnames: bool) -> Renderer | None:
    lowered = key.lower()
    if hostnames:
        lowered = lowered.rstrip(".")
    found = exact.get(lowered)
    if found is not None:
        return found
    for mask, value in wildcards:
        if _wildcard_match(mask, lowered):
            return value
    for regex, value in regexes:
        match = regex.search(key)
        if match is not None:
            keep_captures(session, match)
            return value
    return default


def keep_captures(session: MapSession, match: re.Match[str]) -> None:
    """A regex match's captures on the session, as nginx's ngx_stream_regex_exec: numbered
    ones for ``$N``, named ones as variables of their own."""
    session.captures = (match.group(0), *(g or "" for g in match.groups()))
    for name, value in match.groupdict().items():
        session.ctx_cache[name.lower()] = value or ""


def split_getter(conf: StreamSplitConf, compile_source: Compile) -> Getter:
    """The getter of ``split_clients``' variable (cached per session, as nginx's)."""
    source = compile_source(conf.source)
    parts = conf.parts
    slot = conf.variable

    def get(session: MapSession) -> str | None:
        cache = session.ctx_cache
        if slot not in cache:
            cache[slot] = split_value(parts, source(session).encode("utf-8", "surrogateescape"))
        return cache[slot]

    return get


def split_value(parts: tuple[tuple[int, str], ...], key: bytes) -> str:
    """The part of ``key``'s hash: the first bound above it, or the first of bound 0 (``*``)."""
    hashed = murmur_hash2(key)
    for bound, value in parts:
        if hashed < bound or bound == 0:
            return value
    return ""


_M = 0x5BD1E995
_MASK = 0xFFFFFFFF


def murmur_hash2(data: bytes) -> int:
    """nginx's ngx_murmur_hash2 (MurmurHash2, seed 0, little-endian words)."""
    length = len(data)
    h = length & _MASK
    whole = length - length % 4
    for i in range(0, whole, 4):
        k = int.from_bytes(data[i:i + 4], "little")
        k = (k * _M) & _MASK
        k ^= k >> 24
        k = (k * _M) & _MASK
        h = ((h * _M) & _MASK) ^ k
    rest = data[whole:]
    if rest:
        h ^= int.from_bytes(rest, "little")
        h = (h * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    h ^= h >> 15
    return h


def _wildcard_match(mask: str, name: str) -> bool:
    if mask.startswith("*."):
        return name.endswith(mask[1:])
    if mask.startswith("."):
        return name == mask[1:] or name.endswith(mask)
    if mask.endswith(".*"):
        return name.startswith(mask[:-1])
    return False
