"""TLS termination's edges, each beside real nginx where the config is shared: plain HTTP sent to
a TLS port, failed handshakes (logged at info, the worker keeps serving), a silent client."""

from __future__ import annotations

import re
import socket
import ssl
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import pytest
import trustme
from helpers import Scriptlb, raw_exchange, wait_for
from test_round_robin import NGINX, free_ports, nginx_running
from test_tls import certs, client_context, https_get  # noqa: F401  (certs: a fixture)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def tls_server(port: str, paths: dict[str, Path], extra: str = "", protocols: str = "TLSv1.3") -> str:
    return f"""
        server {{
            listen 127.0.0.1:{port} ssl;
            server_name a.test;
            ssl_certificate {paths['a.test.crt']};
            ssl_certificate_key {paths['a.test.key']};
            ssl_protocols {protocols};
            {extra}
            location / {{ return 200 "ok $scheme\\n"; }}
        }}
    """


@contextmanager
def both(tmp_path: Path, paths: dict[str, Path], extra: str = "",
         protocols: str = "TLSv1.3") -> Iterator[list[tuple[int, Path]]]:
    """scriptlb, then nginx when installed, serving the same server: [(port, its error log)]."""
    ours = tmp_path / "ours.log"
    main = f"daemon off; master_process off; error_log {ours} info;\n"
    with Scriptlb(main + f"http {{ {tls_server('{port0}', paths, extra, protocols)} }}", tmp_path) as lb:
        if NGINX is None:
            yield [(lb.port, ours)]
            return
        (port,) = free_ports(1)
        ngx = tmp_path / "nginx"
        ngx.mkdir()
        theirs = ngx / "info.log"
        # (nginx's main error_log is the helper's: an http-level one takes these lines)
        http = f"error_log {theirs} info;" + tls_server(str(port), paths, extra, protocols)
        with nginx_running(ngx, http, [port]):
            yield [(lb.port, ours), (port, theirs)]


def normalized(answer: bytes) -> tuple[bytes, list[bytes], bytes]:
    """(status line, sorted headers, body) without what differs by product: Server, Date, the
    page's footer (and so its length)."""
    head, _, body = answer.partition(b"\r\n\r\n")
    status, *headers = head.split(b"\r\n")
    kept = sorted(h for h in headers if not re.match(rb"(Server|Date|Content-Length):", h))
    return status, kept, re.sub(rb"<hr><center>[^<]*</center>", b"<hr><center>SERVER</center>", body)


def log_line(log: Path, needle: str) -> str:
    """The first line of ``log`` holding ``needle``, from the level on, without the conn id."""
    wait_for(lambda: needle in log.read_text(), timeout=10, what=needle)
    line = next(line for line in log.read_text().splitlines() if needle in line)
    return re.sub(r"\d+#\d+: \*\d+ ", "", line[line.index("["):])


@pytest.mark.nginx
def test_plain_http_to_a_tls_port_gets_nginx_400_page(tmp_path: Path, ca: trustme.CA,
                                                    certs: dict[str, Path]) -> None:  # noqa: F811
    request = b"GET /x HTTP/1.1\r\nHost: a.test\r\n\r\n"
    answers, lines = [], []
    with both(tmp_path, certs) as targets:
        for port, log in targets:
            answers.append(normalized(raw_exchange(port, request)))
            lines.append(log_line(log, "plain HTTP"))
            # the worker still serves TLS
            assert https_get(port, client_context(ca), "a.test", "a.test")[1] == b"ok https\n"
    assert answers[0][0] == b"HTTP/1.1 400 Bad Request"
    assert b"<center>The plain HTTP request was sent to HTTPS port</center>" in answers[0][2]
    assert b"Connection: close" in answers[0][1]
    assert lines[0].startswith("[info] client sent plain HTTP request to HTTPS port")
    assert 'request: "GET /x HTTP/1.1", host: "a.test"' in lines[0]
    assert answers[1:] in ([], [answers[0]])
    assert lines[1:] in ([], [lines[0]])


