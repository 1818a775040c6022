"""The ``stream`` block: config checks, the relay, failover, limits, hooks, SNI routing, reload.

Real sockets on 127.0.0.1: a worker in a thread (``Scriptlb``) or a real master process, TCP
peers in threads (``stream_helpers``). Where nginx's stream module is installed, the same
config runs on it and the observable results must match.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import types
import zlib
from pathlib import Path

import pytest
from helpers import Scriptlb, free_ports, load_conf, master_process, read_log_lines, wait_for
from stream_helpers import (
    HAS_NGINX_STREAM,
    TcpPeer,
    TlsPeer,
    banner,
    banner_from,
    close_at_once,
    echo,
    never_read,
    nginx_stream,
    read_until_closed,
    round_trip,
)

from scriptlb.config import ConfigError, load
from scriptlb.request import attempt
from scriptlb.stream.preread import DONE, NEED_MORE, NOT_TLS, parse_client_hello
from scriptlb.stream.variables import missing_names
from scriptlb.variables import evaluate

LOG = ('log_format s \'$status $bytes_sent $bytes_received "$upstream_addr" '
       '"$upstream_bytes_sent" "$upstream_bytes_received" "$upstream_connect_time"\';')


def session_log(tmp_path: Path, count: int) -> list[str]:
    return read_log_lines(tmp_path / "s.log", count)


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ("stream { server { listen 1; access_log x; } }", "log format is not specified"),
        ("stream { log_format a $request; }", 'unknown "request" variable'),
        ("stream { upstream u { server 127.0.0.1; } }", 'no port in upstream "127.0.0.1"'),
        ("stream { server { listen 1; proxy_pass 127.0.0.1; } }", 'no port in upstream "127.0.0.1"'),
        ("stream { server { listen 1; proxy_next_upstream maybe; } }",
         'invalid value "maybe" in "proxy_next_upstream" directive, it must be "on" or "off"'),
        ("stream { server { listen 1; } server { listen 1; } }",
         'duplicate "0.0.0.0:1" address and port pair'),
        ("stream { server { listen 1; proxy_pass a:1; proxy_pass b:1; } }",
         '"proxy_pass" directive is duplicate'),
        ("stream { server { listen 1; proxy_timeout x; } }", '"proxy_timeout" directive invalid value'),
        ("stream { server { listen 1; location / {} } }", '"location" directive is not allowed here'),
        ("stream { upstream u { server 127.0.0.1:1; keepalive 2; } }",
         '"keepalive" directive is not allowed here'),
        ("stream { } stream { }", '"stream" directive is duplicate'),
        ("stream { map $remote_addr $x { a b c; } }", "invalid number of the map parameters"),
        ("stream { map $remote_addr $x { default a; default b; } }", "duplicate default map parameter"),
        ("stream { log_format f $nope; }", 'unknown "nope" variable'),
    ],
)
def test_config_errors_are_nginx_s(tmp_path: Path, block: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_conf(block, tmp_path)
    assert message in str(err.value)
    assert f"{tmp_path}/scriptlb.conf:1" in str(err.value)


def test_bad_stream_config_fails_the_command_with_file_and_line(tmp_path: Path) -> None:
    conf = tmp_path / "bad.conf"
    conf.write_text("stream {\n  server {\n    listen 1;\n    proxy_buffer_size huge;\n  }\n}\n")
    done = subprocess.run([sys.executable, "-m", "scriptlb", "-t", "-p", str(tmp_path), "-c", str(conf)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert f'"proxy_buffer_size" directive invalid value in {conf}:4' in done.stderr


def test_defaults_and_inheritance_are_nginx_s(tmp_path: Path) -> None:
    conf = load_conf("""
        stream {
            proxy_timeout 5s;
            server { listen 1; proxy_pass 127.0.0.1:9; proxy_connect_timeout 2s; }
            server { listen 2; proxy_pass 127.0.0.1:9; proxy_timeout 1s; }
        }""", tmp_path)
    first, second = conf.stream.servers
    assert (first.proxy.timeout, first.proxy.connect_timeout) == (5.0, 2.0)
    assert (second.proxy.timeout, second.proxy.connect_timeout) == (1.0, 60.0)
    proxy = first.proxy
    assert (proxy.buffer_size, proxy.next_upstream, proxy.next_upstream_tries) == (16384, True, 0)
    assert conf.worker_shutdown_timeout == 0.0


def test_every_stream_variable_the_config_accepts_has_a_getter() -> None:
    assert missing_names() == frozenset()


# --------------------------------------------------------------------------- relay


def test_five_megabytes_round_trip_byte_exact_and_logged(tmp_path: Path) -> None:
    data = os.urandom(5 * 1024 * 1024)
    with TcpPeer(echo) as peer, Scriptlb(f"""
            stream {{
                {LOG}
                access_log {tmp_path}/s.log s;
                server {{ listen 127.0.0.1:{{port0}}; proxy_pass {peer.addr}; proxy_buffer_size 8k; }}
            }}""", tmp_path) as lb:
        assert round_trip(lb.port, data) == data
        (line,) = session_log(tmp_path, 1)
    size = len(data)
    assert line.startswith(f'200 {size} {size} "{peer.addr}" "{size}" "{size}" "0.0')


def test_a_session_ends_cleanly_once_http_byte_variables_are_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Once any http template in the worker reads $upstream_bytes_* (a process-wide switch),
    every try's end copies byte counts off its connection: a stream peer's too."""
    monkeypatch.setattr(evaluate, "BYTE_COUNTS_READ", [True])
    monkeypatch.setattr(attempt, "BYTE_COUNTS_READ", evaluate.BYTE_COUNTS_READ)
    with TcpPeer(echo) as peer, Scriptlb(f"""
            error_log {tmp_path}/error.log info;
            stream {{
                {LOG}
                access_log {tmp_path}/s.log s;
                server {{ listen 127.0.0.1:{{port0}}; proxy_pass {peer.addr}; }}
            }}""", tmp_path) as lb:
        assert round_trip(lb.port, b"ping" * 100) == b"ping" * 100
        (line,) = session_log(tmp_path, 1)
    assert line.startswith(f'200 400 400 "{peer.addr}" "400" "400"')
    assert "unexpected" not in (tmp_path / "error.log").read_text()


