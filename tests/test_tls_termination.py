"""TLS termination's edges, each beside real nginx where the config is shared: plain HTTP sent to
a TLS port, failed handshakes (logged at info, the worker keeps serving), a silent client."""

from __future__ import annotations

import re
import socket
import ssl
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trustme
from helpers import Scriptlb, raw_exchange, wait_for
from test_round_robin import NGINX, free_ports, nginx_running
from test_tls import certs, client_context, https_get  # noqa: F401  (certs: a fixture)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def tls_server(port: str, paths: dict[str, Path], extra: str = "") -> str:
    return f"""
        server {{
            listen 127.0.0.1:{port} ssl;
            server_name a.test;
            ssl_certificate {paths['a.test.crt']};
            ssl_certificate_key {paths['a.test.key']};
            ssl_protocols TLSv1.3;
            {extra}
            location / {{ return 200 "ok $scheme\\n"; }}
        }}
    """


@contextmanager
def both(tmp_path: Path, paths: dict[str, Path], extra: str = "") -> Iterator[list[tuple[int, Path]]]:
    """scriptlb, then nginx when installed, serving the same server: [(port, its error log)]."""
    ours = tmp_path / "ours.log"
    main = f"daemon off; master_process off; error_log {ours} info;\n"
    with Scriptlb(main + f"http {{ {tls_server('{port0}', paths, extra)} }}", tmp_path) as lb:
        if NGINX is None:
            yield [(lb.port, ours)]
            return
        (port,) = free_ports(1)
        ngx = tmp_path / "nginx"
        ngx.mkdir()
        theirs = ngx / "info.log"
        # (nginx's main error_log is the helper's: an http-level one takes these lines)
        with nginx_running(ngx, f"error_log {theirs} info;" + tls_server(str(port), paths, extra), [port]):
            yield [(lb.port, ours), (port, theirs)]


def normalized(answer: bytes) -> tuple[bytes, list[bytes], bytes]:
    """(status line, sorted headers, body) without what differs by product: Server, Date, the
    page's footer (and so its length)."""
    head, _, body = answer.partition(b"\r\n\r\n")
    status, *headers = head.split(b"\r\n")
    kept = sorted(h for h in headers if not re.match(rb"(Server|Date|Content-Length):", h))
    return status, kept, re.sub(rb"<hr><center>[^<]*</center>", b"<hr><center>SERVER</center>", body)


def log_line(log: Path, needle: str) -> str:
    """The first line of ``log`` holding ``needle``, from the level on, without the conn id."""
    wait_for(lambda: needle in log.read_text(), timeout=10, what=needle)
    line = next(line for line in log.read_text().splitlines() if needle in line)
    return re.sub(r"\d+#\d+: \*\d+ ", "", line[line.index("["):])


def test_plain_http_to_a_tls_port_gets_nginx_400_page(tmp_path: Path, ca: trustme.CA,
                                                    certs: dict[str, Path]) -> None:  # noqa: F811
    request = b"GET /x HTTP/1.1\r\nHost: a.test\r\n\r\n"
    answers, lines = [], []
    with both(tmp_path, certs) as targets:
        for port, log in targets:
            answers.append(normalized(raw_exchange(port, request)))
            lines.append(log_line(log, "plain HTTP"))
            # the worker still serves TLS
            assert https_get(port, client_context(ca), "a.test", "a.test")[1] == b"ok https\n"
    assert answers[0][0] == b"HTTP/1.1 400 Bad Request"
    assert b"<center>The plain HTTP request was sent to HTTPS port</center>" in answers[0][2]
    assert b"Connection: close" in answers[0][1]
    assert lines[0].startswith("[info] client sent plain HTTP request to HTTPS port")
    assert 'request: "GET /x HTTP/1.1", host: "a.test"' in lines[0]
    assert answers[1:] in ([], [answers[0]])
    assert lines[1:] in ([], [lines[0]])


def test_error_page_497_redirects_plain_http_as_nginx(tmp_path: Path, ca: trustme.CA,
                                                     certs: dict[str, Path]) -> None:  # noqa: F811
    request = b"GET /path?q=1 HTTP/1.1\r\nHost: a.test\r\n\r\n"
    answers = []
    with both(tmp_path, certs, "error_page 497 =301 https://$host$request_uri;") as targets:
        for port, _log in targets:
            answers.append(normalized(raw_exchange(port, request)))
    assert answers[0][0] == b"HTTP/1.1 301 Moved Permanently"
    assert b"Location: https://a.test/path?q=1" in answers[0][1]
    assert answers[1:] in ([], [answers[0]])


def test_failed_handshakes_are_logged_at_info_and_the_worker_serves(tmp_path: Path, ca: trustme.CA,
                                                                   certs: dict[str, Path]) -> None:  # noqa: F811
    old = client_context(ca)
    old.maximum_version = ssl.TLSVersion.TLSv1_2  # the servers speak TLSv1.3 only
    lines = []
    with both(tmp_path, certs) as targets:
        for port, log in targets:
            with pytest.raises((ssl.SSLError, ConnectionError)):
                https_get(port, old, "a.test", "a.test")
            line = log_line(log, "SSL_do_handshake() failed")
            lines.append(line)
            # a client that hangs up in the middle of its ClientHello
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
            lines.append(log_line(log, "peer closed connection in SSL handshake"))
            # garbage that starts like a TLS record, and then a good client
            try:
                raw_exchange(port, b"\x16\x03\x01\x00\x05hello" + bytes(range(256)))
            except OSError:
                pass
            assert https_get(port, client_context(ca), "a.test", "a.test")[1] == b"ok https\n"
    server = f"server: 127.0.0.1:{targets[0][0]}"
    assert lines[0] == ("[info] SSL_do_handshake() failed (SSL: error:0A000102:SSL routines::unsupported "
                        f"protocol) while SSL handshaking, client: 127.0.0.1, {server}")
    assert lines[1] == ("[info] peer closed connection in SSL handshake while SSL handshaking, "
                        f"client: 127.0.0.1, {server}")
    if len(targets) == 2:  # nginx: the same lines
        nginx_server = f"server: 127.0.0.1:{targets[1][0]}"
        assert [line.replace(nginx_server, server) for line in lines[2:]] == lines[:2]


def test_a_silent_client_is_closed_at_client_header_timeout(tmp_path: Path, ca: trustme.CA,
                                                           certs: dict[str, Path]) -> None:  # noqa: F811
    log = tmp_path / "ours.log"
    main = f"daemon off; master_process off; error_log {log} info;\n"
    conf = main + f"http {{ {tls_server('{port0}', certs, 'client_header_timeout 1s;')} }}"
    with Scriptlb(conf, tmp_path) as lb, socket.create_connection(("127.0.0.1", lb.port), timeout=10) as sock:
        started = time.monotonic()
        assert sock.recv(1) == b""  # closed by the server
        assert time.monotonic() - started >= 0.9
        line = log_line(log, "client timed out")
        assert line == ("[info] client timed out (110: Connection timed out) while SSL handshaking, "
                        f"client: 127.0.0.1, server: 127.0.0.1:{lb.port}")
        assert https_get(lb.port, client_context(ca), "a.test", "a.test")[1] == b"ok https\n"
