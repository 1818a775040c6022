"""Per-worker objects built once from a ``MainConf``: what the request path reads.

Everything that can be computed before the first request is computed here, so the hot path
only looks things up: per listening key a ``ServerRoute`` (Host -> ``ServerRuntime``), per
server a location matcher whose results map to ``LocationRuntime`` objects (the upstream
request template, ``return`` bodies, access logs), and per upstream an ``UpstreamRuntime``
(peers, balancer, keep-alive pool, hook).

A reload does not mutate any of this: the master starts new workers with the new config, so a
worker builds its ``Runtime`` exactly once.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from scriptlb.balancing import create_balancer
from scriptlb.balancing.base import BalancerState
from scriptlb.balancing.round_robin import RoundRobin
from scriptlb.config.model import (
    AccessLogConf,
    GeoConf,
    HookConf,
    HttpConf,
    ListenKey,
    LocationConf,
    MainConf,
    PythonConf,
    RewriteOp,
    ServerConf,
    Template,
    UpstreamConf,
)
from scriptlb.config.regex import compile_nginx_regex
from scriptlb.http.pool import ConnectionPool
from scriptlb.http.response_head import HOP_BY_HOP
from scriptlb.request.accesslog import PhaseClock
from scriptlb.routing.locations import LocationMatcher, ServerSelector, selectors_by_listen
from scriptlb.routing.uri import quote_uri
from scriptlb.state.peers import PeerSet
from scriptlb.state.stats import WEIGHT_GENERATION, Recorder, UpstreamStats
from scriptlb.variables.evaluate import use_maps

if TYPE_CHECKING:
    import ssl

    from scriptlb.hookrt.hooks import HookRunner, LogHookRunner
    from scriptlb.http.downstream import ClientConnection
    from scriptlb.ops.status import WorkerStatus
    from scriptlb.request.accesslog import AccessLog, LogFile
    from scriptlb.request.error_pages import ErrorPage
    from scriptlb.request.exchange import Exchange

Getter = Callable[[Any], str]

_new_state = object.__new__  # (a BalancerState without its Python __init__)

# Client headers never forwarded as they are: hop-by-hop ones, the framing we redo, and Expect
# (we answer 100-continue ourselves), as nginx's default proxy_set_header list does.
_NOT_FORWARDED = HOP_BY_HOP | {b"content-length", b"expect"}


def _compile(template: Template) -> Getter:
    if template.static is not None:
        text = template.static
        return lambda exchange: text
    from scriptlb.variables.evaluate import compile_template

    return compile_template(template)


class UpstreamRuntime:
    """One upstream block in this worker: peers, balancer, keep-alive pool and optional hook."""

    __slots__ = (
        "_hook_pool", "balancer", "conf", "hook", "key_getter", "loop", "name", "observe", "peers", "pool",
        "round_robin_get", "single_state", "stats",
    )

    def __init__(
        self, conf: UpstreamConf, loop: asyncio.AbstractEventLoop, python: PythonConf | None = None,
        recorder: Recorder | None = None,
    ) -> None:
        self.conf = conf
        self.loop = loop
        self.name = conf.name
        self.peers = PeerSet.from_conf(conf)
        self.balancer = create_balancer(conf, self.peers)
        self.key_getter = _balancer_key_getter(self.balancer, conf)
        # round robin's get (or a method's that inherits it): the tries loop takes a single
        # peer itself
        self.round_robin_get = getattr(type(self.balancer), "get", None) is RoundRobin.get
        self.pool = ConnectionPool(loop, conf.keepalive, conf.keepalive_timeout, conf.keepalive_requests,
                                   conf.keepalive_time)
        # this upstream's records in the instance's live peer statistics (python_peer_stats)
        self.stats = UpstreamStats(recorder, conf.name) if recorder is not None else None
        if self.stats is not None:
            self.stats.assign_indexes(self.peers.primary, self.peers.backup)
        # the balancer's observe, for methods that learn from latency (ewma, least_time) in
        # this worker alone; None for the others and for those that read the shared statistics
        # (which record every try anyway), so a try's end skips the call
        shared = self.stats is not None and self.balancer.use_statistics(self.stats)
        observe = getattr(type(self.balancer), "observe", None)
        self.observe = None if shared or observe is RoundRobin.observe else self.balancer.observe
        self.hook: HookRunner | None = None
        self._hook_pool: ConnectionPool | None = None
        if conf.hook is not None:
            # imported here: only configs with hooks pay for the sandbox; a configured hook is
            # never silently ignored (an import error fails the worker's start)
            from scriptlb.hookrt.hooks import HookRunner

            self.hook = HookRunner(conf.hook, self, python)
        self.single_state = self._single_peer_state()

    def _single_peer_state(self) -> BalancerState | None:
        """The balancer state every request shares for nginx's single peer under round robin
        (or a method built on it) when no hook runs: such a request has nothing to choose,
        nothing to remember and never a second try (round robin's free spends the budget), so
        its budget reads 0 from the start. The budget's readers see what they saw with a state
        of their own: the retry decisions (after the free, or "this try excluded": nothing
        left either way); a hook (set_more_tries) would read and change it, hence none when
        the upstream has one (balancer_request tests it per request). One object fewer per
        request. None when the upstream has more than one peer or another method."""
        peers = self.balancer.peers
        round_robin_state = (self.key_getter is None  # (round robin's, or an unkeyed method's built on it)
                             and getattr(type(self.balancer), "new_request", None) is RoundRobin.new_request)
        if not round_robin_state or peers.only is None:
            return None
        state = _new_state(BalancerState)
        state.peer_set = peers
        state.tries = 0
        return state

    def hook_pool(self, idle_timeout: float, max_requests: int) -> ConnectionPool:
        """OpenResty's pool for hook-set peers: ``balancer_keepalive`` connections (default 32) per
        upstream and worker. Its timeout and request limit are the last ``enable_keepalive``
        values."""
        pool = self._hook_pool
        if pool is None:
            pool = self._hook_pool = ConnectionPool(
                self.loop, self.conf.balancer_keepalive, idle_timeout, max_requests, self.conf.keepalive_time
            )
        pool.idle_timeout = idle_timeout
        pool.max_requests = max_requests
        return pool

    def replace_servers(self, conf: UpstreamConf) -> None:
        """A run-time server list (``scriptlb.state.peer_lists``): new peers, the balancer rebuilt
        over them; requests in flight keep the peers they hold. The statistics must already
        have records for the new peers (``Runtime.replace_servers`` sees to it)."""
        self.conf = conf
        self.peers = PeerSet.from_conf(conf)
        if self.stats is not None:
            self.stats.rebind()
            self.stats.assign_indexes(self.peers.primary, self.peers.backup)
        self.balancer.rebuild(self.peers)
        self.single_state = self._single_peer_state()

    def refresh_weights(self) -> None:
        """Take weights hooks set (``upstream.set_peer_weight``, in any worker) since the last
        request; balancers that cache weights (hash's total, random's ranges) recompute them."""
        stats = self.stats
        if stats is not None and stats.refresh_weights(self.peers.primary, self.peers.backup):
            self.balancer.weights_changed()

    def balancer_request(self, tries_cap: int, request: Any) -> Any:
        """The balancer's state for one request (``tries_cap``: proxy_next_upstream_tries),
        keyed by ``request`` for hash methods; weights a hook set since the last request are
        taken first. (The generation is compared here rather than through
        stats.weights_stale(): this runs for every request, one load and no call.)"""
        stats = self.stats
        if stats is not None and stats.words[WEIGHT_GENERATION] != stats.generation:
            self.refresh_weights()
        state = self.single_state
        if state is not None and self.hook is None:  # (see _single_peer_state)
            return state
        key_getter = self.key_getter
        if key_getter is None:
            return self.balancer.new_request(tries_cap)
        return self.balancer.new_request(tries_cap, key_getter(request))

    def close(self) -> None:
        self.pool.close()
        if self._hook_pool is not None:
            self._hook_pool.close()

    def __repr__(self) -> str:
        return f"<UpstreamRuntime {self.name} {self.balancer!r} {self.pool!r}>"


def _balancer_key_getter(balancer: object, conf: UpstreamConf) -> Getter | None:
    """What a keyed method (``hash $x``, ``ip_hash``) hashes, evaluated per request."""
    kind = getattr(balancer, "key_kind", None)
    if kind == "remote_addr":
        return lambda exchange: exchange.remote_addr
    if kind == "template":
        from scriptlb.config.templates import compile_template as split_template

        return _compile(split_template(conf.method.args[0]))
    return None


class RequestPlan:
    """The upstream request of one location, precomputed: request-line version, static
    ``proxy_set_header`` lines as bytes, compiled getters for the dynamic ones, the client
    headers to drop, the proxy_pass URI replacement and whether connections are pooled."""

    __slots__ = (
        "_last_fields",
        "body_override",
        "close_after",
        "dynamic",
        "dynamic_headers",
        "http11",
        "keeps_target",
        "location_prefix",
        "method",
        "pass_client_headers",
        "pooled",
        "repeats",
        "replace_uri",
        "sends_no_body",
        "skip_client",
        "static_headers",
        "version_line",
    )

    def __init__(self, location: LocationConf, upstream: UpstreamConf | None, proxy_host: str) -> None:
        """(``proxy_host`` "" for proxy_pass with variables: $proxy_host is then per request)"""
        proxy = location.proxy
        self.http11 = proxy.http_version == "1.1"
        self.version_line = b" HTTP/1.1\r\n" if self.http11 else b" HTTP/1.0\r\n"
        static: list[bytes] = []
        dynamic: list[tuple[bytes, Getter]] = []
        skip = set(_NOT_FORWARDED)
        connection_value: str | None = None
        for lower, name, template in proxy.set_headers:
            skip.add(lower.encode("latin-1"))
            if template.static is not None or (template.raw == "$proxy_host" and proxy_host):
                value = proxy_host if template.static is None else template.static
                if lower == "connection":
                    connection_value = value
                if value:
                    static.append(f"{name}: {value}\r\n".encode("latin-1"))
            else:
                dynamic.append((name.encode("latin-1"), _compile(template)))
        self.static_headers = b"".join(static)
        self.dynamic_headers = tuple(dynamic)
        self.skip_client = frozenset(skip)
        # we ask the peer to close unless HTTP/1.1 without "Connection: close" (nginx's recipe)
        self.close_after = not self.http11 or (connection_value or "").lower() == "close"
        self.pooled = not self.close_after and upstream is not None and upstream.keepalive > 0
        pass_conf = location.proxy_pass
        self.replace_uri = pass_conf.uri if pass_conf is not None else None
        # proxy_pass with variables: the URI part evaluated per request replaces the whole URI
        self.dynamic = pass_conf is not None and pass_conf.template is not None
        # the client's target goes as it came when it is origin-form (see build_head)
        self.keeps_target = self.replace_uri is None and not self.dynamic
        self.location_prefix = location.pattern if location.modifier in ("", "^~", "=") else ""
        self.method = _compile(proxy.method) if proxy.method is not None else None
        self.pass_client_headers = proxy.pass_request_headers
        # proxy_set_body / proxy_pass_request_body off: body(exchange) -> bytes
        self.body_override: Callable[[Any], bytes] | None = None
        self.sends_no_body = proxy.set_body is None and not proxy.pass_request_body
        if proxy.set_body is not None:
            from scriptlb.variables.evaluate import compile_template_bytes

            self.body_override = compile_template_bytes(proxy.set_body)
        elif not proxy.pass_request_body:
            self.body_override = _no_body
        # a head made of the client's request line and headers alone (no proxy_method, no
        # variables): build_head keeps the last one made for a request without a body, as
        # (method, client headers, Connection, the method's bytes, what follows the target)
        self.repeats = self.keeps_target and self.method is None and not self.dynamic_headers
        self._last_fields: tuple[str, list[tuple[bytes, bytes]], bytes | None, bytes, bytes] = (
            "", [], None, b"", b"")

    def upstream_uri(self, exchange: Exchange) -> str:
        """The URI sent to the peer (nginx: the client's URI as sent, or proxy_pass's URI part
        replacing the location prefix of the normalized URI)."""
        if self.dynamic:
            upstream_request = exchange.upstream_request
            pass_uri: str | None = getattr(upstream_request, "pass_uri", None)
            if pass_uri is not None:
                return pass_uri
        if self.replace_uri is None:
            raw = exchange.request_uri
            return raw if raw.startswith("/") else _path_and_args(exchange)
        uri = exchange.uri
        prefix = self.location_prefix
        rest = uri[len(prefix):] if prefix and uri.startswith(prefix) else uri
        new = quote_uri(self.replace_uri + rest)
        return new + "?" + exchange.args if exchange.args is not None else new

    def build_head(self, exchange: Exchange) -> bytes:
        """The request line and headers for the peer of a request without a body (the usual
        GET). The head after the target depends on the method and the client's headers alone,
        and is most often the one made for the request before (the memo)."""
        request = exchange.request
        target = request.target
        last = self._last_fields
        # (no test of self.repeats: without it the memo keeps its first value, whose method
        # "" matches no request)
        if (target[:1] == b"/" and last[1] == exchange.headers and last[0] == exchange.method
                and last[2] == request.connection):
            return last[3] + target + last[4]
        return self._build_head(exchange, None, False)

    def build_framed_head(self, exchange: Exchange, body_length: int | None, chunked: bool = False) -> bytes:
        """build_head with a body's framing: a Content-Length (``body_length``), chunked, or
        neither (the body is not sent: build_head's)."""
        if body_length is None and not chunked:
            return self.build_head(exchange)
        return self._build_head(exchange, body_length, chunked)

    def _build_head(self, exchange: Exchange, body_length: int | None, chunked: bool) -> bytes:
        request = exchange.request
        target = request.target
        if not self.keeps_target or target[:1] != b"/":
            target = self.upstream_uri(exchange).encode("latin-1")
        # (else the client's target, as it came: the bytes upstream_uri would decode and encode)
        method = exchange.method if self.method is None else self.method(exchange)
        prefix = method.encode("latin-1") + b" "
        rest = self._fields(exchange, body_length, chunked)
        if self.repeats and body_length is None and not chunked:
            self._last_fields = (method, list(exchange.headers), request.connection, prefix, rest)
        return prefix + target + rest

    def _fields(self, exchange: Exchange, body_length: int | None, chunked: bool) -> bytes:
        """The head after the request target: the version, the header lines, the blank line."""
        parts = [self.version_line, self.static_headers]
        if self.dynamic_headers:
            for name, getter in self.dynamic_headers:
                text = getter(exchange)
                if text:
                    parts.append(name + b": " + text.encode("latin-1", "replace") + b"\r\n")
        if self.pass_client_headers:
            skip = self.skip_client
            connection = exchange.request.connection
            if connection is not None:  # it may name more hop-by-hop headers
                skip = skip | _connection_listed(connection)
            for name, value in exchange.headers:
                if name.lower() not in skip:
                    parts += (name, b": ", value, b"\r\n")
        if body_length is not None:
            parts.append(b"Content-Length: %d\r\n" % body_length)
        elif chunked:
            parts.append(b"Transfer-Encoding: chunked\r\n")  # a streamed body of unknown length
        parts.append(b"\r\n")
        return b"".join(parts)


def _no_body(exchange: Exchange) -> bytes:
    return b""


def _path_and_args(exchange: Exchange) -> str:
    return exchange.uri + ("?" + exchange.args if exchange.args is not None else "")


def _connection_listed(connection: bytes) -> frozenset[bytes]:
    """Header names a Connection header declares hop-by-hop, lower-cased."""
    return frozenset(token.strip().lower() for token in connection.split(b","))


def _sets(ops: tuple[RewriteOp, ...], name: str) -> bool:
    """Whether a ``set $name`` is among the rewrite directives (in ``if`` blocks too)."""
    return any((op.kind == "set" and op.name == name) or _sets(op.body, name) for op in ops)


def keepalive_agents(conf: LocationConf, method: str) -> Callable[[Any], bool] | None:
    """``allowed(exchange)`` for requests with ``method``: the browsers keepalive_disable names
    (ngx_http_update_location_config: MSIE 4/5/6-without-SV1 for POSTs, Safari on Mac OS X);
    None when no rule concerns such requests. (The connection's age, keepalive_time, is
    tested by the exchange itself: LocationRuntime.keepalive_time.)"""
    msie6 = "msie6" in conf.keepalive_disable and method == "POST"
    safari = "safari" in conf.keepalive_disable
    if not msie6 and not safari:
        return None

    def allowed(exchange: Any) -> bool:
        agent = exchange.header("user-agent")
        if agent:
            if msie6 and _old_msie(agent):
                return False
            if safari and _mac_safari(agent):
                return False
        return True

    return allowed


def _old_msie(agent: str) -> bool:
    """nginx's headers_in.msie6 (ngx_http_process_user_agent)."""
    at = agent.find("MSIE ")
    if at < 0 or at + 7 >= len(agent) or "Opera" in agent or agent[at + 6] != ".":
        return False
    version = agent[at + 5]
    return version in "45" or (version == "6" and "SV1" not in agent[at + 8:])


def _mac_safari(agent: str) -> bool:
    """nginx's headers_in.safari: Safari on Mac OS X, not MSIE, Opera, Gecko or Chrome."""
    if "MSIE " in agent or "Opera" in agent or "Gecko/" in agent or "Chrome/" in agent:
        return False
    return "Safari/" in agent and "Mac OS X" in agent


def with_keepalive_header(add_headers: Callable[[Any, int, bytes], bytes] | None, seconds: int
                          ) -> Callable[[Any, int, bytes], bytes]:
    """keepalive_timeout's second value: "Keep-Alive: timeout=N" on responses whose connection
    stays open (after the location's own headers filter)."""
    line = b"Keep-Alive: timeout=%d\r\n" % seconds

    def apply(exchange: Any, status: int, headers: bytes) -> bytes:
        if add_headers is not None:
            headers = add_headers(exchange, status, headers)
        return headers + line if exchange.conn.keeps_alive else headers

    return apply


class LocationRuntime:
    __slots__ = (
        "access",
        "access_logs",
        "add_headers",
        "add_trailers",
        "body_filtered",
        "conf",
        "content",
        "dynamic",
        "ends_body",
        "error_pages",
        "header_rewrite",
        "keepalive_agents",
        "keepalive_agents_post",
        "keepalive_time",
        "limits",
        "log_hook",
        "logged",
        "plain_response",
        "plain_upstream",
        "plan",
        "preaccess",
        "proxy_bind",
        "proxy_host",
        "realip",
        "realip_server",
        "response_filter",
        "return_getter",
        "rewrite",
        "tls",
        "trace",
        "upstream",
        "zone",
    )

    def __init__(self, conf: LocationConf, upstream: UpstreamRuntime | None,
                 access_logs: tuple[AccessLog, ...], log_hook: LogHookRunner | None = None) -> None:
        self.conf = conf
        self.upstream = upstream
        self.access_logs = access_logs
        self.log_hook = log_hook  # log_by_python, run by the exchange after the access logs
        # the log phase has work (the Runtime sets it too for a status_zone)
        self.logged = bool(access_logs) or log_hook is not None
        self.ends_body = self.logged  # the exchange's finish ends the body itself (with add_trailer too)
        # allow/deny + auth_basic (scriptlb.request.access): None, or check(exchange) -> refusal | None
        self.access: Callable[[Any], tuple[int, bytes] | None] | None = None
        if conf.access or conf.auth_basic_user_file is not None:
            from scriptlb.request.access import access_phase

            self.access = access_phase(conf)
        # stub_status / api / prometheus (scriptlb.request.handlers): content(exchange) answers
        self.content: Callable[[Any], None] | None = None
        # limit_rate / proxy_limit_rate / proxy_store may apply to a response (scriptlb.request.store)
        self.body_filtered = bool(conf.limit_rate or conf.proxy_limit_rate or conf.proxy_store is not None
                                  or conf.ssi is not None or _sets(conf.rewrite, "limit_rate"))
        # keepalive_time: the age past which a connection is not kept (every request: its
        # default of 1h applies too); keepalive_disable: allowed(exchange) -> whether a browser
        # may keep it, for POSTs and for other methods (None: no rule, the usual case)
        self.keepalive_time = 3600.0 if conf.keepalive_time is None else conf.keepalive_time
        self.keepalive_agents = keepalive_agents(conf, "GET")
        self.keepalive_agents_post = keepalive_agents(conf, "POST")
        # expires + add_header (scriptlb.request.headers_filter): None, or
        # apply(exchange, status, headers) -> headers
        self.add_headers: Callable[[Any, int, bytes], bytes] | None = None
        if conf.add_headers or conf.expires is not None:
            from scriptlb.request.headers_filter import response_headers_filter

            self.add_headers = response_headers_filter(conf.add_headers, conf.expires)
        if conf.keepalive_header is not None:
            self.add_headers = with_keepalive_header(self.add_headers, conf.keepalive_header)
        # add_trailer (scriptlb.request.headers_filter): None, or the trailers of a chunked response
        self.add_trailers: Any = None
        if conf.add_trailers:
            from scriptlb.request.headers_filter import AddHeaders

            self.add_trailers = AddHeaders(conf.add_trailers, trailers=True)
            self.ends_body = True
        # proxy_hide_header / proxy_pass_header (scriptlb.request.headers_filter)
        self.response_filter: Callable[[bytes, Any], bytes] | None = None
        if conf.proxy.hide_headers or conf.proxy.pass_headers:
            from scriptlb.request.headers_filter import response_filter

            self.response_filter = response_filter(conf.proxy.hide_headers, conf.proxy.pass_headers)
        # proxy_redirect / proxy_cookie_* (scriptlb.request.peer_rewrite): None, or
        # rewrite(exchange, lines) -> lines, for responses with Location, Refresh or Set-Cookie
        self.header_rewrite: Callable[[Any, bytes], bytes] | None = None
        if conf.proxy_pass is not None:
            from scriptlb.request.peer_rewrite import header_rewrite

            self.header_rewrite = header_rewrite(conf.proxy)
        # proxy_bind: None, or the local address (text) of this request's connections to peers
        self.proxy_bind: Callable[[Any], str] | None = None
        if conf.proxy.bind is not None:
            from scriptlb.variables.evaluate import compile_template

            self.proxy_bind = compile_template(conf.proxy.bind)
        # set / if / rewrite / break (scriptlb.request.rewrite): None, or the compiled phase; with
        # limit_except (scriptlb.request.access), wrapped in it (its check comes first for the methods
        # it does not name)
        self.rewrite: Any = None
        if conf.rewrite:
            from scriptlb.request.rewrite import RewritePhase

            self.rewrite = RewritePhase(conf.rewrite)
        if conf.limit_except is not None:
            from scriptlb.request.access import LimitExcept

            self.rewrite = LimitExcept(conf, self.rewrite)
        # error_page (scriptlb.request.error_pages): None, or status -> ErrorPage
        self.error_pages: dict[int, ErrorPage] | None = None
        if conf.error_pages:
            from scriptlb.request.error_pages import error_pages

            self.error_pages = error_pages(conf.error_pages)
        self.zone: list[int] | None = None  # status_zone: this worker's counts by status // 100
        self.tls: Any = None  # proxy_pass https://: a scriptlb.http.tls.PeerTls (set by the Runtime)
        # proxy_pass with variables: a scriptlb.request.dynamic_pass.DynamicPass (set by the Runtime)
        self.dynamic: Any = None
        # limit_req / limit_conn: a scriptlb.request.limits.LimitPhase (set by the Runtime)
        self.limits: Any = None
        self.preaccess = False  # realip or limits to run before the access phase (the Runtime sets it)
        # the upstream of a location that does nothing but proxy_pass to it (the Runtime sets it)
        self.plain_upstream: UpstreamRuntime | None = None
        # set_real_ip_from & co (scriptlb.request.realip): None, or client(exchange) -> (addr, port) | None;
        # the server's before the rewrite phase, the location's (when it differs) after it
        self.realip: Any = None
        self.realip_server: Any = None
        if conf.realip is not None or conf.realip_server is not None:
            from scriptlb.request.realip import RealIp

            if conf.realip_server is not None:
                self.realip_server = RealIp(conf.realip_server)
            if conf.realip is not None and conf.realip != conf.realip_server:
                self.realip = RealIp(conf.realip)
        # balancer_trace_header on (scriptlb.variables.trace): adds the trace to proxied responses for
        # clients that ask from an allowed address; None: the proxy pays one attribute test
        self.trace: Any = None
        if conf.trace_header:
            from scriptlb.request.access import address_matcher
            from scriptlb.variables.trace import TraceHeader

            self.trace = TraceHeader(address_matcher(conf.trace_allow))
        # a peer's response goes to the client with its own headers and nothing added or hidden
        # (proxy_redirect & co. aside, which look only at responses that need them)
        self.plain_response = (self.add_headers is None and self.add_trailers is None
                               and self.response_filter is None and self.trace is None
                               and not self.body_filtered)
        self.proxy_host = conf.proxy_pass.proxy_host if conf.proxy_pass is not None else ""
        self.plan = RequestPlan(conf, upstream.conf if upstream is not None else None, self.proxy_host)
        ret = conf.return_
        # bytes: a body or Location echoes request bytes as received (nginx copies bytes)
        self.return_getter: Callable[[Any], bytes] | None = None
        if ret is not None and ret.text is not None:
            from scriptlb.variables.evaluate import compile_template_bytes

            self.return_getter = compile_template_bytes(ret.text)

    def return_response(self, exchange: Exchange) -> tuple[bytes, bytes | None]:
        """(headers, body) of ``return``; body None means nginx's own page for the status."""
        ret = self.conf.return_
        assert ret is not None
        getter = self.return_getter
        if ret.status in (301, 302, 303, 307, 308):
            if getter is None:
                return b"", None
            location = getter(exchange)
            if location.startswith(b"/"):
                location = absolute_redirect(exchange, location)
            return b"Location: " + location + b"\r\n", None
        if getter is None:
            return b"", (b"" if ret.status < 300 else None)
        return b"Content-Type: text/plain\r\n", getter(exchange)


def absolute_redirect(exchange: Exchange, path: bytes) -> bytes:
    """A Location nginx makes itself (``return``, a directory's 301...) as ngx_http_header_filter
    writes it: left relative with ``absolute_redirect off``; else prefixed with the scheme, the
    host (the server's name with ``server_name_in_redirect on``, else the request's host, else the
    local address) and the port (unless the scheme's own or ``port_in_redirect off``)."""
    conf = exchange.location.conf
    if not conf.absolute_redirect:
        return path
    if conf.server_name_in_redirect:
        host = exchange.server.name
    elif exchange.host_given:
        host = exchange.host
    else:
        host = exchange.server_addr
    if ":" in host:
        host = f"[{host}]"
    scheme = exchange.scheme
    port = exchange.server_port
    if not conf.port_in_redirect or port == (443 if scheme == "https" else 80):
        prefix = f"{scheme}://{host}"
    else:
        prefix = f"{scheme}://{host}:{port}"
    return prefix.encode("latin-1", "replace") + path


# ServerRuntime.match's memo: at most this many URIs (then it starts over), none longer
_MATCH_CACHE_SIZE = 4096
_MATCH_CACHE_URI_MAX = 256


class ServerRuntime:
    """One ``server`` block: its name and its locations."""

    __slots__ = ("_builder", "_by_id", "conf", "default_location", "matched", "matcher", "name",
                 "name_regexes")

    def __init__(self, conf: ServerConf, builder: Callable[[LocationConf], LocationRuntime]) -> None:
        self.conf = conf
        # nginx's $server_name: the first name as written (a regex's "~" and a wildcard's "*"
        # kept, the leading dot of ".example.com" not)
        first = conf.server_names[0] if conf.server_names else ""
        self.name = first[1:] if first.startswith(".") else first
        self.matcher = LocationMatcher(conf.locations)
        # server_name regexes with named captures: their groups are variables ($name)
        self.name_regexes = tuple(
            regex for regex in (
                compile_nginx_regex(n[1:], any("A" <= ch <= "Z" for ch in n[1:]))
                for n in conf.server_names if n.startswith("~")
            ) if regex.groupindex
        )
        self._builder = builder
        self._by_id: dict[int, LocationRuntime] = {}
        # uri -> location, see match (the exchange looks here first itself: every request)
        self.matched: dict[str, LocationRuntime] = {}
        for loc in conf.locations:
            self._by_id[id(loc)] = builder(loc)
        fallback = conf.fallback or LocationConf(modifier="", pattern="", rewrite=conf.rewrite)
        self.default_location = builder(fallback)

    def named(self, name: str) -> LocationRuntime | None:
        """The ``location @name`` (error_page's target), None if there is none."""
        conf = self.matcher.named.get(name)
        if conf is None:
            return None
        found = self._by_id.get(id(conf))
        if found is None:
            found = self._by_id[id(conf)] = self._builder(conf)
        return found

    def location_of(self, conf: LocationConf) -> LocationRuntime:
        """The runtime of a location the config built beside the tree (an ``if`` block's)."""
        found = self._by_id.get(id(conf))
        if found is None:
            found = self._by_id[id(conf)] = self._builder(conf)
        return found

    def match(self, uri: str) -> LocationRuntime:
        """The location for ``uri``; recent answers are remembered (the same few URIs come
        again and again; the cache is bounded: clients choose URIs)."""
        found = self.matched.get(uri)
        if found is not None:
            return found
        conf = self.matcher.match(uri)
        if conf is None:
            found = self.default_location
        else:
            found = self._by_id.get(id(conf))
            if found is None:  # the matcher's own locations (automatic 301s): built on first use
                found = self._by_id[id(conf)] = self._builder(conf)
        if len(uri) <= _MATCH_CACHE_URI_MAX:
            if len(self.matched) >= _MATCH_CACHE_SIZE:
                self.matched.clear()
            self.matched[uri] = found
        return found


class ServerRoute:
    """The servers of one listening key, selected by host."""

    __slots__ = ("_by_id", "default_server", "selector")

    def __init__(self, selector: ServerSelector, servers: dict[int, ServerRuntime]) -> None:
        self.selector = selector
        self._by_id = servers
        self.default_server = servers[id(selector.default)]

    def select(self, host: str | None) -> ServerRuntime:
        return self._by_id[id(self.selector.select(host))]


class Runtime:
    """All per-worker runtime objects of one configuration."""

    def __init__(
        self, conf: MainConf, loop: asyncio.AbstractEventLoop, recorder: Recorder | None = None
    ) -> None:
        self.conf = conf
        self.loop = loop
        self.requests = 0  # requests this worker started (stub_status's "requests")
        self.recorder = recorder
        self.peer_lists: Any = None  # scriptlb.state.peer_lists.PeerListWatcher, set by the worker
        self.health: Any = None  # scriptlb.ops.health.HealthView (health_check), set by the worker
        self.health_checker: Any = None  # scriptlb.ops.health.HealthChecker: this worker's checks
        self.stream: Any = None  # scriptlb.stream.runtime.StreamRuntime, set by the worker
        self.metrics: Any = None  # the prometheus location's registry, built on first scrape
        # status_zone name -> responses by status // 100 in this worker (published by status)
        self.zone_counts: dict[str, list[int]] = {}
        self.status: WorkerStatus | None = None  # the instance's counters, set by the worker
        http = conf.http or HttpConf(upstreams={}, servers=(), log_formats={})
        use_maps(http.maps, _geo_forwarded)
        self.upstreams = {
            name: UpstreamRuntime(up, loop, http.python, recorder) for name, up in http.upstreams.items()
        }
        self._python = http.python
        # the log phase's frozen clock, for the access logs of locations with a log hook
        self.log_clock = PhaseClock()
        self._access_logs: dict[tuple[tuple[AccessLogConf, ...], bool], tuple[AccessLog, ...]] = {}
        # one runner per distinct log hook: locations inheriting a hook share it (and its
        # error-rate limit), as they share the code compiled once by precompile
        self._log_hooks: dict[HookConf, LogHookRunner] = {}
        # one LogFile per path, shared by every access_log directive naming it (one open, one
        # buffer, lines in order), as nginx opens each path once
        self._log_files: dict[str, LogFile] = {}
        self._tls_contexts: dict[Any, Any] = {}  # ProxySslConf -> its client SSLContext
        self._limit_zone_table: dict[str, Any] | None = None  # scriptlb.request.limits.LimitZone by name
        self._adhoc: Any = None  # proxy_pass with variables: scriptlb.request.dynamic_pass.AdhocUpstreams
        # ResolverConf -> scriptlb.request.dynamic_pass.NameResolver
        self._name_resolvers: dict[Any, Any] = {}
        self.servers = {id(s): ServerRuntime(s, self._build_location) for s in http.servers}
        self.routes = {
            key: ServerRoute(selector, self.servers) for key, selector in selectors_by_listen(http).items()
        }

    def _build_location(self, conf: LocationConf) -> LocationRuntime:
        upstream = None
        dynamic = conf.proxy_pass is not None and conf.proxy_pass.template is not None
        if conf.proxy_pass is not None and conf.return_ is None and not dynamic:
            upstream = self.upstreams[conf.proxy_pass.upstream]
        location = LocationRuntime(conf, upstream, self._access_logs_for(conf), self._log_hook_for(conf))
        if conf.proxy_pass is not None and conf.proxy_pass.ssl:
            location.tls = self._peer_tls(conf, location.proxy_host)
        if dynamic and conf.return_ is None:
            location.dynamic = self._dynamic_pass(conf)
        if conf.limits is not None:
            from scriptlb.request.limits import LimitPhase  # (only configs with limits)

            location.limits = LimitPhase(conf.limits, self._limit_zones(), _compile)
        # nginx's preaccess phase has work here (realip's second look, limit_req/limit_conn)
        has_work = location.realip is not None or location.limits is not None
        location.preaccess = has_work and conf.return_ is None
        # a location whose requests go straight to the proxy: the exchange skips every phase test
        plain = (
            upstream is not None and conf.return_ is None and location.rewrite is None
            and location.access is None and location.dynamic is None and not location.preaccess
            and location.realip_server is None
        )
        location.plain_upstream = upstream if plain else None
        if conf.status_zone is not None:
            location.zone = self.zone_counts.setdefault(conf.status_zone, [0] * 10)
            location.logged = location.ends_body = True
        if conf.handler is not None:
            from scriptlb.request.handlers import content_handler

            location.content = content_handler(conf, self)
        elif conf.return_ is None and conf.proxy_pass is None and (os.path.isabs(conf.root) or conf.alias):
            # (a location the config did not build, the server's "no location matched" one,
            # has no root of its own: it answers 404 as before)
            from scriptlb.request.static import StaticFiles

            location.content = StaticFiles(conf)
        if conf.try_files is not None:  # (run with the access phase: see Exchange.start)
            from scriptlb.request.access import access_phase
            from scriptlb.request.static import TryFiles

            location.access = access_phase(conf, TryFiles(conf, location.content))
        return location

    def _limit_zones(self) -> dict[str, Any]:
        """limit_req_zone / limit_conn_zone: one scriptlb.request.limits.LimitZone per zone and worker."""
        if self._limit_zone_table is None:
            from scriptlb.request.limits import LimitZone
            from scriptlb.state.shared_dict import zone_directory

            directory = zone_directory(self.conf.prefix)
            zones = self.conf.http.limit_zones if self.conf.http is not None else {}
            self._limit_zone_table = {name: LimitZone(zone, directory) for name, zone in zones.items()}
        return self._limit_zone_table

    def _dynamic_pass(self, conf: LocationConf) -> Any:
        """proxy_pass with variables: one-off upstreams and name caches are the worker's, shared
        by every such location (one cache per distinct ``resolver`` configuration)."""
        from scriptlb.request.dynamic_pass import (  # (only such configs)
            AdhocUpstreams,
            DynamicPass,
            NameResolver,
        )

        pass_conf = conf.proxy_pass
        assert pass_conf is not None and pass_conf.template is not None
        if self._adhoc is None:
            python, loop = self._python, self.loop
            self._adhoc = AdhocUpstreams(lambda up: UpstreamRuntime(up, loop, python))
        resolver = None
        if pass_conf.resolver is not None:
            resolver = self._name_resolvers.get(pass_conf.resolver)
            if resolver is None:
                resolver = self._name_resolvers[pass_conf.resolver] = NameResolver(pass_conf.resolver)
        return DynamicPass(_compile(pass_conf.template), resolver, self.upstreams, self._adhoc)

    def _peer_tls(self, conf: LocationConf, proxy_host: str) -> Any:
        from scriptlb.http.tls import (  # (only TLS configs)
            PeerTls,
            certificate_pair,
            client_context,
            name_without_port,
            proxy_host_name,
        )

        ssl_conf = conf.proxy.ssl
        contexts = self._tls_contexts
        context = contexts.get(ssl_conf)
        if context is None:
            context = contexts[ssl_conf] = client_context(ssl_conf)
        if ssl_conf.name is not None:
            render = _compile(ssl_conf.name)
            name = lambda ex: name_without_port(render(ex))  # noqa: E731
        elif not proxy_host:  # proxy_pass with variables: the host it evaluated to
            name = lambda ex: proxy_host_name(ex.proxy_host)  # noqa: E731
        else:
            host = proxy_host_name(proxy_host)
            name = lambda ex: host  # noqa: E731
        pair = certificate_pair(ssl_conf, _compile, self.conf.prefix)
        return PeerTls(context, name, ssl_conf.server_name, ssl_conf.session_reuse, ssl_conf, pair)

    def _log_hook_for(self, conf: LocationConf) -> LogHookRunner | None:
        hook = conf.log_hook
        if hook is None:
            return None
        runner = self._log_hooks.get(hook)
        if runner is None:
            # imported here: only configs with hooks pay for the sandbox; an import error
            # fails the worker's start (a configured hook is never silently ignored)
            from scriptlb.hookrt.hooks import LogHookRunner

            runner = self._log_hooks[hook] = LogHookRunner(hook, self._python)
        return runner

    def _access_logs_for(self, conf: LocationConf) -> tuple[AccessLog, ...]:
        if not conf.access_log:
            return ()
        # With a log hook, the access logs read the log phase's frozen time (log_clock),
        # so the hook's $request_time & co equal the line's; without one, the plain clock.
        frozen = conf.log_hook is not None
        key = (conf.access_log, frozen)
        logs = self._access_logs.get(key)
        if logs is None:
            from scriptlb.request.accesslog import open_access_log

            clock: Callable[[], float] = self.log_clock if frozen else time.time
            logs = self._access_logs[key] = tuple(
                open_access_log(c, self.loop, self._log_files, clock) for c in conf.access_log
            )
        return logs

    def sync_passive(self) -> None:
        """``zone`` upstreams: take the passive health (``max_fails``) every worker shares
        (``UpstreamStats.sync_passive``); the worker calls it every ``PASSIVE_SYNC`` seconds."""
        for upstream in self.upstreams.values():
            if upstream.conf.zone and upstream.stats is not None and not upstream.peers.single:
                upstream.stats.sync_passive((*upstream.peers.primary, *upstream.peers.backup))

    def replace_servers(self, changed: dict[str, UpstreamConf]) -> None:
        """New server lists for some upstreams (``scriptlb.state.peer_lists``), applied between two
        loop callbacks: statistics records for new peers first, then peers and balancers."""
        recorder = self.recorder
        if recorder is not None and self.conf.http is not None:
            import dataclasses

            from scriptlb.state.stats import PeerStats, layout_of

            upstreams = {name: changed.get(name, up.conf) for name, up in self.upstreams.items()}
            old = recorder.stats
            recorder.stats = PeerStats.open(
                os.path.dirname(old.path), layout_of(dataclasses.replace(self.conf.http, upstreams=upstreams))
            )
            for upstream in self.upstreams.values():
                if upstream.stats is not None and upstream.name not in changed:
                    upstream.stats.rebind()
            old.close()  # the shard stays this process's: the new map holds it
        for name, conf in changed.items():
            self.upstreams[name].replace_servers(conf)
        if self.health is not None:
            self.health.apply()
            self.health_checker.sync(self.loop)

    # ------------------------------------------------------------------ the request path

    def tls_context(self, keys: Sequence[ListenKey]) -> ssl.SSLContext | None:
        """The SSLContext a listening socket (its keys) is opened with, or None without TLS:
        the default server's, switching on SNI to the server ``server_name`` picks (a server
        on the socket without TLS settings of its own answers with the default's)."""
        servers = [s for s in self.conf.http.servers if any(lc.key in keys for lc in s.listens)] \
            if self.conf.http is not None else []
        # TLS is a property of the socket: a `listen ... ssl` for its address (a server with
        # `listen 80; listen 443 ssl;` serves port 80 in clear)
        if not any(lc.ssl for s in servers for lc in s.listens if lc.key in keys):
            return None
        confs = [s.ssl for s in servers if s.ssl is not None]
        if not confs:
            return None
        from scriptlb.http.tls import server_context, sni_context  # (only TLS configs load ssl)
        from scriptlb.http.tls_sessions import sessions_directory

        sessions = sessions_directory(self.conf.prefix)

        route = self.routes[keys[0]]
        fallback = route.default_server.conf.ssl or confs[0]
        contexts: dict[int, Any] = {}

        def context_of(conf: ServerConf) -> Any:
            ssl_conf = conf.ssl or fallback
            ctx = contexts.get(id(ssl_conf))
            if ctx is None:
                ctx = contexts[id(ssl_conf)] = server_context(ssl_conf, sessions)
            return ctx

        default = context_of(route.default_server.conf)
        return sni_context(default, lambda name: context_of(route.selector.select(name)))

    def route_for(self, conn: ClientConnection) -> ServerRoute:
        """The listening key a connection arrived on (a wildcard socket may serve several)."""
        keys = conn.listener.keys
        if len(keys) == 1:
            return self.routes[keys[0]]
        for key in keys:
            host, port, unix_path = key
            if unix_path is None and host == conn.server_addr and port == conn.server_port:
                return self.routes[key]
        wildcard = next((k for k in keys if k[0] in ("0.0.0.0", "::", None)), keys[0])
        return self.routes[wildcard]

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Close pooled connections and flush access logs (worker exit)."""
        for upstream in self.upstreams.values():
            upstream.close()
        for file in self._log_files.values():  # once per path, however many logs share it
            file.close()

    def reopen_logs(self) -> None:
        """USR1: each access-log path is reopened once (nginx reopens each open file once)."""
        for file in self._log_files.values():
            file.reopen()


def _geo_forwarded(conf: GeoConf) -> Callable[[str, Any], str]:
    """A geo block's ``proxy`` lines: a trusted address gives way to X-Forwarded-For's."""
    from scriptlb.config.model import RealIpConf
    from scriptlb.request.realip import RealIp

    reader = RealIp(RealIpConf(conf.proxies, "x-forwarded-for", conf.proxy_recursive))

    def forwarded(addr: str, exchange: Any) -> str:
        lines = [v.decode("latin-1") for n, v in exchange.headers if n.lower() == b"x-forwarded-for"]
        return reader.forwarded_address(addr, lines)

    return forwarded
