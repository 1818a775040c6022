"""One stream session: a client connection relayed to a peer (ngx_stream_proxy_module).

Theory of operation
-------------------
``Session`` is the client side's protocol. It starts with optional preread (``ssl_preread``),
then the tries loop: the hook seam (``balancer_by_python``), else the upstream's balancer, then
one ``StreamAttempt`` per connection attempt (the http ``Attempt``: the same free, statistics
and ``get_last_failure`` accounting). A refused or timed-out connect goes to the next peer while
the budget lasts (``proxy_next_upstream``, ``_tries``, ``_timeout``); once connected, bytes flow
and nothing is retried.

The relay copies bytes as they come, both ways. Back-pressure: each transport's write buffer
is capped at ``proxy_buffer_size``; past it the *other* side stops reading until it drains, so
a slow reader holds at most about that much per direction. ``proxy_upload_rate`` /
``proxy_download_rate`` pass at most their budget and pause reading as nginx's limit_rate does
(scriptlb.stream.relay.RatedFlow).

Ending (nginx's default, ``proxy_half_close`` off): when either side sends EOF, the session
ends once what that side sent has been written on (``close()`` flushes), status 200.
``proxy_timeout`` is the longest time without a read or write on either side (one timer,
re-armed lazily). The access log line is written once, when the session ends.
"""

from __future__ import annotations

import asyncio
import functools
import sys
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Literal, TypeAlias, TypeVar, cast

from scriptlb.http import safety
from scriptlb.http.proxy_protocol import NEED_MORE as PP_NEED_MORE
from scriptlb.http.proxy_protocol import V1_MAX, Header, read_header, v1_header
from scriptlb.logs import errorlog
from scriptlb.request.attempt import ABANDONED, DONE, FAILED, Attempt, TryRecord, chosen_anyway, clock
from scriptlb.request.realip import RealIp, parse_addr_port
from scriptlb.request.retry import Failure
from scriptlb.stream.preread import DONE as HELLO_DONE
from scriptlb.stream.preread import NEED_MORE, parse_client_hello
from scriptlb.stream.relay import PEER_FULL, WAITING, RatedFlow, ReadGate

if TYPE_CHECKING:
    from scriptlb.config.model import PeerAddr
    from scriptlb.state.peers import Peer
    from scriptlb.stream.runtime import StreamServerRuntime

_CONNECTING = "proxying connection"  # nginx's log action for the whole proxy phase
_HANDSHAKING = "SSL handshaking to upstream"
_PREREAD_LIMIT = 16384  # preread_buffer_size
_PREREAD_TIMEOUT = 30.0  # preread_timeout

OK, BAD_REQUEST, FORBIDDEN, INTERNAL_ERROR, BAD_GATEWAY = 200, 400, 403, 500, 502


_Opening: TypeAlias = "asyncio.Task[object]"  # a peer connection opening (plain, or TLS)

_Callback = TypeVar("_Callback", bound=Callable[..., Any])


def _in_server_log(method: _Callback) -> _Callback:
    """A transport or timer callback of a session: it runs with the session's server
    ``error_log`` as the process's error log (nginx's connection log) when the server has its
    own, and whatever it raises ends the session with both sides closed (the safety net: no
    exception may leave a socket open or reach the event loop)."""

    @functools.wraps(method)
    def run(self: Any, *args: Any) -> Any:
        session = self.session if isinstance(self, PeerSide) else self
        if session is None:
            return method(self, *args)
        try:
            if session.error_log is None:
                return method(self, *args)
            with errorlog.using(session.error_log):
                return method(self, *args)
        except Exception as exc:
            session._crashed(exc, method.__name__)
            return None

    return cast(_Callback, run)


class StreamAttempt(Attempt):
    """One connection attempt of a session, with the bytes that crossed it ($upstream_bytes_*,
    the fields every try has: the session counts them as it relays)."""

    __slots__ = ()

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.bytes_sent = 0
        self.bytes_received = 0

    def end(self, outcome: int, tries: Any, failure: Failure | None = None,
            phase: str = "") -> Failure | None:
        """``Attempt.end``, with this connection's bytes for the peer statistics (the API's
        ``sent``/``received``): ``Attempt.end`` reads them off the connection, and a session
        counts them here."""
        conn: Any = self.conn
        if conn is not None:
            conn.sent, conn.received = self.bytes_sent, self.bytes_received
        return super().end(outcome, tries, failure, phase)


