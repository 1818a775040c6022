"""Fuzz tier: random and mutated request heads and chunked bodies against one worker process.

For every input the worker must answer or close within a deadline, never forward more
requests than the client sent (counted by a reference parse of the same bytes), never crash
or log an uncaught exception, and end near the RSS it started with. The run is bounded in
time (``FUZZ_SECONDS``) and in cases; the seed is printed so a failure can be replayed
(``FUZZ_SEED=N``).
"""

from __future__ import annotations

import os
import random
import socket
import time
from pathlib import Path

import httptools
import pytest
from hostile import RecordingBackend, exchange, get_ok, proxy_process, rss_kib, status_lines

from scriptlb.http.line_ends import crlf_head

pytestmark = [pytest.mark.fuzz, pytest.mark.slow]

FUZZ_SECONDS = float(os.environ.get("FUZZ_SECONDS", "25"))
MAX_CASES = 3000
DEADLINE = 4.0  # client_header_timeout / client_body_timeout / keepalive_timeout are 1 s

SEEDS = [
    b"GET /p/a?x=1 HTTP/1.1\r\nHost: t\r\nUser-Agent: fuzz\r\nAccept: */*\r\n\r\n",
    b"GET /r HTTP/1.0\r\n\r\n",
    b"POST /p/up HTTP/1.1\r\nHost: t\r\nContent-Length: 11\r\nContent-Type: text/plain\r\n\r\nhello world",
    b"POST /p/ch HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: t\r\nConnection: close\r\n\r\n",
    b"PUT /p/ch2 HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n"
    b"a\r\n0123456789\r\n0\r\n\r\n",
    b"GET /p/1 HTTP/1.1\r\nHost: t\r\n\r\nGET /p/2 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    b"GET /p/h HTTP/1.1\r\nHost: t\r\nX_Under: 1\r\nCookie: a=1\r\nCookie: b=2\r\n"
    b"X-Forwarded-For: 1.2.3.4\r\n\r\n",
    b"POST /p/cl HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\n\r\nbody"
    b"POST /p/cl2 HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n\r\n",
]

TOKENS = [b"\r\n", b"\n", b"\r", b":", b" ", b"\t", b"\x00", b"0", b"ffffffffffffffff", b"-1",
          b"Content-Length: 5\r\n", b"Transfer-Encoding: chunked\r\n",
          b"Transfer-Encoding: gzip, chunked\r\n",
          b"Connection: close\r\n", b"Host: a\r\n", b"\r\n\r\n", b"0\r\n\r\n", b"GET / HTTP/1.1\r\n",
          b"HTTP/1.1", b"HTTP/0.9", b"Upgrade: h2c\r\n", b"Expect: 100-continue\r\n", b";", b"\xff\xfe"]


def mutate(rng: random.Random, data: bytes) -> bytes:
    """One to four random edits: flips, inserts (tokens, long runs), deletions, duplications."""
    for _ in range(rng.randint(1, 4)):
        pos = rng.randint(0, len(data))
        kind = rng.randrange(7)
        if kind == 0 and data:
            i = rng.randrange(len(data))
            data = data[:i] + bytes([rng.randrange(256)]) + data[i + 1:]
        elif kind == 1:
            data = data[:pos] + rng.choice(TOKENS) + data[pos:]
        elif kind == 2:
            end = min(len(data), pos + rng.randint(1, 16))
            data = data[:pos] + data[end:]
        elif kind == 3:
            end = min(len(data), pos + rng.randint(1, 64))
            data = data[:end] + data[pos:end] + data[end:]
        elif kind == 4:
            run = bytes([rng.choice(b"ab \t:\r\n0")]) * rng.choice([100, 5000, 70000])
            data = data[:pos] + run + data[pos:]
        elif kind == 5:
            data = data[:pos]  # truncated
        else:
            data = data[:pos] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 32))) + data[pos:]
    return data


def random_input(rng: random.Random) -> bytes:
    if rng.random() < 0.1:
        return bytes(rng.randrange(256) for _ in range(rng.randint(1, 300)))
    return mutate(rng, rng.choice(SEEDS))


