"""The proxy beside a real nginx (``@pytest.mark.nginx``): the same peer answers both, and what
the client gets (or what the access log says) must match."""

from __future__ import annotations

import asyncio
import re
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import BackendRequest, Backends, Scriptlb, free_ports, raw_exchange, read_log_lines, respond
from nginx_oracle import NGINX, nginx_running

pytestmark = [pytest.mark.nginx, pytest.mark.skipif(NGINX is None, reason="nginx is not installed")]

# the peer's status line per request path
STATUS_LINES = {
    "/nope": b"HTTP/1.1 404 Nope",
    "/ok": b"HTTP/1.1 200 OK",
    "/fine": b"HTTP/1.1 200 Fine And Dandy",
    "/http10": b"HTTP/1.0 201 Made It",
    "/unknown": b"HTTP/1.1 299 Whatever",
    "/bare": b"HTTP/1.1 503",
}


def status_lines():  # type: ignore[no-untyped-def]
    async def behaviour(req: BackendRequest, writer: asyncio.StreamWriter) -> bool:
        writer.write(STATUS_LINES[req.target] + b"\r\nContent-Length: 2\r\n\r\nhi")
        await writer.drain()
        return True

    return behaviour


def first_line(response: bytes) -> bytes:
    return response.split(b"\r\n", 1)[0]


