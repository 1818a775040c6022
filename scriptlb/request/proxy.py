"""The tries loop of one proxied request: ``UpstreamRequest`` (nginx's ``r->upstream``).

Theory of operation
-------------------
The exchange (``exchange.py``) hands a proxied request to an ``UpstreamRequest``, a state
machine driven by callbacks, with no task per request::

    __init__ (a request without a body: start's usual case inlined) / start: buffer the body
      (proxy_request_buffering on); build the upstream request once; balancer.new_request
    _next_try: hook seam -> peer (hook's address, or balancer.get; None = no live upstreams)
      -> an Attempt (attempt.py) -> its pool's connection, or _connect (a task only to open a
         new connection, connect_timeout)
      -> _send_request -> upstream_head (read_timeout) or upstream_failed
      -> classify: error / timeout / invalid_header / status listed in proxy_next_upstream
      -> attempt.end(...) -> retry.decide -> _next_try again, or the final status

A response that is not retried streams to the client with back-pressure both ways; once any
response byte went to the client there is no retry. Every try ends in ``Attempt.end``: release
or close of the connection, the free of the peer, statistics and timing live there alone.

Timeouts are per request: ``connect_timeout``/``send_timeout``/``read_timeout`` are the
location's ``conf`` until a hook's ``set_timeouts`` (through the exchange's attributes of the
same names) gives this request its own copy of the settings; every try reads ``conf``.

Pooling: a balancer peer's connection goes to the upstream's ``keepalive N`` pool; so does a
hook-set peer's (keyed by address, host name and bind address, as OpenResty's keepalive module
keys by the peer's sockaddr), unless the hook's ``enable_keepalive`` asked for the hook pool
for this try. Both need nginx's recipe: HTTP/1.1 to the peer, no "Connection: close".

Callbacks from the upstream connection and the connect task are guarded like the exchange's
(``safety``): a bug escaping one is an ``[alert]`` and the request is finished anyway.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import ssl
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from scriptlb.config.model import NextUpstream
from scriptlb.hookrt.hooks import run_try
from scriptlb.http.downstream import DROPPED, UNSENT
from scriptlb.http.request_body import SpooledBody
from scriptlb.http.response_head import ResponseHead
from scriptlb.http.tls import TlsConfigError, handshake_error_text
from scriptlb.http.tls_transport import open_tls_connection
from scriptlb.http.tunnel import UPSTREAM_TIMED_OUT, Tunnel
from scriptlb.http.upstream import PREMATURE, ConnState, UpstreamConnection, UpstreamError
from scriptlb.logs import errorlog
from scriptlb.request.attempt import (
    ABANDONED,
    BROKEN,
    DONE,
    FAILED,
    NEXT,
    UPGRADED,
    Attempt,
    TryRecord,
    chosen_anyway,
    clock,
)
from scriptlb.request.headers_filter import with_kept
from scriptlb.request.retry import (
    NON_IDEMPOTENT_METHODS,
    RETRY,
    Failure,
    decide,
    failure_for_status,
    is_stale_connection,
)
from scriptlb.request.store import body_filters
from scriptlb.routing.uri import split_local_addr

if TYPE_CHECKING:
    from scriptlb.config.model import PeerAddr
    from scriptlb.hookrt.api import HookOutcome
    from scriptlb.http.downstream import Request
    from scriptlb.http.pool import ConnectionPool
    from scriptlb.request.exchange import Exchange
    from scriptlb.request.runtime import RequestPlan, UpstreamRuntime
    from scriptlb.state.peers import Peer


_READING_HEADER = "reading response header from upstream"  # nginx's log action
# the peer's headers X-Accel-Redirect passes on to the final response (nginx's "redirect" flag)
_KEPT_BY_ACCEL_REDIRECT = frozenset((b"content-type", b"set-cookie", b"content-disposition", b"cache-control",
                                     b"expires", b"accept-ranges"))
_CONNECTING = "connecting to upstream"
_HANDSHAKING = "SSL handshaking to upstream"

# proxy_request_buffering off: stop reading the client when this much body waits for a peer
STREAM_BODY_WAITING = 64 * 1024


class _Streamed(enum.Enum):
    STREAMED = "streamed"  # (an enum: a marker mypy tells apart by identity)


STREAMED = _Streamed.STREAMED  # the request body goes as it arrives (proxy_request_buffering off)


class _Timeout:
    """One of the tries loop's three timeouts of a request: the location's (``conf``) until a
    hook's set_timeouts sets one, which gives the request its own copy of the settings (the
    tries read ``conf`` alone: no per-request copy of the three values)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, tries: UpstreamRequest | None, owner: type | None = None) -> Any:
        if tries is None:
            return self  # (read on the class)
        return getattr(tries.conf, self.name)

    def __set__(self, tries: UpstreamRequest, seconds: float) -> None:
        changed: dict[str, Any] = {self.name: seconds}
        tries.conf = dataclasses.replace(tries.conf, **changed)


