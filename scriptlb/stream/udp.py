"""Datagram sessions: ``listen ... udp`` in a stream server (nginx's ngx_event_udp + the
SOCK_DGRAM paths of ngx_stream_proxy_module).

Theory of operation
-------------------
A ``UdpListener`` reads the listening socket (one per worker and socket) and keeps a session
per client address, as nginx keys its UDP "connections" per worker. A datagram from an
unknown address starts a ``UdpSession``: the same tries loop, variables and access log as a
TCP session, over a connected UDP socket to the peer (``connect()`` on a datagram socket is
immediate and local: only a local error such as no route makes the next try; an ICMP port
unreachable shows up later as ECONNREFUSED on that socket, which marks the peer failed —
nginx does not retry a datagram session on another peer once its datagrams went out). Live
sessions per worker are bounded by ``worker_connections`` (source addresses are forgeable).

One datagram in is one datagram out, both ways: boundaries are kept, zero-length datagrams
included; as nginx, a datagram longer than ``proxy_buffer_size`` is cut to it, except a
session's first client datagram. A session ends (nginx's ``ngx_stream_proxy_test_finalize``) once
``proxy_responses`` datagrams per client datagram came back, or when ``proxy_timeout``
passes without traffic: status 200 when the expected responses came (or none was
configured), else ``upstream timed out`` and 502. ``proxy_requests N`` unbinds the session
from its client address after N datagrams: the next datagram starts a new session while this
one waits for its responses.

Rate limits (``proxy_upload_rate``/``proxy_download_rate``) delay reading as nginx does. A
client datagram that arrives while its session's reading is delayed is dropped (nginx reads
it into the session's handler, which does not take it); a peer's datagrams wait in the kernel.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Any

from scriptlb.http import safety
from scriptlb.logs import errorlog
from scriptlb.request.attempt import FAILED
from scriptlb.request.retry import Failure
from scriptlb.stream.session import _CONNECTING, BAD_GATEWAY, OK, PeerSide, Session, StreamAttempt

if TYPE_CHECKING:
    from scriptlb.config.model import PeerAddr
    from scriptlb.state.peers import Peer
    from scriptlb.stream.runtime import StreamServerRuntime

MAX_DATAGRAM = 65535
READS_PER_WAKEUP = 64  # datagrams read in one readiness callback before others get the loop
Address = tuple[Any, ...]  # a socket address as recvfrom gives it


class UdpListener:
    """One ``listen ... udp`` socket in a worker: its datagrams, its sessions by client address.

    On a wildcard address (``listen 53 udp``) each datagram's destination is read (IP_PKTINFO):
    it is the session's $server_addr, part of its key, and the source of what is sent back
    (a client's connected socket takes answers only from the address it sent to)."""

    def __init__(self, server: StreamServerRuntime, sock: socket.socket) -> None:
        self.server = server
        self.loop = server.loop
        self.sock = sock
        self.local: Address = sock.getsockname()
        self.v6 = sock.family == socket.AF_INET6
        self.pktinfo = self.local[0] in ("0.0.0.0", "::")
        if self.pktinfo:
            if self.v6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        self.sessions: dict[tuple[Address, Address], UdpSession] = {}
        self.closed = False
        self._refused_logged = -1.0
        self.loop.add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        for _ in range(READS_PER_WAKEUP):
            try:
                data, addr, local = self._receive()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # (an unconnected socket gets no ICMP errors; be safe)
                errorlog.log_error("error", f"recvmsg() failed {errorlog.os_error_text(exc)}")
                return
            try:
                self._dispatch(data, addr, local)
            except Exception as exc:
                safety.report(exc, "reading a datagram (stream session)")

    def _receive(self) -> tuple[bytes, Address, Address]:
        if not self.pktinfo:
            data, addr = self.sock.recvfrom(MAX_DATAGRAM)
            return data, addr, self.local
        data, ancillary, _flags, addr = self.sock.recvmsg(MAX_DATAGRAM, _PKTINFO_SPACE)
        return data, addr, (_destination(ancillary, self.v6) or self.local[0], *self.local[1:])

    def _dispatch(self, data: bytes, addr: Address, local: Address) -> None:
        session = self.sessions.get((addr, local))
        if session is None:
            runtime = self.server.runtime
            if runtime.datagram_sessions >= runtime.max_datagram_sessions:
                # source addresses cost nothing to forge: sessions (a peer socket each) are
                # bounded by worker_connections, as nginx's are; the datagram is dropped
                self._refuse(runtime.max_datagram_sessions)
                return
            session = UdpSession(self.server, next(runtime.conn_ids))
            self.sessions[(addr, local)] = session
            session.connection_made(ClientDatagrams(self, addr, local, session))
        session.datagram(data)

    def _refuse(self, limit: int) -> None:
        now = self.loop.time()
        if now - self._refused_logged >= 1.0:  # (a flood must not flood the log too)
            self._refused_logged = now
            errorlog.log_error("alert", f"{limit} worker_connections are not enough")

    def send(self, addr: Address, local: Address, data: bytes) -> int:
        """Send one datagram to a client; a full socket buffer drops it (UDP gives no
        delivery promise, and a session must not queue without bound)."""
        try:
            if self.pktinfo:
                return self.sock.sendmsg([data], [_source(local[0], self.v6)], 0, addr)
            return self.sock.sendto(data, addr)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as exc:
            errorlog.log_error("error", f"sendmsg() failed {errorlog.os_error_text(exc)}")
            return 0

    def detach(self, addr: Address, local: Address, session: UdpSession) -> None:
        if self.sessions.get((addr, local)) is session:
            del self.sessions[(addr, local)]

    def close(self) -> None:
        """Stop reading (a worker's stop): the sessions end now, as nginx's do ("disconnected
        on shutdown"); the socket itself belongs to the master."""
        if self.closed:
            return
        self.closed = True
        self.loop.remove_reader(self.sock.fileno())
        for session in list(self.sessions.values()):
            session.shutdown()
        self.sessions.clear()


def _peer_socket(addr: PeerAddr, local: tuple[str, int] | None = None) -> socket.socket:
    """A datagram socket connected to the peer (immediate: nothing goes on the wire), from
    ``local`` (proxy_bind) when given."""
    if addr.unix_path is not None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        target: Any = addr.unix_path
    else:
        host = addr.host or ""
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
        target = (host, addr.port)
    try:
        sock.setblocking(False)
        if addr.unix_path is not None:
            sock.bind("")  # (Linux autobind: an address the peer can answer to)
        elif local is not None:
            sock.bind(local)
        sock.connect(target)
    except OSError:
        sock.close()
        raise
    return sock


# IP_PKTINFO (Linux's value: Python 3.11's socket module does not name it)
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
_PKTINFO_SPACE = socket.CMSG_SPACE(20)  # struct in6_pktinfo, the larger of the two


def _destination(ancillary: list[tuple[int, int, bytes]], v6: bool) -> str | None:
    """A datagram's destination address from its IP_PKTINFO / IPV6_PKTINFO message."""
    for level, kind, raw in ancillary:
        if not v6 and level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(raw) >= 12:
            return socket.inet_ntop(socket.AF_INET, raw[8:12])  # in_pktinfo.ipi_addr
        if v6 and level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO and len(raw) >= 16:
            return socket.inet_ntop(socket.AF_INET6, raw[:16])  # in6_pktinfo.ipi6_addr
    return None


def _source(host: str, v6: bool) -> tuple[int, int, bytes]:
    """The ancillary message that sends from ``host`` (the address the client sent to)."""
    if v6:
        return socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, socket.inet_pton(socket.AF_INET6, host) + bytes(4)
    # in_pktinfo: ifindex 0, ipi_spec_dst = host, ipi_addr unused
    return socket.IPPROTO_IP, IP_PKTINFO, bytes(4) + socket.inet_pton(socket.AF_INET, host) + bytes(4)


class ClientDatagrams:
    """What a session writes to and reads from: one client address on a listening socket, with
    the transport calls a stream Session makes (asyncio's names)."""

    def __init__(self, listener: UdpListener, addr: Address, local: Address, session: UdpSession) -> None:
        self.listener = listener
        self.addr = addr
        self.local = local
        self.session: UdpSession | None = session
        self.paused = False  # reading delayed (proxy_upload_rate): datagrams are dropped
        self._closing = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return self.addr
        if name == "sockname":
            return self.local
        return default

    def write(self, data: bytes) -> None:
        self.listener.send(self.addr, self.local, data)

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass  # (a datagram is sent at once or dropped)

    def get_write_buffer_size(self) -> int:
        return 0

    def can_write_eof(self) -> bool:
        return False

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        session, self.session = self.session, None
        if session is not None:
            self.listener.detach(self.addr, self.local, session)
            self.listener.loop.call_soon(session.connection_lost, None)

    abort = close


class PeerDatagrams:
    """A connected UDP socket to the peer, with the transport calls a PeerSide's owner makes;
    its datagrams go to the PeerSide, a socket error to the session."""

    def __init__(self, session: UdpSession, side: PeerSide, sock: socket.socket) -> None:
        self.session = session
        self.side = side
        self.sock = sock
        self.loop = session.loop
        self._reading = False
        self._closed = False
        # a peer's datagram is read into proxy_buffer_size, the rest lost (nginx's)
        self.size = session.server.conf.proxy.buffer_size
        self.hold_first = False  # the first write waits for the next: a PROXY header's datagram
        self._held = b""
        self.resume_reading()

    def _readable(self) -> None:
        for _ in range(READS_PER_WAKEUP):
            if not self._reading:
                return
            try:
                data = self.sock.recv(self.size)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.pause_reading()
                try:
                    self.session.peer_error(exc, "recv() failed")
                except Exception as err:
                    self.session._crashed(err, "reading from upstream")
                return
            self.side.data_received(data)  # (its own safety net)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return self.sock.getpeername() if not self._closed else default
        return default  # (no "socket": TCP options such as tcp_nodelay are not for datagrams)

    def write(self, data: bytes) -> None:
        if self._closed:
            return
        if self.hold_first:
            self.hold_first = False
            self._held = data
            return
        if self._held:
            data, self._held = self._held + data, b""
        try:
            self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            pass  # dropped: as a full socket buffer drops it on the way anyway
        except OSError as exc:
            self.session.peer_error(exc, "send() failed")

    def pause_reading(self) -> None:
        if self._reading:
            self._reading = False
            self.loop.remove_reader(self.sock.fileno())

    def resume_reading(self) -> None:
        if not self._reading and not self._closed:
            self._reading = True
            self.loop.add_reader(self.sock.fileno(), self._readable)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def can_write_eof(self) -> bool:
        return False

    def is_closing(self) -> bool:
        return self._closed

    def close(self) -> None:
        if self._closed:
            return
        self.pause_reading()
        self._closed = True
        self.sock.close()
        self.side.connection_lost(None)

    abort = close


class UdpSession(Session):
    """A stream session over datagrams (see the module docstring)."""

    protocol = "UDP"
    client_word = "udp client"

    def __init__(self, server: StreamServerRuntime, conn_id: int) -> None:
        super().__init__(server, conn_id)
        self.requests = 0  # datagrams from the client
        self.responses = 0  # datagrams from the peer
        self._peer_error = False  # the peer's socket failed: the peer is freed as failed
        self._client: ClientDatagrams | None = None

    def connection_made(self, base: Any) -> None:
        self._client = base
        self.server.runtime.datagram_sessions += 1
        super().connection_made(base)

    def _gone(self) -> None:
        if self._client is not None:
            self._client = None
            self.server.runtime.datagram_sessions -= 1
        super()._gone()

    def datagram(self, data: bytes) -> None:
        """A client datagram (the listener's dispatch)."""
        client = self._client
        if self._ended or client is None or client.paused:
            return  # (delayed by proxy_upload_rate: nginx's handler does not take it)
        if self.requests:
            # nginx: the first datagram is the session's preread buffer, whole; later ones
            # are read into proxy_buffer_size and what does not fit is lost
            data = data[:self.server.conf.proxy.buffer_size]
        self.requests += 1
        self.data_received(data)
        if self.peer is not None:
            self._test_finalize()

    def _connect(self, name: str, addr: PeerAddr, peer: Peer | None) -> None:
        attempt = StreamAttempt(self._upstream.stats, name, peer, None)
        self.attempt = attempt
        self.tries.append(attempt)
        side = PeerSide(self)
        try:
            sock = _peer_socket(addr, self._local_address() if addr.unix_path is None else None)
        except OSError as exc:
            self._try_failed(Failure.ERROR, f"connect() failed {errorlog.os_error_text(exc)}")
            return
        peer_socket = PeerDatagrams(self, side, sock)
        # nginx sends the PROXY header in the same datagram as the client's first one
        peer_socket.hold_first = self.server.conf.proxy.proxy_protocol
        # no connect to wait for: the PeerSide's connection_made relays at once
        side.connection_made(peer_socket)  # type: ignore[arg-type]

    def _start_flows(self, side: PeerSide) -> None:
        super()._start_flows(side)
        for flow in (self._upload, self._download):
            if flow is not None:
                flow.whole = True  # (nginx cuts a stream to the budget, never a datagram)

    def peer_connected(self, side: PeerSide) -> None:
        if self._ended:
            side.abort()
            return
        self._relay(side)
        if self.requests:  # (datagrams held while a hook chose the peer)
            self._test_finalize()

    def peer_data(self, data: bytes) -> None:
        self.responses += 1
        super().peer_data(data)
        self._test_finalize()

    def peer_error(self, exc: OSError, what: str) -> None:
        """ECONNREFUSED (the peer's ICMP port unreachable) and its kind on the peer's socket:
        nginx counts it as the peer's last datagram, frees the peer as failed, and does not
        retry (the client's datagrams went out already)."""
        if self._ended:
            return
        self._peer_error = True
        action = "reading from upstream" if what.startswith("recv") else "sending to upstream"
        errorlog.log_error("error", f"{what} {errorlog.os_error_text(exc)} while proxying and {action}",
                           self.conn_id, self.log_context(self._peer_name()))
        if what.startswith("send"):
            self._finish(OK)
            return
        # nginx passes the failed read on as the peer's last (empty) datagram: the client
        # gets an empty datagram, and it counts as a response
        self.peer_data(b"")

    def _test_finalize(self) -> None:
        """nginx's ngx_stream_proxy_test_finalize for datagrams."""
        if self._ended:
            return
        proxy = self.server.conf.proxy
        if proxy.requests:
            if self.requests < proxy.requests:
                return
            self._unbind()
        if proxy.responses is None or self.responses < proxy.responses * self.requests:
            return
        if self.peer is None:
            return
        self._udp_info("udp done")
        self._finish(OK)

    def _unbind(self) -> None:
        client = self._client
        if client is not None:
            client.listener.detach(client.addr, client.local, self)

    def _on_timer(self, timeout: float) -> None:
        if self._ended or self._prereading or self.peer is None:
            super()._on_timer(timeout)
            return
        idle = self.loop.time() - self._active
        if idle < timeout:
            self._timer = self.loop.call_at(self._active + timeout, self._on_timer, timeout)
            return
        self._timer = None
        responses = self.server.conf.proxy.responses
        if responses is None or self.responses >= responses * self.requests:
            self._udp_info("udp timed out")
            self._finish(OK)
            return
        self._peer_error = True  # (nginx: the peer's read error, so the peer is freed as failed)
        errorlog.log_error("error", "upstream timed out (110: Connection timed out) while "
                           "proxying connection", self.conn_id, self.log_context(self._peer_name()))
        self._finish(BAD_GATEWAY)

    def _peer_name(self) -> str | None:
        attempt = self.attempt
        return attempt.addr if attempt is not None else None

    def _udp_info(self, what: str) -> None:
        if errorlog.enabled("info"):
            errorlog.log_error("info", f"{what}, packets from/to client:{self.requests}/{self.responses}, "
                               f"{self.byte_counts()}", self.conn_id)

    def _finish(self, status: int) -> None:
        if self._ended:
            return
        attempt = self.attempt
        if self._peer_error and attempt is not None and self.peer is not None:
            # freed as failed (max_fails), the session itself keeps its status
            self.attempt = None
            self._ended_attempt_failed(attempt)
        super()._finish(status)

    def _ended_attempt_failed(self, attempt: Any) -> None:
        attempt.end(FAILED, self, Failure.ERROR, _CONNECTING)

    def shutdown(self) -> None:
        """The worker stops: nginx ends a datagram session at once."""
        if not self._ended:
            if errorlog.enabled("info"):
                errorlog.log_error("info", "disconnected on shutdown", self.conn_id)
            self._finish(OK)