class _Counter:
    def __init__(self) -> None:
        self.complete = 0

    def on_message_complete(self) -> None:
        self.complete += 1


def requests_sent(data: bytes) -> int:
    """How many complete requests ``data`` holds for a lenient reference parse (an upper
    bound of what may reach the backend); heads may end their lines with a bare LF, as the
    server accepts (scriptlb.http.line_ends)."""
    if data.count(b"\n") != data.count(b"\r\n"):
        return max(_parsed(data), _parsed(crlf_head(data, b"")))
    return _parsed(data)


def _parsed(data: bytes) -> int:
    counter = _Counter()
    parser = httptools.HttpRequestParser(counter)
    parser.set_dangerous_leniencies(lenient_keep_alive=True)
    try:
        parser.feed_data(data)
    except (httptools.HttpParserError, httptools.HttpParserUpgrade):
        pass
    return counter.complete


def send_case(port: int, rng: random.Random, data: bytes) -> tuple[bytes, str]:
    """Send ``data`` (in up to three pieces), maybe half-close, then read until the server
    closes or DEADLINE passes."""
    half_close = rng.random() < 0.8
    cuts = sorted(rng.randint(0, len(data)) for _ in range(rng.randint(0, 2)))
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as sock:
        try:
            for piece in pieces:
                sock.sendall(piece)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server refused more (it answered and closed): read what it said
        received = b""
        end = time.monotonic() + DEADLINE
        while True:
            sock.settimeout(max(end - time.monotonic(), 0.01))
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                return received, "reset"
            except TimeoutError:
                return received, "timeout"
            if not chunk:
                return received, "eof"
            received += chunk


@pytest.mark.timeout(FUZZ_SECONDS + 90)
def test_fuzzed_clients_are_answered_or_closed_and_never_smuggle(tmp_path: Path) -> None:
    seed = int(os.environ.get("FUZZ_SEED", str(random.randrange(1 << 30))))
    print(f"FUZZ_SEED={seed}")
    rng = random.Random(seed)
    block = """
        server {
            listen 127.0.0.1:{port};
            client_header_timeout 1s; client_body_timeout 1s; keepalive_timeout 1s;
            client_max_body_size 256k; client_body_buffer_size 1k;
            location /r { return 200 ok; }
            location / { proxy_pass http://127.0.0.1:BACKEND; proxy_next_upstream off; }
        }
    """
    with RecordingBackend() as backend:
        block = block.replace("BACKEND", str(backend.port))
        with proxy_process("scriptlb", tmp_path, block) as proxy:
            for _ in range(20):  # warm up: imports, caches, the first connections
                get_ok(proxy.port)
                exchange(proxy.port, b"GET /p HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            baseline = rss_kib(proxy.pid)
            started = time.monotonic()
            cases = 0
            while time.monotonic() - started < FUZZ_SECONDS and cases < MAX_CASES:
                data = random_input(rng)
                before = backend.count()
                answer, end = send_case(proxy.port, rng, data)
                cases += 1
                time.sleep(0.002)  # (the backend thread records what it got)
                forwarded = backend.count() - before
                context = f"seed {seed}, case {cases}: {data[:300]!r}"
                assert end != "timeout" or status_lines(answer), f"neither answered nor closed; {context}"
                assert forwarded <= max(requests_sent(data), 0), f"{forwarded} forwarded; {context}"
            get_ok(proxy.port)
            time.sleep(1.5)  # keep-alive and lingering connections end
            grown = rss_kib(proxy.pid) - baseline
            stderr, log = proxy.stderr, proxy.error_log
    print(f"{cases} cases in {time.monotonic() - started:.1f} s, RSS {baseline} KiB -> +{grown} KiB")
    assert cases >= 100
    assert "Traceback" not in stderr and "Fatal error" not in stderr, stderr[-3000:]
    assert "[alert]" not in log and "[crit]" not in log and "[emerg]" not in log, log[-3000:]
    assert grown < 8 * 1024, f"RSS grew {grown} KiB over {cases} cases"