class UpstreamRequest:
    """nginx's ``r->upstream`` for one proxied request: the per-request settings, the tries loop
    and the response streaming (see the module docstring).

    What the hook API and variables read is on the exchange (``tries``, ``last_failure``; it
    reads ``tries_left``, ``tries_cap`` and the three timeouts from here); the try in progress
    is ``attempt``.
    """

    __slots__ = (
        "_body",
        "_body_conn",
        "_connecting",
        "_head",
        "_local_addr",
        "_rate",
        "_tunnel",
        "_waiting_body",
        "attempt",
        "balancer_state",
        "conf",
        "exchange",
        "hook_exit",
        "pass_uri",
        "plan",
        "upstream",
    )
    # set when the tries begin (start)
    balancer_state: Any  # the balancer's per-request state (tries budget, tried peers)
    _head: bytes  # the request head for the peer
    # unset until they happen (read with a default: never on the usual path)
    _waiting_body: bool  # buffering the request body before the first try
    _body_conn: UpstreamConnection | None  # where the streamed body goes now
    _connecting: asyncio.Task[object] | None  # opening a new connection (None: done)
    _tunnel: Tunnel  # after a 101: the two sockets joined
    hook_exit: HookOutcome  # a hook's ngx.exit(N) run, for $balancer_trace
    pass_uri: str | None  # proxy_pass with variables: its URI part, as evaluated

    def __init__(self, exchange: Exchange, upstream: UpstreamRuntime, pass_uri: str | None = None) -> None:
        """Proxying begins here: the exchange's upstream request is this one from now on, and
        the usual request (no body) goes on to its first try at once (start's usual case,
        inlined: one call fewer per request); ``pass_uri``: see proxy_to."""
        self.exchange = exchange
        self.upstream = upstream
        location = exchange.location
        # the location's settings (the timeouts among them: a hook's set_timeouts gives this
        # request its own copy, see _Timeout); the location's upstream request template
        self.conf = conf = location.conf.proxy
        self.plan = plan = location.plan
        # bytes (b"": none), the file a big body was spooled to, or STREAMED (sent as it
        # arrives: proxy_request_buffering off)
        self._body: bytes | SpooledBody | _Streamed = b""
        # proxy_bind, or a hook's bind_to_local_addr
        self._local_addr: tuple[str, int] | None = None
        if location.proxy_bind is not None:
            self._local_addr = local_address(location.proxy_bind(exchange), exchange)
        self.attempt: Attempt | None = None  # the try in progress
        self._rate: Any = None  # the body filters: ssi, proxy_store, limit_rate... (store.py)
        if pass_uri is not None:
            self.pass_uri = pass_uri
        exchange.upstream_request = self
        request = exchange.request
        if (request.has_body or request.content_length is not None or request.expect_continue
                or plan.body_override is not None):
            self.start()
            return
        proxy_host = location.proxy_host
        if proxy_host:  # (else proxy_pass with variables set it)
            exchange.proxy_host = proxy_host
        self._head = plan.build_head(exchange)
        self.balancer_state = upstream.balancer_request(conf.next_upstream_tries, exchange)
        self._next_try()

    # this request's timeouts (the hook API reads and sets them through the exchange)
    connect_timeout = _Timeout()
    send_timeout = _Timeout()
    read_timeout = _Timeout()

    @property
    def _idempotent(self) -> bool:
        """retry.is_idempotent, inlined (read only when a try failed)."""
        return self.exchange.method not in NON_IDEMPOTENT_METHODS

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self.exchange.conn.loop

    @property
    def _tries_started(self) -> float:
        """When the first try began, on the tries' clock (proxy_next_upstream_timeout)."""
        return self.exchange.tries[0].started

    @property
    def tries_left(self) -> int:
        """The tries budget, the try in progress included (the hook API reads it)."""
        return int(self.balancer_state.tries)

    @property
    def tries_cap(self) -> int:
        """proxy_next_upstream_tries (0: no cap; the hook API reads it)."""
        return self.conf.next_upstream_tries

    @property
    def connection(self) -> UpstreamConnection | None:
        """The upstream connection of the try in progress."""
        attempt = self.attempt
        return attempt.conn if attempt is not None else None

    # ------------------------------------------------------------------ the exchange's calls

    def start(self) -> None:
        """Begin the tries (the constructor does for a request without a body): at once for a
        request whose body is streamed as it arrives, else once the buffered body is complete
        (body_received calls this again then). The upstream request is built once, then the
        balancer's request starts and the first try runs."""
        ex = self.exchange
        proxy_host = ex.location.proxy_host
        if proxy_host:  # (else proxy_pass with variables set it)
            ex.proxy_host = proxy_host
        request = ex.request
        plan = self.plan
        if (request.has_body or request.content_length is not None or request.expect_continue
                or plan.body_override is not None):
            if not self._prepare_body(ex, request, plan):
                return
        else:
            self._head = plan.build_head(ex)
        self._begin_tries()

    def _begin_tries(self) -> None:
        """The balancer's request, then the first try."""
        self.balancer_state = self.upstream.balancer_request(self.conf.next_upstream_tries, self.exchange)
        self._next_try()

    def _prepare_body(self, ex: Exchange, request: Request, plan: RequestPlan) -> bool:
        """start's part for a request with a body, a Content-Length, an Expect or a body of the
        location's own: the body and the head for the peer; False while a buffered body is
        still arriving."""
        if request.has_body and not request.complete:
            if self._holds_body(ex):
                return False
        elif request.expect_continue:  # nginx answers it even when there is no body to read
            ex.conn.send_continue()
        if plan.body_override is None and request.content_length is None and not request.has_body:
            self._head = plan.build_head(ex)  # (an Expect without a body)
        else:
            if self._body is not STREAMED and request.has_body:
                self._body = request.body.buffered()  # bytes, or the file it was spooled to
            if plan.body_override is not None:
                self._body = plan.body_override(ex)
            self._build_head()
        return True

    def _holds_body(self, ex: Exchange) -> bool:
        """A body still arriving: streamed (False: the tries begin now) or buffered (True:
        they begin once it is complete)."""
        streamed = self._wants_streamed_body()
        ex.conn.send_continue()
        if streamed:
            self._body = STREAMED
            self._body_conn = None  # (until the connection is open)
            return False
        self._waiting_body = True  # body_received() starts the tries
        return True

    def body_received(self) -> None:
        if self._body is STREAMED:
            self._pump_body()
        elif getattr(self, "_waiting_body", False) and self.exchange.request.complete:
            self._waiting_body = False
            self.start()

    def client_paused(self) -> None:
        conn = self.connection
        if conn is not None:
            conn.pause_reading()

    def client_resumed(self) -> None:
        conn = self.connection
        if conn is not None:
            conn.resume_reading()

    def hangup_action(self) -> str | None:
        """What this request was doing when the client half-closed, in nginx's words for the
        log line; None when nginx carries on regardless: a response streaming buffered
        (``proxy_buffering on``), a tunnel (after a 101, the half-close is passed on)."""
        if hasattr(self, "_tunnel"):
            return None
        if self.exchange.conn.response_started:
            return None if self.conf.buffering else "sending to client"
        if getattr(self, "_connecting", None) is not None:
            return _CONNECTING
        attempt = self.attempt
        conn = attempt.conn if attempt is not None else None
        if conn is not None and conn.received:
            return _READING_HEADER
        return "sending request to upstream"

    def abandon(self) -> None:
        """The client side ended the request (or a bug did): stop everything, free the peer."""
        self._waiting_body = False
        self._body_conn = None
        tunnel: Tunnel | None = getattr(self, "_tunnel", None)
        if tunnel is not None:
            tunnel.end("")  # (ends the try and logs the request)
        connecting = getattr(self, "_connecting", None)
        self._connecting = None
        if connecting is not None:
            connecting.cancel()
        attempt = self.attempt
        if attempt is not None:
            self.attempt = None
            attempt.end(ABANDONED, self)
        if self._rate is not None:
            self._rate.cancel()

    # ------------------------------------------------------------------ the tries loop

    def _wants_streamed_body(self) -> bool:
        """``proxy_request_buffering off`` streams the body as it arrives, unless it is chunked
        and the peer speaks HTTP/1.0 (nginx buffers it then, as it must send a length)."""
        request = self.exchange.request
        if self.conf.request_buffering or request.complete or not request.has_body:
            return False
        if self.plan.body_override is not None:
            return False  # (proxy_set_body, proxy_pass_request_body off: the client's is dropped)
        return not (request.chunked and not self.plan.http11)

    def _build_head(self) -> None:
        """The request line and headers for the peer (again after a hook's recreate_request)."""
        ex = self.exchange
        request = ex.request
        body = self._body
        if body is STREAMED:
            self._head = self.plan.build_framed_head(ex, request.content_length, chunked=request.chunked)
        elif self.plan.sends_no_body:  # proxy_pass_request_body off
            self._head = self.plan.build_head(ex)
        else:
            sends_length = (request.has_body or request.content_length is not None  # incl. "0"
                            or self.plan.body_override is not None)
            self._head = self.plan.build_framed_head(ex, len(body) if sends_length else None)

    def _next_try(self) -> None:
        """The hook seam, then a peer, then a connection to it (nginx's upstream_connect)."""
        ex = self.exchange
        upstream = self.upstream
        outcome = None
        if upstream.hook is not None:
            outcome = self._run_hook(upstream.hook)
            if outcome is None:
                return  # (the hook ended the request: ngx.exit)
        if outcome is None or outcome.addr is None:
            state = self.balancer_state
            peer = state.peer_set.only if upstream.round_robin_get else None
            if peer is not None and not peer.down and not peer.max_conns:
                # round robin's get for nginx's single peer, inlined (the one-server upstream):
                # nothing to choose, no clock to read
                peer.conns += 1
            else:
                peer = upstream.balancer.get(state, ex.conn.loop.time())
                if peer is None:
                    self._no_live_upstreams(outcome)
                    return
            name = peer.name
            if self._local_addr is None and ex.location.tls is None:
                # the usual try: the pool key is the peer's address text
                pool: ConnectionPool | None
                if self.plan.pooled:
                    pool = upstream.pool
                    conn = pool.acquire(name)
                else:
                    pool = conn = None
                attempt = self.attempt = Attempt(upstream.stats, name, peer, pool, conn)
                if outcome is not None:  # (a hook ran and left the choice to the balancer)
                    attempt.hook = outcome
            else:
                pool = upstream.pool if self.plan.pooled else None
                attempt = self.attempt = self._keyed_attempt(name, peer, "", pool, outcome)
                conn = attempt.conn
        else:  # (the hook set the address)
            addr = outcome.addr
            pool = self._hook_peer_pool(addr, outcome)
            host = outcome.host
            if host or self._local_addr is not None or ex.location.tls is not None:
                attempt = self.attempt = self._keyed_attempt(addr.name, None, host or "", pool, outcome)
                conn = attempt.conn
            else:  # (the usual hook-set try: keyed by the address text too)
                name = addr.name
                conn = pool.acquire(name) if pool is not None else None
                attempt = self.attempt = Attempt(upstream.stats, name, None, pool, conn)
                attempt.hook = outcome
            attempt.peer_addr = addr
        ex.tries += (attempt,)  # (the first: the shared empty tuple + this one is this one)
        if conn is None:
            self._connect(attempt)
            return
        body = self._body
        if not isinstance(body, bytes):  # (spooled or STREAMED)
            self._send_request(conn)
            return
        # _send_request's usual case (a pooled connection, no body or a buffered one in memory)
        plan = self.plan
        conf = self.conf
        conn.head_limit = conf.buffer_size  # proxy_buffer_size
        conn.upgrade = ex.request.connection is not None and self._upgrade_asked()
        conn.start(self, self._head, body, conf.read_timeout, conf.send_timeout, ex.method == "HEAD",
                   plan.http11, plan.close_after)

    def _keyed_attempt(self, name: str, peer: Peer | None, host: str, pool: ConnectionPool | None,
                       outcome: HookOutcome | None) -> Attempt:
        """_next_try's try when its pool key is more than the address text: to a peer by a
        hook's host name, through proxy_pass https:// (the TLS name), from a bound local
        address (proxy_bind, a hook's bind_to_local_addr)."""
        ex = self.exchange
        tls = ex.location.tls
        tls_name = None
        if tls is not None:
            # the hook's host (set_current_peer's third argument) is this try's TLS name; a
            # pooled connection is reused only for the same name (and never for plain HTTP)
            tls_name = host or tls.name(ex)
            host = "https:" + tls_name
        local_addr = self._local_addr
        key = (name, host, local_addr) if host or local_addr is not None else name  # (PoolKey)
        conn = pool.acquire(key) if pool is not None else None
        attempt = Attempt(self.upstream.stats, name, peer, pool, conn)
        if outcome is not None:
            attempt.hook = outcome
        attempt.key = key
        attempt.tls_name = tls_name
        return attempt

    # The balancer hook's run before a try: hooks.run_try, taken as this class's own method so
    # that the tries loop enters it with no frame of ours in between (it runs before every
    # try); a run that did more than set the peer comes back through apply_hook_outcome.
    _run_hook = run_try

    def apply_hook_outcome(self, outcome: HookOutcome) -> HookOutcome | None:
        """What a run that did more than set the peer changes for this and later tries (bind
        address, rebuilt request); None when it ended the request (ngx.exit)."""
        if outcome.exit_status is not None:
            self.hook_exit = outcome
            self.exchange.finish_with_page(outcome.exit_status)
            return None
        if outcome.local_addr is not None:
            self._local_addr = split_local_addr(outcome.local_addr)
        if outcome.recreate:
            self._build_head()
        return outcome

    def _hook_peer_pool(self, addr: PeerAddr, outcome: HookOutcome) -> ConnectionPool | None:
        """A hook-set peer's try: the pool its connection comes from and goes back to."""
        upstream = self.upstream
        chosen = upstream.peers.by_name.get(addr.name)
        if chosen is not None and (chosen.down or chosen.fails):  # (one test when usable)
            chosen_anyway(upstream, chosen, outcome, self.exchange, self.loop.time(), _CONNECTING)
        # The hook pool when enable_keepalive asked for it (this try's override), else the
        # upstream's keepalive N pool as for its own peers (as OpenResty's keepalive module
        # pools whatever peer the balancer hook set). Either needs nginx's recipe: HTTP/1.1 to
        # the peer, no "Connection: close".
        if outcome.plain:  # (the usual run: no more tries granted, no keepalive override)
            return upstream.pool if self.plan.pooled else None
        self.balancer_state.tries += outcome.more_tries
        keepalive = outcome.keepalive
        if keepalive is None:
            return upstream.pool if self.plan.pooled else None
        return None if self.plan.close_after else upstream.hook_pool(*keepalive)

    def _connect(self, attempt: Attempt) -> None:
        addr = attempt.connect_addr()
        loop = self.loop
        conn = UpstreamConnection(loop, attempt.pool_key(), attempt.addr)
        attempt.conn = conn
        attempt.reused = False
        tls = self.exchange.location.tls
        opening: Coroutine[Any, Any, object]
        if tls is not None:
            # our own TLS transport (tls_transport): it can resume the peer's last session
            name = attempt.tls_name  # (set by _keyed_attempt: a TLS location's tries)
            key = (attempt.addr, name)
            try:
                context = tls.context_for(self.exchange)
            except TlsConfigError as e:  # a certificate named by variables that does not load
                self._no_certificate(attempt, str(e))
                return
            opening = open_tls_connection(loop, conn, addr.host, addr.port, addr.unix_path, self._local_addr,
                                          context, tls.server_hostname(name or ""), tls.session(key, context),
                                          tls.keeper(key, context))
        elif addr.unix_path is not None:
            opening = loop.create_unix_connection(lambda: conn, addr.unix_path)
        else:
            assert addr.host is not None  # (an address without unix_path has a host)
            opening = loop.create_connection(lambda: conn, addr.host, addr.port, local_addr=self._local_addr)
        task = loop.create_task(opening)
        timer = loop.call_later(self.conf.connect_timeout, task.cancel)
        self._connecting = task
        task.add_done_callback(lambda done: self._connected(done, conn, timer))

    def _connected(self, task: asyncio.Task[object], conn: UpstreamConnection,
                   timer: asyncio.TimerHandle) -> None:
        timer.cancel()
        if self._connecting is not task:
            conn.abort()  # the request ended while we were connecting (client gone)
            return
        self._connecting = None
        try:
            err = _connect_error(task, conn)
            if err is None:
                attempt = self.attempt
                assert attempt is not None
                attempt.connected(conn)
                self._send_request(conn)
                return
            conn.abort()
            self._try_failed(err)
        except Exception as exc:
            self.exchange.crashed(exc, _CONNECTING)

    def _send_request(self, conn: UpstreamConnection) -> None:
        ex = self.exchange
        plan = self.plan
        conf = self.conf
        conn.head_limit = conf.buffer_size  # proxy_buffer_size
        conn.upgrade = ex.request.connection is not None and self._upgrade_asked()
        body = self._body
        if body is STREAMED:
            self._send_streamed(conn)
            return
        if isinstance(body, bytes):  # (b"": the usual GET)
            conn.start(self, self._head, body, conf.read_timeout, conf.send_timeout, ex.method == "HEAD",
                       plan.http11, plan.close_after)
        else:
            conn.start(self, self._head, None, conf.read_timeout, conf.send_timeout, ex.method == "HEAD",
                       plan.http11, plan.close_after)
            body.send(conn)  # (a spooled body: every try again from the file's start)

    def _upgrade_asked(self) -> bool:
        """A 101 from the peer may switch the connection only if the client's Connection
        header names "upgrade" (llhttp then saw an Upgrade request) and it sent an Upgrade
        header."""
        ex = self.exchange
        connection = ex.request.connection
        return (connection is not None and b"upgrade" in connection.lower()
                and ex.header("upgrade") is not None)

    def _send_streamed(self, conn: UpstreamConnection) -> None:
        """proxy_request_buffering off: what arrived already goes with the head, in one write
        (as nginx); the rest follows as it comes."""
        ex = self.exchange
        plan = self.plan
        early, last = self._body_bytes()
        conf = self.conf
        conn.start(self, self._head + early, None, conf.read_timeout, conf.send_timeout, ex.method == "HEAD",
                   plan.http11, plan.close_after)
        if last:
            conn.write_body(b"", last=True)
            ex.conn.resume_body()  # (paused while connecting if much was waiting)
            return
        self._body_conn = conn
        conn.on_writable = self._pump_body
        self._pump_body()

    def _body_bytes(self) -> tuple[bytes, bool]:
        """A streamed body's bytes that arrived and were not sent yet, framed for the peer,
        and whether they end it."""
        request = self.exchange.request
        data = request.take_body()
        if data and request.chunked:
            data = b"%x\r\n%s\r\n" % (len(data), data)
        if request.complete:
            return (data + b"0\r\n\r\n" if request.chunked else data), True
        return data, False

    def _pump_body(self) -> None:
        """Streamed body: move what arrived to the upstream connection, with back-pressure
        both ways (the client is paused while the peer's socket buffer is full, or while we
        are still connecting and more than a little is waiting)."""
        client = self.exchange.conn
        request = self.exchange.request
        conn = self._body_conn
        if conn is None:
            if sum(map(len, request.body)) > STREAM_BODY_WAITING:
                client.pause_body()
            return
        data, last = self._body_bytes()
        if last:
            self._body_conn = None
            conn.write_body(data, last=True)  # (the last bytes and the end in one write, as nginx)
        elif data:
            conn.write_body(data, last=False)
        if conn.write_buffer_full:
            client.pause_body()
        else:
            client.resume_body()

    # ------------------------------------------------------------------ UpstreamHandler callbacks

    def upstream_head(self, response: ResponseHead) -> None:
        attempt: Attempt = self.attempt  # type: ignore[assignment]  # (a head comes to a try in progress)
        attempt.header_time = clock() - attempt.started
        attempt.status = status = response.status
        # (a 200 without Location, Refresh or X-Accel-* goes to the client as it is: the usual
        # response, one test; _diverted tells the other statuses apart)
        if (status != 200 or response.rewritable) and self._diverted(attempt, response):
            return
        # give the client this response, streaming its body with back-pressure
        conn: UpstreamConnection = attempt.conn  # type: ignore[assignment]  # (the head came on it)
        ex = self.exchange
        ex.status = status
        ex.upstream_headers = response  # (its pairs, parsed if something reads them)
        headers = response.lines if response.connection is None else response.client_headers()
        location = ex.location
        if response.rewritable and location.header_rewrite is not None:  # proxy_redirect, proxy_cookie_*
            headers = location.header_rewrite(ex, headers)
        client = ex.conn
        if location.plain_response and not ex.err_status:  # (the usual response)
            ex.response_headers = headers
            client.send_head(status, headers, response.content_length, reason=response.reason)
        else:
            self._send_head_edited(ex, response, headers)
        # the body that came with the head goes out with it; straight to the client unless
        # body filters sit between
        conn.stream_to(self, client.send_body if self._rate is None else self.upstream_body)
        if self.attempt is attempt:  # still streaming: not completed by stream_to
            client.flush()
            if client.writing_paused:
                conn.pause_reading()

    def _diverted(self, attempt: Attempt, response: ResponseHead) -> bool:
        """A response that does not go to the client as it is: a 101 (the tunnel), a status
        proxy_next_upstream retries, X-Accel-Redirect, an error_page (proxy_intercept_errors).
        True when it was handled here."""
        status = response.status
        if status == 101:  # (only when the client asked to switch: see UpstreamConnection)
            self._start_tunnel(attempt, response)
            return True
        failure = failure_for_status(status) if status >= 403 else None
        if failure is not None and self.conf.next_upstream & NextUpstream(int(failure)):
            verdict = decide(failure, self.balancer_state.tries - 1, self._tries_started, clock(), self.conf,
                             self._idempotent, request_sent=True)
            if verdict == RETRY:
                self.attempt = None
                attempt.end(NEXT, self, failure, _READING_HEADER)
                self._next_try()
                return True
        if response.rewritable and self._accel_redirect(attempt, response):
            return True
        if status >= 300 and self.exchange.intercepts(status):
            self._intercepted(attempt, response)
            return True
        return False

    def _accel_redirect(self, attempt: Attempt, response: ResponseHead) -> bool:
        """X-Accel-Redirect (unless proxy_ignore_headers names it): the peer's response is
        dropped, a few of its headers kept, and the request goes on at the URI it names."""
        uri = next((value for name, value in response.headers if name.lower() == b"x-accel-redirect"), None)
        if uri is None or "x-accel-redirect" in self.conf.ignore_headers:
            return False
        self.attempt = None
        conn, attempt.conn = attempt.conn, None
        if conn is not None:
            conn.abort()
        ex = self.exchange
        ex.upstream_headers = response  # (its pairs, parsed if something reads them)
        attempt.end(DONE, self)
        kept = b"".join(name + b": " + value + b"\r\n" for name, value in response.headers
                        if name.lower() in _KEPT_BY_ACCEL_REDIRECT)
        ex.accel_redirect(uri.decode("latin-1"), kept)
        return True

    def _intercepted(self, attempt: Attempt, response: ResponseHead) -> None:
        """proxy_intercept_errors: the peer's response is dropped (its connection with it: the
        body is unread) and the request goes on to its error_page."""
        self.attempt = None
        conn, attempt.conn = attempt.conn, None
        if conn is not None:
            conn.abort()
        attempt.end(DONE, self)
        status = response.status
        if status == 401:  # nginx keeps the peer's challenges for the error page's answer
            self.exchange.keep_headers(b"".join(name + b": " + value + b"\r\n" for name, value in
                                                response.headers if name.lower() == b"www-authenticate"))
        self.exchange.finish_with_page(status)

    def upstream_body(self, data: bytes) -> None:
        rate = self._rate
        if rate is None:
            self.exchange.conn.send_body(data)
        else:
            rate.body(data)

    def upstream_complete(self) -> None:
        attempt = self.attempt
        if attempt is not None:
            self.attempt = None
            attempt.end(DONE, self)
        filters = self._rate
        if filters is not None:  # (proxy_store names its file; the rate may still hold the body)
            filters.complete(self.exchange.finish)
            return
        self.exchange.finish()

    def upstream_failed(self, err: UpstreamError) -> None:
        self._body_conn = None
        attempt = self.attempt
        if attempt is None:
            return  # (the try already ended: nothing waits for this connection any more)
        attempt.conn = None  # (closed by the connection itself)
        if self._rate is not None:  # (a half body: no stored file, nothing more held)
            self._rate.cancel()
            self._rate = None
        if attempt.status is not None:  # (its head came and was not diverted: the response is the client's)
            self._failed_mid_body(attempt, err)
        elif is_stale_connection(err.failure, err.response_started, attempt.reused, self._body is STREAMED,
                                 self._idempotent, self.conf.next_upstream):
            self._retry_fresh(attempt, err)
        else:
            self._try_failed(err)

    def upstream_crashed(self, exc: BaseException, where: str) -> None:
        """The safety net: a bug escaped one of the upstream connection's callbacks."""
        self.exchange.crashed(exc, where)

    # ------------------------------------------------------------------ try outcomes

    def _send_head_edited(self, ex: Exchange, response: ResponseHead, headers: bytes) -> None:
        """The head of a response whose headers the location edits, or after an internal
        redirect."""
        location = ex.location
        if location.response_filter is not None:  # proxy_hide_header, proxy_pass_header
            headers = location.response_filter(headers, response.headers)
        if location.add_headers is not None:
            headers = location.add_headers(ex, response.status, headers)
        trace = location.trace
        if trace is not None:  # balancer_trace_header on
            headers = trace.headers(ex, headers)
        ex.response_headers = headers
        if location.body_filtered:  # ssi, proxy_store, limit_rate... (scriptlb.request.store)
            self._rate = filters = body_filters(self, response, headers)
            if filters is not None and filters.holds_head and location.add_trailers is None:
                return  # (the filter sends the head with the body it made)
        if not ex.err_status and location.add_trailers is None:
            ex.conn.send_head(response.status, headers, response.content_length, reason=response.reason)
        else:
            _send_head_unusual(ex, response, headers)

    def _start_tunnel(self, attempt: Attempt, response: ResponseHead) -> None:
        """The peer switched protocols: pass its 101 on, then join the two sockets. The try
        stays in progress (its ``$upstream_*`` are the tunnel's) until the tunnel ends."""
        conn = attempt.conn
        assert conn is not None
        ex = self.exchange
        ex.status = 101
        ex.upstream_headers = response  # (its pairs, parsed if something reads them)
        headers = response.client_headers() + _upgrade_lines(response.headers)
        ex.response_headers = headers
        client = ex.conn
        client.send_head(101, headers, None, reason=response.reason)
        client.flush()
        upstream_transport, from_upstream = conn.detach()
        attempt.conn = None
        assert client.transport is not None
        client_timeout = ex.location.conf.send_timeout  # (send_timeout: the client side's)
        conf = self.conf
        tunnel = self._tunnel = Tunnel(self.loop, conf.read_timeout, conf.send_timeout, client_timeout,
                                       self._tunnel_ended)
        client_side, upstream_side = tunnel.sides(client.transport, upstream_transport)
        upstream_transport.set_protocol(upstream_side)
        _transport, from_client = client.switch_protocols(client_side)
        client_side.lost = client.connection_lost  # (the client connection's own clean-up)
        tunnel.start(from_client, from_upstream)

    def _tunnel_ended(self, reason: str) -> None:
        tunnel: Tunnel | None = getattr(self, "_tunnel", None)
        attempt = self.attempt
        self.attempt = None
        ex = self.exchange
        try:
            if reason and attempt is not None:
                level = "error" if reason == UPSTREAM_TIMED_OUT else "info"
                errorlog.log_error(level, f"{reason} while proxying upgraded connection", ex.conn_id,
                                   ex.log_context(attempt.addr))
            if tunnel is not None:
                ex.conn.bytes_sent += tunnel.sent_to_client
                ex.conn.body_bytes_sent += tunnel.sent_to_client
            if attempt is not None:
                attempt.end(UPGRADED, self)
            ex.finish(UNSENT)
        except Exception as exc:
            ex.crashed(exc, "proxying upgraded connection")

    def _try_failed(self, err: UpstreamError) -> None:
        """nginx's ngx_http_upstream_next: log, end the try, and retry or answer with our page."""
        attempt = self.attempt
        assert attempt is not None
        self.attempt = None
        self._body_conn = None
        self._log_error(attempt, err, err.phase)
        failure = attempt.end(FAILED, self, err.failure, err.phase)
        assert failure is not None
        verdict = decide(failure, self.balancer_state.tries, self._tries_started, clock(), self.conf,
                         self._idempotent, request_sent=err.request_sent)
        if verdict == RETRY:
            self._next_try()
        else:
            self.exchange.finish_with_page(verdict)

    def _retry_fresh(self, attempt: Attempt, err: UpstreamError) -> None:
        """A pooled connection the peer had closed: nginx retries without costing a try; we
        stay on the same peer, in the same try, on a new connection."""
        self._log_error(attempt, err, f"{err.phase} (cached connection, retrying on a new one)", "info")
        self._connect(attempt)

    def _failed_mid_body(self, attempt: Attempt, err: UpstreamError) -> None:
        """The client already has part of the response: close it, never fake a complete one."""
        self.attempt = None
        self._log_error(attempt, err, "reading upstream")
        attempt.end(BROKEN, self)
        self.exchange.finish(DROPPED)

    def _no_live_upstreams(self, hook: HookOutcome | None) -> None:
        ex = self.exchange
        record = TryRecord(self.upstream.name, 0.0, hook)
        record.status = 502
        record.response_time = 0.0  # nginx logs "0.000" for it: every try has a response time
        ex.tries += (record,)
        errorlog.log_error("error", "no live upstreams while connecting to upstream",
                           ex.conn_id, ex.log_context(None))
        ex.finish_with_page(502)

    def _no_certificate(self, attempt: Attempt, text: str) -> None:
        """nginx's answer when proxy_ssl_certificate's variables name a pair that does not load:
        500, the peer not blamed."""
        ex = self.exchange
        self.attempt = None
        attempt.conn = None
        errorlog.log_error("error", f"{text} while {_CONNECTING}", ex.conn_id, ex.log_context(attempt.addr))
        attempt.end(ABANDONED, self)
        ex.finish_with_page(500)

    def _log_error(self, attempt: Attempt, err: UpstreamError, phase: str, level: str = "error") -> None:
        ex = self.exchange
        errorlog.log_error(level, f"{err} while {phase}", ex.conn_id, ex.log_context(attempt.addr))


