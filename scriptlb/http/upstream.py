"""Peer-side HTTP/1.x connection: write one request, parse its response, stream the body.

Theory of operation
-------------------
An ``UpstreamConnection`` is an ``asyncio.Protocol`` on one TCP (or unix) connection to a peer.
It serves one request at a time (no pipelining towards peers, as nginx) and moves through

    NEW --connection_made--> ACTIVE <--release/reuse--> IDLE (in the pool)
      \\___________________________ any state __________________________--> CLOSED

For a request the exchange calls ``start`` with the head bytes, the buffered body (or None and
then ``write_body`` for a streamed one) and itself as the ``UpstreamHandler``. The connection
answers through that handler, never through futures (no task wake-up per request):

* ``upstream_head(response)`` once the response head is parsed (after ``feed_data`` returned,
  so the handler never runs inside a parser callback). The handler either accepts the body
  with ``stream_to(handler, sink)`` — body bytes that arrived with the head are delivered then,
  and from then on every decoded chunk goes straight to ``sink`` (the client's send when no
  body filter sits between; the handler's ``upstream_body`` by default) — or drops the
  connection (``abort``) to try another peer;
* ``upstream_complete()`` at the end of the body;
* ``upstream_failed(err)`` exactly once if anything goes wrong, with an ``UpstreamError``
  carrying the nginx failure kind (error / timeout / invalid_header), nginx's log text and the
  log phase.

``pause_reading`` is the back-pressure lever when the client is slow.

Timeouts are nginx's idle timers (between two reads, between two writes), kept with one
``TimerHandle`` re-armed lazily from the time of the last read.

``is_reusable`` is the one predicate that decides whether the connection may go back to the pool
(``park``, the pool's one call, asks it inline and makes the connection idle).
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable
from typing import Protocol, cast

import httptools

from scriptlb.config.model import NextUpstream
from scriptlb.http import response_head, safety
from scriptlb.http.response_head import KINDS, ResponseHead
from scriptlb.logs import errorlog


class Failure(enum.IntEnum):
    """Why a try failed. The value is the ``proxy_next_upstream`` bit that allows a retry."""

    ERROR = NextUpstream.ERROR
    TIMEOUT = NextUpstream.TIMEOUT
    INVALID_HEADER = NextUpstream.INVALID_HEADER
    HTTP_500 = NextUpstream.HTTP_500
    HTTP_502 = NextUpstream.HTTP_502
    HTTP_503 = NextUpstream.HTTP_503
    HTTP_504 = NextUpstream.HTTP_504
    HTTP_403 = NextUpstream.HTTP_403
    HTTP_404 = NextUpstream.HTTP_404
    HTTP_429 = NextUpstream.HTTP_429
    # "no live upstreams": a bit no proxy_next_upstream keyword sets, so it is never retried
    NOLIVE = 0x80000000


# what makes two upstream connections interchangeable (attempt.pool_key): the peer's
# address text, the name it is addressed by, and the local address a hook bound to; the usual
# connection (no name, no bound address) is keyed by the address text alone, a string whose
# hash is computed once, where a tuple is hashed again on every pool lookup
PoolKey = str | tuple[str, str, tuple[str, int] | None]

class ConnState(enum.Enum):
    NEW = "new"
    ACTIVE = "active"
    IDLE = "idle"
    CLOSED = "closed"


# The states as module constants, for the per-request code: reading an attribute of an Enum
# class goes through EnumType's __getattr__ hook (several times a plain attribute read).
NEW, ACTIVE, IDLE, CLOSED = ConnState.NEW, ConnState.ACTIVE, ConnState.IDLE, ConnState.CLOSED


class UpstreamError(Exception):
    """A failed try, as nginx classifies it; ``str()`` is nginx's error-log text."""

    def __init__(
        self,
        failure: Failure,
        message: str,
        *,
        phase: str = "reading response header from upstream",
        response_started: bool = False,
        request_sent: bool = True,
    ) -> None:
        super().__init__(message)
        self.failure = failure
        self.phase = phase  # nginx's "while ..." log action
        self.response_started = response_started  # any response byte arrived before the failure
        self.request_sent = request_sent  # request bytes went out (no resending a POST then)


# (module constants: on_header reads them for every header line)
_PASSED, _LENGTH = response_head.PASSED, response_head.LENGTH
_CONNECTION, _REWRITABLE = response_head.CONNECTION, response_head.REWRITABLE
_PLAIN_CONNECTION = response_head.PLAIN_CONNECTION
_RAW_KEPT = response_head.RAW_KEPT


