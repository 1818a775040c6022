"""The PROXY protocol (v1 text, v2 binary) as nginx reads and writes it.

``read_header(data)`` looks at the first bytes of a connection: NEED_MORE, a ``Header``
(with the client address it announces and how many bytes it took), or BROKEN (nginx's
``broken header`` case). ``v1_header(...)`` is what ``proxy_protocol on`` sends a peer.
The bytes are hostile: lengths are checked, addresses parsed with ``ipaddress``.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX = 107  # nginx's NGX_PROXY_PROTOCOL_V1_MAX_HEADER
V2_MAX = 16 + 65535


@dataclass(frozen=True, slots=True)
class Header:
    length: int  # bytes the header took
    addr: str | None = None  # the announced client address (None: UNKNOWN / LOCAL)
    port: str | None = None
    server_addr: str | None = None
    server_port: str | None = None


NEED_MORE = "again"
BROKEN = "broken"


def read_header(data: bytes) -> Header | str:
    if data.startswith(V2_SIGNATURE[: len(data)]) and len(data) < 16:
        return NEED_MORE
    if data.startswith(V2_SIGNATURE):
        return _read_v2(data)
    if b"PROXY"[: len(data)] == data[:5] and len(data) < 5:
        return NEED_MORE
    if not data.startswith(b"PROXY "):
        return BROKEN
    end = data.find(b"\r\n")
    if end < 0:
        return BROKEN if len(data) >= V1_MAX else NEED_MORE
    if end + 2 > V1_MAX:
        return BROKEN
    return _read_v1(data[:end].decode("latin-1"), end + 2)


def _read_v1(line: str, length: int) -> Header | str:
    words = line.split(" ")
    if len(words) >= 2 and words[1] == "UNKNOWN":
        return Header(length)
    if len(words) != 6 or words[1] not in ("TCP4", "TCP6"):
        return BROKEN
    _, family, src, dst, sport, dport = words
    try:
        for text in (src, dst):
            parsed = ipaddress.ip_address(text)
            if parsed.version != (4 if family == "TCP4" else 6):
                return BROKEN
    except ValueError:
        return BROKEN
    if not _is_port(sport) or not _is_port(dport):
        return BROKEN
    return Header(length, src, sport, dst, dport)


def _is_port(text: str) -> bool:
    return text.isdigit() and len(text) <= 5 and int(text) <= 65535


def _read_v2(data: bytes) -> Header | str:
    version_command, family = data[12], data[13]
    length = int.from_bytes(data[14:16], "big")
    if version_command >> 4 != 2:
        return BROKEN
    if len(data) < 16 + length:
        return NEED_MORE
    total = 16 + length
    command = version_command & 0x0F
    if command == 0:  # LOCAL: a health check of the outer balancer, no client address
        return Header(total)
    if command != 1:
        return BROKEN
    body = data[16:total]
    if family >> 4 == 1 and len(body) >= 12:  # AF_INET
        src, dst = ipaddress.IPv4Address(body[0:4]), ipaddress.IPv4Address(body[4:8])
        ports = body[8:12]
    elif family >> 4 == 2 and len(body) >= 36:  # AF_INET6
        src, dst = ipaddress.IPv6Address(body[0:16]), ipaddress.IPv6Address(body[16:32])
        ports = body[32:36]
    elif family >> 4 in (0, 3):  # UNSPEC / UNIX: no address nginx reports
        return Header(total)
    else:
        return BROKEN
    return Header(total, str(src), str(int.from_bytes(ports[0:2], "big")),
                  str(dst), str(int.from_bytes(ports[2:4], "big")))


def v1_header(client_addr: str, client_port: str, server_addr: str, server_port: str) -> bytes:
    """``PROXY TCP4 client server cport sport\\r\\n`` for the peer (nginx writes v1)."""
    try:
        family = "TCP6" if ipaddress.ip_address(client_addr).version == 6 else "TCP4"
    except ValueError:
        return b"PROXY UNKNOWN\r\n"
    return f"PROXY {family} {client_addr} {server_addr} {client_port} {server_port}\r\n".encode("ascii")
