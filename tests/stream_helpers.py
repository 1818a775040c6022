"""TCP peers and clients for the stream tests: real sockets on 127.0.0.1, threads, bounded."""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Self

from helpers import free_ports
from nginx_oracle import NGINX, main_conf, nginx_process

IO_TIMEOUT = 10.0
NGINX_STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"
HAS_NGINX_STREAM = NGINX is not None and os.path.exists(NGINX_STREAM_MODULE)

Handler = Callable[[socket.socket], None]


def echo(conn: socket.socket) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)


def banner(text: bytes) -> Handler:
    """Says ``text`` at once, then echoes."""

    def handle(conn: socket.socket) -> None:
        conn.sendall(text)
        echo(conn)

    return handle


def close_at_once(conn: socket.socket) -> None:
    return None


def never_read(conn: socket.socket) -> None:
    """Accepts and reads nothing: the proxy's writes to it must stop at its buffers."""
    time.sleep(IO_TIMEOUT)


class _ThreadPeer:
    """A server socket bound on 127.0.0.1 (OS-chosen port) served by a thread: ``_serve_one``
    handles one arrival; the loop wakes every 0.1 s to see whether the test has ended."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.addr = f"127.0.0.1:{self.port}"
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        self.sock.settimeout(0.1)
        while not self._stop:
            try:
                self._serve_one()
            except (TimeoutError, OSError):
                continue

    def _serve_one(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()


class TcpPeer(_ThreadPeer):
    """A TCP server in a thread running ``handler`` per connection (closed after it)."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.accepted = 0
        super().__init__(socket.socket())
        self.sock.listen(64)

    def _serve_one(self) -> None:
        conn, _ = self.sock.accept()
        self.accepted += 1
        threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(IO_TIMEOUT)
        with contextlib.suppress(OSError), conn:
            self.handler(conn)


class TlsPeer(TcpPeer):
    """A TLS server: completes the handshake with its own certificate, then says its name."""

    def __init__(self, context: ssl.SSLContext, name: str) -> None:
        self.context = context
        self.name = name
        super().__init__(self._tls)

    def _tls(self, conn: socket.socket) -> None:
        with self.context.wrap_socket(conn, server_side=True) as tls:
            tls.sendall(self.name.encode() + b"\n")
            tls.recv(100)


def round_trip(port: int, data: bytes, timeout: float = IO_TIMEOUT) -> bytes:
    """Send ``data`` while reading what comes back, until as many bytes came back (or EOF)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        sender = threading.Thread(target=conn.sendall, args=(data,), daemon=True)
        sender.start()
        got = bytearray()
        while len(got) < len(data):
            chunk = conn.recv(262144)
            if not chunk:
                break
            got += chunk
        sender.join(timeout)
        return bytes(got)


def banner_from(port: int, source: str) -> bytes:
    """The first byte a connection from ``source`` (any 127/8 address) gets: which banner peer
    the balancer chose for that client address."""
    with socket.create_connection(("127.0.0.1", port), IO_TIMEOUT, (source, 0)) as conn:
        return conn.recv(1)


def read_until_closed(conn: socket.socket, limit: int = 1 << 20) -> bytes:
    got = bytearray()
    while len(got) < limit:
        try:
            chunk = conn.recv(65536)
        except OSError:
            break
        if not chunk:
            break
        got += chunk
    return bytes(got)


@contextlib.contextmanager
def nginx_stream(tmp_path: Path, stream_block: str) -> Iterator[Path]:
    """A real nginx (one process) with its stream module serving ``stream_block``. Ready once
    its pid file exists (written after the listening sockets are bound): no probe connection
    that would show up in its logs."""
    conf = main_conf(tmp_path, f"stream {{ {stream_block} }}", head=f"load_module {NGINX_STREAM_MODULE};",
                     error_level="info")
    with nginx_process(tmp_path, conf) as prefix:
        yield prefix


class UdpPeer(_ThreadPeer):
    """A UDP server in a thread: ``reply(datagram, client_address)`` gives the datagrams sent
    back (None: an echo). ``received`` counts what came in."""

    def __init__(self, reply: Callable[[bytes, tuple[str, int]], list[bytes]] | None = None) -> None:
        self.reply = reply or (lambda data, addr: [data])
        self.received = 0
        super().__init__(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))

    def _serve_one(self) -> None:
        data, addr = self.sock.recvfrom(65536)
        self.received += 1
        for answer in self.reply(data, addr):
            with contextlib.suppress(OSError):
                self.sock.sendto(answer, addr)


def free_udp_ports(count: int) -> list[int]:
    """UDP ports free right now (bound, read, closed), for a process that binds them itself."""
    return free_ports(count, socket.SOCK_DGRAM)


def udp_client(timeout: float = IO_TIMEOUT) -> socket.socket:
    """A client socket with its own source port (one datagram session per port)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(timeout)
    return sock


def udp_ask(sock: socket.socket, port: int, data: bytes, answers: int = 1) -> list[bytes]:
    """Send one datagram to ``port``, read ``answers`` datagrams back (fewer on a timeout)."""
    sock.sendto(data, ("127.0.0.1", port))
    got = []
    for _ in range(answers):
        try:
            got.append(sock.recv(65536))
        except TimeoutError:
            break
    return got
