"""Peer-side protocol on raw bytes: the request goes to a fake transport, responses are fed in."""

from __future__ import annotations

import asyncio
import inspect

import httptools
import pytest
from helpers import run_loop_until

from scriptlb.http import upstream
from scriptlb.http.response_head import ResponseHead
from scriptlb.http.upstream import ConnState, UpstreamConnection, UpstreamError
from scriptlb.request.retry import Failure

HEAD = b"GET / HTTP/1.1\r\nHost: u\r\n\r\n"


class FakeTransport:
    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = False
        self.reading = True

    def write(self, data: bytes) -> None:
        self.data += data

    def writelines(self, chunks: object) -> None:
        for chunk in chunks:  # type: ignore[attr-defined]
            self.data += chunk

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    abort = close

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True


class Handler:
    """Records the outcome; accepts the body as soon as the head arrives unless told not to."""

    def __init__(self, conn: UpstreamConnection, accept: bool = True) -> None:
        self.conn = conn
        self.accept = accept
        self.head: ResponseHead | None = None
        self.body = b""
        self.complete = False
        self.error: UpstreamError | None = None

    def upstream_head(self, response: ResponseHead) -> None:
        self.head = response
        if self.accept:
            self.conn.stream_to(self)

    def upstream_body(self, data: bytes) -> None:
        self.body += data

    def upstream_complete(self) -> None:
        self.complete = True

    def upstream_failed(self, err: UpstreamError) -> None:
        assert self.error is None, "told twice"
        self.error = err


def connect(loop: asyncio.AbstractEventLoop) -> tuple[UpstreamConnection, FakeTransport]:
    conn = UpstreamConnection(loop, ("127.0.0.1:1", ""), "127.0.0.1:1")
    transport = FakeTransport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    return conn, transport


def send(conn: UpstreamConnection, body: bytes | None = b"", head_only: bool = False,
         read_timeout: float = 60.0, accept: bool = True) -> Handler:
    handler = Handler(conn, accept)
    conn.start(handler, HEAD, body, read_timeout, 60.0, head_only=head_only, http11=True, close_after=False)
    return handler


def test_request_written_and_response_streamed(loop: asyncio.AbstractEventLoop) -> None:
    conn, transport = connect(loop)
    handler = send(conn, b"body", accept=False)
    assert bytes(transport.data) == HEAD + b"body"
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nX-A: 1\r\n\r\n01234")
    response = handler.head
    assert response is not None
    assert (response.status, response.content_length) == (200, 10)
    assert response.headers == [(b"Content-Length", b"10"), (b"X-A", b"1")]
    assert handler.body == b""  # held until the handler accepts the body
    conn.stream_to(handler)  # what came with the head is handed over first
    assert handler.body == b"01234" and not handler.complete
    conn.data_received(b"56789")
    assert handler.body == b"0123456789" and handler.complete
    assert conn.is_reusable(max_requests=100)
    assert not conn.is_reusable(max_requests=1)  # keepalive_requests reached


def test_chunked_response_is_decoded(loop: asyncio.AbstractEventLoop) -> None:
    conn, _ = connect(loop)
    handler = send(conn)
    conn.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    assert handler.head is not None and handler.head.chunked and handler.head.content_length is None
    assert handler.body == b"abc" and handler.complete and conn.is_reusable(0)


@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n",
    ],
)
def test_not_reusable_when_the_peer_closes(loop: asyncio.AbstractEventLoop, response: bytes) -> None:
    conn, _ = connect(loop)
    handler = send(conn)
    conn.data_received(response)
    assert handler.head is not None and handler.head.close and handler.complete
    assert not conn.is_reusable(0)


