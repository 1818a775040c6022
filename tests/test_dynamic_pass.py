"""proxy_pass with variables and the resolver for names at request time (scriptlb.request.dynamic_pass):
beside a real nginx where the config is shared, against a real DNS server on 127.0.0.1."""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from cluster_servers import DnsServer
from helpers import Backends, Scriptlb, echo, free_ports, get, raw_exchange, wait_for
from nginx_oracle import NGINX, nginx_running

from scriptlb.config.addresses import AddressError
from scriptlb.config.errors import ConfigError
from scriptlb.request.dynamic_pass import parse_target

pytest.importorskip("dnslib")

LOCATIONS = """
    upstream up {{ server {peer}; }}
    server {{
        listen {listen};
        location /u {{ proxy_pass http://$arg_u; }}
        location /a/ {{ proxy_pass http://{peer}/fixed$is_args$args; }}
        location /n {{
            resolver 127.0.0.1:{dns} valid=30s; resolver_timeout 2s; proxy_pass http://$host:{port};
        }}
        location /slow {{
            resolver 127.0.0.1:{silent}; resolver_timeout 300ms; proxy_pass http://$host:{port};
        }}
        location /nores {{ proxy_pass http://$host:{port}; }}
    }}
"""

REQUESTS = [
    ("/u?u=up", "x"),  # an upstream block's name
    ("/u?u=127.0.0.1:{port}", "x"),  # an address
    ("/a/b?y=1", "x"),  # the URI part as evaluated, the client's arguments not added
    ("/n/p?q", "backend.test"),  # a name the resolver knows
    ("/n", "nx.test"),  # NXDOMAIN
    ("/slow", "backend.test"),  # the name server does not answer
    ("/nores", "backend.test"),  # no resolver
    ("/u?u=127.0.0.1:99999", "x"),  # an invalid port
]


def _request(path: str, host: str) -> bytes:
    return f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode()


def _outcome(response: bytes) -> str:
    """Status, and for proxied ones the request line and Host the peer got."""
    head, _, body = response.partition(b"\r\n\r\n")
    status = head.split(b" ", 2)[1].decode()
    if status != "200":
        return status
    lines = body.decode("latin-1").splitlines()
    host = next(line for line in lines if line.lower().startswith("host:"))
    return f"{status} {lines[0]} {host}"


_ERROR = re.compile(r"\[(?:error|crit)\] \d+#\d+: \*\d+ (.*?), client: ")


def _errors(path: Path) -> list[str]:
    return sorted(m.group(1) for m in _ERROR.finditer(path.read_text()) if "resolv" in m.group(1)
                  or "upstream" in m.group(1))


@contextmanager
def _silent_udp() -> Iterator[int]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


