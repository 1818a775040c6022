"""Shared test helpers: scriptlb workers from a config string, raw-socket HTTP clients, and tiny
asyncio backends that misbehave on demand.

Everything listens on 127.0.0.1 with OS-chosen ports: a socket is bound to port 0 and kept, its
port is written into the config, and the same socket is handed to the worker, so no port is ever
guessed or raced for. A port another process must bind comes from ``free_ports``, below the
ephemeral range, so no port-0 bind can take it in between. Waits are on readiness (events,
futures) and every loop is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httptools
import pytest

from scriptlb.config import load
from scriptlb.config.model import MainConf
from scriptlb.process.worker import WorkerThread
from scriptlb.request.runtime import Runtime

IO_TIMEOUT = 10.0

# The event loop of worker threads started without saying which: "uvloop" (the product's) or
# "asyncio"; conftest's ``loop_kind`` fixture sets it per test (the protocol tier runs both).
LOOP_KIND = "uvloop"

# For a protocol test that replaces a loop method on the instance (create_connection...): uvloop's
# loop is a C type whose methods cannot be replaced, so such a test runs on asyncio's loop only.
ASYNCIO_LOOP_ONLY = pytest.mark.parametrize("loop_kind", ["asyncio"], indirect=True)


# --------------------------------------------------------------------------- sockets


def listening_socket() -> socket.socket:
    """A TCP socket bound to 127.0.0.1 on an OS-chosen port, already listening."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    sock.setblocking(False)
    return sock


def port_of(sock: socket.socket) -> int:
    return sock.getsockname()[1]


def _ephemeral_port_range() -> tuple[int, int]:
    """The OS's range for port-0 binds and outgoing connections' source ports."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


# Ports for another process are taken from below the ephemeral range: a port the OS hands out for
# port 0 (a test backend, a client's source port) can then never be one that free_ports just
# closed and wrote into a config, which is the race that made a nginx or scriptlb start fail with
# "Address already in use". Each pytest process starts at its own offset and never hands out a
# port twice until it has been round the whole range.
_PORT_FLOOR = 10000
_port_cursor = os.getpid() * 7919
_handed_out: set[int] = set()


def _port_is_free(port: int, kind: socket.SocketKind) -> bool:
    """True if ``port`` on 127.0.0.1 can be bound right now, for TCP and for ``kind``. No
    SO_REUSEADDR: a port with connections still in TIME_WAIT counts as taken."""
    for sock_kind in {socket.SOCK_STREAM, kind}:
        with socket.socket(socket.AF_INET, sock_kind) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def free_ports(count: int, kind: socket.SocketKind = socket.SOCK_STREAM) -> list[int]:
    """Ports free right now (the OS confirms each by a bind), for configs run by a separate
    process, which must bind them itself (``kind``: TCP, or SOCK_DGRAM for UDP as well)."""
    global _port_cursor
    floor, ceiling = _PORT_FLOOR, _ephemeral_port_range()[0]
    span = ceiling - floor
    ports: list[int] = []
    for _ in range(2 * span):
        _port_cursor = (_port_cursor + 1) % span
        if _port_cursor == 0:
            _handed_out.clear()  # been round the whole range: ports from long ago are reusable
        port = floor + _port_cursor
        if port not in _handed_out and _port_is_free(port, kind):
            _handed_out.add(port)
            ports.append(port)
            if len(ports) == count:
                return ports
    raise RuntimeError(f"no {count} free ports between {floor} and {ceiling}")


def wait_for(predicate: Callable[[], object], timeout: float = 15.0, what: str = "condition",
             interval: float = 0.02) -> object:
    """Poll ``predicate`` until it returns something truthy (returned), or fail after ``timeout``
    seconds saying what was awaited: the one readiness wait of the suite (threads, processes,
    files). The timeout is generous because it only costs time when a test is failing anyway."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def run_loop_until(loop: asyncio.AbstractEventLoop, predicate: Callable[[], object],
                   timeout: float = IO_TIMEOUT, what: str = "condition") -> None:
    """Run ``loop`` (not running: a protocol object's loop driven by the test) until ``predicate``
    holds, or fail after ``timeout`` seconds saying what was awaited: ``wait_for`` for timers
    that only fire while the loop runs."""

    async def until() -> None:
        deadline = loop.time() + timeout
        while not predicate():
            if loop.time() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            await asyncio.sleep(0.01)

    loop.run_until_complete(until())