def test_interim_1xx_is_skipped(loop: asyncio.AbstractEventLoop) -> None:
    conn, _ = connect(loop)
    handler = send(conn)
    conn.data_received(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
                       b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
    assert handler.head is not None and handler.head.status == 201
    assert handler.head.headers == [(b"Content-Length", b"0")]


def test_garbage_is_an_invalid_header(loop: asyncio.AbstractEventLoop) -> None:
    conn, transport = connect(loop)
    handler = send(conn)
    conn.data_received(b"SSH-2.0-OpenSSH\r\n\r\n")
    err = handler.error
    assert err is not None and err.failure is Failure.INVALID_HEADER and handler.head is None
    assert str(err) == "upstream sent invalid header"
    assert transport.closed and conn.state is ConnState.CLOSED
    conn.connection_lost(None)  # the close that follows reports nothing more


def test_close_before_the_head_is_an_error(loop: asyncio.AbstractEventLoop) -> None:
    conn, _ = connect(loop)
    handler = send(conn)
    conn.connection_lost(None)
    err = handler.error
    assert err is not None and err.failure is Failure.ERROR
    assert str(err) == "upstream prematurely closed connection"
    assert err.phase == "reading response header from upstream" and not err.response_started


def test_close_mid_body_fails_the_handler(loop: asyncio.AbstractEventLoop) -> None:
    conn, _ = connect(loop)
    handler = send(conn)
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n012")
    conn.connection_lost(None)
    assert handler.error is not None and str(handler.error) == "upstream prematurely closed connection"
    assert handler.error.phase == "reading upstream" and not handler.complete and handler.body == b"012"


def test_close_delimited_body_ends_with_the_connection(loop: asyncio.AbstractEventLoop) -> None:
    conn, _ = connect(loop)
    handler = send(conn)
    conn.data_received(b"HTTP/1.0 200 OK\r\n\r\nuntil")
    conn.data_received(b" close")
    conn.connection_lost(None)
    assert handler.body == b"until close" and handler.complete and handler.error is None


def test_head_response_ends_at_the_head(loop: asyncio.AbstractEventLoop) -> None:
    conn, _ = connect(loop)
    handler = send(conn, head_only=True)
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
    assert handler.head is not None and handler.head.content_length == 10
    assert handler.complete and conn.is_reusable(0)


def test_dropped_response_tells_nothing_more(loop: asyncio.AbstractEventLoop) -> None:
    conn, transport = connect(loop)
    handler = send(conn, accept=False)
    conn.data_received(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 5\r\n\r\nbad")
    conn.abort()  # the exchange retries elsewhere
    conn.data_received(b"ga")
    conn.connection_lost(None)
    assert transport.closed and handler.error is None and not handler.complete and handler.body == b""


def test_unexpected_bytes_make_the_connection_unusable(loop: asyncio.AbstractEventLoop) -> None:
    conn, _ = connect(loop)
    send(conn)
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA")
    assert not conn.is_reusable(0)


def test_idle_connection_receiving_data_is_dropped(loop: asyncio.AbstractEventLoop) -> None:
    conn, transport = connect(loop)
    send(conn)
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    lost: list[UpstreamConnection] = []
    assert conn.park(0)
    conn.on_idle_lost = lost.append
    conn.data_received(b"HTTP/1.1 408 Request Time-out\r\n\r\n")
    assert lost == [conn] and transport.closed and conn.state is ConnState.CLOSED


def test_read_timeout(loop: asyncio.AbstractEventLoop) -> None:
    conn, _ = connect(loop)
    handler = send(conn, read_timeout=0.05)
    run_loop_until(loop, lambda: handler.error is not None)
    err = handler.error
    assert err is not None and err.failure is Failure.TIMEOUT
    assert str(err) == "upstream timed out (110: Connection timed out)"


def test_back_pressure_pauses_reading_and_suspends_the_read_timer(loop: asyncio.AbstractEventLoop) -> None:
    conn, transport = connect(loop)
    handler = send(conn, read_timeout=0.05)
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0")
    conn.pause_reading()
    assert not transport.reading
    loop.run_until_complete(asyncio.sleep(0.15))  # longer than the read timeout: paused, not late
    assert handler.error is None
    conn.resume_reading()
    conn.data_received(b"123456789")
    assert handler.complete and handler.body == b"0123456789" and conn.is_reusable(0)


def test_completion_is_delivered_after_the_parser_returns(loop: asyncio.AbstractEventLoop) -> None:
    conn, _ = connect(loop)
    handler = send(conn)
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
    seen: list[bool] = []
    handler.upstream_complete = lambda: seen.append(  # type: ignore[method-assign]
        any(frame.function.startswith("on_") for frame in inspect.stack()))  # a parser callback
    conn.data_received(b"cd")
    assert seen == [False]  # the handler may reuse the connection at once: not mid-parse


def test_a_second_response_after_the_first_is_never_mixed_in(loop: asyncio.AbstractEventLoop) -> None:
    conn, _ = connect(loop)
    handler = send(conn)
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: 1\r\n\r\nok"
                       b"HTTP/1.1 500 Oops\r\nX-B: 2\r\nContent-Length: 0\r\n\r\n")
    assert handler.head is not None and handler.head.status == 200
    assert handler.head.headers == [(b"Content-Length", b"2"), (b"X-A", b"1")]
    assert handler.head.client_headers() == b"X-A: 1\r\n" and handler.head.content_length == 2
    assert handler.complete and handler.error is None and not conn.is_reusable(0)


def test_garbage_after_a_complete_response_is_not_a_failure(loop: asyncio.AbstractEventLoop) -> None:
    conn, _ = connect(loop)
    handler = send(conn)
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok\x00\x01\x02garbage")
    assert handler.complete and handler.error is None and not conn.is_reusable(0)


def test_start_on_a_transport_closing_under_us_fails_soon_instead_of_raising(
    loop: asyncio.AbstractEventLoop,
) -> None:
    conn, transport = connect(loop)
    transport.closed = True  # the peer closed; uvloop would raise on write
    handler = send(conn)
    assert handler.error is None and transport.data == b""  # nothing raised, nothing written
    run_loop_until(loop, lambda: handler.error is not None)
    assert handler.error is not None and str(handler.error) == "upstream prematurely closed connection"
    assert not handler.error.request_sent


# ---------------------------------------------------------------- the response head, read lean


def test_head_lines_for_the_client_and_pairs_read_only_when_asked(loop: asyncio.AbstractEventLoop) -> None:
    conn, _ = connect(loop)
    handler = send(conn)
    conn.data_received(b"HTTP/1.1 200 Fine\r\nServer: peer\r\nDate: x\r\nX-Tail:  spaced \t\r\n"
                       b"content-LENGTH: 2\r\nCONNECTION: keep-alive\r\nX-Accel-Buffering: no\r\n"
                       b"Set-Cookie: a=1\r\n\r\nok")
    response = handler.head
    assert response is not None and handler.complete and handler.body == b"ok"
    assert (response.status, response.reason, response.content_length) == (200, b"Fine", 2)
    assert not response.close and response.rewritable  # (Set-Cookie: proxy_cookie_* may edit it)
    # hidden: framing, Date, Server, X-Accel-*; blanks around a value go, as llhttp parses it
    assert response.client_headers() == b"X-Tail: spaced\r\nSet-Cookie: a=1\r\n"
    assert response._headers is None  # nobody asked for the pairs yet
    assert list(response) == [(b"Server", b"peer"), (b"Date", b"x"), (b"X-Tail", b"spaced"),
                              (b"content-LENGTH", b"2"), (b"CONNECTION", b"keep-alive"),
                              (b"X-Accel-Buffering", b"no"), (b"Set-Cookie", b"a=1")]
    assert len(response) == 7 and response[2] == (b"X-Tail", b"spaced")


def test_a_head_split_across_reads_mid_name(loop: asyncio.AbstractEventLoop) -> None:
    conn, _ = connect(loop)
    handler = send(conn)
    pieces = (b"HTTP/1.1 201 Cre", b"ated\r\nX-Lo", b"ng: va", b"lue\r\nConte", b"nt-Length: 3\r\n\r",
              b"\nabc")
    for piece in pieces:
        conn.data_received(piece)
    response = handler.head
    assert response is not None and handler.body == b"abc" and handler.complete
    assert (response.status, response.reason, response.content_length) == (201, b"Created", 3)
    assert response.client_headers() == b"X-Long: value\r\n"
    assert response.headers == [(b"X-Long", b"value"), (b"Content-Length", b"3")]


def test_the_pairs_are_the_final_heads_after_an_interim_one(loop: asyncio.AbstractEventLoop) -> None:
    conn, _ = connect(loop)
    handler = send(conn)
    conn.data_received(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n")
    conn.data_received(b"HTTP/1.1 200 OK\r\nX-B: 2\r\nContent-Length: 0\r\n\r\n")
    response = handler.head
    assert response is not None and response.status == 200 and handler.complete
    assert response.client_headers() == b"X-B: 2\r\n" and response.reason == b"OK"
    assert response.headers == [(b"X-B", b"2"), (b"Content-Length", b"0")]
    assert conn.is_reusable(max_requests=100)


def test_the_pairs_of_a_head_read_with_a_large_body(loop: asyncio.AbstractEventLoop) -> None:
    conn, _ = connect(loop)
    handler = send(conn)
    body = b"x" * 100_000
    conn.data_received(b"HTTP/1.1 200 OK\r\nX-A: 1\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    response = handler.head
    assert response is not None and handler.body == body and handler.complete
    assert len(response.raw) < 100  # the head is kept for the pairs, not the body read with it
    assert response.headers == [(b"X-A", b"1"), (b"Content-Length", b"100000")]


def test_a_header_named_in_connection_is_hop_by_hop(loop: asyncio.AbstractEventLoop) -> None:
    conn, _ = connect(loop)
    handler = send(conn)
    conn.data_received(b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nX-End: 2\r\n"
                       b"Content-Length: 0\r\n\r\n")
    response = handler.head
    assert response is not None and response.connection == b"keep-alive, X-Hop"
    assert response.client_headers() == b"X-End: 2\r\n"


@pytest.mark.parametrize("head", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok",  # duplicate length
    b"HTTP/1.1 200 OK\r\nX-A: 1\r\n folded\r\nContent-Length: 2\r\n\r\nok",  # obs-fold
])
def test_odd_framing_is_an_invalid_header(loop: asyncio.AbstractEventLoop, head: bytes) -> None:
    conn, transport = connect(loop)
    handler = send(conn)
    conn.data_received(head)
    assert handler.head is None and handler.error is not None and transport.closed
    assert handler.error.failure == Failure.INVALID_HEADER
    assert str(handler.error) == "upstream sent invalid header"


def test_a_chunked_response_in_mixed_case_has_no_length(loop: asyncio.AbstractEventLoop) -> None:
    conn, _ = connect(loop)
    handler = send(conn)
    conn.data_received(b"HTTP/1.1 200 OK\r\ntransfer-ENCODING: chunked\r\nX-A: 1\r\n\r\n2\r\nok\r\n0\r\n\r\n")
    response = handler.head
    assert response is not None and response.chunked and response.content_length is None
    assert handler.body == b"ok" and handler.complete and response.client_headers() == b"X-A: 1\r\n"


class _StatusRecorder:
    """llhttp's own view of a status line: what its on_status callback reports."""

    def __init__(self) -> None:
        self.reason = b""

    def on_status(self, status: bytes) -> None:
        self.reason += status


@pytest.mark.parametrize("line", [
    b"HTTP/1.1 200 OK\r\n", b"HTTP/1.1 404 Not Found\r\n", b"HTTP/1.0 200 OK\r\n", b"HTTP/1.1 200\r\n",
    b"HTTP/1.1 200 \r\n", b"HTTP/1.1 200  two spaces \r\n", b"HTTP/1.1 200 bare LF\n", b"HTTP/1.1 200\n",
    b"\r\n\r\nHTTP/1.1 200 after empty lines\r\n", b"HTTP/1.1 099 Low\r\n",
    b"HTTP/1.1 200 \xff\x80 obs-text\r\n", b"RTSP/1.0 200 OK\r\n", b"HTTP/1.1 302 Moved\tTemporarily\r\n",
])
def test_the_reason_phrase_is_llhttps(loop: asyncio.AbstractEventLoop, line: bytes) -> None:
    """The reason phrase is read from the head's bytes, not from a parser callback: the same
    bytes as llhttp's on_status, however the peer writes its status line."""
    recorder = _StatusRecorder()
    parser = httptools.HttpResponseParser(recorder)
    parser.set_dangerous_leniencies(lenient_optional_cr_before_lf=True)
    parser.feed_data(line + b"Content-Length: 0\r\n\r\n")
    conn, _ = connect(loop)
    handler = send(conn)
    conn.data_received(line + b"Content-Length: 0\r\n\r\n")
    assert handler.head is not None and handler.complete
    assert handler.head.reason == recorder.reason


# Heads a peer may send, each read the first time by the full parser (a callback per header)
# and the next time, the same bytes, by the bare parser (the memo's template) when the memo
# keeps it (None: only when the head comes in a read of its own, a first read past RAW_KEPT is
# not kept): what the exchange sees must not tell the two apart.
_REMEMBERED_HEADS = [
    (True, b"HTTP/1.1 200 OK\r\nServer: s\r\nDate: d\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n"
           b"Connection: keep-alive\r\n\r\nok"),
    (True, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A:  1 \t\r\n\r\n"
           b"2\r\nok\r\n0\r\nX-T: t\r\n\r\n"),
    (True, b"HTTP/1.1 201 Created Here\r\nLocation: /x\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n"
           b"Content-Length: 2\r\n\r\nok"),
    (True, b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Hop\r\nX-Hop: h\r\nX-Keep: k\r\n"
           b"Content-Length: 2\r\n\r\nok"),
    (True, b"HTTP/1.1 200 OK\r\nConnection: Keep-Alive \r\nContent-Length: 2\r\n\r\nok"),
    (True, b"HTTP/1.1 200 OK\nX-Bare: lf\nContent-Length: 6\n\nok\r\n\r\n"),  # (the key runs into the body)
    (True, b"HTTP/1.1 404 \r\nContent-Length: 0\r\n\r\n"),
    (True, b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok"),
    (True, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"),
    (True, b"HTTP/1.1 200 OK\r\nX-Accel-Redirect: /in\r\nX-Accel-Buffering: no\r\nContent-Length: 0\r\n\r\n"),
    (True, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nX-Second: 2\r\n\r\n"),
    (False, b"\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),  # (the key must start the head)
    (None, b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n" + b"x" * 5000),  # (kept when read apart)
    (False, b"HTTP/1.1 200 OK\r\nX-Big: " + b"v" * 5000 + b"\r\nContent-Length: 0\r\n\r\n"),
]


def _seen(handler: Handler) -> tuple[object, ...]:
    head = handler.head
    assert head is not None
    return (head.status, head.reason, head.close, head.content_length, head.chunked, head.connection,
            head.rewritable, head.lines, head.client_headers(), head.headers, handler.body, handler.complete,
            handler.error)


def _header_callbacks(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The names of the headers the full parser's on_header callback will see, in order."""
    calls: list[bytes] = []
    full = UpstreamConnection.on_header

    def counted(self: UpstreamConnection, name: bytes, value: bytes) -> None:
        calls.append(name)
        full(self, name, value)

    monkeypatch.setattr(UpstreamConnection, "on_header", counted)
    return calls


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize(("kept", "response"), _REMEMBERED_HEADS)
def test_a_head_seen_before_reads_the_same_without_header_callbacks(
        loop: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch, kept: bool | None,
        response: bytes, split: bool) -> None:
    """Whole, a response seen before is not parsed at all (its head and body are known);
    split after its head (``split``), the bare parser reads it."""
    calls = _header_callbacks(monkeypatch)
    kept = split if kept is None else kept
    cut = response.find(b"\r\n\r\n") + 4 if split else len(response)
    upstream.HEADS.clear()
    seen = []
    per_read = []
    for _ in range(2):
        conn, _ = connect(loop)  # (a new connection each time: the memo is the worker's)
        handler = send(conn)
        conn.data_received(response[:cut])
        if response[cut:]:
            conn.data_received(response[cut:])
        seen.append((_seen(handler), conn.is_reusable(0)))
        per_read.append(len(calls))
    assert seen[0] == seen[1]
    assert bool(upstream.HEADS) is kept
    assert per_read[0] > 0
    assert per_read[1] == per_read[0] if kept else per_read[1] == 2 * per_read[0]


def test_a_head_seen_before_is_remembered_and_reused(loop: asyncio.AbstractEventLoop) -> None:
    upstream.HEADS.clear()
    response = b"HTTP/1.1 200 OK\r\nServer: s\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"
    conn, _ = connect(loop)
    for _ in range(3):
        handler = send(conn)
        conn.data_received(response)
        assert handler.complete and handler.body == b"ok" and conn.park(0)
        conn.state = ConnState.ACTIVE  # (what the pool's acquire does)
    assert list(upstream.HEADS) == [response[:-2]]


@pytest.mark.parametrize("response", [
    b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Le",  # (the head in two reads)
    b"RTSP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n",
])
def test_heads_not_read_whole_from_the_first_read_are_not_remembered(
        loop: asyncio.AbstractEventLoop, response: bytes) -> None:
    upstream.HEADS.clear()
    conn, _ = connect(loop)
    handler = send(conn)
    conn.data_received(response)
    if handler.head is None:
        conn.data_received(b"ngth: 0\r\n\r\n")
    assert handler.head is not None and handler.complete
    assert not upstream.HEADS


def test_a_peer_whose_heads_never_repeat_stops_filling_the_memo(loop: asyncio.AbstractEventLoop) -> None:
    upstream.HEADS.clear()
    conn, _ = connect(loop)
    for i in range(40):
        handler = send(conn)
        conn.data_received(b"HTTP/1.1 200 OK\r\nX-Request-Id: %d\r\nContent-Length: 0\r\n\r\n" % i)
        assert handler.complete and handler.head is not None
        assert handler.head.lines == b"X-Request-Id: %d\r\n" % i
        assert conn.park(0)
        conn.state = ConnState.ACTIVE
    assert 0 < len(upstream.HEADS) < 40


def test_the_memo_is_bounded(loop: asyncio.AbstractEventLoop) -> None:
    upstream.HEADS.clear()
    for i in range(600):
        conn, _ = connect(loop)
        send(conn)
        conn.data_received(b"HTTP/1.1 200 OK\r\nX-Request-Id: %d\r\nContent-Length: 0\r\n\r\n" % i)
    assert 0 < len(upstream.HEADS) <= 256


@pytest.mark.parametrize("response", [response for kept, response in _REMEMBERED_HEADS if kept])
def test_a_head_seen_before_on_the_same_connection_reads_the_same(
        loop: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch, response: bytes) -> None:
    """A connection knows the last head it found in the memo by its bytes alone (no look-up):
    the same response again on it reads as the full parser read it the first time."""
    calls = _header_callbacks(monkeypatch)
    upstream.HEADS.clear()
    conn, _ = connect(loop)
    seen = []
    per_read = []
    for _ in range(3):
        handler = send(conn)
        conn.data_received(response)
        seen.append(_seen(handler))
        per_read.append(len(calls))
        if not conn.park(0):
            break  # (a response that ends the connection: once is all it gets)
        conn.state = ConnState.ACTIVE  # (what the pool's acquire does)
        upstream.HEADS.clear()  # (only the connection's own memory of the head is left)
    assert all(one == seen[0] for one in seen)
    assert per_read[0] > 0 and all(count == per_read[0] for count in per_read)  # one full parse