@pytest.mark.nginx
@pytest.mark.skipif(NGINX is None, reason="nginx is not installed")
def test_variables_pick_upstream_address_or_name_as_nginx(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    with DnsServer() as dns, _silent_udp() as silent, Backends(echo()) as bk:
        dns.records[("backend.test", "A")] = [("127.0.0.1", 3600)]
        peer_port = bk[0].port
        values = dict(peer=bk[0].addr, dns=dns.port, silent=silent, port=peer_port)
        requests = [_request(p.replace("{port}", str(peer_port)), h) for p, h in REQUESTS]
        ngx_dir, lb_dir = tmp_path / "nginx", tmp_path / "scriptlb"
        ngx_dir.mkdir()
        lb_dir.mkdir()
        with nginx_running(ngx_dir, LOCATIONS.format(listen=f"127.0.0.1:{port}", **values)):
            theirs = [_outcome(raw_exchange(port, r)) for r in requests]
        lb_conf = (f"daemon off; master_process off; error_log {lb_dir}/error.log info;\n"
                   "http { " + LOCATIONS.format(listen="{port0}", **values) + " }")
        with Scriptlb(lb_conf, lb_dir) as lb:
            ours = [_outcome(raw_exchange(lb.port, r)) for r in requests]
    assert ours == theirs
    assert ours[0] == "200 GET /u?u=up HTTP/1.0 Host: up"
    assert ours[2].startswith("200 GET /fixed?y=1 ")
    assert ours[3] == f"200 GET /n/p?q HTTP/1.0 Host: backend.test:{peer_port}"
    assert ours[4:] == ["502", "502", "502", "500"]
    assert _errors(lb_dir / "error.log") == _errors(ngx_dir / "logs" / "error.log")
    assert "no resolver defined to resolve backend.test" in _errors(lb_dir / "error.log")


NAMES = """
    server {{
        listen {{port0}};
        location / {{ resolver 127.0.0.1:{dns}; proxy_pass http://$http_x_name:{port}; }}
        location /valid {{ resolver 127.0.0.1:{dns} valid=1h; proxy_pass http://$http_x_name:{port}; }}
    }}
"""


def _named(port: int, name: str, path: str = "/") -> int:
    return get(port, path, headers={"X-Name": name}).status


def test_answers_are_cached_for_their_ttl_and_failures_are_not(tmp_path: Path) -> None:
    with DnsServer() as dns, Backends(echo()) as bk:
        conf = "daemon off; master_process off;\nhttp { " + NAMES.format(dns=dns.port, port=bk[0].port) + " }"
        with Scriptlb(conf, tmp_path) as lb:
            assert _named(lb.port, "later.test") == 502  # NXDOMAIN
            dns.records[("later.test", "A")] = [("127.0.0.1", 3600)]
            assert _named(lb.port, "later.test") == 200  # the failure was not cached
            asked = dns.queries
            assert _named(lb.port, "LATER.test") == 200  # cached, names compared case-insensitively
            assert dns.queries == asked
            dns.records[("short.test", "A")] = [("127.0.0.1", 0)]
            assert _named(lb.port, "short.test") == 200
            dns.fail = True
            assert _named(lb.port, "short.test") == 502  # a TTL of 0 is not cached
            dns.fail = False
            dns.records[("short.test", "A")] = [("127.0.0.1", 0)]
            assert _named(lb.port, "short.test", "/valid") == 200
            dns.fail = True
            assert _named(lb.port, "short.test", "/valid") == 200  # valid= overrides the TTL
            assert _named(lb.port, "later.test") == 200  # (and the worker keeps serving)


def test_several_addresses_take_turns(tmp_path: Path) -> None:
    with DnsServer() as dns, Backends(echo()) as bk:
        dns.records[("two.test", "A")] = [("127.0.0.1", 3600), ("127.0.0.2", 3600)]
        log = tmp_path / "up.log"
        conf = ("daemon off; master_process off;\nhttp { log_format up $upstream_addr; "
                f"access_log {log} up;" + NAMES.format(dns=dns.port, port=bk[0].port) + " }")
        with Scriptlb(conf, tmp_path) as lb:
            for _ in range(4):
                _named(lb.port, "two.test")
            wait_for(lambda: log.exists() and len(log.read_text().splitlines()) == 4,
                     what="four access-log lines")
    peers = {line.split(", ")[0] for line in log.read_text().splitlines()}
    assert peers == {f"127.0.0.1:{bk[0].port}", f"127.0.0.2:{bk[0].port}"}


def test_hostile_values_in_the_url_get_an_error_and_the_worker_keeps_serving(tmp_path: Path) -> None:
    with Backends(echo()) as bk:
        conf = ("daemon off; master_process off;\nhttp { upstream up { server " + bk[0].addr + "; }"
                " server { listen {port0}; location / { proxy_pass http://$arg_u; }"
                " location /s { proxy_pass $arg_u; } } }")
        with Scriptlb(conf, tmp_path) as lb:
            assert get(lb.port, "/?u=[zz").status == 500  # invalid host
            assert get(lb.port, "/?u=a%20b").status == 502  # a name, and no resolver
            assert get(lb.port, "/s?u=ftp://up").status == 500  # invalid URL prefix
            assert get(lb.port, "/s?u=http://up/x").status == 200
            assert get(lb.port, "/?u=up").status == 200


def test_parse_target_as_nginx() -> None:
    t = parse_target("http://h:8080")
    assert (t.host, t.port, t.uri, t.proxy_host, t.proxy_port) == ("h", 8080, None, "h:8080", "8080")
    t = parse_target("https://[::1]:443/x?y")
    assert (t.host, t.port, t.uri, t.proxy_host, t.ssl) == ("::1", 443, "/x?y", "[::1]", True)
    assert (parse_target("https://h").proxy_port, parse_target("http://h:80").proxy_port) == ("443", "80")
    assert parse_target("http://h?a=b").uri == "/?a=b"
    t = parse_target("http://unix:/tmp/s.sock:/p")
    assert (t.unix_path, t.proxy_host, t.proxy_port) == ("/tmp/s.sock", "localhost", "")
    with pytest.raises(AddressError):
        parse_target("ftp://h")


def test_config_errors_name_file_and_line(tmp_path: Path) -> None:
    from helpers import load_conf

    with pytest.raises(ConfigError, match=r'unknown "nope" variable in .*scriptlb.conf:2'):
        load_conf("http { server { listen 127.0.0.1:1;\nlocation / { proxy_pass http://$nope; } } }",
                  tmp_path)
    with pytest.raises(ConfigError, match=r'invalid port in resolver "127.0.0.1:0" in .*:2'):
        load_conf("http { server { listen 127.0.0.1:1;\nlocation / { resolver 127.0.0.1:0; } } }", tmp_path)
    with pytest.raises(ConfigError, match=r'"health_check" requires "proxy_pass" to an upstream'):
        load_conf("http { server { listen 127.0.0.1:1;\n"
                  "location / { proxy_pass http://$host; health_check; } } }", tmp_path)


PROXY_VARS = """
    upstream up {{ server {peer}; }}
    server {{
        listen {listen};
        proxy_set_header X-PP "$proxy_host|$proxy_port";
        location /block {{ proxy_pass http://up; }}
        location /addr {{ proxy_pass http://{peer}; }}
        location /unix {{ proxy_pass http://unix:{sock}; }}
        location /var {{ proxy_pass http://$arg_to; }}
    }}
"""


@pytest.mark.skipif(NGINX is None, reason="needs nginx")
def test_proxy_host_and_port_as_nginx(tmp_path: Path) -> None:
    """$proxy_host and $proxy_port for an upstream block, an address, a unix socket and
    proxy_pass with variables, beside nginx."""
    import asyncio

    sock_path = tmp_path / "peer.sock"
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(str(sock_path))
    unix.listen(8)

    def x_pp(response: bytes) -> str:
        status_line, _, rest = response.partition(b"\r\n")
        if b" 200 " not in status_line:
            return status_line.decode()
        lines = rest.partition(b"\r\n\r\n")[2].decode("latin-1").splitlines()
        return next(line for line in lines if line.lower().startswith("x-pp:")).split(":", 1)[1].strip()

    paths = ["/block", "/addr", "/unix", "/var?to=up", "/var?to={peer}"]
    with Backends(echo(), echo()) as bk:
        bk[1].server.close()  # type: ignore[union-attr]

        async def serve_unix() -> None:
            bk[1].server = await asyncio.start_unix_server(bk[1].handle, sock=unix)

        bk.run(serve_unix())
        values = dict(peer=bk[0].addr, sock=sock_path)
        port = free_ports(1)[0]
        requests = [_request(p.replace("{peer}", bk[0].addr), "x") for p in paths]
        ngx_dir, lb_dir = tmp_path / "nginx", tmp_path / "scriptlb"
        ngx_dir.mkdir()
        lb_dir.mkdir()
        with nginx_running(ngx_dir, PROXY_VARS.format(listen=f"127.0.0.1:{port}", **values)):
            theirs = [x_pp(raw_exchange(port, r)) for r in requests]
        block = PROXY_VARS.format(listen="{port0}", **values)
        lb_conf = "daemon off; master_process off; http { " + block + " }"
        with Scriptlb(lb_conf, lb_dir) as lb:
            ours = [x_pp(raw_exchange(lb.port, r)) for r in requests]
    assert ours == theirs
    peer_port = bk[0].addr.rsplit(":", 1)[1]
    assert ours == ["up|80", f"{bk[0].addr}|{peer_port}", "localhost|", "up|80",
                    f"{bk[0].addr}|{peer_port}"]
