"""limit_rate, limit_rate_after, proxy_limit_rate and ``$limit_rate`` on proxied responses:
real sockets; real nginx is the oracle for the variable."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from helpers import Backends, Scriptlb, free_ports, get, load_conf, raw_exchange, respond
from nginx_oracle import NGINX, nginx_running

from scriptlb.config import ConfigError

BODY = b"X" * 40000

VARIABLE_BLOCK = """
    server {{
        listen {listen};
        location /set {{ set $limit_rate $arg_l; add_header X-Rate $limit_rate; return 200 OK; }}
        location /conf {{ limit_rate 10k; add_header X-Rate $limit_rate; return 200 OK; }}
    }}
"""


@pytest.mark.nginx
@pytest.mark.skipif(NGINX is None, reason="nginx is not installed")
def test_limit_rate_variable_as_nginx(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    paths = ["/set?l=40k", "/set", "/set?l=bogus", "/conf"]

    def rates(at: int) -> list[bytes]:
        out = []
        for path in paths:
            response = raw_exchange(at, f"GET {path} HTTP/1.0\r\n\r\n".encode())
            out.append(next((line for line in response.split(b"\r\n") if line.startswith(b"X-Rate")), b""))
        return out

    ngx_dir, lb_dir = tmp_path / "nginx", tmp_path / "scriptlb"
    ngx_dir.mkdir()
    lb_dir.mkdir()
    with nginx_running(ngx_dir, VARIABLE_BLOCK.format(listen=f"127.0.0.1:{port}")):
        theirs = rates(port)
    block = VARIABLE_BLOCK.format(listen="{port0}")
    with Scriptlb(f"daemon off; master_process off;\nhttp {{ {block} }}", lb_dir) as lb:
        ours = rates(lb.port)
    # (nginx takes the location's limit_rate when the response is written: 0 in its headers)
    assert ours == theirs == [b"X-Rate: 40960", b"X-Rate: 0", b"X-Rate: 0", b"X-Rate: 0"]


def _timed(port: int, path: str) -> tuple[float, bytes]:
    started = time.monotonic()
    response = get(port, path)
    return time.monotonic() - started, response.body


def test_rates_hold_the_body_back(tmp_path: Path) -> None:
    with Backends(respond(body=BODY)) as bk:
        text = f"""daemon off; master_process off;
        http {{ server {{
            listen {{port0}};
            location /peer {{ proxy_pass http://{bk[0].addr}; proxy_limit_rate 20000; }}
            location /client {{ proxy_pass http://{bk[0].addr}; limit_rate 20000; }}
            location /after {{ proxy_pass http://{bk[0].addr}; limit_rate 1000; limit_rate_after 40000; }}
            location /var {{ proxy_pass http://{bk[0].addr}; set $limit_rate 20000; }}
            location /free {{ proxy_pass http://{bk[0].addr}; }}
        }} }}"""
        with Scriptlb(text, tmp_path) as lb:
            paths = ("/peer", "/client", "/after", "/var", "/free")
            results = {path: _timed(lb.port, path) for path in paths}
    for path, (_, body) in results.items():
        assert body == BODY, path
    # 40000 bytes at 20000 bytes/s with one second's budget up front: a second at least
    for path in ("/peer", "/client", "/var"):
        assert results[path][0] >= 0.95, path
    # (no upper bound: a loaded machine is slow anyway; the unlimited ones only finish first)
    assert results["/after"][0] < results["/client"][0]
    assert results["/free"][0] < results["/client"][0]


def test_client_gone_while_the_body_waits(tmp_path: Path) -> None:
    with Backends(respond(body=BODY)) as bk:
        text = f"""daemon off; master_process off; error_log {tmp_path}/error.log info;
        http {{ server {{ listen {{port0}};
            location / {{ proxy_pass http://{bk[0].addr}; limit_rate 1000; }} }} }}"""
        with Scriptlb(text, tmp_path) as lb:
            cut = raw_exchange(lb.port, b"GET / HTTP/1.0\r\n\r\n", timeout=0.5)  # leaves mid-body
            after = raw_exchange(lb.port, b"GET / HTTP/1.0\r\n\r\n", timeout=0.5)
    assert 0 < len(cut.partition(b"\r\n\r\n")[2]) < len(BODY)
    assert after.startswith(b"HTTP/1.1 200")  # the worker still serves


@pytest.mark.parametrize(
    ("line", "error"),
    [
        ("limit_rate fast;", '"limit_rate" directive invalid value'),
        ("proxy_limit_rate 1 2;", 'invalid number of arguments in "proxy_limit_rate" directive'),
    ],
)
def test_limit_rate_errors(tmp_path: Path, line: str, error: str) -> None:
    with pytest.raises(ConfigError) as err:
        text = f"daemon off;\nhttp {{ server {{ listen 127.0.0.1:1; location / {{ {line} }} }} }}"
        load_conf(text, tmp_path)
    assert error in str(err.value) and ".conf:2" in str(err.value)