class Session(asyncio.Protocol):
    """The client connection of one stream session (see the module docstring)."""

    is_stream: Literal[True] = True  # (request_view: a stream session)
    protocol = "TCP"  # $protocol
    client_word = "client"  # nginx's "client A connected to B" ("udp client" for datagrams)
    # what the hook API and the shared log helpers read on an http exchange, empty here
    method = ""
    request_uri = ""
    http_version = ""
    headers: tuple[tuple[bytes, bytes], ...] = ()
    args = None

    def __init__(self, server: StreamServerRuntime, conn_id: int, reads_header: bool = False) -> None:
        self.server = server
        self.loop = server.loop
        self.conn_id = conn_id
        self.error_log = server.error_log  # the server's own error_log, None: the process's
        proxy = server.conf.proxy
        self.connect_timeout = proxy.connect_timeout
        self.send_timeout = proxy.timeout
        self.read_timeout = proxy.timeout
        self.start_time = time.time()
        self.status = OK
        self.bytes_sent = 0  # to the client
        self.bytes_received = 0  # from the client
        self.tries: list[TryRecord] = []
        self.ctx: dict[str, object] = {}
        # variable values by name, as nginx's s->variables: map / split_clients values (evaluated
        # once), `set` values, named captures, the byte counters once read
        self.ctx_cache: dict[str, str | None] = {}
        self.captures: tuple[str, ...] = ()  # the last regex match's ($1...)
        self.last_failure: tuple[str, int] | None = None
        self.tries_left = 0
        self.tries_cap = proxy.next_upstream_tries
        self.remote_addr = self.remote_port = self.server_addr = self.server_port = ""
        self.server_name = ""
        self.ssl_server_name = self.ssl_protocol = self.ssl_alpn_protocols = ""
        self.proxy_protocol: Header | None = None  # the PROXY header read, if any
        self.proxy_protocol_addr: str | None = None
        self.proxy_target = ""  # `proxy_pass $var`'s value (the host of TLS to the peer)
        self.proxy_protocol_port: str | None = None
        # the connection's own address once realip replaced it ($realip_remote_addr/_port)
        self.realip_remote_addr = self.realip_remote_port = ""
        self.limit: Any = None  # limit_conn's LimitState (scriptlb.request.limits), once it ran
        self.transport: asyncio.Transport | None = None
        self.gate: ReadGate | None = None
        self.peer: PeerSide | None = None
        self.attempt: StreamAttempt | None = None
        self._pending: list[bytes] = []  # read before the upstream connection is ready
        self._pending_size = 0
        self._upstream: Any = None
        self._state: Any = None
        self._started = 0.0
        self._connecting: _Opening | None = None
        self._connect_timer: asyncio.TimerHandle | None = None
        self._prereading = server.conf.ssl_preread
        self._proxy_header = reads_header  # `listen ... proxy_protocol`: a PROXY header comes first
        self._timer: asyncio.TimerHandle | None = None
        self._active = 0.0  # loop time of the last read or write
        self._ended = False
        self._client_eof = False  # the client finished sending before the peer was connected
        self._eofs = 0  # proxy_half_close: 1 = the client's EOF seen, 2 = the peer's
        self._start_sec = 0
        self._upload: RatedFlow | None = None  # proxy_upload_rate's flow, once connected
        self._download: RatedFlow | None = None

    # ------------------------------------------------------------------ client side

    @_in_server_log
    def connection_made(self, base: asyncio.BaseTransport) -> None:
        # a connection's transport: asyncio's, or uvloop's (which does not subclass Transport)
        self.transport = transport = cast(asyncio.Transport, base)
        self.gate = ReadGate(transport)
        transport.set_write_buffer_limits(high=self.server.conf.proxy.buffer_size)
        peer = transport.get_extra_info("peername")
        local = transport.get_extra_info("sockname")
        if isinstance(peer, tuple):
            self.remote_addr, self.remote_port = peer[0], str(peer[1])
        else:
            self.remote_addr = "unix:"
        if isinstance(local, tuple):
            self.server_addr, self.server_port = local[0], str(local[1])
            self.server_name = f"{local[0]}:{local[1]}" if ":" not in local[0] else f"[{local[0]}]:{local[1]}"
        self.server.sessions.add(self)
        _no_delay(transport, self.server.conf.tcp_nodelay)
        if errorlog.enabled("info"):
            client = _joined(self.remote_addr, self.remote_port)
            errorlog.log_error("info", f"{self.client_word} {client} connected to {self.server_name}",
                               self.conn_id)
        try:
            if self._proxy_header:
                self._arm_timer(_PREREAD_TIMEOUT)
            else:
                self._run_phases()
        except Exception as exc:
            self._crashed(exc, "starting the session")

    def _gate(self) -> ReadGate:
        gate = self.gate
        assert gate is not None  # (connection_made sets it, before any other callback)
        return gate

    @_in_server_log
    def data_received(self, data: bytes) -> None:
        try:
            self._active = self.loop.time()
            self.bytes_received += len(data)
            if self.peer is not None and self.attempt is not None:
                if self._upload is not None:
                    self._upload.feed(data)
                else:
                    self._to_peer(data)
                return
            self._pending.append(data)
            self._pending_size += len(data)
            if self._proxy_header:
                self._read_proxy_header()
            elif self._prereading:
                self._preread()
            elif self._pending_size >= self.server.conf.proxy.buffer_size:
                self._gate().close(WAITING)
        except Exception as exc:
            self._crashed(exc, "reading from client")

    @_in_server_log
    def eof_received(self) -> bool:
        try:
            if self.peer is None and not (self._prereading or self._proxy_header or self._ended):
                self._client_eof = True  # relayed once connected: what was sent goes first
                return True
            self._eof_from(client=True)
        except Exception as exc:
            self._crashed(exc, "reading from client")
        return True

    @_in_server_log
    def connection_lost(self, exc: Exception | None) -> None:
        try:
            if not self._ended:
                self._finish(OK)
            self._gone()
        except Exception as err:
            safety.report(err, "closing the client connection")

    def pause_writing(self) -> None:
        peer = self.peer
        if peer is not None:
            peer.gate.close(PEER_FULL)

    def resume_writing(self) -> None:
        peer = self.peer
        if peer is not None:
            peer.gate.open(PEER_FULL)

    # ------------------------------------------------------------------ preread

    def _read_proxy_header(self) -> None:
        data = b"".join(self._pending)
        header = read_header(data)
        if header == PP_NEED_MORE:
            return
        if not isinstance(header, Header):
            shown = data[:V1_MAX].decode("latin-1").encode("unicode_escape").decode("ascii")
            errorlog.log_error("error", f'broken header: "{shown}" while reading PROXY protocol',
                               self.conn_id, self.log_context(None))
            self.bytes_received = 0  # (nginx counts what the proxy reads, not the handshake)
            self._finish(BAD_REQUEST)
            return
        self.proxy_protocol = header
        self.proxy_protocol_addr, self.proxy_protocol_port = header.addr, header.port
        self._proxy_header = False
        self.bytes_received -= header.length  # $bytes_received counts the payload only, as nginx
        rest = data[header.length:]
        self._pending, self._pending_size = ([rest], len(rest)) if rest else ([], 0)
        self._cancel_timer()
        self._run_phases()

    def _run_phases(self) -> None:
        """nginx's stream phases once the connection (and its PROXY header) is in: post-accept
        (realip), preaccess (``set``, then limit_conn: nginx runs a phase's handlers in
        reverse module order), access (allow/deny), preread (ssl_preread), then content (the
        tries, or ``return``)."""
        server = self.server
        if server.realip is not None and self.proxy_protocol_addr is not None:
            self._real_ip(server.realip)
        for name, value in server.sets:
            self.ctx_cache[name] = value(self)
        if server.limits is not None:
            status, _ = server.limits.run(self)
            if status:
                self._finish(status)
                return
        if server.access is not None and not server.access(self):
            errorlog.log_error("error", "access forbidden by rule", self.conn_id, self.log_context(None))
            self._finish(FORBIDDEN)
            return
        if self._prereading:
            self._arm_timer(_PREREAD_TIMEOUT)
            if self._pending:
                self._preread()
            return
        self._begin_tries()

    def _real_ip(self, realip: RealIp) -> None:
        """ngx_stream_realip_module: a trusted sender's PROXY header address is the client's."""
        if not realip.trusted(self.remote_addr):
            return
        found = parse_addr_port(self.proxy_protocol_addr or "")
        if found is None:
            return
        self.realip_remote_addr, self.realip_remote_port = self.remote_addr, self.remote_port
        self.remote_addr, self.remote_port = found[0], self.proxy_protocol_port or "0"

    def _preread(self) -> None:
        data = b"".join(self._pending)
        hello = parse_client_hello(data)
        if hello.status == NEED_MORE:
            if len(data) >= _PREREAD_LIMIT:
                errorlog.log_error("error", "preread buffer full", self.conn_id, self.log_context(None))
                self._finish(BAD_REQUEST)
            return
        if hello.status == HELLO_DONE:
            self.ssl_server_name = hello.server_name
            self.ssl_protocol = hello.protocol
            self.ssl_alpn_protocols = hello.alpn
        else:
            errorlog.log_error("debug", "ssl preread: not a handshake", self.conn_id, self.log_context(None))
        self._prereading = False
        # nginx hands the preread bytes to the peer without counting them in $bytes_received
        self.bytes_received -= len(data)
        self._pending = [data]
        self._cancel_timer()
        self._begin_tries()

    # ------------------------------------------------------------------ the tries loop

    def _begin_tries(self) -> None:
        if self.server.returns is not None:
            self._return_text(self.server.returns)
            return
        upstream = self.server.upstream_for(self)
        if isinstance(upstream, asyncio.Future):
            upstream.add_done_callback(self._looked_up)
            return
        self._start_tries(upstream)

    def _looked_up(self, done: asyncio.Future[Any]) -> None:
        """``proxy_pass $var`` named a host: its lookup ended (None: failed, logged)."""
        if self._ended:
            return
        try:
            self._start_tries(done.result())
        except Exception as exc:
            self._crashed(exc, "resolving a proxy_pass name")

    def _start_tries(self, upstream: Any) -> None:
        if upstream is None:
            self._finish(BAD_GATEWAY if self.status == OK else self.status)
            return
        self._upstream = upstream
        tries_cap = self.server.conf.proxy.next_upstream_tries
        key_getter = upstream.key_getter
        if key_getter is None:
            self._state = upstream.balancer.new_request(tries_cap)
        else:
            self._state = upstream.balancer.new_request(tries_cap, key_getter(self))
        self._started = self.loop.time()
        self._start_sec = int(time.time())  # (nginx's u->start_sec: the rates count from it)
        if self._pending_size >= self.server.conf.proxy.buffer_size:
            self._gate().close(WAITING)
        self._next_try()

    def _return_text(self, render: Any) -> None:
        """``return``: send the text and end the session (closing flushes it first)."""
        text = render(self)
        if text and self.transport is not None:
            self.transport.write(text)
            self.bytes_sent += len(text)
        self._finish(OK)

    def _next_try(self) -> None:
        upstream = self._upstream
        state = self._state
        self.tries_left = state.tries
        hook = upstream.hook
        if hook is not None:
            outcome = hook.run(self, upstream)
            if not outcome.plain and outcome.exit_status is not None:
                self._finish(outcome.exit_status)
                return
            if outcome.addr is not None:
                if not outcome.plain:  # (more_tries is 0 in a plain run)
                    state.tries += outcome.more_tries
                chosen = upstream.peers.by_name.get(outcome.addr.name)
                if chosen is not None and (chosen.down or chosen.fails):
                    chosen_anyway(upstream, chosen, outcome, self, self.loop.time(), _CONNECTING)
                self._connect(outcome.addr.name, outcome.addr, None)
                return
        peer = upstream.balancer.get(state, self.loop.time())
        if peer is None:
            record = TryRecord(upstream.name, clock())
            record.response_time = 0.0
            self.tries.append(record)
            # (nginx finds no peer right after setting this action, before any byte is relayed)
            errorlog.log_error("error", "no live upstreams while connecting to upstream",
                               self.conn_id, self.log_context(upstream.name))  # (nginx names the upstream)
            self._finish(BAD_GATEWAY)
            return
        self._connect(peer.name, peer.addr, peer)

    def _connect(self, name: str, addr: PeerAddr, peer: Peer | None) -> None:
        attempt = StreamAttempt(self._upstream.stats, name, peer, None)
        self.attempt = attempt
        self.tries.append(attempt)
        side = PeerSide(self)
        loop = self.loop
        opening: Coroutine[Any, Any, object]
        tls = self.server.peer_tls
        if tls is not None:
            # our own TLS transport: the side gets connection_made once the handshake is done
            # (under proxy_connect_timeout, as nginx's), and the peer's last session resumes
            from scriptlb.http.tls_transport import open_tls_connection  # (TLS configs only)

            tls_name = self.server.peer_tls_name(self)
            key = (name, tls_name)
            from scriptlb.http.tls import TlsConfigError

            try:
                context = tls.context_for(self)
            except TlsConfigError as e:  # a certificate named by variables that does not load
                errorlog.log_error("error", f"{e} while {_CONNECTING}", self.conn_id, self.log_context(name))
                self._finish(INTERNAL_ERROR)
                return
            local = self._local_address() if addr.unix_path is None else None
            opening = open_tls_connection(loop, side, addr.host, addr.port, addr.unix_path, local, context,
                                          tls.server_hostname(tls_name), tls.session(key, context),
                                          tls.keeper(key, context))
        elif addr.unix_path is not None:
            opening = loop.create_unix_connection(lambda: side, addr.unix_path)
        else:
            assert addr.host is not None  # (an address without unix_path has a host)
            opening = loop.create_connection(lambda: side, addr.host, addr.port,
                                             local_addr=self._local_address())
        task = loop.create_task(opening)
        self._connect_timer = loop.call_later(self.connect_timeout, task.cancel)
        self._connecting = task
        task.add_done_callback(lambda done: self._connected(done, side))

    def _local_address(self) -> tuple[str, int] | None:
        """proxy_bind's address for this session's peer connections (None: the OS picks)."""
        bind = self.server.proxy_bind
        if bind is None:
            return None
        from scriptlb.request.proxy import local_address

        return local_address(bind(self), self)

    def peer_connected(self, side: PeerSide) -> None:
        """The peer's connection is up (its connection_made: before the opening task's own
        callback, and before any byte the peer sends)."""
        if self._ended or self._connecting is None:
            side.abort()  # the session ended while connecting
            return
        self._connecting = None
        if self._connect_timer is not None:
            self._connect_timer.cancel()
        self._relay(side)

    @_in_server_log
    def _connected(self, task: _Opening, side: PeerSide) -> None:
        if self._connecting is not task:  # relayed already (peer_connected), or the session ended
            if not task.cancelled():
                task.exception()  # (retrieved: asyncio would warn about it)
            if side is not self.peer:
                side.abort()
            return
        self._connecting = None
        if self._connect_timer is not None:
            self._connect_timer.cancel()
        try:
            failure, text, action = _connect_failure(task)
            if failure is None:
                self._relay(side)
                return
            side.abort()
            self._try_failed(failure, text, action)
        except Exception as exc:
            self._crashed(exc, _CONNECTING)

    def _try_failed(self, failure: Failure, text: str, action: str = _CONNECTING) -> None:
        """nginx's ngx_stream_proxy_next_upstream: log, free as failed, retry or 502."""
        attempt = self.attempt
        assert attempt is not None
        self.attempt = None
        errorlog.log_error("error", f"{text} while {action}", self.conn_id,
                           self.log_context(attempt.addr))
        attempt.end(FAILED, self, failure, _CONNECTING)
        proxy = self.server.conf.proxy
        timeout = proxy.next_upstream_timeout
        if (self._state.tries == 0 or not proxy.next_upstream
                or (timeout and self.loop.time() - self._started >= timeout)):
            self._finish(BAD_GATEWAY)
            return
        self._next_try()

    def _relay(self, side: PeerSide) -> None:
        attempt = self.attempt
        assert attempt is not None
        # a session's try is connected by its PeerSide, which answers what Attempt.end reads
        # of a connection (sent, received), not an UpstreamConnection
        attempt.connected(side)  # type: ignore[arg-type]
        self._peer_is_live(attempt)
        self.peer = side
        side.transport.set_write_buffer_limits(high=self.server.conf.proxy.buffer_size)
        _no_delay(side.transport, self.server.conf.tcp_nodelay)
        pending, self._pending, self._pending_size = self._pending, [], 0
        if self.server.conf.proxy.proxy_protocol:
            self._to_peer(v1_header(self.remote_addr, self.remote_port, self.server_addr, self.server_port))
        self._start_flows(side)
        for chunk in pending:
            if self._upload is not None:
                self._upload.feed(chunk)
            else:
                self._to_peer(chunk)
        self._gate().open(WAITING)
        self._active = self.loop.time()
        self._arm_timer(self.read_timeout)
        if self._client_eof:
            self._eof_from(client=True)

    # ------------------------------------------------------------------ peer side (PeerSide calls)

    def _peer_is_live(self, attempt: StreamAttempt) -> None:
        """nginx's stream round robin "notify" on connect: a peer chosen again after its
        fail_timeout that accepts the connection has its failures forgiven at once (not when
        the session ends: sessions opened meanwhile go to it too)."""
        peer, upstream = attempt.peer, self._upstream
        if peer is None or upstream is None or upstream.peers.single:
            return
        fails = peer.fails
        if not fails or peer.accessed >= peer.checked:
            return
        peer.fails = 0
        stats = upstream.stats
        if stats is not None and upstream.conf.zone and upstream.peers.holds(peer):
            stats.passive_free(peer, False, fails, self.loop.time())

    def _start_flows(self, side: PeerSide) -> None:
        """proxy_upload_rate / proxy_download_rate, evaluated once connected (as nginx)."""
        server = self.server
        up, down = server.upload_rate(self), server.download_rate(self)
        if up:
            self._upload = RatedFlow(up, self._start_sec, self._gate(), self._to_peer, self.loop)
        if down:
            self._download = RatedFlow(down, self._start_sec, side.gate, self._to_client, self.loop)

    def _to_peer(self, data: bytes) -> None:
        attempt, peer = self.attempt, self.peer
        if attempt is not None:
            attempt.bytes_sent += len(data)
        if peer is not None and not peer.transport.is_closing():
            peer.transport.write(data)

    def _to_client(self, data: bytes) -> None:
        self.bytes_sent += len(data)
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def peer_data(self, data: bytes) -> None:
        self._active = self.loop.time()
        attempt = self.attempt
        if attempt is not None:
            if not attempt.bytes_received:
                attempt.header_time = clock() - attempt.started  # $upstream_first_byte_time
            attempt.bytes_received += len(data)
        if self._download is not None:
            self._download.feed(data)
        else:
            self._to_client(data)

    def peer_eof(self) -> None:
        self._eof_from(client=False)

    def _eof_from(self, client: bool) -> None:
        """One side finished sending. nginx's default ends the session (once what it sent is
        written on); with proxy_half_close the EOF is passed on and the session ends when both
        sides have finished. Bytes a rate limit still holds go first."""
        flow = self._upload if client else self._download
        if flow is not None and flow.held:
            flow.after = lambda: self._eof_from(client)
            return
        if self.server.conf.proxy.half_close and self.peer is not None:
            self._eofs |= 1 if client else 2
            if self._eofs != 3:
                target = self.peer.transport if client else self.transport
                if target is not None and target.can_write_eof() and not target.is_closing():
                    target.write_eof()
                return
        self._info("client disconnected" if client else "upstream disconnected")
        self._finish(OK)

    def peer_lost(self) -> None:
        if self._ended:
            return
        if self._download is not None and self._download.held:
            self._download.after = self.peer_lost  # (what the peer sent is still owed)
            return
        self._info("upstream disconnected")
        self._finish(OK)

    # ------------------------------------------------------------------ limits, timers

    def _arm_timer(self, timeout: float) -> None:
        self._cancel_timer()
        if timeout > 0:
            self._timer = self.loop.call_at(self.loop.time() + timeout, self._on_timer, timeout)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    @_in_server_log
    def _on_timer(self, timeout: float) -> None:
        self._timer = None
        if self._ended:
            return
        if self._prereading:
            self._finish(OK)
            return
        idle = self.loop.time() - self._active
        if idle < timeout:  # activity since the timer was armed: wait for the rest
            self._timer = self.loop.call_at(self._active + timeout, self._on_timer, timeout)
            return
        peer_name = self.attempt.addr if self.attempt is not None else None
        errorlog.log_error("info", "connection timed out (110: Connection timed out) while "
                           "proxying connection", self.conn_id, self.log_context(peer_name))
        self._finish(OK)

    # ------------------------------------------------------------------ ending

    def _finish(self, status: int) -> None:
        """End the session once: close both sides (flushing what is buffered), log it."""
        if self._ended:
            return
        self._ended = True
        self.status = status
        self._cancel_timer()
        for flow in (self._upload, self._download):
            if flow is not None:
                flow.close()
        task, self._connecting = self._connecting, None
        if task is not None:
            task.cancel()
        attempt, self.attempt = self.attempt, None
        if attempt is not None:
            if self.peer is not None:
                attempt.end(DONE, self)  # closes the peer connection, after flushing
            else:
                attempt.end(ABANDONED, self)  # the client left while connecting
        if self.transport is not None:
            self.transport.close()
        if self.limit is not None:
            self.limit.release()  # limit_conn: this session no longer counts
        transports = self._transports()
        if any(t is not None and t.get_write_buffer_size() for t in transports):
            # close() waits for the write buffers to drain; a side that never reads again
            # must not keep the sockets forever (proxy_timeout bounds the wait)
            self.loop.call_later(self.read_timeout or 60.0, _abort_all, transports)
        self.server.log_session(self)

    def _transports(self) -> tuple[Any, Any]:
        peer = self.peer
        return self.transport, peer.transport if peer is not None else None

    def _gone(self) -> None:
        self.server.sessions.discard(self)
        self.peer = None

    @_in_server_log
    def close(self) -> None:
        """Close now (a worker's fast stop, or worker_shutdown_timeout)."""
        transports = self._transports()
        self._finish(self.status if self.peer is None else OK)
        for transport in transports:
            if transport is not None:
                transport.abort()

    def _crashed(self, exc: BaseException, where: str) -> None:
        """An unexpected exception: report it, end the session (logged, 500) and abort both
        sides and any connect in progress, even when ending it raises too."""
        safety.report(exc, f"{where} (stream session)")
        transports = self._transports()
        try:
            if not self._ended:
                self._finish(INTERNAL_ERROR)
        except Exception as err:
            safety.report(err, "ending a stream session")
        finally:
            self._ended = True
            task, self._connecting = self._connecting, None
            if task is not None:
                task.cancel()
            _abort_all((*transports, *self._transports()))

    def _info(self, what: str) -> None:
        if errorlog.enabled("info"):  # (nginx writes this one without the session's context)
            errorlog.log_error("info", f"{what}, {self.byte_counts()}", self.conn_id)

    def byte_counts(self) -> str:
        attempt = self.attempt
        up_in = attempt.bytes_received if attempt is not None else 0
        up_out = attempt.bytes_sent if attempt is not None else 0
        return (f"bytes from/to client:{self.bytes_received}/{self.bytes_sent}, "
                f"bytes from/to upstream:{up_in}/{up_out}")

    # ------------------------------------------------------------------ what logs and hooks read

    def log_context(self, peer_name: str | None, proxying: bool = False) -> str:
        """nginx's stream suffix: ``, client: ..., server: ...`` and, once proxying (or
        choosing where to: ``proxying``), ``, upstream: "...", bytes from/to client:R/S,
        bytes from/to upstream:R/S``."""
        text = f", client: {self.remote_addr}, server: {self.server_name}"
        if self._upstream is None and not proxying:
            return text
        if peer_name is not None:
            text += f', upstream: "{peer_name}"'
        return f"{text}, {self.byte_counts()}"

    def header(self, name: str) -> None:
        return None

    # what Attempt.end reads of its tries loop (attempt.TriesLoop): the session is its own
    @property
    def upstream(self) -> Any:
        return self._upstream

    @property
    def balancer_state(self) -> Any:
        return self._state

    @property
    def exchange(self) -> Session:
        return self

    @property
    def ended(self) -> bool:
        """The session has its final status ($status reads "000" before)."""
        return self._ended

    def stream_variable(self, name: str) -> str | None:
        return self.server.runtime.variable(self, name)