class UpstreamHandler(Protocol):
    """Who a request's response goes to (the exchange)."""

    def upstream_head(self, response: ResponseHead) -> None: ...
    def upstream_body(self, data: bytes) -> None: ...
    def upstream_complete(self) -> None: ...
    def upstream_failed(self, err: UpstreamError) -> None: ...
    def upstream_crashed(self, exc: BaseException, where: str) -> None: ...  # a bug in a callback


PREMATURE = "upstream prematurely closed connection"
_NEVER = float("inf")  # (_timer_when without a timer)
# the usual status line, and its reason phrase without a search for it
_OK_LINE = b"HTTP/1.1 200 OK\r\n"
_TIMED_OUT = "upstream timed out (110: Connection timed out)"

# What the full parser found in a response head (its status line, headers and llhttp's
# keep-alive verdict, all decided by the head's bytes): a ResponseHead shared by every
# response that comes with the same head bytes (nobody changes one once its parser is done:
# a per-response object less); and the length of the whole response, the key and the body
# its Content-Length announces, when the key is exactly the head (lines ended by CR LF) and
# the status allows a body, else -1 (see data_received's replay); and the key's length
HeadTemplate = tuple[ResponseHead, int, int]
# The heads seen lately (every upstream connection of the worker), by their bytes from the
# status line to the empty line that ends them: a response whose first read starts with one
# of them needs no callback per header (see data_received). Bounded, since peers choose them.
HEADS: dict[bytes, HeadTemplate] = {}
_HEADS_MAX = 256
_MEMO_TRIAL = 8  # misses before a connection may give up on the memo


def _response_parser(protocol: object) -> httptools.HttpResponseParser:
    parser = httptools.HttpResponseParser(protocol)
    # nginx reads a peer's lines ended by a bare LF (its own parser's rule); the response
    # is re-framed for the client, so this opens no smuggling path
    parser.set_dangerous_leniencies(lenient_optional_cr_before_lf=True)
    return parser


class _Bare:
    """The bare parser's protocol: the connection's callbacks but on_header, so that llhttp
    does not hand each header line over (httptools looks the callbacks up once, when the
    parser is made)."""

    __slots__ = ("on_body", "on_headers_complete", "on_message_complete")

    def __init__(self, conn: UpstreamConnection) -> None:
        self.on_headers_complete = conn.on_headers_complete
        self.on_body = conn.on_body
        self.on_message_complete = conn.on_message_complete


