"""``Expect: 100-continue`` as nginx answers it: "100 Continue" whenever the request's body is
read or discarded for an HTTP/1.1 client, even an empty one (Content-Length: 0), never to an
HTTP/1.0 client. Real sockets; real nginx is the oracle."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import Scriptlb, free_ports, raw_exchange
from nginx_oracle import NGINX, nginx_running

BLOCK = """
    server {{
        listen {front};
        location / {{ proxy_pass http://127.0.0.1:{back}/local; }}
    }}
    server {{
        listen {back};
        return 200 "got:$request_method";
    }}
"""


def _request(version: str, expect: str, length: int) -> bytes:
    body = b"x" * length
    return (f"POST / HTTP/{version}\r\nHost: t\r\nExpect: {expect}\r\nContent-Length: {length}\r\n"
            "Connection: close\r\n\r\n").encode() + body


REQUESTS = [
    _request("1.1", "100-continue", 0),
    _request("1.1", "100-Continue", 0),
    _request("1.0", "100-continue", 0),
    _request("1.1", "100-continue", 3),  # (the body came with the head: no 100 needed)
]


def _statuses(response: bytes) -> list[bytes]:
    return [line.split(b" ")[1] for line in response.split(b"\r\n") if line.startswith(b"HTTP/1.")]


@pytest.mark.nginx
@pytest.mark.skipif(NGINX is None, reason="nginx is not installed")
def test_continue_as_nginx(tmp_path: Path) -> None:
    front, back = free_ports(2)
    ngx_dir, lb_dir = tmp_path / "nginx", tmp_path / "scriptlb"
    ngx_dir.mkdir()
    lb_dir.mkdir()
    with nginx_running(ngx_dir, BLOCK.format(front=f"127.0.0.1:{front}", back=back)):
        theirs = [_statuses(raw_exchange(front, r)) for r in REQUESTS]
    text = "daemon off; master_process off;\nhttp {" + BLOCK.format(front="{port0}", back="{port1}") + "}"
    with Scriptlb(text, lb_dir, listens=2) as lb:
        ours = [_statuses(raw_exchange(lb.ports[0], r)) for r in REQUESTS]
    assert ours[:3] == theirs[:3] == [[b"100", b"200"], [b"100", b"200"], [b"200"]]
    assert ours[3][-1] == theirs[3][-1] == b"200"