# Sockets behind closed_port(): bound, never listening, held until the test ends.
_RESERVED_PORTS: list[socket.socket] = []


def closed_port() -> int:
    """A port where connect() is refused for the rest of the test.

    The port stays bound (without SO_REUSEADDR, and never listening) until the test ends
    (``release_closed_ports``, called by conftest after every test): a SYN to it gets a RST, and
    the OS cannot hand it to a listener started later in the same test, which would make a
    "dead" peer answer. For a port another process must bind, use ``free_ports``.
    """
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    _RESERVED_PORTS.append(sock)
    return sock.getsockname()[1]


def release_closed_ports() -> None:
    """Close the sockets that reserve the test's ``closed_port()`` ports."""
    while _RESERVED_PORTS:
        _RESERVED_PORTS.pop().close()


# --------------------------------------------------------------------------- real processes


@contextlib.contextmanager
def master_process(prefix: Path, conf_file: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``scriptlb -p prefix -c conf_file`` as a real master (the config says ``daemon off;``),
    stopped gracefully (QUIT) when the block ends, whatever happened in it. Its hooks get
    ``HOOK_BUDGET`` unless the config sets a budget (``with_hook_budget``)."""
    text = conf_file.read_text()
    budgeted = with_hook_budget(text)
    if budgeted != text:
        conf_file.write_text(budgeted)
    proc = subprocess.Popen([sys.executable, "-m", "scriptlb", "-p", str(prefix), "-c", str(conf_file)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGQUIT)
        proc.wait(timeout=15)


def fresh_get(port: int, path: str = "/", timeout: float = IO_TIMEOUT) -> str:
    """The body of a GET over a new connection (with reuseport, new connections are spread
    over the workers)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        return conn.getresponse().read().decode()
    finally:
        conn.close()


def answers(port: int, path: str = "/") -> str | None:
    """``fresh_get``'s body, or None while nothing answers: the readiness probe."""
    try:
        return fresh_get(port, path, timeout=3)
    except OSError:
        return None


# --------------------------------------------------------------------------- scriptlb in a thread


def load_conf(text: str, tmp_path: Path) -> MainConf:
    """Write ``text`` (an nginx-syntax config, dedented) under ``tmp_path`` and load it."""
    conf_file = tmp_path / "scriptlb.conf"
    conf_file.write_text(textwrap.dedent(text))
    return load(str(conf_file), str(tmp_path))


# The hook budget of configs that do not set one. Budgets are wall-clock time, and on a loaded
# machine the product's 10 ms default is exceeded now and then by a run that does nothing
# wrong (a first run building a ring, a run preempted by another process): the test then sees
# a fallback instead of what it checks. A config about budgets sets its own and is left alone.
HOOK_BUDGET = "1s"


def with_hook_budget(text: str) -> str:
    """``text`` with ``HOOK_BUDGET`` for its hooks at http level, and for the stream hooks at
    stream level (stream has its own), unless it sets a budget itself."""
    if "_by_python" not in text or "_by_python_timeout" in text:
        return text
    budget = f" balancer_by_python_timeout {HOOK_BUDGET}; log_by_python_timeout {HOOK_BUDGET};"
    text = re.sub(r"(?m)^(\s*http\s*\{)", lambda m: m.group(1) + budget, text, count=1)
    stream_budget = f" balancer_by_python_timeout {HOOK_BUDGET};"
    return re.sub(r"(?m)^(\s*stream\s*\{)", lambda m: m.group(1) + stream_budget, text, count=1)


class Scriptlb:
    """A scriptlb worker in a thread serving a config string.

    The config names its listening ports ``{port0}``, ``{port1}``...; each is replaced by an
    OS-chosen port whose socket is handed to the worker. ``**values`` replace other ``{name}``
    placeholders (plain text replacement: nginx's own braces stay as they are). Hooks get
    ``HOOK_BUDGET`` unless the config sets a budget (``with_hook_budget``).
    """

    def __init__(self, text: str, tmp_path: Path, listens: int = 1, use_uvloop: bool | None = None,
                 **values: object) -> None:
        if use_uvloop is None:
            use_uvloop = LOOP_KIND == "uvloop"
        self.sockets = [listening_socket() for _ in range(listens)]
        self.ports = [port_of(s) for s in self.sockets]
        values.update({f"port{i}": p for i, p in enumerate(self.ports)})
        for name, value in values.items():
            text = text.replace("{" + name + "}", str(value))
        self.conf = load_conf(with_hook_budget(text), tmp_path)
        by_port = {port_of(s): s for s in self.sockets}
        listeners = {}
        servers = [*(self.conf.http.servers if self.conf.http is not None else ()),
                   *(self.conf.stream.servers if self.conf.stream is not None else ())]
        for server in servers:
            for listen in server.listens:
                listeners[listen.key] = by_port[listen.port]
        self.thread = WorkerThread(self.conf, listeners, use_uvloop=use_uvloop)

    @property
    def port(self) -> int:
        return self.ports[0]

    def runtime(self) -> Runtime:
        """The worker's runtime, for white-box assertions (pool sizes, peer state)."""
        runtime = self.thread.worker.runtime
        assert runtime is not None
        return runtime

    def __enter__(self) -> Scriptlb:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.thread.stop()
        for sock in self.sockets:
            sock.close()


# --------------------------------------------------------------------------- raw HTTP clients


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    complete: bool = True  # False: the connection closed before the body's end

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k.lower() == name), None)


