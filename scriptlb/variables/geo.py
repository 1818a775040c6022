"""``geo`` variables at run time (http and stream): a GeoConf compiled into a getter.

The address is the client's (or the block's ADDRESS template, rendered); with ``proxy`` lines
(http) a trusted address is replaced by X-Forwarded-For's, as nginx's geo does. Text that is
not an address counts as 255.255.255.255 (nginx's INADDR_NONE), so does a unix-socket client; an
IPv4-mapped IPv6 address is looked up as IPv4. CIDR mode: the longest matching network of the
address's family. Ranges mode (IPv4 only: other IPv6 addresses are INADDR_NONE): the range that
holds it. No match: ``default`` ("" when there is none).
"""

from __future__ import annotations

import bisect
import ipaddress
from collections.abc import Callable
from typing import Any

from scriptlb.config.model import GeoConf

Renderer = Callable[[Any], str]
Forwarded = Callable[[str, Any], str]  # (address, request) -> the address X-Forwarded-For gives

_NONE = ipaddress.IPv4Address("255.255.255.255")
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def geo_address(text: str) -> Address:
    """The address geo looks up for ``text`` (see the module docstring)."""
    try:
        address: Address = ipaddress.ip_address(text)
    except ValueError:
        return _NONE
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped if mapped is not None else address


class GeoTable:
    """The lookup of one geo block: value for an address."""

    __slots__ = ("_by_prefix", "_default", "_firsts", "_spans", "ranges")

    def __init__(self, conf: GeoConf) -> None:
        self.ranges = conf.ranges
        self._default = conf.default
        self._spans = conf.spans
        self._firsts = [first for first, _, _ in conf.spans]
        # per family: [(prefix length, {network as int: value})], longest first
        self._by_prefix: dict[int, list[tuple[int, dict[int, str]]]] = {4: [], 6: []}
        tables: dict[tuple[int, int], dict[int, str]] = {}
        for text, value in conf.networks:
            network = ipaddress.ip_network(text)
            tables.setdefault((network.version, network.prefixlen), {})[int(network.network_address)] = value
        for (version, length), table in sorted(tables.items(), key=lambda item: -item[0][1]):
            self._by_prefix[version].append((length, table))

    def lookup(self, address: Address) -> str:
        if self.ranges:
            number = int(address) if address.version == 4 else int(_NONE)
            at = bisect.bisect_right(self._firsts, number) - 1
            if at >= 0 and self._spans[at][1] >= number:
                return self._spans[at][2]
            return self._default
        bits = 32 if address.version == 4 else 128
        number = int(address)
        for length, table in self._by_prefix[address.version]:
            value = table.get(number >> (bits - length) << (bits - length))
            if value is not None:
                return value
        return self._default


class GeoVariable:
    """The getter of one geo block's variable."""

    __slots__ = ("_forwarded", "_source", "table")

    def __init__(self, conf: GeoConf, compile_: Callable[[Any], Renderer],
                 forwarded: Forwarded | None = None) -> None:
        self.table = GeoTable(conf)
        self._source = compile_(conf.source) if conf.source is not None else None
        self._forwarded = forwarded

    def __call__(self, client: Any) -> str:
        text = self._source(client) if self._source is not None else client.remote_addr
        if self._forwarded is not None:
            text = self._forwarded(text, client)
        return self.table.lookup(geo_address(text))
