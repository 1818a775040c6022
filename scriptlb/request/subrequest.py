"""A subrequest (nginx's ``ngx_http_subrequest``): a GET for another URI of the same server,
run in-process through the normal request handling (routing, rewrite, access, proxy, static),
its response captured in memory.

The subrequest is an HTTP/1.0 request fed to a ``ClientConnection`` whose transport is a
memory buffer (``_CaptureTransport``): the whole machinery runs unchanged, and the response
ends when that connection closes (HTTP/1.0 without keep-alive: the close delimits the body,
which is therefore never chunked). It carries the parent's client address and request headers
(not its body, nor the headers that frame or upgrade a connection), as nginx's subrequests do.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from scriptlb.http.downstream import ClientConnection

# headers a subrequest does not inherit: its own framing, and no connection upgrade (nginx
# never switches protocols in a subrequest)
_NOT_INHERITED = frozenset((b"content-length", b"transfer-encoding", b"expect", b"connection", b"upgrade",
                            b"keep-alive", b"te"))
# bytes that cannot stand in a request line: percent-encoded (a variable may bring them in)
_UNSAFE = re.compile(rb"[\x00-\x20\x7f-\xff]")


@dataclass(frozen=True, slots=True)
class SubrequestResult:
    status: int  # 0: no response (the subrequest's connection was dropped before a head)
    headers: bytes  # the response's header lines
    body: bytes


class _CaptureTransport:
    """The subrequest's side of a socket: writes are kept, close hands them over (next turn
    of the loop, as a socket's connection_lost comes)."""

    def __init__(self, parent: Any, on_close: Callable[[bytes], None]) -> None:
        self._extra = {
            "peername": (parent.remote_addr, parent.remote_port) if parent.remote_addr != "unix:" else "",
            "sockname": (parent.server_addr, parent.server_port),
            "ssl_object": parent.tls,
        }
        self._chunks: list[bytes] = []
        self._closing = False
        self._on_close: Callable[[bytes], None] | None = on_close
        self._loop = parent.loop
        self.protocol: ClientConnection | None = None

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._extra.get(name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._closing:
            self._chunks.append(bytes(data))

    def writelines(self, chunks: Any) -> None:
        for data in chunks:
            self.write(data)

    def is_closing(self) -> bool:
        return self._closing

    def can_write_eof(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        """(nothing more is fed)"""

    def resume_reading(self) -> None:
        """(nothing more is fed)"""

    def close(self) -> None:
        if not self._closing:
            self._closing = True
            self._loop.call_soon(self._closed)

    abort = close

    def _closed(self) -> None:
        protocol, self.protocol = self.protocol, None
        if protocol is not None:
            protocol.connection_lost(None)
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close(b"".join(self._chunks))
        self._chunks = []

    def cancel(self) -> None:
        """The parent went away: end the subrequest, deliver nothing."""
        self._on_close = None
        protocol = self.protocol
        if protocol is not None and not self._closing:
            active = protocol.active
            if active is not None:
                active.client_lost()
            self.close()


def request_bytes(exchange: Any, uri: str) -> bytes:
    """The subrequest's head: GET ``uri`` with the parent's headers."""
    target = _UNSAFE.sub(lambda m: b"%%%02X" % m.group(0)[0], uri.encode("utf-8"))
    lines = [b"GET " + target + b" HTTP/1.0\r\n"]
    for name, value in exchange.headers:
        if name.lower() not in _NOT_INHERITED:
            lines.append(name + b": " + value + b"\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


def parse_response(data: bytes) -> SubrequestResult:
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return SubrequestResult(0, b"", b"")
    line, _, headers = head.partition(b"\r\n")
    fields = line.split(b" ", 2)
    status = int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else 0
    return SubrequestResult(status, headers + b"\r\n" if headers else b"", body)


def run_subrequest(exchange: Any, uri: str, done: Callable[[SubrequestResult], None]) -> _CaptureTransport:
    """Start a subrequest of ``exchange`` for ``uri``; ``done`` gets its response. The returned
    object's ``cancel()`` ends it (``done`` is then not called)."""
    parent = exchange.conn
    transport = _CaptureTransport(parent, lambda data: done(parse_response(data)))
    conn = ClientConnection(parent.listener, parent.loop)
    conn.route = parent.route  # (the same listener's servers)
    conn.proxy_protocol = parent.proxy_protocol  # ($proxy_protocol_addr & co: the parent's)
    transport.protocol = conn
    conn.connection_made(transport)  # type: ignore[arg-type]  # (a memory transport, duck-typed)
    conn.data_received(request_bytes(exchange, uri))
    return transport
