"""One request: routing, ``return``, error pages and the log phase (nginx's ``r``).

Theory of operation
-------------------
The client connection calls ``Exchange(runtime, conn, request)`` (the worker binds the runtime
with ``functools.partial``) once a request head is parsed: it decodes the URI, selects the
server by Host and the location by URI. Nothing is sent yet; a pipelined request may wait
behind another one. The exchange is also what variables, logs and hooks read
(docs/architecture.md, "Request/exchange").

``start`` runs when the request becomes the connection's active one: ``return`` locations
answer at once; proxied locations hand over to an ``UpstreamRequest`` (``proxy.py``, the tries
loop). The log phase (access logs, then the location's log hook) runs once per request.

Every call the client connection makes into the exchange is guarded: an exception escaping one
is a bug, reported as an ``[alert]`` (``safety.report``) and the request is finished anyway
(``crashed``): 502 if nothing was sent, else the client connection is closed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

from scriptlb.http import responses, safety
from scriptlb.http.downstream import DROPPED, SENT, UNSENT, ClientConnection, Request
from scriptlb.logs import errorlog
from scriptlb.request.access import ANSWERED
from scriptlb.request.error_pages import split_uri
from scriptlb.request.headers_filter import AddHeaders, request_header, with_kept
from scriptlb.request.proxy import UpstreamRequest
from scriptlb.request.rewrite import BREAK, CONTINUE, DONE, target_of
from scriptlb.routing.locations import normalize_host
from scriptlb.routing.uri import absolute_host, normalize_uri, split_target, unsafe_uri_split

if TYPE_CHECKING:
    from scriptlb.config.model import ClientBodyConf
    from scriptlb.hookrt.hooks import LogHookRunner
    from scriptlb.request.attempt import TryRecord
    from scriptlb.request.error_pages import ErrorPage
    from scriptlb.request.limits import LimitState
    from scriptlb.request.runtime import LocationRuntime, Runtime, ServerRoute, ServerRuntime, UpstreamRuntime


OWN_STATUS = -1  # err_status: the final response keeps its own status (see Exchange.err_status)


class _TryTimeout:
    """A timeout of the tries loop read and set through the exchange, as the hook API does: the
    upstream request's while it proxies, the location's (read only) before it starts."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, exchange: Exchange | None, owner: type | None = None) -> Any:
        if exchange is None:
            return self  # (read on the class)
        proxying = exchange._proxying()
        source = proxying if proxying is not None else exchange.location.conf.proxy
        seconds: float = getattr(source, self.name)
        return seconds

    def __set__(self, exchange: Exchange, seconds: float) -> None:
        proxying = exchange._proxying()
        if proxying is not None:
            setattr(proxying, self.name, seconds)


