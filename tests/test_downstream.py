"""Client-side protocol on raw bytes: a fake transport records what the connection writes, a
fake handler records what it is told; no sockets."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import run_loop_until

from scriptlb.config.model import ErrorLogConf
from scriptlb.http import downstream
from scriptlb.http.downstream import ClientConnection, ListenerContext, Request
from scriptlb.logs import errorlog


class FakeTransport:
    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = False
        self.aborted = False
        self.reading = True

    def write(self, data: bytes) -> None:
        assert not self.closed
        self.data += data

    def writelines(self, chunks: object) -> None:
        for chunk in chunks:  # type: ignore[attr-defined]
            self.write(chunk)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def abort(self) -> None:
        self.closed = self.aborted = True

    def can_write_eof(self) -> bool:
        return False  # (lingering close is tested through real sockets)

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str) -> object:
        return {"peername": ("127.0.0.1", 50000), "sockname": ("127.0.0.1", 8080)}.get(name)

    def take(self) -> bytes:
        data = bytes(self.data)
        self.data.clear()
        return data


class FakeHandler:
    """Records the calls; answers with ``reply`` as soon as the request is complete."""

    def __init__(self, conn: ClientConnection, request: Request, reply: bytes | None = b"ok",
                 max_body_size: int = 1024) -> None:
        self.conn = conn
        self.request = request
        self.reply = reply
        self.max_body_size = max_body_size
        self.client_body = None  # bodies stay in memory
        self.body_timeout = 60.0
        self.keepalive_timeout = 75.0
        self.keepalive_requests = 100
        self.events: list[str] = []
        self.body = b""

    def start(self) -> None:
        self.events.append("start")
        self._maybe_reply()

    def body_received(self) -> None:
        self.body += self.request.take_body()
        self.events.append("body")
        self._maybe_reply()

    def _maybe_reply(self) -> None:
        if self.reply is not None and (self.request.complete or not self.request.has_body):
            reply, self.reply = self.reply, None
            self.conn.respond(200, b"Content-Type: text/plain\r\n", reply + b":" + self.body)

    def client_eof(self) -> bool:
        return False

    def client_lost(self) -> None:
        self.events.append("lost")

    def abort(self, status: int) -> None:
        self.events.append(f"abort {status}")

    def writing_paused(self) -> None:
        self.events.append("paused")

    def writing_resumed(self) -> None:
        self.events.append("resumed")


class Harness:
    def __init__(
        self, loop: asyncio.AbstractEventLoop, reply: bytes | None = b"ok", **listener: object
    ) -> None:
        self.handlers: list[FakeHandler] = []

        def open_exchange(conn: ClientConnection, request: Request) -> FakeHandler:
            handler = FakeHandler(conn, request, reply)
            self.handlers.append(handler)
            return handler

        self.context = ListenerContext(open_exchange, **listener)  # type: ignore[arg-type]
        self.conn = ClientConnection(self.context, loop)
        self.transport = FakeTransport()
        self.conn.connection_made(self.transport)  # type: ignore[arg-type]

    def feed(self, data: bytes) -> bytes:
        self.conn.data_received(data)
        return self.transport.take()


@pytest.fixture
def log_file(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "error.log"
    previous = errorlog.install(errorlog.ErrorLog([ErrorLogConf(str(path), "info")]))
    yield path
    errorlog.install(previous).close()


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def test_simple_request_and_keepalive_response(loop: asyncio.AbstractEventLoop) -> None:
    h = Harness(loop)
    out = h.feed(b"GET /a?b=1 HTTP/1.1\r\nHost: example\r\nX-Trail: v  \r\n\r\n")
    request = h.handlers[0].request
    assert (request.method, request.target, request.version) == ("GET", b"/a?b=1", "1.1")
    assert request.headers == [(b"Host", b"example"), (b"X-Trail", b"v")]
    assert out.startswith(b"HTTP/1.1 200 OK\r\nServer: scriptlb\r\nDate: ")
    assert out.endswith(b"Content-Length: 3\r\nConnection: keep-alive\r\n\r\nok:")
    assert not h.transport.closed and h.transport.reading


def test_pipelined_requests_are_answered_in_order(loop: asyncio.AbstractEventLoop) -> None:
    h = Harness(loop, reply=None)
    h.feed(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTTP/1.1\r\nHost: x\r\n\r\n")
    first, second = h.handlers
    # (a request without a body is not told its body is complete: start() had all of it)
    assert first.events == ["start"] and second.events == []
    assert not h.transport.reading  # no parsing further ahead while /1 is in flight
    h.conn.respond(200, b"", b"one")
    assert second.events == ["start"]  # it was complete before it became active
    h.conn.respond(200, b"", b"two")
    out = h.transport.take()
    assert out.index(b"one") < out.index(b"two")
    assert h.transport.reading


@pytest.mark.parametrize(
    ("raw", "status", "logged"),
    [
        (b"\x16\x03\x01garbage\r\n\r\n", 400,
         "client sent invalid request while reading client request line"),
        (b"GET / HTTP/1.1\r\nHo st: x\r\n\r\n", 400, "client sent invalid header line"),
        (b"GET / HTTP/1.1\r\n\r\n", 400, 'client sent HTTP/1.1 request without "Host" header'),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400,
         'client sent "Content-Length" and "Transfer-Encoding" headers at the same time'),
        (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n", 400,
         'client sent "Content-Length" and "Transfer-Encoding" headers at the same time'),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc", 400,
         'client sent duplicate header line: "Content-Length"'),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabc", 400,
         'client sent duplicate header line: "Content-Length"'),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3, 3\r\n\r\nabc", 400,
         'client sent invalid "Content-Length" header'),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 9223372036854775808\r\n\r\n", 400,
         'client sent invalid "Content-Length" header'),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: " + b"9" * 5001 + b"\r\n\r\n", 400,
         'client sent invalid "Content-Length" header'),
        (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 501,
         'client sent unknown "Transfer-Encoding": "gzip"'),
        (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400,
         "client sent invalid chunked body"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, "duplicate host header"),
        (b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n", 405, "invalid method"),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2000\r\n\r\n", 413,
         "client intended to send too large body: 2000 bytes"),
    ],
)
def test_bad_requests_get_an_error_and_the_connection_closes(
    loop: asyncio.AbstractEventLoop, log_file: Path, raw: bytes, status: int, logged: str
) -> None:
    h = Harness(loop)
    out = h.feed(raw)
    assert status_of(out) == status
    assert b"Connection: close\r\n" in out
    assert h.transport.closed
    # nothing was served; a request whose body turned out bad was told so
    assert all("start" not in handler.events or f"abort {status}" in handler.events for handler in h.handlers)
    line = log_file.read_text()
    assert "[info]" in line and logged in line and "client: 127.0.0.1" in line


def test_header_over_large_client_header_buffers(loop: asyncio.AbstractEventLoop) -> None:
    h = Harness(loop, header_buffers=(2, 1024))
    out = h.feed(b"GET / HTTP/1.1\r\nHost: x\r\nCookie: " + b"c" * 1100 + b"\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"Request Header Or Cookie Too Large" in out
    h = Harness(loop, header_buffers=(2, 1024))
    many = b"".join(b"X-%d: %s\r\n" % (i, b"v" * 500) for i in range(5))
    assert h.feed(b"GET / HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n").startswith(b"HTTP/1.1 400 ")
    h = Harness(loop, header_buffers=(2, 1024))
    assert h.feed(b"GET /" + b"u" * 1100 + b" HTTP/1.1\r\n").startswith(b"HTTP/1.1 414 ")


def test_chunked_body_is_decoded_and_size_limited(loop: asyncio.AbstractEventLoop) -> None:
    h = Harness(loop)
    out = h.feed(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
    assert out == b"" and h.handlers[0].body == b"abc"
    out = h.feed(b"2\r\nde\r\n0\r\n\r\n")
    assert out.endswith(b"ok:abcde")
    h = Harness(loop)
    out = h.feed(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"400\r\n" + b"a" * 1024 + b"\r\n1\r\nb\r\n")
    assert status_of(out) == 413 and h.transport.closed
    assert h.handlers[0].events[-1] == "abort 413"


def test_expect_100_continue_sent_when_the_handler_asks(loop: asyncio.AbstractEventLoop) -> None:
    h = Harness(loop, reply=None)
    assert h.feed(b"PUT / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n") == b""
    h.conn.send_continue()
    assert h.transport.take() == b"HTTP/1.1 100 Continue\r\n\r\n"
    h.conn.send_continue()  # only once
    assert h.transport.take() == b""


def test_head_response_has_headers_but_no_body(loop: asyncio.AbstractEventLoop) -> None:
    h = Harness(loop, reply=None)
    h.feed(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n")
    h.conn.send_head(200, b"", 10)
    h.conn.send_body(b"0123456789")
    h.conn.finish_response()
    out = h.transport.take()
    assert b"Content-Length: 10\r\n" in out and out.endswith(b"\r\n\r\n")


def test_unknown_length_is_chunked_for_11_and_close_delimited_for_10(loop: asyncio.AbstractEventLoop) -> None:
    h = Harness(loop, reply=None)
    h.feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    h.conn.send_head(200, b"", None)
    h.conn.send_body(b"hello")
    h.conn.finish_response()
    out = h.transport.take()
    assert b"Transfer-Encoding: chunked\r\n" in out and out.endswith(b"\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    assert not h.transport.closed
    h = Harness(loop, reply=None)
    h.feed(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    h.conn.send_head(200, b"", None)
    h.conn.send_body(b"hello")
    h.conn.finish_response()
    out = h.transport.take()
    assert b"Transfer-Encoding" not in out and b"Connection: close\r\n" in out and out.endswith(b"hello")
    assert h.transport.closed


def test_no_body_statuses(loop: asyncio.AbstractEventLoop) -> None:
    for status in (204, 304):
        h = Harness(loop, reply=None)
        h.feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        h.conn.send_head(status, b"", None)
        h.conn.send_body(b"ignored")
        h.conn.finish_response()
        out = h.transport.take()
        assert b"Content-Length" not in out and b"Transfer-Encoding" not in out
        assert out.endswith(b"\r\n\r\n")


def test_connection_close_and_http10_without_keepalive(loop: asyncio.AbstractEventLoop) -> None:
    h = Harness(loop)
    out = h.feed(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert b"Connection: close\r\n" in out and h.transport.closed
    h = Harness(loop)
    out = h.feed(b"GET / HTTP/1.0\r\n\r\n")
    assert b"Connection: close\r\n" in out and h.transport.closed
    h = Harness(loop)
    out = h.feed(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    assert b"Connection: keep-alive\r\n" in out and not h.transport.closed


def test_keepalive_requests_limit(loop: asyncio.AbstractEventLoop) -> None:
    h = Harness(loop)
    for _ in range(1, 200):
        out = h.feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        if h.transport.closed:
            break
    assert len(h.handlers) == 100  # FakeHandler.keepalive_requests
    assert b"Connection: close\r\n" in out


def test_flow_control_is_forwarded_to_the_active_request(loop: asyncio.AbstractEventLoop) -> None:
    h = Harness(loop, reply=None)
    h.feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    h.conn.pause_writing()
    h.conn.resume_writing()
    assert h.handlers[0].events == ["start", "paused", "resumed"]


def test_client_gone_is_reported(loop: asyncio.AbstractEventLoop) -> None:
    h = Harness(loop, reply=None)
    h.feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    h.conn.connection_lost(None)
    assert h.handlers[0].events == ["start", "lost"]
    assert h.conn not in h.context.connections


def test_abort_closes_without_ending_a_chunked_body(loop: asyncio.AbstractEventLoop) -> None:
    h = Harness(loop, reply=None)
    h.feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    h.conn.send_head(200, b"", None)
    h.conn.send_body(b"part")
    h.conn.abort()
    out = h.transport.take()
    assert out.endswith(b"4\r\npart\r\n") and h.transport.aborted


def test_header_timeout_closes_a_silent_connection(loop: asyncio.AbstractEventLoop) -> None:
    h = Harness(loop, header_timeout=0.05)
    h.feed(b"GET / HTTP/1.1\r\n")
    run_loop_until(loop, lambda: h.transport.closed, what="the timeout to close")
    assert h.transport.closed and h.transport.take() == b""


def test_body_timeout_closes_without_a_response_and_ends_the_request_408(
    loop: asyncio.AbstractEventLoop, log_file: Path
) -> None:
    """nginx (checked with 1.22) terminates the request: no 408 page, no error-log line, the
    access log says 408 (the handler's abort)."""
    h = Harness(loop, reply=None)
    h.feed(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
    h.handlers[0].body_timeout = 0.05
    h.feed(b"d")  # re-arms the body timer with the handler's timeout
    run_loop_until(loop, lambda: h.transport.closed, what="the timeout to close")
    assert h.transport.closed and h.transport.take() == b""
    assert "abort 408" in h.handlers[0].events
    assert "client timed out" not in (log_file.read_text() if log_file.exists() else "")


def test_header_timeout_after_some_bytes_is_reported_as_408(loop: asyncio.AbstractEventLoop,
                                                             log_file: Path) -> None:
    """A head that stops arriving: closed silently, logged at info with nginx's wording, and
    reported (status 408) for the access log; a connection that sent nothing is not."""
    reported: list[tuple[str, int]] = []
    h = Harness(loop, header_timeout=0.05)
    h.context.on_client_error = lambda conn, request, status: reported.append((request.method, status))
    h.feed(b"GET /x HTTP/1.1\r\nHost: x\r\n")
    silent = Harness(loop, header_timeout=0.05)
    silent.context.on_client_error = h.context.on_client_error
    run_loop_until(loop, lambda: h.transport.closed and silent.transport.closed, what="the timeout to close")
    assert h.transport.take() == b"" and silent.transport.take() == b""
    assert reported == [("GET", 408)]
    logged = log_file.read_text()
    assert "client timed out (110: Connection timed out) while reading client request headers" in logged
    assert "client timed out (110: Connection timed out) while waiting for request" in logged


def test_a_long_pipeline_of_instant_answers_does_not_recurse(loop: asyncio.AbstractEventLoop) -> None:
    h = Harness(loop, reply=None)
    count = 3000  # far deeper than the recursion limit if each answer started the next one
    h.feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * count)
    assert len(h.handlers) == count and len(h.conn._queue) == count - 1
    for handler in h.handlers:
        handler.keepalive_requests = 10 * count
        handler.reply = b"ok"
    h.conn.respond(200, b"", b"first")  # the queued 2999 are answered as soon as they start
    out = h.transport.take()
    assert out.count(b"HTTP/1.1 200 OK\r\n") == count
    assert not h.transport.closed and h.transport.reading


def test_half_closed_client_still_gets_its_pipelined_answers(loop: asyncio.AbstractEventLoop) -> None:
    h = Harness(loop, reply=None)
    h.feed(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTTP/1.1\r\nHost: x\r\n\r\n")
    h.conn.eof_received()
    h.conn.respond(200, b"", b"one")
    assert not h.transport.closed  # /2 is still owed
    h.conn.respond(200, b"", b"two")
    out = h.transport.take()
    assert b"one" in out and b"two" in out and h.transport.closed


def test_keepalive_timeout_closes_an_idle_connection(loop: asyncio.AbstractEventLoop) -> None:
    h = Harness(loop, reply=None)
    h.feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    h.handlers[0].keepalive_timeout = 0.05
    h.conn.respond(200, b"", b"done")
    assert not h.transport.closed
    run_loop_until(loop, lambda: h.transport.closed, what="the timeout to close")
    assert h.transport.closed
    assert h.transport.take().endswith(b"done")  # nothing written at the timeout itself


def test_worker_connections_limit_drops_the_extra_connection(
    loop: asyncio.AbstractEventLoop, log_file: Path
) -> None:
    """A connection that is reading a request is not reusable: the new one is dropped."""
    first = Harness(loop, max_connections=1)
    assert first.feed(b"GET / HTTP/1.1\r\n") == b""
    second = ClientConnection(first.context, loop)
    transport = FakeTransport()
    second.connection_made(transport)  # type: ignore[arg-type]
    assert transport.aborted and second not in first.context.connections
    assert first.context.dropped == 1  # accepted, not handled (stub_status, the API)
    assert "[alert]" in log_file.read_text() and "1 worker_connections are not enough" in log_file.read_text()
    assert first.feed(b"Host: x\r\n\r\n").startswith(b"HTTP/1.1 200 OK")


def test_worker_connections_reuses_the_oldest_idle_connection(
    loop: asyncio.AbstractEventLoop, log_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """nginx's ngx_drain_connections: idle keep-alive connections and ones that sent nothing
    yet make room, oldest idle first; a busy one is kept."""
    # the warning is logged once a second per process: another run of this test (the other
    # event loop) within the same second must not have used that second up
    monkeypatch.setattr(downstream, "_reuse_logged", [0.0])
    silent = Harness(loop, max_connections=3)
    context = silent.context
    keep_alive = ClientConnection(context, loop)
    keep_alive_transport = FakeTransport()
    keep_alive.connection_made(keep_alive_transport)  # type: ignore[arg-type]
    busy = ClientConnection(context, loop)
    busy_transport = FakeTransport()
    busy.connection_made(busy_transport)  # type: ignore[arg-type]
    busy.data_received(b"GET / HTTP/1.1\r\n")
    keep_alive.data_received(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # answered: idle again, last
    assert keep_alive_transport.data.startswith(b"HTTP/1.1 200 OK") and not keep_alive.closed
    newcomers = []
    for _ in range(2):
        newcomer = ClientConnection(context, loop)
        newcomers.append(FakeTransport())
        newcomer.connection_made(newcomers[-1])  # type: ignore[arg-type]
    assert silent.transport.closed and keep_alive_transport.closed and not busy_transport.closed
    assert not any(t.closed for t in newcomers)
    log = log_file.read_text()
    assert "[warn]" in log and "3 worker_connections are not enough, reusing connections" in log


def test_an_idle_keep_alive_connection_holds_little(loop: asyncio.AbstractEventLoop) -> None:
    """Idle keep-alive connections can be many: no instance dict, no queue until a request
    waits behind another, no request or response bytes kept once answered."""
    h = Harness(loop)
    assert status_of(h.feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")) == 200
    conn = h.conn
    assert not hasattr(conn, "__dict__")
    assert conn._queue == () and conn._last_data == b"" and conn.sent_head == b""
    assert conn.active is None and conn._parsing is None and conn._active_request is None
    waiting = Harness(loop, reply=None)  # handlers that wait: the second request is queued
    waiting.feed(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert len(waiting.conn._queue) == 1
    waiting.handlers[-1].reply = b"ok"  # the queued one answers as soon as it starts
    waiting.conn.respond(200, b"", b"first")
    assert waiting.transport.take().count(b"HTTP/1.1 200 OK\r\n") == 2
    assert waiting.conn._queue == ()  # the deque made for the pipelined request is dropped


def _short_body_timeouts(h: Harness, timeout: float = 0.05) -> None:
    """Every handler opened from now on waits ``timeout`` for its body (queued ones too)."""
    opened = h.context.open_exchange

    def open_exchange(conn: ClientConnection, request: Request) -> FakeHandler:
        handler = opened(conn, request)
        handler.body_timeout = timeout  # type: ignore[attr-defined]
        return handler  # type: ignore[return-value]

    h.context.open_exchange = open_exchange  # type: ignore[assignment]


def test_a_queued_requests_stalled_body_ends_it_not_the_active_one(loop: asyncio.AbstractEventLoop) -> None:
    h = Harness(loop, reply=None)
    _short_body_timeouts(h)
    h.feed(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\nPOST /2 HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
    loop.run_until_complete(asyncio.sleep(0.2))
    assert "abort 408" in h.handlers[1].events
    assert not any(e.startswith("abort") for e in h.handlers[0].events)
    assert not h.transport.closed
    h.conn.respond(200, b"", b"first")  # the active request is still answered, then we close
    assert status_of(h.transport.take()) == 200
    assert h.transport.closed


def test_a_queued_requests_complete_body_is_not_timed_out(loop: asyncio.AbstractEventLoop) -> None:
    h = Harness(loop, reply=None)
    _short_body_timeouts(h)
    h.feed(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n"
           b"POST /2 HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabcdefghij")
    loop.run_until_complete(asyncio.sleep(0.2))  # the active request is slow: no body is awaited
    assert not any(e.startswith("abort") for h_ in h.handlers for e in h_.events)
    h.conn.respond(200, b"", b"first")
    assert status_of(h.transport.take()) == 200 and not h.transport.closed


def test_memory_error_while_parsing_ends_the_connection_cleanly(
    loop: asyncio.AbstractEventLoop, log_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An allocation that fails while a request is read (the process at its memory limit):
    a 500 for that request and the connection closes; nothing is left half-open."""
    from scriptlb.http import request_body

    def no_memory(self: object, data: bytes) -> None:
        raise MemoryError

    monkeypatch.setattr(request_body.RequestBody, "append", no_memory)
    h = Harness(loop)
    out = h.feed(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
    assert out.startswith(b"HTTP/1.1 500") and h.transport.closed
    log = log_file.read_text()
    assert "[alert]" in log and "out of memory while reading client request" in log


# bare LF line endings (scriptlb.http.line_ends): accepted in heads as nginx does

def test_server_answers_bare_lf_requests(loop: asyncio.AbstractEventLoop) -> None:
    h = Harness(loop)
    out = h.feed(b"GET /a HTTP/1.1\nHost: example\nX-A: 1\n\n")
    request = h.handlers[0].request
    assert request.target == b"/a"
    assert request.headers == [(b"Host", b"example"), (b"X-A", b"1")]
    assert status_of(out) == 200


def test_body_bytes_with_lf_reach_the_handler_intact(loop: asyncio.AbstractEventLoop) -> None:
    h = Harness(loop)
    out = h.feed(b"POST / HTTP/1.1\nHost: x\nContent-Length: 4\n\na\nb\n")
    assert out.endswith(b"ok:a\nb\n")
    h.feed(b"GET /next HTTP/1.1\nHost: x\n\n")  # the next head: fixed again
    assert h.handlers[1].request.target == b"/next"


@pytest.mark.parametrize("raw", [b"GET / HTTP/1.1\rHost: x\r\n\r\n", b"GET / HTTP/1.1\r\nHost: x\rY: z\n\n",
                                 b"GET / HTTP/1.1\nHost: x\x00y\n\n"])
def test_bare_cr_and_control_bytes_are_still_refused(loop: asyncio.AbstractEventLoop, raw: bytes) -> None:
    h = Harness(loop)
    assert status_of(h.feed(raw)) == 400


def test_each_pipelined_request_keeps_its_own_http_version(loop: asyncio.AbstractEventLoop) -> None:
    # the version of the first request of a read comes from its request line's last bytes,
    # the others' from the parser: a mix in one read, and a head split inside its first line
    h = Harness(loop, reply=None)
    h.feed(b"GET /1 HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\nGET /2 HTTP/1.1\r\nHost: x\r\n\r\n")
    h.conn.respond(200, b"", b"one")
    h.conn.respond(200, b"", b"two")
    h.feed(b"GET /3 HT")
    h.feed(b"TP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\n")
    h.conn.respond(200, b"", b"three")
    h.feed(b"\r\nGET /4 HTTP/1.1\r\nHost: x\r\n\r\n")  # (an empty line before a request is skipped)
    assert [(handler.request.target, handler.request.version) for handler in h.handlers] == [
        (b"/1", "1.0"), (b"/2", "1.1"), (b"/3", "1.0"), (b"/4", "1.1")]


# Heads for a listener with 40-byte header buffers (80 bytes a head) and up to 20 lines: a head
# of 39 bytes or less that comes in one read is stored without its lines being measured (it
# cannot outgrow a limit), a larger one or one in pieces is measured line by line.
_SMALL_BUFFERS = {"header_buffers": (2, 40), "max_headers": 20}
_HEADS = [
    b"GET / HTTP/1.1\r\nHost: a\r\nX: 1 \r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nB.d: 1\r\n\r\n",  # an invalid line: ignored, but counted
    b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    b"PUT / HTTP/1.1\r\nHost: a\r\nIf-Match: x\r\n\r\n",
    b"GET / HTTP/1.0\r\nX: y\r\n\r\n",
    b"PROPFIND / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"CONNECT a:1 HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET / HTTP/1.1\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nab",
    b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"v" * 40 + b"\r\n\r\n",  # a line over the buffer
    b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X-Long: 0123456789abcdef\r\n" * 3 + b"\r\n",  # over the head
    b"GET / HTTP/1.1\r\nHost: a\r\n" + b"a:\r\n" * 20 + b"\r\n",  # over max_headers
]


def _outcome(loop: asyncio.AbstractEventLoop, reads: list[bytes]) -> tuple[object, ...]:
    h = Harness(loop, **_SMALL_BUFFERS)
    out = b""
    for data in reads:
        if h.transport.closed:
            break  # (a closed socket reads nothing more)
        out += h.feed(data)
    seen = [(r.method, r.target, r.version, r.headers, r.head_size, r.body_size, r.complete)
            for r in (handler.request for handler in h.handlers)]
    return status_of(out), h.transport.closed, seen


@pytest.mark.parametrize("raw", _HEADS)
def test_a_head_is_checked_alike_in_one_read_or_in_pieces(loop: asyncio.AbstractEventLoop,
                                                          raw: bytes) -> None:
    whole = _outcome(loop, [raw])
    for cut in range(1, len(raw)):
        assert _outcome(loop, [raw[:cut], raw[cut:]]) == whole, cut
    assert _outcome(loop, [raw[i:i + 1] for i in range(len(raw))]) == whole


def test_head_size_counts_every_header_line_kept_or_ignored(loop: asyncio.AbstractEventLoop) -> None:
    # name + value (trailing blanks stripped) + 4 for ": " and CRLF, ignored lines included
    assert _outcome(loop, [_HEADS[0]])[2][0][4] == (4 + 1 + 4) + (1 + 1 + 4)
    assert _outcome(loop, [_HEADS[1]])[2][0][4] == (4 + 1 + 4) + (3 + 1 + 4)
