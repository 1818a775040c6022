"""balancer_keepalive N sizes the pool of connections to hook-set peers (OpenResty's directive):
after a burst of concurrent requests, N idle connections stay for the next burst."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers import BackendRequest, Backends, Scriptlb, get, respond

BURST = 3

CONF = """
daemon off;
master_process off;
error_log {tmp}/error.log info;
http {
    upstream u {
        server 127.0.0.1:{backend};
        {pool_directive}
        balancer_by_python_block {
            from ngx import balancer
            balancer.set_current_peer("127.0.0.1", {backend})
            balancer.enable_keepalive(60, 0)
        }
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


def slow_ok(delay: float = 0.2):
    answer = respond(body=b"ok")

    async def behaviour(req: BackendRequest, writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(delay)  # keeps the burst's requests in flight together
        return await answer(req, writer)

    return behaviour


def _burst(port: int) -> list[int]:
    with ThreadPoolExecutor(max_workers=BURST) as pool:
        return [r.status for r in pool.map(lambda _: get(port, "/"), range(BURST))]


@pytest.mark.parametrize(("pool_directive", "kept"), [
    ("balancer_keepalive 1;", 1),
    ("", BURST),  # the default, 32, keeps the whole burst
])
def test_idle_connections_kept_for_hook_peers(tmp_path: Path, pool_directive: str, kept: int) -> None:
    with Backends(slow_ok()) as backends:
        backend = backends[0]
        text = CONF.replace("{pool_directive}", pool_directive)
        with Scriptlb(text, tmp_path, backend=backend.port, tmp=tmp_path) as lb:
            assert _burst(lb.port) == [200] * BURST
            assert backend.connections == BURST
            assert _burst(lb.port) == [200] * BURST
    # the second burst reused the kept connections and opened the rest
    assert backend.connections == 2 * BURST - kept
