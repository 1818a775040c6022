"""A peer's response head: what the proxy acts on, noted as llhttp parses it, and the header
pairs themselves parsed again from the head's bytes only if something reads them.

Per header line the upstream parser's callback does as little as it can (a memo lookup by
the name as the peer spells it; nothing more for a hidden header such as Date or Server, one
``Name: value\r\n`` line for a passed one). The list of ``(name, value)`` pairs that
``$upstream_http_*``, hooks, proxy_pass_header and a few rare paths read is built only when
one of them asks: a ``ResponseHead`` is that sequence, parsed from the response's first bytes
by a second llhttp parser with a collecting callback (the same values, byte for byte).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import overload

import httptools

# Hop-by-hop headers (RFC 9110 7.6.1) plus the ones nginx never forwards from a client.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-connection",
    }
)
# proxy_hide_header's defaults (Date, Server, X-Pad, X-Accel-*) since we send our own, and the
# hop-by-hop ones
HIDDEN_RESPONSE_HEADERS = HOP_BY_HOP | {b"content-length", b"date", b"server", b"x-pad"}

# What a header line is to the proxy, by its name as the peer spells it (KINDS[name]):
# hidden (0: a false value, the usual case tested first), passed on untouched, or noted
# (ResponseHead.note) and then passed on (REWRITABLE) or hidden (the rest)
HIDDEN, PASSED, LENGTH, CONNECTION, CHUNKED, REWRITABLE, ACCEL_REDIRECT = range(7)
_KIND_BY_LOWER = {name: HIDDEN for name in HIDDEN_RESPONSE_HEADERS} | {
    b"content-length": LENGTH, b"transfer-encoding": CHUNKED, b"connection": CONNECTION,
    b"location": REWRITABLE, b"refresh": REWRITABLE, b"set-cookie": REWRITABLE,
    b"x-accel-redirect": ACCEL_REDIRECT}
_KIND_MEMO_SIZE = 512


class _Kinds(dict[bytes, int]):
    """The memo: the same few spellings come in every response (bounded: peers choose
    names); a name not seen yet is looked up by its lower case."""

    def __missing__(self, name: bytes) -> int:
        lower = name.lower()
        kind = _KIND_BY_LOWER.get(lower)
        if kind is None:
            kind = HIDDEN if lower[:8] == b"x-accel-" else PASSED
        if len(self) >= _KIND_MEMO_SIZE:
            self.clear()
        self[name] = kind
        return kind


KINDS = _Kinds()

Header = tuple[bytes, bytes]


class ResponseHead(Sequence[Header]):
    """The status line and headers of one upstream response; as a sequence, its header pairs
    as received (original case), parsed on first use."""

    # Class-level defaults, no __init__: a response sets only what it has (most set status,
    # close, lines and raw), and making one costs no Python frame. (No __slots__: then every
    # field would have to be written for each response.)
    status = 0
    # the peer's own phrase, passed to the client as nginx does (the parser sets it unless the
    # status line is the usual "HTTP/1.1 200 OK")
    reason = b"OK"
    close = False  # "Connection: close" or an HTTP/1.0 response without keep-alive
    content_length: int | None = None
    chunked = False
    connection: bytes | None = None  # the Connection header's value, unless a plain one
    # a Location, Refresh or Set-Cookie is among the lines (proxy_redirect / proxy_cookie_*
    # may have to edit them), or an X-Accel-Redirect came: other responses are not looked at
    # again
    rewritable = False
    lines = b""  # the headers passed to the client, as "Name: value\r\n" lines
    # the response's bytes up to the end of its head, maybe more (set by the parser, with
    # keep_raw when more is to be said)
    raw = b""
    upgraded = False  # a 101 is the final head (the client asked to switch)
    _headers: list[Header] | None = None

    def keep_raw(self, data: bytes, interim: bool, upgrade: bool) -> None:
        """The bytes the head came in (``interim``: 1xx heads came first; ``upgrade``: a 101
        is the final head), for ``headers``; and the reason phrase from them."""
        self.reason = _final_reason(data, upgrade) if interim else status_reason(data)
        if len(data) > RAW_KEPT and not interim:
            end = data.find(b"\r\n\r\n")  # (not the body too, while the response lasts)
            if end >= 0:
                data = data[:end + 4]
        self.raw = data
        self.upgraded = upgrade

    def remembered(self, head: bytes) -> ResponseHead:
        """This head's fields in a copy for every later response whose head is the same bytes
        ``head`` (the upstream memo): they all share it, and nobody changes it. Its ``raw`` is
        ``head`` alone (the pairs are the same; no body kept with it)."""
        # (field by field: reading __dict__ would turn the copy's attributes into a dict of
        # its own, slower to read than those of every other head)
        twin = ResponseHead()
        twin.status, twin.close, twin.lines, twin.content_length = (self.status, self.close, self.lines,
                                                                     self.content_length)
        twin.chunked, twin.connection, twin.rewritable, twin.reason = (self.chunked, self.connection,
                                                                       self.rewritable, self.reason)
        twin.raw = head
        return twin

    @property
    def headers(self) -> list[Header]:
        headers = self._headers
        if headers is None:
            headers = self._headers = _collected(self.raw, self.upgraded)
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

    def note(self, kind: int, value: bytes) -> None:
        """What a header the proxy acts on says (``kind``: see KINDS)."""
        if kind == LENGTH:
            self.content_length = int(value)  # llhttp validated the digits and duplicates
        elif kind == CONNECTION:
            connection = self.connection
            self.connection = value if connection is None else connection + b", " + value
        elif kind == CHUNKED:
            self.chunked = True
        else:  # (Location, Refresh, Set-Cookie; X-Accel-Redirect: hidden)
            self.rewritable = True

    def client_headers(self) -> bytes:
        """The headers to pass to the client, as ``Name: value\\r\\n`` lines."""
        connection = self.connection
        listed = (_connection_tokens(connection)
                  if connection is not None and connection not in PLAIN_CONNECTION else None)
        if not listed:
            return self.lines
        out = []  # Connection names more headers as hop-by-hop (rare): drop those too
        for name, value in self.headers:
            lower = name.lower()
            if lower in HIDDEN_RESPONSE_HEADERS or lower.startswith(b"x-accel-") or lower in listed:
                continue
            out.append(name + b": " + value + b"\r\n")
        return b"".join(out)


# a first read longer than this is cut to its head when kept (most heads and small bodies
# come in one read: no copy for them)
RAW_KEPT = 4096


PLAIN_CONNECTION = frozenset({b"keep-alive", b"close", b"Keep-Alive", b"Close"})


def _connection_tokens(connection: bytes) -> frozenset[bytes] | None:
    """Header names listed in Connection (hop-by-hop by declaration), lower-cased; None for
    the usual plain "keep-alive" / "close"."""
    if connection in PLAIN_CONNECTION:
        return None
    tokens = {t.strip().lower() for t in connection.split(b",")}
    tokens.discard(b"close")
    tokens.discard(b"keep-alive")
    tokens.discard(b"")
    return frozenset(tokens) or None


def status_reason(head: bytes) -> bytes:
    """The reason phrase of the status line ``head`` starts with, as llhttp read it: the
    parser accepted the line, so it is empty lines (skipped), a version without blanks, one
    space, three digits, then a space and the phrase, or the end of the line (CR LF, or a
    bare LF)."""
    head = head.lstrip(b"\r\n")
    line = head[:head.find(b"\n")]
    if line[-1:] == b"\r":
        line = line[:-1]
    return line[line.find(b" ") + 5:]


def _final_reason(data: bytes, upgrade: bool) -> bytes:
    """The reason phrase of the final head in ``data``, after 1xx ones."""
    return _collector(data, upgrade).final_reason


def _collected(data: bytes, upgrade: bool) -> list[Header]:
    """The header pairs of the final head in ``data``, as the upstream parser saw them."""
    return _collector(data, upgrade).final or []


def _collector(data: bytes, upgrade: bool) -> _Collector:
    """``data`` parsed again, its heads collected."""
    collector = _Collector(upgrade)
    parser = collector.parser = httptools.HttpResponseParser(collector)
    parser.set_dangerous_leniencies(lenient_optional_cr_before_lf=True)
    try:
        parser.feed_data(data)
    except (httptools.HttpParserError, httptools.HttpParserUpgrade):
        pass  # (past the head: a body, or a new protocol after a 101; the head is collected)
    return collector


class _Collector:
    """The callbacks of ``_reparsed``'s parser: the headers of the first final head."""

    __slots__ = ("final", "final_reason", "headers", "parser", "reason", "upgrade")

    def __init__(self, upgrade: bool) -> None:
        self.upgrade = upgrade
        self.parser: httptools.HttpResponseParser | None = None
        self.headers: list[Header] = []
        self.final: list[Header] | None = None
        self.reason = b""
        self.final_reason = b""

    def on_message_begin(self) -> None:
        if self.final is None:
            self.headers = []
            self.reason = b""

    def on_status(self, status: bytes) -> None:
        if self.final is None:
            self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.final is None:
            self.headers.append((name, value.rstrip(b" \t")))

    def on_headers_complete(self) -> None:
        assert self.parser is not None
        status = self.parser.get_status_code()
        if self.final is None and (not 100 <= status < 200 or (status == 101 and self.upgrade)):
            self.final = self.headers
            self.final_reason = self.reason
