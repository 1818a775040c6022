"""nginx's own responses, byte-exact."""

from __future__ import annotations

import email.utils
import socket
from pathlib import Path

import pytest
from helpers import Scriptlb

from scriptlb.http import responses
from scriptlb.http.responses import (
    closes_connection,
    date_header,
    error_page,
    error_response,
    http_date,
    peer_status_line,
    reason,
    status_line,
    wire_status,
)

NOV_22 = 1795341600.0  # Sun, 22 Nov 2026 10:00:00 GMT


def test_502_page_is_nginx_byte_for_byte() -> None:
    assert error_page(502) == (
        b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
        b"<center><h1>502 Bad Gateway</h1></center>\r\n"
        b"<hr><center>scriptlb</center>\r\n</body>\r\n</html>\r\n"
    )


def test_494_page_says_400_with_the_reason() -> None:
    assert error_page(494) == (
        b"<html>\r\n<head><title>400 Request Header Or Cookie Too Large</title></head>\r\n<body>\r\n"
        b"<center><h1>400 Bad Request</h1></center>\r\n"
        b"<center>Request Header Or Cookie Too Large</center>\r\n"
        b"<hr><center>scriptlb</center>\r\n</body>\r\n</html>\r\n"
    )
    assert status_line(494) == b"HTTP/1.1 400 Bad Request\r\n"
    assert wire_status(494) == 400


def test_431_is_nginx_494() -> None:
    assert error_page(431) == error_page(494)
    assert status_line(431) == b"HTTP/1.1 400 Bad Request\r\n"
    assert error_response(431, now=NOV_22) == error_response(494, now=NOV_22)


@pytest.mark.parametrize(
    ("status", "title"),
    [
        (301, "301 Moved Permanently"),
        (302, "302 Found"),
        (400, "400 Bad Request"),
        (401, "401 Authorization Required"),
        (403, "403 Forbidden"),
        (404, "404 Not Found"),
        (405, "405 Not Allowed"),
        (408, "408 Request Time-out"),
        (413, "413 Request Entity Too Large"),
        (414, "414 Request-URI Too Large"),
        (429, "429 Too Many Requests"),
        (498, "404 Not Found"),
        (500, "500 Internal Server Error"),
        (503, "503 Service Temporarily Unavailable"),
        (504, "504 Gateway Time-out"),
    ],
)
def test_page_titles(status: int, title: str) -> None:
    page = error_page(status)
    assert page is not None
    assert page.startswith(f"<html>\r\n<head><title>{title}</title></head>\r\n".encode())
    assert f"<center><h1>{title}</h1></center>\r\n<hr>".encode() in page


@pytest.mark.parametrize("status", [200, 204, 407, 418, 499, 506])
def test_statuses_without_a_page(status: int) -> None:
    assert error_page(status) is None


@pytest.mark.parametrize(
    ("status", "line"),
    [
        (200, b"HTTP/1.1 200 OK\r\n"),
        (302, b"HTTP/1.1 302 Moved Temporarily\r\n"),
        (405, b"HTTP/1.1 405 Not Allowed\r\n"),
        (503, b"HTTP/1.1 503 Service Temporarily Unavailable\r\n"),
        (504, b"HTTP/1.1 504 Gateway Time-out\r\n"),
        (418, b"HTTP/1.1 418 \r\n"),
    ],
)
def test_status_lines(status: int, line: bytes) -> None:
    assert status_line(status) == line


def test_status_line_with_the_upstreams_own_reason() -> None:
    assert status_line(404, b"Nope") == b"HTTP/1.1 404 Nope\r\n"
    assert status_line(299, b"") == b"HTTP/1.1 299 \r\n"


def test_reason() -> None:
    assert (reason(502), reason(299)) == ("Bad Gateway", "")


def test_http_date_is_rfc_7231_and_cached_per_second() -> None:
    assert http_date(NOV_22) == "Sun, 22 Nov 2026 10:00:00 GMT"
    assert http_date(NOV_22 + 0.999) == "Sun, 22 Nov 2026 10:00:00 GMT"
    assert http_date(NOV_22 + 1.0) == "Sun, 22 Nov 2026 10:00:01 GMT"
    assert date_header(NOV_22 + 61.5) == b"Date: Sun, 22 Nov 2026 10:01:01 GMT\r\n"


def test_http_date_uses_the_clock_by_default() -> None:
    assert http_date().endswith(" GMT")
    assert len(http_date()) == 29


