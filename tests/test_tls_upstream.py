"""TLS to the peers (proxy_pass https://): verification, SNI, names from a hook, pooling;
real TLS servers with trustme certificates, nginx as the oracle where the config is shared."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest
import trustme
from helpers import Scriptlb, get, read_log_lines
from test_round_robin import NGINX, free_ports, nginx_running
from test_websocket import serving


class TlsPeer:
    """An HTTP/1.1 server over TLS answering "<sni>|<connection number>"."""

    def __init__(self, ca: trustme.CA, name: str, client_ca: trustme.CA | None = None) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ca.issue_cert(name).configure_cert(self.ctx)
        if client_ca is not None:
            client_ca.configure_trust(self.ctx)
            self.ctx.verify_mode = ssl.CERT_REQUIRED
        self.connections = 0
        self.resumed: list[bool] = []  # per connection: the client resumed a session
        self.ctx.sni_callback = lambda sock, name, ctx: setattr(sock, "sni", name)  # type: ignore[assignment,misc]

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        peer = writer.get_extra_info("ssl_object")
        self.resumed.append(bool(peer is not None and peer.session_reused))
        client = peer.getpeercert() if peer is not None else None
        who = dict(x for rdn in client["subject"] for x in rdn).get("commonName", "") if client else ""
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                body = f"{getattr(peer, 'sni', None)}|{number}|{who}".encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def serve(self):  # type: ignore[no-untyped-def]
        return serving(lambda: asyncio.start_server(self.handle, "127.0.0.1", 0, ssl=self.ctx))


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def _ca_file(ca: trustme.CA, tmp_path: Path) -> Path:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(path)
    return path


def _lb(tmp_path: Path, block: str) -> Scriptlb:
    main = f"daemon off; master_process off; error_log {tmp_path}/error.log info;\n"
    return Scriptlb(main + f"http {{ {block} }}", tmp_path)


def test_verified_tls_to_a_pooled_peer_with_sni(tmp_path: Path, ca: trustme.CA) -> None:
    peer = TlsPeer(ca, "peer.test")
    with peer.serve() as addr:
        block = f"""
            upstream up {{ server {addr}; keepalive 4; }}
            server {{
                listen {{port0}};
                location / {{
                    proxy_pass https://up;
                    proxy_http_version 1.1;
                    proxy_set_header Connection "";
                    proxy_ssl_verify on;
                    proxy_ssl_trusted_certificate {_ca_file(ca, tmp_path)};
                    proxy_ssl_name peer.test;
                    proxy_ssl_server_name on;
                }}
            }}
        """
        with _lb(tmp_path, block) as lb:
            bodies = [get(lb.port, "/").body for _ in range(3)]
    assert bodies == [b"peer.test|1|"] * 3  # one TLS connection, reused from the pool


def test_a_failed_verification_is_an_error_try_and_the_next_peer_serves(tmp_path: Path,
                                                                      ca: trustme.CA) -> None:
    stranger = TlsPeer(trustme.CA(), "peer.test")  # a certificate from a CA we do not trust
    good = TlsPeer(ca, "peer.test")
    log = tmp_path / "access.log"
    with stranger.serve() as bad_addr, good.serve() as good_addr:
        block = f"""
            log_format tries '$status $upstream_status';
            upstream up {{ server {bad_addr}; server {good_addr}; }}
            server {{
                listen {{port0}};
                access_log {log} tries;
                location / {{
                    proxy_pass https://up;
                    proxy_ssl_verify on;
                    proxy_ssl_trusted_certificate {_ca_file(ca, tmp_path)};
                    proxy_ssl_name peer.test;
                }}
            }}
        """
        with _lb(tmp_path, block) as lb:
            response = get(lb.port, "/")
            (line,) = read_log_lines(log, 1)
    assert response.status == 200 and response.body.startswith(b"peer.test|")
    assert line == "200 502, 200"
    errors = (tmp_path / "error.log").read_text()
    assert "upstream SSL certificate verify error: (" in errors
    assert "while SSL handshaking to upstream" in errors and 'upstream: "https://' in errors


def test_the_hook_sets_the_tls_name_and_the_pool_key_keeps_names_apart(tmp_path: Path,
                                                                      ca: trustme.CA) -> None:
    peer = TlsPeer(ca, "*.peer.test")
    hook = tmp_path / "hook.py"
    hook.write_text(
        "host, port = ngx.var.http_x_addr.split(':')\n"
        "balancer.set_current_peer(host, int(port), ngx.var.http_x_name)\n"
    )
    with peer.serve() as addr:
        block = f"""
            upstream up {{ server 127.0.0.1:1; balancer_by_python_file {hook}; keepalive 4; }}
            server {{
                listen {{port0}};
                location / {{
                    proxy_pass https://up;
                    proxy_http_version 1.1;
                    proxy_set_header Connection "";
                    proxy_ssl_verify on;
                    proxy_ssl_trusted_certificate {_ca_file(ca, tmp_path)};
                    proxy_ssl_server_name on;
                }}
            }}
        """
        with _lb(tmp_path, block) as lb:
            bodies = [get(lb.port, "/", headers={"X-Addr": addr, "X-Name": name}).body
                      for name in ("a.peer.test", "b.peer.test", "a.peer.test", "b.peer.test")]
    assert [b.split(b"|")[0] for b in bodies] == [b"a.peer.test", b"b.peer.test"] * 2
    numbers = [b.split(b"|")[1] for b in bodies]
    assert numbers[0] == numbers[2] and numbers[1] == numbers[3] and numbers[0] != numbers[1]


def test_a_client_certificate_to_the_peer_as_nginx(tmp_path: Path, ca: trustme.CA) -> None:
    client_ca = trustme.CA()
    peer = TlsPeer(ca, "peer.test", client_ca=client_ca)
    client = client_ca.issue_cert("proxy.test", common_name="the proxy")
    client.cert_chain_pems[0].write_to_path(tmp_path / "client.crt")
    client.private_key_pem.write_to_path(tmp_path / "client.key")
    with peer.serve() as addr:
        def block(listen: str) -> str:
            return f"""
                server {{
                    listen {listen};
                    location / {{
                        proxy_pass https://{addr};
                        proxy_ssl_certificate {tmp_path}/client.crt;
                        proxy_ssl_certificate_key {tmp_path}/client.key;
                        proxy_ssl_server_name on;
                        proxy_ssl_name peer.test;
                    }}
                }}
            """

        with _lb(tmp_path, block("{port0}")) as lb:
            ours = get(lb.port, "/").body
        assert ours.startswith(b"peer.test|") and ours.endswith(b"|the proxy")
        if NGINX is None:
            return
        (port,) = free_ports(1)
        ngx = tmp_path / "nginx"
        ngx.mkdir()
        with nginx_running(ngx, block(f"127.0.0.1:{port}"), [port]):
            theirs = get(port, "/").body
    assert theirs.split(b"|")[0::2] == ours.split(b"|")[0::2]


@pytest.mark.parametrize("reuse", ["on", "off"])
def test_new_connections_resume_the_peer_session(tmp_path: Path, ca: trustme.CA, reuse: str) -> None:
    """proxy_ssl_session_reuse (on by default): without keep-alive every request opens a new
    connection, and each after the first resumes the peer's last session (TLSv1.3 tickets)."""
    peer = TlsPeer(ca, "peer.test")
    with peer.serve() as addr:
        block = f"""
            server {{
                listen {{port0}};
                location / {{
                    proxy_pass https://{addr};
                    proxy_ssl_verify on;
                    proxy_ssl_trusted_certificate {_ca_file(ca, tmp_path)};
                    proxy_ssl_name peer.test;
                    proxy_ssl_session_reuse {reuse};
                }}
            }}
        """
        with _lb(tmp_path, block) as lb:
            bodies = [get(lb.port, "/").body for _ in range(4)]
    assert [body.split(b"|")[0] for body in bodies] == [b"peer.test"] * 4
    assert len(peer.resumed) == 4  # a connection per request
    assert peer.resumed == ([False, True, True, True] if reuse == "on" else [False] * 4)