def test_the_peers_reason_phrase_reaches_the_client_as_nginx(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    requests = [b"GET %s HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n" % p.encode() for p in STATUS_LINES]
    with Backends(status_lines()) as bk:
        block = f"server {{ listen 127.0.0.1:{port}; location / {{ proxy_pass http://{bk[0].addr}; }} }}"
        ngx_dir, lb_dir = tmp_path / "nginx", tmp_path / "scriptlb"
        ngx_dir.mkdir()
        lb_dir.mkdir()
        with nginx_running(ngx_dir, block):
            theirs = [first_line(raw_exchange(port, r)) for r in requests]
        lb_block = block.replace(f"listen 127.0.0.1:{port};", "listen {port0};")
        with Scriptlb(f"daemon off; master_process off; error_log {lb_dir}/error.log info;\n"
                      f"http {{ {lb_block} }}", lb_dir) as lb:
            ours = [first_line(raw_exchange(lb.port, r)) for r in requests]
    assert ours == theirs
    assert ours[0] == b"HTTP/1.1 404 Nope"


def test_non_ascii_uri_and_host_are_bytes_as_nginx(tmp_path: Path) -> None:
    """nginx keeps a byte per character: %C3%A9 in the URI is logged as \\xC3\\xA9, and a
    ``return`` body echoes a non-ASCII Host as the bytes received. (The Host bytes are ones
    latin-1 lower-casing leaves alone: normalize_host lower-cases beyond ASCII, nginx does not.)"""
    (port,) = free_ports(1)
    requests = [
        b"GET /caf%C3%A9/x%E9?a=%C3%A9 HTTP/1.1\r\nHost: caf\xe9\xa9.test\r\nConnection: close\r\n\r\n",
        b"GET /plain HTTP/1.1\r\nHost: h\xe9\r\nConnection: close\r\n\r\n",
    ]
    block = """
        log_format uris '$uri|$request_uri|$args|$host|$request_length';
        server {{
            listen 127.0.0.1:{port};
            access_log {log} uris;
            location / {{ return 200 "$host|$uri|$request_uri\\n"; }}
        }}
    """
    ngx_dir, lb_dir = tmp_path / "nginx", tmp_path / "scriptlb"
    ngx_dir.mkdir()
    lb_dir.mkdir()
    with nginx_running(ngx_dir, block.format(port=port, log=f"{ngx_dir}/uris.log")):
        theirs = [raw_exchange(port, r).partition(b"\r\n\r\n")[2] for r in requests]
        their_log = read_log_lines(ngx_dir / "uris.log", len(requests))
    lb_block = block.format(port="{port0}", log=f"{lb_dir}/uris.log").replace("listen 127.0.0.1:", "listen ")
    with Scriptlb(f"daemon off; master_process off; error_log {lb_dir}/error.log info;\n"
                  f"http {{ {lb_block} }}", lb_dir) as lb:
        ours = [raw_exchange(lb.port, r).partition(b"\r\n\r\n")[2] for r in requests]
        our_log = read_log_lines(lb_dir / "uris.log", len(requests))
    assert ours == theirs
    assert ours[0] == b"caf\xe9\xa9.test|/caf\xc3\xa9/x\xe9|/caf%C3%A9/x%E9?a=%C3%A9\n"
    assert our_log == their_log
    assert our_log[0].startswith("/caf\\xC3\\xA9/x\\xE9|")


def read_until_closed(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_client_timeouts_close_without_a_response_and_log_408_as_nginx(tmp_path: Path) -> None:
    """client_header_timeout / client_body_timeout: nginx sends nothing, closes, and access-logs
    a request it had started reading with 408 (a connection that sent nothing: no line)."""
    port, peer = free_ports(2)
    cases = [
        b"",
        b"GET /x HTTP/1.1\r\nHost: x\r\n",
        b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc",
        b"GET /k HTTP/1.1\r\nHost: x\r\n\r\nGET /k2 HTTP/1.1\r\n",
    ]
    block = """
        log_format brief '$status|$request|$body_bytes_sent';
        server {{
            listen 127.0.0.1:{port};
            access_log {log} brief;
            client_header_timeout 200ms;
            client_body_timeout 200ms;
            location /p {{ proxy_pass http://127.0.0.1:{peer}; }}
            location / {{ return 200 ok; }}
        }}
    """
    ngx_dir, lb_dir = tmp_path / "nginx", tmp_path / "scriptlb"
    ngx_dir.mkdir()
    lb_dir.mkdir()
    with nginx_running(ngx_dir, block.format(port=port, peer=peer, log=f"{ngx_dir}/brief.log")):
        theirs = [read_until_closed(port, data).partition(b"\r\n")[0] for data in cases]
        their_log = read_log_lines(ngx_dir / "brief.log", 4)
    lb_block = block.format(port="{port0}", peer=peer, log=f"{lb_dir}/brief.log").replace("127.0.0.1:{port0}",
                                                                                          "{port0}")
    with Scriptlb(f"daemon off; master_process off; error_log {lb_dir}/error.log info;\n"
                  f"http {{ {lb_block} }}", lb_dir) as lb:
        ours = [read_until_closed(lb.port, data).partition(b"\r\n")[0] for data in cases]
        our_log = read_log_lines(lb_dir / "brief.log", 4)
    assert ours == theirs == [b"", b"", b"", b"HTTP/1.1 200 OK"]
    assert our_log == their_log
    assert [line.split("|")[0] for line in our_log] == ["408", "408", "200", "408"]


def test_sent_http_sees_the_framing_headers_as_nginx(tmp_path: Path) -> None:
    """$sent_http_content_length / _connection / _transfer_encoding report the framing the
    server wrote itself, for ``return`` and proxied responses, keep-alive or not."""
    port, = free_ports(1)
    requests = [  # one connection: the first response is keep-alive, the second closes
        b"GET /r HTTP/1.1\r\nHost: t\r\n\r\n",
        b"GET /p HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    ]
    with Backends(respond(body=b"hello", headers={"X-Up": "1"})) as bk:
        block = """
            log_format sent '$sent_http_content_length|$sent_http_connection|'
                            '$sent_http_transfer_encoding|$sent_http_x_up|$sent_http_server';
            server {{
                listen {listen};
                access_log {log} sent;
                location /r {{ return 200 "ok"; }}
                location /p {{ proxy_pass http://{peer}; }}
            }}
        """
        ngx_dir, lb_dir = tmp_path / "nginx", tmp_path / "scriptlb"
        ngx_dir.mkdir()
        lb_dir.mkdir()
        with nginx_running(ngx_dir, block.format(listen=f"127.0.0.1:{port}", peer=bk[0].addr,
                                                 log=f"{ngx_dir}/sent.log")):
            raw_exchange(port, b"".join(requests))
            theirs = read_log_lines(ngx_dir / "sent.log", len(requests))
        lb_block = block.format(listen="{port0}", peer=bk[0].addr, log=f"{lb_dir}/sent.log")
        with Scriptlb(f"daemon off; master_process off; error_log {lb_dir}/error.log info;\n"
                      f"http {{ {lb_block} }}", lb_dir) as lb:
            raw_exchange(lb.port, b"".join(requests))
            ours = read_log_lines(lb_dir / "sent.log", len(requests))
    # nginx 1.22 logs $sent_http_connection "close" even for a response it sent with
    # "Connection: keep-alive" (it clears r->keepalive before the log phase); we log what we sent
    assert theirs[0].split("|")[1] == "close"
    assert ours[0] == theirs[0].replace("|close|", "|keep-alive|", 1)
    assert ours[1] == theirs[1] == "5|close|-|1|-"


def half_closing_peer():  # type: ignore[no-untyped-def]
    """``.../slow``: the answer after 0.5 s; ``.../head``: the head and 5 of 8 body bytes at
    once, the last 3 after 0.5 s."""
    async def behaviour(req: BackendRequest, writer: asyncio.StreamWriter) -> bool:
        if req.target.endswith("/head"):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nfirst")
            await writer.drain()
            await asyncio.sleep(0.5)
            writer.write(b"end")
        else:
            await asyncio.sleep(0.5)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nslow")
        await writer.drain()
        return True

    return behaviour


def half_close(port: int, path: str, after_head: bool) -> bytes:
    """Send a request, shut the sending side (at once or once the head came), and return the
    body bytes received until the server closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET %s HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n" % path.encode())
        data = sock.recv(65536) if after_head else b""
        if not after_head:
            time.sleep(0.2)  # the request is with the peer
        sock.shutdown(socket.SHUT_WR)
        while chunk := sock.recv(65536):
            data += chunk
    return data.partition(b"\r\n\r\n")[2]


def test_a_client_half_close_while_proxied_is_a_499_as_nginx(tmp_path: Path) -> None:
    """A client that shuts its sending side after its request: before the response, nginx ends
    the request as 499 and closes both connections; a buffered response being sent goes on to
    its end; an unbuffered one (proxy_buffering off) is cut. Logged at info the same way."""
    cases = [("/on/slow", False), ("/on/head", True), ("/off/head", True)]
    (port,) = free_ports(1)
    block = """
        log_format half '$status $body_bytes_sent "$upstream_status" $request_uri';
        {error_log}
        server {{
            listen {listen};
            access_log {dir}/half.log half;
            location /on/ {{ proxy_pass http://{peer}; }}
            location /off/ {{ proxy_pass http://{peer}; proxy_buffering off; }}
        }}
    """
    results = {}
    with Backends(half_closing_peer()) as bk:
        for who in ("nginx", "scriptlb"):
            where = tmp_path / who
            where.mkdir()
            if who == "nginx":
                # (scriptlb has one error log, its main one; nginx's http level may have its own)
                http = block.format(dir=where, listen=f"127.0.0.1:{port}", peer=bk[0].addr,
                                    error_log=f"error_log {where}/info.log info;")
                running: Any = nginx_running(where, http)
            else:
                http = block.format(dir=where, listen="{port0}", peer=bk[0].addr, error_log="")
                running = Scriptlb(f"daemon off; master_process off; error_log {where}/info.log info;\n"
                                   f"http {{ {http} }}", where)
            with running as lb:
                at = port if who == "nginx" else lb.port
                bodies = [half_close(at, path, after_head) for path, after_head in cases]
                logged = sorted(read_log_lines(where / "half.log", len(cases)))
            info = (where / "info.log").read_text()
            lines = sorted(re.sub(r".*\*\d+ ", "", line) for line in info.splitlines()
                           if "prematurely closed" in line)
            results[who] = bodies, logged, [line.replace(f":{at}", ":PORT") for line in lines]
    assert results["scriptlb"] == results["nginx"]
    bodies, logged, lines = results["nginx"]
    assert bodies == [b"", b"firstend", b"first"]
    assert logged == ['200 5 "200" /off/head', '200 8 "200" /on/head', '499 0 "-" /on/slow']
    assert len(lines) == 2 and lines[0].startswith("epoll_wait() reported that client prematurely closed "
                                                   "connection, so upstream connection is closed too while "
                                                   "sending request to upstream, client: 127.0.0.1")


def test_upstream_byte_counts_are_logged_as_nginx(tmp_path: Path) -> None:
    """$upstream_response_length (the body), $upstream_bytes_received (head and body) and
    $upstream_bytes_sent (the request as sent) per try, one entry per try."""
    port, dead = free_ports(2)
    requests = [b"GET /p HTTP/1.1\r\nHost: t\r\nX-A: bc\r\nConnection: close\r\n\r\n",
                b"GET /two HTTP/1.0\r\nHost: t\r\n\r\n"]
    with Backends(respond(body=b"hello world", headers={"X-Up": "1"})) as bk:
        block = """
            log_format bytes '$upstream_response_length|$upstream_bytes_received|'
                             '$upstream_bytes_sent|$upstream_addr';
            upstream two {{ server 127.0.0.1:{dead}; server {peer}; }}
            server {{
                listen {listen};
                access_log {log} bytes;
                location /p {{ proxy_pass http://{peer}; }}
                location /two {{ proxy_pass http://two; }}
            }}
        """
        ngx_dir, lb_dir = tmp_path / "nginx", tmp_path / "scriptlb"
        ngx_dir.mkdir()
        lb_dir.mkdir()
        with nginx_running(ngx_dir, block.format(listen=f"127.0.0.1:{port}", peer=bk[0].addr, dead=dead,
                                                 log=f"{ngx_dir}/bytes.log")):
            for request in requests:
                raw_exchange(port, request)
            theirs = read_log_lines(ngx_dir / "bytes.log", len(requests))
        lb_block = block.format(listen="{port0}", peer=bk[0].addr, dead=dead, log=f"{lb_dir}/bytes.log")
        with Scriptlb(f"daemon off; master_process off; error_log {lb_dir}/error.log info;\n"
                      f"http {{ {lb_block} }}", lb_dir) as lb:
            for request in requests:
                raw_exchange(lb.port, request)
            ours = read_log_lines(lb_dir / "bytes.log", len(requests))
    assert ours == theirs
    assert ours[0].startswith("11|")
    assert ours[1].startswith("0, 11|0, ")
