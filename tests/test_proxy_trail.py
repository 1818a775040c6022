"""The per-try trail through real requests: $upstream_addr / $upstream_status as the access log
shows them, for failover, status-based retries, timeouts, max_fails windows, backup peers and
"no live upstreams"."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest
from helpers import (
    Backends,
    HttpConnection,
    Scriptlb,
    closed_port,
    free_ports,
    get,
    hang,
    raw_exchange,
    read_log_lines,
    respond,
)
from nginx_oracle import NGINX, nginx_running


def conf(upstream: str, location: str = "") -> str:
    return f"""
daemon off;
master_process off;
error_log {{tmp}}/error.log info;
http {{
    log_format trail '$upstream_addr|$upstream_status|$status|$request';
    upstream u {{
        {upstream}
    }}
    server {{
        listen 127.0.0.1:{{port0}};
        access_log {{tmp}}/access.log trail;
        location / {{
            proxy_pass http://u;
            {location}
        }}
    }}
}}
"""


def start(text: str, tmp_path: Path) -> Scriptlb:
    return Scriptlb(text, tmp_path, tmp=tmp_path)


def trail(tmp_path: Path) -> list[tuple[str, str, str]]:
    """(upstream_addr, upstream_status, status) per logged request, in order."""
    lines = (tmp_path / "access.log").read_text().splitlines()
    return [tuple(line.split("|")[:3]) for line in lines]  # type: ignore[misc]


def test_refused_then_next_peer(tmp_path: Path) -> None:
    dead = closed_port()
    with Backends(respond(body=b"ok")) as bk, start(conf(f"server 127.0.0.1:{dead}; server {bk[0].addr};"),
                                                    tmp_path) as lb:
        assert get(lb.port, "/").status == 200
    assert trail(tmp_path) == [(f"127.0.0.1:{dead}, {bk[0].addr}", "502, 200", "200")]


def test_http_502_retried_then_200(tmp_path: Path) -> None:
    with Backends(respond(502), respond(200)) as bk, start(
        conf(f"server {bk[0].addr}; server {bk[1].addr};", "proxy_next_upstream error http_502;"), tmp_path
    ) as lb:
        assert get(lb.port, "/").status == 200
    assert trail(tmp_path) == [(f"{bk[0].addr}, {bk[1].addr}", "502, 200", "200")]


def test_timeout_then_all_tries_used(tmp_path: Path) -> None:
    with Backends(hang(), hang()) as bk, start(
        conf(f"server {bk[0].addr}; server {bk[1].addr};", "proxy_read_timeout 100ms;"), tmp_path
    ) as lb:
        assert get(lb.port, "/").status == 504
    assert trail(tmp_path) == [(f"{bk[0].addr}, {bk[1].addr}", "504, 504", "504")]


def test_next_upstream_tries_caps_the_budget(tmp_path: Path) -> None:
    dead = [closed_port() for _ in range(3)]
    servers = "".join(f"server 127.0.0.1:{p};" for p in dead)
    with start(conf(servers, "proxy_next_upstream_tries 2;"), tmp_path) as lb:
        assert get(lb.port, "/").status == 502
    addrs, statuses, status = trail(tmp_path)[0]
    assert addrs == f"127.0.0.1:{dead[0]}, 127.0.0.1:{dead[1]}"
    assert (statuses, status) == ("502, 502", "502")


def test_max_fails_takes_a_peer_out_for_fail_timeout(tmp_path: Path) -> None:
    dead = closed_port()
    with Backends(respond()) as bk, start(
        conf(f"server 127.0.0.1:{dead} max_fails=1 fail_timeout=30s; server {bk[0].addr};"), tmp_path
    ) as lb, HttpConnection(lb.port) as client:
        for _ in range(4):
            assert client.request("GET", "/").status == 200
    rows = trail(tmp_path)
    assert rows[0] == (f"127.0.0.1:{dead}, {bk[0].addr}", "502, 200", "200")
    # the failed peer is skipped for the rest of the window: no more failed tries
    assert rows[1:] == [(bk[0].addr, "200", "200")] * 3
    log = (tmp_path / "error.log").read_text()
    assert "[warn]" in log and "upstream server temporarily disabled while connecting to upstream" in log


def test_backup_used_only_when_primaries_fail(tmp_path: Path) -> None:
    dead = closed_port()
    with Backends(respond(body=b"backup")) as bk, start(
        conf(f"server 127.0.0.1:{dead}; server {bk[0].addr} backup;"), tmp_path
    ) as lb:
        assert get(lb.port, "/").body == b"backup"
    assert trail(tmp_path) == [(f"127.0.0.1:{dead}, {bk[0].addr}", "502, 200", "200")]


def test_no_live_upstreams_502(tmp_path: Path) -> None:
    dead = [closed_port(), closed_port()]
    servers = "".join(f"server 127.0.0.1:{p} max_fails=1 fail_timeout=30s;" for p in dead)
    with start(conf(servers), tmp_path) as lb:
        assert get(lb.port, "/").status == 502  # both tried and failed
        assert get(lb.port, "/").status == 502  # none eligible now
    rows = trail(tmp_path)
    assert rows[0] == (f"127.0.0.1:{dead[0]}, 127.0.0.1:{dead[1]}", "502, 502", "502")
    assert rows[1] == ("u", "502", "502")
    assert "no live upstreams while connecting to upstream" in (tmp_path / "error.log").read_text()


def test_status_not_listed_is_passed_through_without_retry(tmp_path: Path) -> None:
    with Backends(respond(500, b"app error"), respond(200)) as bk, start(
        conf(f"server {bk[0].addr}; server {bk[1].addr};"), tmp_path
    ) as lb:
        response = get(lb.port, "/")
    assert (response.status, response.body) == (500, b"app error")
    assert trail(tmp_path) == [(bk[0].addr, "500", "500")]


def test_post_not_retried_after_send_unless_non_idempotent(tmp_path: Path) -> None:
    with Backends(respond(502), respond(200)) as bk:
        servers = f"server {bk[0].addr}; server {bk[1].addr};"
        with start(conf(servers, "proxy_next_upstream error http_502;"), tmp_path) as lb:
            assert get(lb.port, "/", method="POST", body=b"x").status == 502
        assert trail(tmp_path) == [(bk[0].addr, "502", "502")]
        (tmp_path / "access.log").unlink()
        with start(conf(servers, "proxy_next_upstream error http_502 non_idempotent;"), tmp_path) as lb:
            assert get(lb.port, "/", method="POST", body=b"x").status == 200
        assert trail(tmp_path)[0][1] == "502, 200"


def test_next_upstream_timeout_bounds_the_tries(tmp_path: Path) -> None:
    with Backends(hang(), hang(), hang()) as bk, start(
        conf("".join(f"server {b.addr};" for b in bk),
             "proxy_read_timeout 150ms; proxy_next_upstream_timeout 100ms;"), tmp_path
    ) as lb:
        assert get(lb.port, "/").status == 504
    assert trail(tmp_path) == [(bk[0].addr, "504", "504")]  # the window closed after one try


def test_upstream_times_are_logged_per_try(tmp_path: Path) -> None:
    dead = closed_port()
    text = conf(f"server 127.0.0.1:{dead}; server {{good}} ; keepalive 4;",
                "proxy_http_version 1.1; proxy_set_header Connection \"\";")
    text = text.replace("log_format trail '$upstream_addr|$upstream_status|$status|$request';",
                        "log_format trail '$upstream_connect_time|$upstream_header_time|"
                        "$upstream_response_time|$request_time';")
    with Backends(respond()) as bk, Scriptlb(text, tmp_path, tmp=tmp_path, good=bk[0].addr) as lb, \
            HttpConnection(lb.port) as client:
        assert client.request("GET", "/").status == 200  # dead peer, then a new connection
        assert client.request("GET", "/").status == 200  # the pooled connection
    first, second = (line.split("|") for line in (tmp_path / "access.log").read_text().splitlines())
    connect, header, response, _ = first
    # the refused try has no connect or header time (nginx's "-") but a response time
    assert connect.startswith("-, ") and header.startswith("-, ") and response.count(", ") == 1
    assert second[0] == "0.000"  # a pooled connection costs no connect
    numbers = (connect.split(", ")[1], header.split(", ")[1], *response.split(", "), *second[:4], first[3])
    for value in numbers:
        whole, _, millis = value.partition(".")
        assert whole.isdigit() and len(millis) == 3


def test_requests_rejected_by_the_client_side_are_access_logged(tmp_path: Path) -> None:
    with Backends(respond()) as bk, start(conf(f"server {bk[0].addr};"), tmp_path) as lb:
        assert raw_exchange(lb.port, b"\x16\x03\x01garbage\r\n\r\n").startswith(b"HTTP/1.1 400 ")
        long_uri = b"GET /" + b"u" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
        assert raw_exchange(lb.port, long_uri).startswith(b"HTTP/1.1 414 ")
        too_big = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n\r\n"
        assert raw_exchange(lb.port, too_big).startswith(b"HTTP/1.1 413 ")
    statuses = [row[2] for row in trail(tmp_path)]
    assert statuses == ["400", "414", "413"]
    assert bk[0].connections == 0


TIMES_FORMAT = ("$request|$upstream_addr|$upstream_status|$upstream_connect_time|"
                "$upstream_header_time|$upstream_response_time|$status")


def _times_shape(line: str) -> str:
    """A log line with each time replaced by T (the values differ run to run, "-" must not)."""
    return re.sub(r"\d+\.\d{3}", "T", line)


@pytest.mark.nginx
@pytest.mark.skipif(NGINX is None, reason="nginx is not installed")
def test_failed_and_no_live_tries_show_times_as_nginx(tmp_path: Path) -> None:
    """Refused connect, read timeout, no live upstreams: nginx gives every try a response
    time (0.000 for "no live"), connect/header times only when reached."""
    port, dead, dead2 = free_ports(3)
    silent = socket.socket()  # accepts (kernel backlog), never answers: a read timeout
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    silent_port = silent.getsockname()[1]
    servers = f"""
        upstream nolive {{
            server 127.0.0.1:{dead} max_fails=1 fail_timeout=30s;
            server 127.0.0.1:{dead2} max_fails=1 fail_timeout=30s;
        }}
        server {{
            listen 127.0.0.1:{port};
            access_log {{log}} times;
            location /refused {{ proxy_pass http://127.0.0.1:{dead}; }}
            location /timeout {{ proxy_pass http://127.0.0.1:{silent_port}; proxy_read_timeout 200ms; }}
            location /nolive {{ proxy_pass http://nolive; }}
        }}
    """
    paths = ["/refused", "/timeout", "/nolive", "/nolive"]
    ngx_dir, lb_dir = tmp_path / "nginx", tmp_path / "scriptlb"
    ngx_dir.mkdir()
    lb_dir.mkdir()
    ngx_block = f"log_format times '{TIMES_FORMAT}';" + servers.replace("{log}", f"{ngx_dir}/times.log")
    lb_block = ngx_block.replace(f"{ngx_dir}/times.log", f"{lb_dir}/times.log").replace(
        f"listen 127.0.0.1:{port};", "listen {port0};")
    with silent:
        with nginx_running(ngx_dir, ngx_block):
            for path in paths:
                get(port, path)
            theirs = read_log_lines(ngx_dir / "times.log", len(paths))
        with Scriptlb(f"daemon off; master_process off; error_log {lb_dir}/error.log info;\n"
                      f"http {{ {lb_block} }}", lb_dir) as lb:
            for path in paths:
                get(lb.port, path)
            ours = read_log_lines(lb_dir / "times.log", len(paths))
    assert [_times_shape(line) for line in ours] == [_times_shape(line) for line in theirs]
    assert ours[3].endswith("|nolive|502|-|-|0.000|502")