class Exchange:
    """One request: what variables, hooks and logs read, and the code that serves it."""

    __slots__ = (
        "_ctx",  # see ctx (unset until then)
        "_early_status",
        "_finished",
        "_kept_headers",  # see kept_headers (unset until an internal redirect keeps some)
        "_last_failure",  # see last_failure (unset until a try failed)
        "_redirected",  # error_page redirected this request, once as nginx (unset until then)
        "_redirects_left",  # internal redirects still allowed (unset until the first one)
        "args",
        "body_bytes_sent",  # (unset: see the annotations below)
        "body_timeout",
        "bytes_sent",
        "captures",  # $0..$9 of the last rewrite/if match (unset until one)
        "conn",
        "err_status",
        "headers",
        "host",
        "http_version",
        "keepalive_requests",
        "keepalive_timeout",
        "limit",
        "location",
        "max_body_size",  # (with body_timeout: set for a request with a body alone)
        "method",
        "proxy_host",  # $proxy_host (unset until proxying starts)
        "proxy_port",  # set by proxy_pass with variables only ($proxy_port reads the location's)
        "realip",
        "request",
        "request_uri",
        "response_headers",
        "runtime",
        "sent_trailers",  # add_trailer's lines, once sent (unset otherwise: $sent_trailer_*)
        "server",
        "start_time",
        "status",
        "tries",
        "upstream_headers",
        "upstream_request",
        "uri",
        "variables",
    )
    is_stream: Literal[False] = False  # (request_view: an http request)
    # set by the routing (the constructor's usual case, or _route)
    server: ServerRuntime
    location: LocationRuntime
    _ctx: dict[str, object]
    # unset until set (readers take a default)
    captures: tuple[str, ...] | None
    proxy_host: str
    _last_failure: tuple[str, int] | None
    variables: dict[str, str] | None  # the rewrite module's `set` values
    # for $upstream_http_*: the peer's response head once one came (it parses its pairs when
    # read; readers take an empty tuple until then)
    upstream_headers: Sequence[tuple[bytes, bytes]]
    response_headers: bytes  # the head's lines sent to the client, for $sent_http_* (b"")
    # the response's bytes, for the log phase: set by finish when it has work (else 0)
    bytes_sent: int
    body_bytes_sent: int

    def __init__(self, runtime: Runtime, conn: ClientConnection, request: Request) -> None:
        runtime.requests += 1  # (stub_status's "requests": every request, rejected ones too)
        self.conn = conn
        self.request = request
        self.runtime = runtime
        self.start_time = time.time()
        self.method = request.method
        self.http_version = request.version
        self.headers = request.headers
        self.status = 0
        # the tries ($upstream_*): a shared empty tuple until the first (a tuple of one then:
        # one object, and none for a request never proxied)
        self.tries: tuple[TryRecord, ...] = ()
        # the client a trusted proxy named (scriptlb.request.realip)
        self.realip: tuple[str, int] | None = None
        self.limit: LimitState | None = None  # limit_req / limit_conn outcome (scriptlb.request.limits)

        self._early_status = 0  # an error found while routing, answered when we become active
        # error_page: the status the final response carries (0: its own; OWN_STATUS: its own,
        # with kept_headers, after X-Accel-Redirect)
        self.err_status = 0
        self._finished = False  # finish() ran: the log phase too (it runs once per request)
        self.upstream_request: UpstreamRequest | Waiting | None = None  # set when proxying (or waiting)
        # routing: the usual case inlined (the target of the connection's previous request
        # again, under the same Host); _route_target does the other cases
        cached = conn.host_cache
        route: ConnRoute | None = cached[2] if cached is not None and cached[0] == request.host else None
        if route is not None and route.target == request.target:
            self.request_uri, self.uri, self.args, self.server, self.host, location = route.routed
            self.location = location
        else:
            location = self._route_target(route)
        if conn.refusal is not None and not self._early_status:
            self._refuse(conn.refusal)
        # what the client connection reads (plain attributes: read on every request; the
        # body's two only for a request with a body, and set only then)
        conf = location.conf
        if request.has_body:
            self.max_body_size = conf.client_max_body_size  # 0 = unlimited
            self.body_timeout = conf.client_body_timeout
        self.keepalive_requests = conf.keepalive_requests
        # keepalive_time (the connection's age), then keepalive_disable (browsers: None when
        # it has no rule for this method, the usual case)
        agents = location.keepalive_agents if request.method != "POST" else location.keepalive_agents_post
        if (conn.loop.time() - conn.opened > location.keepalive_time
                or (agents is not None and not agents(self))):
            self.keepalive_timeout = 0.0
        else:
            self.keepalive_timeout = conf.keepalive_timeout

    # ------------------------------------------------------------------ routing

    def _route_target(self, route: ConnRoute | None) -> LocationRuntime:
        """Routing beyond the connection's memo: an origin-form target whose path needs no
        normalizing, under the Host of the connection's previous request (remembered for the
        next request); _route does all other cases."""
        request = self.request
        target = request.target
        self.request_uri = request_uri = target.decode("latin-1")
        path, sep, args = request_uri.partition("?")
        if (route is not None and request_uri[:1] == "/" and "%" not in path and "//" not in path
                and "/." not in path):
            self.uri = path
            self.args = query = args if sep else None
            self.server = server = route.server
            self.host = host = route.host
            self.location = location = server.match(path)
            route.target = target
            route.routed = (request_uri, path, query, server, host, location)
            return location
        self._route()
        return self.location

    def _route(self) -> None:
        target = self.request.target
        split = split_target(target)
        uri = normalize_uri(split[0]) if split is not None else None
        raw_host = self.request.host
        if target[:1] != b"/" and split is not None:  # absolute-form: the URI's host wins
            raw_host = absolute_host(target)
        if split is None or uri is None or (raw_host is None and target[:1] != b"/"):
            self._early_status = 400
            self.uri, self.args = "", None  # (nginx: no $uri for a request line it refused)
            self.host = ""
            self.server = self.conn_route().default_server
            # nginx logs this 400 with the server's access_log; ours are per location, so the
            # logs (and log hook) of the server's "/" stand in, as for log_rejected
            self.location = self.server.match("/")
            return
        self.uri, self.args = uri, split[1]
        conn = self.conn
        cached = conn.host_cache
        if cached is not None and cached[0] == raw_host:
            host, self.server = cached[1], cached[2].server  # keep-alive: same Host, same server
        else:
            host = normalize_host(raw_host.decode("latin-1")) if raw_host is not None else None
            self.server = self.conn_route().select(host)
            if raw_host is not None and host is None:
                self._early_status = 400  # nginx: client sent invalid host header
            else:
                conn.host_cache = (raw_host, host, ConnRoute(self.server, host or self.server.name))
        self.host = host or self.server.name
        self.location = self.server.match(uri)

    def _refuse(self, refusal: tuple[int, str]) -> None:
        """nginx's checks before any phase (ngx_http_process_request): a request that came in
        clear on a TLS port (497), a client certificate that failed verification (495) or is
        missing (496) gets that status (sent as 400 with its own page; ``error_page`` may
        redirect it)."""
        status, text = refusal
        message = f"{text} while reading client request headers"
        errorlog.log_error("info", message, self.conn.conn_id, errorlog.request_context(self))
        self._early_status = status

    def conn_route(self) -> ServerRoute:
        """The listener's server route, resolved once per connection."""
        route: ServerRoute | None = self.conn.route
        if route is None:
            route = self.conn.route = self.runtime.route_for(self.conn)
        return route

    @property
    def client_body(self) -> ClientBodyConf | None:
        """Where the request body waits: the location's memory buffer and temp file when the
        whole body is read before the first try; None (memory) when it is streamed (the same
        rule as UpstreamRequest._wants_streamed_body) or dropped (``return``)."""
        location = self.location
        if (location.upstream is None and location.dynamic is None) or location.conf.return_ is not None:
            return None
        if not location.conf.proxy.request_buffering and (not self.request.chunked or location.plan.http11):
            return None
        return location.conf.client_body

    # what variables read
    @property
    def scheme(self) -> str:
        return "https" if self.conn.tls is not None else "http"

    @property
    def remote_addr(self) -> str:
        real = self.realip
        return self.conn.remote_addr if real is None else real[0]

    @property
    def remote_port(self) -> int:
        real = self.realip
        return self.conn.remote_port if real is None else real[1]

    @property
    def server_addr(self) -> str:
        return self.conn.server_addr

    @property
    def server_port(self) -> int:
        return self.conn.server_port

    @property
    def ctx(self) -> dict[str, object]:
        """ngx.ctx (the hook API replaces it with its Lua-style view), made on first use: most
        requests never touch it."""
        ctx: dict[str, object] | None = getattr(self, "_ctx", None)
        if ctx is None:
            ctx = self._ctx = {}
        return ctx

    @ctx.setter
    def ctx(self, value: dict[str, object]) -> None:
        self._ctx = value

    # the tries loop's state, as the hook API reads and sets it (a hook runs only while the
    # upstream request is the exchange's; the values outside it are nginx's defaults)
    def _proxying(self) -> UpstreamRequest | None:
        upstream_request = self.upstream_request
        return upstream_request if isinstance(upstream_request, UpstreamRequest) else None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self.conn.loop

    @property
    def last_failure(self) -> tuple[str, int] | None:
        """(kind, status) of the tries loop's last failed try, for the hook API."""
        failure: tuple[str, int] | None = getattr(self, "_last_failure", None)
        return failure

    @last_failure.setter
    def last_failure(self, failure: tuple[str, int] | None) -> None:
        self._last_failure = failure

    @property
    def upstream_name(self) -> str | None:
        proxying = self._proxying()
        return proxying.upstream.name if proxying is not None else None

    @property
    def tries_left(self) -> int:
        proxying = self._proxying()
        return proxying.tries_left if proxying is not None else 0

    @property
    def tries_cap(self) -> int:
        proxying = self._proxying()
        return proxying.tries_cap if proxying is not None else 0

    # the three timeouts of the tries loop (set_timeouts changes them for the current request)
    connect_timeout = _TryTimeout()
    send_timeout = _TryTimeout()
    read_timeout = _TryTimeout()

    @property
    def kept_headers(self) -> bytes:
        """Lines an internal redirect carries to the final response (an intercepted 401's
        WWW-Authenticate, the headers X-Accel-Redirect keeps), as nginx's upstream module
        copies them to the request's own headers."""
        return getattr(self, "_kept_headers", b"")

    def keep_headers(self, lines: bytes) -> None:
        """More lines for kept_headers (nginx adds them up over redirects)."""
        self._kept_headers = self.kept_headers + lines

    @property
    def host_given(self) -> bool:
        """Whether the request named a valid host (nginx's headers_in.server): redirects fall
        back to the local address without one."""
        target = self.request.target
        raw = self.request.host if target[:1] == b"/" else absolute_host(target)
        return raw is not None and normalize_host(raw.decode("latin-1")) is not None

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
        return request_header(self.headers, name_lower)

    # ------------------------------------------------------------------ the connection's calls

    def start(self, delayed: bool = False) -> None:
        """The request's phases (``delayed``: from the access phase on, after limit_req's
        delay; one function, not two: this runs for every request)."""
        try:
            if not delayed:
                if self._early_status:
                    self.finish_with_page(self._early_status)
                    return
                upstream = self.location.plain_upstream
                if upstream is not None:  # (the usual location: no phase before the proxy has work)
                    UpstreamRequest(self, upstream)  # (it is upstream_request, and starts, at once)
                    return
                realip = self.location.realip_server  # (nginx's post-read phase)
                if realip is not None and self.realip is None:
                    self.realip = realip.client(self)
                if self.location.rewrite is not None and self._rewrite_phase():
                    return  # answered (return, redirect) or refused (a rewrite cycle)
                location = self.location
                if location.preaccess and self._preaccess_phase(location):
                    return  # answered (limit_req, limit_conn) or delayed (limit_req)
            location = self.location
            # nginx's access phase (allow/deny, auth_basic) runs after rewrite's `return`
            # (then try_files, which the same callable runs: ANSWERED when it did)
            if location.access is not None and location.conf.return_ is None:
                refused = location.access(self)
                if refused is not None:
                    if refused is not ANSWERED:
                        self.finish_with_page(*refused)
                    return
                location = self.location
            if location.dynamic is not None and location.conf.return_ is None:
                location.dynamic.start(self)  # proxy_pass with variables (scriptlb.request.dynamic_pass)
                return
            if location.conf.return_ is not None or location.upstream is None:
                if self.request.complete or not self.request.has_body:
                    self._serve_return()
                else:
                    self.conn.send_continue()  # nginx reads (and discards) the body first
                return
            UpstreamRequest(self, location.upstream)
        except Exception as exc:
            self.crashed(exc, "starting request")

    def _preaccess_phase(self, location: Any) -> bool:
        """realip's second look (the location's settings), then limit_req / limit_conn, each once
        per request. True when the request was answered or must wait."""
        realip = location.realip  # (not once the address was changed)
        if realip is not None and self.realip is None:
            self.realip = realip.client(self)
        limits = location.limits
        if limits is not None and self.limit is None:
            status, delay = limits.run(self)
            if status:
                self.finish_with_page(status)
                return True
            if delay:
                self.upstream_request = Waiting(self.loop.call_later(delay, self._delayed))
                return True
        return False

    def _delayed(self) -> None:
        """limit_req's delay is over: the request goes on (unless the client went away)."""
        if isinstance(self.upstream_request, Waiting):
            self.upstream_request = None
            self.start(delayed=True)

    def proxy_to(self, upstream: UpstreamRuntime, pass_uri: str | None) -> None:
        """Proxy to an upstream proxy_pass with variables chose (``pass_uri``: the URI to send,
        None for the client's)."""
        UpstreamRequest(self, upstream, pass_uri)  # (it is upstream_request from its start)

    def body_received(self) -> None:
        try:
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
        except Exception as exc:
            self.crashed(exc, "reading client request body")

    def client_lost(self) -> None:
        self.abort(499)

    def client_eof(self) -> bool:
        """The client shut its sending side (a half-close) after its whole request. nginx
        (1.22, epoll; compared in the tests) takes that as the client going away while it
        proxies: 499 and both connections closed, logged at info, unless the response is
        already streaming through its buffers (``proxy_buffering on``: it goes on to the end).
        Any other handler answers as usual. True when the request was ended."""
        upstream_request = self.upstream_request
        if upstream_request is None or self._finished:
            return False
        try:
            action = upstream_request.hangup_action()
            if action is None:
                return False
            attempt = upstream_request.attempt
            errorlog.log_error("info", "epoll_wait() reported that client prematurely closed connection, "
                               f"so upstream connection is closed too while {action}", self.conn_id,
                               self.log_context(attempt.addr if attempt is not None else None))
            self.abort(499)
            self.conn.abort()
        except Exception as exc:
            self.crashed(exc, "finalizing request")
        return True

    def abort(self, status: int) -> None:
        """The client side ends the request: gone (499), or 413/408 while reading the body."""
        if self._finished:
            return
        try:
            if self.upstream_request is not None:
                self.upstream_request.abandon()
            if not self.status or not self.conn.response_started:
                self.status = responses.wire_status(status)
            self.finish(UNSENT)
        except Exception as exc:
            self.crashed(exc, "finalizing request")

    def writing_paused(self) -> None:
        try:
            if self.upstream_request is not None:
                self.upstream_request.client_paused()
        except Exception as exc:
            self.crashed(exc, "sending to client")

    def writing_resumed(self) -> None:
        try:
            if self.upstream_request is not None:
                self.upstream_request.client_resumed()
        except Exception as exc:
            self.crashed(exc, "sending to client")

    def crashed(self, exc: BaseException, where: str) -> None:
        """The safety net: a bug escaped one of this request's callbacks. Report it, then
        finish the request whatever state it is in (502 if nothing was sent, else the client
        connection is closed) and let go of its upstream connection and peer."""
        upstream_request = self.upstream_request
        attempt = upstream_request.attempt if upstream_request is not None else None
        safety.report(exc, where, self, attempt.addr if attempt is not None else None)
        conn = self.conn
        try:
            if upstream_request is not None:
                upstream_request.abandon()
            if self._finished:
                conn.abort()  # (the response was complete; whatever broke, start afresh)
            elif not conn.response_started and not conn.closed:
                self.finish_with_page(502)
            else:
                self.finish(DROPPED)
        except Exception as again:  # the clean-up itself is broken: at least drop the client
            safety.report(again, "finishing a failed request", self)
            self._finished = True
            conn.abort()

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
            self.finish(DROPPED)
            return
        headers, body = location.return_response(self)
        self.answer_return(status, headers, body)

    def answer_return(self, status: int, headers: bytes, body: bytes | None) -> None:
        """``return``'s answer: ``body`` None is nginx's own page for the status."""
        if status == 444:
            self.status = 444
            self.finish(DROPPED)
            return
        if body is None:
            self.status = status
            self.finish_with_page(status, headers)
            return
        self.respond(status, headers, body)

    def respond(self, status: int, headers: bytes, body: bytes) -> None:
        """A whole small response: ``return``'s, a content handler's (stub_status, the API,
        the metrics)."""
        self.response_headers = headers
        err_status = self.err_status
        if err_status:
            if err_status > 0:
                status = err_status
            headers = with_kept(self.kept_headers, headers, kept_wins=True)
        self.status = status
        add_headers = self.location.add_headers
        if add_headers is not None:
            headers = self.response_headers = add_headers(self, status, headers)
        conn = self.conn
        conn.send_head(status, headers, self.body_length(status, len(body)))
        conn.send_body(body)
        self.finish()

    def finish_with_page(self, status: int, extra_headers: bytes = b"") -> None:
        """nginx's own page for ``status`` (400, 404, 502, 504...), or its error_page."""
        if responses.closes_connection(status):
            # (before error_page, as nginx: a redirected 400, 497, 500... still ends the connection)
            self.conn.close_after_response()
        pages = self.location.error_pages if self.location is not None else None
        if pages is not None and not hasattr(self, "_redirected"):
            page = pages.get(status)
            if page is not None and self._error_page(page, status):
                return
        # (after an error_page redirect, a page the target makes carries the target's own status:
        # nginx's special response handler sets err_status anew)
        self.status = responses.wire_status(status)
        conn = self.conn
        if conn.closed:
            self.finish(UNSENT)
            return
        if responses.closes_connection(status):
            conn.close_after_response()
        body = responses.error_page(status) or b""
        headers = b"Content-Type: text/html\r\n" + extra_headers if body else extra_headers
        if self.err_status:
            headers = with_kept(self.kept_headers, headers, kept_wins=False)
        add_headers = self.location.add_headers if self.location is not None else None
        if add_headers is not None:
            headers = add_headers(self, status, headers)
        trace = self.location.trace
        if trace is not None and self.upstream_request is not None:  # balancer_trace_header on
            headers = trace.headers(self, headers)
        self.response_headers = headers
        conn.send_head(status, headers, self.body_length(status, len(body)))
        conn.send_body(body)
        self.finish()

    # ------------------------------------------------------------------ the rewrite phase

    def _rewrite_phase(self) -> bool:
        """Run the location's rewrite directives, finding the location again after a changed
        URI (at most 10 times, nginx's limit); True when the request is answered."""
        for _ in range(10):
            location = self.location
            phase = location.rewrite
            if phase is None:
                return False
            before = self.uri
            result = phase.run(self)
            if result == DONE:
                return True
            if result == BREAK or (result == CONTINUE and self.uri == before):
                return False
            self.location = self.server.match(self.uri)
        errorlog.log_error("error", f'rewrite or internal redirection cycle while processing "{self.uri}"',
                           self.conn_id, self.log_context(None))
        self.finish_with_page(500)
        return True

    def accel_redirect(self, uri: str, kept: bytes) -> None:
        """X-Accel-Redirect: the request starts again at ``uri`` (a path, made safe, or @name)
        as a GET (HEAD stays HEAD), with ``kept`` headers; an unsafe path answers 404."""
        self.keep_headers(kept)
        self.err_status = OWN_STATUS
        self.upstream_request = None
        if uri.startswith("@"):
            self.internal_redirect(uri)
            return
        if not self._may_redirect(uri):
            return
        safe = unsafe_uri_split(uri)
        if safe is None:
            self.finish_with_page(404)
            return
        if self.method != "HEAD":
            self.method = "GET"
        path, args = safe
        self.set_uri(path, args)
        self.location = self.server.match(path)
        self.start()

    def internal_redirect(self, uri: str) -> None:
        """try_files' fallback: the request starts again in the location of ``uri`` (a path
        with args, or @name); at most 10 times, nginx's limit."""
        if not self._may_redirect(uri):
            return
        if uri.startswith("@"):
            location = self.server.named(uri)
            if location is None:
                errorlog.log_error("error", f'could not find named location "{uri}"', self.conn_id,
                                   self.log_context(None))
                self.finish_with_page(500)
                return
        else:
            path, args = split_uri(uri)
            self.set_uri(path, args if args is not None else self.args)
            location = self.server.match(path)
        self.location = location
        self.start()

    def _may_redirect(self, uri: str) -> bool:
        """One more internal redirect (nginx allows 10); past that, a 500 and False."""
        left = getattr(self, "_redirects_left", 10)
        if left <= 0:
            errorlog.log_error("error", f'rewrite or internal redirection cycle while internally redirecting '
                                        f'to "{uri}"', self.conn_id, self.log_context(None))
            self.finish_with_page(500)
            return False
        self._redirects_left = left - 1
        return True

    def set_uri(self, path: str, args: str | None) -> None:
        """A rewritten URI: $uri, $args and the target sent upstream follow it."""
        self.uri, self.args = path, args
        self.request.target = target_of(path, args)

    def redirect(self, status: int, location: str) -> None:
        target = self.absolute_location(location.encode("latin-1", "replace"))
        self.finish_with_page(status, b"Location: " + target + b"\r\n")

    def absolute_location(self, location: bytes) -> bytes:
        if location.startswith(b"/"):
            from scriptlb.request.runtime import absolute_redirect

            return absolute_redirect(self, location)
        return location

    def intercepts(self, status: int) -> bool:
        """proxy_intercept_errors: whether a peer's ``status`` response gives way to an
        error_page (the proxy then calls finish_with_page)."""
        location = self.location
        return (location.conf.intercept_errors and location.error_pages is not None
                and not hasattr(self, "_redirected") and status in location.error_pages)

    def _error_page(self, page: ErrorPage, status: int) -> bool:
        """Redirect to the error page (see scriptlb.request.error_pages); False: no such location."""
        self._redirected = True
        uri = page.uri(self)
        code = page.external(uri)
        if code:
            self.finish_with_page(code, b"Location: " + uri.encode("latin-1", "replace") + b"\r\n")
            return True
        if uri.startswith("@"):
            location = self.server.named(uri)
        else:
            path, args = split_uri(uri)
            self.set_uri(path, args)
            location = self.server.match(path)
        if location is None:
            return False
        self.err_status = status if page.response is None else page.response
        if self.method != "HEAD":
            self.method = "GET"
        self.location = location
        self.upstream_request = None
        self._early_status = 0
        self.start()
        return True

    def body_length(self, status: int, length: int | None) -> int | None:
        """The Content-Length to announce: none (chunked) when add_trailer has lines for this
        response to an HTTP/1.1 client (nginx's expect_trailers)."""
        location = self.location
        trailers = location.add_trailers if location is not None else None
        # (a HEAD response has no body to end with trailers: nginx keeps its Content-Length)
        if trailers is not None and self.http_version == "1.1" and self.method != "HEAD" \
                and trailers.applies(status):
            self.conn.trailers = lambda: self._trailer_lines(trailers, status)
            return None
        return length

    def _trailer_lines(self, trailers: AddHeaders, status: int) -> bytes:
        """add_trailer's lines, made as the chunked body ends ($sent_trailer_* then sees them)."""
        self.sent_trailers = b""
        self.sent_trailers = lines = trailers.lines(self, status, b"")
        return lines

    def finish(self, end: int = SENT) -> None:
        """The one end of every request, ``end`` saying how it ends (SENT, UNSENT, DROPPED):
        the counters, then the log phase (once per request: the access logs, then the
        location's log hook, after them: a slow or failing hook cannot change the lines; it
        changes nothing the client sees, status, bytes and connection are settled), then the
        client connection's part. Never raises from the log phase."""
        conn = self.conn
        location = self.location
        if location.ends_body:  # (logged, or add_trailer)
            # the body's end (with add_trailer's lines, made while the upstream side is still
            # ours), then the counts the log phase reads; else the connection ends the body
            if end == SENT:
                conn.end_body()
            self.bytes_sent = conn.bytes_sent
            self.body_bytes_sent = conn.body_bytes_sent
        if not self._finished:
            self._finished = True
            if location.logged:  # (a status zone, access logs or a log hook)
                zone = location.zone
                if zone is not None:  # status_zone: responses by class, for the metrics
                    zone[self.status // 100] += 1
                hook = location.log_hook
                if hook is None:
                    for log in location.access_logs:
                        log.write(self)
                else:
                    self._log_with_hook(hook)
            limit = self.limit
            if limit is not None and limit.held:
                limit.release()  # limit_conn: this request no longer counts
            # exchange <-> upstream request is a reference cycle: break it, so both go with
            # their last reference instead of waiting for (and feeding) the cyclic collector
            self.upstream_request = None
        if end == SENT:
            conn.finish_response()
        elif end == DROPPED:
            conn.abort()

    def _log_with_hook(self, hook: LogHookRunner) -> None:
        # one reading of the clock for the whole phase: the access logs' $request_time,
        # $msec... (their clock is the runtime's log_clock) and the hook's are the same values
        clock = self.runtime.log_clock
        now = clock.frozen = time.time()
        try:
            for log in self.location.access_logs:
                log.write(self)
        finally:
            clock.frozen = 0.0
        try:
            hook.run(self, now)
        except Exception:  # run() never raises; belt and braces for the connection's sake
            errorlog.log_error("alert", "log_by_python runner failed while logging request")

    def log_rejected(self, status: int) -> None:
        """The log phase of a request the client connection answered itself (400, 414...).
        nginx logs it with the server's access_log; our logs are per location, so the ones of
        the default server's "/" stand in for it."""
        self.status = responses.wire_status(status)
        if not self.location.access_logs:
            self.location = self.server.match("/")
        self.finish(UNSENT)

    def log_context(self, peer_name: str | None) -> str:
        """nginx's ``, client: ..., server: ..., request: "...", upstream: "...", host: "..."``."""
        if peer_name is None:
            return errorlog.request_context(self, None)
        scheme = "https" if self.location.tls is not None else "http"
        return errorlog.request_context(self, f"{scheme}://{peer_name}{self.location.plan.upstream_uri(self)}")


class ConnRoute:
    """The server of a client connection's requests under one Host (what the connection keeps
    in ``host_cache``, after the raw Host and its normalized name), and the routing of the last
    origin-form target seen there: a keep-alive client's next request mostly names the same
    Host, often the same target (``target`` None: none yet)."""

    __slots__ = ("host", "routed", "server", "target")
    # the target's routing, set with target, as the exchange takes it in one unpacking:
    # (request_uri, uri, args, server, host, location)
    routed: tuple[str, str, str | None, ServerRuntime, str, LocationRuntime]

    def __init__(self, server: ServerRuntime, host: str) -> None:
        self.server = server
        self.host = host  # $host: the normalized Host, else the server's name
        self.target: bytes | None = None


def log_client_error(runtime: Runtime, conn: ClientConnection, request: Request, status: int) -> None:
    """Access-log a request the client connection rejected before any handler saw it."""
    Exchange(runtime, conn, request).log_rejected(status)


class Waiting:
    """Stands in for the upstream request while the request waits before its content phase
    (a limit_req delay, a proxy_pass name lookup): the client going away cancels the wait."""

    __slots__ = ("pending",)
    attempt = None
    hook_exit = None
    pass_uri: str | None = None

    def __init__(self, pending: Any) -> None:
        self.pending = pending  # an asyncio Handle or Future: what abandon() cancels

    def body_received(self) -> None:
        """(the body waits in the request until the content phase starts)"""

    def hangup_action(self) -> str | None:
        """(no upstream yet: a half-close while waiting lets the wait run its course)"""
        return None

    def client_paused(self) -> None:
        """(nothing is being sent yet)"""

    def client_resumed(self) -> None:
        """(nothing is being sent yet)"""

    def abandon(self) -> None:
        if self.pending is not None:
            self.pending.cancel()