@pytest.mark.nginx
def test_error_page_497_redirects_plain_http_as_nginx(tmp_path: Path, ca: trustme.CA,
                                                     certs: dict[str, Path]) -> None:  # noqa: F811
    request = b"GET /path?q=1 HTTP/1.1\r\nHost: a.test\r\n\r\n"
    answers = []
    with both(tmp_path, certs, "error_page 497 =301 https://$host$request_uri;") as targets:
        for port, _log in targets:
            answers.append(normalized(raw_exchange(port, request)))
    assert answers[0][0] == b"HTTP/1.1 301 Moved Permanently"
    assert b"Location: https://a.test/path?q=1" in answers[0][1]
    assert answers[1:] in ([], [answers[0]])


@pytest.mark.nginx
def test_failed_handshakes_are_logged_at_info_and_the_worker_serves(tmp_path: Path, ca: trustme.CA,
                                                                   certs: dict[str, Path]) -> None:  # noqa: F811
    old = client_context(ca)
    old.maximum_version = ssl.TLSVersion.TLSv1_2  # the servers speak TLSv1.3 only
    lines = []
    with both(tmp_path, certs) as targets:
        for port, log in targets:
            with pytest.raises((ssl.SSLError, ConnectionError)):
                https_get(port, old, "a.test", "a.test")
            line = log_line(log, "SSL_do_handshake() failed")
            lines.append(line)
            # a client that hangs up in the middle of its ClientHello
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
            lines.append(log_line(log, "peer closed connection in SSL handshake"))
            # garbage that starts like a TLS record, and then a good client
            try:
                raw_exchange(port, b"\x16\x03\x01\x00\x05hello" + bytes(range(256)))
            except OSError:
                pass
            assert https_get(port, client_context(ca), "a.test", "a.test")[1] == b"ok https\n"
    server = f"server: 127.0.0.1:{targets[0][0]}"
    assert lines[0] == ("[info] SSL_do_handshake() failed (SSL: error:0A000102:SSL routines::unsupported "
                        f"protocol) while SSL handshaking, client: 127.0.0.1, {server}")
    assert lines[1] == ("[info] peer closed connection in SSL handshake while SSL handshaking, "
                        f"client: 127.0.0.1, {server}")
    if len(targets) == 2:  # nginx: the same lines
        nginx_server = f"server: 127.0.0.1:{targets[1][0]}"
        assert [line.replace(nginx_server, server) for line in lines[2:]] == lines[:2]


def test_a_silent_client_is_closed_at_client_header_timeout(tmp_path: Path, ca: trustme.CA,
                                                           certs: dict[str, Path]) -> None:  # noqa: F811
    log = tmp_path / "ours.log"
    main = f"daemon off; master_process off; error_log {log} info;\n"
    conf = main + f"http {{ {tls_server('{port0}', certs, 'client_header_timeout 1s;')} }}"
    with Scriptlb(conf, tmp_path) as lb, socket.create_connection(("127.0.0.1", lb.port), timeout=10) as sock:
        started = time.monotonic()
        assert sock.recv(1) == b""  # closed by the server
        assert time.monotonic() - started >= 0.9
        line = log_line(log, "client timed out")
        assert line == ("[info] client timed out (110: Connection timed out) while SSL handshaking, "
                        f"client: 127.0.0.1, server: 127.0.0.1:{lb.port}")
        assert https_get(lb.port, client_context(ca), "a.test", "a.test")[1] == b"ok https\n"


# --------------------------------------------------------------------------- client certificates

VERIFY_BODY = '"$ssl_client_verify|$ssl_client_s_dn\\n"'


def mtls_servers(port: str, paths: dict[str, Path], trusted: Path) -> str:
    """a.test (the default server) asks for nothing; b.test requires a certificate; c.test takes
    one from an unknown issuer (optional_no_ca)."""
    blocks = []
    for name, verify in (("a.test", ""), ("b.test", "ssl_verify_client on;"),
                         ("c.test", "ssl_verify_client optional_no_ca;")):
        blocks.append(f"""
        server {{
            listen 127.0.0.1:{port} ssl;
            server_name {name};
            ssl_certificate {paths['a.test.crt']};
            ssl_certificate_key {paths['a.test.key']};
            ssl_protocols TLSv1.2 TLSv1.3;
            ssl_client_certificate {trusted};
            {verify}
            location / {{ return 200 {VERIFY_BODY}; }}
        }}""")
    return "".join(blocks)


