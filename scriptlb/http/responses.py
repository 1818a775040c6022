"""nginx's own responses, byte for byte: status lines, error pages and the Date header.

The pages are ngx_http_special_response.c's with ``server_tokens off`` (the tail names the
server without a version), "scriptlb" instead of "nginx". Status lines are
ngx_http_header_filter_module.c's reason phrases (nginx's, not RFC 9110's: "302 Moved
Temporarily", "503 Service Temporarily Unavailable"...). nginx always answers "HTTP/1.1".

Full error responses are prebuilt per (status, keep-alive, HEAD) and rebuilt at most once a
second when the Date changes, so the hot path is one dict lookup.
"""

from __future__ import annotations

import time
from email.utils import formatdate
from time import time as _wall_clock

SERVER_NAME = "scriptlb"

# ngx_http_status_lines; statuses nginx has no phrase for are written "HTTP/1.1 NNN "
REASONS: dict[int, str] = {
    100: "Continue",
    101: "Switching Protocols",
    200: "OK",
    201: "Created",
    202: "Accepted",
    204: "No Content",
    206: "Partial Content",
    301: "Moved Permanently",
    302: "Moved Temporarily",
    303: "See Other",
    304: "Not Modified",
    307: "Temporary Redirect",
    308: "Permanent Redirect",
    400: "Bad Request",
    401: "Unauthorized",
    402: "Payment Required",
    403: "Forbidden",
    404: "Not Found",
    405: "Not Allowed",
    406: "Not Acceptable",
    408: "Request Time-out",
    409: "Conflict",
    410: "Gone",
    411: "Length Required",
    412: "Precondition Failed",
    413: "Request Entity Too Large",
    414: "Request-URI Too Large",
    415: "Unsupported Media Type",
    416: "Requested Range Not Satisfiable",
    421: "Misdirected Request",
    429: "Too Many Requests",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Temporarily Unavailable",
    504: "Gateway Time-out",
    505: "HTTP Version Not Supported",
    507: "Insufficient Storage",
}

# nginx-internal codes sent on the wire as 400 Bad Request with their own page. nginx never
# sends 431: headers over large_client_header_buffers are its 494, so 431 is an alias of 494.
REQUEST_HEADER_TOO_LARGE = 494
_WIRE_STATUS = {431: 400, 494: 400, 495: 400, 496: 400, 497: 400}

# ngx_http_special_response_handler: these statuses end the keep-alive connection
# (494 too: nginx has not enabled keep-alive yet while it is still reading the header)
_CLOSING = frozenset({400, 408, 413, 414, 431, 494, 495, 496, 497, 500, 501})

# titles where the page differs from the status line, and pages with a second line
_PAGE_TITLES = {302: "302 Found", 401: "401 Authorization Required", 494: "400 Bad Request"}
_PAGE_DETAILS = {
    494: "Request Header Or Cookie Too Large",
    495: "The SSL certificate error",
    496: "No required SSL certificate was sent",
    497: "The plain HTTP request was sent to HTTPS port",
}
_PAGE_STATUSES = (
    *(301, 302, 303, 307, 308),
    *(400, 401, 402, 403, 404, 405, 406, 408, 409, 410, 411, 412, 413, 414, 415, 416, 421, 429),
    *(494, 495, 496, 497, 498),
    *(500, 501, 502, 503, 504, 505, 507),
)
_TAIL = f"<hr><center>{SERVER_NAME}</center>\r\n</body>\r\n</html>\r\n"


def _page(status: int) -> bytes:
    if status == 498:  # nginx: "canceled" reuses the 404 page
        return _page(404)
    if status in _PAGE_DETAILS:
        title = f"400 {_PAGE_DETAILS[status]}"
        heading = "400 Bad Request"
        detail = f"<center>{_PAGE_DETAILS[status]}</center>\r\n"
    else:
        heading = _PAGE_TITLES.get(status, f"{status} {REASONS[status]}")
        title = heading
        detail = ""
    return (
        f"<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n"
        f"<center><h1>{heading}</h1></center>\r\n{detail}{_TAIL}"
    ).encode("ascii")


ERROR_PAGES: dict[int, bytes] = {status: _page(status) for status in _PAGE_STATUSES}
ERROR_PAGES[431] = ERROR_PAGES[494]


def reason(status: int) -> str:
    """nginx's reason phrase, or "" for a status it has none for."""
    return REASONS.get(status, "")


def wire_status(status: int) -> int:
    """The status written on the wire (and logged as $status): 494 -> 400, ..."""
    return _WIRE_STATUS.get(status, status)


def status_line(status: int, reason: bytes | None = None) -> bytes:
    """b"HTTP/1.1 502 Bad Gateway\\r\\n" (nginx writes "HTTP/1.1 NNN " for unknown phrases).

    ``reason``: a proxied response's own phrase, which nginx passes through as the upstream
    wrote it ("HTTP/1.1 404 Nope"); our own responses use nginx's table.
    """
    if reason is not None:
        return b"HTTP/1.1 %d %s\r\n" % (status, reason)
    line = _STATUS_LINES.get(status)
    if line is None:
        wire = wire_status(status)
        line = f"HTTP/1.1 {wire} {REASONS.get(wire, '')}\r\n".encode("ascii")
        if len(_STATUS_LINES) < 1000:  # statuses are 3 digits: this bounds nothing real
            _STATUS_LINES[status] = line
    return line


_STATUS_LINES: dict[int, bytes] = {}  # status -> our status line, built once each


