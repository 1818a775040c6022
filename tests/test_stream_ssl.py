"""TLS in stream (ngx_stream_ssl_module, ngx_stream_proxy_module's proxy_ssl_*) and the peer-side
TLS settings stream shares with http (proxy_ssl_certificate with variables, proxy_ssl_conf_command,
proxy_ssl_crl), ssl_trusted_certificate, ssl_preread's reading of a hello as nginx's.

Real certificates (trustme), real sockets on 127.0.0.1, scriptlb as a real process; where nginx's
stream module is installed the same config runs on nginx and the answers must match.
"""

from __future__ import annotations

import contextlib
import datetime
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import free_ports, read_log_lines, wait_for
from nginx_oracle import main_conf, nginx_process
from stream_helpers import HAS_NGINX_STREAM, IO_TIMEOUT, NGINX_STREAM_MODULE, TcpPeer, read_until_closed
from test_stream import _Process

from scriptlb.config import ConfigError, load
from scriptlb.stream.preread import DONE, parse_client_hello

trustme = pytest.importorskip("trustme")

RUNNERS = ("nginx", "scriptlb") if HAS_NGINX_STREAM else ("scriptlb",)


def _http_block(who: str, where: Path, http: str) -> str:
    if not http:
        return ""
    if who == "scriptlb":
        return f"http {{ access_log off; {http} }}"
    # (nginx's temp paths default to its install prefix, which a test cannot write)
    return f"""http {{ access_log off;
        client_body_temp_path {where}/body; proxy_temp_path {where}/proxy; fastcgi_temp_path {where}/fcgi;
        uwsgi_temp_path {where}/uwsgi; scgi_temp_path {where}/scgi; {http} }}"""


@contextlib.contextmanager
def _running(who: str, where: Path, stream: str, http: str = "") -> Iterator[Path]:
    """nginx or scriptlb serving ``stream { stream }`` (and ``http { http }``) from ``where``,
    whose relative paths are against ``where`` (the prefix of both); yields the error log."""
    body = f"stream {{ {stream} }}\n{_http_block(who, where, http)}"
    if who == "nginx":
        conf = main_conf(where, body, head=f"load_module {NGINX_STREAM_MODULE};", error_level="info")
        with nginx_process(where, conf):
            yield where / "logs" / "error.log"
        return
    conf = where / "scriptlb.conf"
    conf.write_text(f"daemon off; master_process off; pid {where}/pid; error_log {where}/error.log info;\n"
                    f"{body}\n")
    load(str(conf), str(where))  # (a config error fails here, with its reason)
    with _Process(where, conf):
        yield where / "error.log"


def _each_runner(tmp_path: Path, files: dict[str, bytes]) -> Iterator[tuple[str, Path]]:
    for who in RUNNERS:
        where = tmp_path / who
        where.mkdir()
        for name, data in files.items():
            (where / name).write_bytes(data)
        yield who, where


def _read(port: int, data: bytes = b"") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as conn:
        if data:
            conn.sendall(data)
        return read_until_closed(conn)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def _pem(cert: trustme.LeafCert) -> bytes:
    return cert.private_key_and_cert_chain_pem.bytes()


# --------------------------------------------------------------------------- proxy_ssl


