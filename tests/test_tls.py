"""TLS termination: real certificates (trustme), a real TLS client (ssl), SNI, mTLS,
variables and config errors; the same config on nginx where it is shared."""

from __future__ import annotations

import re
import socket
import ssl
from pathlib import Path

import pytest
import trustme
from helpers import Scriptlb, load_conf
from test_round_robin import NGINX, free_ports, nginx_running

from scriptlb.config import ConfigError

BODY = '"$scheme|$https|$ssl_protocol|$ssl_server_name|$server_name|$ssl_client_verify|$ssl_client_s_dn\\n"'


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def certs(ca: trustme.CA, tmp_path: Path) -> dict[str, Path]:
    out = {}
    for name in ("a.test", "b.test"):
        cert = ca.issue_cert(name)
        out[name + ".crt"] = tmp_path / f"{name}.crt"
        out[name + ".key"] = tmp_path / f"{name}.key"
        cert.cert_chain_pems[0].write_to_path(out[name + ".crt"])
        cert.private_key_pem.write_to_path(out[name + ".key"])
    out["ca"] = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(out["ca"])
    return out


def servers(listen: str, certs: dict[str, Path], extra: str = "") -> str:
    return f"""
        server {{
            listen {listen} ssl;
            server_name a.test;
            ssl_certificate {certs['a.test.crt']};
            ssl_certificate_key {certs['a.test.key']};
            ssl_protocols TLSv1.2 TLSv1.3;  # (nginx before 1.23.4 defaults to TLSv1 TLSv1.1 TLSv1.2)
            {extra}
            location / {{ return 200 {BODY}; }}
        }}
        server {{
            listen {listen} ssl;
            server_name b.test;
            ssl_certificate {certs['b.test.crt']};
            ssl_certificate_key {certs['b.test.key']};
            ssl_protocols TLSv1.2 TLSv1.3;
            {extra}
            location / {{ return 200 {BODY}; }}
        }}
    """


