"""The proxy beside a real nginx (``@pytest.mark.nginx``): the same peer answers both, and what
the client gets (or what the access log says) must match."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from helpers import BackendRequest, Backends, Scriptlb, raw_exchange
from test_round_robin import NGINX, free_ports, nginx_running

pytestmark = [pytest.mark.nginx, pytest.mark.skipif(NGINX is None, reason="nginx is not installed")]

# the peer's status line per request path
STATUS_LINES = {
    "/nope": b"HTTP/1.1 404 Nope",
    "/ok": b"HTTP/1.1 200 OK",
    "/fine": b"HTTP/1.1 200 Fine And Dandy",
    "/http10": b"HTTP/1.0 201 Made It",
    "/unknown": b"HTTP/1.1 299 Whatever",
    "/bare": b"HTTP/1.1 503",
}


def status_lines():  # type: ignore[no-untyped-def]
    async def behaviour(req: BackendRequest, writer: asyncio.StreamWriter) -> bool:
        writer.write(STATUS_LINES[req.target] + b"\r\nContent-Length: 2\r\n\r\nhi")
        await writer.drain()
        return True

    return behaviour


def first_line(response: bytes) -> bytes:
    return response.split(b"\r\n", 1)[0]


def test_the_peers_reason_phrase_reaches_the_client_as_nginx(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    requests = [b"GET %s HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n" % p.encode() for p in STATUS_LINES]
    with Backends(status_lines()) as bk:
        block = f"server {{ listen 127.0.0.1:{port}; location / {{ proxy_pass http://{bk[0].addr}; }} }}"
        ngx_dir, lb_dir = tmp_path / "nginx", tmp_path / "scriptlb"
        ngx_dir.mkdir()
        lb_dir.mkdir()
        with nginx_running(ngx_dir, block, [port]):
            theirs = [first_line(raw_exchange(port, r)) for r in requests]
        lb_block = block.replace(f"listen 127.0.0.1:{port};", "listen {port0};")
        with Scriptlb(f"daemon off; master_process off; error_log {lb_dir}/error.log info;\n"
                      f"http {{ {lb_block} }}", lb_dir) as lb:
            ours = [first_line(raw_exchange(lb.port, r)) for r in requests]
    assert ours == theirs
    assert ours[0] == b"HTTP/1.1 404 Nope"
