"""proxy_bind beside a real nginx: the peer sees the local address the config asks for."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import Scriptlb, raw_exchange
from test_round_robin import NGINX, free_ports, nginx_running

from scriptlb.config.errors import ConfigError

BLOCK = """
    server {{
        listen {front};
        proxy_bind 127.0.0.2;
        location / {{ proxy_bind 127.0.0.3; proxy_pass http://{back}; }}
        location /inherit {{ proxy_pass http://{back}; }}
        location /off {{ proxy_bind off; proxy_pass http://{back}; }}
        location /var {{ proxy_bind $arg_b; proxy_pass http://{back}; }}
    }}
    server {{
        listen {back};
        location / {{ return 200 "$remote_addr"; }}
    }}
"""

PATHS = ["/", "/inherit", "/off", "/var?b=127.0.0.4", "/var", "/var?b=nonsense"]


def _seen(port: int, path: str) -> str:
    response = raw_exchange(port, f"GET {path} HTTP/1.0\r\nHost: t\r\n\r\n".encode())
    head, _, body = response.partition(b"\r\n\r\n")
    status = head.split(b" ", 2)[1].decode()
    return f"{status} {body.decode()}" if status == "200" else status


@pytest.mark.nginx
@pytest.mark.skipif(NGINX is None, reason="nginx is not installed")
def test_proxy_bind_as_nginx(tmp_path: Path) -> None:
    front, back = free_ports(2)
    ngx_dir, lb_dir = tmp_path / "nginx", tmp_path / "scriptlb"
    ngx_dir.mkdir()
    lb_dir.mkdir()
    with nginx_running(ngx_dir, BLOCK.format(front=f"127.0.0.1:{front}", back=f"127.0.0.1:{back}"),
                       [front, back]):
        theirs = [_seen(front, path) for path in PATHS]
    block = BLOCK.format(front="{port0}", back="127.0.0.1:{port1}")
    with Scriptlb(f"daemon off; master_process off;\nhttp {{ {block} }}", lb_dir, listens=2) as lb:
        ours = [_seen(lb.port, path) for path in PATHS]
    assert ours == theirs
    assert ours[:4] == ["200 127.0.0.3", "200 127.0.0.2", "200 127.0.0.1", "200 127.0.0.4"]
    assert ours[4:] == ["200 127.0.0.1", "200 127.0.0.1"]  # empty: no bind; not an address: logged


def test_transparent_is_refused(tmp_path: Path) -> None:
    from helpers import load_conf

    with pytest.raises(ConfigError, match=r'"transparent" parameter of "proxy_bind" .* in .*:2'):
        load_conf("http {\nproxy_bind $remote_addr transparent; }", tmp_path)