def https_get(port: int, ctx: ssl.SSLContext, sni: str | None, host: str = "x") -> tuple[str, bytes]:
    """(the certificate's common name, the response body) of one request over TLS."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname=sni) as tls:
        cert = tls.getpeercert()
        tls.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
    subject = dict(item for rdn in cert["subject"] for item in rdn) if cert else {}
    return subject.get("commonName", "") or _san(cert), data.partition(b"\r\n\r\n")[2]


def _san(cert: dict | None) -> str:
    return next((v for k, v in (cert or {}).get("subjectAltName", ()) if k == "DNS"), "")


def client_context(ca: trustme.CA, verify: bool = True) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    if not verify:
        ctx.check_hostname = False
    return ctx


def _lb(tmp_path: Path, block: str) -> Scriptlb:
    main = f"daemon off; master_process off; error_log {tmp_path}/error.log info;\n"
    return Scriptlb(main + f"http {{ {block} }}", tmp_path)


def test_sni_picks_the_server_and_its_certificate_as_nginx(tmp_path: Path, ca: trustme.CA,
                                                          certs: dict[str, Path]) -> None:
    ctx = client_context(ca)
    plain = client_context(ca, verify=False)
    with _lb(tmp_path, servers("{port0}", certs)) as lb:
        ours = [https_get(lb.port, ctx, "a.test", "a.test"), https_get(lb.port, ctx, "b.test", "b.test"),
                https_get(lb.port, plain, None, "b.test")]
    assert ours[0] == ("a.test", b"https|on|TLSv1.3|a.test|a.test|NONE|\n")
    assert ours[1] == ("b.test", b"https|on|TLSv1.3|b.test|b.test|NONE|\n")
    assert ours[2][0] == "a.test"  # no SNI: the default server's certificate
    if NGINX is None:
        pytest.skip("nginx is not installed")
    (port,) = free_ports(1)
    ngx = tmp_path / "nginx"
    ngx.mkdir()
    with nginx_running(ngx, servers(f"127.0.0.1:{port}", certs), [port]):
        theirs = [https_get(port, ctx, "a.test", "a.test"), https_get(port, ctx, "b.test", "b.test"),
                  https_get(port, plain, None, "b.test")]
    assert ours == theirs


def test_keep_alive_over_tls(tmp_path: Path, ca: trustme.CA, certs: dict[str, Path]) -> None:
    import http.client

    with _lb(tmp_path, servers("{port0}", certs)) as lb:
        conn = http.client.HTTPSConnection("127.0.0.1", lb.port, context=client_context(ca, verify=False),
                                           timeout=10)
        bodies = []
        for _ in range(3):
            conn.request("GET", "/", headers={"Host": "b.test"})
            response = conn.getresponse()
            bodies.append(response.read())
        sock_reused = conn.sock is not None
        conn.close()
    assert sock_reused and bodies[0] == bodies[2]
    assert bodies[0].startswith(b"https|on|")


def test_mutual_tls_as_nginx(tmp_path: Path, ca: trustme.CA, certs: dict[str, Path]) -> None:
    """A verified client certificate, and none: nginx finishes the handshake and answers 400
    "No required SSL certificate was sent" (more cases in test_tls_termination)."""
    extra = f"ssl_client_certificate {certs['ca']}; ssl_verify_client on;"
    client_cert = ca.issue_cert("client@example.test", common_name="client one")
    ctx = client_context(ca)
    client_cert.configure_cert(ctx)
    no_cert = client_context(ca)
    with _lb(tmp_path, servers("{port0}", certs, extra)) as lb:
        ours = [https_get(lb.port, ctx, "a.test", "a.test"), https_get(lb.port, no_cert, "a.test", "a.test")]
    assert ours[0][1].startswith(b"https|on|TLSv1.3|a.test|a.test|SUCCESS|")
    assert b"CN=client one" in ours[0][1]
    assert b"<center>No required SSL certificate was sent</center>" in ours[1][1]
    if NGINX is None:
        return
    (port,) = free_ports(1)
    ngx = tmp_path / "nginx"
    ngx.mkdir()
    with nginx_running(ngx, servers(f"127.0.0.1:{port}", certs, extra), [port]):
        theirs = [https_get(port, ctx, "a.test", "a.test"), https_get(port, no_cert, "a.test", "a.test")]
    assert ours[0] == theirs[0]
    assert ours[1][1].replace(b"scriptlb", b"nginx") == re.sub(rb"nginx/[\d.]+", b"nginx", theirs[1][1])


@pytest.mark.parametrize(
    ("extra", "error", "line"),
    [
        ("ssl_protocols TLSv1.2 TLSv9;", 'invalid value "TLSv9"', 5),
        ("ssl_certificate {missing}; ssl_certificate_key {key};", 'cannot load certificate "', 5),
        ("ssl_certificate {crt}; ssl_certificate_key {other_key};", "SSL_CTX_use_PrivateKey(", 5),
        ("ssl_certificate {crt}; ssl_certificate_key {key};\n    ssl_session_ticket_key {key};",
         "must be 48 or 80 bytes", 6),
        ("ssl_certificate {crt}; ssl_certificate_key {key};\n    ssl_verify_client on;",
         'no ssl_client_certificate for ssl_verify_client', 3),
    ],
)
def test_tls_config_errors_name_file_and_line(tmp_path: Path, certs: dict[str, Path], extra: str,
                                              error: str, line: int) -> None:
    extra = extra.format(missing=tmp_path / "nope.crt", key=certs["a.test.key"], crt=certs["a.test.crt"],
                         other_key=certs["b.test.key"])
    text = "http {\n  server {\n    listen 127.0.0.1:1 ssl;\n    server_name a;\n    " + extra + "\n  }\n}\n"
    with pytest.raises(ConfigError) as info:
        load_conf(text, tmp_path)
    assert error in str(info.value)
    assert str(info.value).endswith(f":{line}")


def test_a_tls_listen_without_a_certificate_and_http2_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r'no "ssl_certificate" is defined .*:2$'):
        load_conf("http {\n server { listen 127.0.0.1:1 ssl; }\n}\n", tmp_path)
    with pytest.raises(ConfigError, match=r'the "http2" parameter of "listen" is not supported.*:2$'):
        load_conf("http {\n server { listen 127.0.0.1:1 ssl http2; }\n}\n", tmp_path)


@pytest.mark.slow
def test_certificates_reload_on_sighup_and_a_bad_one_keeps_the_old(tmp_path: Path, ca: trustme.CA) -> None:
    import os
    import signal

    from helpers import master_process, wait_until

    crt, key = tmp_path / "site.crt", tmp_path / "site.key"

    def install(name: str) -> None:
        cert = ca.issue_cert(name)
        cert.cert_chain_pems[0].write_to_path(crt)
        cert.private_key_pem.write_to_path(key)

    def served_name() -> str | None:
        try:
            return https_get(port, client_context(ca, verify=False), None)[0]
        except OSError:
            return None

    install("first.test")
    (port,) = free_ports(1)
    conf = tmp_path / "scriptlb.conf"
    conf.write_text(f"""
        daemon off; worker_processes 1; pid {tmp_path}/scriptlb.pid;
        error_log {tmp_path}/error.log info;
        http {{
            server {{
                listen 127.0.0.1:{port} ssl;
                ssl_certificate {crt};
                ssl_certificate_key {key};
                location / {{ return 200 "ok\\n"; }}
            }}
        }}
    """)
    with master_process(tmp_path, conf) as proc:
        assert wait_until(lambda: served_name() == "first.test", timeout=20)
        install("second.test")
        os.kill(proc.pid, signal.SIGHUP)
        # (the old worker may accept for a moment while it stops: wait until only the new serves)
        assert wait_until(lambda: all(served_name() == "second.test" for _ in range(5)), timeout=20)
        key.write_text("not a key\n")  # a broken key: the reload is refused, the old one serves
        os.kill(proc.pid, signal.SIGHUP)
        assert wait_until(lambda: "SSL_CTX_use_PrivateKey(" in (tmp_path / "error.log").read_text(),
                          timeout=20)
        assert all(served_name() == "second.test" for _ in range(5))


def test_garbage_and_plain_http_on_a_tls_port_leave_the_worker_serving(tmp_path: Path, ca: trustme.CA,
                                                                        certs: dict[str, Path]) -> None:
    """A failed handshake closes that connection only; plain HTTP gets the 400 page (compared
    with nginx in test_tls_termination)."""
    from helpers import raw_exchange

    with _lb(tmp_path, servers("{port0}", certs)) as lb:
        junks = (b"\x16\x03\x01\x00\x05hello", b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n", bytes(range(256)))
        for junk in junks:
            try:
                answer = raw_exchange(lb.port, junk)
            except OSError:
                answer = b""
            assert b"HTTP/1.1 200" not in answer
        assert https_get(lb.port, client_context(ca), "a.test", "a.test")[0] == "a.test"
