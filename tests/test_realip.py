"""realip (set_real_ip_from, real_ip_header, real_ip_recursive; scriptlb.request.realip) beside a real
nginx: the same hostile headers must give the same $remote_addr and $remote_port."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import Scriptlb, raw_exchange
from test_round_robin import NGINX, free_ports, nginx_running

from scriptlb.config.errors import ConfigError
from scriptlb.request.realip import parse_addr_port

BLOCK = """
    server {{
        listen {listen0};
        set_real_ip_from 127.0.0.1;
        set_real_ip_from 10.0.0.0/8;
        add_header X-A "$remote_addr|$remote_port|$realip_remote_addr" always;
        location / {{ return 204; }}
        location /custom {{ real_ip_header X-Client; return 204; }}  # (too late for return)
        location /untrusted {{ set_real_ip_from 192.0.2.1; return 204; }}
    }}
    server {{
        listen {listen1};
        set_real_ip_from 127.0.0.1;
        set_real_ip_from 10.0.0.0/8;
        real_ip_header X-Forwarded-For;
        add_header X-A "$remote_addr|$remote_port|$realip_remote_addr" always;
        location / {{ return 204; }}
    }}
    server {{
        listen {listen2};
        set_real_ip_from 127.0.0.1;
        set_real_ip_from 10.0.0.0/8;
        real_ip_header X-Forwarded-For;
        real_ip_recursive on;
        add_header X-A "$remote_addr|$remote_port|$realip_remote_addr" always;
        location / {{ return 204; }}
    }}
"""

CASES = [  # (server, request headers)
    (0, ["X-Real-IP: 192.0.2.7"]),
    (0, ["X-Real-IP: 192.0.2.7:8080"]),
    (0, ["X-Real-IP: [2001:db8::1]:99"]),
    (0, ["X-Real-IP: 2001:db8::2"]),
    (0, ["X-Real-IP: not-an-address"]),
    (0, ["X-Real-IP: 192.0.2.7", "X-Real-IP: 192.0.2.8"]),
    (0, []),
    (1, ["X-Forwarded-For: 192.0.2.1, 10.0.0.2"]),
    (1, ["X-Forwarded-For: 192.0.2.1", "X-Forwarded-For: 10.0.0.3"]),
    (1, ["X-Forwarded-For: 192.0.2.1,  ,"]),
    (1, ["X-Forwarded-For: garbage"]),
    (2, ["X-Forwarded-For: 192.0.2.1, 10.0.0.2, 10.0.0.3"]),
    (2, ["X-Forwarded-For: 192.0.2.1 192.0.2.2, 10.0.0.2"]),
    (2, ["X-Forwarded-For: bad, 10.0.0.2"]),
    (2, ["X-Forwarded-For: 10.0.0.9, 10.0.0.2"]),
    (2, ["X-Forwarded-For: 192.0.2.5", "X-Forwarded-For: 10.0.0.4, 10.0.0.2"]),
    (2, ["X-Forwarded-For: 192.0.2.5", "X-Forwarded-For: 192.0.2.6, 10.0.0.2"]),
    (2, ["X-Forwarded-For: 192.0.2.5", "X-Forwarded-For: junk, 10.0.0.2"]),
    (0, ["X-Client: 192.0.2.9:7"]),
    (0, ["X-Real-IP: 192.0.2.7"], "/untrusted"),
]


def _request(headers: list[str], path: str = "/custom") -> bytes:
    return (f"GET {path} HTTP/1.0\r\nHost: t\r\n" + "".join(h + "\r\n" for h in headers) + "\r\n").encode()


def _seen(response: bytes) -> str:
    """The X-A header, the connection's own port replaced (it differs run to run)."""
    line = next(x for x in response.split(b"\r\n") if x.startswith(b"X-A: "))
    addr, port, real = line[5:].decode().split("|")
    return f"{addr}|{'P' if port and real == addr == '127.0.0.1' else port}|{real}"


@pytest.mark.nginx
@pytest.mark.skipif(NGINX is None, reason="nginx is not installed")
def test_realip_takes_the_address_nginx_takes(tmp_path: Path) -> None:
    ports = free_ports(3)
    requests = [(case[0], _request(*case[1:])) for case in CASES]
    ngx_dir, lb_dir = tmp_path / "nginx", tmp_path / "scriptlb"
    ngx_dir.mkdir()
    lb_dir.mkdir()
    listens = {f"listen{i}": f"127.0.0.1:{p}" for i, p in enumerate(ports)}
    with nginx_running(ngx_dir, BLOCK.format(**listens), ports):
        theirs = [_seen(raw_exchange(ports[server], r)) for server, r in requests]
    placeholders = {f"listen{i}": f"{{port{i}}}" for i in range(3)}
    with Scriptlb("daemon off; master_process off;\nhttp { " + BLOCK.format(**placeholders) + " }",
                  lb_dir, listens=3) as lb:
        ours = [_seen(raw_exchange(lb.ports[server], r)) for server, r in requests]
    assert ours == theirs
    assert ours[0] == "192.0.2.7||127.0.0.1"
    assert ours[1] == "192.0.2.7|8080|127.0.0.1"
    assert ours[11] == "192.0.2.1||127.0.0.1"


