"""WebSocket (and other upgrades) through the proxy: a real ``websockets`` client and server,
nginx's recipe, the tunnel's timeouts and back-pressure, and the same config on nginx."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import pytest
from helpers import BackendRequest, Backends, Scriptlb, raw_exchange, read_log_lines, respond, wait_until
from test_round_robin import NGINX, free_ports, nginx_running
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed, InvalidStatus

MIB = 1 << 20

RECIPE = """
    map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
    log_format ws '$status $upstream_status $upstream_addr $body_bytes_sent';
    server {{
        listen {listen};
        access_log {log} ws;
        location / {{
            proxy_pass http://{backend};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_read_timeout {read_timeout};
        }}
        location /plain {{ proxy_pass http://{backend}; proxy_http_version 1.1; }}
    }}
"""


@contextmanager
def serving(start: Callable[[], Awaitable[Any]]) -> Iterator[str]:
    """A server started by ``start()`` on its own loop in a thread; yields "127.0.0.1:PORT"."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    async def started() -> Any:
        return await start()  # (called inside the loop: servers want a running loop)

    server = asyncio.run_coroutine_threadsafe(started(), loop).result(10)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"127.0.0.1:{port}"
    finally:
        async def stop() -> None:
            server.close()  # (websockets closes in a task of its own: wait for it first)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 5)
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def websocket_server(ssl_context: Any = None) -> AbstractContextManager[str]:
    """A real WebSocket echo server (over TLS with ``ssl_context``)."""

    async def echo(ws) -> None:  # type: ignore[no-untyped-def]
        try:
            async for message in ws:
                await ws.send(message)
        except ConnectionClosed:
            pass

    return serving(lambda: serve(echo, "127.0.0.1", 0, max_size=4 * MIB, ping_interval=None, ssl=ssl_context))


async def _echo_round_trip(port: int, payload: bytes) -> bytes:
    async with connect(f"ws://127.0.0.1:{port}/chat", max_size=4 * MIB, ping_interval=None,
                       open_timeout=10) as ws:
        await ws.send(payload)
        reply = await asyncio.wait_for(ws.recv(), 10)
        await ws.send("second")
        assert await asyncio.wait_for(ws.recv(), 10) == "second"
        return reply  # type: ignore[return-value]


def _run_echo(port: int) -> None:
    payload = os.urandom(MIB)  # (random: permessage-deflate cannot shrink it)
    assert asyncio.run(_echo_round_trip(port, payload)) == payload


def _recipe(listen: str, log: Path, backend: str, read_timeout: str = "60s") -> str:
    return RECIPE.format(listen=listen, log=log, backend=backend, read_timeout=read_timeout)


def _lb(tmp_path: Path, backend: str, read_timeout: str = "60s") -> Scriptlb:
    conf = _recipe("{port0}", tmp_path / "ws.log", backend, read_timeout)
    text = f"daemon off; master_process off; error_log {tmp_path}/error.log info;\nhttp {{ {conf} }}"
    return Scriptlb(text, tmp_path)


def test_a_1mib_websocket_message_through_the_recipe_as_nginx(tmp_path: Path) -> None:
    with websocket_server() as backend, _lb(tmp_path, backend) as lb:
        _run_echo(lb.port)
        (line,) = read_log_lines(tmp_path / "ws.log", 1)
    status, upstream_status, addr, body_bytes = line.split(" ")
    assert (status, upstream_status, addr) == ("101", "101", backend)
    assert int(body_bytes) > MIB  # the tunnel's bytes to the client are counted
    if NGINX is None:
        pytest.skip("nginx is not installed: checked scriptlb only")
    (port,) = free_ports(1)
    ngx = tmp_path / "nginx"
    ngx.mkdir()
    with websocket_server() as backend:
        block = _recipe(f"127.0.0.1:{port}", ngx / "ws.log", backend)
        with nginx_running(ngx, block, [port]):
            _run_echo(port)
            (their_line,) = read_log_lines(ngx / "ws.log", 1)
    assert their_line.split(" ")[:2] == ["101", "101"]


def test_an_idle_tunnel_is_closed_at_proxy_read_timeout(tmp_path: Path) -> None:
    async def idle(port: int) -> float:
        async with connect(f"ws://127.0.0.1:{port}/", ping_interval=None, open_timeout=10) as ws:
            started = time.monotonic()
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 20)
            return time.monotonic() - started

    with websocket_server() as backend, _lb(tmp_path, backend, read_timeout="1s") as lb:
        waited = asyncio.run(idle(lb.port))
        assert wait_until(lambda: "while proxying upgraded connection" in _text(tmp_path / "error.log"))
        (line,) = read_log_lines(tmp_path / "ws.log", 1)
    assert waited >= 0.9  # (no upper bound: the machine is shared; wait_for caps it at 20 s)
    assert "upstream timed out (110: Connection timed out) while proxying upgraded connection" in _text(
        tmp_path / "error.log")
    assert line.startswith("101 101 ")


def _text(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def test_upgrade_without_the_recipe_is_proxied_as_a_plain_request_as_nginx(tmp_path: Path) -> None:
    """Upgrade and Connection are hop-by-hop: without the recipe the peer sees a plain GET and
    the websockets server refuses it (426); the client's handshake fails the same way."""

    async def attempt(port: int) -> int:
        with pytest.raises(InvalidStatus) as info:
            async with connect(f"ws://127.0.0.1:{port}/plain", open_timeout=10):
                pass
        return info.value.response.status_code

    with websocket_server() as backend, _lb(tmp_path, backend) as lb:
        ours = asyncio.run(attempt(lb.port))
    assert ours == 426
    if NGINX is None:
        return
    (port,) = free_ports(1)
    ngx = tmp_path / "nginx"
    ngx.mkdir()
    with websocket_server() as backend:
        block = _recipe(f"127.0.0.1:{port}", ngx / "ws.log", backend)
        with nginx_running(ngx, block, [port]):
            assert asyncio.run(attempt(port)) == ours


def test_a_101_the_client_did_not_ask_for_is_a_502(tmp_path: Path) -> None:
    async def switch(req: BackendRequest, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\nraw")
        await writer.drain()
        return False

    with Backends(switch) as bk, _lb(tmp_path, bk[0].addr) as lb:
        response = raw_exchange(lb.port, b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    assert response.startswith(b"HTTP/1.1 502 ")
    assert "upstream sent invalid header" in _text(tmp_path / "error.log")


def test_a_slow_reader_stops_the_tunnel_reading_the_peer(tmp_path: Path) -> None:
    """Back-pressure: a client that reads nothing makes the proxy stop reading the peer, so
    the peer can hand the kernel no more than the sockets' buffers hold (the proxy's own
    buffers stay at the transport's high-water mark)."""
    total = 256 * MIB
    drained: list[int] = [0]
    chunk = b"x" * MIB

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: raw\r\nConnection: upgrade\r\n\r\n")
        try:
            while drained[0] < total:
                writer.write(chunk)
                await writer.drain()
                drained[0] += len(chunk)
        finally:
            writer.close()

    flooding = serving(lambda: asyncio.start_server(flood, "127.0.0.1", 0))
    with flooding as backend, _lb(tmp_path, backend) as lb:
        client = socket.create_connection(("127.0.0.1", lb.port), timeout=10)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        try:
            client.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nUpgrade: raw\r\nConnection: Upgrade\r\n\r\n")
            assert client.recv(12) == b"HTTP/1.1 101"
            # wait until the flood stalls (the sockets' buffers are full), then some more
            last = -1
            for _ in range(50):
                time.sleep(0.1)
                if drained[0] == last:
                    break
                last = drained[0]
            time.sleep(0.3)
            stalled_at = drained[0]
            assert stalled_at < 64 * MIB, stalled_at
            # reading again makes it flow again (the tunnel resumed reading the peer)
            got = 0
            while got < stalled_at + 8 * MIB:
                data = client.recv(MIB)
                assert data
                got += len(data)
            assert drained[0] > stalled_at
        finally:
            client.close()


def test_bytes_after_an_upgrade_head_go_where_the_answer_says(tmp_path: Path) -> None:
    """What the client sent after its Upgrade head (same packet) is the new protocol's when
    the peer switches, and the next request when it does not."""

    async def switch_and_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: raw\r\nConnection: upgrade\r\n\r\n")
        writer.write(await reader.readexactly(5))
        await writer.drain()
        writer.close()

    upgrade = b"GET / HTTP/1.1\r\nHost: t\r\nUpgrade: raw\r\nConnection: Upgrade\r\n\r\n"
    with serving(lambda: asyncio.start_server(switch_and_echo, "127.0.0.1", 0)) as backend, \
            _lb(tmp_path, backend) as lb:
        response = raw_exchange(lb.port, upgrade + b"hello")
    assert response.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert b"\r\nConnection: upgrade\r\n" in response and b"\r\nUpgrade: raw\r\n" in response
    assert response.endswith(b"\r\n\r\nhello")

    refused = upgrade.replace(b"GET / ", b"GET /plain ")
    with Backends(respond(200, b"plain")) as bk, _lb(tmp_path, bk[0].addr) as lb:
        last = b"GET /plain HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
        response = raw_exchange(lb.port, refused + last)
    assert response.count(b"HTTP/1.1 200 ") == 2


def test_wss_through_tls_termination(tmp_path: Path) -> None:
    """The tunnel on a TLS client connection (the TLS transport is handed over like a plain one)."""
    import ssl

    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("ws.test")
    cert.cert_chain_pems[0].write_to_path(tmp_path / "ws.crt")
    cert.private_key_pem.write_to_path(tmp_path / "ws.key")
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)

    async def round_trip(port: int) -> bytes:
        async with connect(f"wss://127.0.0.1:{port}/", ssl=client_ctx, server_hostname="ws.test",
                           ping_interval=None, open_timeout=10, max_size=4 * MIB) as ws:
            payload = os.urandom(256 * 1024)
            await ws.send(payload)
            reply = await asyncio.wait_for(ws.recv(), 10)
            return reply == payload  # type: ignore[return-value]

    with websocket_server() as backend:
        conf = _recipe("{port0} ssl", tmp_path / "ws.log", backend).replace(
            "access_log", f"ssl_certificate {tmp_path}/ws.crt; ssl_certificate_key {tmp_path}/ws.key;\n"
                          "        access_log", 1)
        main = f"daemon off; master_process off; error_log {tmp_path}/error.log info;\n"
        with Scriptlb(main + f"http {{ {conf} }}", tmp_path) as lb:
            assert asyncio.run(round_trip(lb.port)) is True
            (line,) = read_log_lines(tmp_path / "ws.log", 1)
    assert line.startswith("101 101 ")


def test_a_1mib_message_through_a_tls_peer(tmp_path: Path) -> None:
    """proxy_pass https:// with the recipe: the tunnel runs on the peer's TLS transport."""
    import ssl

    import trustme

    ca = trustme.CA()
    peer_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("peer.test").configure_cert(peer_ctx)
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem.bytes())
    with websocket_server(peer_ctx) as backend:
        conf = _recipe("{port0}", tmp_path / "ws.log", backend).replace(
            f"proxy_pass http://{backend}", f"proxy_pass https://{backend}; proxy_ssl_verify on; "
            f"proxy_ssl_name peer.test; proxy_ssl_trusted_certificate {tmp_path}/ca.pem", 1)
        assert "https://" in conf
        main = f"daemon off; master_process off; error_log {tmp_path}/error.log info;\n"
        with Scriptlb(main + f"http {{ {conf} }}", tmp_path) as lb:
            _run_echo(lb.port)
            (line,) = read_log_lines(tmp_path / "ws.log", 1)
    assert line.startswith("101 101 ")
