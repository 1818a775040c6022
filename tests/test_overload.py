"""Under overload: a backend that accepts and then drops connections, the race of a connection
lost before the connect callback runs, and the safety net under the request's callbacks.

Every request must be answered (a response or, after part of one, a closed connection), and
nothing may reach the loop's exception handler (a traceback on stderr in a real worker)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from helpers import ASYNCIO_LOOP_ONLY, Backends, HttpConnection, Scriptlb, get, respond, wait_for

from scriptlb.http import safety
from scriptlb.http.upstream import ConnState, UpstreamConnection

CONF = """
daemon off;
master_process off;
error_log {tmp}/error.log info;
http {
    upstream u {
        {servers}
        keepalive 4;
    }
    server {
        listen 127.0.0.1:{port0};
        location / {
            proxy_pass http://u;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
"""


def servers(*addrs: str) -> str:
    return " ".join(f"server {addr};" for addr in addrs)


def lose_connections(lb: Scriptlb, count: int) -> list[int]:
    """Make the worker's loop lose the first ``count`` upstream connections it opens between
    the connect and the connect callback: the transport is aborted and its connection_lost
    delivered before ``create_connection`` returns (deterministically what an overloaded
    backend that accepts then drops does, when the drop wins the race). Returns a counter."""
    loop = lb.thread.loop
    original = loop.create_connection
    lost = [0]

    async def create_connection(factory, *args, **kwargs):  # type: ignore[no-untyped-def]
        transport, protocol = await original(factory, *args, **kwargs)
        if lost[0] < count:
            lost[0] += 1
            transport.abort()
            while protocol.state is not ConnState.CLOSED:  # connection_lost has run
                await asyncio.sleep(0)
        return transport, protocol

    loop.create_connection = create_connection  # type: ignore[method-assign]
    return lost


def error_log(tmp_path: Path) -> str:
    return (tmp_path / "error.log").read_text()


@ASYNCIO_LOOP_ONLY
def test_connection_lost_before_connect_callback_is_a_failed_try(tmp_path: Path, capfd) -> None:
    with Backends(respond(body=b"ok"), respond(body=b"ok")) as bk:
        lb = Scriptlb(CONF, tmp_path, tmp=tmp_path, servers=servers(bk[0].addr, bk[1].addr))
        lost = lose_connections(lb, 1)
        with lb:
            response = get(lb.port, "/")
            assert response.status == 200  # the next peer answered
            assert lost[0] == 1
            assert lb.thread.loop_errors == []
    log = error_log(tmp_path)
    assert "upstream prematurely closed connection while reading response header from upstream" in log
    assert "[alert]" not in log
    assert "Traceback" not in capfd.readouterr().err


@ASYNCIO_LOOP_ONLY
def test_every_connection_lost_before_connect_callback_gives_502(tmp_path: Path, capfd) -> None:
    with Backends(respond(body=b"ok")) as bk:
        lb = Scriptlb(CONF, tmp_path, tmp=tmp_path, servers=servers(bk[0].addr))
        lose_connections(lb, 1000)
        with lb:
            statuses = [get(lb.port, "/").status for _ in range(3)]
            assert lb.thread.loop_errors == []
    assert statuses == [502, 502, 502]
    assert "Traceback" not in capfd.readouterr().err


def dropping_backend(limit: int):  # type: ignore[no-untyped-def]
    """A raw handler serving at most ``limit`` connections at once; the others are accepted and
    dropped at once, half of them with a reset (an overloaded backend, as nginx is beyond its
    worker_connections)."""
    active = [0]
    accepted = [0]

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted[0] += 1
        if active[0] >= limit:
            if accepted[0] % 2:
                writer.transport.abort()
            else:
                writer.close()
            return
        active[0] += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if not head:
                    break
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            active[0] -= 1
            writer.close()

    return handler


CLIENTS = 24
REQUESTS = 240


def _one(port: int) -> int:
    try:
        return get(port, "/").status
    except (ConnectionError, OSError):
        return -1  # (closed without a response: still an answer, never a hang)


def test_backend_dropping_connections_under_concurrency(tmp_path: Path, capfd) -> None:
    errors_before = safety.COUNTERS.callback_errors
    with Backends(respond(), respond()) as bk:
        for backend in bk:
            backend.raw_handler = dropping_backend(limit=3)
        lb = Scriptlb(CONF, tmp_path, tmp=tmp_path,
                      servers=servers(bk[0].addr, bk[1].addr))
        with lb, ThreadPoolExecutor(max_workers=CLIENTS) as pool:
            statuses = list(pool.map(lambda _: _one(lb.port), range(REQUESTS)))
            assert lb.thread.loop_errors == []
            dropped = sum(b.connections for b in bk)
    assert len(statuses) == REQUESTS
    assert set(statuses) <= {200, 502}, statuses  # every request answered, by a peer or by us
    assert statuses.count(200) > 0
    assert dropped > 6  # the backends did drop connections (more were opened than they serve)
    assert safety.COUNTERS.callback_errors == errors_before
    assert "Traceback" not in capfd.readouterr().err


# --------------------------------------------------------------------------- the safety net


def test_a_bug_in_a_callback_is_an_alert_and_a_502(tmp_path: Path, capfd, monkeypatch) -> None:
    """An exception escaping the response-head callback: [alert] with the request's context,
    502 to the client, the upstream connection dropped, the counter up, the worker serving on."""
    calls = [0]
    original = UpstreamConnection.on_headers_complete

    def broken(self: UpstreamConnection) -> None:
        calls[0] += 1
        if calls[0] == 1:
            raise ZeroDivisionError("planted bug")
        original(self)

    monkeypatch.setattr(UpstreamConnection, "on_headers_complete", broken)
    before = safety.COUNTERS.callback_errors
    with Backends(respond(body=b"ok")) as bk, \
            Scriptlb(CONF, tmp_path, tmp=tmp_path, servers=servers(bk[0].addr)) as lb:
        assert get(lb.port, "/first").status == 502
        response = get(lb.port, "/second")
        assert (response.status, response.body) == (200, b"ok")
        assert lb.thread.loop_errors == []
    assert safety.COUNTERS.callback_errors == before + 1
    alerts = [line for line in error_log(tmp_path).splitlines() if "[alert]" in line]
    assert len(alerts) == 1
    assert "unexpected ZeroDivisionError: planted bug at " in alerts[0]
    assert 'request: "GET /first HTTP/1.1"' in alerts[0]
    assert "Traceback" not in capfd.readouterr().err


def test_a_bug_after_the_response_started_closes_the_client(tmp_path: Path, monkeypatch) -> None:
    """Once the client has the head, a bug cannot become a 502: the connection is closed."""
    from scriptlb.http.downstream import ClientConnection

    # (the peer's body chunks go straight to the client connection's send_body: the bug is
    # planted there, once the head is out)
    def broken(self: ClientConnection, data: bytes) -> None:
        self.flush()
        raise RuntimeError("planted bug in the body")

    monkeypatch.setattr(ClientConnection, "send_body", broken)
    with Backends(respond(body=b"x" * 1000)) as bk, \
            Scriptlb(CONF, tmp_path, tmp=tmp_path, servers=servers(bk[0].addr)) as lb:
        with HttpConnection(lb.port) as conn:
            conn.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            received = read_until_closed(conn)
        head, _, body = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ") and len(body) < 1000  # the head went out, then the close
        assert lb.thread.loop_errors == []
        wait_for(lambda: "planted bug in the body" in error_log(tmp_path))
    assert "[alert]" in error_log(tmp_path)


def read_until_closed(conn: HttpConnection, timeout: float = 10.0) -> bytes:
    conn.sock.settimeout(timeout)
    received = b""
    with contextlib.suppress(ConnectionResetError):
        while data := conn.sock.recv(65536):
            received += data
    return received


def test_loop_error_handler_writes_an_alert(tmp_path: Path) -> None:
    from scriptlb.config.model import ErrorLogConf
    from scriptlb.logs import errorlog

    path = tmp_path / "e.log"
    previous = errorlog.install(errorlog.ErrorLog((ErrorLogConf(str(path), "info"),)))
    try:
        before = safety.COUNTERS.loop_errors
        try:
            1 / 0  # noqa: B018
        except ZeroDivisionError as exc:
            loop = asyncio.new_event_loop()
            safety.loop_error(loop, {"message": "Exception in callback x", "exception": exc})
            loop.close()
        assert safety.COUNTERS.loop_errors == before + 1
    finally:
        errorlog.install(previous).close()
    text = path.read_text()
    assert "[alert]" in text and "Exception in callback x: ZeroDivisionError: division by zero at " in text


@ASYNCIO_LOOP_ONLY
def test_client_gone_while_connecting(tmp_path: Path, capfd) -> None:
    """The client leaves while the upstream connection is being opened: the request ends (499
    in the access log), the connect is cancelled, nothing is sent or printed."""
    text = CONF.replace("error_log {tmp}/error.log info;", "error_log {tmp}/error.log info;\n"
                        "http_placeholder").replace("http_placeholder\nhttp {", "http {\n"
                        "    log_format st '$status $upstream_addr';\n    access_log {tmp}/access.log st;")
    with Backends(respond(body=b"ok")) as bk:
        lb = Scriptlb(text, tmp_path, tmp=tmp_path, servers=servers(bk[0].addr))
        loop = lb.thread.loop
        original = loop.create_connection
        opened: list = []

        async def slow_connection(factory, *args, **kwargs):  # type: ignore[no-untyped-def]
            await asyncio.sleep(0.3)  # the client leaves meanwhile
            transport, protocol = await original(factory, *args, **kwargs)
            opened.append(protocol)
            return transport, protocol

        loop.create_connection = slow_connection  # type: ignore[method-assign]
        with lb:
            with HttpConnection(lb.port) as conn:
                conn.send(b"GET /gone HTTP/1.1\r\nHost: x\r\n\r\n")
                time.sleep(0.05)  # (the request is in, the connect under way)
                # a reset, not a half-close (a half-closed client may still read the answer)
                conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            wait_for(lambda: (tmp_path / "access.log").exists()
                              and "499" in (tmp_path / "access.log").read_text())
            # the connect for /gone was cancelled (or, had it finished, closed unused)
            time.sleep(0.4)
            assert all(p.state is ConnState.CLOSED for p in opened)
            assert bk[0].requests == []
            assert get(lb.port, "/next").status == 200  # the worker serves on
            assert lb.thread.loop_errors == []
    assert [r.target for r in bk[0].requests] == ["/next"]  # nothing was sent for /gone
    assert "Traceback" not in capfd.readouterr().err


# --------------------------------------------------------------------------- garbage


def test_closed_connections_leave_no_reference_cycles(tmp_path: Path) -> None:
    """A request on a fresh client connection to a peer without keep-alive: once both
    connections are closed, everything of the request is freed by reference counting (a cycle
    would wait for the cyclic collector, whose full passes stall the loop under load)."""
    import gc

    text = CONF.replace("keepalive 4;", "")
    with Backends(respond(body=b"ok")) as bk, \
            Scriptlb(text, tmp_path, tmp=tmp_path, servers=servers(bk[0].addr)) as lb:
        assert get(lb.port, "/warm").status == 200
        gc.collect()
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for i in range(20):
                assert get(lb.port, f"/{i}", {"Connection": "close"}).status == 200
            wait_for(lambda: len(lb.thread.worker.contexts[0].connections) == 0)
            gc.collect()
            ours = sorted({type(o).__qualname__ for o in gc.garbage
                           if type(o).__module__.startswith("scriptlb")})
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
    assert ours == []