class PeerSide(asyncio.Protocol):
    """The upstream connection of a session: hands its bytes and events to the session."""

    __slots__ = ("gate", "received", "sent", "session", "transport")

    def __init__(self, session: Session) -> None:
        self.session: Session | None = session
        # what ``Attempt.end`` reads off an http connection for the peer statistics' bytes,
        # copied from the session's ``StreamAttempt`` ($upstream_bytes_*) when the try ends
        self.sent = 0
        self.received = 0
        self.transport: Any = None
        self.gate: Any = None

    @property
    def body_received(self) -> int:
        """What ``Attempt.end`` takes for ``$upstream_response_length`` once a template reads
        byte counts (an http variable read anywhere in the worker): a stream peer's bytes are
        all payload."""
        return self.received

    @_in_server_log
    def connection_made(self, base: asyncio.BaseTransport) -> None:
        # a connection's transport: asyncio's, or uvloop's (which does not subclass Transport)
        self.transport = transport = cast(asyncio.Transport, base)
        self.gate = ReadGate(transport)
        session = self.session
        if session is not None:
            try:
                session.peer_connected(self)
            except Exception as exc:
                session._crashed(exc, _CONNECTING)

    @_in_server_log
    def data_received(self, data: bytes) -> None:
        session = self.session
        if session is not None:
            try:
                session.peer_data(data)
            except Exception as exc:
                session._crashed(exc, "reading from upstream")

    @_in_server_log
    def eof_received(self) -> bool:
        session = self.session
        if session is not None:
            try:
                session.peer_eof()
            except Exception as exc:
                session._crashed(exc, "reading from upstream")
        return True

    @_in_server_log
    def connection_lost(self, exc: Exception | None) -> None:
        session, self.session = self.session, None
        if session is not None and session.peer is self:
            try:
                session.peer_lost()
            except Exception as err:
                safety.report(err, "closing the upstream connection")

    def pause_writing(self) -> None:
        session = self.session
        if session is not None and session.gate is not None:
            session.gate.close(PEER_FULL)

    def resume_writing(self) -> None:
        session = self.session
        if session is not None and session.gate is not None:
            session.gate.open(PEER_FULL)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.session = None
        if self.transport is not None:
            self.transport.abort()


def _joined(addr: str, port: str) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def _no_delay(transport: Any, on: bool) -> None:
    """tcp_nodelay, set as nginx does on both sides (whatever the loop's transports chose)."""
    import socket

    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, int(on))


def _abort_all(transports: tuple[Any, ...]) -> None:
    for transport in transports:
        if transport is not None:
            transport.abort()


def _connect_failure(task: _Opening) -> tuple[Failure | None, str, str]:
    """Why opening the peer connection failed: (failure, log text, nginx's log action); a
    failure of None: it is open."""
    if task.cancelled():
        return Failure.TIMEOUT, "upstream timed out (110: Connection timed out)", _CONNECTING
    exc = task.exception()
    if exc is None:
        return None, "", ""
    tls = sys.modules.get("ssl")  # (loaded only by configs with TLS: no SSLError without it)
    if tls is not None and isinstance(exc, tls.SSLError):
        from scriptlb.http.tls import handshake_error_text

        return Failure.ERROR, handshake_error_text(exc), _HANDSHAKING
    if not isinstance(exc, OSError):
        raise exc
    return Failure.ERROR, f"connect() failed {errorlog.os_error_text(exc)}", _CONNECTING
