"""``listen ... sndbuf=size rcvbuf=size``: the listening socket's buffer sizes (its connections
inherit them), checked as nginx checks them; proxy_max_temp_file_size is accepted."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from helpers import load_conf

from scriptlb.config import ConfigError
from scriptlb.config.model import ListenConf
from scriptlb.process.listeners import _new_socket


def test_buffer_sizes_reach_the_socket() -> None:
    plain = _new_socket(ListenConf("127.0.0.1", 0))
    sized = _new_socket(ListenConf("127.0.0.1", 0, sndbuf=48 * 1024, rcvbuf=40 * 1024))
    try:
        # (Linux doubles what it is given, for its bookkeeping: at least the size asked)
        assert sized.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) >= 48 * 1024
        assert sized.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) >= 40 * 1024
        assert sized.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) != plain.getsockopt(
            socket.SOL_SOCKET, socket.SO_SNDBUF)
    finally:
        plain.close()
        sized.close()


def test_options_are_parsed_and_shared_by_the_socket(tmp_path: Path) -> None:
    conf = load_conf("""
        daemon off;
        http {
            server { listen 127.0.0.1:8080 sndbuf=32k rcvbuf=1m; location / { proxy_max_temp_file_size 0; } }
            server { listen 127.0.0.1:8080; server_name other; }
        }
    """, tmp_path)
    assert conf.http is not None
    listens = [server.listens[0] for server in conf.http.servers]
    assert [(lc.sndbuf, lc.rcvbuf) for lc in listens] == [(32 * 1024, 1024 * 1024)] * 2


@pytest.mark.parametrize(
    ("params", "error"),
    [
        ("sndbuf=big", 'invalid sndbuf "big"'),
        ("rcvbuf=", 'invalid rcvbuf ""'),
    ],
)
def test_bad_sizes(tmp_path: Path, params: str, error: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_conf(f"daemon off;\nhttp {{ server {{ listen 127.0.0.1:8080 {params}; }} }}", tmp_path)
    assert error in str(err.value) and ".conf:2" in str(err.value)


def test_two_servers_with_options_for_one_socket(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_conf("""daemon off;
http { server { listen 127.0.0.1:8080 sndbuf=32k; }
server { listen 127.0.0.1:8080 backlog=10; server_name b; } }""", tmp_path)
    assert "duplicate listen options for 127.0.0.1:8080" in str(err.value)
