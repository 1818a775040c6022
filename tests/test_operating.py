"""Operating scriptlb on a real master with two workers: stream peers' bytes in the API,
``/api/9/workers``, a hook that picks an unhealthy peer, shared ``unavail``, health check
``jitter``/``mandatory persistent``, and a retired worker replaced at once."""

from __future__ import annotations

import http.client
import json
import socket
import textwrap
from pathlib import Path
from typing import Any

import pytest
from helpers import free_ports, master_process, wait_for
from stream_helpers import TcpPeer, echo

pytestmark = pytest.mark.slow


def get_json(port: int, path: str) -> Any:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
        assert response.status == 200, (path, response.status, body)
        return json.loads(body)
    finally:
        conn.close()


def answers_json(port: int, path: str) -> Any:
    try:
        return get_json(port, path)
    except OSError:
        return None


def write_conf(prefix: Path, body: str) -> Path:
    conf = prefix / "conf" / "scriptlb.conf"
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text("daemon off;\nworker_processes 2;\nerror_log logs/error.log info;\nevents {}\n"
                    + textwrap.dedent(body))
    return conf


# --------------------------------------------------------------------------- stream bytes


def test_stream_peers_count_their_bytes_over_every_worker(tmp_path: Path) -> None:
    """Bytes relayed to and from a stream peer show as its ``sent``/``received`` in
    ``/api/9/stream/upstreams``, summed over both workers (connections spread by reuseport)."""
    api_port, stream_port = free_ports(2)
    with TcpPeer(echo) as peer:
        conf = write_conf(tmp_path, f"""\
            http {{ server {{ listen 127.0.0.1:{api_port}; location /api {{ api; }} }} }}
            stream {{
                upstream u {{ zone u 64k; server {peer.addr}; }}
                server {{ listen 127.0.0.1:{stream_port} reuseport; proxy_pass u; }}
            }}
            """)
        with master_process(tmp_path, conf):
            wait_for(lambda: answers_json(api_port, "/api/9/stream/upstreams/u"), what="the API")
            sizes = [1000 + n * 137 for n in range(12)]
            for size in sizes:
                with socket.create_connection(("127.0.0.1", stream_port), timeout=10) as conn:
                    conn.sendall(b"x" * size)
                    got = b""
                    while len(got) < size:
                        chunk = conn.recv(65536)
                        assert chunk
                        got += chunk

            def peer_figures() -> Any:
                figures = get_json(api_port, "/api/9/stream/upstreams/u")["peers"][0]
                return figures if figures["connections"] == len(sizes) and figures["active"] == 0 \
                    and figures["received"] == sum(sizes) else None

            figures = wait_for(peer_figures, what="12 finished connections")
    assert figures["sent"] == sum(sizes)
    assert figures["received"] == sum(sizes)
    assert figures["server"] == peer.addr and figures["state"] == "up"
    assert "responses" not in figures and "first_byte_time" in figures