def test_refused_peer_fails_over_and_counts_one_try_each(tmp_path: Path) -> None:
    (dead,) = free_ports(1)
    with TcpPeer(banner(b"hello\n")) as peer, Scriptlb(f"""
            error_log {tmp_path}/error.log info;
            stream {{
                {LOG}
                access_log {tmp_path}/s.log s;
                upstream u {{ server 127.0.0.1:{dead}; server {peer.addr}; }}
                server {{ listen 127.0.0.1:{{port0}}; proxy_pass u; }}
            }}""", tmp_path) as lb:
        with socket.create_connection(("127.0.0.1", lb.port), timeout=10) as conn:
            assert conn.recv(100) == b"hello\n"
        (line,) = session_log(tmp_path, 1)
    assert line.startswith(f'200 6 0 "127.0.0.1:{dead}, {peer.addr}" "0, 0" "0, 6" "-, 0.0')
    errors = (tmp_path / "error.log").read_text()
    assert (f"connect() failed (111: Connection refused) while proxying connection, client: 127.0.0.1, "
            f'server: 127.0.0.1:{lb.port}, upstream: "127.0.0.1:{dead}", bytes from/to client:0/0, '
            "bytes from/to upstream:0/0") in errors


def test_a_peer_that_greets_and_closes_at_once_is_a_complete_session(tmp_path: Path) -> None:
    """Its bytes and EOF may arrive before the connect's own completion callback runs: the
    try is still connected, timed and counted as a success."""
    def greet_and_close(conn: socket.socket) -> None:
        conn.sendall(b"hi")

    with TcpPeer(greet_and_close) as peer, Scriptlb(f"""
            stream {{
                {LOG}
                access_log {tmp_path}/s.log s;
                upstream u {{ server {peer.addr}; }}
                server {{ listen 127.0.0.1:{{port0}}; proxy_pass u; }}
            }}""", tmp_path) as lb:
        for _ in range(5):
            with socket.create_connection(("127.0.0.1", lb.port), timeout=10) as conn:
                assert read_until_closed(conn) == b"hi"
        lines = session_log(tmp_path, 5)
        upstream = lb.thread.worker.stream.upstreams["u"]
        (only,) = upstream.peers.primary
        wait_for(lambda: upstream.stats.figures(only)[:2] == (5, 0))  # 5 tries, 0 failures
    for line in lines:
        assert line.startswith(f'200 2 0 "{peer.addr}" "0" "2" "0.0')


def test_a_specific_listen_beside_a_wildcard_one_gets_its_own_connections(tmp_path: Path) -> None:
    with TcpPeer(banner(b"W")) as wild, TcpPeer(banner(b"S")) as specific, Scriptlb(f"""
            stream {{
                server {{ listen {{port0}}; proxy_pass {wild.addr}; }}
                server {{ listen 127.0.0.1:{{port0}}; proxy_pass {specific.addr}; }}
            }}""", tmp_path) as lb:
        conn = socket.create_connection(("127.0.0.1", lb.port), timeout=10)
        assert conn.recv(1) == b"S"
        conn.close()


def test_next_upstream_off_gives_502_after_one_try(tmp_path: Path) -> None:
    dead = free_ports(2)
    with Scriptlb(f"""
            stream {{
                {LOG}
                access_log {tmp_path}/s.log s;
                upstream u {{ server 127.0.0.1:{dead[0]}; server 127.0.0.1:{dead[1]}; }}
                server {{ listen 127.0.0.1:{{port0}}; proxy_pass u; proxy_next_upstream off; }}
            }}""", tmp_path) as lb:
        with socket.create_connection(("127.0.0.1", lb.port), timeout=10) as conn:
            assert read_until_closed(conn) == b""
        (line,) = session_log(tmp_path, 1)
    assert line.startswith('502 0 0 "127.0.0.1:')
    assert ", " not in line.split('"')[1]