@pytest.mark.nginx
def test_client_certificates_as_nginx_pages_and_log_lines(tmp_path: Path, ca: trustme.CA,
                                                        certs: dict[str, Path]) -> None:  # noqa: F811
    """SNI picks a server whose ssl_verify_client differs from the default server's; a missing
    or unverifiable certificate finishes the handshake and gets nginx's 400 pages."""
    good = client_context(ca, verify=False)  # (one server certificate, a.test, for all names)
    ca.issue_cert("client@example.test", common_name="client one").configure_cert(good)
    stranger = client_context(ca, verify=False)
    trustme.CA().issue_cert("who@example.test", common_name="stranger").configure_cert(stranger)
    none = client_context(ca, verify=False)
    cases = [(good, "b.test"), (none, "b.test"), (stranger, "b.test"), (stranger, "c.test"),
             (none, "c.test"), (good, "a.test")]
    results = []
    for name, port_text, log, run in _mtls_targets(tmp_path, certs):
        with run:
            port = int(port_text)
            bodies = [normalized(b"\r\n\r\n" + https_get(port, ctx, sni, sni)[1])[2] for ctx, sni in cases]
            lines = [log_line(log, "no required SSL certificate"), log_line(log, "certificate verify error")]
            lines.append(_ca_names(port, "b.test"))
        results.append((name, bodies, lines))
    _, ours, our_lines = results[0]
    assert ours[0].startswith(b"SUCCESS|CN=client one,")
    assert b"<center>No required SSL certificate was sent</center>" in ours[1]
    assert b"<center>The SSL certificate error</center>" in ours[2]
    assert ours[3].startswith(b"FAILED:unable to verify the first certificate|CN=stranger,")
    assert ours[4] == b"NONE|\n" and ours[5] == b"NONE|\n"
    assert our_lines[0].startswith("[info] client sent no required SSL certificate while reading client "
                                   "request headers, client: 127.0.0.1, server: b.test, "
                                   'request: "GET / HTTP/1.1"')
    assert our_lines[1].startswith("[info] client SSL certificate verify error: (")
    assert "O = trustme" in our_lines[2]  # ssl_client_certificate's CA named to the client
    if len(results) == 2:
        _, theirs, their_lines = results[1]
        assert ours == theirs
        assert our_lines == their_lines


def _ca_names(port: int, sni: str) -> str:
    """The certificate authorities a server names when it asks for a client certificate, as
    openssl s_client prints them ("" without openssl)."""
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        return ""
    out = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", sni],
                         input=b"", capture_output=True, timeout=20).stdout.decode(errors="replace")
    section = out.partition("Acceptable client certificate CA names")[2]
    return section.partition("Requested Signature Algorithms")[0].partition("---")[0].strip()


Target = tuple[str, str, Path, AbstractContextManager[Any]]  # (name, port, error log, what runs it)


def _mtls_targets(tmp_path: Path, paths: dict[str, Path]) -> list[Target]:
    ours = tmp_path / "ours.log"
    main = f"daemon off; master_process off; error_log {ours} info;\n"
    lb = Scriptlb(main + f"http {{ {mtls_servers('{port0}', paths, paths['ca'])} }}", tmp_path)
    targets: list[Target] = [("scriptlb", str(lb.port), ours, lb)]
    if NGINX is not None:
        (port,) = free_ports(1)
        ngx = tmp_path / "nginx"
        ngx.mkdir()
        theirs = ngx / "info.log"
        http = f"error_log {theirs} info;" + mtls_servers(str(port), paths, paths["ca"])
        targets.append(("nginx", str(port), theirs, nginx_running(ngx, http, [port])))
    return targets


# --------------------------------------------------------------------------- session resumption


def _resumed_on(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, session: ssl.SSLSession | None
                ) -> tuple[bool, ssl.SSLSession | None]:
    """One in-memory handshake (and a request/answer, so TLSv1.3 tickets arrive): (resumed, session)."""
    bios = [ssl.MemoryBIO() for _ in range(4)]
    server = server_ctx.wrap_bio(bios[0], bios[1], server_side=True)
    client = client_ctx.wrap_bio(bios[2], bios[3], server_hostname="a.test", session=session)
    for _ in range(8):
        for side in (client, server):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                pass
        bios[0].write(bios[3].read())
        bios[2].write(bios[1].read())
    client.write(b"ping")
    bios[0].write(bios[3].read())
    server.read(10)
    server.write(b"pong")
    bios[2].write(bios[1].read())
    client.read(10)
    return client.session_reused, client.session