class _ResponseReader:
    """Parses responses from a byte stream with httptools (one parser per response)."""

    def __init__(self, head_only: bool = False) -> None:
        self.head_only = head_only
        self.responses: list[Response] = []
        self._current: Response | None = None
        self._stale_parser = False
        self._parser = httptools.HttpResponseParser(self)

    def on_message_begin(self) -> None:
        self._current = Response(0, [], b"", complete=False)

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self._current is not None
        self._current.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        assert self._current is not None
        self._current.status = self._parser.get_status_code()
        if self.head_only and self._current.status >= 200:
            # httptools cannot be told a HEAD response has no body: end it here, and parse the
            # next response with a fresh parser
            self._current.complete = True
            self.responses.append(self._current)
            self._current = None
            self._stale_parser = True

    def on_body(self, data: bytes) -> None:
        if self._current is not None:
            self._current.body += data

    def on_message_complete(self) -> None:
        if self._current is not None and self._current.status < 200:
            self._current = None  # 1xx interim response
        elif self._current is not None:
            self._current.complete = True
            self.responses.append(self._current)
            self._current = None

    def feed(self, data: bytes) -> None:
        self._parser.feed_data(data)
        if self._stale_parser:
            self._parser = httptools.HttpResponseParser(self)
            self._stale_parser = False

    def eof(self) -> None:
        current = self._current
        if current is not None and current.status and not _has_length(current):
            current.complete = True  # close-delimited body
            self.responses.append(current)
        elif current is not None and current.status:
            self.responses.append(current)  # truncated
        self._current = None


def _has_length(response: Response) -> bool:
    return response.header("content-length") is not None or response.header("transfer-encoding") is not None