def test_proxy_ssl_name_sni_session_reuse_and_verification_as_nginx(tmp_path: Path, ca: trustme.CA) -> None:
    """proxy_ssl on towards a `listen ... ssl` server answering its $ssl_* variables: the name
    loses its port, is sent as SNI and verified; a session is resumed on the next connection;
    a name the certificate does not hold fails the handshake (nothing relayed)."""
    files = {"lb.pem": _pem(ca.issue_cert("lb.test")), "ca.pem": ca.cert_pem.bytes()}
    p = free_ports(6)
    # (two terminating servers: nginx keeps one session per peer address, whichever server made
    # it; scriptlb one per server's TLS settings and peer)
    stream = f"""
        proxy_ssl on;
        proxy_ssl_trusted_certificate ca.pem;
        ssl_protocols TLSv1.2 TLSv1.3; proxy_ssl_protocols TLSv1.2 TLSv1.3;
        server {{ listen 127.0.0.1:{p[0]}; proxy_pass 127.0.0.1:{p[4]};
                 proxy_ssl_server_name on; proxy_ssl_name lb.test:{p[4]}; proxy_ssl_verify on; }}
        server {{ listen 127.0.0.1:{p[1]}; proxy_pass 127.0.0.1:{p[5]}; }}
        server {{ listen 127.0.0.1:{p[2]}; proxy_pass 127.0.0.1:{p[5]}; proxy_ssl_session_reuse off; }}
        server {{ listen 127.0.0.1:{p[3]}; proxy_pass 127.0.0.1:{p[4]};
                 proxy_ssl_verify on; proxy_ssl_name other.test; }}
        server {{ listen 127.0.0.1:{p[4]} ssl; listen 127.0.0.1:{p[5]} ssl; proxy_ssl off;
                 ssl_certificate lb.pem; ssl_certificate_key lb.pem; ssl_session_cache builtin;
                 return "[$ssl_server_name] $ssl_session_reused $ssl_protocol"; }}
    """
    results = {}
    for who, where in _each_runner(tmp_path, files):
        with _running(who, where, stream) as log:
            answers = [_read(port) for port in (p[0], p[2], p[1], p[1], p[2], p[3])]
            said = 'upstream SSL certificate does not match "other.test" while SSL handshaking to upstream'
            wait_for(lambda log=log, said=said: said in log.read_text(), timeout=IO_TIMEOUT)
        results[who] = answers
    assert results["scriptlb"] == [b"[lb.test] . TLSv1.3", b"[] . TLSv1.3", b"[] . TLSv1.3",
                                   b"[] r TLSv1.3", b"[] . TLSv1.3", b""]
    assert results["scriptlb"] == results.get("nginx", results["scriptlb"])


class _CertificateTeller(TcpPeer):
    """A TLS peer asking for a client certificate (any issuer) and saying its subject's CN."""

    def __init__(self, server_pem: Path, client_ca: trustme.CA) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(server_pem)
        self.context.verify_mode = ssl.CERT_OPTIONAL
        client_ca.configure_trust(self.context)
        super().__init__(self._tell)

    def _tell(self, conn: socket.socket) -> None:
        with self.context.wrap_socket(conn, server_side=True) as tls:
            cert = tls.getpeercert() or {}
            names = [value for rdn in cert.get("subject", ()) for key, value in rdn if key == "commonName"]
            tls.sendall((names[0] if names else "none").encode())


def test_client_certificates_by_variables_and_conf_commands_as_nginx(tmp_path: Path, ca: trustme.CA) -> None:
    """proxy_ssl_certificate with variables: each session's pair (relative paths against the
    prefix), none for an empty value; proxy_ssl_conf_command's Certificate/PrivateKey override
    the configured pair, as nginx."""
    files = {f"{name}.pem": ca.issue_cert(f"{name}@example.test", common_name=name)
             .private_key_and_cert_chain_pem.bytes() for name in ("one", "two", "three")}
    (tmp_path / "peer.pem").write_bytes(_pem(ca.issue_cert("peer.test")))
    p = free_ports(4)
    with _CertificateTeller(tmp_path / "peer.pem", ca) as peer:
        stream = f"""
            map $server_port $cert {{ {p[0]} one; {p[1]} two; default ""; }}
            proxy_ssl on;
            proxy_ssl_session_reuse off;
            server {{ listen 127.0.0.1:{p[0]}; listen 127.0.0.1:{p[1]}; proxy_pass {peer.addr};
                     proxy_ssl_certificate $cert.pem; proxy_ssl_certificate_key $cert.pem; }}
            server {{ listen 127.0.0.1:{p[2]}; proxy_pass {peer.addr};
                     proxy_ssl_certificate $cert; proxy_ssl_certificate_key $cert; }}
            server {{ listen 127.0.0.1:{p[3]}; proxy_pass {peer.addr};
                     proxy_ssl_certificate one.pem; proxy_ssl_certificate_key one.pem;
                     proxy_ssl_conf_command Certificate three.pem;
                     proxy_ssl_conf_command PrivateKey three.pem; }}
        """
        results = {}
        for who, where in _each_runner(tmp_path, files):
            with _running(who, where, stream):
                results[who] = [_read(port) for port in p]
    assert results["scriptlb"] == [b"one", b"two", b"none", b"three"]
    assert results["scriptlb"] == results.get("nginx", results["scriptlb"])