@pytest.mark.parametrize("key_file", [None, 48, 80])
def test_a_session_made_by_one_worker_resumes_on_another(tmp_path: Path, ca: trustme.CA,
                                                        certs: dict[str, Path],  # noqa: F811
                                                        key_file: int | None) -> None:
    """Each worker builds its own contexts from the config: tickets must be readable by all of
    them (the master's random key, or ssl_session_ticket_key's file)."""
    import os

    from test_tls import _lb

    from scriptlb.http.tls import server_context

    extra = ""
    if key_file is not None:
        (tmp_path / "ticket.key").write_bytes(os.urandom(key_file))
        extra = f"ssl_session_ticket_key {tmp_path}/ticket.key;"
    with _lb(tmp_path, tls_server("{port0}", certs, extra)) as lb:
        conf = lb.conf.http.servers[0].ssl
    first, second = server_context(conf), server_context(conf)  # two workers' contexts
    client = client_context(ca)
    resumed, session = _resumed_on(first, client, None)
    assert not resumed and session is not None
    assert _resumed_on(second, client, session)[0]
    # and a context made from another key does not resume it
    if key_file is not None:
        (tmp_path / "ticket.key").write_bytes(os.urandom(key_file))
        with _lb(tmp_path, tls_server("{port0}", certs, extra)) as lb:
            other = server_context(lb.conf.http.servers[0].ssl)
        assert not _resumed_on(other, client, session)[0]


def rotation_servers(ports: list[str], paths: dict[str, Path], keys: dict[str, Path], protocol: str) -> str:
    """Three servers, one certificate: ticket keys B alone, A then B (A encrypts), A alone."""
    blocks = []
    for port, names in zip(ports, ("B", "A B", "A"), strict=True):
        files = " ".join(f"ssl_session_ticket_key {keys[name]};" for name in names.split())
        blocks.append(f"""
        server {{
            listen 127.0.0.1:{port} ssl;
            ssl_certificate {paths['a.test.crt']}; ssl_certificate_key {paths['a.test.key']};
            ssl_protocols {protocol}; {files}
            location / {{ return 200 "$ssl_session_reused"; }}
        }}""")
    return "".join(blocks)


