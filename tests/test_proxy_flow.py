"""Back-pressure and connection reuse through real sockets: a slow client must not make the
proxy buffer a large response, a stale pooled connection is retried on a fresh one, and a
graceful stop finishes the request in flight."""

from __future__ import annotations

import asyncio
import socket
import threading
from pathlib import Path

import pytest
from helpers import (
    BackendRequest,
    Backends,
    Behaviour,
    HttpConnection,
    Scriptlb,
    build_request,
    close_now,
    get,
    hang,
    in_loop,
    raw,
    respond,
    stream,
    wait_for,
)

CONF = """
daemon off;
master_process off;
error_log {tmp}/error.log info;
http {
    upstream u {
        server {backend};
        keepalive 4;
        keepalive_timeout {idle};
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


def start(tmp_path: Path, backend: str, idle: str = "60s") -> Scriptlb:
    return Scriptlb(CONF, tmp_path, tmp=tmp_path, backend=backend, idle=idle)


def proxy_buffers(lb: Scriptlb) -> tuple[int, bool]:
    """(bytes waiting in the proxy's client-side write buffers, is an upstream read paused)."""

    def read() -> tuple[int, bool]:
        buffered = 0
        paused = False
        for context in lb.thread.worker.contexts:
            for conn in context.connections:
                if conn.transport is not None:
                    buffered += conn.transport.get_write_buffer_size()
                exchange = conn.active
                proxied = getattr(exchange, "upstream_request", None)
                upstream = proxied.connection if proxied is not None else None
                paused = paused or bool(upstream is not None and upstream._read_paused)
        return buffered, paused

    return in_loop(lb.thread.loop, read)  # type: ignore[return-value]


def test_slow_client_pauses_the_upstream_instead_of_buffering(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    total = 64 * 1024 * 1024
    behaviour, written = stream(total)
    with Backends(behaviour) as bk, start(tmp_path, bk[0].addr) as lb:
        client = socket.socket()
        request.addfinalizer(client.close)  # closed on failure too (no ResourceWarning later)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        client.connect(("127.0.0.1", lb.port))
        client.settimeout(10)
        client.sendall(build_request("GET", "/big"))
        wait_for(lambda: proxy_buffers(lb)[1], what="the upstream to be paused")
        buffered, _ = proxy_buffers(lb)
        assert buffered <= 1024 * 1024  # the transport's high-water mark plus one read, not 64 MB
        assert written[0] < total / 2  # the backend itself is held back through TCP
        # now read it all: the response completes, nothing was lost while paused
        first = client.recv(1 << 20)
        head_size = first.index(b"\r\n\r\n") + 4
        received = len(first)
        expected = head_size + total
        for _ in range(100_000):  # bounded: 64 MB in reads of at least a few KB
            if received >= expected:
                break
            data = client.recv(1 << 20)
            if not data:
                break
            received += len(data)
        client.close()
    assert received == expected
    assert b"Content-Length: %d" % total in first[:head_size]


def test_stale_pooled_connection_is_retried_on_a_fresh_one(tmp_path: Path) -> None:
    with (
        Backends(respond(body=b"fine")) as bk,
        start(tmp_path, bk[0].addr) as lb,
        HttpConnection(lb.port) as client,
    ):
        assert client.request("GET", "/").body == b"fine"
        wait_for(lambda: len(lb.runtime().upstreams["u"].pool) == 1)
        # the backend forgets its idle connection without the proxy noticing yet: swap the
        # behaviour so the next request on the pooled connection gets no answer but a close
        # the backend will close the pooled connection on the next request without answering:
        # the race nginx handles as a failure on a "cached" connection
        bk[0].behaviour = _close_without_answer_once()
        response = client.request("GET", "/")
        assert response.status == 200 and response.body == b"fine"
    assert bk[0].connections == 2
    log = (tmp_path / "error.log").read_text()
    assert "cached connection, retrying on a new one" in log


def _close_without_answer_once() -> Behaviour:
    original = respond(body=b"fine")
    state = {"done": False}

    async def behaviour(req: BackendRequest, writer: asyncio.StreamWriter) -> bool:
        if not state["done"]:
            state["done"] = True
            return False  # close the connection, no response
        return await original(req, writer)

    return behaviour


def test_idle_pooled_connections_expire(tmp_path: Path) -> None:
    with Backends(respond()) as bk, start(tmp_path, bk[0].addr, idle="100ms") as lb:
        assert get(lb.port, "/").status == 200
        pool = lb.runtime().upstreams["u"].pool
        wait_for(lambda: len(pool) == 1)
        # (the worker thread takes a connection out of the pool before it counts the expiry:
        # both are awaited, and an idle connection lost any other way never counts)
        wait_for(lambda: len(pool) == 0 and pool.expired == 1, timeout=5, what="the expiry")


def test_backend_closing_idle_connection_is_dropped_from_pool(tmp_path: Path) -> None:
    with Backends(respond(close=False)) as bk, start(tmp_path, bk[0].addr) as lb:
        assert get(lb.port, "/").status == 200
        pool = lb.runtime().upstreams["u"].pool
        wait_for(lambda: len(pool) == 1)
        # the backend closes every connection (test teardown of its server's handlers)
        bk.run(_close_backend_connections(bk))
        wait_for(lambda: len(pool) == 0, timeout=5)
        assert get(lb.port, "/").status == 200
    assert bk[0].connections == 2


async def _close_backend_connections(bk: Backends) -> None:
    for task in asyncio.all_tasks():
        if task is not asyncio.current_task():
            task.cancel()


def test_graceful_stop_finishes_the_request_in_flight(tmp_path: Path) -> None:
    release = threading.Event()

    async def slow(req: BackendRequest, writer: asyncio.StreamWriter) -> bool:
        while not release.is_set():
            await asyncio.sleep(0.01)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ndone")
        await writer.drain()
        return True

    with Backends(slow) as bk:
        lb = start(tmp_path, bk[0].addr).__enter__()
        stopper = threading.Thread(target=lb.thread.stop, kwargs={"graceful": True})
        try:
            with HttpConnection(lb.port) as client:
                client.send(build_request("GET", "/"))
                wait_for(lambda: len(bk[0].requests) == 1)
                stopper.start()
                # the worker is draining (no longer accepting) while the request is in flight
                wait_for(lambda: lb.thread.worker.contexts[0].shutting_down)
                release.set()
                response = client.read_response()
                assert response.status == 200 and response.body == b"done"
                assert response.header("connection") == "close"  # no keep-alive while stopping
                assert client.is_closed_by_peer()
            stopper.join(10)
            assert not stopper.is_alive()
        finally:
            release.set()
            for sock in lb.sockets:
                sock.close()


def test_mixed_misbehaving_peers_under_concurrency_leave_no_loop_errors(tmp_path: Path) -> None:
    """Many concurrent clients, peers that answer, fail, time out, close early or mid-body:
    every client gets a complete answer or a closed connection, and nothing escapes into the
    event loop's exception handler."""
    import random

    truncated = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10
    behaviours = [respond(body=b"a" * 3000), respond(503), hang(), close_now(), raw(truncated),
                  raw(b"garbage\r\n\r\n"), respond(body=b"b")]
    rng = random.Random(7)
    text = CONF.replace("server {backend};", "{backend}").replace(
        "keepalive_timeout {idle};", "keepalive_timeout 60s;"
    ).replace("proxy_set_header Connection \"\";", "proxy_set_header Connection \"\"; "
              "proxy_read_timeout 300ms; proxy_next_upstream error timeout http_503;")
    with Backends(*behaviours) as bk:
        servers = "".join(f"server {b.addr} max_fails=0;" for b in bk)
        with Scriptlb(text, tmp_path, tmp=tmp_path, backend=servers) as lb:
            outcomes: dict[str, int] = {}
            lock = threading.Lock()

            def client(seed: int) -> None:
                local = random.Random(seed)
                with HttpConnection(lb.port) as conn:
                    for _ in range(15):
                        try:
                            response = conn.request("GET", f"/{local.randrange(1000)}")
                        except (ConnectionError, TimeoutError):
                            kind = "closed"
                            break
                        kind = str(response.status) if response.complete else "truncated"
                        with lock:
                            outcomes[kind] = outcomes.get(kind, 0) + 1
                        if not response.complete or response.header("connection") == "close":
                            break

            threads = [threading.Thread(target=client, args=(rng.random(),)) for _ in range(24)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(30)
            assert not any(thread.is_alive() for thread in threads)
            assert get(lb.port, "/still-serving").status in (200, 502, 504)
            errors = list(lb.thread.loop_errors)
            # nothing left behind: no client connection, no task but the worker's own
            worker = lb.thread.worker
            wait_for(lambda: not any(c.connections for c in worker.contexts))
            tasks = in_loop(lb.thread.loop, lambda: [
                t for t in asyncio.all_tasks() if t is not asyncio.current_task()])
            assert len(tasks) == 1  # Worker.serve itself
    assert errors == []
    assert outcomes.get("200", 0) > 0 and set(outcomes) <= {"200", "502", "503", "504", "truncated"}


def test_upstream_keepalive_requests_limits_a_pooled_connection(tmp_path: Path) -> None:
    with (
        Backends(respond()) as bk,
        start(tmp_path, bk[0].addr, idle="60s; keepalive_requests 2") as lb,
        HttpConnection(lb.port) as client,
    ):
        for _ in range(5):
            assert client.request("GET", "/").status == 200
    assert bk[0].connections == 3  # 2 + 2 + 1 requests


def delayed(delay: float) -> Behaviour:
    """A well-behaved answer after ``delay`` seconds (a slow peer)."""

    async def behaviour(req: BackendRequest, writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(delay)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        return True

    return behaviour


def test_ewma_learns_from_response_times_and_avoids_a_slow_peer(tmp_path: Path) -> None:
    """The tries loop feeds each response's times to the balancer (observe): ewma sends clearly
    fewer of 200 sequential requests to a peer answering 30 ms slower."""
    with Backends(respond(), delayed(0.03)) as bk, Scriptlb(
        """
        daemon off; master_process off; error_log {tmp}/error.log;
        http {
            upstream u { ewma; server {fast}; server {slow}; keepalive 4; }
            server {
                listen {port0};
                location / { proxy_pass http://u; proxy_http_version 1.1; proxy_set_header Connection ""; }
            }
        }
        """, tmp_path, tmp=tmp_path, fast=bk[0].addr, slow=bk[1].addr,
    ) as lb, HttpConnection(lb.port) as client:
        for _ in range(200):
            assert client.request("GET", "/").status == 200
    fast, slow = len(bk[0].requests), len(bk[1].requests)
    assert fast + slow == 200
    assert slow < 40, (fast, slow)  # round robin would give each 100


def test_a_pooled_connection_parses_responses_after_head_and_204(tmp_path: Path) -> None:
    """The response parser is kept across requests on a pooled connection, except after a HEAD
    (whose end we decide, not llhttp): GET, HEAD, GET, 204, GET all parse right on one peer
    connection."""

    async def answers(req: BackendRequest, writer: asyncio.StreamWriter) -> bool:
        if req.target == "/empty":
            writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        else:
            body = req.target.encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
            if req.method != "HEAD":
                writer.write(body)
        await writer.drain()
        return True

    with Backends(answers) as bk, start(tmp_path, bk[0].addr) as lb, HttpConnection(lb.port) as client:
        first = client.request("GET", "/one")
        head = client.request("HEAD", "/two")
        third = client.request("GET", "/three")
        empty = client.request("GET", "/empty")
        last = client.request("GET", "/four")
    assert (first.status, first.body) == (200, b"/one")
    assert (head.status, head.body, head.header("content-length")) == (200, b"", "4")
    assert (third.status, third.body) == (200, b"/three")
    assert (empty.status, empty.body) == (204, b"")
    assert (last.status, last.body) == (200, b"/four")
    assert bk[0].connections == 1
