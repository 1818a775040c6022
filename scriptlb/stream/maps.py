"""``map`` in stream: a variable whose value is chosen by another's (ngx_stream_map_module).

Exact keys are compared case-insensitively; with ``hostnames``, ``*.example.com`` /
``.example.com`` / ``www.example.*`` masks come next (the longest match wins, as nginx's
wildcard hash), then the regexes in file order, then ``default`` (else the empty string).
The value is evaluated once per session and cached on it, as nginx caches a map's value.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from scriptlb.config.model import StreamMapConf
from scriptlb.config.regex import compile_nginx_regex

Getter = Callable[[Any], "str | None"]
Compile = Callable[[Any], Callable[[Any], str]]  # Template -> renderer


def map_getter(conf: StreamMapConf, compile_value: Compile) -> Getter:
    """The getter of ``$conf.variable``; ``compile_value`` renders a value template."""
    source = compile_value(conf.source)
    exact = {key: compile_value(value) for key, value in conf.exact}
    wildcards = sorted(((key, compile_value(value)) for key, value in conf.wildcards),
                       key=lambda item: -len(item[0]))
    regexes = [(compile_nginx_regex(pattern, caseless), compile_value(value))
               for pattern, caseless, value in conf.regexes]
    default = compile_value(conf.default) if conf.default is not None else None
    slot = "map_" + conf.variable

    def get(session: Any) -> str | None:
        cache = session.ctx_cache
        if slot in cache:
            return cache[slot]
        key = source(session)
        value = _choose(key, exact, wildcards, regexes, default, conf.hostnames)
        result = value(session) if value is not None else ""
        cache[slot] = result
        return result

    return get


def _choose(key: str, exact: dict, wildcards: list, regexes: list, default: Any, hostnames: bool) -> Any:
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
        if regex.search(key):
            return value
    return default


def _wildcard_match(mask: str, name: str) -> bool:
    if mask.startswith("*."):
        return name.endswith(mask[1:])
    if mask.startswith("."):
        return name == mask[1:] or name.endswith(mask)
    if mask.endswith(".*"):
        return name.startswith(mask[:-1])
    return False