@pytest.mark.parametrize(("protocol", "size"), [("TLSv1.2", 80), ("TLSv1.3", 48)])
@pytest.mark.nginx
def test_several_ticket_keys_the_first_encrypts_all_decrypt_as_nginx(tmp_path: Path, ca: trustme.CA,
                                                                     certs: dict[str, Path],  # noqa: F811
                                                                     protocol: str, size: int) -> None:
    """Key rotation: a ticket made under key B alone resumes where A, B are configured (and is
    renewed under A there, so it then resumes where A alone is), not the other way round."""
    import os

    keys = {name: tmp_path / f"{name}.key" for name in "AB"}
    for path in keys.values():
        path.write_bytes(os.urandom(size))
    client = client_context(ca)

    def reused(port: int, session: ssl.SSLSession | None) -> tuple[str, ssl.SSLSession | None]:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                client.wrap_socket(raw, server_hostname="a.test", session=session) as tls:
            tls.sendall(b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
            return data.partition(b"\r\n\r\n")[2].decode(), tls.session

    def sequence(ports: list[int]) -> list[str]:
        made_under_b, session = reused(ports[0], None)
        on_a_b, renewed = reused(ports[1], session)
        return [made_under_b, on_a_b, reused(ports[2], renewed)[0], reused(ports[0], renewed)[0]]

    conf = rotation_servers(["{port0}", "{port1}", "{port2}"], certs, keys, protocol)
    with Scriptlb(f"http {{ {conf} }}", tmp_path, listens=3) as lb:
        seen = [sequence(lb.ports)]
    if NGINX is not None:
        ports = free_ports(3)
        ngx = tmp_path / "nginx"
        ngx.mkdir()
        with nginx_running(ngx, rotation_servers([str(p) for p in ports], certs, keys, protocol), ports):
            seen.append(sequence(ports))
    assert seen[0] == [".", "r", "r", "."]
    assert seen[1:] in ([], [seen[0]])


@pytest.mark.parametrize("cache", ["builtin:100", "shared:SSL:1m"])
@pytest.mark.nginx
def test_a_session_outlives_a_client_reset_as_nginx(tmp_path: Path, ca: trustme.CA,
                                                    certs: dict[str, Path], cache: str) -> None:  # noqa: F811
    """A client that resets its connection (no close_notify) can still resume its session: nginx
    marks such a connection shut down, so OpenSSL does not drop the session from the cache."""
    import struct

    extra = (f"ssl_session_tickets off; ssl_session_cache {cache}; "
             'location /r { return 200 "$ssl_session_reused"; }')
    client = client_context(ca)
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    seen = []
    with both(tmp_path, certs, extra, protocols="TLSv1.2") as targets:
        for port, _log in targets:
            raw = socket.create_connection(("127.0.0.1", port), timeout=10)
            tls = client.wrap_socket(raw, server_hostname="a.test")
            tls.sendall(b"GET /r HTTP/1.1\r\nHost: a.test\r\n\r\n")
            assert tls.recv(65536).endswith(b".")
            session = tls.session
            tls.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            tls.close()  # a reset, without close_notify
            time.sleep(0.2)  # (the server sees the reset before the next handshake)
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw2, \
                    client.wrap_socket(raw2, server_hostname="a.test", session=session) as again:
                again.sendall(b"GET /r HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
                data = b""
                while chunk := again.recv(65536):
                    data += chunk
            seen.append(data.partition(b"\r\n\r\n")[2])
    assert seen[0] == b"r"
    assert seen[1:] in ([], [seen[0]])


@pytest.mark.parametrize(("extra", "protocol"), [("", "TLSv1.2 TLSv1.3"),
                                                ("ssl_session_tickets off;", "TLSv1.2"),
                                                ("ssl_session_tickets off;", "TLSv1.3")])
@pytest.mark.slow
def test_sessions_resume_across_the_workers_of_a_master(tmp_path: Path, ca: trustme.CA,
                                                       certs: dict[str, Path],  # noqa: F811
                                                       extra: str, protocol: str) -> None:
    """Tickets (the default) carry the session to any worker; without them the session ID (or
    TLSv1.3's stateful ticket) is looked up in the ssl_session_cache shared: zone."""
    from helpers import master_process

    (port,) = free_ports(1)
    conf = tmp_path / "scriptlb.conf"
    conf.write_text(f"""
        daemon off; worker_processes 2; pid {tmp_path}/scriptlb.pid; error_log {tmp_path}/error.log;
        http {{
            server {{
                listen 127.0.0.1:{port} ssl reuseport;
                ssl_certificate {certs['a.test.crt']}; ssl_certificate_key {certs['a.test.key']};
                ssl_session_cache shared:SSL:1m; ssl_protocols {protocol}; {extra}
                location / {{ return 200 "$pid|$ssl_session_reused"; }}
            }}
        }}
    """)
    client = client_context(ca)

    def get(session: ssl.SSLSession | None) -> tuple[str, ssl.SSLSession | None]:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                client.wrap_socket(raw, server_hostname="a.test", session=session) as tls:
            tls.sendall(b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
            return data.partition(b"\r\n\r\n")[2].decode(), tls.session

    with master_process(tmp_path, conf):
        wait_for(lambda: _answers(port), timeout=20, what="the workers")
        body, session = get(None)
        seen = {body}
        for _ in range(40):  # until both workers answered a resumed session (bounded)
            seen.add(get(session)[0])
            if len({b.split("|")[0] for b in seen}) >= 2 and len(seen) >= 3:
                break
    pids = {b.split("|")[0] for b in seen}
    assert len(pids) == 2, seen
    assert all(b.endswith("|r") for b in seen if b != body), seen


def _answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


CLIENT_VARIABLES = ("ssl_client_verify", "ssl_client_s_dn", "ssl_client_i_dn", "ssl_client_serial",
                    "ssl_client_fingerprint", "ssl_client_v_start", "ssl_client_v_end", "ssl_client_v_remain",
                    "ssl_client_escaped_cert", "ssl_alpn_protocol", "ssl_protocol", "ssl_cipher",
                    "ssl_session_reused", "https", "scheme", "ssl_ciphers", "ssl_curves")


@pytest.mark.nginx
def test_the_client_certificate_variables_as_nginx(tmp_path: Path, ca: trustme.CA,
                                                  certs: dict[str, Path]) -> None:  # noqa: F811
    """Every $ssl_client_* variable (and ALPN) read in one response, the same as nginx's."""
    body = ('"' + "\\n".join(f"{name}=${name}" for name in CLIENT_VARIABLES)
            + '\\n$ssl_client_raw_cert|$ssl_client_cert|"')
    extra = (f"ssl_client_certificate {certs['ca']}; ssl_verify_client on; "
             f"location /v {{ return 200 {body}; }}")
    ctx = client_context(ca)
    ctx.set_alpn_protocols(["http/1.1"])
    client = ca.issue_cert("client@example.test", common_name="client one")
    client.configure_cert(ctx)
    answers = []
    with both(tmp_path, certs, extra) as targets:
        for port, _log in targets:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                    ctx.wrap_socket(raw, server_hostname="a.test") as tls:
                tls.sendall(b"GET /v HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
                data = b""
                while chunk := tls.recv(65536):
                    data += chunk
            answers.append(data.partition(b"\r\n\r\n")[2].decode())
    ours = dict(line.split("=", 1) for line in answers[0].splitlines()[:len(CLIENT_VARIABLES)])
    assert ours["ssl_client_verify"] == "SUCCESS"
    assert ours["ssl_client_i_dn"].startswith("OU=Testing CA #") and "O=trustme" in ours["ssl_client_i_dn"]
    assert len(ours["ssl_client_fingerprint"]) == 40 and ours["ssl_alpn_protocol"] == "http/1.1"
    assert int(ours["ssl_client_v_remain"]) > 300
    assert "-----BEGIN CERTIFICATE-----\n" in answers[0]
    assert ours["ssl_client_escaped_cert"].startswith("-----BEGIN%20CERTIFICATE-----%0A")
    # the client's offered lists, in its order, by OpenSSL's names
    assert ours["ssl_ciphers"].startswith("TLS_AES_256_GCM_SHA384:") and "ECDHE-" in ours["ssl_ciphers"]
    assert ours["ssl_curves"].startswith("X25519:prime256v1")
    # $ssl_client_cert: the PEM, every line after the first behind a tab, no newline at the end
    raw, tabbed = answers[0].split("\n", len(CLIENT_VARIABLES))[-1].split("|")[:2]
    assert tabbed == raw[:-1].replace("\n", "\n\t") and "\n\t-----END CERTIFICATE-----" in tabbed
    assert answers[1:] in ([], [answers[0]])


@pytest.mark.parametrize("cache", ["none", "off", "builtin:100", "shared:SSL:1m"])
@pytest.mark.nginx
def test_session_id_resumption_follows_ssl_session_cache_as_nginx(tmp_path: Path, ca: trustme.CA,
                                                                  certs: dict[str, Path],  # noqa: F811
                                                                  cache: str) -> None:
    """TLSv1.2 without tickets: a session ID resumes only where ssl_session_cache keeps it."""
    extra = (f"ssl_session_tickets off; ssl_session_cache {cache}; "
             'location /r { return 200 "$ssl_session_reused"; }')
    client = client_context(ca)
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    seen = []
    with both(tmp_path, certs, extra, protocols="TLSv1.2") as targets:
        for port, _log in targets:
            session = None
            answers = []
            for _ in range(2):
                with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                        client.wrap_socket(raw, server_hostname="a.test", session=session) as tls:
                    tls.sendall(b"GET /r HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
                    data = b""
                    while chunk := tls.recv(65536):
                        data += chunk
                    session = tls.session
                answers.append(data.partition(b"\r\n\r\n")[2])
            seen.append(answers)
    assert seen[0] == ([b".", b"r"] if cache.startswith(("builtin", "shared")) else [b".", b"."])
    assert seen[1:] in ([], [seen[0]])


@pytest.mark.nginx
def test_every_curve_of_ssl_ecdh_curve_is_offered_as_nginx(tmp_path: Path, ca: trustme.CA,
                                                          certs: dict[str, Path]) -> None:  # noqa: F811
    """A client that has only the list's second curve still gets a handshake."""
    client = client_context(ca)
    client.set_ecdh_curve("prime256v1")
    answers = []
    with both(tmp_path, certs, "ssl_ecdh_curve secp384r1:prime256v1;") as targets:
        for port, _log in targets:
            answers.append(https_get(port, client, "a.test", "a.test")[1])
    assert answers == [b"ok https\n"] * len(targets)
    from helpers import load_conf

    from scriptlb.config import ConfigError

    with pytest.raises(ConfigError, match=r'SSL_CTX_set1_curves_list\("secp384r1:nosuch"\) failed'):
        load_conf(f"http {{ {tls_server('1', certs, 'ssl_ecdh_curve secp384r1:nosuch;')} }}", tmp_path)


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.nginx
def test_ssl_verify_depth_as_nginx(tmp_path: Path, ca: trustme.CA, certs: dict[str, Path],  # noqa: F811
                                   depth: int) -> None:
    """A client certificate two intermediate CAs below the root: verified at depth 2, not at
    depth 1 (OpenSSL's depth counts the intermediates)."""
    intermediate = ca.create_child_ca().create_child_ca()
    client = client_context(ca)
    intermediate.issue_cert("deep@example.test", common_name="deep").configure_cert(client)  # (+ chain)
    extra = (f"ssl_client_certificate {certs['ca']}; ssl_verify_client on; ssl_verify_depth {depth}; "
             'location /v { return 200 "$ssl_client_verify"; }')
    answers = []
    with both(tmp_path, certs, extra) as targets:
        for port, _log in targets:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                    client.wrap_socket(raw, server_hostname="a.test") as tls:
                tls.sendall(b"GET /v HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
                data = b""
                while chunk := tls.recv(65536):
                    data += chunk
            answers.append(normalized(data)[2])
    if depth == 2:
        assert answers[0] == b"SUCCESS"
    else:
        assert b"<center>The SSL certificate error</center>" in answers[0]
    assert answers[1:] in ([], [answers[0]])


def _handshake_then(port: int, ctx: ssl.SSLContext, raw_bytes: bytes) -> bytes:
    """A TLS handshake over memory BIOs, then ``raw_bytes`` written to the socket as they are
    (not through TLS); what the server sent after them until it closed."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="a.test")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                sock.sendall(outgoing.read())
                incoming.write(sock.recv(65536))
        sock.sendall(outgoing.read() + raw_bytes)
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except ConnectionResetError:
            pass
    return data


@pytest.mark.nginx
def test_a_forged_record_after_the_handshake_is_logged_at_info_as_nginx(
        tmp_path: Path, ca: trustme.CA, certs: dict[str, Path]) -> None:  # noqa: F811
    forged = b"\x17\x03\x03\x00\x20" + bytes(range(32))  # application data no key made
    lines = []
    with both(tmp_path, certs) as targets:
        for port, log in targets:
            _handshake_then(port, client_context(ca), forged)
            lines.append(log_line(log, "SSL_read() failed"))
            assert https_get(port, client_context(ca), "a.test", "a.test")[1] == b"ok https\n"
    server = f"server: 127.0.0.1:{targets[0][0]}"
    assert lines[0] == ("[info] SSL_read() failed (SSL: error:0A000119:SSL routines::decryption failed or "
                        f"bad record mac) while waiting for request, client: 127.0.0.1, {server}")
    if len(targets) == 2:
        assert lines[1].replace(f"127.0.0.1:{targets[1][0]}", f"127.0.0.1:{targets[0][0]}") == lines[0]


def test_without_libssl_access_the_directives_that_need_it_are_refused(
        tmp_path: Path, certs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """tls_native unusable (another Python's object layout): optional_no_ca and ticket-key files
    are config errors at their line; the rest falls back to Python's ssl."""
    from helpers import load_conf

    from scriptlb.config import ConfigError
    from scriptlb.http import tls_native

    monkeypatch.setattr(tls_native, "_CHECKED", True)
    monkeypatch.setattr(tls_native, "_LIB", None)
    assert not tls_native.available()
    (tmp_path / "ticket.key").write_bytes(bytes(80))
    base = tls_server("1", certs, "ssl_ecdh_curve prime256v1:secp384r1; ssl_session_cache builtin:10;")
    load_conf(f"http {{ {base} }}", tmp_path)  # (works: Python's own ssl does this much)
    for extra, error in ((f"ssl_client_certificate {certs['ca']}; ssl_verify_client optional_no_ca;",
                          "optional_no_ca"),
                         (f"ssl_session_ticket_key {tmp_path}/ticket.key;", "ssl_session_ticket_key")):
        with pytest.raises(ConfigError, match=error):
            load_conf(f"http {{ {tls_server('1', certs, extra)} }}", tmp_path)