def test_full_502_response() -> None:
    page = error_page(502)
    assert page is not None
    assert error_response(502, now=NOV_22) == (
        b"HTTP/1.1 502 Bad Gateway\r\n"
        b"Server: scriptlb\r\n"
        b"Date: Sun, 22 Nov 2026 10:00:00 GMT\r\n"
        b"Content-Type: text/html\r\n"
        b"Content-Length: 153\r\n"
        b"Connection: keep-alive\r\n"
        b"\r\n" + page
    )
    assert len(page) == 153  # nginx's is 150: "nginx" is 3 bytes shorter


def test_head_response_keeps_the_length_but_not_the_body() -> None:
    response = error_response(504, keep_alive=False, head=True, now=NOV_22)
    assert response.endswith(b"Content-Length: 163\r\nConnection: close\r\n\r\n")
    assert len(error_page(504) or b"") == 163


@pytest.mark.parametrize(
    ("status", "closes"),
    [
        (400, True),
        (413, True),
        (414, True),
        (494, True),
        (500, True),
        (501, True),
        (408, True),
        (404, False),
        (502, False),
        (503, False),
        (504, False),
    ],
)
def test_statuses_that_close_the_connection(status: int, closes: bool) -> None:
    assert closes_connection(status) is closes
    response = error_response(status, keep_alive=True, now=NOV_22)
    assert (b"Connection: close\r\n" in response) is closes


def test_extra_headers_go_before_connection() -> None:
    response = error_response(301, extra_headers=b"Location: http://h/x/\r\n", now=NOV_22)
    assert b"Content-Length: 165\r\nLocation: http://h/x/\r\nConnection: keep-alive\r\n\r\n<html>" in response


def test_status_without_page_has_zero_length() -> None:
    assert error_response(499, now=NOV_22).endswith(b"Content-Length: 0\r\nConnection: keep-alive\r\n\r\n")


def test_prebuilt_responses_are_reused_within_a_second_and_rebuilt_after() -> None:
    first = error_response(503, now=NOV_22 + 100)
    assert error_response(503, now=NOV_22 + 100.5) is first
    later = error_response(503, now=NOV_22 + 101)
    assert later is not first
    assert b"Date: Sun, 22 Nov 2026 10:01:41 GMT\r\n" in later
    assert responses.ERROR_PAGES[503] in later


# --------------------------------------------------------------------------- against a real nginx

from helpers import free_ports  # noqa: E402
from nginx_oracle import NGINX, nginx_running  # noqa: E402


def exchange_raw(port: int, request: bytes) -> bytes:
    """Send raw bytes, read the whole answer (nginx closes: the requests say Connection: close)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def as_scriptlb(nginx_response: bytes) -> bytes:
    """nginx's bytes with its name swapped for ours (server_tokens off: no version anywhere)."""
    head, _, body = nginx_response.partition(b"\r\n\r\n")
    body = body.replace(b"<center>nginx</center>", b"<center>scriptlb</center>")
    lines = head.split(b"\r\n")
    for i, line in enumerate(lines):
        if line == b"Server: nginx":
            lines[i] = b"Server: scriptlb"
        elif line.startswith(b"Content-Length: "):
            length = int(line[16:])  # a page's tail names the server: 3 bytes longer for us
            lines[i] = b"Content-Length: %d" % (length + len("scriptlb") - len("nginx") if length else 0)
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def date_of(response: bytes) -> float:
    line = next(x for x in response.split(b"\r\n") if x.startswith(b"Date: "))
    return email.utils.parsedate_to_datetime(line[6:].decode()).timestamp()