def test_no_retry_once_connected_even_if_the_peer_closes_at_once(tmp_path: Path) -> None:
    with TcpPeer(close_at_once) as bad, TcpPeer(echo) as good, Scriptlb(f"""
            stream {{
                {LOG}
                access_log {tmp_path}/s.log s;
                upstream u {{ server {bad.addr}; server {good.addr}; }}
                server {{ listen 127.0.0.1:{{port0}}; proxy_pass u; }}
            }}""", tmp_path) as lb:
        with socket.create_connection(("127.0.0.1", lb.port), timeout=10) as conn:
            conn.sendall(b"x")
            assert read_until_closed(conn) == b""
        (line,) = session_log(tmp_path, 1)
    assert line.split('"')[1] == bad.addr  # one try: the connection succeeded


def test_proxy_timeout_ends_an_idle_session(tmp_path: Path) -> None:
    with TcpPeer(never_read) as peer, Scriptlb(f"""
            stream {{
                {LOG}
                access_log {tmp_path}/s.log s;
                server {{ listen 127.0.0.1:{{port0}}; proxy_pass {peer.addr}; proxy_timeout 300ms; }}
            }}""", tmp_path) as lb:
        with socket.create_connection(("127.0.0.1", lb.port), timeout=10) as conn:
            started = time.monotonic()
            assert read_until_closed(conn) == b""
            assert time.monotonic() - started >= 0.25
        (line,) = session_log(tmp_path, 1)
    assert line.startswith("200 0 0 ")


def test_a_peer_that_does_not_read_holds_the_client_back(tmp_path: Path) -> None:
    """Back-pressure: the proxy holds about proxy_buffer_size, the rest waits in the client."""
    with TcpPeer(never_read) as peer, Scriptlb(f"""
            stream {{ server {{ listen 127.0.0.1:{{port0}}; proxy_pass {peer.addr};
                               proxy_buffer_size 16k; }} }}
            """, tmp_path) as lb:
        with socket.create_connection(("127.0.0.1", lb.port), timeout=10) as conn:
            conn.setblocking(False)
            sent, chunk = 0, b"x" * 65536
            deadline = time.monotonic() + 5
            while sent < 64 * 1024 * 1024 and time.monotonic() < deadline:
                try:
                    sent += conn.send(chunk)
                except BlockingIOError:
                    time.sleep(0.05)
                    try:
                        sent += conn.send(chunk)
                    except BlockingIOError:
                        break
            server = next(iter(lb.thread.worker.stream.servers.values()))
            (session,) = server.sessions
            buffered = session.peer.transport.get_write_buffer_size()
        assert sent < 64 * 1024 * 1024
        assert buffered <= 16384 + 262144  # the limit plus at most one read


def test_upload_rate_limits_the_client_to_peer_direction(tmp_path: Path) -> None:
    data = b"y" * 600000
    with TcpPeer(echo) as peer, Scriptlb(f"""
            stream {{ server {{ listen 127.0.0.1:{{port0}}; proxy_pass {peer.addr};
                               proxy_upload_rate 200k; }} }}
            """, tmp_path) as lb:
        started = time.monotonic()
        assert round_trip(lb.port, data) == data
        elapsed = time.monotonic() - started
    # 600000 bytes at 200 KiB/s with one second's worth up front; one read takes up to
    # 256 KiB and may start once the budget is positive: at least ~0.7 s
    assert elapsed >= 0.5


def test_half_close_passes_the_eof_on(tmp_path: Path) -> None:
    with TcpPeer(echo) as peer, Scriptlb(f"""
            stream {{ server {{ listen 127.0.0.1:{{port0}}; proxy_pass {peer.addr}; proxy_half_close on; }} }}
            """, tmp_path) as lb, socket.create_connection(("127.0.0.1", lb.port), timeout=10) as conn:
        conn.sendall(b"all of it")
        conn.shutdown(socket.SHUT_WR)
        assert read_until_closed(conn) == b"all of it"


# --------------------------------------------------------------------------- hooks


def test_hook_picks_the_peer_by_remote_addr_on_a_consistent_ring(tmp_path: Path) -> None:
    lib = Path(__file__).resolve().parent.parent / "hooks" / "lib"
    sources = [f"127.0.0.{n}" for n in range(2, 10)]
    with TcpPeer(banner(b"A")) as a, TcpPeer(banner(b"B")) as b, TcpPeer(banner(b"C")) as c, Scriptlb(f"""
            http {{ python_package_path "{lib}/?.py"; }}
            stream {{
                upstream u {{
                    server {a.addr}; server {b.addr}; server {c.addr};
                    balancer_by_python_block {{
                        import ring
                        ok, err = balancer.set_current_peer(ring.pick(upstream.get_primary_peers(),
                                                                      ngx.var.remote_addr))
                        ngx.ctx["seen"] = ngx.var.server_port
                    }}
                }}
                server {{ listen 127.0.0.1:{{port0}}; proxy_pass u; }}
            }}""", tmp_path) as lb:
        first = {source: banner_from(lb.port, source) for source in sources}
        again = {source: banner_from(lb.port, source) for source in sources}
    assert first == again
    # the oracle: the same ring module run here, outside the sandbox (ngx.crc32_long is CRC-32)
    spec = importlib.util.spec_from_file_location("ring_oracle", lib / "ring.py")
    assert spec is not None and spec.loader is not None
    ring = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ring)
    ring.ngx = types.SimpleNamespace(crc32_long=lambda text: zlib.crc32(text.encode()))
    peers = [{"name": peer.addr, "weight": 1} for peer in (a, b, c)]
    banners = {a.addr: b"A", b.addr: b"B", c.addr: b"C"}
    assert first == {source: banners[ring.pick(peers, source)] for source in sources}


