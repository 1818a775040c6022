"""Client-side HTTP/1.x connection: parse requests, write responses, keep-alive, pipelining.

Theory of operation
-------------------
``ClientConnection`` is an ``asyncio.Protocol`` that owns one client socket. httptools parses
every byte we read; the parser callbacks only build a ``Request`` (head + body chunks) and hand it
to a *handler* (the proxy's ``Exchange``) created by ``ListenerContext.open_exchange``. Routing,
peers, retries and status decisions all live in the handler, never here.

One request is *active* at a time. Requests that arrive pipelined behind it are parsed ahead into
``_queue`` (their bodies buffered in their own ``Request``) and reading is paused, so a client can
not make us parse unbounded input. Responses are therefore written strictly in request order.

What this module does decide is the client side of HTTP: framing of the response (Content-Length,
chunked for HTTP/1.1, close-delimited for HTTP/1.0), keep-alive, and the nginx client errors
(400/413/414 written here, then the connection is closed; client_header_timeout and
client_body_timeout close without a response, as nginx: the request is logged 408).

Timers: one ``TimerHandle`` per connection, re-armed lazily. ``_deadline`` and ``_phase`` say
what is being waited for (a new request, the rest of the head, more body, the client draining
our writes); the handle fires, compares with the deadline and either re-arms or times out.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import Callable
from time import time as _wall_clock
from typing import Any, Protocol, cast

import httptools

from scriptlb.config.model import ClientBodyConf, ListenKey
from scriptlb.http import responses
from scriptlb.http.line_ends import REWRITE_MAX as _REWRITE_MAX
from scriptlb.http.line_ends import crlf_head_part
from scriptlb.http.request_body import EMPTY_BODY, BodyFileError, RequestBody
from scriptlb.http.responses import CLOCK as _CLOCK
from scriptlb.http.responses import head_start
from scriptlb.logs import errorlog

# nginx's send_timeout default: how long a client may leave our writes unread before we give up.
CLIENT_SEND_TIMEOUT = 60.0
# Statuses that never carry a body (RFC 9110 6.4.1).
_NO_BODY_STATUS = frozenset({101, 204, 304})
# the statuses send_head does not frame as the usual response: those, and every other below 200
_UNUSUAL_BODY_STATUS = _NO_BODY_STATUS | frozenset(range(200))

_conn_ids = itertools.count(1)

# Header names nginx accepts (ignore_invalid_headers): letters, digits, "-" (and "_" with
# underscores_in_headers on). llhttp already refuses what is not an RFC 9110 token.
_NAME_CHARS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-"
_NAME_CHARS_UNDERSCORE = _NAME_CHARS + b"_"
# names found valid -> what on_header does with them (see _NOTED_NAMES), so that a name a
# client repeats costs one dict lookup (bounded: clients choose names)
_HEADER_NAMES: dict[bytes, bytes] = {}
_HEADER_NAMES_MAX = 4096
_VALID_NAME_LENGTH_MAX = 64

# nginx's lingering close: after the last response, read and drop what the client still sends
# (so that its unread bytes do not make the kernel reset the connection under the response)
LINGERING_TIME = 30.0
LINGERING_TIMEOUT = 5.0

# what the parser callbacks saw during one feed (ClientConnection._fed)
_FED_BODY = 1  # body bytes
_FED_CHUNK = 2  # a chunk boundary

# request headers nginx allows once (ngx_http_process_unique_header_line: a second one is a 400)
_UNIQUE_HEADERS = frozenset((
    b"if-modified-since", b"if-unmodified-since", b"if-match", b"if-none-match", b"content-length",
    b"content-range", b"if-range", b"transfer-encoding", b"expect", b"authorization",
    b"proxy-authorization",
))
_HOST = b"host"
# the request headers the client connection acts on, lower case (each name maps to itself:
# on_header tells them apart by identity); every other name is stored without being looked at
_NOTED_NAMES = {name: name for name in (_HOST, b"expect", b"connection", *_UNIQUE_HEADERS)}


def _check_transfer_encoding(headers: list[tuple[bytes, bytes]]) -> None:
    """nginx implements only "chunked" and answers 501 to anything else."""
    value = next(v for n, v in headers if len(n) == 17 and n.lower() == b"transfer-encoding")
    if value.lower() != b"chunked":
        shown = value.decode("latin-1")
        raise ClientError(501, f'client sent unknown "Transfer-Encoding": "{shown}" '
                               "while reading client request headers")


def _refuse_duplicate(headers: list[tuple[bytes, bytes]], lower: bytes) -> None:
    """A unique header's second line (the last one in ``headers``): nginx's 400."""
    name, value = headers[-1]
    for earlier, earlier_value in headers[:-1]:
        if len(earlier) == len(lower) and earlier.lower() == lower:
            text = (name + b": " + value).decode("latin-1")
            previous = (earlier + b": " + earlier_value).decode("latin-1")
            raise ClientError(400, f'client sent duplicate header line: "{text}", previous value: '
                                   f'"{previous}" while reading client request headers')


def _noted_header(request: Request, lower: bytes, value: bytes) -> None:
    """A header line the client connection acts on (``lower``: its name lower-cased, one of
    _NOTED_NAMES), already stored in ``request.headers``."""
    if lower is _HOST:
        if request.host is not None:
            raise ClientError(400, "client sent duplicate host header while reading client request headers")
        request.host = value
    elif lower == b"content-length":
        _refuse_duplicate(request.headers, lower)
        request.content_length = _content_length(value)
    elif lower == b"transfer-encoding":
        _refuse_duplicate(request.headers, lower)
        request.chunked = True  # (its value is checked once the head is read, as nginx)
    elif lower == b"expect":
        _refuse_duplicate(request.headers, lower)
        request.expect_continue = value.lower() == b"100-continue"
    elif lower == b"connection":
        request.connection = value if request.connection is None else request.connection + b"," + value
    elif lower in _UNIQUE_HEADERS:  # (the If-*, Authorization...)
        _refuse_duplicate(request.headers, lower)


def _has_bare_lf(data: bytes) -> bool:
    """Whether a read has an LF that is not part of a CRLF (rare): one left once every CRLF is
    overwritten (one fast call on a read of usual size; a large one is counted instead of
    copied). Overwritten with two bytes rather than removed: a replacement of the same length
    is made in one pass, where a removal counts the CRLFs first."""
    if len(data) <= _REWRITE_MAX:
        return 10 in data.replace(b"\r\n", b"\r\r")
    return data.count(b"\n") != data.count(b"\r\n")


def _count_ignored(request: Request, line: int) -> None:
    """A header line counted against the limits but not kept (see Request.head_size)."""
    request.ignored_size = getattr(request, "ignored_size", 0) + line


def next_connection_id() -> int:
    """nginx's connection counter ($connection, the ``*N`` in error-log lines)."""
    return next(_conn_ids)




# the usual methods, as llhttp gives them -> the same str each time (no decoding per request)
_METHODS = {method.encode("ascii"): method
            for method in ("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH")}

# Content-Length -> its header line, built once each (bounded: lengths are the peers' choice)
_LENGTH_LINES: dict[int, bytes] = {}
_LENGTH_LINES_MAX = 1024


def _length_line(content_length: int) -> bytes:
    """A Content-Length line not in _LENGTH_LINES yet, built and remembered."""
    line = b"Content-Length: %d\r\n" % content_length
    if len(_LENGTH_LINES) >= _LENGTH_LINES_MAX:
        _LENGTH_LINES.clear()
    _LENGTH_LINES[content_length] = line
    return line


# the last line of a response head, as keep-alive has it
_KEEP_ALIVE_END = b"Connection: keep-alive\r\n\r\n"
_CLOSE_END = b"Connection: close\r\n\r\n"

# Content-Length -> its line and the head's last line, one dict for each Connection value
# (send_head's usual response: one lookup; bounded as _LENGTH_LINES)
_KEEP_ALIVE_TAILS: dict[int, bytes] = {}
_CLOSE_TAILS: dict[int, bytes] = {}


def _length_tail(tails: dict[int, bytes], content_length: int) -> bytes:
    """A head's Content-Length and Connection lines not in ``tails`` yet, built and remembered."""
    end = _KEEP_ALIVE_END if tails is _KEEP_ALIVE_TAILS else _CLOSE_END
    tail = (_LENGTH_LINES.get(content_length) or _length_line(content_length)) + end
    if len(tails) >= _LENGTH_LINES_MAX:
        tails.clear()
    tails[content_length] = tail
    return tail

