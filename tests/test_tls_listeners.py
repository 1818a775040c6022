"""TLS on every kind of listening socket (IPv4, IPv6, unix) beside nginx, the $ssl_* variables
read by a balancer hook through ngx.var, and a certificate reload under a request in flight."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import ssl
import time
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trustme
from helpers import BackendRequest, Backends, Scriptlb, master_process, respond, wait_for, wait_until
from test_process import ipv6_available
from test_round_robin import NGINX, free_ports, nginx_running
from test_tls import certs, client_context  # noqa: F401  (certs: a fixture)

BODY = '"$https|$ssl_protocol|$ssl_server_name|$remote_addr|$server_port\\n"'


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def tls_get(family: socket.AddressFamily, address: object, ctx: ssl.SSLContext, sni: str = "a.test",
            path: str = "/") -> bytes:
    """The body of one request over TLS on any socket family (the server closes after it)."""
    with socket.socket(family, socket.SOCK_STREAM) as raw:
        raw.settimeout(10)
        raw.connect(address)
        with ctx.wrap_socket(raw, server_hostname=sni) as tls:
            tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
    return data.partition(b"\r\n\r\n")[2]


def listen_server(listens: str, paths: dict[str, Path]) -> str:
    return f"""
        server {{
            {listens}
            server_name a.test;
            ssl_certificate {paths['a.test.crt']};
            ssl_certificate_key {paths['a.test.key']};
            ssl_protocols TLSv1.2 TLSv1.3;
            location / {{ return 200 {BODY}; }}
        }}
    """


@pytest.mark.nginx
def test_tls_on_ipv4_ipv6_and_unix_sockets_as_nginx(tmp_path: Path, ca: trustme.CA,
                                                   certs: dict[str, Path]) -> None:  # noqa: F811
    ctx = client_context(ca)
    results = []
    for name in ("scriptlb", "nginx"):
        if name == "nginx" and NGINX is None:
            break
        port, port6 = free_ports(2)
        path = tmp_path / f"{name}.sock"
        listens = f"listen 127.0.0.1:{port} ssl; listen unix:{path} ssl;"
        if ipv6_available():
            listens += f" listen [::1]:{port6} ssl;"
        targets = [(socket.AF_INET, ("127.0.0.1", port)), (socket.AF_UNIX, str(path))]
        if ipv6_available():
            targets.append((socket.AF_INET6, ("::1", port6)))
        if name == "scriptlb":
            prefix = tmp_path / "ours"
            (prefix / "logs").mkdir(parents=True)
            conf = prefix / "scriptlb.conf"
            main = f"daemon off; master_process off; pid {prefix}/pid; error_log {prefix}/error.log;\n"
            conf.write_text(main + f"http {{ {listen_server(listens, certs)} }}")
            runner = master_process(prefix, conf)
        else:
            ngx = tmp_path / "nginx"
            ngx.mkdir()
            runner = nginx_running(ngx, listen_server(listens, certs), [port])
        with runner:
            wait_for(path.exists, timeout=20, what="the unix socket")
            wait_until(partial(_connects, port), timeout=20)
            bodies = [tls_get(family, address, ctx) for family, address in targets]
        results.append([body.replace(str(port).encode(), b"PORT").replace(str(port6).encode(), b"PORT")
                        for body in bodies])
    ours = results[0]
    assert ours[0] == b"on|TLSv1.3|a.test|127.0.0.1|PORT\n"
    assert ours[1].startswith(b"on|TLSv1.3|a.test|unix:|")
    if ipv6_available():
        assert ours[2] == b"on|TLSv1.3|a.test|::1|PORT\n"
    if len(results) == 2:
        assert ours == results[1]


def _connects(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def test_a_hook_reads_the_tls_variables_through_ngx_var(tmp_path: Path, ca: trustme.CA,
                                                       certs: dict[str, Path]) -> None:  # noqa: F811
    """The balancer hook routes on $ssl_server_name and logs what ngx.var says of the TLS."""
    ctx = client_context(ca, verify=False)
    ca.issue_cert("client@example.test", common_name="hook client").configure_cert(ctx)
    with Backends(respond(body=b"first"), respond(body=b"second")) as bk:
        hook = f"""balancer_by_python_block {{
            v = ngx.var
            ngx.log(ngx.WARN, "tls ", v.https, " ", v.scheme, " ", v.ssl_protocol, " ", v.ssl_server_name,
                    " ", v.ssl_client_verify, " ", v.ssl_client_s_dn, " ", v.ssl_session_reused)
            if v.https == "on" and v.ssl_server_name == "b.test":
                balancer.set_current_peer("{bk[1].addr}")
            else:
                balancer.set_current_peer("{bk[0].addr}")
        }}"""
        text = f"""
            daemon off; master_process off; error_log {tmp_path}/error.log warn;
            http {{
                upstream u {{ server {bk[0].addr}; {hook} }}
                server {{
                    listen 127.0.0.1:{{port0}} ssl;
                    ssl_certificate {certs['a.test.crt']}; ssl_certificate_key {certs['a.test.key']};
                    ssl_client_certificate {certs['ca']}; ssl_verify_client optional;
                    location / {{ proxy_pass http://u; }}
                }}
            }}
        """
        with Scriptlb(text, tmp_path) as lb:
            got = [tls_get(socket.AF_INET, ("127.0.0.1", lb.port), ctx, sni) for sni in ("a.test", "b.test")]
    assert got == [b"first", b"second"]
    log = (tmp_path / "error.log").read_text()
    assert "tls on https TLSv1.3 b.test SUCCESS CN=hook client," in log
    assert "tls on https TLSv1.3 a.test SUCCESS" in log


def slow_answer(delay: float, body: bytes) -> object:
    """A backend that answers after ``delay`` seconds."""

    async def behaviour(req: BackendRequest, writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(delay)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()
        return True

    return behaviour


@pytest.mark.slow
def test_a_certificate_reload_keeps_a_request_in_flight(tmp_path: Path, ca: trustme.CA) -> None:
    """-s reload (SIGHUP) while a TLS client waits for a slow answer: the old worker finishes
    it on the same connection; new connections get the new certificate."""
    crt, key = tmp_path / "site.crt", tmp_path / "site.key"

    def install(name: str) -> None:
        cert = ca.issue_cert(name)
        cert.cert_chain_pems[0].write_to_path(crt)
        cert.private_key_pem.write_to_path(key)

    def served_name() -> str | None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                    client_context(ca, verify=False).wrap_socket(raw, server_hostname="x.test") as tls:
                cert = tls.getpeercert()
        except OSError:
            return None
        return next((v for k, v in (cert or {}).get("subjectAltName", ()) if k == "DNS"), None)

    install("first.test")
    (port,) = free_ports(1)
    conf = tmp_path / "scriptlb.conf"
    with Backends(slow_answer(2.0, b"slow answer")) as bk:
        conf.write_text(f"""
            daemon off; worker_processes 1; pid {tmp_path}/scriptlb.pid; error_log {tmp_path}/error.log;
            http {{
                server {{
                    listen 127.0.0.1:{port} ssl;
                    ssl_certificate {crt}; ssl_certificate_key {key};
                    location / {{ proxy_pass http://{bk[0].addr}; }}
                }}
            }}
        """)
        with master_process(tmp_path, conf) as proc:
            assert wait_until(lambda: served_name() == "first.test", timeout=20)
            with socket.create_connection(("127.0.0.1", port), timeout=15) as raw, \
                    client_context(ca, verify=False).wrap_socket(raw, server_hostname="x.test") as tls:
                tls.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                time.sleep(0.3)  # the request is with the backend
                install("second.test")
                os.kill(proc.pid, signal.SIGHUP)
                data = b""
                while b"slow answer" not in data:
                    chunk = tls.recv(65536)
                    if not chunk:
                        break
                    data += chunk
            assert data.startswith(b"HTTP/1.1 200 ") and data.endswith(b"slow answer")
            assert wait_until(lambda: all(served_name() == "second.test" for _ in range(3)), timeout=20)


@pytest.mark.nginx
def test_a_server_with_a_plain_and_a_tls_listen_as_nginx(tmp_path: Path, ca: trustme.CA,
                                                         certs: dict[str, Path]) -> None:  # noqa: F811
    """`listen 80; listen 443 ssl;` in one server (the usual production block): TLS only where
    the listen says ssl."""
    from helpers import raw_exchange

    ctx = client_context(ca)
    results = []
    for name in ("scriptlb", "nginx"):
        if name == "nginx" and NGINX is None:
            break
        plain, secure = free_ports(2)
        block = listen_server(f"listen 127.0.0.1:{plain}; listen 127.0.0.1:{secure} ssl;", certs)
        if name == "scriptlb":
            ours = block.replace(str(plain), "{port0}").replace(str(secure), "{port1}")
            runner: Any = Scriptlb(f"daemon off; master_process off; error_log {tmp_path}/e.log;\n"
                                   f"http {{ {ours} }}", tmp_path, listens=2)
        else:
            ngx = tmp_path / "nginx"
            ngx.mkdir()
            runner = nginx_running(ngx, block, [plain, secure])
        with runner:
            if name == "scriptlb":
                plain, secure = runner.ports
            answer = raw_exchange(plain, b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
            body = tls_get(socket.AF_INET, ("127.0.0.1", secure), ctx)
        results.append((answer.partition(b"\r\n\r\n")[2].replace(str(plain).encode(), b"PORT"),
                        body.replace(str(secure).encode(), b"PORT")))
    assert results[0] == (b"|||127.0.0.1|PORT\n", b"on|TLSv1.3|a.test|127.0.0.1|PORT\n")
    assert results[1:] in ([], [results[0]])
