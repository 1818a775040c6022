"""Per-request location settings nginx decides from the request: an ``if`` block (and a
``limit_except`` block) with directives of its own becomes the location the request continues
in; named captures of server_name regexes; keepalive_disable, keepalive_time and the
Keep-Alive header. Real sockets; real nginx is the oracle where the config is shared."""

from __future__ import annotations

import re
import socket
import time
from pathlib import Path

import pytest
from helpers import IO_TIMEOUT, Scriptlb, free_ports, load_conf, raw_exchange
from nginx_oracle import NGINX, nginx_running

from scriptlb.config import ConfigError

BLOCK = """
    server {{
        listen {front};
        server_name localhost;
        location /pass {{
            proxy_pass http://127.0.0.1:{back}/replacement;
            if ($arg_if) {{ add_header X-If yes; }}
        }}
        location /own {{
            proxy_pass http://127.0.0.1:{back}/outer;
            if ($arg_if) {{ proxy_pass http://127.0.0.1:{back}; }}
        }}
        location /lmt {{
            proxy_pass http://127.0.0.1:{back}/replacement;
            limit_except POST {{ proxy_pass http://127.0.0.1:{back}; }}
        }}
        location /msie {{ return 200 "msie"; }}
        location /ka {{
            keepalive_timeout 30 9;
            keepalive_disable safari;
            return 200 "ka";
        }}
    }}
    server {{
        listen {front};
        server_name ~^(?<sub>[a-z]+)\\.example\\.com$;
        location / {{ return 200 "sub=$sub name=$server_name"; }}
    }}
    server {{
        listen {back};
        return 200 "uri:$uri";
    }}
"""

REQUESTS = [
    b"GET /pass HTTP/1.0\r\nHost: localhost\r\n\r\n",
    b"GET /pass?if=1 HTTP/1.0\r\nHost: localhost\r\n\r\n",
    b"GET /own HTTP/1.0\r\nHost: localhost\r\n\r\n",
    b"GET /own/x?if=1 HTTP/1.0\r\nHost: localhost\r\n\r\n",
    b"GET /lmt HTTP/1.0\r\nHost: localhost\r\n\r\n",
    b"POST /lmt HTTP/1.0\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n",
    b"GET /x HTTP/1.0\r\nHost: Blah.example.com\r\n\r\n",
    b"GET /ka HTTP/1.1\r\nHost: localhost\r\n\r\n",
    b"GET /ka HTTP/1.1\r\nHost: localhost\r\nUser-Agent: Mac OS X Safari/7534.48.3\r\n\r\n",
    b"POST /ka HTTP/1.1\r\nHost: localhost\r\nUser-Agent: MSIE 5.0\r\nContent-Length: 0\r\n\r\n",
    b"POST /ka HTTP/1.1\r\nHost: localhost\r\nUser-Agent: MSIE 7.0\r\nContent-Length: 0\r\n\r\n",
    b"POST /msie HTTP/1.1\r\nHost: localhost\r\nUser-Agent: MSIE 5.0\r\nContent-Length: 0\r\n\r\n",
    b"GET /msie HTTP/1.1\r\nHost: localhost\r\nUser-Agent: MSIE 5.0\r\n\r\n",
]


def _first_response(port: int, request: bytes) -> bytes:
    """The response to ``request`` (its head's framing-independent lines, sorted, and body):
    one response is read, the connection left open (keep-alive is part of the answer)."""
    with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as sock:
        sock.sendall(request)
        data = b""
        deadline = time.monotonic() + IO_TIMEOUT
        while time.monotonic() < deadline:
            head, sep, body = data.partition(b"\r\n\r\n")
            if sep:
                match = re.search(rb"Content-Length: (\d+)", head)
                if match is not None and len(body) >= int(match.group(1)):
                    break
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    kept = sorted(line for line in lines if not line.startswith((b"Date:", b"Server:")))
    return b"\r\n".join([status, *kept]) + b"\r\n\r\n" + body