# How the active response's body goes out (ClientConnection._body_framing; bits)
_AS_IS = 0  # as it comes: a Content-Length, or until the connection closes
_CHUNKED = 1  # in chunks (also set for a 1xx head of unknown length, which has no body)
_NO_BODY = 2  # none (HEAD, 1xx, 204, 304): what is sent as its body is dropped

# How a request ends, as the exchange's one finish (Exchange.finish) takes it: what becomes
# of the client connection after the log phase.
SENT = 0  # our response went out whole: end its body, then serve the connection's next request
UNSENT = 1  # no complete response of ours (client gone, a tunnel's end, a rejected head): log only
DROPPED = 2  # drop the connection (444, a response the peer cut short, a bug)


# --------------------------------------------------------------------------- the request


class Request:
    """One parsed request head plus its body as received so far (decoded: the proxy frames it
    again; a chunked body's trailers are dropped)."""

    __slots__ = (
        "body",
        "body_size",
        "chunked",
        "complete",
        "connection",
        "content_length",
        "expect_continue",
        "has_body",
        "headers",
        "host",
        "ignored_size",
        "keep_alive",
        "method",
        "target",
        "version",
    )

    def __init__(self) -> None:
        self.method = ""
        self.target = b""  # raw request target, as sent
        self.version = "1.1"
        self.headers: list[tuple[bytes, bytes]] = []
        self.host: bytes | None = None
        self.content_length: int | None = None
        self.chunked = False
        self.has_body = False  # chunked, or a Content-Length above 0
        self.connection: bytes | None = None  # the Connection header (it may list hop-by-hop names)
        self.expect_continue = False
        # what arrived and was not taken by the handler (memory, then a file: request_body)
        self.body: RequestBody = EMPTY_BODY
        self.body_size = 0  # bytes received so far (decoded, without chunk framing)
        self.complete = False

    # Left unset in the usual request (read with getattr, by the paths of the unusual one):
    # bytes of the header lines counted but not kept (ignored invalid lines, the one over a
    # limit), and whether the connection may stay open after it (set when its head is checked:
    # False for HTTP/1.0 without keep-alive, "Connection: close"...).
    ignored_size: int
    keep_alive: bool

    @property
    def head_size(self) -> int:
        """The header lines' bytes as the limits count them (name, value, ": " and CRLF each),
        for $request_length: summed when read rather than line by line while parsing."""
        headers = self.headers
        return (sum([len(name) + len(value) for name, value in headers]) + 4 * len(headers)
                + getattr(self, "ignored_size", 0))

    def take_body(self) -> bytes:
        """Everything received and held in memory so far, joined; the buffer is emptied."""
        return self.body.take()

    def request_line(self) -> str:
        """``GET / HTTP/1.1``: nginx's $request."""
        return f"{self.method} {self.target.decode('latin-1')} HTTP/{self.version}"


class RequestHandler(Protocol):
    """What the connection needs from whoever serves a request (the proxy's Exchange)."""

    max_body_size: int  # 0 = unlimited
    body_timeout: float
    keepalive_timeout: float
    keepalive_requests: int

    @property
    def client_body(self) -> ClientBodyConf | None:
        """Where the body waits for the handler: None = in memory (streamed as it comes, or dropped)."""

    def start(self) -> None: ...  # the request became the active one
    # new chunks in request.body, or request.complete (only for a request with a body: one
    # without is whole when start() runs)
    def body_received(self) -> None: ...
    def client_lost(self) -> None: ...  # the client went away before the response finished
    def client_eof(self) -> bool: ...  # the client half-closed after its request; True: ended it
    def abort(self, status: int) -> None: ...  # a client error (413, 408) ends the request
    def writing_paused(self) -> None: ...  # the client reads slower than we write
    def writing_resumed(self) -> None: ...


class OpenExchange(Protocol):
    def __call__(self, conn: ClientConnection, request: Request) -> RequestHandler: ...


class ListenerContext:
    """Per-listener, per-worker settings shared by its connections."""

    def __init__(
        self,
        open_exchange: OpenExchange,
        header_timeout: float = 60.0,
        header_buffers: tuple[int, int] = (4, 8192),
        max_headers: int = 1000,
        keys: tuple[ListenKey, ...] = (),
        connections: set[ClientConnection] | None = None,
        max_connections: int = 0,
        underscores_in_headers: bool = False,
        ignore_invalid_headers: bool = True,
        reusable: dict[ClientConnection, None] | None = None,
    ) -> None:
        self.open_exchange = open_exchange
        self.keys = keys  # the listen keys this socket serves (routing is the handler's business)
        # the worker's client connections (shared by its listeners) and worker_connections
        self.connections: set[ClientConnection] = connections if connections is not None else set()
        self.max_connections = max_connections  # 0: no limit
        # the worker's connections that may be closed to make room (nginx's reusable queue):
        # waiting for their first byte or idle between keep-alive requests, oldest first
        self.reusable: dict[ClientConnection, None] = reusable if reusable is not None else {}
        # the default server's values: the Host (hence the server) is unknown while reading a head
        self.header_timeout = header_timeout
        self.header_buffers = header_buffers
        self.max_headers = max_headers
        self.underscores_in_headers = underscores_in_headers
        self.ignore_invalid_headers = ignore_invalid_headers
        self.proxy_protocol = False  # listen ... proxy_protocol
        self.shutting_down = False  # graceful stop: finish the active request, then close
        self.dropped = 0  # connections closed at once for want of worker_connections
        # called after we answered a request no handler saw (malformed, 414, 494...), for logs
        self.on_client_error: Callable[[ClientConnection, Request, int], None] | None = None


def refuse_requests(conn: Any, refusal: tuple[int, str]) -> None:
    """Every request on ``conn`` is to be answered with ``refusal`` (status, error-log text):
    what the TLS layer found before HTTP began (see Exchange)."""
    conn.refusal = refusal


class _NoCallbacks:
    """The protocol of the parser a closed connection keeps (its own one is released)."""


_CLOSED_PARSER = httptools.HttpRequestParser(_NoCallbacks())


# nginx closes this many reusable connections at most when it runs short (ngx_drain_connections)
_DRAIN_MAX = 32
_reuse_logged = [0.0]  # when "reusing connections" was last logged (once a second, as nginx)


