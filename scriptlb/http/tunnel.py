"""A switched connection (a ``101``, e.g. WebSocket): two sockets joined by a byte tunnel.

Theory of operation
-------------------
When the peer answers an upgrade request with ``101``, the client socket and the upstream
socket are handed to a ``Tunnel`` (``transport.set_protocol``): each side's bytes are written to
the other as they come, nothing is parsed. Back-pressure both ways: when one side's write buffer
passes the transport's high-water mark, reading from the other side stops until it drains, so
memory per tunnel stays at about two transport buffers whatever the two ends do.

Timeouts are nginx's (ngx_http_upstream_process_upgraded): the tunnel is idle-timed by
``proxy_read_timeout`` (any byte either way restarts it); a side that does not take what we
write is timed by ``proxy_send_timeout`` (upstream) or the client send timeout.

Either side closing (or half-closing) ends the tunnel: the other side is closed after the bytes
already written to it, as nginx finalizes an upgraded request when one side reached its end.
``on_end(reason)`` runs once, when the tunnel ends (reason: "", or nginx's error-log text).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from scriptlb.http import safety

CLIENT_TIMED_OUT = "client timed out (110: Connection timed out)"
UPSTREAM_TIMED_OUT = "upstream timed out (110: Connection timed out)"


class _Side(asyncio.Protocol):
    """One socket of the tunnel: what it reads goes to the other side."""

    __slots__ = ("ended", "lost", "name", "other", "paused_at", "received", "transport", "tunnel")

    def __init__(self, tunnel: Tunnel, name: str, transport: asyncio.Transport) -> None:
        self.tunnel = tunnel
        self.name = name
        self.transport = transport
        self.other: _Side = self
        self.received = 0  # bytes read from this side
        self.paused_at = 0.0  # our write buffer is full since (0: it is not)
        self.ended = False  # this side reached its end (EOF or close)
        self.lost: Callable[[Exception | None], None] | None = None  # told when the socket goes

    def data_received(self, data: bytes) -> None:
        try:
            self.received += len(data)
            self.tunnel.forward(self.other, data)
        except Exception as exc:
            self.tunnel.crashed(exc)

    def eof_received(self) -> bool | None:
        self.tunnel.side_ended(self)
        return None  # (the transport closes itself; the tunnel closed the other side already)

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            self.tunnel.side_ended(self)
        finally:
            lost, self.lost = self.lost, None
            if lost is not None:
                lost(exc)

    def pause_writing(self) -> None:
        self.paused_at = self.tunnel.loop.time()
        self.other.transport.pause_reading()

    def resume_writing(self) -> None:
        self.paused_at = 0.0
        if not self.other.ended:
            self.other.transport.resume_reading()


class Tunnel:
    """Two sockets joined after a 101 (see the module docstring)."""

    __slots__ = (
        "_timer",
        "client",
        "client_send_timeout",
        "ended",
        "last_activity",
        "loop",
        "on_end",
        "read_timeout",
        "send_timeout",
        "sent_to_client",
        "upstream",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        read_timeout: float,
        send_timeout: float,
        client_send_timeout: float,
        on_end: Callable[[str], None],
    ) -> None:
        self.loop = loop
        self.read_timeout = read_timeout
        self.send_timeout = send_timeout
        self.client_send_timeout = client_send_timeout
        self.on_end = on_end
        self.ended = False
        self.sent_to_client = 0
        self.last_activity = loop.time()
        self._timer: asyncio.TimerHandle | None = None
        self.client: _Side | None = None
        self.upstream: _Side | None = None

    def sides(self, client: asyncio.Transport, upstream: asyncio.Transport) -> tuple[_Side, _Side]:
        """The protocols to install on the two transports (``set_protocol``)."""
        self.client = _Side(self, "client", client)
        self.upstream = _Side(self, "upstream", upstream)
        self.client.other, self.upstream.other = self.upstream, self.client
        return self.client, self.upstream

    def start(self, from_client: bytes, from_upstream: bytes) -> None:
        """The protocols are installed: pass what arrived early, start the idle timer."""
        assert self.client is not None and self.upstream is not None
        if from_client:
            self.client.data_received(from_client)
        if from_upstream and not self.ended:
            self.upstream.data_received(from_upstream)
        if not self.ended:
            self._arm(self.read_timeout)

    # ------------------------------------------------------------------ the sides' calls

    def forward(self, to: _Side, data: bytes) -> None:
        if self.ended:
            return
        self.last_activity = self.loop.time()
        if to is self.client:
            self.sent_to_client += len(data)
        to.transport.write(data)

    def side_ended(self, side: _Side) -> None:
        side.ended = True
        self.end("")

    def crashed(self, exc: BaseException) -> None:
        safety.report(exc, "proxying upgraded connection")
        self.end("")

    def end(self, reason: str) -> None:
        """Close both sides (each after what was already written to it), then ``on_end``."""
        if self.ended:
            return
        self.ended = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for side in (self.client, self.upstream):
            if side is not None and not side.transport.is_closing():
                side.transport.close()
        self.on_end(reason)

    # ------------------------------------------------------------------ timeouts

    def _arm(self, delay: float) -> None:
        self._timer = self.loop.call_later(max(delay, 0.001), self._check_timeouts)

    def _check_timeouts(self) -> None:
        self._timer = None
        if self.ended:
            return
        try:
            deadline, reason = self._deadline()
            now = self.loop.time()
            if now >= deadline:
                self.end(reason)
            else:
                self._arm(deadline - now)
        except Exception as exc:
            self.crashed(exc)

    def _deadline(self) -> tuple[float, str]:
        """The earliest deadline: a side not taking our bytes, else the idle time."""
        client, upstream = self.client, self.upstream
        assert client is not None and upstream is not None
        if upstream.paused_at:
            return upstream.paused_at + self.send_timeout, UPSTREAM_TIMED_OUT
        if client.paused_at:
            return client.paused_at + self.client_send_timeout, CLIENT_TIMED_OUT
        return self.last_activity + self.read_timeout, UPSTREAM_TIMED_OUT
