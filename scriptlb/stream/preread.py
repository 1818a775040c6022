"""``ssl_preread``: read the TLS ClientHello a client sends first, without terminating TLS.

``parse_client_hello(data)`` looks at the bytes read so far and says whether more are needed,
or what the hello says: the server name (SNI), the highest protocol version offered and the
ALPN protocols, as nginx's ngx_stream_ssl_preread_module exposes them. The bytes are hostile:
every length is checked against what was read, nothing is trusted.
"""

from __future__ import annotations

from dataclasses import dataclass

NEED_MORE = "again"
NOT_TLS = "declined"  # not a TLS handshake (or a malformed one): proxied without the variables
DONE = "ok"

_VERSIONS = {0x0002: "SSLv2", 0x0300: "SSLv3", 0x0301: "TLSv1", 0x0302: "TLSv1.1", 0x0303: "TLSv1.2",
             0x0304: "TLSv1.3"}
_SNI = 0
_ALPN = 16
_SUPPORTED_VERSIONS = 43


@dataclass(slots=True)
class Hello:
    status: str
    server_name: str = ""
    protocol: str = ""
    alpn: str = ""


class _Malformed(ValueError):
    pass


class _Reader:
    __slots__ = ("data", "end", "pos")

    def __init__(self, data: bytes, pos: int = 0, end: int | None = None) -> None:
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else end

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > self.end:
            raise _Malformed
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def u24(self) -> int:
        return int.from_bytes(self.take(3), "big")

    def sub(self, n: int) -> _Reader:
        start = self.pos
        self.take(n)
        return _Reader(self.data, start, start + n)

    def left(self) -> int:
        return self.end - self.pos


def _handshake_bytes(data: bytes) -> bytes | None:
    """The handshake messages carried by the leading TLS records (None: not TLS records)."""
    out = bytearray()
    pos = 0
    while pos + 5 <= len(data):
        content_type, major = data[pos], data[pos + 1]
        length = int.from_bytes(data[pos + 3:pos + 5], "big")
        if content_type != 0x16 or major != 3 or length == 0 or length > 16384 + 2048:
            return None
        out += data[pos + 5:pos + 5 + length]
        if pos + 5 + length > len(data):
            break
        pos += 5 + length
        if len(out) >= 4 and len(out) >= 4 + int.from_bytes(out[1:4], "big"):
            break
    return bytes(out)


def parse_client_hello(data: bytes) -> Hello:
    """What the bytes read so far say (see the module docstring)."""
    if len(data) < 5:
        return Hello(NEED_MORE)
    if data[0] & 0x80 and data[2] == 1 and data[3] in (0, 3):
        # an SSLv2-framed ClientHello: its version, nothing else (nginx reads no further)
        return Hello(DONE, protocol=_VERSIONS.get(int.from_bytes(data[3:5], "big"), ""))
    if data[0] != 0x16:
        return Hello(NOT_TLS)  # nginx: "ssl preread: not a handshake"
    handshake = _handshake_bytes(data)
    if handshake is None:
        return Hello(NOT_TLS)
    if len(handshake) < 4:
        return Hello(NEED_MORE)
    if handshake[0] != 1:  # not a ClientHello
        return Hello(NOT_TLS)
    length = int.from_bytes(handshake[1:4], "big")
    if len(handshake) < 4 + length:
        return Hello(NEED_MORE)
    try:
        return _parse_hello(_Reader(handshake, 4, 4 + length))
    except _Malformed:
        return Hello(NOT_TLS)


def _parse_hello(r: _Reader) -> Hello:
    hello = Hello(DONE)
    client_version = r.u16()
    hello.protocol = _VERSIONS.get(client_version, "")
    r.take(32)  # random
    r.take(r.u8())  # session id
    r.take(r.u16())  # cipher suites
    r.take(r.u8())  # compression methods
    if not r.left():
        return hello
    # as nginx's parser: the extensions run to the end of the hello (their total length is
    # not checked), and supported_versions is skipped by its list's own length
    r.take(2)
    while r.left():
        kind = r.u16()
        length = r.u16()
        if kind == _SUPPORTED_VERSIONS:
            hello.protocol = "TLSv1.3"  # (nginx: the extension's presence says TLSv1.3)
            r.take(r.u8())
            continue
        body = r.sub(length)
        if kind == _SNI:
            hello.server_name = _server_name(body)
        elif kind == _ALPN:
            hello.alpn = _alpn(body)
    return hello


def _server_name(body: _Reader) -> str:
    names = body.sub(body.u16())
    while names.left():
        name_type = names.u8()
        name = names.take(names.u16())
        if name_type == 0:
            return name.decode("latin-1")
    return ""


def _alpn(body: _Reader) -> str:
    protocols = body.sub(body.u16())
    found = []
    while protocols.left():
        found.append(protocols.take(protocols.u8()).decode("latin-1"))
    return ",".join(found)