@pytest.mark.nginx
@pytest.mark.skipif(NGINX is None, reason="nginx is not installed")
def test_error_responses_equal_a_real_nginx(tmp_path: Path) -> None:
    port, dead = free_ports(2)
    silent = socket.socket()  # accepts (in the kernel's backlog) and never answers: a read timeout
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    silent_port = silent.getsockname()[1]
    http_block = f"""
        server_tokens off;
        large_client_header_buffers 2 1k;
        client_max_body_size 10;
        server {{
            listen 127.0.0.1:{port};
            location = /404 {{ return 404; }}
            location = /403 {{ return 403; }}
            location = /500 {{ return 500; }}
            location = /503 {{ return 503; }}
            location = /429 {{ return 429; }}
            location = /502 {{ proxy_pass http://127.0.0.1:{dead}; }}
            location = /504 {{ proxy_pass http://127.0.0.1:{silent_port}; proxy_read_timeout 200ms; }}
            location / {{ return 200 ok; }}
        }}
    """
    close = b"Host: t\r\nConnection: close\r\n\r\n"
    cases = [
        (404, b"GET /404 HTTP/1.1\r\n" + close),
        (403, b"GET /403 HTTP/1.1\r\n" + close),
        (500, b"GET /500 HTTP/1.1\r\n" + close),
        (503, b"GET /503 HTTP/1.1\r\n" + close),
        (429, b"GET /429 HTTP/1.1\r\n" + close),
        (502, b"GET /502 HTTP/1.1\r\n" + close),
        (504, b"GET /504 HTTP/1.1\r\n" + close),
        (400, b"GARBAGE\r\n\r\n"),
        (494, b"GET / HTTP/1.1\r\nX-Big: " + b"b" * 1500 + b"\r\n" + close),
        (414, b"GET /" + b"u" * 1500 + b" HTTP/1.1\r\n" + close),
        (413, b"POST / HTTP/1.1\r\nContent-Length: 100\r\n" + close + b"x" * 100),
        (404, b"HEAD /404 HTTP/1.1\r\n" + close),
    ]
    lb_dir = tmp_path / "scriptlb"
    lb_dir.mkdir()
    lb_block = http_block.replace("server_tokens off;", "").replace(
        f"listen 127.0.0.1:{port};", "listen {port0};"
    )
    lb_conf = f"""
        daemon off; master_process off; error_log {lb_dir}/error.log info;
        events {{}}
        http {{ {lb_block} }}
    """
    with silent:
        with nginx_running(tmp_path, http_block):
            answers = [exchange_raw(port, request) for _, request in cases]
        with Scriptlb(lb_conf, lb_dir) as lb:  # the same server behind scriptlb: the whole pipeline
            lb_answers = [exchange_raw(lb.port, request) for _, request in cases]
    for (status, request), answer, lb_answer in zip(cases, answers, lb_answers, strict=True):
        head = request.startswith(b"HEAD")
        ours = error_response(status, keep_alive=False, head=head, now=date_of(answer))
        assert ours == as_scriptlb(answer), (status, answer)
        assert lb_answer == error_response(status, keep_alive=False, head=head, now=date_of(lb_answer)), (
            status
        )


def test_peer_status_line_is_the_peers_code_and_phrase() -> None:
    assert peer_status_line(404, b"Nope") == b"HTTP/1.1 404 Nope\r\n"
    assert peer_status_line(503, b"") == b"HTTP/1.1 503\r\n"  # nginx: no phrase, no space


def test_head_start_is_the_status_line_server_and_this_seconds_date(monkeypatch: pytest.MonkeyPatch) -> None:
    """Built once per second for each status and phrase; a new second (or a clock set back)
    gives the new Date, and the peer's phrase (or none) is kept as it came."""
    now = [NOV_22 + 0.5]
    monkeypatch.setattr(responses, "_wall_clock", lambda: now[0])
    start = responses.head_start(200, b"OK")
    assert start == b"HTTP/1.1 200 OK\r\nServer: scriptlb\r\nDate: Sun, 22 Nov 2026 10:00:00 GMT\r\n"
    assert responses.head_start(200, b"OK") is start  # (this second's, remembered)
    assert responses.head_start(502, None).startswith(b"HTTP/1.1 502 Bad Gateway\r\nServer: scriptlb\r\n")
    assert responses.head_start(503, b"").startswith(b"HTTP/1.1 503\r\n")
    now[0] = NOV_22 + 1.0
    assert responses.head_start(200, b"OK").endswith(b"Date: Sun, 22 Nov 2026 10:00:01 GMT\r\n")
    now[0] = NOV_22 - 0.5  # the clock set back
    assert responses.head_start(200, b"OK").endswith(b"Date: Sun, 22 Nov 2026 09:59:59 GMT\r\n")


def test_head_starts_of_one_second_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Peers choose their phrases: past the bound a head start is built and not remembered."""
    monkeypatch.setattr(responses, "_wall_clock", lambda: NOV_22 + 7.5)
    for n in range(300):
        assert responses.head_start(200, b"phrase %d" % n).startswith(b"HTTP/1.1 200 phrase %d\r\n" % n)
    assert sum(len(starts) for starts in responses.CLOCK.head_starts.values()) <= 256
