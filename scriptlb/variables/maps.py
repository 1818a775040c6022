"""``map`` variables at run time: a MapConf compiled into a getter, evaluated when read.

nginx evaluates a map only when something reads its variable (lazily): the source template
is rendered, then looked up as ngx_http_map_find does: the exact strings (case-insensitive),
then with ``hostnames`` the longest ``*.example.com`` and ``www.example.*`` wildcards, then the
regexes in file order, else ``default`` (an empty string when there is none). A map that reads
itself, directly or through others, gives "" (nginx: "cycle while evaluating variable").
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from scriptlb.config.model import MapConf
from scriptlb.config.regex import compile_nginx_regex
from scriptlb.routing.locations import HostnameTable

Renderer = Callable[[Any], str]
Compile = Callable[[Any], Renderer]  # Template -> renderer (scriptlb.variables.evaluate.compile_template)


class MapVariable:
    """The getter of one map's variable; templates are compiled on first use, so maps may read
    each other in any order."""

    __slots__ = ("_busy", "_compile", "_conf", "_default", "_exact", "_regexes", "_source", "_wild")

    def __init__(self, conf: MapConf, compile_: Compile) -> None:
        self._conf = conf
        self._compile = compile_
        self._source: Renderer | None = None
        self._busy = False

    def _build(self) -> None:
        conf, compile_ = self._conf, self._compile
        self._exact: dict[str, Renderer] = {}
        self._wild: HostnameTable[Renderer] = HostnameTable()
        self._regexes: list[tuple[re.Pattern[str], Renderer]] = []
        for entry in conf.entries:
            value = compile_(entry.value)
            if entry.kind == "regex":
                self._regexes.append((compile_nginx_regex(entry.key, entry.caseless), value))
            elif entry.kind == "wildcard":
                self._wild.add(entry.key, value)
            else:
                self._exact[entry.key] = value
        self._default = compile_(conf.default) if conf.default is not None else None
        self._source = compile_(conf.source)

    def __call__(self, ex: Any) -> str | None:
        if self._source is None:
            self._build()
        if self._busy:
            return ""
        self._busy = True
        try:
            value = self._find(self._source(ex))  # type: ignore[misc]
            return value(ex) if value is not None else ""
        finally:
            self._busy = False

    def _find(self, text: str) -> Renderer | None:
        if self._conf.hostnames and text.endswith("."):
            text = text[:-1]
        low = text.lower()
        value = self._exact.get(low)
        if value is not None:
            return value
        if self._conf.hostnames:
            value = self._wild.find(low)
            if value is not None:
                return value
        if text:  # nginx does not run the regexes on an empty value
            for regex, result in self._regexes:
                if regex.search(text) is not None:
                    return result
        return self._default