def test_parse_addr_port() -> None:
    assert parse_addr_port("10.1.2.3") == ("10.1.2.3", 0)
    assert parse_addr_port(" 10.1.2.3:80 ") == ("10.1.2.3", 80)
    assert parse_addr_port("[::1]:8") == ("::1", 8)
    assert parse_addr_port("::1") == ("::1", 0)
    for bad in ("10.1.2.3:99999", "10.1.2.3:x", "[::1", "[::1]x", "host", ""):
        assert parse_addr_port(bad) is None


def test_config_errors_name_file_and_line(tmp_path: Path) -> None:
    from helpers import load_conf

    with pytest.raises(ConfigError, match=r'invalid parameter "all" in .*scriptlb.conf:2'):
        load_conf("http { server { listen 127.0.0.1:1;\nset_real_ip_from all; } }", tmp_path)
    with pytest.raises(ConfigError, match=r'host not found in set_real_ip_from "no.such.host.invalid" in '):
        load_conf("http {\nset_real_ip_from no.such.host.invalid; }", tmp_path)
    with pytest.raises(ConfigError, match=r'"real_ip_recursive" .* in .*:2'):
        load_conf("http {\nreal_ip_recursive maybe; }", tmp_path)


PP_BLOCK = """
    server {{
        listen {listen} proxy_protocol;
        set_real_ip_from 127.0.0.1;
        real_ip_header proxy_protocol;
        add_header X-A "$remote_addr|$remote_port|$realip_remote_addr" always;
        add_header X-PP "$proxy_protocol_addr|$proxy_protocol_port" always;
        add_header X-PPS "$proxy_protocol_server_addr|$proxy_protocol_server_port" always;
        location / {{ return 204; }}
    }}
"""

_V2_TCP4 = (b"\r\n\r\n\x00\r\nQUIT\n" + b"\x21\x11\x00\x0c" + bytes([192, 0, 2, 1, 192, 0, 2, 2])
            + (123).to_bytes(2, "big") + (5678).to_bytes(2, "big"))

PP_CASES = [
    b"PROXY TCP4 192.0.2.1 192.0.2.2 123 5678\r\n",
    b"PROXY TCP6 2001:DB8::1 2001:DB8::2 123 5678\r\n",
    b"PROXY UNKNOWN\r\n",
    _V2_TCP4,
]


def _pp_seen(response: bytes) -> str:
    lines = response.split(b"\r\n")
    a = next(x for x in lines if x.startswith(b"X-A: "))[5:].decode()
    pp = next(x for x in lines if x.startswith(b"X-PP: "))[6:].decode()
    pp += "|" + next(x for x in lines if x.startswith(b"X-PPS: "))[7:].decode()
    addr, port, real = a.split("|")
    return f"{addr}|{'P' if addr == '127.0.0.1' else port}|{real}|{pp}"


@pytest.mark.nginx
@pytest.mark.skipif(NGINX is None, reason="nginx is not installed")
def test_proxy_protocol_listen_and_realip_as_nginx(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    requests = [header + b"GET / HTTP/1.0\r\nHost: t\r\n\r\n" for header in PP_CASES]
    broken = b"PROXY TCP4 nonsense\r\nGET / HTTP/1.0\r\n\r\n"
    ngx_dir, lb_dir = tmp_path / "nginx", tmp_path / "scriptlb"
    ngx_dir.mkdir()
    lb_dir.mkdir()
    with nginx_running(ngx_dir, PP_BLOCK.format(listen=f"127.0.0.1:{port}"), [port]):
        theirs = [_pp_seen(raw_exchange(port, r)) for r in requests]
        theirs_broken = raw_exchange(port, broken)
    with Scriptlb(f"daemon off; master_process off; error_log {lb_dir}/error.log info;\n"
                  "http { " + PP_BLOCK.format(listen="{port0}") + " }", lb_dir) as lb:
        ours = [_pp_seen(raw_exchange(lb.port, r)) for r in requests]
        ours_broken = raw_exchange(lb.port, broken)
        assert get_ok(lb.port)  # (the worker keeps serving)
    assert ours == theirs
    assert ours[0] == "192.0.2.1|123|127.0.0.1|192.0.2.1|123|192.0.2.2|5678"
    assert ours_broken == theirs_broken == b""
    expected = ('broken header: "PROXY TCP4 nonsense'
                '\\r\\nGET / HTTP/1.0\\r\\n\\r\\n" while reading PROXY protocol')
    assert expected in (lb_dir / "error.log").read_text()


def get_ok(port: int) -> bool:
    response = raw_exchange(port, b"PROXY UNKNOWN\r\nGET / HTTP/1.0\r\n\r\n")
    return response.startswith(b"HTTP/1.1 204")


def test_proxy_protocol_with_ssl_is_refused(tmp_path: Path) -> None:
    from helpers import load_conf

    with pytest.raises(ConfigError, match=r'"proxy_protocol" parameter of "listen" with "ssl" .*:2'):
        load_conf("http { server {\nlisten 127.0.0.1:1 ssl proxy_protocol; } }", tmp_path)