class HttpConnection:
    """A blocking client connection: send raw bytes, read whole responses."""

    def __init__(self, port: int, timeout: float = IO_TIMEOUT) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = _ResponseReader()
        self.closed = False

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, method: str = "GET", path: str = "/", headers: dict[str, str] | None = None,
                body: bytes = b"", version: str = "1.1") -> Response:
        self.send(build_request(method, path, headers, body, version))
        self.reader.head_only = method == "HEAD"
        return self.read_response()

    def read_response(self, deadline: float = IO_TIMEOUT) -> Response:
        """The next complete response (or a truncated one if the server closed mid-way)."""
        end = time.monotonic() + deadline
        while not self.reader.responses:
            if self.closed:
                raise ConnectionError("connection closed before a response")
            if time.monotonic() > end:
                raise TimeoutError("no response")
            self._read_some()
        return self.reader.responses.pop(0)

    def _read_some(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            self.closed = True
            self.reader.eof()
            return
        self.reader.feed(data)

    def is_closed_by_peer(self, timeout: float = 5.0) -> bool:
        """True when the server closes the connection within ``timeout`` (extra bytes: False)."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
        return data == b""

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> HttpConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def build_request(method: str = "GET", path: str = "/", headers: dict[str, str] | None = None,
                  body: bytes = b"", version: str = "1.1") -> bytes:
    lines = [f"{method} {path} HTTP/{version}"]
    headers = dict(headers or {})
    if version == "1.1":
        headers.setdefault("Host", "localhost")
    if body and not any(k.lower() in ("content-length", "transfer-encoding") for k in headers):
        headers["Content-Length"] = str(len(body))
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def get(port: int, path: str = "/", headers: dict[str, str] | None = None, method: str = "GET",
        body: bytes = b"") -> Response:
    """One request on a fresh connection."""
    with HttpConnection(port) as conn:
        return conn.request(method, path, headers, body)


def raw_exchange(port: int, data: bytes, timeout: float = IO_TIMEOUT) -> bytes:
    """Send ``data``, half-close, and return everything the server sent until it closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


# --------------------------------------------------------------------------- backends


@dataclass
class BackendRequest:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes
    version: str

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k.lower() == name), None)


# A behaviour answers one request: it writes to the writer and says whether to keep going.
Behaviour = Callable[[BackendRequest, asyncio.StreamWriter], Awaitable[bool]]


def respond(status: int = 200, body: bytes = b"ok", headers: dict[str, str] | None = None,
            close: bool = False) -> Behaviour:
    """A well-behaved HTTP/1.1 answer with Content-Length."""

    async def behaviour(req: BackendRequest, writer: asyncio.StreamWriter) -> bool:
        lines = [f"HTTP/1.1 {status} X", f"Content-Length: {len(body)}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        if close:
            lines.append("Connection: close")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + (b"" if req.method == "HEAD" else body))
        await writer.drain()
        return not close

    return behaviour


def echo() -> Behaviour:
    """Answers with the request it got (method, target, headers, body) as the body."""

    async def behaviour(req: BackendRequest, writer: asyncio.StreamWriter) -> bool:
        text = f"{req.method} {req.target} HTTP/{req.version}\n"
        text += "".join(f"{k}: {v}\n" for k, v in req.headers)
        body = text.encode("latin-1") + b"\n" + req.body
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()
        return True

    return behaviour


def raw(data: bytes, close: bool = True) -> Behaviour:
    """Writes ``data`` verbatim (garbage, truncated bodies...), then closes."""

    async def behaviour(req: BackendRequest, writer: asyncio.StreamWriter) -> bool:
        writer.write(data)
        await writer.drain()
        return not close

    return behaviour


def hang() -> Behaviour:
    """Reads the request and never answers (until the proxy gives up)."""

    async def behaviour(req: BackendRequest, writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(3600)
        return False

    return behaviour


def close_now() -> Behaviour:
    """Closes the connection without answering."""

    async def behaviour(req: BackendRequest, writer: asyncio.StreamWriter) -> bool:
        return False

    return behaviour


@dataclass
class Backend:
    """One backend server; ``behaviour`` may be swapped between requests."""

    behaviour: Behaviour
    sock: socket.socket = field(default_factory=listening_socket)
    connections: int = 0  # connections accepted
    requests: list[BackendRequest] = field(default_factory=list)
    server: asyncio.AbstractServer | None = None
    port: int = 0
    # replaces the request/behaviour loop: reads and writes the raw connection itself
    raw_handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]] | None = None

    def __post_init__(self) -> None:
        self.port = port_of(self.sock)  # kept: still readable after the socket is closed

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self.raw_handler is not None:
            await self.raw_handler(reader, writer)
            return
        try:
            while True:
                req = await read_request(reader)
                if req is None:
                    break
                self.requests.append(req)
                if not await self.behaviour(req, writer):
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass  # the test is over (Backends.__exit__); end quietly
        finally:
            writer.close()


