"""Real Redis and etcd servers for the cluster tests, on OS-chosen loopback ports.

Installed by scripts/install-test-tools (Debian's redis-server and etcd-server); a test that
needs a missing one is skipped with the reason. Every server is started and stopped by PID.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest
from helpers import free_ports, wait_for


def require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (scripts/install-test-tools installs it)")
    return path


def _port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


class _ServerProcess:
    """A server process a test started: stopped (TERM, then KILL) or crashed (KILL) by PID."""

    proc: subprocess.Popen[bytes] | None

    def kill(self) -> None:
        """SIGKILL: a crash, not a shutdown."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
            self.proc = None


class RedisServer(_ServerProcess):
    """``redis-server`` without persistence (a restart loses everything: the worst case)."""

    def __init__(self, directory: Path, *extra: str) -> None:
        self.binary = require("redis-server")
        self.extra = list(extra)  # more redis-server options, e.g. --requirepass
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = free_ports(1)[0]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.directory),
             "--logfile", str(self.directory / "redis.log"), *self.extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: _port_open(self.port), 10, "redis-server to listen")
        return self

    def client(self):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class EtcdServer(_ServerProcess):
    """A one-member ``etcd`` with its data directory under the test's; a restart keeps the data
    (and so the revisions a watch resumes from)."""

    def __init__(self, directory: Path) -> None:
        self.binary = require("etcd")
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port, self.peer_port = free_ports(2)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> EtcdServer:
        peer = f"http://127.0.0.1:{self.peer_port}"
        with open(self.directory / "etcd.log", "ab") as log:
            self.proc = subprocess.Popen(
                [self.binary, "--name", "test", "--data-dir", str(self.directory / "data"),
                 "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
                 "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                 "--initial-cluster", f"test={peer}"],
                stdout=subprocess.DEVNULL, stderr=log)
        wait_for(lambda: self._ready(), 20, "etcd to serve")
        return self

    def _ready(self) -> bool:
        try:
            self.put("/health-probe", "")
            return True
        except OSError:
            return False

    def _call(self, path: str, body: dict) -> dict:
        import http.client
        import json

        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
            response = conn.getresponse()
            data = json.loads(response.read() or b"{}")
            if response.status != 200:
                raise OSError(f"etcd {path}: {response.status} {data}")
            return data
        finally:
            conn.close()

    def put(self, key: str, value: str) -> None:
        import base64

        self._call("/v3/kv/put", {"key": base64.b64encode(key.encode()).decode(),
                                  "value": base64.b64encode(value.encode()).decode()})

    def delete(self, key: str) -> None:
        import base64

        self._call("/v3/kv/deleterange", {"key": base64.b64encode(key.encode()).decode()})

    def __enter__(self) -> EtcdServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class DnsServer:
    """A small authoritative DNS server (dnslib) on a loopback UDP port; ``records`` maps
    (name, type) to [(rdata text, ttl)] and may change while it runs; ``fail`` makes it answer
    SERVFAIL (a broken resolver)."""

    def __init__(self) -> None:
        import dnslib.server

        self.records: dict[tuple[str, str], list[tuple[str, int]]] = {}
        self.fail = False
        self.queries = 0
        self.port = free_ports(1, socket.SOCK_DGRAM)[0]
        self._server = dnslib.server.DNSServer(self, port=self.port, address="127.0.0.1",
                                               logger=dnslib.server.DNSLogger("-request,-reply,-truncated"
                                                                              ",-recv,-send,-data,-error"))

    def resolve(self, request, handler):
        import dnslib

        self.queries += 1
        reply = request.reply()
        if self.fail:
            reply.header.rcode = dnslib.RCODE.SERVFAIL
            return reply
        name = str(request.q.qname).rstrip(".")
        qtype = dnslib.QTYPE[request.q.qtype]
        answers = self.records.get((name, qtype), [])
        if not answers and not any(n == name for n, _ in self.records):
            reply.header.rcode = dnslib.RCODE.NXDOMAIN
        for rdata, ttl in answers:
            reply.add_answer(*dnslib.RR.fromZone(f"{name}. {ttl} IN {qtype} {rdata}"))
        return reply

    def __enter__(self) -> DnsServer:
        self._server.start_thread()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop()
        self._server.server.server_close()
