"""A balancer_by_lua config ported as OpenResty users write it: ``keepalive N`` in the upstream,
a hook that picks the peer with a function imported from ``python_package_path``, and no
``enable_keepalive()``. OpenResty's keepalive module pools whatever peer the balancer hook set
(keyed by its address); so does scriptlb: 200 requests open at most one connection per peer."""

from __future__ import annotations

from pathlib import Path

from helpers import Backends, HttpConnection, Scriptlb, respond

CONF = """
daemon off;
master_process off;
error_log {tmp}/error.log info;
http {
    python_package_path "{tmp}/?.py";
    upstream u {
        server {a};
        server {b};
        keepalive 128;
        balancer_by_python_block {
            from ngx import balancer
            import picker
            host, port = picker.pick(ngx.var.uri)
            balancer.set_current_peer(host, port)
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

PICKER = """
import zlib

PEERS = {peers}


def pick(uri):
    return PEERS[zlib.crc32(uri.encode()) % len(PEERS)]
"""

REQUESTS = 200


def test_keepalive_pools_hook_chosen_peers(tmp_path: Path) -> None:
    with Backends(respond(body=b"a"), respond(body=b"b")) as bk:
        peers = [("127.0.0.1", b.port) for b in bk]
        (tmp_path / "picker.py").write_text(PICKER.replace("{peers}", repr(peers)))
        with Scriptlb(CONF, tmp_path, tmp=tmp_path, a=bk[0].addr, b=bk[1].addr) as lb, \
                HttpConnection(lb.port) as conn:
            bodies = {conn.request("GET", f"/item/{i}").body for i in range(REQUESTS)}
            assert bodies == {b"a", b"b"}  # the hook spread the requests over both peers
            opened = sum(b.connections for b in bk)
            assert sum(len(b.requests) for b in bk) == REQUESTS
            assert len(lb.runtime().upstreams["u"].pool) == opened  # idle in the keepalive pool
    assert opened <= 2


def test_without_keepalive_hook_peers_are_not_pooled(tmp_path: Path) -> None:
    """The rule's other half: no ``keepalive`` (and no ``enable_keepalive``), no pooling."""
    with Backends(respond(body=b"a"), respond(body=b"b")) as bk:
        peers = [("127.0.0.1", b.port) for b in bk]
        (tmp_path / "picker.py").write_text(PICKER.replace("{peers}", repr(peers)))
        text = CONF.replace("keepalive 128;", "")
        with Scriptlb(text, tmp_path, tmp=tmp_path, a=bk[0].addr, b=bk[1].addr) as lb, \
                HttpConnection(lb.port) as conn:
            for i in range(10):
                assert conn.request("GET", f"/item/{i}").status == 200
    assert sum(b.connections for b in bk) == 10