class _RequestCollector:
    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.headers: list[tuple[str, str]] = []
        self.body = b""
        self.done = False
        self.url = b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_body(self, data: bytes) -> None:
        self.body += data

    def on_message_complete(self) -> None:
        self.done = True


async def read_request(reader: asyncio.StreamReader) -> BackendRequest | None:
    """One request from a backend's connection (None at EOF). Not pipelining-safe: tests'
    backends get one request at a time, as the proxy sends them."""
    collector = _RequestCollector()
    while not collector.done:
        data = await reader.read(65536)
        if not data:
            return None
        collector.parser.feed_data(data)
    parser = collector.parser
    return BackendRequest(parser.get_method().decode(), collector.url.decode("latin-1"),
                          collector.headers, collector.body, parser.get_http_version())


class Backends:
    """Backends served by one event loop in a thread (context manager)."""

    def __init__(self, *behaviours: Behaviour) -> None:
        self.backends = [Backend(b) for b in behaviours]
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="backends", daemon=True)

    def __getitem__(self, index: int) -> Backend:
        return self.backends[index]

    def __iter__(self) -> Iterator[Backend]:
        return iter(self.backends)

    def __enter__(self) -> Backends:
        self._thread.start()
        for backend in self.backends:
            self.run(self._start(backend))
        return self

    async def _start(self, backend: Backend) -> None:
        backend.server = await asyncio.start_server(backend.handle, sock=backend.sock)

    def run(self, coro: Awaitable[object], timeout: float = IO_TIMEOUT) -> object:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            # Stop accepting first, and let the connections accepted by now make their
            # transports before the servers close: on Python 3.11 a connection whose transport
            # is made after Server.close() fails an assertion inside asyncio, which swallows
            # it and leaks the socket (a ResourceWarning later, in whichever test is running).
            loop = asyncio.get_running_loop()
            for backend in self.backends:
                if backend.server is not None and backend.sock.fileno() >= 0:
                    loop.remove_reader(backend.sock.fileno())
            for _ in range(3):  # the accepting task, the transport's connection_made, the handler
                await asyncio.sleep(0)
            for backend in self.backends:
                if backend.server is not None:
                    backend.server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.run(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(IO_TIMEOUT)
        self.loop.close()


def read_log_lines(path: Path, count: int, timeout: float = IO_TIMEOUT) -> list[str]:
    """The first ``count`` lines of a log file, waiting (bounded) until they are written."""
    end = time.monotonic() + timeout
    while True:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= count or time.monotonic() > end:
            return lines
        time.sleep(0.01)


def stream(total: int, chunk: int = 65536) -> tuple[Behaviour, list[int]]:
    """A large Content-Length response written chunk by chunk, honouring back-pressure
    (``drain``); the returned list's single item counts the bytes written so far."""
    written = [0]

    async def behaviour(req: BackendRequest, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
        block = b"x" * chunk
        while written[0] < total:
            size = min(chunk, total - written[0])
            writer.write(block[:size])
            await writer.drain()
            written[0] += size
        return True

    return behaviour, written


def in_loop(loop: asyncio.AbstractEventLoop, fn: Callable[[], object], timeout: float = IO_TIMEOUT) -> object:
    """Run ``fn`` in ``loop``'s thread and return its result (white-box reads of live state)."""

    async def call() -> object:
        return fn()

    return asyncio.run_coroutine_threadsafe(call(), loop).result(timeout)
