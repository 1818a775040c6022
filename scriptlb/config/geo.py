"""``geo [ADDRESS] $variable { ... }`` blocks (ngx_http_geo_module, ngx_stream_geo_module), read
and checked at load time.

The block's lines are not directives: ``NETWORK VALUE;`` (a CIDR or one address; with
``ranges``, ``FIRST-LAST VALUE;`` over IPv4), ``default VALUE;``, ``delete NETWORK;``, and in
http ``proxy ADDRESS;`` / ``proxy_recursive;`` (``include`` is expanded by the parser). Values
are plain strings. A later line for the same network replaces the earlier one, as nginx's
"duplicate network" does (with its warning); a later range wins over the part of an earlier one
it covers, and ``delete`` takes its range out, as nginx's /16-split ranges end up doing.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

from scriptlb.config.errors import ConfigError
from scriptlb.config.model import GeoConf
from scriptlb.config.parser import Node
from scriptlb.config.templates import TemplateError, compile_template

_V4_ALL = "0.0.0.0/0"
_V6_ALL = "::/0"


def parse_geo(node: Node, known: Callable[[str], bool] | None, http: bool,
              warn: Callable[[str, Any], None]) -> GeoConf:
    """The GeoConf of a ``geo`` block node; ``known``: the block's variable names, ``http``:
    whether ``proxy`` lines are allowed (stream's geo has none)."""
    target = node.args[-1]
    if not target.startswith("$") or len(target) < 2:
        raise ConfigError(f'invalid variable name "{target}"', node.source)
    source = None
    if len(node.args) == 2:
        try:
            source = compile_template(node.args[0], known)
        except TemplateError as err:
            raise ConfigError(str(err), node.source) from None
    reader = _Reader(warn)
    for line in node.children or ():
        if line.children is not None:
            raise ConfigError('unexpected "{"', line.source)
        reader.line(line, http)
    return reader.conf(target[1:].lower(), source)


class _Reader:
    def __init__(self, warn: Callable[[str, Any], None]) -> None:
        self.warn = warn
        self.ranges = False
        self.entries = 0
        self.networks: dict[str, str] = {}
        self.spans: list[tuple[int, int, str]] = []
        self.default: str | None = None
        self.proxies: list[str] = []
        self.proxy_recursive = False

    def line(self, line: Node, http: bool) -> None:
        words = (line.name, *line.args)
        if words == ("ranges",):
            if self.entries:
                raise ConfigError('the "ranges" directive must be the first directive inside "geo" block',
                                  line.source)
            self.ranges = True
            return
        if http and words == ("proxy_recursive",):
            self.proxy_recursive = True
            return
        if len(words) != 2:
            raise ConfigError("invalid number of the geo parameters", line.source)
        key, value = words
        if http and key == "proxy":
            self.proxies.append(_network(line, value, "invalid parameter"))
            return
        self.entries += 1
        if key == "default" and not self.ranges:
            self.networks[_V4_ALL] = self.networks[_V6_ALL] = value  # (what nginx's default is)
        elif key == "default":
            self.default = value
        elif key == "delete":
            self._delete(line, value)
        elif self.ranges:
            first, last = _range(line, key)
            self._assign(first, last, value)
        else:
            network = _network(line, key, "invalid network")
            old = self.networks.get(network)
            if old is not None:
                self.warn(f'duplicate network "{key}", value: "{value}", old value: "{old}"', line.source)
            self.networks[network] = value

    def _delete(self, line: Node, text: str) -> None:
        if self.ranges:
            first, last = _range(line, text)
            self._assign(first, last, None)
            return
        network = _network(line, text, "invalid network")
        if self.networks.pop(network, None) is None:
            self.warn(f'no network "{text}" to delete', line.source)

    def _assign(self, first: int, last: int, value: str | None) -> None:
        """Give [first, last] ``value`` (None: nothing), cutting what was there."""
        kept: list[tuple[int, int, str]] = []
        for low, high, old in self.spans:
            if high < first or low > last:
                kept.append((low, high, old))
                continue
            if low < first:
                kept.append((low, first - 1, old))
            if high > last:
                kept.append((last + 1, high, old))
        if value is not None:
            kept.append((first, last, value))
        self.spans = sorted(kept)

    def conf(self, variable: str, source: Any) -> GeoConf:
        return GeoConf(variable=variable, source=source, ranges=self.ranges,
                       networks=tuple(self.networks.items()), spans=tuple(self.spans),
                       default=self.default or "", proxies=tuple(self.proxies),
                       proxy_recursive=self.proxy_recursive)


def _network(line: Node, text: str, error: str) -> str:
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError:
        raise ConfigError(f'{error} "{text}"', line.source) from None


def _range(line: Node, text: str) -> tuple[int, int]:
    first_text, dash, last_text = text.partition("-")
    try:
        first = int(ipaddress.IPv4Address(first_text))
        last = int(ipaddress.IPv4Address(last_text)) if dash else -1
    except ValueError:
        first, last = 0, -1
    if last < first:
        raise ConfigError(f'invalid range "{text}"', line.source)
    return first, last