def make_room(listener: ListenerContext) -> bool:
    """May one more connection be accepted? When fewer than 1/16 of worker_connections are
    free, close the oldest reusable ones (waiting for a first byte, or idle between keep-alive
    requests) as nginx does: an eighth of them, between 1 and 32."""
    limit = listener.max_connections
    connections = listener.connections
    reusable = listener.reusable
    if limit - len(connections) > limit // 16 or not reusable:
        return len(connections) < limit
    now = time.monotonic()
    if int(now) != int(_reuse_logged[0]):
        _reuse_logged[0] = now
        errorlog.log_error("warn", f"{limit} worker_connections are not enough, reusing connections")
    for _ in range(max(min(_DRAIN_MAX, len(reusable) // 8), 1)):
        oldest = next(iter(reusable))
        connections.discard(oldest)  # its slot is free now (its connection_lost comes later)
        oldest.close()
    return len(connections) < limit


class ClientError(Exception):
    """A client mistake that ends the connection with an nginx status and an info-level log."""

    def __init__(self, status: int, message: str, level: str = "info") -> None:
        super().__init__(message)
        self.status = status
        self.level = level  # of the error-log line


_TIMED_OUT = "client timed out (110: Connection timed out)"

_NO_QUEUE: tuple[()] = ()  # ClientConnection._queue when nothing is queued


class _ParsingEnded(Exception):
    """Raised by a parser callback to stop parsing: nothing after a request without
    keep-alive is read (nginx does not look past it)."""

# timer phases (in this order: _activate ends those before _SEND with one comparison)
_IDLE, _HEAD, _BODY, _SEND, _NONE = range(5)

# What the head being parsed still needs checked (ClientConnection._head_checks, set by each
# read for the heads that begin in it). A head that begins and ends in one small read can
# outgrow no limit (see _unchecked_max): its lines are only stored, and when nothing unusual
# came with it, its end is not checked either.
_NO_CHECKS = 0  # the usual head so far
_AT_END = 1  # its end: an unusual method, or a header the connection acts on (framing...)
_EVERY_LINE = 2  # every line measured, and the end: a head read in pieces, or from a large
# read; also a chunked body's trailers (dropped)
_PHASE_TEXT = {
    _IDLE: "",
    _HEAD: "while reading client request headers",
    _BODY: "while reading client request body",
    _SEND: "while sending response to client",
}


class ClientConnection(asyncio.Protocol):
    """One client socket: parses requests, hands each to a handler, writes its response."""

    # __slots__: an idle keep-alive connection is mostly this object, and there may be many
    __slots__ = (
        "_activating",
        "_active_request",
        "_body_for",
        "_body_framing",
        "_deadline",
        "_eof",
        "_fed",
        "_framing_bytes",
        "_head_checks",
        "_head_done",
        "_head_max",
        "_head_size",
        "_header_line_max",
        "_keep_alive",
        "_last_data",
        "_last_keepalive_timeout",
        "_last_request",
        "_line_bytes",
        "_linger_until",
        "_parser",
        "_parsing",
        "_parsing_handler",
        "_pending_error",
        "_pending_head",
        "_phase",
        "_pp_pending",
        "_queue",
        "_reading_paused",
        "_reusable",
        "_timer",
        "_timer_when",
        "_trailers",
        "_unchecked_max",
        "_unusual",
        "_upgrade_early",
        "_writing_paused",
        "active",
        "body_bytes_sent",
        "bytes_sent",
        "closed",
        "conn_id",
        "host_cache",
        "listener",
        "loop",
        "opened",
        "proxy_protocol",
        "refusal",
        "remote_addr",
        "remote_port",
        "requests",
        "response_started",
        "route",
        "sent_head",
        "server_addr",
        "server_port",
        "tls",
        "transport",
    )

    def __init__(self, listener: ListenerContext, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.listener = listener
        self._reusable = listener.reusable  # (the hot path's use of it, one lookup nearer)
        self.loop = loop or asyncio.get_running_loop()
        self.conn_id = next_connection_id()
        self.transport: asyncio.Transport | None = None
        self.remote_addr = ""
        self.remote_port = 0
        self.server_addr = ""
        self.server_port = 0
        # listen ... proxy_protocol: the header read first (bytes so far; None once read or
        # when the listener has none), then what it announced ($proxy_protocol_addr & co)
        self._pp_pending: bytes | None = b"" if listener.proxy_protocol else None
        self.proxy_protocol: Any = None
        self._parser = httptools.HttpRequestParser(self)
        # Keep-alive is decided once per request, from its head: llhttp would otherwise also
        # obey a "Connection: close" trailer and refuse the next pipelined request.
        self._parser.set_dangerous_leniencies(lenient_keep_alive=True)
        number, size = listener.header_buffers  # large_client_header_buffers
        self._header_line_max = size
        self._head_max = number * size
        # The largest read in which a head that begins there cannot outgrow a limit (its lines
        # are then not measured one by one): no line over large_client_header_buffers' size
        # (a line counts at most one byte more than it takes: ": " for ":"), no head over their
        # total (a line counts at most twice what it takes), no more lines than max_headers
        # (a kept line takes 4 bytes at least).
        self._unchecked_max = min(size - 1, self._head_max // 2, 4 * listener.max_headers)
        self.closed = False
        # The request layer's per-connection caches, opaque here (this layer cannot name their
        # types): its runtime.ServerRoute, and (raw Host, normalized host, the ServerRuntime
        # it selected)
        self.route: Any = None
        self.host_cache: tuple[bytes | None, str | None, Any] | None = None
        self.requests = 0  # requests started on this connection ($connection_requests)
        self.opened = self.loop.time()  # ($connection_time)
        self.tls: Any = None  # the ssl.SSLObject of a TLS connection
        # (status, error-log text) every request on this connection is answered with: plain
        # HTTP on a TLS port (497), a client certificate ssl_verify_client refuses (495, 496)
        self.refusal: tuple[int, str] | None = None

        # timers
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when = 0.0
        self._deadline = 0.0
        self._phase = _NONE

        # flow control
        self._reading_paused = False
        self._writing_paused = False

        # per-request state: the request being parsed, the active one and those queued behind it
        self._parsing: Request | None = None
        self._parsing_handler: RequestHandler | None = None
        self._head_done = False  # the request being parsed is past its head (errors: body)
        # what its head still needs checked (_NO_CHECKS...): set by each read for the heads
        # that begin in it
        self._head_checks = _NO_CHECKS
        self._head_size = 0  # its header lines' bytes so far, when measured (_EVERY_LINE)
        self._last_data = b""  # the last bytes read while a head is incomplete (timeout logs)
        # Limits on what httptools accumulates itself (a header line, a trailer) before any of
        # our callbacks sees it: counted from the bytes read, checked before and after a feed.
        self._line_bytes = 0  # bytes of the head's incomplete last line
        self._framing_bytes = 0  # chunked body: bytes since the last chunk boundary or body byte
        self._fed = 0  # _FED_* flags of the feed in progress
        self._body_for: Any = None  # the handler that got body bytes in the feed in progress
        self._trailers: Callable[[], bytes] | None = None  # (see trailers)
        # 1: a request without keep-alive was parsed (nothing after it is read), 2: more came
        self._last_request = 0
        self._linger_until = 0.0  # lingering close: its deadline (0: not lingering)
        self.active: RequestHandler | None = None
        self._active_request: Request | None = None
        # requests parsed ahead (pipelining): a deque only once one waits (an empty deque
        # costs ~600 bytes per connection; most clients never pipeline)
        self._queue: deque[tuple[Request, RequestHandler]] | tuple[()] = _NO_QUEUE
        self._pending_error: ClientError | None = None  # raised while a request was in flight
        self._eof = False  # the client half-closed: answer what it sent, then close
        self._activating = False  # finish_response is serving the queue (no recursion)
        self._last_keepalive_timeout = 75.0
        self._upgrade_early = b""  # bytes after an Upgrade request's head (see data_received)
        # Something other than one request at a time on an open connection that reads happened
        # (a pipelined request, a half-close, paused reading, a pending error, a last request,
        # a close, add_trailer's trailers; it stays set): the per-request paths then check what
        # they skip for the usual connection.
        self._unusual = False

        # response state of the active request
        self._keep_alive = False
        self._body_framing = _AS_IS
        self.response_started = False
        self.bytes_sent = 0
        self.body_bytes_sent = 0
        self._pending_head = b""  # a response head not written yet (see send_head)
        self.sent_head = b""  # the active response's head as written, for the log phase

    # ------------------------------------------------------------------ asyncio callbacks

    def connection_made(self, base: asyncio.BaseTransport) -> None:
        # a connection's transport: asyncio's, or uvloop's (which does not subclass Transport)
        self.transport = transport = cast(asyncio.Transport, base)
        self.tls = transport.get_extra_info("ssl_object")  # None: plain TCP ($https, $ssl_*)
        peer = transport.get_extra_info("peername")
        sock = transport.get_extra_info("sockname")
        if isinstance(peer, tuple):
            self.remote_addr, self.remote_port = peer[0], peer[1]
        else:  # unix socket
            self.remote_addr = "unix:"
        if isinstance(sock, tuple):
            self.server_addr, self.server_port = sock[0], sock[1]
        listener = self.listener
        if listener.max_connections and not make_room(listener):
            # nginx drops the connection it cannot take and says why
            errorlog.log_error("alert", f"{listener.max_connections} worker_connections are not enough")
            listener.dropped += 1  # accepted but not handled (stub_status's "handled")
            self.closed = self._unusual = True
            transport.abort()
            return
        listener.connections.add(self)
        listener.reusable[self] = None  # until its first byte: may be closed to make room
        self._arm(_HEAD, self.listener.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = self._unusual = True
        listener = self.listener
        listener.connections.discard(self)
        listener.reusable.pop(self, None)
        self._cancel_timer()
        active, self.active = self.active, None
        if active is not None:
            active.client_lost()
        for request, _handler in self._queue:
            request.body.close()
        self._queue = _NO_QUEUE
        self._release()

    def _release(self) -> None:
        """Break the references that make a closed connection a cycle (parser <-> protocol,
        connection <-> exchange, transport <-> protocol), so that its memory (a large request,
        a parser's buffers) is freed now rather than by the cyclic garbage collector."""
        for request in (self._active_request, self._parsing):
            if request is not None:
                request.body.close()
        self._parser = _CLOSED_PARSER
        self._parsing = None
        self._parsing_handler = None
        self._active_request = None
        self.transport = None
        self._last_data = b""

    def data_received(self, data: bytes) -> None:
        if self._unusual and self._not_parsed():
            return
        self._reusable.pop(self, None)  # a connection that reads is no longer idle
        parsing = self._parsing
        try:
            if parsing is None:  # the usual read: a request (or more), between requests
                size = len(data)
                # (_has_bare_lf, inlined: once per request)
                if (10 in data.replace(b"\r\n", b"\r\r") if size <= _REWRITE_MAX
                        else data.count(b"\n") != data.count(b"\r\n")):
                    data = self._with_crlf(data, parsing)
                    if not data:
                        return  # (fed as two reads)
                    size = len(data)
                if size > self._unchecked_max:  # (no line is in progress between requests)
                    self._large_read(data, size)
                else:
                    self._head_checks = _NO_CHECKS
            elif not self._head_done:
                data = self._head_read(data, parsing)
                if not data:
                    return  # (fed as two reads)
            else:
                self._head_checks = _EVERY_LINE  # (a body's read: a head after it is measured)
            self._fed = 0
            try:
                self._parser.feed_data(data)
            except (httptools.HttpParserError, httptools.HttpParserUpgrade) as stop:
                # (an Upgrade request's head, a client error a callback raised, bad bytes)
                self._feed_stopped(stop, data)
            # (the usual read: whole requests. A read that begins between requests finds no
            # line in progress nor a head's last bytes kept: there is nothing to reset)
            if self._parsing is not None or parsing is not None:
                self._fed_partly(data, parsing)
        except ClientError as err:
            self._client_error(err)
        except MemoryError:
            self._out_of_memory()

    def _head_read(self, data: bytes, parsing: Request) -> bytes:
        """data_received's part for a read that continues a head (measured line by line: it
        keeps _EVERY_LINE, and so do the heads after it in the read)."""
        if _has_bare_lf(data):
            data = self._with_crlf(data, parsing)
            if not data:
                return b""
        size = len(data)
        if size > self._unchecked_max or self._line_bytes:
            self._large_read(data, size)
        return data

    def _not_parsed(self) -> bool:
        """Whether a read is dropped: during a lingering close, or once we stopped parsing this
        connection (an error is answered in order, or a request without keep-alive came)."""
        if self._linger_until:
            self._lingering_data()
            return True
        if self._pending_error is not None or self._last_request:
            self._last_request += self._last_request == 1
            return True
        return False

    def _with_crlf(self, data: bytes, parsing: Request | None) -> bytes:
        """A read whose head has bare LFs, rewritten; b"" when a body came with the head: then
        both were handled as reads of their own, the body as it came (one copy, instead of
        joining it to the rewritten head)."""
        fixed, end = crlf_head_part(data, self._last_data if parsing is not None else b"")
        if end < len(data):
            self.data_received(fixed)
            self.data_received(data[end:])
            return b""
        return fixed

    def _fed_partly(self, data: bytes, parsing: Request | None) -> None:
        """After a feed that ended inside a request (its head, or its body)."""
        if self._parsing is not parsing and self._parsing is not None and not self._head_done \
                and self.active is None and not self.closed:
            # a head begun by this read: client_header_timeout runs from now (when a request
            # is being served, its end arms it; a head that comes whole arms nothing)
            self._arm(_HEAD, self.listener.header_timeout)
        # (a body read in this feed and not ended by it: its handler is told now)
        body_for = self._body_for
        if body_for is not None:
            self._body_for = None
            active = self.active
            if active is body_for and active is not None:
                active.body_received()
        self._check_partial_line(data)
        # a head still arriving keeps a reference to its last bytes (the timeout log's wording,
        # see _line_received); any other connection holds none
        self._last_data = data if self._parsing is not None and not self._head_done else b""

    def eof_received(self) -> bool | None:
        # A half-closed client may still read our answer to what it already sent (not over
        # TLS: the TLS layer closes the connection whatever we answer, and warns if we say True)
        self._eof = True
        self._unusual = True
        if self._linger_until:
            self._end_lingering()  # the client closed its side: the lingering close is over
            return True
        active = self.active
        if active is None and not self._queue:
            self.close()
        elif active is not None and self._active_request is not None and self._active_request.complete \
                and active.client_eof():
            # (an incomplete request is the body reader's business: "client prematurely closed")
            return None  # the handler ended the request and this connection (nginx's 499)
        return None if self.tls is not None else True

    def pause_writing(self) -> None:
        self._writing_paused = True
        if self.active is not None:
            self.active.writing_paused()
        self._arm(_SEND, CLIENT_SEND_TIMEOUT)

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._phase == _SEND:
            self._phase = _NONE
        if self.active is not None:
            self.active.writing_resumed()

    # ------------------------------------------------------------------ parsing

    def _large_read(self, data: bytes, size: int) -> None:
        """Before feeding a read larger than _unchecked_max, or one that continues a line (of
        a head measured already): the heads in it are measured line by line."""
        self._head_checks = _EVERY_LINE
        if self._line_bytes or size > self._header_line_max:
            self._check_line_start(data)

    def _check_line_start(self, data: bytes) -> None:
        """Before a feed: the line in progress must not outgrow large_client_header_buffers
        (httptools would keep adding to its copy of it)."""
        line_end = data.find(b"\n")
        if self._line_bytes + (len(data) if line_end == -1 else line_end) > self._header_line_max:
            raise self._too_long_line()

    def _check_partial_line(self, data: bytes) -> None:
        """After a feed: remember how long the head's (or chunked body's) unfinished part is,
        and refuse what no limit would otherwise stop: an endless line, a trailer."""
        request = self._parsing
        if request is None:
            self._line_bytes = 0
            return
        if not self._head_done:
            if self._head_checks != _EVERY_LINE:
                # the rest of this head comes in other reads: from now on each line is measured
                self._head_checks = _EVERY_LINE
                self._head_size = request.head_size
            if self._fed & _FED_BODY:
                # this head began after a body in the same read: its first bytes are not
                # counted (at most one read: still bounded)
                self._line_bytes = 0
                return
            line_end = data.rfind(b"\n")
            self._line_bytes = self._line_bytes + len(data) if line_end == -1 else len(data) - line_end - 1
            if self._line_bytes > self._header_line_max:
                raise self._too_long_line()
            if line_end != -1 and not request.headers and request.target and self._is_http09(data):
                # nginx would answer HTTP/0.9; we do not speak it: refused at once
                raise ClientError(400, "client sent invalid request while reading client request line")
        elif request.chunked:
            self._framing_bytes = 0 if self._fed else self._framing_bytes + len(data)
            if self._framing_bytes > self._head_max:
                # chunk-size lines or trailers that never end (trailers are dropped anyway)
                raise ClientError(400, "client sent invalid chunked body while reading client request body")

    def _is_http09(self, data: bytes) -> bool:
        """A request line ended without an HTTP version (llhttp then waits for headers)."""
        if self._parser.get_http_version() != "0.0":
            return False
        tail = data[data.rfind(b"\r\n\r\n") + 4:] if b"\r\n\r\n" in data else data
        return b"\n" in tail.lstrip(b"\r\n")

    def _too_long_line(self) -> ClientError:
        request = self._parsing
        if request is None or (not request.headers and self._parser.get_http_version() == "0.0"):
            return ClientError(414, "client sent too long URI while reading client request line")
        return ClientError(494, "client sent too long header line while reading client request headers")

    def _feed_stopped(self, stop: Exception, data: bytes) -> None:
        """llhttp stopped before the end of ``data`` (see data_received's feed)."""
        if isinstance(stop, httptools.HttpParserUpgrade):
            upgrade = stop
            # llhttp stops after an "Upgrade" request head (delivered as a plain request). What
            # follows belongs to the new protocol if the peer switches (a tunnel takes it, see
            # switch_protocols), else it is the next request: nothing more is read until the
            # answer, and what came with the head waits for it (finish_response feeds it).
            self._pause_reading()
            offset = int(upgrade.args[0])
            if offset < len(data):
                self._upgrade_early += data[offset:]
                self._unusual = True
        elif isinstance(stop, httptools.HttpParserCallbackError):
            cause = stop.__context__
            if isinstance(cause, ClientError):
                raise cause from None
            if isinstance(cause, _ParsingEnded):
                return
            if isinstance(cause, MemoryError):
                raise cause from None
            raise stop  # a bug in a callback must not masquerade as a client error
        else:
            message = self._parse_error_message(stop)
            # (a coding after "chunked" is one nginx does not implement: 501, as any other; a
            # second Transfer-Encoding line is a duplicate: 400)
            unknown = "unknown \"Transfer-Encoding\"" in message
            parsing = self._parsing
            if unknown and parsing is not None and parsing.chunked:
                message = ('client sent duplicate header line: "Transfer-Encoding" '
                           "while reading client request headers")
                unknown = False
            raise ClientError(501 if unknown else 400, message) from None

    def _parse_error_message(self, err: Exception) -> str:
        """nginx's wording for what llhttp rejected (llhttp's reasons are its own)."""
        reason = str(err)
        if "can't be present with" in reason:
            return ('client sent "Content-Length" and "Transfer-Encoding" headers at the same time '
                    "while reading client request headers")
        if "Duplicate Content-Length" in reason:
            return 'client sent duplicate header line: "Content-Length" while reading client request headers'
        if "Content-Length" in reason:
            return 'client sent invalid "Content-Length" header while reading client request headers'
        if "Transfer-Encoding" in reason:
            return 'client sent unknown "Transfer-Encoding" while reading client request headers'
        request = self._parsing
        if request is not None and self._head_done:
            return "client sent invalid chunked body while reading client request body"
        if (request is not None and request.headers) or "header" in reason.lower():
            return "client sent invalid header line while reading client request headers"
        return "client sent invalid request while reading client request line"

    def on_message_begin(self) -> None:
        if self._unusual and (self._last_request or self.closed):
            # nothing after a request without keep-alive, or once we close, is parsed (this
            # may run inside the feed that closed the connection)
            self._last_request = 2
            raise _ParsingEnded
        self._parsing = Request()
        self._head_done = False
        if self._head_checks:  # (as the read, or a head before this one in it, left them)
            self._head_size = 0
        # (client_header_timeout is armed after the feed, for a head that did not arrive whole)

    def on_url(self, url: bytes) -> None:
        request: Request = self._parsing  # type: ignore[assignment]  # (set by on_message_begin)
        if self._head_checks:  # (_EVERY_LINE: a target that may come in pieces, or be too long)
            self._measured_url(request, url)
            return
        # the whole target, in a small read (the method is known once the target begins: error
        # logs show it)
        method = self._parser.get_method()  # (_method, inlined: once per request)
        try:
            request.method = _METHODS[method]
        except KeyError:
            request.method = self._unusual_method(method)
        request.target = url

    def _measured_url(self, request: Request, url: bytes) -> None:
        if request.method:
            url = request.target + url  # (the target came in pieces: reads ended inside it)
        else:
            request.method = self._method()
        request.target = url
        if len(url) > self._header_line_max:
            raise ClientError(414, "client sent too long URI while reading client request line")

    def _unusual_method(self, method: bytes) -> str:
        """A method not in _METHODS (CONNECT is among them): the end of its head is checked."""
        if self._head_checks == _NO_CHECKS:
            self._head_checks = _AT_END
        return method.decode("ascii")

    def _method(self) -> str:
        """The method of the request being parsed (the usual ones are the same str each time)."""
        method = self._parser.get_method()
        return _METHODS.get(method) or method.decode("ascii")

    def on_header(self, name: bytes, value: bytes) -> None:
        # (runs for every header line: the usual one is stored; only the few names the client
        # connection acts on go on to _noted_header)
        if self._head_checks == _EVERY_LINE:
            self._measured_header(name, value)
            return
        value = value.rstrip(b" \t")  # (the same object when there is nothing to strip)
        try:
            noted = _HEADER_NAMES[name]
        except KeyError:
            first_seen = self._first_seen_name(name, value)
            if first_seen is None:
                _count_ignored(self._parsing, len(name) + len(value) + 4)  # type: ignore[arg-type]
                return  # an invalid line, ignored
            noted = first_seen
        request: Request = self._parsing  # type: ignore[assignment]  # (set by on_message_begin)
        request.headers.append((name, value))
        if noted:
            if noted is _HOST and request.host is None:  # (every request has one)
                request.host = value
            else:
                self._head_checks = _AT_END
                _noted_header(request, noted, value)

    def _measured_header(self, name: bytes, value: bytes) -> None:
        """on_header for a head that may outgrow a limit: each line is measured first."""
        request: Request = self._parsing  # type: ignore[assignment]  # (set by on_message_begin)
        if self._head_done:
            return  # a trailer: dropped, as nginx does (never merged into the request head)
        value = value.rstrip(b" \t")
        line = len(name) + len(value) + 4
        size = self._head_size = self._head_size + line
        if line > self._header_line_max or size > self._head_max:
            _count_ignored(request, line)
            raise ClientError(494, "client sent too long header line while reading client request headers")
        try:
            noted = _HEADER_NAMES[name]
        except KeyError:
            first_seen = self._first_seen_name(name, value)
            if first_seen is None:
                _count_ignored(request, line)
                return  # an invalid line, ignored
            noted = first_seen
        request.headers.append((name, value))
        if noted:
            _noted_header(request, noted, value)

    def _first_seen_name(self, name: bytes, value: bytes) -> bytes | None:
        """A header name not in _HEADER_NAMES: its entry there (remembered when the name is
        valid whatever underscores_in_headers says), or None for a line to ignore (logged)."""
        if name and not name.translate(None, _NAME_CHARS):
            noted = _NOTED_NAMES.get(name.lower(), b"")
            if len(_HEADER_NAMES) < _HEADER_NAMES_MAX and len(name) <= _VALID_NAME_LENGTH_MAX:
                _HEADER_NAMES[name] = noted
            return noted
        underscores = self.listener.underscores_in_headers
        if (not name or not underscores or name.translate(None, _NAME_CHARS_UNDERSCORE)) \
                and self.listener.ignore_invalid_headers:
            text = (name + b": " + value).decode("latin-1")
            errorlog.log_error("info", f'client sent invalid header line: "{text}" '
                                       "while reading client request headers", self.conn_id,
                               self._log_context())
            return None
        return _NOTED_NAMES.get(name.lower(), b"")

    def on_headers_complete(self) -> None:
        request: Request = self._parsing  # type: ignore[assignment]  # (set by on_message_begin)
        self._head_done = True
        keep_alive = self._parser.should_keep_alive()
        # The usual head passes every check below without looking: HTTP/1.1 kept alive, with a
        # Host, a usual method, none of the headers the connection acts on, from a small read.
        if self._head_checks or not keep_alive or request.host is None:
            self._check_head(request, keep_alive)
        handler = self.listener.open_exchange(self, request)
        if request.has_body:
            self._expect_body(request, handler)
        elif self.active is None:
            # the usual request becomes the active one (_activate, inlined: once per request;
            # without a body, no body timeout to end)
            self.active = handler
            self._active_request = request
            requests = self.requests = self.requests + 1
            self.response_started = False
            self.bytes_sent = 0
            self.body_bytes_sent = 0
            self._keep_alive = (
                keep_alive
                and not self.listener.shutting_down
                and handler.keepalive_timeout > 0
                and requests < handler.keepalive_requests
            )
            handler.start()
            return
        if self.active is None:
            self._activate(request, handler)
        else:
            if not self._queue:
                self._queue = deque()
            self._queue.append((request, handler))
            self._unusual = True
            self._pause_reading()  # parse no further ahead until the active request is answered

    def _check_head(self, request: Request, keep_alive: bool) -> None:
        """The end of a head that is not the usual one: its version, method, count of lines,
        Host and framing."""
        if not self._head_checks:
            self._head_checks = _AT_END  # (on_message_complete checks its end too)
        self._line_bytes = 0
        if not request.method:
            request.method = self._method()
        # llhttp speaks HTTP 0.9, 1.0, 1.1 and 2.0 and keeps only 1.1 alive unless told so by a
        # Connection header: the usual request is HTTP/1.1 (request.version's default) without
        # asking (httptools's get_http_version() builds its string with str.format, per call)
        if not keep_alive or request.connection is not None:
            self._read_version(request)
        if request.method == "CONNECT":
            raise ClientError(405, "client sent invalid method while reading client request line")
        if len(request.headers) > self.listener.max_headers:  # (ignored invalid lines not counted)
            raise ClientError(400, "client sent too many header lines while reading client request headers")
        if request.host is None and request.version == "1.1":
            raise ClientError(400, "client sent HTTP/1.1 request without \"Host\" header "
                                   "while reading client request headers")
        request.keep_alive = keep_alive
        if request.chunked or request.content_length:  # (has_body stays False: the usual GET)
            self._read_framing(request)

    def _read_version(self, request: Request) -> None:
        """The request's HTTP version, from the parser: one we speak, or a 400."""
        version = request.version = self._parser.get_http_version()
        if version not in ("1.1", "1.0"):
            raise ClientError(400, "client sent invalid request while reading client request line")

    def _read_framing(self, request: Request) -> None:
        """A request with a body (chunked, or a Content-Length above 0). llhttp already rejects
        Content-Length together with Transfer-Encoding, duplicate Content-Length lines and a
        coding after "chunked"; on_header noted the values."""
        request.has_body = True
        if request.chunked:
            self._head_checks = _EVERY_LINE  # (its trailers: on_header drops them)
            self._framing_bytes = 0
            if request.version == "1.0":
                raise ClientError(400, "client sent \"Transfer-Encoding\" with HTTP/1.0 "
                                       "while reading client request headers")
            _check_transfer_encoding(request.headers)

    def _expect_body(self, request: Request, handler: RequestHandler) -> None:
        """The body of a request whose handler is known: its limit (client_max_body_size), where
        it will wait, and client_body_timeout."""
        limit = handler.max_body_size
        if limit and request.content_length is not None and request.content_length > limit:
            raise ClientError(413, f"client intended to send too large body: "
                                   f"{request.content_length} bytes")
        self._parsing_handler = handler
        request.body = RequestBody(handler.client_body)
        self._arm(_BODY, handler.body_timeout)

    def on_body(self, chunk: bytes) -> None:
        request = self._parsing
        handler = self._parsing_handler
        assert request is not None and handler is not None
        request.body_size += len(chunk)
        self._fed |= _FED_BODY
        if handler.max_body_size and request.body_size > handler.max_body_size:
            raise ClientError(413, f"client intended to send too large chunked body: "
                                   f"{request.body_size} bytes")
        try:
            request.body.append(chunk)
        except BodyFileError as err:
            raise ClientError(500, f"{err} while reading client request body", level="crit") from None
        if handler is self.active:
            self._arm(_BODY, handler.body_timeout)
            # told once the read is parsed: the body of one read goes on in one piece (with
            # the end of a chunked body when it came in the same read, as nginx writes it)
            self._body_for = handler

    def on_chunk_header(self) -> None:
        self._fed |= _FED_CHUNK

    def on_chunk_complete(self) -> None:
        self._fed |= _FED_CHUNK

    def on_message_complete(self) -> None:
        request: Request = self._parsing  # type: ignore[assignment]  # (set by on_message_begin)
        request.complete = True
        self._parsing = None
        # (a head without checks was kept alive and announced no body: see _check_head)
        if self._head_checks and self._checked_message_complete(request):
            return
        if self._active_request is request:
            return  # (a request without a body was served or proxied by start())
        if self.active is None and not self._queue and not self.closed:
            # answered before its parse ended: now idle until the next request
            self._arm(_IDLE, self._last_keepalive_timeout)
            self.listener.reusable[self] = None
        elif self._phase == _BODY:
            self._phase = _NONE  # a queued request's body is complete: no body is awaited now

    def _checked_message_complete(self, request: Request) -> bool:
        """on_message_complete for a request whose head was checked: the end of keep-alive, the
        end of a body (its handler is told; True then, when it is the active one)."""
        if not getattr(request, "keep_alive", True):
            self._last_request = 1
            self._unusual = True
        if not request.has_body:  # (only a request with a body has a _parsing_handler)
            return False
        handler = self._parsing_handler
        self._parsing_handler = None
        if handler is not self.active:
            return False
        if self._phase == _BODY:
            self._phase = _NONE
        self._body_for = None  # (told now, with the end)
        handler.body_received()  # type: ignore[union-attr]  # (the active one)
        return True

    # ------------------------------------------------------------------ request lifecycle

    def _activate(self, request: Request, handler: RequestHandler) -> None:
        """The request becomes the active one (inlined in on_headers_complete: keep both alike).
        (sent_head is b"" already: finish_response emptied it.)"""
        self.active = handler
        self._active_request = request
        requests = self.requests = self.requests + 1
        self.response_started = False
        self.bytes_sent = 0
        self.body_bytes_sent = 0
        self._keep_alive = (
            getattr(request, "keep_alive", True)
            and not self.listener.shutting_down
            and handler.keepalive_timeout > 0
            and requests < handler.keepalive_requests
        )
        if request.has_body and self._phase < _SEND and request.complete:
            self._phase = _NONE  # (no body to wait for now)
        # (no timer of the client's side runs while it is served: a wait for a head or the next
        # request that is still armed is void once a request is active, see _on_timer)
        handler.start()

    def send_continue(self) -> None:
        """Answer ``Expect: 100-continue`` once the handler is ready to read the body."""
        request = self._active_request
        if (request is not None and request.expect_continue and not request.body_size
                and request.version != "1.0"):  # (never to an HTTP/1.0 client, RFC 9110)
            request.expect_continue = False
            self._write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def pause_body(self) -> None:
        """Stop reading the request body (the upstream does not take it as fast as it comes)."""
        self._pause_reading()

    def resume_body(self) -> None:
        """Read the request body again, unless we are paused for a pipelined request."""
        if not self._queue and self._pending_error is None:
            self._resume_reading()

    def switch_protocols(self, protocol: asyncio.Protocol) -> tuple[asyncio.Transport, bytes]:
        """The active request got a 101 (its head is written): the socket now belongs to
        ``protocol`` (a tunnel), which gets its events and must hand ``connection_lost`` back
        here. Returns the transport and the bytes that came after the request's head."""
        transport = self.transport
        assert transport is not None
        self._cancel_timer()
        self._keep_alive = False
        self.listener.reusable.pop(self, None)
        for request, _handler in self._queue:  # (no HTTP request follows a switch)
            request.body.close()
        self._queue = _NO_QUEUE
        early, self._upgrade_early = self._upgrade_early, b""
        transport.set_protocol(protocol)
        self._reading_paused = False
        transport.resume_reading()
        return transport, early

    # ------------------------------------------------------------------ writing responses

    def send_head(
        self,
        status: int,
        headers: bytes,
        content_length: int | None,
        head_only: bool | None = None,
        reason: bytes | None = None,
    ) -> None:
        """Write the status line and headers; framing, Server, Date and Connection are ours.

        ``headers`` are complete ``Name: value\\r\\n`` lines (already filtered by the caller).
        ``content_length`` None means unknown: chunked for HTTP/1.1, close-delimited for 1.0.
        ``reason``: a proxied response's own phrase (b"": none, as the peer sent it); None:
        nginx's phrase for the status.
        """
        request: Request = self._active_request  # type: ignore[assignment]  # (one is active)
        self.response_started = True
        if head_only is None:
            head_only = request.method == "HEAD"
        if head_only or content_length is None or status in _UNUSUAL_BODY_STATUS:
            self._send_head_framed(request, status, headers, content_length, head_only, reason)
            return
        # the usual response: a body of known length
        self._body_framing = _AS_IS
        if status >= 400 and request.has_body and not request.complete:
            self._keep_alive = False  # we will not read the rest of the body
        tails = _KEEP_ALIVE_TAILS if self._keep_alive else _CLOSE_TAILS
        try:
            tail = tails[content_length]
        except KeyError:
            tail = _length_tail(tails, content_length)
        clock = _CLOCK  # (head_start, inlined: once per response)
        if clock.since <= _wall_clock() < clock.until:
            try:
                start = clock.head_starts[status][reason]
            except KeyError:
                start = head_start(status, reason)
        else:
            start = head_start(status, reason)
        # (the head is kept for $sent_http_content_length & co.)
        head = self.sent_head = b"".join((start, headers, tail))
        self.bytes_sent = len(head)  # (the response's first bytes: one head per response)
        # Corked: the head goes out with the first body bytes (one syscall instead of two), or
        # at flush() when the caller has no body at hand.
        self._pending_head = head

    def _send_head_framed(self, request: Request, status: int, headers: bytes, content_length: int | None,
                          head_only: bool, reason: bytes | None) -> None:
        """send_head for every other response: no body (HEAD, 1xx, 204, 304) or one of unknown
        length (chunked, or close-delimited for HTTP/1.0)."""
        body_allowed = not head_only and status not in _NO_BODY_STATUS and status >= 200
        body_framing = _AS_IS if body_allowed else _NO_BODY
        framing = b""
        if status in _NO_BODY_STATUS:
            pass
        elif content_length is not None:
            framing = _LENGTH_LINES.get(content_length) or _length_line(content_length)
        elif request.version == "1.1":
            if not head_only:
                body_framing |= _CHUNKED
                framing = b"Transfer-Encoding: chunked\r\n"
        elif not head_only:
            self._keep_alive = False  # an HTTP/1.0 client learns the end of the body from the close
        self._body_framing = body_framing
        if status >= 400 and request.has_body and not request.complete:
            self._keep_alive = False  # we will not read the rest of the body
        if status == 101:  # (nginx's header filter: a switch says so, whatever keep-alive was)
            end = b"Connection: upgrade\r\n\r\n"
        else:
            end = _KEEP_ALIVE_END if self._keep_alive else _CLOSE_END
        head = self.sent_head = b"".join((head_start(status, reason), headers, framing, end))
        self.bytes_sent += len(head)
        self._pending_head = head

    def flush(self) -> None:
        """Write a corked response head now."""
        head = self._pending_head
        if head:
            self._pending_head = b""
            self._write(head)

    def send_body(self, data: bytes) -> None:
        if self._body_framing or not data:
            if self._body_framing == _CHUNKED and data:
                self._send_chunk(data)
            else:
                self.flush()  # (no body: a HEAD's, a 204's...)
            return
        size = len(data)
        self.body_bytes_sent += size
        self.bytes_sent += size
        head = self._pending_head
        if head:  # (the first bytes of the body: the head goes with them)
            self._pending_head = b""
            data = head + data
        transport = self.transport  # (_write, inlined: once per response)
        if not self.closed and transport is not None and not transport.is_closing():
            transport.write(data)

    def _send_chunk(self, data: bytes) -> None:
        size = len(data)
        self.body_bytes_sent += size
        head = self._pending_head
        self._pending_head = b""
        frame = b"%x\r\n" % size
        self.bytes_sent += len(frame) + size + 2
        transport = self.transport
        if transport is not None and not self.closed and not transport.is_closing():
            transport.writelines((head, frame, data, b"\r\n") if head else (frame, data, b"\r\n"))

    def end_body(self) -> None:
        """Write the end of a chunked body (idempotent; with the ``trailers`` the response has)
        and anything still corked."""
        if self._body_framing == _CHUNKED:
            self._body_framing = _AS_IS
            make_trailers = self._trailers
            if make_trailers is not None:
                self._trailers = None
                trailers = make_trailers()
                end = b"0\r\n" + trailers + b"\r\n" if trailers else b"0\r\n\r\n"
            else:
                end = b"0\r\n\r\n"
            self.bytes_sent += len(end)
            self._write(self._pending_head + end)
            self._pending_head = b""
        elif self._pending_head:
            self.flush()

    def finish_response(self) -> None:
        """The response is complete: end the chunked body and serve the next request (or the
        queued ones)."""
        if self._body_framing or self._pending_head:
            self.end_body()  # (usually done already: the exchange ends the body before its log)
        request = self._active_request
        if request is not None:
            if request.has_body:
                if not request.complete:
                    # The handler answered before reading the whole body (return, error): nginx
                    # discards the rest; we do the simple, safe thing: no reuse of the connection.
                    self._keep_alive = False
                request.body.close()  # (a body file goes now, not when the last reference does)
            self._active_request = None
        active = self.active
        if active is not None:
            self._last_keepalive_timeout = active.keepalive_timeout
            self.active = None
        self.sent_head = b""  # logged already; an idle connection holds no response bytes
        if self._unusual or not self._keep_alive or self.closed or self._parsing is not None:
            self._after_response()
            return
        # the usual connection: idle keep-alive (_arm, inlined: once per request); it may be
        # closed to make room
        when = self._deadline = self.loop.time() + self._last_keepalive_timeout
        self._phase = _IDLE
        if self._timer is None or when < self._timer_when:
            self._set_timer(when)
        self._reusable[self] = None

    def _after_response(self) -> None:
        """finish_response's end for a connection that is not the usual one: close it, or serve
        the queued requests, the pending error, the next head's timeout, the refused upgrade's
        bytes."""
        self._trailers = None  # (a response without a body did not use them)
        if not self._keep_alive or self.closed or (self._eof and not self._queue):
            self._close_after_response()
            return
        if self._activating:
            return  # an outer call is looping over the queue
        if self._queue:
            # serve the queued requests (iteratively: a long pipeline of instant answers must
            # not recurse), then wait for the next request
            self._activating = True
            try:
                while self.active is None and self._queue and not self.closed:
                    request, handler = self._queue.popleft()
                    self._activate(request, handler)
            finally:
                self._activating = False
            if not self._queue:
                self._queue = _NO_QUEUE  # (an emptied deque still holds its ~600-byte block)
            if self.active is not None or self.closed:
                return
        if self._pending_error is not None:
            self._client_error(self._pending_error)
            return
        if self._parsing is None:
            self._arm(_IDLE, self._last_keepalive_timeout)  # idle keep-alive
            self.listener.reusable[self] = None
        elif not self._head_done:
            self._arm(_HEAD, self.listener.header_timeout)  # a pipelined head, still incomplete
        if self._reading_paused:
            self._resume_reading()
        early = self._upgrade_early
        if early:  # the upgrade was refused: what came after its head is the next request
            self._upgrade_early = b""
            self.data_received(early)

    def respond(self, status: int, headers: bytes, body: bytes) -> None:
        """A complete small response in one write (``return``, error pages)."""
        self.send_head(status, headers, len(body))
        self.send_body(body)
        self.finish_response()

    def respond_error(self, status: int) -> None:
        """nginx's own page for ``status`` (494 goes out as 400, as nginx does)."""
        if responses.closes_connection(status):
            self._keep_alive = False
        page = responses.error_page(status)
        if page is None:
            self.respond(status, b"", b"")
        else:
            self.respond(status, b"Content-Type: text/html\r\n", page)

    @property
    def trailers(self) -> Callable[[], bytes] | None:
        """add_trailer: None, or what makes the trailers of the chunked response in progress."""
        return self._trailers

    @trailers.setter
    def trailers(self, make: Callable[[], bytes] | None) -> None:
        self._trailers = make
        if make is not None:
            self._unusual = True  # (finish_response clears them on its unusual path only)

    @property
    def keeps_alive(self) -> bool:
        """Whether the connection stays open after the active response (so far)."""
        return self._keep_alive

    def close_after_response(self) -> None:
        """Do not keep the connection alive after the current response."""
        self._keep_alive = False

    def abort(self) -> None:
        """End a response that cannot complete (upstream failed mid-body): close, never fake an end."""
        self._keep_alive = False
        self.active = None
        self._active_request = None
        self.flush()
        if self.transport is not None:
            self.transport.abort() if self._body_framing & _CHUNKED else self.transport.close()
        self.closed = self._unusual = True

    def _write(self, data: bytes) -> None:
        # A client that went away may still have its connection_lost pending, and uvloop
        # raises on writes to a closed transport: drop the bytes, connection_lost follows.
        transport = self.transport
        if transport is not None and not self.closed and not transport.is_closing():
            transport.write(data)

    def close(self) -> None:
        if not self.closed:
            self.closed = self._unusual = True
            self._cancel_timer()
            self.listener.reusable.pop(self, None)
            if self.transport is not None:
                self.transport.close()

    @property
    def reading_head(self) -> bool:
        """A request head is arriving and no request is being served: stub_status's Reading."""
        return self._parsing is not None and self.active is None

    def _close_after_response(self) -> None:
        """nginx's lingering close when the client may still be sending (pipelined requests
        after the last one we answer, a body we did not read): our side is shut, what comes
        is read and dropped for up to lingering_time, then the socket closes. Closing with
        unread bytes would make the kernel reset the connection, and a reset can destroy the
        response the client has not read yet."""
        transport = self.transport
        pending = self._queue or self._parsing is not None or self._reading_paused or self._last_request > 1
        if self.closed or transport is None or self._eof or not pending or not transport.can_write_eof():
            self.close()
            return
        self._queue = _NO_QUEUE
        self.closed = self._unusual = True  # for everybody else; the transport stays open while we linger
        self._cancel_timer()
        self.listener.reusable.pop(self, None)
        self._linger_until = self.loop.time() + LINGERING_TIME
        transport.write_eof()
        self._timer = self.loop.call_later(LINGERING_TIMEOUT, self._end_lingering)
        self._reading_paused = False
        transport.resume_reading()

    def _lingering_data(self) -> None:
        timer = self._timer
        if timer is not None:
            timer.cancel()
        delay = min(LINGERING_TIMEOUT, self._linger_until - self.loop.time())
        self._timer = self.loop.call_later(max(delay, 0.0), self._end_lingering)

    def _end_lingering(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()  # (when the client's end came first: the handle holds us)
        if self.transport is not None:
            self.transport.close()

    def close_if_idle(self) -> bool:
        """Graceful stop: close now when no request is in flight, else after the active one."""
        if self._linger_until:
            self._end_lingering()  # (what a lingering close waits for is of no use now)
            return True
        self._keep_alive = False
        if self.requests == 0:
            # Not idle: a client that has just connected has (almost surely) sent its first
            # request already; closing would lose it. nginx closes only keep-alive connections
            # (c->idle): this one is served once, with "Connection: close", or times out.
            return False
        if self.active is None and self._parsing is None and not self._queue:
            self.close()
            return True
        return False

    @property
    def writing_paused(self) -> bool:
        return self._writing_paused

    # ------------------------------------------------------------------ errors

    def _client_error(self, err: ClientError) -> None:
        self._pause_reading()
        active = self.active
        handler_told = False
        if active is not None and active is self._parsing_handler and not self.response_started:
            # the active request's own body is at fault (too large): it ends with the error
            active.abort(err.status)
            self.active = None
            handler_told = True
        if self.active is not None:
            self._pending_error = err  # answered after the request in flight, in order
            self._unusual = True
            self._keep_alive = False
            return
        errorlog.log_error(err.level, str(err), self.conn_id, self._log_context())
        request = self._active_request = self._parsing or Request()
        if request.version not in ("1.0", "1.1"):
            request.version = "1.1"
        self._keep_alive = False
        self.response_started = False
        self.bytes_sent = self.body_bytes_sent = 0  # (the counters of a previous request)
        self.respond_error(err.status)
        report = self.listener.on_client_error
        if not handler_told and report is not None:
            report(self, request, err.status)  # the access log of a request nobody handled
        self.close()

    def _out_of_memory(self) -> None:
        """An allocation failed while parsing (the process is at its memory limit): this
        connection ends with a 500 if that can still be written, and nothing is left half-open."""
        errorlog.log_error("alert", "out of memory while reading client request", self.conn_id)
        try:
            self._client_error(ClientError(500, "out of memory while reading client request", level="debug"))
        except MemoryError:
            pass
        if self.transport is not None and not self._linger_until:
            self.transport.abort() if not self.closed else self.transport.close()
            self.closed = self._unusual = True

    def _proxy_protocol_header(self, data: bytes) -> bytes:
        """The PROXY protocol header (v1 or v2) before the first request; returns the bytes
        after it. A broken one closes the connection with nginx's error line."""
        from scriptlb.http.proxy_protocol import NEED_MORE, V1_MAX, Header, read_header

        pending = (self._pp_pending or b"") + data
        header = read_header(pending)
        if header == NEED_MORE:
            self._pp_pending = pending
            return b""
        self._pp_pending = None
        if not isinstance(header, Header):
            shown = pending[:V1_MAX].decode("latin-1").encode("unicode_escape").decode("ascii")
            errorlog.log_error("error", f'broken header: "{shown}" while reading PROXY protocol',
                               self.conn_id, self._log_context())
            self.closed = self._unusual = True
            if self.transport is not None:
                self.transport.close()
            return b""
        self.proxy_protocol = header
        return pending[header.length:]

    def _log_context(self) -> str:
        request = self._parsing
        ctx = f", client: {self.remote_addr}, server: {self.server_addr}"
        if request is not None and request.method and request.target:
            ctx += f', request: "{request.request_line()}"'
        return ctx

    # ------------------------------------------------------------------ flow control, timers

    def _pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None and not self.closed:
            self._reading_paused = True
            self._unusual = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._reading_paused and self.transport is not None and not self.closed:
            self._reading_paused = False
            self.transport.resume_reading()

    def _arm(self, phase: int, timeout: float) -> None:
        """Wait for ``phase`` (a new request, the rest of a head...) for at most ``timeout``."""
        self._phase = phase
        when = self._deadline = self.loop.time() + timeout
        if self._timer is None or when < self._timer_when:
            self._set_timer(when)

    def _set_timer(self, when: float) -> None:
        """The timer fires later than ``when`` (or not at all): it is set again. (One that fires
        earlier finds the deadline ahead and sets itself again then: a deadline that moves
        later costs no timer call.)"""
        if self._timer is not None:
            self._timer.cancel()
        self._timer_when = when
        self._timer = self.loop.call_at(when, self._on_timer)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._phase = _NONE

    def _on_timer(self) -> None:
        self._timer = None
        if self._phase == _NONE or self.closed:
            return
        if self._phase < _BODY and self.active is not None:
            return  # (waiting for a request or its head ended when one became active)
        if self.loop.time() < self._deadline:
            self._timer_when = self._deadline
            self._timer = self.loop.call_at(self._deadline, self._on_timer)
            return
        phase = self._phase
        self._phase = _NONE
        if phase == _IDLE:
            self.close()  # keepalive_timeout: nginx closes silently
            return
        if phase == _HEAD:
            self._head_timed_out()
            return
        if phase == _BODY:
            parsing = self._parsing_handler
            if parsing is not None and parsing is not self.active:
                self._queued_body_timed_out()
                return
            if self.active is not None and not self.response_started:
                self._body_timed_out(self.active)
                return
        errorlog.log_error("info", f"{_TIMED_OUT} {_PHASE_TEXT[phase]}", self.conn_id, self._log_context())
        self.close()

    def _head_timed_out(self) -> None:
        """client_header_timeout: nginx answers nothing. It closes, says why at info level and,
        once any byte of a request came, access-logs that request with 408."""
        request = self._parsing
        if request is None:
            errorlog.log_error("info", f"{_TIMED_OUT} while waiting for request", self.conn_id,
                               self._log_context())
            self.close()
            return
        if not request.method:
            request.method = self._method_so_far()
        where = "headers" if self._line_received(request) else "line"
        errorlog.log_error("info", f"{_TIMED_OUT} while reading client request {where}", self.conn_id,
                           self._log_context())
        self._parsing = None
        self.close()
        self.bytes_sent = self.body_bytes_sent = 0  # (the counters of a previous request)
        report = self.listener.on_client_error
        if report is not None:
            report(self, request, 408)

    def _line_received(self, request: Request) -> bool:
        """Did the request line of this incomplete head arrive whole (for the log's wording)?
        httptools says nothing before a header is complete, so look at the last bytes read:
        a line end after the previous request's head."""
        if request.headers:
            return True
        tail = self._last_data
        start = tail.rfind(b"\r\n\r\n")
        return b"\n" in (tail[start + 4:] if start != -1 else tail)

    def _method_so_far(self) -> str:
        try:
            return self._parser.get_method().decode("ascii")
        except (httptools.HttpParserError, UnicodeDecodeError):
            return ""  # not even the method arrived whole

    def _queued_body_timed_out(self) -> None:
        """A pipelined request's body stalled behind the active request: the active one is
        still answered, then the connection closes; the queued ones end unanswered (408)."""
        self._keep_alive = False
        self._pause_reading()
        queued, self._queue = self._queue, _NO_QUEUE
        self._parsing = None
        self._parsing_handler = None
        for _request, handler in queued:
            handler.abort(408)

    def _body_timed_out(self, active: RequestHandler) -> None:
        """client_body_timeout: nginx terminates the request without a response (and without
        an error-log line): the connection closes, the access log says 408."""
        self.active = None
        self._active_request = None
        self._queue = _NO_QUEUE
        self.close()
        active.abort(408)


_MAX_OFF_T = 2**63 - 1  # nginx's NGX_MAX_OFF_T_VALUE


def _content_length(value: bytes) -> int:
    """The length nginx's ngx_atoof accepts (llhttp validated the digits and duplicates); a
    value past off_t is a 400, as in nginx, and never reaches int() (whose digit limit would
    raise in the middle of parsing)."""
    digits = value.lstrip(b"0") or b"0"
    length = int(digits) if len(digits) <= 19 else _MAX_OFF_T + 1
    if length > _MAX_OFF_T:
        raise ClientError(400, 'client sent invalid "Content-Length" header '
                               "while reading client request headers")
    return length


class ProxyProtocolConnection(ClientConnection):
    """A connection of a ``listen ... proxy_protocol`` socket: the PROXY header comes first (a
    class of its own, so the other listeners' reads pay no test for it)."""

    __slots__ = ()

    def data_received(self, data: bytes) -> None:
        if self._pp_pending is not None:
            data = self._proxy_protocol_header(data)
            if not data:
                return
        super().data_received(data)