def test_hash_remote_addr_consistent_and_statistics(tmp_path: Path) -> None:
    sources = [f"127.0.0.{n}" for n in range(2, 8)]
    with TcpPeer(banner(b"A")) as a, TcpPeer(banner(b"B")) as b, Scriptlb(f"""
            stream {{
                upstream u {{ hash $remote_addr consistent; server {a.addr}; server {b.addr}; }}
                server {{ listen 127.0.0.1:{{port0}}; proxy_pass u; }}
            }}""", tmp_path) as lb:
        first = {source: banner_from(lb.port, source) for source in sources}
        again = {source: banner_from(lb.port, source) for source in sources}
        upstream = lb.thread.worker.stream.upstreams["u"]
        stats = upstream.stats
        assert stats is not None
        wait_for(lambda: sum(stats.figures(p)[0] for p in upstream.peers.primary) == 12)
    assert first == again


def test_a_failing_hook_falls_back_to_the_balancer_and_says_so(tmp_path: Path) -> None:
    with TcpPeer(banner(b"ok")) as peer, Scriptlb(f"""
            error_log {tmp_path}/error.log;
            stream {{
                upstream u {{
                    server {peer.addr};
                    balancer_by_python_block {{
                        if ngx.var.no_such_variable is None and ngx.var.protocol == "TCP":
                            raise ValueError("boom " + ngx.var.remote_addr)
                    }}
                }}
                server {{ listen 127.0.0.1:{{port0}}; proxy_pass u; }}
            }}""", tmp_path) as lb:
        for _ in range(2):
            with socket.create_connection(("127.0.0.1", lb.port), timeout=10) as conn:
                assert conn.recv(10) == b"ok"
    errors = (tmp_path / "error.log").read_text()
    assert "ValueError: boom 127.0.0.1" in errors
    assert f"client: 127.0.0.1, server: 127.0.0.1:{lb.port}" in errors


def test_hook_set_timeouts_read_is_the_session_s_proxy_timeout(tmp_path: Path) -> None:
    with TcpPeer(never_read) as peer, Scriptlb(f"""
            stream {{
                upstream u {{
                    server {peer.addr};
                    balancer_by_python_block {{
                        balancer.set_timeouts(1, 1, 0.2)
                        balancer.set_current_peer("{peer.addr}")
                    }}
                }}
                server {{ listen 127.0.0.1:{{port0}}; proxy_pass u; proxy_timeout 1h; }}
            }}""", tmp_path) as lb:
        conn = socket.create_connection(("127.0.0.1", lb.port), timeout=10)
        started = time.monotonic()
        assert read_until_closed(conn) == b""  # not after an hour
        assert 0.15 <= time.monotonic() - started < 8
        conn.close()


def test_hook_sees_the_last_failure_and_grants_more_tries(tmp_path: Path) -> None:
    dead = free_ports(3)
    with TcpPeer(banner(b"ok")) as good, Scriptlb(f"""
            stream {{
                {LOG}
                access_log {tmp_path}/s.log s;
                upstream u {{
                    server {good.addr};
                    balancer_by_python_block {{
                        state, status = balancer.get_last_failure()
                        ports = [{dead[0]}, {dead[1]}, {dead[2]}, {good.port}]
                        runs = ngx.ctx.get("runs", 0)
                        ngx.ctx["runs"] = runs + 1
                        ngx.ctx.setdefault("failures", []).append((state, status))
                        balancer.set_current_peer("127.0.0.1", ports[runs])
                        if runs == 0:
                            balancer.set_more_tries(3)
                        if runs == 3 and ngx.ctx["failures"][1:] != [("failed", 502)] * 3:
                            ngx.exit(503)
                    }}
                }}
                server {{ listen 127.0.0.1:{{port0}}; proxy_pass u; }}
            }}""", tmp_path) as lb:
        with socket.create_connection(("127.0.0.1", lb.port), timeout=10) as conn:
            assert conn.recv(10) == b"ok"
        (line,) = session_log(tmp_path, 1)
    assert line.startswith("200 2 0 ")
    assert line.split('"')[1].count(", ") == 3


# --------------------------------------------------------------------------- ssl_preread


def _hello(server_name: str, alpn: list[str]) -> bytes:
    """A real ClientHello from the ssl module (through memory BIOs, no socket)."""
    context = ssl.create_default_context()
    context.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_client_hello_parser_reads_sni_protocol_and_alpn() -> None:
    hello = _hello("a.example", ["h2", "http/1.1"])
    parsed = parse_client_hello(hello)
    assert (parsed.status, parsed.server_name, parsed.alpn) == (DONE, "a.example", "h2,http/1.1")
    assert parsed.protocol == "TLSv1.3"
    assert parse_client_hello(hello[:40]).status == NEED_MORE
    assert parse_client_hello(b"GET / HTTP/1.1\r\n").status == NOT_TLS
    for cut in range(5, len(hello), 7):  # hostile truncations and corruptions never raise
        parse_client_hello(hello[:cut] + b"\xff" * 8)