def peer_status_line(status: int, reason: bytes) -> bytes:
    """A proxied response's status line: nginx copies the peer's "code reason" as it came,
    so a peer's bare "HTTP/1.1 503" stays without a phrase (and without a trailing space)."""
    key = (status, reason)
    line = _PEER_STATUS_LINES.get(key)
    if line is None:
        line = b"HTTP/1.1 %d %s\r\n" % key if reason else b"HTTP/1.1 %d\r\n" % status
        if len(_PEER_STATUS_LINES) < _PEER_STATUS_LINES_MAX:  # peers choose the phrases: bounded
            _PEER_STATUS_LINES[key] = line
    return line


# (status, peer's phrase) -> status line: peers repeat the same few, built once each
_PEER_STATUS_LINES: dict[tuple[int, bytes], bytes] = {}
_PEER_STATUS_LINES_MAX = 256


def error_page(status: int) -> bytes | None:
    """nginx's built-in page for ``status``; None when nginx sends an empty body."""
    return ERROR_PAGES.get(status)


def closes_connection(status: int) -> bool:
    """Whether nginx drops keep-alive when it answers with this status itself."""
    return status in _CLOSING


# --------------------------------------------------------------------------- Date


class DateCache:
    """The RFC 7231 date of the current second (nginx's ngx_cached_http_time).

    A process-wide cache of a pure function of the clock, refreshed at most once a second;
    it also owns the per-second cache of full error responses, which embed the date.
    """

    __slots__ = ("head_starts", "head_starts_size", "header", "responses", "second", "since", "text", "until")

    def __init__(self) -> None:
        self.second = -1
        # the second's bounds as floats: head_start compares the clock with them
        self.since = -1.0
        self.until = -1.0
        self.text = ""
        self.header = b""
        self.responses: dict[tuple[int, bool, bool], bytes] = {}
        # status -> peer's phrase or None -> status line + Server + Date of this second (by
        # status first: no key tuple to build and hash per response); valid while the wall
        # clock is in [since, until), which a caller may test itself (see head_start)
        self.head_starts: dict[int, dict[bytes | None, bytes]] = {}
        self.head_starts_size = 0

    def refresh(self, now: float) -> None:
        second = int(now)
        if second != self.second:
            self.second = second
            self.since = float(second)
            self.until = second + 1.0
            self.text = formatdate(second, usegmt=True)
            self.header = f"Date: {self.text}\r\n".encode("ascii")
            self.responses.clear()
            self.head_starts.clear()
            self.head_starts_size = 0


# (public for the response writer's fast path: ClientConnection.send_head)
CLOCK = _CLOCK = DateCache()


def http_date(now: float | None = None) -> str:
    """ "Sun, 22 Nov 2026 10:00:00 GMT" for this second (or for ``now``, seconds since epoch)."""
    _CLOCK.refresh(time.time() if now is None else now)
    return _CLOCK.text


def date_header(now: float | None = None) -> bytes:
    """b"Date: Sun, 22 Nov 2026 10:00:00 GMT\\r\\n", cached per second."""
    _CLOCK.refresh(time.time() if now is None else now)
    return _CLOCK.header


def head_start(status: int, reason: bytes | None) -> bytes:
    """A response head's first lines: the status line (``reason``: None for nginx's phrase,
    else the peer's own, see peer_status_line), ``Server`` and this second's ``Date``; built
    once per second for each status (one call per response instead of three)."""
    clock = _CLOCK
    now = _wall_clock()
    if clock.since <= now < clock.until:
        try:
            return clock.head_starts[status][reason]
        except KeyError:
            pass
    else:
        clock.refresh(now)
    return _new_head_start(status, reason)


def _new_head_start(status: int, reason: bytes | None) -> bytes:
    """head_start's line for a status and phrase not seen this second, built and remembered."""
    clock = _CLOCK
    line = status_line(status) if reason is None else peer_status_line(status, reason)
    start = line + _SERVER_HEADER + clock.header
    if clock.head_starts_size < _PEER_STATUS_LINES_MAX:  # (peers choose the phrases: bounded)
        clock.head_starts.setdefault(status, {})[reason] = start
        clock.head_starts_size += 1
    return start


# --------------------------------------------------------------------------- full responses


_SERVER_HEADER = f"Server: {SERVER_NAME}\r\n".encode("ascii")
_CONNECTION = {True: b"Connection: keep-alive\r\n", False: b"Connection: close\r\n"}


def error_response(
    status: int,
    keep_alive: bool = True,
    head: bool = False,
    extra_headers: bytes = b"",
    now: float | None = None,
) -> bytes:
    """The complete response nginx sends for its own ``status`` (page, headers, status line).

    ``keep_alive`` is what the connection allows; statuses that end the connection force
    "Connection: close" (ask ``closes_connection``). ``head`` omits the body, not its length.
    ``extra_headers`` (e.g. b"Location: http://h/x/\\r\\n") go before Connection, as nginx
    orders them; responses with extra headers are built, not cached.
    """
    _CLOCK.refresh(time.time() if now is None else now)
    keep_alive = keep_alive and status not in _CLOSING
    if extra_headers:
        return _build(status, keep_alive, head, extra_headers)
    key = (status, keep_alive, head)
    response = _CLOCK.responses.get(key)
    if response is None:
        response = _CLOCK.responses[key] = _build(status, keep_alive, head, b"")
    return response


def _build(status: int, keep_alive: bool, head: bool, extra_headers: bytes) -> bytes:
    page = ERROR_PAGES.get(status)
    parts = [status_line(status), _SERVER_HEADER, _CLOCK.header]
    if page is not None:
        parts.append(b"Content-Type: text/html\r\n")
        parts.append(b"Content-Length: %d\r\n" % len(page))
    else:
        parts.append(b"Content-Length: 0\r\n")
    parts += (extra_headers, _CONNECTION[keep_alive], b"\r\n")
    if page is not None and not head:
        parts.append(page)
    return b"".join(parts)