def _send_head_unusual(ex: Exchange, response: ResponseHead, headers: bytes) -> None:
    """The head of a peer's response after an internal redirect (the headers it kept; after
    error_page, the original status) or with add_trailer (chunked, to carry them)."""
    err_status = ex.err_status
    if err_status:
        headers = ex.response_headers = with_kept(ex.kept_headers, headers, kept_wins=False)
    if err_status > 0:
        ex.status = err_status
        ex.conn.send_head(err_status, headers, ex.body_length(err_status, response.content_length))
    else:
        length = ex.body_length(response.status, response.content_length)
        ex.conn.send_head(response.status, headers, length, reason=response.reason)


def local_address(text: str, exchange: Any) -> tuple[str, int] | None:
    """proxy_bind's value for this request or session; an empty one binds nothing, an invalid one is
    logged and binds nothing (nginx's ngx_http_upstream_set_local)."""
    if not text:
        return None
    from scriptlb.request.realip import parse_addr_port  # (an IP literal, as ngx_parse_addr_port)

    parsed = parse_addr_port(text)
    if parsed is None:
        errorlog.log_error("error", f'invalid local address "{text}"', exchange.conn_id,
                           exchange.log_context(None))
    return parsed


def _upgrade_lines(headers: list[tuple[bytes, bytes]]) -> bytes:
    """The peer's Upgrade header (hop-by-hop, hidden from other responses) for a 101."""
    return b"".join(name + b": " + value + b"\r\n" for name, value in headers if name.lower() == b"upgrade")


