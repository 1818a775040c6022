"""ngx_http_realip_module: the client address from a trusted proxy's header.

When the connection comes from an address ``set_real_ip_from`` trusts, the address in
``real_ip_header`` (X-Real-IP by default, X-Forwarded-For, any header, or the PROXY protocol's)
replaces the client's for this request: ``$remote_addr``, ``$remote_port`` (the header's port,
or none), allow/deny, ip_hash, logs. With ``real_ip_recursive on``, X-Forwarded-For is read
from the right, skipping trusted addresses, as nginx's ngx_http_get_forwarded_addr does.
``$realip_remote_addr`` / ``$realip_remote_port`` keep the connection's own.

The header value is hostile: anything that is not an address (with an optional port) leaves
the client's address as it was.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from scriptlb.config.model import RealIpConf

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

OK, DONE, DECLINED = "ok", "done", "declined"
_ENTRIES = re.compile(r"[ ,]+")  # nginx splits X-Forwarded-For at commas and spaces alike


def parse_addr_port(text: str) -> tuple[str, int] | None:
    """nginx's ngx_parse_addr_port: ``addr``, ``addr:port``, ``[v6]`` or ``[v6]:port``, or a
    bare IPv6 address; port 0 when none is given; None when it is no address."""
    text = text.strip()
    port = 0
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        host, rest = text[1:end], text[end + 1:]
        if rest:
            if not rest.startswith(":") or not rest[1:].isdigit():
                return None
            port = int(rest[1:])
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        if not port_text.isdigit():
            return None
        port = int(port_text)
    else:
        host = text
    if not 0 <= port < 65536:
        return None
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    return str(address), port


class RealIp:
    """One location's realip settings, compiled."""

    def __init__(self, conf: RealIpConf) -> None:
        self.unix = "unix:" in conf.trusted
        self.networks: list[Network] = [ipaddress.ip_network(n) for n in conf.trusted if n != "unix:"]
        self.header = conf.header.encode("latin-1")
        self.recursive = conf.recursive

    def trusted(self, addr: str) -> bool:
        if addr == "unix:":
            return self.unix
        try:
            address: Address = ipaddress.ip_address(addr)
        except ValueError:
            return False
        mapped = getattr(address, "ipv4_mapped", None)
        if mapped is not None:
            address = mapped
        return any(address.version == n.version and address in n for n in self.networks)

    def client(self, exchange: Any) -> tuple[str, int] | None:
        """The address (and port) that replaces the client's, or None."""
        conn = exchange.conn
        if not self.trusted(conn.remote_addr):
            return None
        if self.header == b"proxy_protocol":
            pp = getattr(conn, "proxy_protocol", None)
            if pp is None or pp.addr is None:
                return None
            found = parse_addr_port(pp.addr)
            return None if found is None else (found[0], int(pp.port or 0))
        values = [v for n, v in exchange.headers if n.lower() == self.header]
        if not values:
            return None
        if self.header != b"x-forwarded-for":
            values = values[:1]  # (nginx 1.22 keeps the first line of the other headers)
        return self._forwarded(conn.remote_addr, [v.decode("latin-1") for v in values])

    def forwarded_address(self, addr: str, lines: list[str]) -> str:
        """The address X-Forwarded-For ``lines`` give for ``addr`` when it is trusted, else
        ``addr`` (geo's ``proxy``: ngx_http_get_forwarded_addr over the geo's proxies)."""
        found = self._forwarded(addr, lines) if lines and self.trusted(addr) else None
        return found[0] if found is not None else addr

    def _forwarded(self, addr: str, lines: list[str]) -> tuple[str, int] | None:
        """ngx_http_get_forwarded_addr: the header lines from the last, each from its right."""
        outcome, current, found = DECLINED, (addr, 0), False
        for line in reversed(lines):
            outcome, current = self._walk(current, line)
            if not self.recursive:
                break
            if outcome == DECLINED and found:
                outcome = DONE
                break
            if outcome != OK:
                break
            found = True
        return None if outcome == DECLINED else current

    def _walk(self, current: tuple[str, int], line: str) -> tuple[str, tuple[str, int]]:
        """One header line from its right (ngx_http_get_forwarded_addr_internal): each step
        needs the address so far trusted; OK when every entry was taken, DONE when it stopped
        at an untrusted or broken one after taking some, DECLINED when it took none."""
        taken = False
        for entry in reversed(_ENTRIES.split(line)):
            if not entry:
                continue
            if not self.trusted(current[0]):
                return (DONE if taken else DECLINED), current
            parsed = parse_addr_port(entry)
            if parsed is None:
                return (DONE if taken else DECLINED), current
            current, taken = parsed, True
            if not self.recursive:
                break
        return (OK if taken else DECLINED), current
