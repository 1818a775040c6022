"""add_trailer, and add_header values reading the lines added before them ($sent_http_NAME),
beside a real nginx."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers import Scriptlb, raw_exchange
from test_round_robin import NGINX, free_ports, nginx_running

BLOCK = """
    server {{
        listen {listen};
        location /t {{
            add_trailer Foo foo;
            add_trailer Foo bar;
            add_trailer X-Always yes always;
            return 200 "body";
        }}
        location /e {{ add_trailer X-Only always-not; return 404 "gone"; }}
        location /s {{
            add_header Link a;
            add_header Link b;
            add_header X-Sent-Link $sent_http_link;
            return 204;
        }}
    }}
"""

REQUESTS = [
    b"GET /t HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    b"GET /t HTTP/1.0\r\nHost: t\r\n\r\n",  # no chunked body in HTTP/1.0: no trailers
    b"HEAD /t HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    b"GET /e HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",  # not a 200-like status
    b"GET /s HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
]


def _normal(response: bytes) -> bytes:
    """Without Date and Server, the head's lines sorted (where Connection goes differs)."""
    response = re.sub(rb"(Date|Server): [^\r]*\r\n", b"", response)
    head, sep, body = response.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    return b"\r\n".join([status, *sorted(lines)]) + sep + body


@pytest.mark.nginx
@pytest.mark.skipif(NGINX is None, reason="nginx is not installed")
def test_trailers_as_nginx(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    ngx_dir, lb_dir = tmp_path / "nginx", tmp_path / "scriptlb"
    ngx_dir.mkdir()
    lb_dir.mkdir()
    with nginx_running(ngx_dir, BLOCK.format(listen=f"127.0.0.1:{port}"), [port]):
        theirs = [_normal(raw_exchange(port, r)) for r in REQUESTS]
    block = BLOCK.format(listen="{port0}")
    with Scriptlb(f"daemon off; master_process off;\nhttp {{ {block} }}", lb_dir) as lb:
        ours = [_normal(raw_exchange(lb.port, r)) for r in REQUESTS]
    assert ours == theirs
    assert ours[0].endswith(b"4\r\nbody\r\n0\r\nFoo: foo\r\nFoo: bar\r\nX-Always: yes\r\n\r\n")
    assert b"X-Sent-Link: a, b\r\n" in ours[4]
