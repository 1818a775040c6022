"""A peer's response head, read from its raw bytes once llhttp has validated them.

The upstream parser gets no per-header callback (a Python call per header line, and llhttp's
copies of every name and value, for headers the proxy passes on untouched). When llhttp says
the head is complete, ``scan`` looks at the head's bytes once:

* a head in the canonical form (every line ``Name: value\\r\\n``, one space after the colon,
  no blank at the end of a value: what servers send) is taken apart by two C-level regex
  passes: one finds the few headers the proxy acts on (framing, Connection, the ones
  proxy_redirect / proxy_cookie_* / X-Accel-Redirect may need), the other cuts the hidden
  lines out, so the client's lines are the peer's bytes;
* any other head (blanks to strip, lines ended by a bare LF, an interim 1xx before it) is
  parsed again by a second llhttp parser that collects the pairs, exactly as before.

The header list (``$upstream_http_*``, hooks, proxy_pass_header, ...) is built only when
something reads it: a ``ResponseHead`` is the sequence of its ``(name, value)`` pairs.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import overload

import httptools

# Response headers nginx never passes to the client: hop-by-hop ones, the framing we redo, and
# proxy_hide_header's defaults (Date, Server, X-Pad, X-Accel-*) since we send our own.
HIDDEN_RESPONSE_HEADERS = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-connection",
        b"content-length",
        b"date",
        b"server",
        b"x-pad",
    }
)

# "\r\n" + a line that is not "Name: value" in the canonical form: no space (or a blank more)
# after the colon, an empty value, a blank before the line's end, a line ended by a bare LF
_ODD_LINE = re.compile(rb"\r\n(?:[^:\r\n]*:(?! [^ \t\r\n])|[^\r\n]*(?:[ \t]\r|\n))")
# "\r\n" + a header the proxy acts on: (name, value)
_NOTABLE = re.compile(
    rb"\r\n(content-length|transfer-encoding|connection|location|refresh|set-cookie|x-accel-redirect)"
    rb": ([^\r]*)", re.I)
# "\r\n" + a line the client never gets (HIDDEN_RESPONSE_HEADERS and X-Accel-*)
_HIDDEN_LINE = re.compile(
    rb"\r\n(?:connection|keep-alive|te|trailer|transfer-encoding|upgrade|proxy-connection|"
    rb"content-length|date|server|x-pad|x-accel-[^:\r]*):[^\r]*", re.I)

# what a notable header means, by lower-cased name
_LENGTH, _CHUNKED, _CONNECTION, _REWRITABLE = range(4)
_NOTABLE_KIND = {b"content-length": _LENGTH, b"transfer-encoding": _CHUNKED, b"connection": _CONNECTION,
                 b"location": _REWRITABLE, b"refresh": _REWRITABLE, b"set-cookie": _REWRITABLE,
                 b"x-accel-redirect": _REWRITABLE}

Header = tuple[bytes, bytes]


class ResponseHead(Sequence[Header]):
    """The status line and headers of one upstream response; as a sequence, its header pairs
    as received (original case), parsed on first use."""

    __slots__ = ("_block", "_headers", "chunked", "close", "connection", "content_length", "lines",
                 "reason", "rewritable", "status")

    def __init__(self, status: int, reason: bytes, close: bool) -> None:
        self.status = status
        self.reason = reason  # the peer's own phrase, passed to the client as nginx does
        self.close = close  # "Connection: close" or an HTTP/1.0 response without keep-alive
        self.content_length: int | None = None
        self.chunked = False
        self.connection: bytes | None = None  # the Connection header's value
        # a Location, Refresh or Set-Cookie is among the lines (proxy_redirect / proxy_cookie_*
        # may have to edit them), or an X-Accel-Redirect came: other responses are not looked
        # at again
        self.rewritable = False
        self.lines = b""  # the headers passed to the client, as "Name: value\r\n" lines
        self._block = b"\r\n"  # a canonical head's header lines, each after its "\r\n"
        self._headers: list[Header] | None = None

    @property
    def headers(self) -> list[Header]:
        headers = self._headers
        if headers is None:
            block = self._block
            # (canonical lines: the name has no colon, the value starts after ": ")
            headers = self._headers = [] if block == b"\r\n" else [
                (line[:colon], line[colon + 2:])
                for line in block[2:-2].split(b"\r\n") for colon in (line.index(b":"),)]
        return headers

    def __len__(self) -> int:
        return len(self.headers)

    def __iter__(self) -> Iterator[Header]:
        return iter(self.headers)

    @overload
    def __getitem__(self, index: int) -> Header: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[Header]: ...
    def __getitem__(self, index: int | slice) -> Header | Sequence[Header]:
        return self.headers[index]

    def client_headers(self) -> bytes:
        """The headers to pass to the client, as ``Name: value\\r\\n`` lines."""
        connection = self.connection
        listed = (_connection_tokens(connection)
                  if connection is not None and connection not in _PLAIN_CONNECTION else None)
        if not listed:
            return self.lines
        out = []  # Connection names more headers as hop-by-hop (rare): drop those too
        for name, value in self.headers:
            lower = name.lower()
            if lower in HIDDEN_RESPONSE_HEADERS or lower.startswith(b"x-accel-") or lower in listed:
                continue
            out.append(name + b": " + value + b"\r\n")
        return b"".join(out)


_PLAIN_CONNECTION = frozenset({b"keep-alive", b"close", b"Keep-Alive", b"Close"})


def _connection_tokens(connection: bytes) -> frozenset[bytes] | None:
    """Header names listed in Connection (hop-by-hop by declaration), lower-cased; None for
    the usual plain "keep-alive" / "close"."""
    if connection in _PLAIN_CONNECTION:
        return None
    tokens = {t.strip().lower() for t in connection.split(b",")}
    tokens.discard(b"close")
    tokens.discard(b"keep-alive")
    tokens.discard(b"")
    return frozenset(tokens) or None


def scan(data: bytes, status: int, close: bool, interim: bool, upgrade: bool) -> ResponseHead:
    """The head at the start of ``data`` (the response's bytes so far, llhttp-validated up to
    the end of the head; ``interim``: 1xx heads came first; ``upgrade``: a 101 is final)."""
    end = data.find(b"\r\n\r\n")
    first = data.find(b"\r\n")
    line = data[:first]
    if interim or end < 0 or b"\n" in line or (len(line) > 12 and line[12] != 32):
        return _reparsed(data, status, close, upgrade)
    block = data[first:end + 2]  # "\r\nName: value" ... "\r\n"
    if _ODD_LINE.search(block) is not None:
        return _reparsed(data, status, close, upgrade)
    response = ResponseHead(status, line[13:], close)
    response._block = block
    for name, value in _NOTABLE.findall(block):
        kind = _NOTABLE_KIND[name.lower()]
        if kind == _LENGTH:
            response.content_length = int(value)  # llhttp validated the digits and duplicates
        elif kind == _CONNECTION:
            connection = response.connection
            response.connection = value if connection is None else connection + b", " + value
        elif kind == _CHUNKED:
            response.chunked = True
        else:
            response.rewritable = True
    response.lines = _HIDDEN_LINE.sub(b"", block)[2:]
    if response.chunked:
        response.content_length = None
    return response


def _reparsed(data: bytes, status: int, close: bool, upgrade: bool) -> ResponseHead:
    """An unusual head, read by llhttp once more with a collecting callback per header."""
    collector = _Collector(upgrade)
    parser = collector.parser = httptools.HttpResponseParser(collector)
    parser.set_dangerous_leniencies(lenient_optional_cr_before_lf=True)
    try:
        parser.feed_data(data)
    except httptools.HttpParserError:
        pass  # (past the head: a body, or a new protocol after a 101; the head is collected)
    response = ResponseHead(status, collector.reason, close)
    response._headers = headers = collector.final or []
    lines = []
    for name, value in headers:
        lower = name.lower()
        kind = _NOTABLE_KIND.get(lower)
        if kind == _LENGTH:
            response.content_length = int(value)
        elif kind == _CONNECTION:
            connection = response.connection
            response.connection = value if connection is None else connection + b", " + value
        elif kind == _CHUNKED:
            response.chunked = True
        elif kind == _REWRITABLE:
            response.rewritable = True
        if lower not in HIDDEN_RESPONSE_HEADERS and not lower.startswith(b"x-accel-"):
            lines.append(name + b": " + value + b"\r\n")
    response.lines = b"".join(lines)
    if response.chunked:
        response.content_length = None
    return response


class _Collector:
    """The callbacks of ``_reparsed``'s parser: the headers of the first final head."""

    __slots__ = ("final", "headers", "parser", "reason", "upgrade")

    def __init__(self, upgrade: bool) -> None:
        self.upgrade = upgrade
        self.parser: httptools.HttpResponseParser | None = None
        self.headers: list[Header] = []
        self.final: list[Header] | None = None
        self.reason = b""

    def on_message_begin(self) -> None:
        if self.final is None:
            self.headers = []
            self.reason = b""

    def on_status(self, status: bytes) -> None:
        if self.final is None:
            self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        if value[-1:] in (b" ", b"\t"):
            value = value.rstrip(b" \t")
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        assert self.parser is not None
        status = self.parser.get_status_code()
        if self.final is None and (status >= 200 or (status == 101 and self.upgrade)):
            self.final = self.headers