class UpstreamConnection(asyncio.Protocol):
    # __slots__: cheaper attribute access on the per-request path, typos fail loudly
    __slots__ = (
        "_bare_parser",
        "_clock",
        "_early_body",
        "_early_more",
        "_full_parser",
        "_handler",
        "_head_buf",
        "_head_key",
        "_head_only",
        "_head_ready",
        "_header_done",
        "_interim",
        "_memo_misses",
        "_memo_on",
        "_needs_parser",
        "_owner",
        "_parser",
        "_read_paused",
        "_read_timeout",
        "_response",
        "_seen",
        "_seen_key",
        "_send_timeout",
        "_sink",
        "_spent",
        "_template",
        "_timer",
        "_timer_when",
        "_upgraded",
        "_write_paused",
        "_write_paused_at",
        "body_received",
        "connected_at",
        "head_limit",
        "key",
        "last_read",
        "loop",
        "on_idle_lost",
        "on_writable",
        "peer_name",
        "received",
        "request_complete",
        "requests",
        "response_complete",
        "sent",
        "state",
        "transport",
        "upgrade",
        "upgraded_data",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, key: PoolKey, peer_name: str) -> None:
        self.loop = loop
        self._clock = loop.time  # (one bound method: read for every read)
        self.connected_at = loop.time()  # (made as the connect starts: the upstream keepalive_time)
        self.key = key  # pool key (PoolKey)
        self.peer_name = peer_name
        self.state = NEW
        self.transport: asyncio.Transport | None = None
        self.requests = 0  # requests sent on this connection (keepalive_requests)
        self.on_idle_lost: object = None  # set by the pool: callable(conn) when an idle conn dies
        self.on_writable: Callable[[], None] | None = None  # a streamed body may flow again
        self.head_limit = 0  # proxy_buffer_size of the request in flight: the largest head (0: none)
        self._head_buf = b""  # response bytes read while its head is incomplete
        self._interim = False  # a 1xx head came before the final one
        # bytes of the request in flight: to the peer and from it (the peer statistics)
        self.sent = 0
        self.received = 0
        self.body_received = 0  # response body bytes of the request in progress (decoded)

        # timeouts of the request in flight (nginx's idle timers)
        self._read_timeout = 60.0
        self._send_timeout = 60.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when = _NEVER  # (when the timer fires; _NEVER while there is none)
        # the loop time of the last read (or of the request's start): the read timeout counts
        # from it, and the pool takes it for the release time (the same loop tick)
        self.last_read = 0.0
        self._read_paused = False  # back-pressure from the client: no read timeout meanwhile
        self._write_paused = False
        self._write_paused_at = 0.0

        # per-request state
        # the parser of the response in flight: the full one (a callback per header) or, for a
        # head seen before (HEADS), the bare one (no header callbacks: the template says what
        # the headers said)
        self._parser: httptools.HttpResponseParser | None = None
        self._full_parser: httptools.HttpResponseParser | None = None
        self._bare_parser: httptools.HttpResponseParser | None = None
        # this response's head when seen before (HEADS) and read by the bare parser
        self._template: ResponseHead | None = None
        self._head_key: bytes | None = None  # the first read's head, to remember its template
        # the memo stays off for a connection whose peer's heads do not repeat (a per-response
        # cookie or id): it would only add its look-up to every response
        self._memo_on = True
        self._memo_misses = 0
        # the last head this connection found in HEADS, and its template: a peer sends the
        # same head again and again (until Date turns), and a read that starts with it is
        # known at the cost of comparing bytes, without cutting the key out and hashing it.
        # (A key ends at its first empty line, so a read that starts with it has that head.
        # None yet: the empty tuple, a prefix nothing starts with.)
        self._seen_key: bytes | tuple[()] = ()
        self._seen: HeadTemplate | None = None
        # the parser may be inside a message (none yet, or the last response was to a HEAD:
        # llhttp waits for a body we ended ourselves): the next request needs a new one
        self._needs_parser = True
        self._head_only = False
        self._handler: UpstreamHandler | None = None  # None once it was told the outcome
        self._owner: UpstreamHandler | None = None  # who to tell about a bug in a callback
        self._response = ResponseHead()  # (a new one per request, from start)
        self._header_done = False
        self._head_ready = False  # the head is parsed, the handler not told yet
        self.response_complete = True  # (no response expected before start: bytes are unexpected)
        self.request_complete = False  # the request's bytes, body too, were handed to the socket
        # the body bytes parsed before the handler accepted the body: the first chunk (b"" for
        # none yet), and the rest in a list (rare: a chunked body in several chunks in the read
        # that brought the head); _early_body is None once the handler accepted the body
        # (stream_to): then every chunk goes straight to it. (The usual small response has one
        # chunk there: no list made for it.)
        self._early_body: bytes | None = b""
        self._early_more: list[bytes] | None = None
        # where stream_to sends the body chunks that come after it (set only then, cleared
        # when the response ends: a pooled connection keeps no client alive)
        self._sink: Callable[[bytes], object] | None = None
        # this connection carries no further request: we asked the peer to close (Connection:
        # close) or spoke HTTP/1.0 to it, the peer said it closes, bytes came after a
        # response's end, or it is closed
        self._spent = False
        self.upgrade = False  # the client asked to switch protocols: a 101 ends the head
        self._upgraded = False  # ... and the peer sent it: the rest is a tunnel's
        self.upgraded_data = b""  # bytes after the 101's head

    def __repr__(self) -> str:
        return f"<UpstreamConnection {self.peer_name} {self.state.value} requests={self.requests}>"

    @property
    def response_started(self) -> bool:
        """Any byte of the response in flight arrived."""
        return self.received > 0

    @property
    def request_sent(self) -> bool:
        """Bytes of the request in flight were handed to the socket."""
        return self.sent > 0

    # ------------------------------------------------------------------ asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a connection's transport: asyncio's, or uvloop's (which does not subclass Transport)
        self.transport = cast(asyncio.Transport, transport)
        self.state = ACTIVE

    def data_received(self, data: bytes) -> None:
        # (one function: this runs for every read; the try is free until something raises)
        try:
            if self.response_complete:
                # (this covers an idle connection too: one is pooled only with its response
                # complete; and no read comes before connection_made or once the transport
                # was closed)
                self._unexpected_bytes()
                return
            self.last_read = self._clock()
            self.received += len(data)
            if not self._header_done:
                # (self.received: the head's length so far; nginx reads the head into one
                # proxy_buffer_size buffer)
                if self.received > self.head_limit and self.head_limit and self._head_too_big(data):
                    self._fail(Failure.INVALID_HEADER, "upstream sent too big header")
                    return
                if self._head_buf:
                    self._head_buf += data  # (a head in several reads, or after a 1xx one)
                elif self._memo_on:  # the response's first read
                    # if its head is byte for byte one parsed before (HEADS: Date changes once
                    # a second, the rest of a peer's head seldom), what it says is known, and
                    # the parser need not call on_header for each header
                    template = self._seen if data.startswith(self._seen_key) else self._recall(data)
                    if template is not None:
                        response, whole, end = template
                        self._response = response
                        if len(data) == whole and not self._head_only:
                            # The read holds that head and exactly the body its Content-Length
                            # announces, nothing more: the parser's part is known, so it is
                            # played here instead (on_headers_complete's, on_body's and
                            # on_message_complete's, for a body the handler has not accepted
                            # yet). The head's bytes were validated when they were first parsed,
                            # and llhttp does not look into a body of known length; the parser,
                            # not fed, stays at the start of a message. (Inline: this is the
                            # usual response.)
                            if response.close:
                                self._spent = True
                            self._header_done = self.response_complete = True
                            # (no body: b"" and 0, as start left them)
                            self._early_body = data[end:]
                            self.body_received = whole - end  # (the Content-Length)
                            self._handler.upstream_head(response)  # type: ignore[union-attr]
                            return
                        self._head_buf = data
                        self._template = response
                        self._parser = self._bare_parser or self._new_bare_parser()
                else:
                    self._head_buf = data
                    self._response = ResponseHead()
            try:
                # (the parser callbacks only note what they see: the handler hears of the head
                # and of the end after this returns, so it may reuse or drop this connection)
                self._parser.feed_data(data)  # type: ignore[union-attr]  # (ACTIVE, started: it has one)
            except httptools.HttpParserCallbackError as err:
                raise (err.__context__ or err) from None  # a bug in our callbacks, not the peer's fault
            except httptools.HttpParserUpgrade as upgrade:
                if self._upgraded:  # the 101 we may take: what follows is the new protocol's
                    self.upgraded_data = data[int(upgrade.args[0]):]
                elif not self.response_complete:  # a 101 the client did not ask for
                    self._fail_parse()
                    return
                else:
                    self._spent = True
            except httptools.HttpParserError:
                if not self.response_complete:
                    self._fail_parse()
                    return
                self._spent = True  # garbage after a complete response: deliver, never reuse
            if self._head_ready:
                self._head_ready = False
                # (start set the handler, and nothing in this read can have cleared it: it is
                # told of a failure only on the paths that returned above)
                self._handler.upstream_head(self._response)  # type: ignore[union-attr]
            elif self.response_complete:
                self._deliver_completion()
        except Exception as exc:
            self._crashed(exc, "reading upstream")

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            self._lost(exc)
        except Exception as bug:
            self._crashed(bug, "reading upstream")
        # The parser holds this protocol and the callbacks hold the request: break the
        # cycles, so a closed connection goes with its last reference instead of waiting for
        # (and feeding) the cyclic garbage collector, whose full passes stall the loop under
        # many connections.
        self._parser = self._full_parser = self._bare_parser = None
        self._owner = self._handler = self._sink = None
        self.on_writable = None
        self.on_idle_lost = None

    def _lost(self, exc: Exception | None) -> None:
        state = self.state
        self.state = CLOSED
        self._spent = True
        self._cancel_timer()
        if state is CLOSED:
            return  # we closed it ourselves and already reported why
        if state is IDLE:
            self._notify_idle_lost()
            return
        if self._parser is None or self.response_complete:
            return
        if self._header_done and self._is_close_delimited():
            self.on_message_complete()  # a body without length ends with the connection
            self._deliver_completion()
            return
        if exc is not None and isinstance(exc, OSError) and exc.errno:
            text = f"recv() failed {errorlog.os_error_text(exc)}"
            self._fail(Failure.ERROR, text)
        else:
            self._fail(Failure.ERROR, PREMATURE)

    def pause_writing(self) -> None:
        self._write_paused = True
        self._write_paused_at = self.loop.time()
        self._arm_timer(self._send_timeout)

    def resume_writing(self) -> None:
        self._write_paused = False
        callback = self.on_writable
        if callback is not None:
            try:
                callback()
            except Exception as exc:
                self._crashed(exc, "sending request to upstream")

    def _crashed(self, exc: BaseException, where: str) -> None:
        """The safety net: a bug escaped one of our callbacks. Drop the connection (its state
        is unknown) and let the request it serves finish (or just report it)."""
        owner = self._owner
        self._owner = None
        self.abort()
        if owner is not None:
            owner.upstream_crashed(exc, where)
        else:
            safety.report(exc, where)

    # ------------------------------------------------------------------ the exchange's API

    def start(
        self,
        handler: UpstreamHandler,
        head: bytes,
        body: bytes | None,
        read_timeout: float,
        send_timeout: float,
        head_only: bool,
        http11: bool,
        close_after: bool,
    ) -> None:
        """Send a request (``body`` None: the body follows through ``write_body``); the
        response goes to ``handler``."""
        # (the per-request state, reset here: one call per request)
        self.requests += 1
        self.received = self.body_received = 0
        if self._needs_parser:
            self._new_parser()
        self._handler = self._owner = handler
        # (self._response: the first read sets it, a memo's shared head or a new one)
        self._head_only = head_only
        if close_after or not http11:
            self._spent = True
        # A pooled connection: is_reusable held when it went idle, so its last response was
        # complete (_head_buf emptied, _head_ready, _interim, _upgraded, _spent and
        # _read_paused False); reset what its last request set. (A new one: no matter.)
        self._header_done = self.response_complete = False
        self._early_body = b""
        # (ACTIVE implies a transport: connection_made gives it, only detach takes it back and
        # that makes the connection CLOSED)
        transport: asyncio.Transport = self.transport  # type: ignore[assignment]
        if self.state is not ACTIVE or transport.is_closing():
            # the peer closed it a moment ago (connection_lost may even have run already):
            # fail like a connection closed before the response, after this call returns (a
            # reused one is retried fresh)
            self.sent = 0
            self.request_complete = False
            self.loop.call_soon(self._fail_soon, handler)
            return
        self._read_timeout = read_timeout
        self._send_timeout = send_timeout
        self.last_read = now = self._clock()
        if now + read_timeout < self._timer_when:
            self._arm_timer(read_timeout)  # (else the pending timer re-checks when it fires)
        if body:
            transport.writelines((head, body))
            self.sent = len(head) + len(body)
        else:
            transport.write(head)
            self.sent = len(head)
        self.request_complete = body is not None

    def _new_parser(self) -> None:
        self._needs_parser = False
        self._parser = self._full_parser = _response_parser(self)
        self._bare_parser = None  # (made again when a head seen before comes)

    def _recall(self, data: bytes) -> HeadTemplate | None:
        """The template of a response's first read whose head is not this connection's last
        one, from HEADS (then it is the last one); None if not there: the full parser reads
        it (_head_unknown). (No "\r\n\r\n" in the read: a short key no head is kept under.)"""
        key = data[:data.find(b"\r\n\r\n") + 4]
        template = HEADS.get(key)
        if template is None:
            self._head_unknown(data, key)
        else:
            self._seen_key, self._seen = key, template
        return template

    def _head_unknown(self, data: bytes, key: bytes) -> None:
        """A response's first read whose head (``key``) is not in HEADS: the full parser reads
        it, and on_headers_complete keeps what its headers say under these bytes
        (_remember_head)."""
        self._head_buf = data
        self._response = ResponseHead()
        self._template = None
        self._head_key = key
        self._parser = self._full_parser

    def _new_bare_parser(self) -> httptools.HttpResponseParser:
        self._bare_parser = parser = _response_parser(_Bare(self))
        return parser

    def _fail_soon(self, handler: UpstreamHandler) -> None:
        if self._handler is handler:  # (not if the request gave up on us meanwhile)
            try:
                self._fail(Failure.ERROR, PREMATURE)
            except Exception as exc:
                self._crashed(exc, "reading response header from upstream")

    def write_body(self, data: bytes, last: bool) -> None:
        """Stream request body bytes (already framed by the caller)."""
        transport = self.transport
        if transport is not None and self.state is ACTIVE and not transport.is_closing():
            if data:
                transport.write(data)
                self.sent += len(data)
            if last:
                self.request_complete = True
                # (nothing more to send; a complete request has no on_writable, so park need
                # not clear it)
                self.on_writable = None

    @property
    def write_buffer_full(self) -> bool:
        return self._write_paused

    def stream_to(self, handler: UpstreamHandler, sink: Callable[[bytes], object] | None = None) -> None:
        """The handler accepts the body: hand over what arrived with the head, then stream.
        The body goes to ``sink``, the handler's ``upstream_body`` unless given (the client's
        own send when nothing sits between: one call less per chunk)."""
        if sink is None:
            sink = handler.upstream_body
        early = self._early_body
        self._early_body = None
        if early:
            sink(early)
            if self._early_more is not None:
                self._hand_over_more(sink)
        if self.response_complete:
            if self._handler is not None:
                self._handler = None
                handler.upstream_complete()
        else:
            self._sink = sink  # (the rest of the body: on_body)

    def pause_reading(self) -> None:
        if not self._read_paused and self.transport is not None and self.state is ACTIVE:
            self._read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._read_paused and self.transport is not None and self.state is ACTIVE:
            self._read_paused = False
            self.last_read = self._clock()  # the idle timer restarts from now
            self.transport.resume_reading()
            self._arm_timer(self._read_timeout)

    def is_reusable(self, max_requests: int) -> bool:
        """May this connection carry another request (the pool's one question)?

        Only when the whole response was read, the whole request was sent, HTTP/1.1 both ways,
        nobody said ``Connection: close``, nothing unexpected arrived, and the connection has
        not reached ``keepalive_requests``.
        """
        return (
            self.response_complete
            and self.request_complete
            and not self._spent  # (also once closed)
            and not self._read_paused
            and (self.requests < max_requests or not max_requests)
        )

    def park(self, max_requests: int) -> bool:
        """Into the pool (IDLE) if this connection may carry another request; False, and
        nothing changed, if not. (The pool sets on_idle_lost.)"""
        # (is_reusable's conditions, written out: one call less for every pooled request)
        if not (
            self.response_complete
            and self.request_complete
            and not self._spent
            and not self._read_paused
            and (self.requests < max_requests or not max_requests)
        ):
            return False
        self.state = IDLE
        # (the handler was told the end: _handler is None; the parser stays for the next;
        # on_writable is None once the request is complete)
        self._owner = None
        return True

    def is_alive(self) -> bool:
        """Still open as far as the transport knows (the pool skips ones closing under it)."""
        return self.transport is not None and not self.transport.is_closing()

    def detach(self) -> tuple[asyncio.Transport, bytes]:
        """After a 101: hand the socket over (to a tunnel), with the bytes that came after the
        head; this object hears nothing more about it."""
        transport = self.transport
        assert transport is not None
        self.state = CLOSED
        self._spent = True
        self._cancel_timer()
        self._handler = self._owner = self._sink = None
        self._parser = self._full_parser = self._bare_parser = None
        self.on_writable = self.on_idle_lost = None
        data, self.upgraded_data = self.upgraded_data, b""
        self.transport = None
        if self._read_paused:
            self._read_paused = False
            transport.resume_reading()
        return transport, data

    def close(self) -> None:
        if self.state is not CLOSED:
            self.state = CLOSED
            self._spent = True
            self._cancel_timer()
            transport = self.transport
            if transport is not None:
                # (TLS: our transport sends its close_notify and does not wait for the peer's,
                # as nginx)
                transport.close()

    def abort(self) -> None:
        """Drop the connection now, telling nobody (the handler gave up on this response)."""
        self._handler = None
        if self.state is not CLOSED:
            self.state = CLOSED
            self._spent = True
            self._cancel_timer()
            if self.transport is not None:
                self.transport.abort()

    # ------------------------------------------------------------------ parser callbacks

    # (no on_status: the reason phrase is read from the head's bytes with the rest of it, one
    # parser callback less per response)

    def on_header(self, name: bytes, value: bytes) -> None:
        # (the full parser's: this runs for every header of a head not seen before: a lookup,
        # and for the usual hidden ones nothing more; the pairs themselves are parsed again
        # only if something reads them)
        kind = KINDS[name]
        if not kind or self._header_done:
            # hidden (Date, Server, ...); or past the head: a chunked body's trailer fields
            # (nginx does not pass them: they are no response header) or a second response
            # we never asked for (on_headers_complete marks the connection unusable). Maybe in
            # the read that brought the head, not yet handed on: not a word of them in that
            # head (the bare parser, for a head seen before, never sees them either)
            return
        # (the value's trailing blanks go; llhttp took the ones before it)
        if kind == _PASSED:
            self._response.lines += name + b": " + value.rstrip(b" \t") + b"\r\n"
        elif kind == _LENGTH:
            self._response.content_length = int(value)  # llhttp validated the digits and duplicates
        elif kind != _CONNECTION or value not in _PLAIN_CONNECTION:
            # (a plain "Connection: keep-alive" says nothing parser.should_keep_alive does not)
            value = value.rstrip(b" \t")
            response = self._response
            if kind == _REWRITABLE:
                response.lines += name + b": " + value + b"\r\n"
            response.note(kind, value)

    def on_headers_complete(self) -> None:
        if self.response_complete:
            self._spent = True  # a second response we never asked for
            return
        response = self._template
        if response is None:
            self._head_parsed()  # (the full parser's)
            return
        # the bare parser's: a head seen before, whole in the first read; the memo's head
        # (self._response already) says what the full parser found in the same bytes (status
        # line, headers, keep-alive)
        if response.close:
            self._spent = True
        self._head_buf = b""
        self._header_done = self._head_ready = True
        if self._head_only or response.status in (204, 304):
            self._complete_now_without_body()

    def _head_parsed(self) -> None:
        """on_headers_complete for the full parser: the head was noted header by header."""
        parser: httptools.HttpResponseParser = self._parser  # type: ignore[assignment]  # (its callback)
        status = parser.get_status_code()
        if status < 200 and status >= 100 and self._interim_head(status):
            return
        response = self._response
        response.status = status
        # (no get_http_version(): nobody reads the peer's version, and httptools builds it with
        # str.format, costly per response)
        if not parser.should_keep_alive():
            response.close = self._spent = True
        # (response.content_length stays None when response.chunked: llhttp refuses a
        # Content-Length beside a Transfer-Encoding)
        data = self._head_buf
        self._head_buf = b""
        # (self.received: len(data), the bytes read since the request started)
        if self.received <= _RAW_KEPT and not self._interim:
            response.raw = data  # (the usual head: a few hundred bytes, in one read)
            if not data.startswith(_OK_LINE):  # (the usual "OK" is ResponseHead's default)
                response.reason = response_head.status_reason(data)
            if self._head_key is not None:
                self._remember_head(response, data)
        else:
            response.keep_raw(data, self._interim, self._upgraded)
            self._interim = False
        self._header_done = self._head_ready = True
        if self._head_only or status in (204, 304):
            self._complete_now_without_body()

    def _interim_head(self, status: int) -> bool:
        """A 1xx head: the one to skip (nginx ignores interim responses, so do we), or the
        101 that ends the head (the client asked to switch; the exchange decides: a tunnel)."""
        if status == 101 and self.upgrade:
            self._upgraded = self._spent = True
            self._response.upgraded = True  # (its pairs are the 101's)
            return False
        self._interim = True
        self._response = ResponseHead()  # the real response follows
        return True

    def _remember_head(self, response: ResponseHead, data: bytes) -> None:
        """A head parsed with its callbacks (the full parser): keep what its headers said, for
        the next response that comes with the same bytes. Only a final head that started the
        read (no 1xx before it, not a 101), complete in it: then the bytes up to its first
        empty line decide every field of the template."""
        key: bytes = self._head_key  # type: ignore[assignment]  # (the caller checked)
        self._head_key = None
        self._memo_misses = misses = self._memo_misses + 1
        if misses > _MEMO_TRIAL and misses * 4 > self.requests:
            self._memo_on = False  # (this peer's heads do not repeat)
            return
        if (response.status >= 200 and not self._upgraded and key[-4:] == b"\r\n\r\n"
                and key[:5] == b"HTTP/" and data.startswith(key)):
            if len(HEADS) >= _HEADS_MAX:
                HEADS.clear()  # (peers choose the bytes: bounded)
            length = response.content_length
            whole = len(key) + length if length is not None else -1
            if response.status in (204, 304) or key.count(b"\n") != key.count(b"\r\n"):
                whole = -1
            HEADS[key] = self._seen = (response.remembered(key), whole, len(key))
            self._seen_key = key

    def on_body(self, data: bytes) -> None:
        if self.response_complete:
            self._spent = True  # body bytes for a HEAD response: unusable connection
            return
        self.body_received += len(data)
        early = self._early_body
        if early is None:  # (streaming)
            if self._handler is not None:  # (not if dropped by the handler while this read is parsed)
                self._sink(data)  # type: ignore[misc]  # (stream_to set it: _early_body is None)
        elif not early:
            self._early_body = data  # (stream_to hands it on)
        elif self._early_more is None:
            self._early_more = [data]
        else:
            self._early_more.append(data)

    def _hand_over_more(self, sink: Callable[[bytes], object]) -> None:
        """stream_to's part for the body chunks after the first that came with the head."""
        more = self._early_more
        self._early_more = None
        for chunk in more or ():
            sink(chunk)

    def on_message_complete(self) -> None:
        # (not after a 1xx head: the real response follows; after the 101 we take too: llhttp
        # ends its "message" at the head, the rest is the tunnel's)
        if self._header_done:
            self.response_complete = True  # (data_received tells the handler, after the parser)

    def _deliver_completion(self) -> None:
        """Tell the handler the response is complete, once, and never from inside the parser:
        the handler may reuse this very connection for the next request right away."""
        handler = self._handler
        if self._early_body is None and self.response_complete and handler is not None:
            self._handler = self._sink = None
            handler.upstream_complete()

    # ------------------------------------------------------------------ internals

    def _head_too_big(self, data: bytes) -> bool:
        """``data`` takes the head past ``head_limit``: does the head end within the limit?
        (Checked before httptools accumulates a header line of any length.)"""
        room = self.head_limit - (self.received - len(data))  # the head must end within these bytes of data
        return (data.find(b"\n\r\n", 0, room) == -1 and data.find(b"\n\n", 0, room) == -1
                and not data.startswith((b"\n", b"\r\n")))

    def _complete_now_without_body(self) -> None:
        # HEAD, 204, 304: llhttp cannot be told a HEAD response has no body, so we end the
        # response ourselves; any byte after it marks the connection unusable (on_body).
        self.response_complete = True
        if self._head_only:
            self._needs_parser = True  # (llhttp would read the next response as this one's body)

    def _is_close_delimited(self) -> bool:
        response = self._response
        return response.content_length is None and not response.chunked

    def _fail(self, failure: Failure, message: str, phase: str = "") -> None:
        """Close the connection and tell the handler, once."""
        if not phase:
            told = self._header_done and not self._head_ready  # (the handler has the head)
            phase = "reading upstream" if told else "reading response header from upstream"
        err = UpstreamError(failure, message, phase=phase, response_started=self.response_started,
                            request_sent=self.request_sent)
        handler = self._handler
        self._handler = None
        self.close()
        if handler is not None:
            handler.upstream_failed(err)

    def _fail_parse(self) -> None:
        if self._header_done:
            self._fail(Failure.ERROR, "upstream sent invalid chunked response")
        else:
            self._fail(Failure.INVALID_HEADER, "upstream sent invalid header")

    def _unexpected_bytes(self) -> None:
        # Data on an idle connection, or after the response ended: the peer is confused or
        # closing; the connection can not carry another request.
        self._spent = True
        if self.state is IDLE:
            self.close()
            self._notify_idle_lost()

    def _notify_idle_lost(self) -> None:
        callback = self.on_idle_lost
        if callable(callback):
            callback(self)

    def _arm_timer(self, timeout: float) -> None:
        """Make sure the timer fires no later than ``timeout`` from now. It is left pending
        between requests (it re-checks the state when it fires), so a busy keep-alive
        connection schedules about one timer per timeout period, not one per request."""
        when = self.loop.time() + timeout
        if when < self._timer_when:  # (always when there is no timer: _NEVER)
            if self._timer is not None:
                self._timer.cancel()
            self._timer_when = when
            self._timer = self.loop.call_at(when, self._on_timer)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_when = _NEVER

    def _on_timer(self) -> None:
        try:
            self._timer_fired()
        except Exception as exc:
            self._crashed(exc, "reading upstream")

    def _timer_fired(self) -> None:
        self._timer = None
        self._timer_when = _NEVER
        if self.state is not ACTIVE or self.response_complete:
            return
        now = self.loop.time()
        if self._write_paused:
            deadline = self._write_paused_at + self._send_timeout
        elif self._read_paused:
            return  # the client is slow; the client side's send timer watches that
        else:
            deadline = self.last_read + self._read_timeout
        if now < deadline:
            self._timer_when = deadline
            self._timer = self.loop.call_at(deadline, self._on_timer)
            return
        self._fail(Failure.TIMEOUT, _TIMED_OUT, "sending request to upstream" if self._write_paused else "")
