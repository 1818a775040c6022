"""One request's life: routing, ``return``, and the tries loop (the ONE place pieces meet).

Theory of operation
-------------------
``open_exchange`` (called by the client connection once a request head is parsed) builds an
``Exchange``: it decodes the URI, selects the server by Host and the location by URI. Nothing
is sent yet; a pipelined request may wait behind another one. The exchange is also what
variables, logs and hooks read (docs/architecture.md, "Request/exchange").

``Exchange.start`` runs when the request becomes the connection's active one:

* ``return`` locations answer at once (this is how the demo backends and test servers work);
* proxied locations hand over to an ``UpstreamRequest`` (nginx's ``r->upstream``), a state
  machine driven by callbacks, with no task per request::

      start: per-request timeouts; buffer the body (proxy_request_buffering on)
      _begin_tries: build the upstream request once; balancer.new_request
      _next_try: hook seam -> peer (hook's address, or balancer.get; None = no live upstreams)
        -> pool.acquire, or _connect (a task only to open a new connection, connect_timeout)
        -> _send_request -> upstream_head (read_timeout) or upstream_failed
        -> classify: error / timeout / invalid_header / status listed in proxy_next_upstream
        -> free the peer -> retry.decide -> _next_try again, or the final status

  A response that is not retried streams to the client with back-pressure both ways; once any
  response byte went to the client there is no retry. At the end the upstream connection goes
  back to the pool if it is reusable, the peer is freed and the access log is written.

Timeouts are per request: ``connect_timeout``/``send_timeout``/``read_timeout`` are copied from
the location when proxying starts and every try reads them from the exchange (a hook's
``set_timeouts`` changes this request only).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote

from scriptlb import errorlog, responses
from scriptlb.config.model import ClientBodyConf, NextUpstream, PeerAddr
from scriptlb.downstream import ClientConnection, Request
from scriptlb.locations import normalize_host
from scriptlb.request_body import SpooledBody
from scriptlb.retry import (
    RETRY,
    Failure,
    decide,
    failure_for_status,
    is_counted_failure,
    is_idempotent,
    last_failure_state,
    last_failure_status,
)
from scriptlb.stats import WEIGHT_GENERATION
from scriptlb.upstream import ResponseHead, UpstreamConnection, UpstreamError

if TYPE_CHECKING:
    from scriptlb.peers import Peer
    from scriptlb.pool import ConnectionPool
    from scriptlb.runtime import Runtime, ServerRoute, UpstreamRuntime


class TryRecord:
    """One try, for the ``$upstream_*`` lists (times in seconds, None when not reached)."""

    __slots__ = ("addr", "connect_time", "header_time", "response_time", "started", "status")

    def __init__(self, addr: str, started: float) -> None:
        self.addr = addr
        self.started = started
        self.status: int | None = None
        self.connect_time: float | None = None
        self.header_time: float | None = None
        self.response_time: float | None = None

    def __repr__(self) -> str:
        return f"<TryRecord {self.addr} {self.status}>"


_READING_HEADER = "reading response header from upstream"  # nginx's log action

# proxy_request_buffering off: stop reading the client when this much body waits for a peer
STREAM_BODY_WAITING = 64 * 1024


# --------------------------------------------------------------------------- URIs


def normalize_uri(path: str) -> str | None:
    """nginx's ngx_http_parse_complex_uri: decode %XX, merge slashes, resolve ``.``/``..``.

    None when the path escapes the root (nginx answers 400).
    """
    if "%" in path:
        # a byte per character, as nginx: %C3%A9 is two characters, logged \xC3\xA9
        path = unquote(path, encoding="latin-1")
        if "\x00" in path:
            return None  # nginx: a decoded NUL is a bad request
    if "//" not in path and "/." not in path:
        return path
    trailing = path.endswith("/") or path.endswith("/.") or path.endswith("/..")
    segments: list[str] = []
    for segment in path.split("/"):
        if not segment or segment == ".":
            continue
        if segment == "..":
            if not segments:
                return None
            segments.pop()
        else:
            segments.append(segment)
    result = "/" + "/".join(segments)
    if trailing and result != "/":
        result += "/"
    return result


def split_target(target: bytes) -> tuple[str, str | None] | None:
    """``/p?a=1`` -> ("/p", "a=1"); absolute-form targets lose scheme and host. None: invalid."""
    text = target.decode("latin-1")
    if not text.startswith("/"):
        scheme_end = text.find("://")
        if scheme_end <= 0:
            return None
        slash = text.find("/", scheme_end + 3)
        text = text[slash:] if slash != -1 else "/"
    path, sep, args = text.partition("?")
    return path, (args if sep else None)


# --------------------------------------------------------------------------- the exchange


_LOG_TIME = [0.0]  # the log phase's time while it runs (0.0: not in a log phase)


def log_clock() -> float:
    """The access logs' clock in locations with a log hook: the log phase's time."""
    return _LOG_TIME[0] or time.time()


class Exchange:
    """One request: what variables, hooks and logs read, and the code that serves it."""

    __slots__ = (
        "_early_status",
        "_finished",
        "_logged",
        "args",
        "body_bytes_sent",
        "bytes_sent",
        "conn",
        "connect_timeout",
        "ctx",
        "headers",
        "host",
        "http_version",
        "last_failure",
        "location",
        "loop",
        "method",
        "proxy_host",
        "read_timeout",
        "request",
        "request_uri",
        "response_headers",
        "runtime",
        "scheme",
        "send_timeout",
        "server",
        "start_time",
        "status",
        "tries",
        "tries_cap",
        "tries_left",
        "upstream_headers",
        "upstream_name",
        "upstream_request",
        "uri",
    )

    def __init__(self, conn: ClientConnection, request: Request, runtime: Runtime) -> None:
        self.conn = conn
        self.request = request
        self.runtime = runtime
        self.loop = conn.loop
        self.start_time = time.time()
        self.method = request.method
        self.http_version = request.version
        self.headers = request.headers
        self.request_uri = request.target.decode("latin-1")
        self.scheme = "http"
        self.status = 0
        self.body_bytes_sent = 0
        self.bytes_sent = 0
        self.ctx: dict = {}
        self.tries: list[TryRecord] = []
        self.upstream_name: str | None = None
        # for $upstream_http_*: the peer's headers once a response came (a shared empty tuple
        # until then: no list allocated for requests that never get one)
        self.upstream_headers: list[tuple[bytes, bytes]] | tuple[()] = ()
        self.response_headers: bytes = b""  # sent to the client, for $sent_http_*
        # per-request timeouts (copied from the location when proxying starts; hooks change them)
        self.connect_timeout = 60.0
        self.send_timeout = 60.0
        self.read_timeout = 60.0
        # the tries loop, for the hook API
        self.last_failure: tuple[str, int] | None = None
        self.tries_left = 0
        self.tries_cap = 0
        self.proxy_host = ""

        self._early_status = 0  # an error found while routing, answered when we become active
        self._finished = False
        self._logged = False  # the log phase ran (it runs once per request)
        self.upstream_request: UpstreamRequest | None = None  # set when proxying
        self._route()

    # ------------------------------------------------------------------ routing

    def _route(self) -> None:
        split = split_target(self.request.target)
        uri = normalize_uri(split[0]) if split is not None else None
        if split is None or uri is None:
            self._early_status = 400
            self.uri, self.args = "/", None
            self.host = ""
            self.server = self.conn_route().default_server
            # nginx logs this 400 with the server's access_log; ours are per location, so the
            # logs (and log hook) of the server's "/" stand in, as for log_rejected
            self.location = self.server.match("/")
            return
        self.uri, self.args = uri, split[1]
        raw_host = self.request.host
        conn = self.conn
        cached = conn.host_cache
        if cached is not None and cached[0] == raw_host:
            host, self.server = cached[1], cached[2]  # keep-alive: same Host, same server
        else:
            host = normalize_host(raw_host.decode("latin-1")) if raw_host is not None else None
            self.server = self.conn_route().select(host)
            if raw_host is not None and host is None:
                self._early_status = 400  # nginx: client sent invalid host header
            else:
                conn.host_cache = (raw_host, host, self.server)
        self.host = host or self.server.name
        self.location = self.server.match(uri)

    def conn_route(self) -> ServerRoute:
        """The listener's server route, resolved once per connection."""
        route = self.conn.route
        if route is None:
            route = self.conn.route = self.runtime.route_for(self.conn)
        return route

    # what the client connection reads
    @property
    def max_body_size(self) -> int:
        return self.location.conf.client_max_body_size

    @property
    def body_timeout(self) -> float:
        return self.location.conf.client_body_timeout

    @property
    def client_body(self) -> ClientBodyConf | None:
        """Where the request body waits: the location's memory buffer and temp file when the
        whole body is read before the first try; None (memory) when it is streamed (the same
        rule as UpstreamRequest._wants_streamed_body) or dropped (``return``)."""
        location = self.location
        if location.upstream is None or location.conf.return_ is not None:
            return None
        if not location.conf.proxy.request_buffering and (not self.request.chunked or location.plan.http11):
            return None
        return location.conf.client_body

    @property
    def keepalive_timeout(self) -> float:
        return self.location.conf.keepalive_timeout

    @property
    def keepalive_requests(self) -> int:
        return self.location.conf.keepalive_requests

    # what variables read
    @property
    def remote_addr(self) -> str:
        return self.conn.remote_addr

    @property
    def remote_port(self) -> int:
        return self.conn.remote_port

    @property
    def server_addr(self) -> str:
        return self.conn.server_addr

    @property
    def server_port(self) -> int:
        return self.conn.server_port

    @property
    def server_name(self) -> str:
        return self.server.name

    @property
    def conn_id(self) -> int:
        return self.conn.conn_id

    @property
    def conn_requests(self) -> int:
        return self.conn.requests

    @property
    def sent_head(self) -> bytes:
        """The response head as the client connection wrote it (framing lines included)."""
        return self.conn.sent_head

    @property
    def request_length(self) -> int:
        """Bytes of the request as nginx counts them: request line, headers, blank line, body."""
        request = self.request
        line = len(request.method) + len(request.target) + 12  # " ", " HTTP/1.1\r\n"
        return line + request.head_size + 2 + request.body_size

    def header(self, name_lower: str) -> str | None:
        """A request header's value (first one; Cookie lines joined with "; " as nginx)."""
        wanted = name_lower.encode("latin-1")
        found: list[bytes] = []
        for name, value in self.headers:
            if len(name) == len(wanted) and name.lower() == wanted:
                if wanted != b"cookie":
                    return value.decode("latin-1")
                found.append(value)
        return b"; ".join(found).decode("latin-1") if found else None

    # ------------------------------------------------------------------ the connection's calls

    def start(self) -> None:
        if self._early_status:
            self.finish_with_page(self._early_status)
            return
        location = self.location
        # nginx's access phase (allow/deny, auth_basic) runs after rewrite's `return`
        if location.access is not None and location.conf.return_ is None:
            refused = location.access(self)
            if refused is not None:
                self.finish_with_page(*refused)
                return
        if location.conf.return_ is not None or location.upstream is None:
            if self.request.complete or not self.request.has_body:
                self._serve_return()
            else:
                self.conn.send_continue()  # nginx reads (and discards) the body first
            return
        self.upstream_request = UpstreamRequest(self, location.upstream)
        self.upstream_request.start()

    def body_received(self) -> None:
        upstream_request = self.upstream_request
        if upstream_request is not None:
            upstream_request.body_received()
            return
        request = self.request
        keep = self.location.content is not None  # a content handler (the API) reads the body
        if request.complete and not self._finished and not self._early_status:
            if not keep:
                request.body.clear()
            self._serve_return()
        elif not self._finished and not keep:
            request.body.clear()  # a body for `return` is read and dropped

    def client_lost(self) -> None:
        self.abort(499)

    def abort(self, status: int) -> None:
        """The client side ends the request: gone (499), or 413/408 while reading the body."""
        if self._finished:
            return
        if self.upstream_request is not None:
            self.upstream_request.abandon()
        if not self.status or not self.conn.response_started:
            self.status = responses.wire_status(status)
        self.finish_logged()

    def writing_paused(self) -> None:
        if self.upstream_request is not None:
            self.upstream_request.client_paused()

    def writing_resumed(self) -> None:
        if self.upstream_request is not None:
            self.upstream_request.client_resumed()

    # ------------------------------------------------------------------ return

    def _serve_return(self) -> None:
        location = self.location
        if location.conf.return_ is None:
            if location.content is not None:  # stub_status, api, prometheus
                location.content(self)
                return
            self.finish_with_page(404)
            return
        status = location.conf.return_.status
        if status == 444:  # nginx: close the connection without a response
            self.status = 444
            self._log_access()
            self.conn.abort()
            return
        headers, body = location.return_response(self)
        self.status = status
        if body is None:
            self.finish_with_page(status, headers)
            return
        self.response_headers = headers
        self._finish_small(status, headers, body)

    def respond(self, status: int, headers: bytes, body: bytes) -> None:
        """A content handler's whole response (stub_status, the API, the metrics)."""
        self.status = status
        self.response_headers = headers
        self._finish_small(status, headers, body)

    def _finish_small(self, status: int, headers: bytes, body: bytes) -> None:
        conn = self.conn
        conn.send_head(status, headers, len(body))
        conn.send_body(body)
        self.complete_response()

    def finish_with_page(self, status: int, extra_headers: bytes = b"") -> None:
        """nginx's own page for ``status`` (400, 404, 502, 504...)."""
        self.status = responses.wire_status(status)
        conn = self.conn
        if conn.closed:
            self._finished = True
            self._log_access()
            return
        if responses.closes_connection(status):
            conn.close_after_response()
        page = responses.error_page(status) or b""
        headers = b"Content-Type: text/html\r\n" + extra_headers if page else extra_headers
        self.response_headers = headers
        conn.send_head(status, headers, len(page))
        conn.send_body(page)
        self.complete_response()

    def complete_response(self) -> None:
        conn = self.conn
        conn.end_body()
        self.bytes_sent = conn.bytes_sent
        self.body_bytes_sent = conn.body_bytes_sent
        self._finished = True
        self._log_access()
        conn.finish_response()

    def finish_logged(self) -> None:
        """The request ends without a (complete) response of ours: counters, access log."""
        self._finished = True
        self.bytes_sent = self.conn.bytes_sent
        self.body_bytes_sent = self.conn.body_bytes_sent
        self._log_access()

    def log_rejected(self, status: int) -> None:
        """The log phase of a request the client connection answered itself (400, 414...).
        nginx logs it with the server's access_log; our logs are per location, so the ones of
        the default server's "/" stand in for it."""
        self.status = responses.wire_status(status)
        if not self.location.access_logs:
            self.location = self.server.match("/")
        self.finish_logged()

    def _log_access(self) -> None:
        """The log phase, once per request: the access logs, then the location's log hook
        (after them: a slow or failing hook cannot change the lines). Never raises; the hook
        changes nothing the client sees (status, bytes and connection are settled)."""
        if self._logged:
            return
        self._logged = True
        location = self.location
        zone = location.zone
        if zone is not None:  # status_zone: responses by class, for the metrics
            zone[self.status // 100] += 1
        hook = location.log_hook
        if hook is None:
            for log in location.access_logs:
                log.write(self)
        else:
            # one reading of the clock for the whole phase: the access logs' $request_time,
            # $msec... (their clock is log_clock) and the hook's are the same values
            now = _LOG_TIME[0] = time.time()
            try:
                for log in location.access_logs:
                    log.write(self)
            finally:
                _LOG_TIME[0] = 0.0
            try:
                hook.run(self, now)
            except Exception:  # run() never raises; belt and braces for the connection's sake
                errorlog.log_error("alert", "log_by_python runner failed while logging request")
        # exchange <-> upstream request is a reference cycle: break it, so both go with their
        # last reference instead of waiting for (and feeding) the cyclic garbage collector
        self.upstream_request = None

    def log_context(self, peer_name: str | None) -> str:
        """nginx's ``, client: ..., server: ..., request: "...", upstream: "...", host: "..."``."""
        url = f"http://{peer_name}{self.location.plan.upstream_uri(self)}" if peer_name is not None else None
        return errorlog.request_context(self, url)


class UpstreamRequest:
    """nginx's ``r->upstream`` for one proxied request: the per-request settings, the tries loop
    and the response streaming. A state machine driven by callbacks (no task per request):

    ``start`` -> (body buffered) -> ``_begin_tries`` -> ``_next_try`` -> ``_connect`` /
    pooled connection -> ``_send_request`` -> ``upstream_head`` | ``upstream_failed`` ->
    ``_pass_response`` (stream to the client) | ``_try_failed`` -> ``_next_try`` or a page.

    What the hook API and variables read stays on the exchange (``tries``, ``tries_left``,
    ``last_failure``, the three timeouts); this object only drives the tries.
    """

    __slots__ = (
        "_addr",
        "_body",
        "_body_conn",
        "_conn",
        "_connecting",
        "_done",
        "_head",
        "_idempotent",
        "_key",
        "_local_addr",
        "_passing",
        "_peer_to_free",
        "_pool",
        "_record",
        "_reused",
        "_started",
        "_state",
        "_stats_index",
        "_stream_body",
        "_waiting_body",
        "conf",
        "exchange",
        "location",
        "loop",
        "plan",
        "upstream",
    )

    def __init__(self, exchange: Exchange, upstream: UpstreamRuntime) -> None:
        self.exchange = exchange
        self.upstream = upstream
        self.location = exchange.location
        self.loop = exchange.loop
        self.conf = exchange.location.conf.proxy
        self.plan = exchange.location.plan
        self._waiting_body = False  # buffering the request body before the first try
        self._stream_body = False  # proxy_request_buffering off: body sent as it arrives
        self._body_conn: UpstreamConnection | None = None  # where the streamed body goes now
        self._state: Any = None  # the balancer's per-request state (tries budget, tried peers)
        self._head = b""
        self._body = b""
        self._started = 0.0  # for proxy_next_upstream_timeout
        self._idempotent = True
        self._local_addr: tuple[str, int] | None = None  # a hook's bind_to_local_addr
        # the try in progress
        self._record: TryRecord | None = None
        self._addr: PeerAddr | None = None
        self._key: tuple = ()  # pool key: (peer name, host, local address)
        self._pool: ConnectionPool | None = None  # where the try's connection goes back
        self._peer_to_free: Peer | None = None  # a balancer peer not freed yet
        self._conn: UpstreamConnection | None = None
        self._reused = False  # the try's connection came from the pool
        self._stats_index = -1  # the try's peer in the statistics recorder; -1: none to finish
        self._connecting: asyncio.Task[object] | None = None
        self._passing = False  # the response is going to the client: no retry any more
        self._done = False

    @property
    def connection(self) -> UpstreamConnection | None:
        """The upstream connection of the try in progress."""
        return self._conn

    # ------------------------------------------------------------------ the exchange's calls

    def start(self) -> None:
        """Per-request copies of the location's settings; the body first if it is buffered."""
        ex = self.exchange
        conf = self.conf
        ex.connect_timeout = conf.connect_timeout
        ex.send_timeout = conf.send_timeout
        ex.read_timeout = conf.read_timeout
        ex.upstream_name = self.upstream.name
        ex.proxy_host = self.location.proxy_host
        request = ex.request
        if request.complete or not request.has_body:
            self._begin_tries()  # (no body to wait for or stream: the usual GET)
            return
        self._stream_body = self._wants_streamed_body()
        ex.conn.send_continue()
        if self._stream_body:
            self._begin_tries()
        else:
            self._waiting_body = True  # body_received() starts the tries

    def body_received(self) -> None:
        if self._stream_body:
            self._pump_body()
        elif self._waiting_body and self.exchange.request.complete:
            self._waiting_body = False
            self._begin_tries()

    def client_paused(self) -> None:
        if self._conn is not None:
            self._conn.pause_reading()

    def client_resumed(self) -> None:
        if self._conn is not None:
            self._conn.resume_reading()

    def abandon(self) -> None:
        """The client side ended the request: stop everything, free the peer."""
        self._done = True
        self._waiting_body = False
        record = self._record
        if record is not None and record.response_time is None:
            # nginx's finalize_request gives the try in progress its response time too
            record.response_time = self.loop.time() - record.started
        self._finish_stats((record.status or 0) if record is not None else 0, None, False)
        connecting = self._connecting
        self._connecting = None
        if connecting is not None:
            connecting.cancel()
        self._drop_conn()
        self._free_peer(failed=False)

    # ------------------------------------------------------------------ the tries loop

    def _wants_streamed_body(self) -> bool:
        """``proxy_request_buffering off`` streams the body as it arrives, unless it is chunked
        and the peer speaks HTTP/1.0 (nginx buffers it then, as it must send a length)."""
        request = self.exchange.request
        if self.conf.request_buffering or request.complete or not request.has_body:
            return False
        return not (request.chunked and not self.plan.http11)

    def _begin_tries(self) -> None:
        """Build the upstream request once, start the balancer's request, run the first try."""
        ex = self.exchange
        upstream = self.upstream
        tries_cap = self.conf.next_upstream_tries
        if not self._stream_body:
            self._body = ex.request.body.buffered()  # bytes, or the file it was spooled to
        self._build_head()
        stats = upstream.stats
        if stats is not None and stats.words[WEIGHT_GENERATION] != stats.generation:
            upstream.refresh_weights()  # a hook set a weight (stats.weights_stale(), inlined)
        key_getter = upstream.key_getter
        if key_getter is None:
            self._state = upstream.balancer.new_request(tries_cap)
        else:
            self._state = upstream.balancer.new_request(tries_cap, key_getter(ex))  # type: ignore[call-arg]
        ex.tries_cap = tries_cap
        self._started = self.loop.time()
        self._idempotent = is_idempotent(ex.method)
        self._next_try()

    def _build_head(self) -> None:
        """The request line and headers for the peer (again after a hook's recreate_request)."""
        ex = self.exchange
        request = ex.request
        if self._stream_body:
            self._head = self.plan.build_head(ex, request.content_length, chunked=request.chunked)
        else:
            sends_length = request.has_body or request.content_length is not None  # incl. "0"
            self._head = self.plan.build_head(ex, len(self._body) if sends_length else None)

    def _next_try(self) -> None:
        """The hook seam, then a peer, then a connection to it (nginx's upstream_connect)."""
        ex = self.exchange
        upstream = self.upstream
        state = self._state
        ex.tries_left = state.tries
        addr: PeerAddr | None = None
        host = ""
        pool = upstream.pool if self.plan.pooled else None
        hook = upstream.hook
        if hook is not None:
            outcome = hook.run(ex, upstream)
            if outcome.exit_status is not None:
                self._done = True
                ex.finish_with_page(outcome.exit_status)
                return
            self._apply_hook_settings(outcome)
            if outcome.addr is not None:
                addr, host = outcome.addr, outcome.host or ""
                state.tries += outcome.more_tries
                pool = self._hook_pool(outcome.keepalive)
        if addr is None:
            peer = upstream.balancer.get(state, self.loop.time())
            if peer is None:
                self._no_live_upstreams()
                return
            addr = peer.addr
            name = peer.name  # (addr.name formats the text on every call; the peer keeps it)
            self._peer_to_free = peer
            stats = upstream.stats
            if stats is not None:
                self._stats_index = index = peer.stats_index
                stats.start(index)
        else:
            name = addr.name
            if upstream.stats is not None:
                self._stats_index = upstream.stats.start_address(name)
        self._addr = addr
        self._key = (name, host, self._local_addr)
        self._pool = pool
        self._record = TryRecord(name, self.loop.time())
        ex.tries.append(self._record)
        conn = pool.acquire(self._key) if pool is not None else None
        if conn is None:
            self._connect()
        else:
            self._record.connect_time = 0.0
            self._reused = True
            self._send_request(conn)

    def _apply_hook_settings(self, outcome: Any) -> None:
        """What a hook run changes for this and later tries: bind address, rebuilt request."""
        if outcome.local_addr is not None:
            self._local_addr = split_local_addr(outcome.local_addr)
        if outcome.recreate:
            self._build_head()

    def _hook_pool(self, keepalive: tuple[float, int] | None) -> ConnectionPool | None:
        """``enable_keepalive`` pools this try's connection in the upstream's hook pool (only
        with nginx's recipe: HTTP/1.1 to the peer, no "Connection: close"); without it a
        hook-set peer's connection is not pooled, as in OpenResty."""
        if keepalive is None or self.plan.close_after:
            return None
        return self.upstream.hook_pool(*keepalive)

    def _connect(self) -> None:
        addr = self._addr
        assert addr is not None
        conn = UpstreamConnection(self.loop, self._key, self._key[0])
        self._conn = conn
        self._reused = False
        if addr.unix_path is not None:
            opening = self.loop.create_unix_connection(lambda: conn, addr.unix_path)
        else:
            opening = self.loop.create_connection(lambda: conn, addr.host, addr.port,
                                                  local_addr=self._local_addr)
        task = self.loop.create_task(opening)
        timer = self.loop.call_later(self.exchange.connect_timeout, task.cancel)
        self._connecting = task
        task.add_done_callback(lambda done: self._connected(done, conn, timer))

    def _connected(self, task: asyncio.Task[object], conn: UpstreamConnection,
                   timer: asyncio.TimerHandle) -> None:
        timer.cancel()
        if self._connecting is not task:
            conn.abort()  # the request ended while we were connecting (client gone)
            return
        self._connecting = None
        if task.cancelled():
            err = UpstreamError(Failure.TIMEOUT, "upstream timed out (110: Connection timed out)",
                                phase="connecting to upstream", request_sent=False)
        elif (exc := task.exception()) is not None:
            if not isinstance(exc, OSError):
                raise exc  # a bug, not a network failure
            text = f"connect() failed {errorlog.os_error_text(exc)}"
            err = UpstreamError(Failure.ERROR, text, phase="connecting to upstream", request_sent=False)
        else:
            record = self._record
            assert record is not None
            record.connect_time = self.loop.time() - record.started
            self._send_request(conn)
            return
        conn.abort()
        self._try_failed(err)

    def _send_request(self, conn: UpstreamConnection) -> None:
        ex = self.exchange
        self._conn = conn
        plan = self.plan
        streamed = self._stream_body
        body = None if streamed else self._body
        spooled = isinstance(body, SpooledBody)
        conn.head_limit = self.conf.buffer_size  # proxy_buffer_size
        conn.start(self, self._head, None if spooled else body, ex.read_timeout,
                   ex.send_timeout, head_only=ex.method == "HEAD", http11=plan.http11,
                   close_after=plan.close_after)
        if spooled:
            body.send(conn)  # (every try again from the file's start)
        elif streamed:
            self._body_conn = conn
            conn.on_writable = self._pump_body
            self._pump_body()

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
        data = request.take_body()
        if data:
            conn.write_body(b"%x\r\n%s\r\n" % (len(data), data) if request.chunked else data, last=False)
        if request.complete:
            self._body_conn = None
            conn.write_body(b"0\r\n\r\n" if request.chunked else b"", last=True)
        if conn.write_buffer_full:
            client.pause_body()
        else:
            client.resume_body()

    # ------------------------------------------------------------------ UpstreamHandler callbacks

    def upstream_head(self, response: ResponseHead) -> None:
        record = self._record
        assert record is not None
        record.header_time = self.loop.time() - record.started
        record.status = response.status
        conf = self.conf
        failure = failure_for_status(response.status)
        if failure is not None and conf.next_upstream & NextUpstream(int(failure)):
            verdict = decide(failure, self._state.tries - 1, self._started, self.loop.time(), conf,
                             self._idempotent, request_sent=True)
            if verdict == RETRY:
                record.response_time = self.loop.time() - record.started
                self._observe(record)
                failed = is_counted_failure(failure, True)
                self._finish_stats(response.status, record.response_time, failed)
                self._drop_conn()
                self._free_try(failed, failure, _READING_HEADER)
                self._next_try()
                return
        self._pass_response(response)

    def upstream_body(self, data: bytes) -> None:
        self.exchange.conn.send_body(data)

    def upstream_complete(self) -> None:
        conn = self._conn
        self._conn = None
        record = self._record
        if record is not None:
            record.response_time = self.loop.time() - record.started
            self._observe(record)
            index = self._stats_index
            if index >= 0:  # (_finish_stats, inlined: this is every request's path)
                self._stats_index = -1
                self.upstream.stats.finish(index, record.status or 0, record.response_time, False)  # type: ignore[union-attr]
        if conn is not None:
            if self._pool is not None:
                self._pool.release(conn)
            else:
                conn.close()
        self._free_peer(failed=False)
        self._done = True
        self.exchange.complete_response()

    def upstream_failed(self, err: UpstreamError) -> None:
        self._conn = None
        self._body_conn = None
        if self._passing:
            self._failed_mid_body(err)
        elif self._reused and self._is_stale(err):
            self._retry_fresh(err)
        else:
            self._try_failed(err)

    # ------------------------------------------------------------------ try outcomes

    def _pass_response(self, response: ResponseHead) -> None:
        """Give the client this response, streaming its body with back-pressure."""
        conn = self._conn
        assert conn is not None
        ex = self.exchange
        self._passing = True
        ex.status = response.status
        ex.upstream_headers = response.headers
        headers = response.client_headers()
        ex.response_headers = headers
        client = ex.conn
        client.send_head(response.status, headers, response.content_length, reason=response.reason)
        conn.stream_to(self)  # the body that came with the head goes out with it
        if self._conn is conn:  # still streaming: not completed by stream_to
            client.flush()
            if client.writing_paused:
                conn.pause_reading()

    def _try_failed(self, err: UpstreamError) -> None:
        """nginx's ngx_http_upstream_next: log, free, and retry or answer with our page."""
        failure = err.failure
        record = self._record
        assert record is not None
        record.status = last_failure_status(failure)
        record.response_time = self.loop.time() - record.started  # nginx: every try has one
        # a timeout's duration says the peer is slow; a refused or reset connection's says
        # nothing (it would make a dead peer look like the fastest one)
        self._finish_stats(0, record.response_time if failure is Failure.TIMEOUT else None, True)
        self._log_error(err, err.phase)
        self._drop_conn()
        self._free_try(True, failure, err.phase)
        verdict = decide(failure, self._state.tries, self._started, self.loop.time(), self.conf,
                         self._idempotent, request_sent=err.request_sent)
        if verdict == RETRY:
            self._next_try()
        else:
            self._done = True
            self.exchange.finish_with_page(verdict)

    def _is_stale(self, err: UpstreamError) -> bool:
        if err.failure is not Failure.ERROR or err.response_started or self._stream_body:
            return False  # (a streamed body is gone once sent: nothing to send again)
        return self._idempotent or bool(self.conf.next_upstream & NextUpstream.NON_IDEMPOTENT)

    def _retry_fresh(self, err: UpstreamError) -> None:
        """A pooled connection the peer had closed: nginx retries without costing a try; we
        stay on the same peer, in the same try, on a new connection."""
        self._log_error(err, f"{err.phase} (cached connection, retrying on a new one)", "info")
        self._connect()

    def _failed_mid_body(self, err: UpstreamError) -> None:
        """The client already has part of the response: close it, never fake a complete one."""
        record = self._record
        if record is not None:
            record.response_time = self.loop.time() - record.started
        self._finish_stats((record.status or 0) if record is not None else 0, None, True)
        self._log_error(err, "reading upstream")
        self._free_peer(failed=False)
        self._done = True
        ex = self.exchange
        ex.finish_logged()
        ex.conn.abort()

    def _no_live_upstreams(self) -> None:
        ex = self.exchange
        record = TryRecord(self.upstream.name, self.loop.time())
        record.status = 502
        record.response_time = 0.0  # nginx logs "0.000" for it: every try has a response time
        ex.tries.append(record)
        errorlog.log_error("error", "no live upstreams while connecting to upstream",
                           ex.conn_id, ex.log_context(None))
        self._done = True
        ex.finish_with_page(502)

    # ------------------------------------------------------------------ accounting, logs

    def _free_try(self, failed: bool, failure: Failure, phase: str) -> None:
        """Free the try's peer: the balancer's own, or (hook-set peer) our own accounting."""
        if self._peer_to_free is not None:
            self._free_peer(failed, phase)
            return
        state = self._state
        if state.tries:
            state.tries -= 1
        self.exchange.last_failure = (last_failure_state(failure), last_failure_status(failure))

    def _observe(self, record: TryRecord) -> None:
        """A balancer peer's try got a response: feed its times to methods that learn from
        latency (ewma, least_time; a no-op for the others). Hook-set peers are not the
        balancer's, as in free."""
        peer = self._peer_to_free
        if peer is not None:
            self.upstream.balancer.observe(peer, record.connect_time, record.header_time,
                                           record.response_time, self.loop.time())

    def _finish_stats(self, status: int, sample: float | None, failed: bool) -> None:
        """The try's end in the live peer statistics (once per started try, whatever ended
        it): its status (0: no response), its time as a latency sample (None: says nothing
        about the peer), and whether it failed."""
        index = self._stats_index
        if index < 0:
            return
        self._stats_index = -1
        stats = self.upstream.stats
        assert stats is not None
        stats.finish(index, status, sample, failed)

    def _free_peer(self, failed: bool, phase: str = "") -> None:
        peer = self._peer_to_free
        if peer is None:
            return
        self._peer_to_free = None
        if self.upstream.balancer.free(self._state, peer, failed, self.loop.time()):
            ex = self.exchange  # this failure reached max_fails: nginx says so
            errorlog.log_error("warn", f"upstream server temporarily disabled while {phase}", ex.conn_id,
                               ex.log_context(peer.name))

    def _drop_conn(self) -> None:
        conn = self._conn
        self._conn = None
        self._body_conn = None
        if conn is not None:
            conn.abort()

    def _log_error(self, err: UpstreamError, phase: str, level: str = "error") -> None:
        ex = self.exchange
        addr = self._addr
        errorlog.log_error(level, f"{err} while {phase}", ex.conn_id,
                           ex.log_context(addr.name if addr is not None else None))


def split_local_addr(text: str) -> tuple[str, int]:
    """bind_to_local_addr's "ip", "ip:port", "[v6]:port" or "v6" -> (host, port)."""
    if text.startswith("["):
        host, _, port = text[1:].partition("]")
        return host, int(port.lstrip(":") or 0)
    if text.count(":") == 1:
        host, _, port = text.partition(":")
        return host, int(port)
    return text, 0


def quote_uri(uri: str) -> str:
    """Re-escape a decoded URI for the upstream request line (nginx's ngx_escape_uri)."""
    return quote(uri, safe="/:@!$&'()*+,;=-._~", encoding="latin-1", errors="replace")
