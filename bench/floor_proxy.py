"""A deliberately minimal uvloop + httptools reverse proxy: the floor of Python's per-request cost.

    python bench/floor_proxy.py LISTEN_PORT BACKEND_PORT,BACKEND_PORT,... [--forward-headers]

Not scriptlb and not a product: no config, no header rewriting, no timeouts, no retries, GET
only, responses passed through as received. The harness runs it as the optional ``py-floor``
target (``--targets ...,py-floor``) to show what the same event loop and parser reach on this
machine, so the gap between it and scriptlb is the cost of scriptlb's own per-request work.

It does less than any proxy must: it sends the backend a fixed request head (the client's
headers are not even parsed) and waits on the backend without a timeout. ``--forward-headers``
(the ``py-floor-headers`` target) adds just that minimum, in subclasses so that the plain floor
runs the same code as before: the client's headers are forwarded (but Host and Connection,
which a proxy replaces) and each request to the backend arms a read timeout, cancelled when
the response is complete. What that adds is spent before any of nginx's semantics (header
edits, pool limits, retries, failure accounting, logging).
"""

from __future__ import annotations

import asyncio
import sys

import httptools
import uvloop

READ_TIMEOUT = 60.0  # --forward-headers: the backend's read timeout (nginx's proxy_read_timeout)


class Upstream(asyncio.Protocol):
    def __init__(self, proxy: Proxy, port: int) -> None:
        self.proxy = proxy
        self.port = port
        self.parser = httptools.HttpResponseParser(self)
        self.client: Client | None = None
        self.chunks: list[bytes] = []
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.send = transport.write  # type: ignore[attr-defined]  # (a bound method: no extra call)

    def data_received(self, data: bytes) -> None:
        self.chunks.append(data)
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        client, self.client = self.client, None
        data = b"".join(self.chunks)
        self.chunks = []
        self.proxy.idle[self.port].append(self)
        if client is not None and client.transport is not None:
            client.transport.write(data)
            if client.close_after:
                client.transport.close()
                return
            client.next()

    def connection_lost(self, exc: Exception | None) -> None:
        idle = self.proxy.idle[self.port]
        if self in idle:
            idle.remove(self)
        if self.client is not None and self.client.transport is not None:
            self.client.transport.close()


class Client(asyncio.Protocol):
    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.parser = httptools.HttpRequestParser(self)
        self.queue: list[tuple[bytes, bool]] = []
        self.busy = False
        self.close_after = False
        self.url = b"/"
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_message_complete(self) -> None:
        keep = self.parser.should_keep_alive()
        self.queue.append((b"GET " + self.url + b" HTTP/1.1\r\nHost: backend\r\n\r\n", keep))
        if not self.busy:
            self.next()

    def next(self) -> None:
        if not self.queue or self.transport is None:
            self.busy = False
            return
        self.busy = True
        request, keep = self.queue.pop(0)
        self.close_after = not keep
        port = self.proxy.pick()
        idle = self.proxy.idle[port]
        if idle:
            up = idle.pop()
            up.client = self
            up.send(request)
        else:
            task = asyncio.ensure_future(self.proxy.connect(self, port, request))
            self.proxy.tasks.add(task)
            task.add_done_callback(self.proxy.tasks.discard)


class Proxy:
    def __init__(self, loop: asyncio.AbstractEventLoop, backends: list[int]) -> None:
        self.loop = loop
        self.backends = backends
        self.idle: dict[int, list[Upstream]] = {p: [] for p in backends}
        self.turn = 0
        self.tasks: set[asyncio.Future] = set()
        self.client: type[Client] = Client
        self.upstream: type[Upstream] = Upstream

    def pick(self) -> int:
        self.turn += 1
        return self.backends[self.turn % len(self.backends)]

    async def connect(self, client: Client, port: int, request: bytes) -> None:
        _transport, up = await self.loop.create_connection(lambda: self.upstream(self, port),
                                                           "127.0.0.1", port)
        up.client = client
        up.send(request)


class TimedUpstream(Upstream):
    """--forward-headers: a read timeout per request, as any proxy has."""

    timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.send = self._send_timed

    def _send_timed(self, request: bytes) -> None:
        self.timer = self.proxy.loop.call_later(READ_TIMEOUT, self._timed_out)
        assert self.transport is not None
        self.transport.write(request)

    def _timed_out(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def on_message_complete(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        super().on_message_complete()


class ForwardingClient(Client):
    """--forward-headers: the client's headers go to the backend (Host and Connection replaced)."""

    headers: list[tuple[bytes, bytes]]

    def on_url(self, url: bytes) -> None:
        self.url = url
        self.headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_message_complete(self) -> None:
        keep = self.parser.should_keep_alive()
        lines = [b"GET " + self.url + b" HTTP/1.1\r\nHost: backend\r\n"]
        for name, value in self.headers:
            lower = name.lower()
            if lower != b"host" and lower != b"connection":
                lines.append(name + b": " + value + b"\r\n")
        lines.append(b"\r\n")
        self.queue.append((b"".join(lines), keep))
        if not self.busy:
            self.next()


def main() -> int:
    listen = int(sys.argv[1])
    backends = [int(p) for p in sys.argv[2].split(",")]
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    proxy = Proxy(loop, backends)
    if "--forward-headers" in sys.argv[3:]:
        proxy.client, proxy.upstream = ForwardingClient, TimedUpstream
    loop.run_until_complete(loop.create_server(lambda: proxy.client(proxy), "127.0.0.1", listen,
                                               backlog=4096))
    try:
        loop.run_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