ROUTE_BY_NAME = """
    upstream a.test {{ server {a}; }}
    upstream b.test {{ server {b}; }}
    server {{ listen 127.0.0.1:{{port0}}; ssl_preread on; proxy_pass $ssl_preread_server_name; }}
"""
ROUTE_BY_MAP = """
    map $ssl_preread_server_name $route {{
        hostnames;
        *.a.test   {a};
        a.test     first;
        ~^b\\.   second;
        default    {a};
    }}
    upstream first {{ server {a}; }}
    upstream second {{ server {b}; }}
    server {{ listen 127.0.0.1:{{port0}}; ssl_preread on; proxy_pass $route; }}
"""


@pytest.mark.parametrize("routing", [ROUTE_BY_NAME, ROUTE_BY_MAP], ids=["upstream-name", "map"])
def test_sni_routes_tls_without_terminating_it(tmp_path: Path, routing: str) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    contexts = {}
    for name in ("a.test", "b.test"):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ca.issue_cert(name).configure_cert(context)
        contexts[name] = context
    client = ssl.create_default_context()
    ca.configure_trust(client)
    with TlsPeer(contexts["a.test"], "a") as a, TlsPeer(contexts["b.test"], "b") as b, Scriptlb(f"""
            stream {{
                log_format sni '$ssl_preread_server_name $ssl_preread_protocol "$upstream_addr"';
                access_log {tmp_path}/s.log sni;
                {routing.format(a=a.addr, b=b.addr)}
            }}""", tmp_path) as lb:
        for name in ("b.test", "a.test"):
            with socket.create_connection(("127.0.0.1", lb.port), timeout=10) as raw, \
                    client.wrap_socket(raw, server_hostname=name) as tls:
                assert tls.recv(10) == name[:1].encode() + b"\n"
                tls.sendall(b"bye")
        lines = session_log(tmp_path, 2)
    assert lines[0].startswith(f'b.test TLSv1.3 "{b.addr}"')
    assert lines[1].startswith(f'a.test TLSv1.3 "{a.addr}"')


def test_a_hello_that_never_ends_fills_the_preread_buffer_400(tmp_path: Path) -> None:
    # one full-size record that starts a ClientHello claiming 16 MiB
    record = b"\x16\x03\x01\x40\x00" + b"\x01\xff\xff\xff" + b"\x00" * (16384 - 4)
    with TcpPeer(echo) as peer, Scriptlb(f"""
            error_log {tmp_path}/error.log;
            stream {{
                log_format st '$status $bytes_received "$upstream_addr"';
                access_log {tmp_path}/s.log st;
                server {{ listen 127.0.0.1:{{port0}}; ssl_preread on; proxy_pass {peer.addr}; }}
            }}""", tmp_path) as lb:
        with socket.create_connection(("127.0.0.1", lb.port), timeout=10) as conn:
            with contextlib.suppress(OSError):
                conn.sendall(record)
            assert read_until_closed(conn) == b""
        (line,) = session_log(tmp_path, 1)
        assert round_trip(lb.port, b"still serving") == b"still serving"
    assert line.startswith("400 ") and line.endswith(' "-"')
    assert peer.accepted == 1  # only the second session reached it
    assert "preread buffer full" in (tmp_path / "error.log").read_text()


def test_not_tls_with_ssl_preread_is_proxied_without_the_variables(tmp_path: Path) -> None:
    """nginx: "ssl preread: not a handshake" declines, the session goes on without SNI."""
    with TcpPeer(echo) as peer, Scriptlb(f"""
            stream {{
                log_format sni '[$ssl_preread_server_name] $status';
                access_log {tmp_path}/s.log sni;
                server {{ listen 127.0.0.1:{{port0}}; ssl_preread on; proxy_pass {peer.addr}; }}
            }}""", tmp_path) as lb:
        assert round_trip(lb.port, b"plain text") == b"plain text"
        (line,) = session_log(tmp_path, 1)
    assert line == "[] 200"


# --------------------------------------------------------------------------- PROXY protocol


def _v2(src: str, dst: str, sport: int, dport: int) -> bytes:
    body = socket.inet_aton(src) + socket.inet_aton(dst) + sport.to_bytes(2, "big") + dport.to_bytes(2, "big")
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11]) + len(body).to_bytes(2, "big") + body


@pytest.mark.parametrize("header", [b"PROXY TCP4 10.1.2.3 10.9.9.9 4567 443\r\n",
                                    _v2("10.1.2.3", "10.9.9.9", 4567, 443)], ids=["v1", "v2"])
def test_listen_proxy_protocol_reads_the_client_address(tmp_path: Path, header: bytes) -> None:
    with TcpPeer(echo) as peer, Scriptlb(f"""
            stream {{
                log_format pp '$proxy_protocol_addr:$proxy_protocol_port $remote_addr $bytes_received';
                access_log {tmp_path}/s.log pp;
                server {{ listen 127.0.0.1:{{port0}} proxy_protocol; proxy_pass {peer.addr}; }}
            }}""", tmp_path) as lb:
        with socket.create_connection(("127.0.0.1", lb.port), timeout=10) as conn:
            conn.sendall(header[:7])
            time.sleep(0.05)  # the header in two pieces
            conn.sendall(header[7:] + b"payload")
            assert conn.recv(100) == b"payload"
        (line,) = session_log(tmp_path, 1)
    assert line.startswith("10.1.2.3:4567 127.0.0.1 ")