def test_a_refused_conf_command_is_a_config_error_with_its_line(tmp_path: Path) -> None:
    conf = tmp_path / "scriptlb.conf"
    conf.write_text("stream {\n server { listen 127.0.0.1:1; proxy_pass 127.0.0.1:2; proxy_ssl on;\n"
                    "  proxy_ssl_conf_command NoSuchCommand yes; } }\n")
    with pytest.raises(ConfigError) as err:
        load(str(conf), str(tmp_path))
    assert f'SSL_CONF_cmd("NoSuchCommand", "yes") failed in {conf}:2' in str(err.value)
    proc = subprocess.run([sys.executable, "-m", "scriptlb", "-t", "-p", str(tmp_path), "-c", str(conf)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert f"in {conf}:2" in proc.stderr


def test_a_certificate_variable_naming_no_file_ends_the_session(tmp_path: Path, ca: trustme.CA) -> None:
    """nginx: the session ends (500), the peer is not blamed, the next session is served."""
    (tmp_path / "peer.pem").write_bytes(_pem(ca.issue_cert("peer.test")))
    where = tmp_path / "scriptlb"
    where.mkdir()
    (where / "one.pem").write_bytes(_pem(ca.issue_cert("one@example.test", common_name="one")))
    p = free_ports(2)
    with _CertificateTeller(tmp_path / "peer.pem", ca) as peer, _running("scriptlb", where, f"""
            map $server_port $cert {{ {p[0]} missing; default one; }}
            log_format s '$server_port $status';
            access_log s.log s;
            server {{ listen 127.0.0.1:{p[0]}; listen 127.0.0.1:{p[1]}; proxy_pass {peer.addr}; proxy_ssl on;
                     proxy_ssl_certificate $cert.pem; proxy_ssl_certificate_key $cert.pem; }}
            """) as log:
        assert _read(p[0]) == b""
        assert _read(p[1]) == b"one"
        lines = read_log_lines(tmp_path / "scriptlb" / "s.log", 2)
        assert "cannot load certificate" in log.read_text()
    assert lines == [f"{p[0]} 500", f"{p[1]} 200"]


# --------------------------------------------------------------------------- proxy_ssl_crl


def _crl(ca: trustme.CA, revoked: list[trustme.LeafCert]) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    issuer = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), None)
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateRevocationListBuilder().issuer_name(issuer.subject)
               .last_update(now - datetime.timedelta(days=1)).next_update(now + datetime.timedelta(days=30)))
    for cert in revoked:
        serial = x509.load_pem_x509_certificate(cert.cert_chain_pems[0].bytes()).serial_number
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build())
    crl = builder.sign(key, hashes.SHA256())  # type: ignore[arg-type]  # (trustme's key: an RSA one)
    return crl.public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize("where", ["http", "stream"])
