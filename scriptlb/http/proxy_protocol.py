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
    tlvs: bytes = b""  # v2: the TLVs after the addresses, read when a variable asks



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
        return BROKEN if len(data) >= V1_MAX or not _v1_start(data[6:]) else NEED_MORE
    if end + 2 > V1_MAX:
        return BROKEN
    return _read_v1(data[:end].decode("latin-1"), end + 2)


def _v1_start(rest: bytes) -> bool:
    """Whether what follows "PROXY " so far can still become a header: nginx refuses anything
    else at once (``PROXY INVALID`` is a broken header, not a wait for more bytes)."""
    return any(word[:len(rest)] == rest[:len(word)] for word in (b"UNKNOWN", b"TCP4 ", b"TCP6 "))


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
        src: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv4Address(body[0:4])
        dst: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv4Address(body[4:8])
        ports = body[8:12]
    elif family >> 4 == 2 and len(body) >= 36:  # AF_INET6
        src, dst = ipaddress.IPv6Address(body[0:16]), ipaddress.IPv6Address(body[16:32])
        ports = body[32:36]
    elif family >> 4 in (0, 3):  # UNSPEC / UNIX: no address nginx reports
        return Header(total)
    else:
        return BROKEN
    addresses = 12 if family >> 4 == 1 else 36
    return Header(total, str(src), str(int.from_bytes(ports[0:2], "big")),
                  str(dst), str(int.from_bytes(ports[2:4], "big")), bytes(body[addresses:]))


def v1_header(client_addr: str, client_port: str, server_addr: str, server_port: str) -> bytes:
    """``PROXY TCP4 client server cport sport\\r\\n`` for the peer (nginx writes v1)."""
    try:
        family = "TCP6" if ipaddress.ip_address(client_addr).version == 6 else "TCP4"
    except ValueError:
        return b"PROXY UNKNOWN\r\n"
    return f"PROXY {family} {client_addr} {server_addr} {client_port} {server_port}\r\n".encode("ascii")


# $proxy_protocol_tlv_NAME: nginx's names of the v2 types (ngx_proxy_protocol_tlv_entries)
TLV_TYPES = {"alpn": 0x01, "authority": 0x02, "unique_id": 0x05, "ssl": 0x20, "netns": 0x30}
TLV_SSL_TYPES = {"version": 0x21, "cn": 0x22, "cipher": 0x23, "sig_alg": 0x24, "key_alg": 0x25}
_SSL = 0x20
_SSL_HEAD = 5  # client (1 byte), verify (4 bytes), then the sub-TLVs


class TlvError(ValueError):
    """A TLV nginx cannot read (broken lengths, a bad 0x name): the variable is an error."""


def tlv_value(tlvs: bytes, name: str) -> bytes | None:
    """ngx_proxy_protocol_get_tlv: the value of TLV ``name`` (``alpn``..., ``0xHEX``, ``ssl_*``
    for the SSL TLV's fields), None when absent or the name is unknown; TlvError when the
    TLVs are broken."""
    if name.startswith("ssl_"):
        ssl = _lookup(tlvs, _SSL)
        if ssl is None:
            return None
        if len(ssl) < _SSL_HEAD:
            raise TlvError("broken PROXY protocol TLV")
        name = name[4:]
        if name == "verify":
            return str(int.from_bytes(ssl[1:5], "big")).encode()
        return _lookup_named(ssl[_SSL_HEAD:], name, TLV_SSL_TYPES)
    return _lookup_named(tlvs, name, TLV_TYPES)


def _lookup_named(tlvs: bytes, name: str, types: dict[str, int]) -> bytes | None:
    if name.startswith("0x"):
        digits = name[2:]
        if not digits or any(c not in "0123456789abcdefABCDEF" for c in digits):
            raise TlvError(f'invalid PROXY protocol TLV "{name}"')
        return _lookup(tlvs, int(digits, 16))
    kind = types.get(name)
    return None if kind is None else _lookup(tlvs, kind)


def _lookup(tlvs: bytes, kind: int) -> bytes | None:
    at = 0
    while at < len(tlvs):
        if len(tlvs) - at < 3:
            raise TlvError("broken PROXY protocol TLV")
        length = int.from_bytes(tlvs[at + 1:at + 3], "big")
        start = at + 3
        if len(tlvs) - start < length:
            raise TlvError("broken PROXY protocol TLV")
        if tlvs[at] == kind:
            return tlvs[start:start + length]
        at = start + length
    return None


def tlv_text(header: Header | None, name: str) -> str | None:
    """``$proxy_protocol_tlv_NAME`` of a connection's header (one char per byte): not found
    without a v2 header, an absent TLV, or a broken TLV list."""
    if header is None or not header.tlvs:
        return None
    try:
        value = tlv_value(header.tlvs, name)
    except TlvError:
        return None
    return None if value is None else value.decode("latin-1")