def test_a_broken_proxy_header_closes_the_session_with_nginx_s_line(tmp_path: Path) -> None:
    with TcpPeer(echo) as peer, Scriptlb(f"""
            error_log {tmp_path}/error.log;
            stream {{
                log_format pp '$status "$upstream_addr"';
                access_log {tmp_path}/s.log pp;
                server {{ listen 127.0.0.1:{{port0}} proxy_protocol; proxy_pass {peer.addr}; }}
            }}""", tmp_path) as lb:
        with socket.create_connection(("127.0.0.1", lb.port), timeout=10) as conn:
            conn.sendall(b"GET / HTTP/1.0\r\n\r\n")
            assert read_until_closed(conn) == b""
        (line,) = session_log(tmp_path, 1)
        assert peer.accepted == 0
    assert line == '400 "-"'
    assert 'broken header: "GET / HTTP/1.0\\r\\n\\r\\n" while reading PROXY protocol, client: 127.0.0.1' in (
        tmp_path / "error.log").read_text()


def test_proxy_protocol_on_sends_the_client_address_to_the_peer(tmp_path: Path) -> None:
    with TcpPeer(echo) as peer, Scriptlb(f"""
            stream {{ server {{ listen 127.0.0.1:{{port0}}; proxy_pass {peer.addr}; proxy_protocol on; }} }}
            """, tmp_path) as lb, socket.create_connection(("127.0.0.1", lb.port), timeout=10) as conn:
        conn.sendall(b"x")
        got = b""
        while not got.endswith(b"x"):
            got += conn.recv(200)
        client_port = conn.getsockname()[1]
    assert got == f"PROXY TCP4 127.0.0.1 127.0.0.1 {client_port} {lb.port}\r\nx".encode()


# --------------------------------------------------------------------------- process model


@pytest.mark.slow
def test_reload_keeps_established_sessions(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    with TcpPeer(echo) as peer:
        conf = tmp_path / "scriptlb.conf"
        text = (f"daemon off; pid {tmp_path}/pid; error_log {tmp_path}/error.log info;\n"
                f"stream {{ server {{ listen 127.0.0.1:{port}; proxy_pass {peer.addr}; }} }}\n")
        conf.write_text(text)
        with master_process(tmp_path, conf) as proc:
            wait_for(lambda: (tmp_path / "pid").exists())
            wait_for(lambda: _answers(port))
            with socket.create_connection(("127.0.0.1", port), timeout=10) as old:
                old.sendall(b"before")
                assert old.recv(10) == b"before"
                conf.write_text(text.replace("listen", "proxy_timeout 1m; listen"))
                proc.send_signal(signal.SIGHUP)
                log = tmp_path / "error.log"
                wait_for(lambda: log.read_text().count("start worker process") >= 2)
                assert _answers(port)
                time.sleep(0.3)  # the old worker has had QUIT
                old.sendall(b"after")
                assert old.recv(10) == b"after"


@pytest.mark.slow
def test_worker_shutdown_timeout_closes_what_old_workers_still_hold(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    with TcpPeer(echo) as peer:
        conf = tmp_path / "scriptlb.conf"
        text = (f"daemon off; pid {tmp_path}/pid; error_log {tmp_path}/error.log notice;\n"
                "worker_shutdown_timeout 500ms;\n"
                f"stream {{ server {{ listen 127.0.0.1:{port}; proxy_pass {peer.addr}; }} }}\n")
        conf.write_text(text)
        with master_process(tmp_path, conf) as proc:
            wait_for(lambda: _answers(port))
            with socket.create_connection(("127.0.0.1", port), timeout=10) as old:
                old.sendall(b"before")
                assert old.recv(10) == b"before"
                proc.send_signal(signal.SIGHUP)
                started = time.monotonic()
                assert read_until_closed(old) == b""  # closed by the old worker's deadline
                assert 0.4 <= time.monotonic() - started < 8
            log = (tmp_path / "error.log").read_text()
            assert "worker_shutdown_timeout: closing the remaining connections" in log


def _answers(port: int) -> bool:
    try:
        return round_trip(port, b"ping", timeout=2) == b"ping"
    except OSError:
        return False


# --------------------------------------------------------------------------- against nginx

@pytest.mark.nginx
@pytest.mark.skipif(not HAS_NGINX_STREAM, reason="nginx stream module missing")
def test_failover_and_logs_match_nginx(tmp_path: Path) -> None:
    dead, port, refusing = free_ports(3)
    data = os.urandom(300000)
    with TcpPeer(echo) as peer:
        block = f"""
            log_format s '$status $bytes_sent $bytes_received "$upstream_addr"'
                         ' "$upstream_bytes_sent" "$upstream_bytes_received"';
            access_log {{dir}}/s.log s;
            upstream u {{ server 127.0.0.1:{dead}; server {peer.addr}; }}
            server {{ listen 127.0.0.1:{port}; proxy_pass u; }}
            server {{ listen 127.0.0.1:{refusing}; proxy_pass 127.0.0.1:{dead}; }}
        """
        results = {}
        for who in ("nginx", "scriptlb"):
            where = tmp_path / who
            where.mkdir()
            if who == "nginx":
                runner = nginx_stream(where, block.replace("{dir}", str(where)))
            else:
                runner = _scriptlb_process(where, block.replace("{dir}", str(where)))
            with runner:
                echoed = round_trip(port, data)
                with socket.create_connection(("127.0.0.1", refusing), timeout=10) as conn:
                    refused = read_until_closed(conn)
                results[who] = (echoed == data, refused, sorted(read_log_lines(where / "s.log", 2)))
    assert results["scriptlb"] == results["nginx"]


def _scriptlb_process(where: Path, block: str):  # type: ignore[no-untyped-def]
    conf = where / "scriptlb.conf"
    conf.write_text(f"daemon off; master_process off; pid {where}/pid; error_log {where}/error.log info;\n"
                    f"stream {{ {block} }}\n")
    load(str(conf), str(where))  # fails here, with the reason, rather than as a timeout
    return _Process(where, conf)


class _Process:
    def __init__(self, where: Path, conf: Path) -> None:
        self.where, self.conf = where, conf
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> _Process:
        command = [sys.executable, "-m", "scriptlb", "-p", str(self.where), "-c", str(self.conf)]
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: (self.where / "pid").exists(), timeout=15)
        time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGQUIT)
        self.proc.wait(timeout=15)