@pytest.mark.nginx
@pytest.mark.skipif(NGINX is None, reason="nginx is not installed")
def test_if_and_limit_except_locations_captures_and_keepalive_as_nginx(tmp_path: Path) -> None:
    front, back = free_ports(2)
    ngx_dir, lb_dir = tmp_path / "nginx", tmp_path / "scriptlb"
    ngx_dir.mkdir()
    lb_dir.mkdir()
    with nginx_running(ngx_dir, BLOCK.format(front=f"127.0.0.1:{front}", back=back)):
        theirs = [_first_response(front, r) for r in REQUESTS]
    text = "daemon off; master_process off;\nhttp {" + BLOCK.format(front="{port0}", back="{port1}") + "}"
    with Scriptlb(text, lb_dir, listens=2) as lb:
        ours = [_first_response(lb.ports[0], r) for r in REQUESTS]
    assert ours == theirs
    assert ours[1].endswith(b"uri:/replacement") and b"X-If: yes" in ours[1]
    assert ours[3].endswith(b"uri:/own/x")  # the if's own proxy_pass: the URI as it came
    assert ours[4].endswith(b"uri:/lmt")  # GET (not named): limit_except's block, its proxy_pass
    assert ours[5].endswith(b"uri:/replacement")  # POST: the location's own
    assert ours[6].endswith(b"sub=blah name=~^(?<sub>[a-z]+)\\.example\\.com$")
    assert b"Keep-Alive: timeout=9" in ours[7] and b"Connection: close" in ours[8]
    # (the location's list names safari only: an old MSIE keeps its connection here)
    assert b"Connection: keep-alive" in ours[9] and b"Connection: keep-alive" in ours[10]
    assert b"Connection: close" in ours[11] and b"Connection: keep-alive" in ours[12]  # msie6: POSTs only


def test_keepalive_time_closes_an_old_connection(tmp_path: Path) -> None:
    text = """daemon off; master_process off;
    http { server { listen {port0}; keepalive_time 1s;
                    location / { return 200 "$connection_requests"; } } }"""
    with (Scriptlb(text, tmp_path) as lb,
          socket.create_connection(("127.0.0.1", lb.port), timeout=IO_TIMEOUT) as sock):
        request = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"
        sock.sendall(request)
        first = sock.recv(65536)
        time.sleep(1.2)  # (a lower bound only: the connection is older than keepalive_time)
        sock.sendall(request)
        second = b""
        while chunk := sock.recv(65536):
            second += chunk
    assert b"Connection: keep-alive" in first
    assert b"Connection: close" in second and second.endswith(b"2")


@pytest.mark.parametrize(
    ("block", "error"),
    [
        ("server { listen 127.0.0.1:1; if ($uri) { proxy_pass http://127.0.0.1:2; } }",
         '"proxy_pass" directive is not allowed here'),
        ("server { listen 127.0.0.1:1; location / { limit_except GET { proxy_pass http://[::1]:2/x; } } }",
         '"proxy_pass" cannot have URI part'),
        ("server { listen 127.0.0.1:1; location / { keepalive_timeout 10 x; } }",
         '"keepalive_timeout" directive invalid value'),
        ("server { listen 127.0.0.1:1; location / { keepalive_disable opera; } }", 'invalid value "opera"'),
    ],
)
def test_config_errors(tmp_path: Path, block: str, error: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_conf(f"daemon off;\nhttp {{\n{block}\n}}", tmp_path)
    assert error in str(err.value) and ".conf:3" in str(err.value)


def test_keepalive_header_only_on_kept_connections(tmp_path: Path) -> None:
    text = """daemon off; master_process off;
    http { server { listen {port0}; keepalive_timeout 5 7; location / { return 200 ok; } } }"""
    with Scriptlb(text, tmp_path) as lb:
        kept = _first_response(lb.port, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        closed = raw_exchange(lb.port, b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    assert b"Keep-Alive: timeout=7" in kept
    assert b"Keep-Alive" not in closed
