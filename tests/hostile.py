"""Helpers of the hostile-client tests: a proxy (scriptlb or nginx) as a real single process on
127.0.0.1 whose memory can be read from /proc, and a threaded backend that records what it
received (head as sent, body length and digest) and answers with the head it got."""

from __future__ import annotations

import contextlib
import hashlib
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from helpers import free_ports
from nginx_oracle import NGINX

MIB = 1 << 20


def rss_kib(pid: int) -> int:
    """The process's resident memory now (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def cpu_seconds(pid: int) -> float:
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Received:
    head: bytes
    body_length: int
    body_sha256: str


@dataclass
class RecordingBackend:
    """Reads each request (Content-Length or chunked bodies), records it, answers 200 with
    the request head it received as the body. ``close_first`` connections are closed after
    reading the request, without an answer (a peer that fails after the body was sent)."""

    close_first: int = 0
    requests: list[Received] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> RecordingBackend:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._thread.join(5)

    def count(self) -> int:
        with self.lock:
            return len(self.requests)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        buffer = b""
        with conn, contextlib.suppress(OSError, ValueError):
            while True:
                while b"\r\n\r\n" not in buffer:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buffer += chunk
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                digest = hashlib.sha256()
                length, buffer = self._read_body(conn, head, buffer, digest)
                with self.lock:
                    self.requests.append(Received(head, length, digest.hexdigest()))
                    close = self.close_first > 0
                    self.close_first -= close
                if close:
                    return
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(head), head))

    @staticmethod
    def _read_body(conn: socket.socket, head: bytes, buffer: bytes, digest) -> tuple[int, bytes]:  # type: ignore[no-untyped-def]
        lines = head.lower().split(b"\r\n")[1:]
        fields = dict(line.split(b":", 1) for line in lines if b":" in line)
        if b"chunked" in fields.get(b"transfer-encoding", b""):
            return _read_chunked(conn, buffer, digest)
        length = int(fields.get(b"content-length", b"0"))
        got = 0
        while got < length:
            if not buffer:
                buffer = conn.recv(1 << 20)
                if not buffer:
                    raise ValueError("body cut")
            take = buffer[:length - got]
            digest.update(take)
            got += len(take)
            buffer = buffer[len(take):]
        return length, buffer


def _read_chunked(conn: socket.socket, buffer: bytes, digest) -> tuple[int, bytes]:  # type: ignore[no-untyped-def]
    total = 0
    while True:
        while b"\r\n" not in buffer:
            buffer += conn.recv(65536)
        line, _, buffer = buffer.partition(b"\r\n")
        size = int(line.split(b";")[0], 16)
        while len(buffer) < size + 2:
            more = conn.recv(1 << 20)
            if not more:
                raise ValueError("body cut")
            buffer += more
        if size == 0:
            while not buffer.startswith(b"\r\n") and b"\r\n\r\n" not in buffer:
                buffer += conn.recv(65536)
            end = 2 if buffer.startswith(b"\r\n") else buffer.index(b"\r\n\r\n") + 4
            return total, buffer[end:]
        digest.update(buffer[:size])
        total += size
        buffer = buffer[size + 2:]


@dataclass
class Proxy:
    kind: str
    pid: int
    port: int
    prefix: Path
    stopped_by_test: bool = False  # the test ended the process itself

    @property
    def error_log(self) -> str:
        path = self.prefix / "error.log"
        return path.read_text() if path.exists() else ""

    @property
    def stderr(self) -> str:
        """What the process wrote to its stderr (uncaught exceptions land there)."""
        return (self.prefix / "stderr.log").read_text(errors="replace")


NGINX_ONLY = """
    client_body_temp_path {prefix}/client_body_temp;
    proxy_temp_path {prefix}/proxy_temp; fastcgi_temp_path {prefix}/fcgi;
    uwsgi_temp_path {prefix}/uwsgi; scgi_temp_path {prefix}/scgi;
"""


@contextlib.contextmanager
def proxy_process(kind: str, prefix: Path, http_block: str, worker_connections: int = 128,
                  level: str = "info") -> Iterator[Proxy]:
    """``kind`` ("scriptlb" or "nginx") serving ``http_block`` (``{port}`` is its listening
    port, ``{prefix}`` its directory) as one process; stopped at the end."""
    prefix.mkdir(parents=True, exist_ok=True)
    (prefix / "logs").mkdir(exist_ok=True)
    port = free_ports(1)[0]
    extra = NGINX_ONLY.format(prefix=prefix) if kind == "nginx" else ""
    block = http_block.replace("{port}", str(port)).replace("{prefix}", str(prefix))
    conf = prefix / "proxy.conf"
    conf.write_text(
        f"daemon off; master_process off; worker_processes 1; pid {prefix}/proxy.pid;\n"
        f"error_log {prefix}/error.log {level};\n"
        f"events {{ worker_connections {worker_connections}; }}\n"
        f"http {{ access_log off; {extra} {block} }}\n"
    )
    if kind == "nginx":
        assert NGINX is not None
        cmd = [NGINX, "-p", f"{prefix}/", "-c", str(conf)]
    else:
        cmd = [sys.executable, "-m", "scriptlb", "-p", str(prefix), "-c", str(conf)]
    stderr = (prefix / "stderr.log").open("wb")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{kind} did not start: {(prefix / 'stderr.log').read_text()}")
                time.sleep(0.05)
        proxy = Proxy(kind, proc.pid, port, prefix)
        yield proxy
        assert proxy.stopped_by_test or proc.poll() is None, f"{kind} died"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        stderr.close()


def exchange(port: int, data: bytes, timeout: float = 10.0, half_close: bool = False) -> tuple[bytes, str]:
    """Send ``data`` and read until the server closes: (bytes received, how it ended:
    "eof", "reset" or "timeout")."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        with contextlib.suppress(OSError):
            sock.sendall(data)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        received = []
        end = time.monotonic() + timeout
        while True:
            sock.settimeout(max(end - time.monotonic(), 0.01))
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                return b"".join(received), "reset"
            except TimeoutError:
                return b"".join(received), "timeout"
            if not chunk:
                return b"".join(received), "eof"
            received.append(chunk)


def status_lines(data: bytes) -> list[bytes]:
    """The status lines of the responses in ``data`` (bodies here never hold one)."""
    return re.findall(rb"HTTP/1\.1 \d{3}[^\r]*", data)


def get_ok(port: int, timeout: float = 5.0) -> float:
    """One GET on a fresh connection; its latency in seconds (fails unless it is a 200)."""
    started = time.monotonic()
    data, _ = exchange(port, b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n", timeout)
    assert data.startswith(b"HTTP/1.1 200"), data[:100]
    return time.monotonic() - started