@pytest.mark.nginx
@pytest.mark.skipif(not HAS_NGINX_STREAM, reason="nginx stream module missing")
def test_sni_routing_with_map_matches_nginx(tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    contexts = {}
    for name in ("a.test", "b.test"):
        contexts[name] = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ca.issue_cert(name, "x.a.test").configure_cert(contexts[name])
    client = ssl.create_default_context()
    ca.configure_trust(client)
    client.set_alpn_protocols(["h2", "http/1.1"])
    (port,) = free_ports(1)
    with TlsPeer(contexts["a.test"], "a") as a, TlsPeer(contexts["b.test"], "b") as b:
        block = f"""
            log_format sni '$ssl_preread_server_name|$ssl_preread_protocol|$ssl_preread_alpn_protocols|'
                           '$route|$upstream_addr|$status|$bytes_received|$upstream_bytes_sent';
            access_log {{dir}}/s.log sni;
            {ROUTE_BY_MAP.format(a=a.addr, b=b.addr).replace("{port0}", str(port))}
        """.replace("{{", "{").replace("}}", "}")
        results = {}
        for who in ("nginx", "scriptlb"):
            where = tmp_path / who
            where.mkdir()
            text = block.replace("{dir}", str(where))
            runner = nginx_stream(where, text) if who == "nginx" else _scriptlb_process(where, text)
            answers = []
            with runner:
                for name in ("b.test", "a.test", "x.a.test"):
                    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                            client.wrap_socket(raw, server_hostname=name) as tls:
                        answers.append(tls.recv(10))
                        tls.sendall(b"bye")
                results[who] = (answers, read_log_lines(where / "s.log", 3))
    assert results["scriptlb"] == results["nginx"]


@pytest.mark.nginx
@pytest.mark.skipif(not HAS_NGINX_STREAM, reason="nginx stream module missing")
def test_proxy_protocol_in_and_out_match_nginx(tmp_path: Path) -> None:
    """A v1 header in, the peer gets nginx's v1 header (the real client's addresses) and the
    payload; $proxy_protocol_addr is the announced one; a broken header is a 400."""
    (port,) = free_ports(1)
    with TcpPeer(echo) as peer:
        block = f"""
            log_format pp '$status $proxy_protocol_addr $proxy_protocol_port $bytes_received';
            access_log {{dir}}/s.log pp;
            server {{ listen 127.0.0.1:{port} proxy_protocol; proxy_pass {peer.addr}; proxy_protocol on; }}
        """
        results = {}
        for who in ("nginx", "scriptlb"):
            where = tmp_path / who
            where.mkdir()
            text = block.replace("{dir}", str(where))
            runner = nginx_stream(where, text) if who == "nginx" else _scriptlb_process(where, text)
            with runner:
                with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
                    conn.sendall(b"PROXY TCP4 10.0.0.1 10.0.0.2 1234 80\r\nhello")
                    got = b""
                    while not got.endswith(b"hello"):
                        chunk = conn.recv(200)
                        if not chunk:
                            break
                        got += chunk
                    sent_as = got.replace(str(conn.getsockname()[1]).encode(), b"CPORT")
                with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
                    conn.sendall(b"PROXY BOGUS\r\n")
                    broken = read_until_closed(conn)
                results[who] = (sent_as, broken, read_log_lines(where / "s.log", 2))
    assert results["scriptlb"] == results["nginx"]
    assert results["nginx"][0] == f"PROXY TCP4 127.0.0.1 127.0.0.1 CPORT {port}\r\nhello".encode()


@pytest.mark.nginx
@pytest.mark.skipif(not HAS_NGINX_STREAM, reason="nginx stream module missing")
def test_eof_and_idle_timeout_match_nginx(tmp_path: Path) -> None:
    """Without proxy_half_close a client's EOF ends the session (a late answer is lost); with
    it, the answer comes back; an idle session ends after proxy_timeout, status 200."""
    ports = free_ports(3)

    def late_answer(conn: socket.socket) -> None:
        data = conn.recv(100)
        time.sleep(0.2)
        conn.sendall(data.upper())

    with TcpPeer(late_answer) as late, TcpPeer(never_read) as silent:
        block = f"""
            log_format e '$status $bytes_sent $bytes_received "$upstream_bytes_received"';
            access_log {{dir}}/s.log e;
            server {{ listen 127.0.0.1:{ports[0]}; proxy_pass {late.addr}; }}
            server {{ listen 127.0.0.1:{ports[1]}; proxy_pass {late.addr}; proxy_half_close on; }}
            server {{ listen 127.0.0.1:{ports[2]}; proxy_pass {silent.addr}; proxy_timeout 300ms; }}
        """
        results = {}
        for who in ("nginx", "scriptlb"):
            where = tmp_path / who
            where.mkdir()
            text = block.replace("{dir}", str(where))
            runner = nginx_stream(where, text) if who == "nginx" else _scriptlb_process(where, text)
            answers = []
            with runner:
                for port in ports:
                    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
                        conn.sendall(b"abc")
                        if port != ports[2]:
                            time.sleep(0.05)
                            conn.shutdown(socket.SHUT_WR)
                        answers.append(read_until_closed(conn))
                    time.sleep(0.1)
                results[who] = (answers, read_log_lines(where / "s.log", 3))
    assert results["scriptlb"] == results["nginx"]
    assert results["nginx"][0] == [b"", b"ABC", b""]


def test_listen_ssl_terminates_tls_and_relays_plain_bytes(tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("lb.test")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "lb.pem"))
    client = ssl.create_default_context()
    ca.configure_trust(client)
    with TcpPeer(echo) as peer, Scriptlb(f"""
            stream {{
                log_format t '$status $bytes_received "$upstream_bytes_sent"';
                access_log {tmp_path}/s.log t;
                server {{
                    listen 127.0.0.1:{{port0}} ssl;
                    ssl_certificate {tmp_path}/lb.pem;
                    ssl_certificate_key {tmp_path}/lb.pem;
                    proxy_pass {peer.addr};
                }}
            }}""", tmp_path) as lb:
        with socket.create_connection(("127.0.0.1", lb.port), timeout=10) as raw, \
                client.wrap_socket(raw, server_hostname="lb.test") as tls:
            tls.sendall(b"over tls")
            assert tls.recv(100) == b"over tls"
        (line,) = session_log(tmp_path, 1)
    assert line == '200 8 "8"'