def _connect_error(task: asyncio.Task[object], conn: UpstreamConnection) -> UpstreamError | None:
    """Why opening the connection failed (None: it is open). A connection the peer closed
    between the connect and this callback (an overloaded peer accepting then dropping) is a
    failed try, as nginx counts it: "upstream prematurely closed connection"."""
    if task.cancelled():
        return UpstreamError(Failure.TIMEOUT, "upstream timed out (110: Connection timed out)",
                             phase=_CONNECTING, request_sent=False)
    exc = task.exception()
    if isinstance(exc, ssl.SSLError):
        return UpstreamError(Failure.ERROR, handshake_error_text(exc), phase=_HANDSHAKING, request_sent=False)
    if exc is not None:
        if not isinstance(exc, OSError):
            raise exc  # a bug, not a network failure (the safety net reports it)
        return UpstreamError(Failure.ERROR, f"connect() failed {errorlog.os_error_text(exc)}",
                             phase=_CONNECTING, request_sent=False)
    if conn.state is not ConnState.ACTIVE or not conn.is_alive():
        return UpstreamError(Failure.ERROR, PREMATURE, phase=_READING_HEADER, request_sent=False)
    return None


# Names that lived here before the split into exchange.py, attempt.py and uri.py, resolved on
# first use for code written against the old layout (scriptlb itself imports them from their
# new modules; TryRecord and split_local_addr are still importable from here).
_MOVED = {
    "Exchange": "scriptlb.request.exchange",
    "normalize_uri": "scriptlb.routing.uri",
    "split_target": "scriptlb.routing.uri",
    "quote_uri": "scriptlb.routing.uri",
}


def __getattr__(name: str) -> Any:
    module = _MOVED.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
