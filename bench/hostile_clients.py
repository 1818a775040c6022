"""Hostile clients against one scriptlb process: what each costs the worker and everybody else.

    .venv/bin/python bench/hostile_clients.py [--case long-line,idle-flood,uploads] [--nginx]

Cases (figures: the worker's RSS before/peak/after from /proc, its CPU seconds, and the latency
of a well-behaved client polling ``GET /`` meanwhile):

- ``long-line``: connections each sending ``X-Big: `` and then megabytes without a line end;
- ``idle-flood``: three times ``worker_connections`` silent connections, then fresh clients;
- ``uploads``: one large upload, then several uploads stalled midway, to a proxied location.

A single process (``master_process off``) on 127.0.0.1, OS-chosen ports, bounded loops.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from bench_proc import cpu_seconds, free_ports, status_kib

ROOT = Path(__file__).resolve().parent.parent
MIB = 1 << 20


class Sink(threading.Thread):
    """A backend that reads each request whole (discarding the body) and answers 200."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]

    def run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    @staticmethod
    def _serve(conn: socket.socket) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            head, _, rest = data.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            got = len(rest)
            while got < length:
                chunk = conn.recv(1 << 20)
                if not chunk:
                    return
                got += len(chunk)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")


CONF = """
daemon off; master_process off; worker_processes 1;
error_log {dir}/error.log warn; pid {dir}/lb.pid;
events {{ worker_connections {wc}; }}
http {{
    access_log off;
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 0;
        location /up {{ proxy_pass http://127.0.0.1:{sink}; }}
        location / {{ return 200 ok; }}
    }}
}}
"""


@contextlib.contextmanager
def proxy(nginx: bool, wc: int, sink: int) -> Iterator[tuple[int, int]]:
    work = Path(tempfile.mkdtemp(prefix="hostile-"))
    port = free_ports(1)[0]
    (work / "logs").mkdir()
    conf = work / "lb.conf"
    conf.write_text(CONF.format(dir=work, wc=wc, port=port, sink=sink))
    if nginx:
        cmd = ["nginx", "-p", str(work), "-c", str(conf)]
    else:
        cmd = [sys.executable, "-m", "scriptlb", "-p", str(work), "-c", str(conf)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            time.sleep(0.05)
        yield proc.pid, port
    finally:
        proc.terminate()
        proc.wait(15)
        shutil.rmtree(work, ignore_errors=True)


class Poller(threading.Thread):
    """A well-behaved client: a GET on a fresh connection every 20 ms; keeps the latencies."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.latencies: list[float] = []
        self.failures = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
                    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    while sock.recv(4096):
                        pass
                self.latencies.append(time.monotonic() - started)
            except OSError:
                self.failures += 1
            self.stop.wait(0.02)

    def summary(self) -> str:
        lat = sorted(self.latencies) or [0.0]
        return (f"other client: {len(self.latencies)} ok, {self.failures} failed, "
                f"p50 {lat[len(lat) // 2] * 1000:.1f} ms, max {lat[-1] * 1000:.1f} ms")


class Sampler(threading.Thread):
    """The worker's peak RSS while a case runs."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            with contextlib.suppress(OSError):
                self.peak = max(self.peak, status_kib(self.pid, "VmRSS"))
            self.stop.wait(0.01)


def measured(pid: int, port: int, name: str, action) -> None:  # type: ignore[no-untyped-def]
    time.sleep(0.3)
    before, cpu = status_kib(pid, "VmRSS"), cpu_seconds(pid)
    poller, sampler = Poller(port), Sampler(pid)
    poller.start()
    sampler.start()
    started = time.monotonic()
    detail = action()
    elapsed = time.monotonic() - started
    time.sleep(0.5)
    poller.stop.set()
    sampler.stop.set()
    poller.join()
    sampler.join()
    after = status_kib(pid, "VmRSS")
    print(f"{name}: {detail}; {elapsed:.1f} s; RSS {before / 1024:.1f} -> peak {sampler.peak / 1024:.1f} "
          f"-> {after / 1024:.1f} MB; CPU {cpu_seconds(pid) - cpu:.2f} s; {poller.summary()}", flush=True)


def long_line(port: int, connections: int, size: int) -> str:
    socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(connections)]
    block = b"b" * 65536
    answered = 0
    for sock in socks:
        sock.sendall(b"GET /a HTTP/1.1\r\nHost: x\r\nX-Big: ")
    sent = 0
    try:
        while sent < size:
            for sock in socks:
                sock.sendall(block)
            sent += len(block)
    except OSError:
        pass  # the server answered and closed: the point
    for sock in socks:
        with contextlib.suppress(OSError):
            sock.settimeout(2)
            if sock.recv(100).startswith(b"HTTP/1.1 4"):
                answered += 1
        sock.close()
    return (f"{connections} x {size // MIB} MiB header line, {sent // MIB} MiB sent each, "
            f"{answered} answered 4xx")


def idle_flood(port: int, count: int, clients: int) -> str:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    idle = []
    for _ in range(count):
        with contextlib.suppress(OSError):
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=5))
    time.sleep(0.5)
    served = 0
    for _ in range(clients):
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=3) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            if sock.recv(100).startswith(b"HTTP/1.1 200"):
                served += 1
    for sock in idle:
        sock.close()
    return f"{len(idle)} silent connections, then {served}/{clients} fresh clients served"


def uploads(port: int, size: int, stalled: int, stalled_size: int) -> str:
    head = b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
    block = b"u" * MIB
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head % size)
        for _ in range(size // MIB):
            sock.sendall(block)
        status = sock.recv(100)[:12]
    socks = []
    for _ in range(stalled):
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        sock.sendall(head % (stalled_size * 2))
        for _ in range(stalled_size // MIB):
            sock.sendall(block)
        socks.append(sock)
    time.sleep(1.0)
    for sock in socks:
        sock.close()
    return (f"one {size // MIB} MiB upload ({status.decode()}), {stalled} uploads stalled "
            f"at {stalled_size // MIB} MiB")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", default="long-line,idle-flood,uploads")
    parser.add_argument("--nginx", action="store_true", help="measure nginx instead")
    args = parser.parse_args()
    cases = args.case.split(",")
    sink = Sink()
    sink.start()
    who = "nginx" if args.nginx else "scriptlb"
    if "long-line" in cases:
        with proxy(args.nginx, 1024, sink.port) as (pid, port):
            measured(pid, port, f"{who} long-line", lambda: long_line(port, 1, 64 * MIB))
            measured(pid, port, f"{who} long-line", lambda: long_line(port, 8, 16 * MIB))
    if "idle-flood" in cases:
        with proxy(args.nginx, 1024, sink.port) as (pid, port):
            measured(pid, port, f"{who} idle-flood", lambda: idle_flood(port, 3000, 8))
    if "uploads" in cases:
        with proxy(args.nginx, 1024, sink.port) as (pid, port):
            measured(pid, port, f"{who} uploads", lambda: uploads(port, 50 * MIB, 8, 20 * MIB))


if __name__ == "__main__":
    main()