def test_listen_ssl_without_a_certificate_is_nginx_s_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_conf("stream { server { listen 1 ssl; proxy_pass 127.0.0.1:2; } }", tmp_path)
    assert 'no "ssl_certificate" is defined for the "listen ... ssl" directive' in str(err.value)


@pytest.mark.nginx
@pytest.mark.skipif(not HAS_NGINX_STREAM, reason="nginx stream module missing")
def test_stream_ssl_verify_client_as_nginx(tmp_path: Path) -> None:
    """A verified client is relayed; one without a certificate (on) or with one from an unknown
    issuer (on: refused; optional_no_ca: relayed) is closed after the handshake with nginx's
    info line."""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    ca.issue_cert("lb.test").private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "lb.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    contexts = {}
    for name, issuer in (("good", ca), ("none", None), ("stranger", trustme.CA())):
        ctx = ssl.create_default_context()
        ca.configure_trust(ctx)
        if issuer is not None:
            issuer.issue_cert(f"{name}@example.test").configure_cert(ctx)
        contexts[name] = ctx
    with TcpPeer(echo) as peer:
        ports = free_ports(2)
        block = "".join(f"""
            server {{
                listen 127.0.0.1:{port} ssl;
                ssl_certificate {tmp_path}/lb.pem; ssl_certificate_key {tmp_path}/lb.pem;
                ssl_client_certificate {tmp_path}/ca.pem; ssl_verify_client {verify};
                proxy_pass {peer.addr};
            }}""" for port, verify in zip(ports, ("on", "optional_no_ca"), strict=True))
        results = {}
        for who in ("nginx", "scriptlb"):
            where = tmp_path / who
            where.mkdir()
            runner = nginx_stream(where, block) if who == "nginx" else _scriptlb_process(where, block)
            answers = []
            with runner:
                for port, name in ((ports[0], "good"), (ports[0], "none"), (ports[0], "stranger"),
                                   (ports[1], "stranger")):
                    answers.append(_tls_echo(port, contexts[name]))
                log = where / ("logs/error.log" if who == "nginx" else "error.log")
                said = "no required SSL certificate"
                wait_for(lambda log=log, said=said: said in log.read_text(), timeout=10)
                lines = [line.split("] ", 1)[1].split(" ", 2)[2] for line in log.read_text().splitlines()
                         if "required SSL certificate" in line or "certificate verify error" in line]
            results[who] = (answers, [line.replace(str(ports[0]), "PORT") for line in lines])
    assert results["scriptlb"][0] == [b"ping", b"", b"", b"ping"]
    assert results["scriptlb"] == results["nginx"]


def _tls_echo(port: int, ctx: ssl.SSLContext) -> bytes:
    """What the echo peer sent back through a TLS session ("" when the proxy closed it)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                ctx.wrap_socket(raw, server_hostname="lb.test") as tls:
            tls.sendall(b"ping")
            return tls.recv(100)
    except (ssl.SSLError, ConnectionError):
        return b""
