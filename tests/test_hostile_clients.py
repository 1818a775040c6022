"""Hostile clients and peers against a real worker process, beside a real nginx where the
behaviour is shared: what they get, what reaches the backend, and what they cost the worker
(RSS read from /proc before and after: bounded growth, not absolute figures)."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
from helpers import Backends, Scriptlb, respond
from hostile import (
    MIB,
    NGINX,
    RecordingBackend,
    exchange,
    get_ok,
    proxy_process,
    rss_kib,
    status_lines,
)

from scriptlb.http.downstream import ClientConnection

needs_nginx = [pytest.mark.nginx, pytest.mark.skipif(NGINX is None, reason="nginx is not installed")]
KINDS = ["scriptlb", pytest.param("nginx", marks=needs_nginx)]


def proxied(backend_port: int, extra: str = "", location: str = "") -> str:
    return (f"server {{ listen 127.0.0.1:{{port}}; {extra} "
            f"location / {{ proxy_pass http://127.0.0.1:{backend_port}; {location} }} }}")


def send_endless(port: int, start: bytes, size: int) -> bytes:
    """``start``, then ``size`` bytes of "b" with no line end (stopping if the server refuses
    more), then whatever the server answered."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(start)
        block = b"b" * 65536
        with contextlib.suppress(OSError):
            for _ in range(size // len(block)):
                sock.sendall(block)
        sock.settimeout(5)
        with contextlib.suppress(OSError):
            return sock.recv(65536)
    return b""


# --------------------------------------------------------------------------- client heads


@pytest.mark.parametrize("kind", KINDS)
def test_a_header_line_that_never_ends_is_refused_at_the_limit(tmp_path: Path, kind: str) -> None:
    """large_client_header_buffers bounds a line while it arrives: 400 (414 for the request
    line), and the worker's memory does not follow the attacker's bytes."""
    cases = [
        (b"GET /a HTTP/1.1\r\nHost: x\r\nX-Big: ", b"HTTP/1.1 400"),
        (b"GET /a HTTP/1.1\r\nHost: x\r\nX-Big", b"HTTP/1.1 400"),  # a name without a colon
        (b"GET /", b"HTTP/1.1 414"),
    ]
    with proxy_process(kind, tmp_path / kind, "server { listen 127.0.0.1:{port}; return 200 ok; }") as proxy:
        get_ok(proxy.port)
        before = rss_kib(proxy.pid)
        for start, status in cases:
            answer = send_endless(proxy.port, start, 16 * MIB)
            assert answer.startswith(status), (start, answer[:60])
        grown = rss_kib(proxy.pid) - before
        get_ok(proxy.port)  # and the worker keeps serving
    assert grown < 4 * 1024, f"{kind} grew {grown} KiB for three 16 MiB lines"
    if kind == "scriptlb":
        assert "client sent too long header line while reading client request headers" in proxy.error_log
        assert "client sent too long URI while reading client request line" in proxy.error_log


def test_a_long_line_costs_other_clients_nothing(tmp_path: Path) -> None:
    """While eight connections each push a 16 MiB header line, other clients are served; the
    worker's CPU for the attack stays small (it was quadratic in the line's length)."""
    with proxy_process("scriptlb", tmp_path, "server { listen 127.0.0.1:{port}; return 200 ok; }") as proxy:
        get_ok(proxy.port)
        before = rss_kib(proxy.pid)
        latencies: list[float] = []
        stop = threading.Event()

        def poll() -> None:
            while not stop.is_set() and len(latencies) < 500:
                latencies.append(get_ok(proxy.port))
                stop.wait(0.01)

        poller = threading.Thread(target=poll)
        poller.start()
        start = b"GET / HTTP/1.1\r\nX-Big: "
        attackers = [threading.Thread(target=send_endless, args=(proxy.port, start, 16 * MIB))
                     for _ in range(8)]
        for attacker in attackers:
            attacker.start()
        for attacker in attackers:
            attacker.join(60)
        stop.set()
        poller.join(30)
        grown = rss_kib(proxy.pid) - before
    assert latencies and grown < 8 * 1024, grown
    # (before the fix: 650 MB and seconds of delay; a bound that holds on a loaded machine)
    assert max(latencies) < 2.0, max(latencies)


@pytest.mark.parametrize("kind", KINDS)
def test_http09_request_line_is_answered_at_once(tmp_path: Path, kind: str) -> None:
    """``GET /`` without a version: nginx answers HTTP/0.9 at once, we answer 400 at once;
    neither waits for client_header_timeout."""
    block = "server { listen 127.0.0.1:{port}; client_header_timeout 30s; return 200 ok; }"
    with proxy_process(kind, tmp_path / kind, block) as proxy:
        started = time.monotonic()
        answer, end = exchange(proxy.port, b"GET /\r\n", timeout=10, half_close=False)
        elapsed = time.monotonic() - started
    assert end == "eof" and answer and elapsed < 5.0
    assert answer.startswith(b"HTTP/1.1 400") if kind == "scriptlb" else answer == b"ok"


@pytest.mark.parametrize("kind", KINDS)
def test_header_names_with_underscores_or_invalid_characters_are_dropped(tmp_path: Path, kind: str) -> None:
    """underscores_in_headers off and ignore_invalid_headers on (the defaults) drop them;
    each directive lets its kind through."""
    request = (b"GET / HTTP/1.1\r\nHost: t\r\nX_Real_IP: 6.6.6.6\r\nX.Dot: 1\r\nX-Good: 1\r\n"
               b"Connection: close\r\n\r\n")
    configs = ["", "underscores_in_headers on;", "ignore_invalid_headers off;"]
    seen = []
    with RecordingBackend() as backend:
        for number, extra in enumerate(configs):
            with proxy_process(kind, tmp_path / f"{kind}{number}", proxied(backend.port, extra)) as proxy:
                answer, _ = exchange(proxy.port, request)
                assert answer.startswith(b"HTTP/1.1 200")
                head = backend.requests[-1].head
                names = [line.split(b":")[0] for line in head.split(b"\r\n")]
                seen.append(sorted(name for name in names if name.startswith(b"X")))
            if number == 0 and kind == "scriptlb":
                assert 'client sent invalid header line: "X_Real_IP: 6.6.6.6"' in proxy.error_log
    assert seen == [[b"X-Good"], [b"X-Good", b"X_Real_IP"], [b"X-Good", b"X.Dot", b"X_Real_IP"]]


def test_a_dropped_header_line_is_logged_with_the_request_line(tmp_path: Path) -> None:
    """The request line is known before the first header (the method is read once per
    request, with the target): an invalid first header's log line names the request."""
    request = b"GET /named HTTP/1.1\r\nX_First: 1\r\nHost: t\r\nConnection: close\r\n\r\n"
    with (RecordingBackend() as backend,
          proxy_process("scriptlb", tmp_path / "p", proxied(backend.port)) as proxy):
        answer, _ = exchange(proxy.port, request)
        assert answer.startswith(b"HTTP/1.1 200")
        lines = [line for line in proxy.error_log.splitlines() if "invalid header line" in line]
    assert len(lines) == 1 and 'request: "GET /named HTTP/1.1"' in lines[0]


def test_headers_named_by_connection_are_dropped_for_that_request_only(tmp_path: Path) -> None:
    """A header the client's Connection header names is hop-by-hop: not forwarded. The next
    request on the same connection, without such a Connection header, forwards it."""
    first = (b"GET /1 HTTP/1.1\r\nHost: t\r\nConnection: X-Hop, keep-alive\r\nX-Hop: 1\r\n"
             b"X-Kept: 1\r\n\r\n")
    second = b"GET /2 HTTP/1.1\r\nHost: t\r\nX-Hop: 2\r\nX-Kept: 2\r\nConnection: close\r\n\r\n"
    with RecordingBackend() as backend:
        with proxy_process("scriptlb", tmp_path / "p", proxied(backend.port)) as proxy:
            answer, _ = exchange(proxy.port, first + second)
            assert answer.count(b"HTTP/1.1 200") == 2
        heads = [received.head for received in backend.requests]
    assert len(heads) == 2
    first_lines, second_lines = (head.split(b"\r\n") for head in heads)
    assert b"X-Kept: 1" in first_lines and not any(line.startswith(b"X-Hop") for line in first_lines)
    assert b"X-Hop: 2" in second_lines and b"X-Kept: 2" in second_lines


@pytest.mark.parametrize("kind", KINDS)
def test_request_trailers_never_reach_the_backend(tmp_path: Path, kind: str) -> None:
    """A chunked body's trailers are dropped (the body is sent again with a length), even as
    $proxy_add_x_forwarded_for; a trailer "Connection: close" does not drop the next request."""
    body = (b"POST /one HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n0\r\nX-Forwarded-For: 6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\nCookie: admin=1\r\n"
            b"Connection: close\r\n\r\n"
            b"GET /two HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    location = "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;"
    with RecordingBackend() as backend, \
            proxy_process(kind, tmp_path, proxied(backend.port, location=location)) as proxy:
        answer, _ = exchange(proxy.port, body)
    assert len(status_lines(answer)) == 2 and all(s.startswith(b"HTTP/1.1 200") for s in status_lines(answer))
    first, second = backend.requests
    assert b"6.6.6.6" not in first.head and b"admin" not in first.head
    assert b"X-Forwarded-For: 127.0.0.1\r\n" in first.head + b"\r\n"
    assert first.body_length == 5 and second.head.startswith(b"GET /two ")


@pytest.mark.parametrize("kind", KINDS)
def test_after_keepalive_requests_the_connection_closes_without_a_reset(tmp_path: Path, kind: str) -> None:
    """Pipelined requests beyond keepalive_requests: the last answered one says close, the
    rest is read and dropped (lingering close), the client sees an orderly end, not a reset."""
    block = "server { listen 127.0.0.1:{port}; keepalive_requests 2; location / { return 200 ok; } }"
    # a megabyte of pipelined requests: more than one read, so some are still unread when the
    # connection ends (closing with unread bytes is what makes the kernel send a reset)
    requests = b"GET / HTTP/1.1\r\nHost: t\r\nX-Pad: " + b"p" * 7000 + b"\r\n\r\n"
    with proxy_process(kind, tmp_path / kind, block) as proxy:
        answer, end = exchange(proxy.port, requests * 150, half_close=False)
    assert len(status_lines(answer)) == 2 and end == "eof"


@pytest.mark.parametrize("kind", KINDS)
def test_a_413_reaches_a_client_still_sending_its_body(tmp_path: Path, kind: str) -> None:
    """The body nobody will read is read and dropped (lingering close) while the client sends
    it, so the client gets the 413 instead of a reset."""
    block = "server { listen 127.0.0.1:{port}; client_max_body_size 1k; location / { return 200 ok; } }"
    with proxy_process(kind, tmp_path / kind, block) as proxy, \
            socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % (4 * MIB))
        block_of_body = b"x" * 65536
        for _ in range(64):
            sock.sendall(block_of_body)
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    assert received.startswith(b"HTTP/1.1 413")


def test_a_graceful_stop_does_not_wait_for_lingering_closes(tmp_path: Path) -> None:
    """A connection lingering (its client silent, its socket open) ends at once on QUIT."""
    block = "server { listen 127.0.0.1:{port}; keepalive_requests 2; location / { return 200 ok; } }"
    request = b"GET / HTTP/1.1\r\nHost: t\r\nX-Pad: " + b"p" * 7000 + b"\r\n\r\n"
    with proxy_process("scriptlb", tmp_path, block) as proxy, \
            socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(request * 150)
        received = b""
        while len(status_lines(received)) < 2 or not received.endswith(b"ok"):
            received += sock.recv(65536)
        proxy.stopped_by_test = True
        started = time.monotonic()
        os.kill(proxy.pid, signal.SIGQUIT)
        while Path(f"/proc/{proxy.pid}").exists() and time.monotonic() - started < 20:
            if Path(f"/proc/{proxy.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                break  # (exited; its parent, the test, has not reaped it yet)
            time.sleep(0.02)
        elapsed = time.monotonic() - started
    assert elapsed < 4.0, f"the worker took {elapsed:.1f} s to stop (lingering_timeout is 5 s)"


# --------------------------------------------------------------------------- connections


@pytest.mark.parametrize("kind", KINDS)
def test_silent_connections_make_room_for_new_clients(tmp_path: Path, kind: str) -> None:
    """More silent connections than worker_connections: the oldest idle ones are closed to
    make room ("reusing connections"), so new clients are still served at once."""
    block = "server { listen 127.0.0.1:{port}; return 200 ok; }"
    with proxy_process(kind, tmp_path / kind, block, worker_connections=64, level="warn") as proxy:
        silent = [socket.create_connection(("127.0.0.1", proxy.port), timeout=5) for _ in range(150)]
        try:
            time.sleep(0.3)
            latencies = [get_ok(proxy.port) for _ in range(8)]
        finally:
            for sock in silent:
                sock.close()
        log = proxy.error_log
    assert len(latencies) == 8 and max(latencies) < 5.0
    assert "64 worker_connections are not enough, reusing connections" in log


# --------------------------------------------------------------------------- request bodies


def upload(port: int, size: int, method: bytes = b"POST", path: bytes = b"/") -> tuple[bytes, str]:
    """A ``size``-byte body of a known pattern; (the answer, the body's sha256)."""
    block = hashlib.sha256(b"seed").digest() * 32768  # 1 MiB, not all one byte
    digest = hashlib.sha256()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"%s %s HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                     % (method, path, size))
        for _ in range(size // MIB):
            sock.sendall(block)
            digest.update(block)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer, digest.hexdigest()


@pytest.mark.parametrize("kind", KINDS)
def test_a_large_upload_waits_in_a_file_not_in_memory(tmp_path: Path, kind: str) -> None:
    """Beyond client_body_buffer_size the body goes to client_body_temp (under the prefix),
    the peer gets it whole, and the file is gone with the request."""
    with RecordingBackend() as backend, \
            proxy_process(kind, tmp_path, proxied(backend.port, "client_max_body_size 0;")) as proxy:
        get_ok_via = exchange(proxy.port, b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        assert get_ok_via[0].startswith(b"HTTP/1.1 200")
        before = rss_kib(proxy.pid)
        answer, digest = upload(proxy.port, 48 * MIB)
        grown = rss_kib(proxy.pid) - before
    assert answer.startswith(b"HTTP/1.1 200")
    assert backend.requests[-1].body_length == 48 * MIB and backend.requests[-1].body_sha256 == digest
    assert grown < 8 * 1024, f"RSS grew {grown} KiB for a 48 MiB upload"
    temp = tmp_path / "client_body_temp"
    assert temp.is_dir() and not list(temp.iterdir())


@pytest.mark.parametrize("kind", KINDS)
def test_stalled_uploads_hold_no_memory(tmp_path: Path, kind: str) -> None:
    """Eight uploads that stop halfway hold their bytes in files, not in the worker."""
    with RecordingBackend() as backend, \
            proxy_process(kind, tmp_path, proxied(backend.port, "client_max_body_size 0;")) as proxy:
        get_ok_direct = exchange(proxy.port, b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        assert get_ok_direct[0].startswith(b"HTTP/1.1 200")
        before = rss_kib(proxy.pid)
        socks = []
        block = b"u" * MIB
        for _ in range(8):
            sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
            sock.sendall(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % (16 * MIB))
            for _ in range(8):
                sock.sendall(block)
            socks.append(sock)
        time.sleep(0.5)
        grown = rss_kib(proxy.pid) - before
        for sock in socks:
            sock.close()
        assert backend.count() == 1  # (the GET) nothing went to the peer
    assert grown < 12 * 1024, f"RSS grew {grown} KiB for 8 x 8 MiB stalled uploads"


@pytest.mark.parametrize("kind", KINDS)
def test_a_retry_sends_the_spooled_body_again_from_the_file(tmp_path: Path, kind: str) -> None:
    """The first peer reads the whole body and closes without answering; the next try sends
    the same bytes again (PUT is idempotent, so nginx retries it too)."""
    with RecordingBackend(close_first=1) as backend:
        block = (f"upstream twice {{ server 127.0.0.1:{backend.port}; server 127.0.0.1:{backend.port}; }}"
                 "server { listen 127.0.0.1:{port}; client_max_body_size 0; "
                 "location / { proxy_pass http://twice; } }")
        with proxy_process(kind, tmp_path, block) as proxy:
            answer, digest = upload(proxy.port, 4 * MIB, method=b"PUT")
    assert answer.startswith(b"HTTP/1.1 200")
    assert [(r.body_length, r.body_sha256) for r in backend.requests] == [(4 * MIB, digest)] * 2


@pytest.mark.parametrize(("mode", "kept"), [("on", True), ("clean", False)])
def test_client_body_in_file_only(tmp_path: Path, mode: str, kept: bool) -> None:
    """Every body goes to a file, even a small one; "on" keeps the file, as nginx does."""
    with RecordingBackend() as backend, proxy_process(
            "scriptlb", tmp_path, proxied(backend.port, f"client_body_in_file_only {mode};")) as proxy:
        answer, _ = exchange(proxy.port, b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n"
                                         b"Connection: close\r\n\r\nhello")
    assert answer.startswith(b"HTTP/1.1 200") and backend.requests[-1].body_length == 5
    files = list((tmp_path / "client_body_temp").iterdir())
    assert [f.read_bytes() for f in files] == ([b"hello"] if kept else [])


def test_a_body_file_that_cannot_be_created_is_a_500(tmp_path: Path) -> None:
    (tmp_path / "not-a-directory").write_text("")
    unusable = "client_body_temp_path not-a-directory/body;"
    with RecordingBackend() as backend, \
            proxy_process("scriptlb", tmp_path, proxied(backend.port, unusable)) as proxy:
        answer, _ = exchange(proxy.port, b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 100000\r\n\r\n"
                             + b"x" * 100000)
        assert answer.startswith(b"HTTP/1.1 500")
        get_ok_after = exchange(proxy.port, b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        assert get_ok_after[0].startswith(b"HTTP/1.1 200")
        assert "[crit]" in proxy.error_log and 'open() "' in proxy.error_log


# --------------------------------------------------------------------------- upstream heads


class BigHeadPeer:
    """Answers every request with a head carrying one ``size``-byte header."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn, contextlib.suppress(OSError):
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                header = b"X-Big: " + b"a" * self.size
                conn.sendall(b"HTTP/1.1 200 OK\r\n" + header + b"\r\nContent-Length: 2\r\n\r\nok")

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("kind", KINDS)
def test_an_upstream_head_beyond_proxy_buffer_size_is_a_502(tmp_path: Path, kind: str) -> None:
    huge, fits = BigHeadPeer(16 * MIB), BigHeadPeer(10000)
    block = (f"server {{ listen 127.0.0.1:{{port}}; proxy_buffer_size 16k; proxy_busy_buffers_size 16k; "
             f"location /huge {{ proxy_pass http://127.0.0.1:{huge.port}; }} "
             f"location /fits {{ proxy_pass http://127.0.0.1:{fits.port}; }} }}")
    try:
        with proxy_process(kind, tmp_path / kind, block) as proxy:
            exchange(proxy.port, b"GET /fits HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            before = rss_kib(proxy.pid)
            too_big, _ = exchange(proxy.port, b"GET /huge HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            grown = rss_kib(proxy.pid) - before
            fitting, _ = exchange(proxy.port, b"GET /fits HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            log = proxy.error_log
    finally:
        huge.close()
        fits.close()
    assert too_big.startswith(b"HTTP/1.1 502") and fitting.startswith(b"HTTP/1.1 200")
    assert "upstream sent too big header while reading response header from upstream" in log
    assert grown < 4 * 1024, f"{kind} grew {grown} KiB for a 16 MiB upstream header"


# --------------------------------------------------------------------------- closed connections


def test_a_closed_connection_is_freed_without_the_cyclic_collector(tmp_path: Path) -> None:
    """Closed connections (with their parser and requests) go with their last reference:
    with the cyclic GC off, serving many connections leaves none behind."""
    with Backends(respond()) as backends, Scriptlb(
        "daemon off; master_process off;\n"
        "http { server { listen {port0}; location / { proxy_pass http://{peer}; } } }",
        tmp_path,
        peer=backends[0].addr,
    ) as lb:
        exchange(lb.port, b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")  # warm up
        gc.collect()
        gc.disable()
        try:
            before = sum(isinstance(o, ClientConnection) for o in gc.get_objects())
            for _ in range(30):
                answer, _ = exchange(lb.port, b"GET / HTTP/1.1\r\nHost: t\r\nX-Pad: " + b"p" * 4000
                                     + b"\r\nConnection: close\r\n\r\n")
                assert answer.startswith(b"HTTP/1.1 200")
            for _ in range(30):  # and ones that fail: too long a line, a bad request
                exchange(lb.port, b"GET / HTTP/1.1\r\nX-Big: " + b"b" * 20000)
                exchange(lb.port, b"\x16\x03garbage\r\n\r\n")
            time.sleep(0.2)  # (the last connection_lost callbacks)
            after = sum(isinstance(o, ClientConnection) for o in gc.get_objects())
        finally:
            gc.enable()
    assert after - before <= 2, (before, after)


@pytest.mark.parametrize("kind", KINDS)
def test_more_header_lines_than_max_headers_is_a_400(tmp_path: Path, kind: str) -> None:
    """max_headers 5: five header lines pass, six are a 400; a line dropped as invalid does
    not count."""
    def request(count: int, invalid: bytes = b"") -> bytes:
        extra = b"".join(b"X-Blah: %d\r\n" % n for n in range(count - 2))
        return b"GET / HTTP/1.1\r\nHost: t\r\n" + invalid + extra + b"Connection: close\r\n\r\n"

    answers = []
    with (RecordingBackend() as backend,
          proxy_process(kind, tmp_path / kind, proxied(backend.port, "max_headers 5;")) as proxy):
        for data in (request(5), request(6), request(5, b"X_Drop: 1\r\n")):
            answer, _ = exchange(proxy.port, data)
            answers.append(answer.split(b"\r\n", 1)[0])
        log = proxy.error_log
    assert answers == [b"HTTP/1.1 200 OK", b"HTTP/1.1 400 Bad Request", b"HTTP/1.1 200 OK"]
    if kind == "scriptlb":
        assert "client sent too many header lines while reading client request headers" in log