def test_proxy_ssl_crl_refuses_a_revoked_peer_as_nginx(tmp_path: Path, ca: trustme.CA, where: str) -> None:
    peer_cert = ca.issue_cert("peer.test")
    files = {"peer.pem": _pem(peer_cert), "ca.pem": ca.cert_pem.bytes(),
             "empty.crl": _crl(ca, []), "revoked.crl": _crl(ca, [peer_cert])}
    p = free_ports(3)
    # (no session reuse: nginx keeps one session per peer, and the next location would resume
    # the first one's session, with no certificate to check)
    verify = "proxy_ssl_verify on; proxy_ssl_trusted_certificate ca.pem; proxy_ssl_name peer.test; " \
             "proxy_ssl_session_reuse off;"
    backend = f"server {{ listen 127.0.0.1:{p[2]} ssl; ssl_certificate peer.pem; " \
              f"ssl_certificate_key peer.pem; location / {{ return 200 peer; }} }}"
    if where == "http":
        stream = ""
        http = backend + "".join(
            f"server {{ listen 127.0.0.1:{port}; location / {{ proxy_pass https://127.0.0.1:{p[2]}; {verify} "
            f"proxy_ssl_crl {crl}; }} }}" for port, crl in ((p[0], "empty.crl"), (p[1], "revoked.crl")))
    else:
        http = backend
        stream = "".join(
            f"server {{ listen 127.0.0.1:{port}; proxy_pass 127.0.0.1:{p[2]}; proxy_ssl on; {verify} "
            f"proxy_ssl_crl {crl}; }}" for port, crl in ((p[0], "empty.crl"), (p[1], "revoked.crl")))
    results = {}
    for who, prefix in _each_runner(tmp_path, files):
        with _running(who, prefix, stream, http):
            answers = []
            for port in p[:2]:
                answer = _read(port, b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
                answers.append(answer.split(b"\r\n", 1)[0] + b" " + answer.rsplit(b"\r\n", 1)[-1])
        results[who] = answers
    expected_refusal = b"HTTP/1.1 502 Bad Gateway" if where == "http" else b""
    assert results["scriptlb"][0] == b"HTTP/1.1 200 OK peer"
    assert results["scriptlb"][1].startswith(expected_refusal)
    assert [a.split(b" ")[:3] for a in results["scriptlb"]] == \
        [a.split(b" ")[:3] for a in results.get("nginx", results["scriptlb"])]


# --------------------------------------------------------------------------- termination


def test_ssl_trusted_certificate_and_optional_no_ca_as_nginx(tmp_path: Path, ca: trustme.CA) -> None:
    """optional_no_ca needs no ssl_client_certificate; ssl_trusted_certificate's CAs verify."""
    stranger = trustme.CA()
    files = {"lb.pem": _pem(ca.issue_cert("lb.test")), "ca.pem": ca.cert_pem.bytes()}
    clients = {}
    for name, issuer in (("trusted", ca), ("stranger", stranger), ("none", None)):
        context = ssl.create_default_context()
        ca.configure_trust(context)
        if issuer is not None:
            issuer.issue_cert(f"{name}@example.test").configure_cert(context)
        clients[name] = context
    (port,) = free_ports(1)
    http = f"""server {{ listen 127.0.0.1:{port} ssl; ssl_certificate lb.pem; ssl_certificate_key lb.pem;
                ssl_verify_client optional_no_ca; ssl_trusted_certificate ca.pem;
                location / {{ return 200 "$ssl_client_verify"; }} }}"""
    results = {}
    for who, where in _each_runner(tmp_path, files):
        with _running(who, where, "", http):
            answers = []
            for name in clients:
                with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as raw, \
                        clients[name].wrap_socket(raw, server_hostname="lb.test") as tls:
                    tls.sendall(b"GET / HTTP/1.0\r\n\r\n")
                    answers.append(read_until_closed(tls).rsplit(b"\r\n", 1)[-1])
        results[who] = answers
    assert results["scriptlb"][0] == b"SUCCESS"
    assert results["scriptlb"][1].startswith(b"FAILED:")
    assert results["scriptlb"][2] == b"NONE"
    assert results["scriptlb"] == results.get("nginx", results["scriptlb"])


def test_ssl_handshake_timeout_closes_a_silent_client(tmp_path: Path, ca: trustme.CA) -> None:
    (tmp_path / "lb.pem").write_bytes(_pem(ca.issue_cert("lb.test")))
    (port,) = free_ports(1)
    stream = f"""server {{ listen 127.0.0.1:{port} ssl; ssl_certificate lb.pem; ssl_certificate_key lb.pem;
                 ssl_handshake_timeout 200ms; proxy_pass 127.0.0.1:1; }}"""
    with _running("scriptlb", tmp_path, stream) as log, \
            socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as conn:
        assert conn.recv(1) == b""  # closed by the proxy (the default 60 s would time this out)
        wait_for(lambda: "timed out" in log.read_text(), timeout=IO_TIMEOUT)


def test_ssl_handshake_timeout_takes_a_time(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        conf = tmp_path / "c.conf"
        conf.write_text("stream { ssl_handshake_timeout soon; }\n")
        load(str(conf), str(tmp_path))
    assert '"ssl_handshake_timeout" directive invalid value' in str(err.value)


# --------------------------------------------------------------------------- ssl_preread


def test_preread_reads_an_sslv2_hello_s_version_as_nginx() -> None:
    """nginx-tests' stream_ssl_preread_protocol.t bytes: an SSLv2-framed hello says its version."""
    for version, expected in ((0x0002, "SSLv2"), (0x0301, "TLSv1")):
        head = bytes([0x80, 0x1C, 0x01]) + version.to_bytes(2, "big")
        hello = head + bytes([0, 3, 0, 0, 0, 0x10, 1, 0, 0x80])
        parsed = parse_client_hello(hello + bytes(16))
        assert (parsed.status, parsed.protocol) == (DONE, expected)


def test_preread_takes_supported_versions_for_tls13_whatever_it_lists() -> None:
    """A supported_versions extension (here a TLS 1.3 draft's number, its length field longer
    than the hello) says TLSv1.3, as nginx's parser reads it."""
    hello = bytes.fromhex("16030100330100002f0303eb6357cdbaa6b8d853f1f6ac0fdf03178c0ae41824e7643682"
                          "3c1b273fbfde4b000000000007002b0007027f1c")
    parsed = parse_client_hello(hello)
    assert (parsed.status, parsed.protocol) == (DONE, "TLSv1.3")


def test_proxy_ssl_verify_depth_as_nginx(tmp_path: Path, ca: trustme.CA) -> None:
    """A peer certificate two intermediate CAs below the trusted one: nginx's default depth (1)
    refuses it, depth 2 verifies it (the peer sends its chain)."""
    intermediate = ca.create_child_ca().create_child_ca()
    files = {"peer.pem": _pem(intermediate.issue_cert("peer.test")), "ca.pem": ca.cert_pem.bytes()}
    p = free_ports(3)
    stream = f"""
        proxy_ssl on; proxy_ssl_verify on; proxy_ssl_trusted_certificate ca.pem; proxy_ssl_name peer.test;
        proxy_ssl_session_reuse off;
        server {{ listen 127.0.0.1:{p[0]}; proxy_pass 127.0.0.1:{p[2]}; }}
        server {{ listen 127.0.0.1:{p[1]}; proxy_pass 127.0.0.1:{p[2]}; proxy_ssl_verify_depth 2; }}
        server {{ listen 127.0.0.1:{p[2]} ssl; proxy_ssl off; ssl_certificate peer.pem;
                 ssl_certificate_key peer.pem; return verified; }}
    """
    results = {}
    for who, where in _each_runner(tmp_path, files):
        with _running(who, where, stream):
            results[who] = [_read(port) for port in p[:2]]
    assert results["scriptlb"] == [b"", b"verified"]
    assert results["scriptlb"] == results.get("nginx", results["scriptlb"])


@pytest.mark.parametrize(("name", "expected"), [
    ("backend:123", "backend"), ("backend", "backend"), ("[::1]:8443", "[::1]"), ("[::1]", "[::1]"),
    ("", ""),
])
def test_proxy_ssl_name_loses_its_port_as_nginx(name: str, expected: str) -> None:
    from scriptlb.http.tls import name_without_port

    assert name_without_port(name) == expected
