"""Tree -> drafts -> frozen model: the load-time work nginx splits over its merge/init phases.

1. ``walk`` dispatches every node through the directive table (``directives.lookup``) in
   order, so errors come out in file order as nginx reports them.
2. ``finish`` resolves what needs the whole tree: proxy_pass -> upstreams (explicit blocks may
   come after their use), inheritance http -> server -> location (each LocationConf is
   effective), listen conflicts across servers, hook budgets, defaults.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any

from scriptlb.config.addresses import AddressError, ProxyUrl, parse_proxy_url, proxy_host_port, resolve
from scriptlb.config.directives import (
    COMBINED_FORMAT,
    OFF,
    Ctx,
    State,
    default_redirect,
    listen_name,
    lookup,
    with_file_cache,
)
from scriptlb.config.drafts import (
    Header,
    HookDraft,
    HttpDraft,
    LevelDraft,
    LocationDraft,
    MainDraft,
    MatchDraft,
    ServerDraft,
    StreamDraft,
    UpstreamDraft,
)
from scriptlb.config.errors import ConfigError
from scriptlb.config.maps import declared_map_variables
from scriptlb.config.model import (
    DEFAULT_MEMORY_LIMIT,
    AccessLogConf,
    BreakerConf,
    ClientBodyConf,
    ErrorLogConf,
    ExpiresConf,
    HealthCheckConf,
    HookConf,
    HttpConf,
    LimitExceptConf,
    LimitsConf,
    ListenConf,
    LocationConf,
    LogFormat,
    MainConf,
    MatchConf,
    PeerAddr,
    ProxyConf,
    ProxyPassConf,
    ProxySslConf,
    ProxyStoreConf,
    PythonConf,
    RealIpConf,
    ResolverConf,
    RewriteOp,
    ServerConf,
    Source,
    SsiConf,
    SslCertificate,
    SslConf,
    Template,
    TextRewrite,
    UpstreamConf,
    UpstreamServerConf,
)
from scriptlb.config.parser import Node
from scriptlb.config.rewrite import DraftOp, IfDraft, with_body
from scriptlb.config.stream import stream_conf
from scriptlb.config.templates import compile_template, declared_variables

DEFAULT_HOOK_TIMEOUT = 0.010
DEFAULT_PID = "logs/scriptlb.pid"  # nginx's NGX_PID_PATH, under the prefix
_REGEX = ("~", "~*")
# nginx's ngx_http_proxy_headers that matter to a peer; a level's own list comes first and
# wins by name (an empty value then removes the header)
_DEFAULT_HEADERS: tuple[Header, ...] = (
    ("host", "Host", compile_template("$proxy_host")),
    ("connection", "Connection", compile_template("close")),
)
# OpenResty: an upstream whose only peers come from a hook gets this placeholder
_PLACEHOLDER_SERVER = UpstreamServerConf("0.0.0.1", (PeerAddr("0.0.0.1", 80),))
_DOWN_PLACEHOLDER = UpstreamServerConf("0.0.0.1:80", (PeerAddr("0.0.0.1", 80),), down=True)


def build(nodes: Sequence[Node], conf_file: str, prefix: str, files: Sequence[str]) -> MainConf:
    state = State(prefix)
    main = MainDraft()
    with declared_variables(declared_map_variables(nodes)):
        walk(state, nodes, Ctx.MAIN, main)
    return _main_conf(state, main, conf_file, prefix, tuple(files))


def walk(state: State, nodes: Sequence[Node], ctx: Ctx, draft: Any) -> None:
    for node in nodes:
        spec = lookup(node, ctx)
        result = spec.handler(state, node, draft)
        if result is None:
            continue
        child_ctx, child_draft = result
        if child_ctx is Ctx.HTTP:
            child_draft.log_formats["combined"] = LogFormat("combined", compile_template(COMBINED_FORMAT))
        walk(state, node.children or (), child_ctx, child_draft)
        if child_ctx in (Ctx.UPSTREAM, Ctx.STREAM_UPSTREAM):
            _close_upstream(child_draft, node)


def _close_upstream(upstream: UpstreamDraft, node: Node) -> None:
    if "state" in upstream.values:
        _load_state_file(upstream, node)
    dynamic = "discovery" in upstream.values or any(s.resolve for s in upstream.servers)
    if dynamic and not any(s.addrs for s in upstream.servers if not s.backup):
        # no address until etcd or DNS answers: a peer that is always down (502) until then
        upstream.servers.append(_DOWN_PLACEHOLDER)
    if not upstream.servers:
        if upstream.hook is None:
            raise ConfigError("no servers are inside upstream", node.close)
        upstream.servers.append(_PLACEHOLDER_SERVER)


def _load_state_file(upstream: UpstreamDraft, node: Node) -> None:
    """nginx Plus's ``state FILE``: the servers the API last left (``server`` lines), read at
    load time; they replace the block's own. A missing file keeps the block's servers."""
    from scriptlb.config.addresses import parse_upstream_server
    from scriptlb.config.parser import parse

    path = upstream.values["state"]
    if not os.path.exists(path):
        return
    servers = []
    for line in parse(path, None).nodes:
        if line.name != "server" or line.children is not None or not line.args:
            raise ConfigError(f'unexpected "{line.name}" in state file', line.source)
        servers.append(parse_upstream_server(line, upstream.allowed_params))
    upstream.servers = servers


# --------------------------------------------------------------------------- main


def _main_conf(
    state: State, main: MainDraft, conf_file: str, prefix: str, files: tuple[str, ...]
) -> MainConf:
    v = main.values
    http = _http_conf(state, main.http) if main.http is not None else None
    return MainConf(
        conf_file=conf_file,
        prefix=prefix,
        worker_processes=v.get("worker_processes", 1),
        daemon=v.get("daemon", True),
        master_process=v.get("master_process", True),
        pid=v.get("pid", state.path(DEFAULT_PID)),
        user=v.get("user"),
        # nginx defaults to logs/error.log; scriptlb to stderr, so nothing is written before
        # the operator chose a place (the default config names one)
        error_log=tuple(main.error_logs) or (ErrorLogConf("stderr", "error"),),
        worker_connections=v.get("worker_connections", 512),
        http=http,
        stream=(stream_conf(main.stream, _upstream_conf, _ssl_conf, _checked_proxy_ssl_conf)
                if main.stream is not None else None),
        worker_shutdown_timeout=v.get("worker_shutdown_timeout", 0.0),
        files=files,
        warnings=tuple(state.warnings),
    )


# --------------------------------------------------------------------------- http


def _http_conf(state: State, http: HttpDraft) -> HttpConf:
    upstreams = {u.name: _upstream_conf(u, http) for u in http.upstreams.values()}
    resolver = _ProxyPassResolver(http, upstreams)
    servers = tuple(_server_conf(s, http, resolver) for s in http.servers)
    for name, checks in resolver.health_checks.items():
        upstreams[name] = dataclasses.replace(upstreams[name], health_checks=tuple(checks))
    servers = _check_listens(servers)
    _check_peer_tls(servers)
    _warn_conflicting_names(state, servers)
    _warn_placeholder_fallback(state, upstreams)
    python = PythonConf(
        package_path=http.values.get("python_package_path", ()),
        code_cache=http.values.get("python_code_cache", True),
        memory_limit=http.values.get("python_memory_limit", DEFAULT_MEMORY_LIMIT),
        peer_stats=http.values.get("python_peer_stats", True),
    )
    return HttpConf(
        upstreams=upstreams,
        servers=servers,
        log_formats=dict(http.log_formats),
        python=python,
        shared_dicts=dict(http.shared_dicts),
        limit_zones=dict(http.limit_zones),
        matches=resolver.matches,
        maps=dict(http.maps),
    )


def _upstream_resolver(upstream: UpstreamDraft, http: HttpDraft | StreamDraft) -> ResolverConf | None:
    """The upstream's ``resolver`` (else http's), with its ``resolver_timeout``; checks that
    run-time membership has what it needs, in nginx Plus's words."""
    dynamic = [s for s in upstream.servers if s.resolve]
    if (dynamic or "discovery" in upstream.values) and "zone" not in upstream.values:
        name = dynamic[0].name if dynamic else upstream.name
        raise ConfigError(f'resolving names at run time requires upstream "{upstream.name}" '
                          f'to be in shared memory ("{name}" needs "zone")', upstream.source)
    v, h = upstream.values, http.values
    resolver = v.get("resolver", h.get("resolver"))
    if resolver is None:
        if dynamic:
            raise ConfigError(f'no resolver defined to resolve {dynamic[0].name}', dynamic[0].source)
        return None
    timeout = v.get("resolver_timeout", h.get("resolver_timeout", 30.0))
    conf: ResolverConf = dataclasses.replace(resolver, timeout=timeout)
    return conf


def _upstream_conf(upstream: UpstreamDraft, http: HttpDraft | StreamDraft) -> UpstreamConf:
    if not any(not s.backup for s in upstream.servers):
        raise ConfigError(f'no servers in upstream "{upstream.name}"', upstream.source)
    v = upstream.values
    hook = None
    if upstream.hook is not None:
        timeout = v.get("balancer_by_python_timeout", http.values.get("balancer_by_python_timeout"))
        hook = _hook_conf(upstream.hook, DEFAULT_HOOK_TIMEOUT if timeout is None else timeout)
        hook = _hook_failure_policy(hook, v, http.values)
    return UpstreamConf(
        name=upstream.name,
        servers=tuple(upstream.servers),
        method=upstream.method,
        hook=hook,
        keepalive=v.get("keepalive", 0),
        keepalive_timeout=v.get("keepalive_timeout", 60.0),
        keepalive_requests=v.get("keepalive_requests", 1000),
        keepalive_time=v.get("keepalive_time", 3600.0),
        balancer_keepalive=v.get("balancer_keepalive", 32),
        source=upstream.source,
        zone=v.get("zone"),
        state_file=v.get("state"),
        discovery=v.get("discovery"),
        resolver=_upstream_resolver(upstream, http),
    )


def _hook_failure_policy(hook: HookConf, values: dict[str, Any], http: dict[str, Any]) -> HookConf:
    """balancer_by_python_fallback and balancer_by_python_breaker (upstream, else http)."""
    fallback = values.get("balancer_by_python_fallback", http.get("balancer_by_python_fallback", True))
    breaker = values.get("balancer_by_python_breaker", http.get("balancer_by_python_breaker", BreakerConf()))
    return dataclasses.replace(hook, fallback=fallback, breaker=breaker)


def _hook_conf(hook: HookDraft, timeout: float) -> HookConf:
    return HookConf(
        kind=hook.kind,
        path=hook.path,
        code=hook.code,
        source=hook.source,
        timeout=timeout,
        first_line=hook.code_line,
        phase=hook.phase,
    )


def _log_hook(chain: Sequence[LevelDraft]) -> HookConf | None:
    """The innermost level's log hook; its CPU budget is the innermost log_by_python_timeout
    (which may come from another level than the hook, as nginx merges each slot alone)."""
    hook = next((lv.log_hook for lv in chain if lv.log_hook is not None), None)
    if hook is None:
        return None
    return _hook_conf(hook, _get(chain, "log_by_python_timeout", DEFAULT_HOOK_TIMEOUT))


class _ProxyPassResolver:
    """proxy_pass URL -> (upstream key, ProxyPassConf); adds implicit upstreams as needed."""

    def __init__(self, http: HttpDraft, upstreams: dict[str, UpstreamConf]) -> None:
        self.explicit = {key: u.name for key, u in http.upstreams.items()}
        self.upstreams = upstreams
        self.matches = {name: _match_conf(m) for name, m in http.matches.items()}
        self.health_checks: dict[str, list[HealthCheckConf]] = {}  # upstream name -> its checks

    def add_health_checks(self, location: LocationDraft, conf: LocationConf) -> None:
        """A location's ``health_check`` lines apply to the upstream it proxies to."""
        for params in location.values.get("health_checks", ()):
            source = params.pop("source")
            if conf.proxy_pass is None or conf.proxy_pass.template is not None:
                raise ConfigError('"health_check" requires "proxy_pass" to an upstream', source)
            match_name = params.pop("match", None)
            match = None
            if match_name is not None:
                match = self.matches.get(match_name)
                if match is None:
                    raise ConfigError(f'match "{match_name}" not found', source)
            check = HealthCheckConf(
                **params, match=match, host=conf.proxy_pass.proxy_host, source=source,
                connect_timeout=conf.proxy.connect_timeout, read_timeout=conf.proxy.read_timeout,
            )
            self.health_checks.setdefault(conf.proxy_pass.upstream, []).append(check)

    def resolve(self, url: str, source: Source, location: LocationDraft,
                chain: Sequence[LevelDraft] = ()) -> ProxyPassConf:
        if location.proxy_pass_template is not None:
            return self._dynamic(url, source, location.proxy_pass_template, chain)
        try:
            parsed = parse_proxy_url(url)
        except AddressError as e:
            raise ConfigError(_url_error(e.kind, url), source) from None
        if parsed.uri is not None and (location.modifier in _REGEX or location.pattern.startswith("@")):
            raise ConfigError(
                '"proxy_pass" cannot have URI part in location given by regular expression, '
                'or inside named location, or inside "if" statement, or inside "limit_except" block',
                source,
            )
        target = parsed.target
        explicit = self.explicit.get(target.host.lower()) if target.unix_path is None else None
        if explicit is not None:
            if target.port is not None:
                raise ConfigError(f'upstream "{explicit}" may not have port {target.port}', source)
            return ProxyPassConf(explicit, parsed.uri, explicit, source, parsed.ssl,
                                 proxy_port="443" if parsed.ssl else "80")
        key = self._implicit(parsed, source)
        host, port = proxy_host_port(parsed)
        return ProxyPassConf(key, parsed.uri, host, source, parsed.ssl, proxy_port=port)

    @staticmethod
    def _dynamic(url: str, source: Source, template: Any, chain: Sequence[LevelDraft]) -> ProxyPassConf:
        """proxy_pass with variables: only the scheme is known before the request."""
        lowered = url.lower()  # (nginx checks the prefix of the evaluated URL only)
        resolver = _get(chain, "resolver", None)
        if resolver is not None:
            resolver = dataclasses.replace(resolver, timeout=_get(chain, "resolver_timeout", 30.0))
        return ProxyPassConf("", None, "", source, lowered.startswith("https://"), template, resolver)

    def _implicit(self, parsed: ProxyUrl, source: Source) -> str:
        target = parsed.target
        if target.unix_path is not None:
            addrs: tuple[PeerAddr, ...] = (PeerAddr(None, 0, target.unix_path),)
            key = f"unix:{target.unix_path}"
        else:
            port = (443 if parsed.ssl else 80) if target.port is None else target.port
            key = _host_port(target.host, port)
            if key in self.upstreams:
                return key
            addrs = resolve(target.host, port)
            if not addrs:
                raise ConfigError(f'host not found in upstream "{target.host}"', source)
        if key not in self.upstreams:
            server = UpstreamServerConf(name=key, addrs=addrs, source=source)
            self.upstreams[key] = UpstreamConf(name=key, servers=(server,), implicit=True, source=source)
        return key


def _match_conf(draft: MatchDraft) -> MatchConf:
    return MatchConf(draft.name, tuple(draft.statuses), tuple(draft.headers), tuple(draft.bodies),
                     draft.send, draft.expect, draft.source)


def _url_error(kind: str, url: str) -> str:
    if kind in ("invalid URL prefix",):
        return kind
    rest = url.split("://", 1)[-1]
    return f'{kind} in upstream "{rest.split("/")[0]}"'


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --------------------------------------------------------------------------- servers


def _default_listen(server: ServerDraft) -> ListenConf:
    # nginx: *:80 when started as root, *:8000 otherwise
    port = 80 if os.geteuid() == 0 else 8000
    return ListenConf("0.0.0.0", port, source=server.source)


def _server_conf(server: ServerDraft, http: HttpDraft, resolver: _ProxyPassResolver) -> ServerConf:
    chain = (server, http)
    locations = list(server.locations)
    if server.return_ is not None:
        # a server-level return answers before any location is chosen: give it to every
        # location, and make sure one matches every URI
        if not any(loc.modifier == "" and loc.pattern == "/" for loc in locations):
            locations.append(LocationDraft(modifier="", pattern="/", source=server.return_.source))
        for loc in locations:
            loc.return_ = server.return_
    return ServerConf(
        listens=tuple(server.listens) or (_default_listen(server),),
        server_names=tuple(server.server_names) or ("",),
        locations=tuple(conf for loc in locations for conf in _location_tree(loc, chain, resolver)),
        client_header_timeout=_get(chain, "client_header_timeout", 60.0),
        large_client_header_buffers=_get(chain, "large_client_header_buffers", (4, 8192)),
        max_headers=_get(chain, "max_headers", 1000),
        client_header_buffer_size=_get(chain, "client_header_buffer_size", 1024),
        underscores_in_headers=_get(chain, "underscores_in_headers", False),
        ignore_invalid_headers=_get(chain, "ignore_invalid_headers", True),
        source=server.source,
        ssl=_ssl_conf(server, chain),
        rewrite=tuple(_resolved(server.values.get("rewrite_ops", ()))),
        fallback=_location_conf(LocationDraft(source=server.source), chain, resolver),
    )


def _rewrite_ops(
    chain: Sequence[LevelDraft], if_location: Callable[[IfDraft], LocationConf | None] | None = None
) -> tuple[RewriteOp, ...]:
    """The server's rewrite-module directives, then the location's (each level its own, in
    order; http has none). An ``if`` comes with the block read after it; ``if_location``
    builds the location of a location's ``if`` that holds directives of its own."""
    ops: list[RewriteOp] = []
    server = next(level for level in chain if isinstance(level, ServerDraft))
    own = chain[0]
    # (a named location is entered past the server's rewrite phase, as nginx)
    levels = (own,) if isinstance(own, LocationDraft) and own.pattern.startswith("@") else (server, own)
    for level in levels:
        ops += _resolved(level.values.get("rewrite_ops", ()), if_location if level is own else None)
    return tuple(ops)


def _resolved(
    entries: Sequence[DraftOp], if_location: Callable[[IfDraft], LocationConf | None] | None = None
) -> list[RewriteOp]:
    out = []
    for entry in entries:
        if isinstance(entry, tuple):
            op, body = entry
            location = if_location(body) if if_location is not None and body.has_content() else None
            out.append(with_body(op, _resolved(body.ops), location))
        else:
            out.append(entry)
    return out


def _if_location(
    body: LocationDraft, loc: LocationDraft, parents: Sequence[LevelDraft], resolver: _ProxyPassResolver,
    outer_pass: ProxyPassConf | None,
) -> LocationConf:
    """The location an ``if`` block of ``loc`` makes (nginx's if-in-location): ``loc``'s
    settings with the block's over them; ``proxy_pass`` is inherited, an own one may not have
    a URI part. Its rewrite directives run inline (the block's ops), not again here."""
    conf = _location_conf(body, (loc, *parents), resolver)
    if body.proxy_pass is None:
        return dataclasses.replace(conf, proxy_pass=outer_pass, rewrite=())
    if conf.proxy_pass is not None and conf.proxy_pass.uri is not None:
        raise ConfigError(
            '"proxy_pass" cannot have URI part in location given by regular expression, '
            'or inside named location, or inside "if" statement, or inside "limit_except" block',
            body.proxy_pass[1],
        )
    return dataclasses.replace(conf, rewrite=())
def _check_peer_tls(servers: tuple[ServerConf, ...]) -> None:
    """proxy_pass https://: build each distinct client context once, for its errors."""
    from scriptlb.http.tls import TlsConfigError, client_context

    checked: set[ProxySslConf] = set()
    for server in servers:
        for location in server.locations:
            proxy_pass = location.proxy_pass
            if proxy_pass is None or not proxy_pass.ssl or location.proxy.ssl in checked:
                continue
            checked.add(location.proxy.ssl)
            try:
                client_context(location.proxy.ssl)
            except TlsConfigError as e:
                raise ConfigError(str(e), e.source or proxy_pass.source) from None


def _checked_proxy_ssl_conf(chain: Sequence[LevelDraft], source: Source | None) -> ProxySslConf:
    """A stream server's proxy_ssl_* settings, its client context built once for its errors."""
    from scriptlb.http.tls import TlsConfigError, client_context

    conf = _proxy_ssl_conf(chain)
    try:
        client_context(conf)
    except TlsConfigError as e:
        raise ConfigError(str(e), e.source or source) from None
    return conf


def _ssl_conf(server: ServerDraft, chain: Sequence[LevelDraft]) -> SslConf | None:
    """The server's TLS settings when one of its listens has ``ssl`` (checked by building the
    context once, so a bad certificate or key is a config error with its file:line)."""
    ssl_listen = next((listen for listen in server.listens if listen.ssl), None)
    if ssl_listen is None:
        return None
    certificates = _get(chain, "ssl_certificate", [])
    keys = _get(chain, "ssl_certificate_key", [])
    if not certificates:
        raise ConfigError('no "ssl_certificate" is defined for the "listen ... ssl" directive',
                          ssl_listen.source)
    if len(keys) < len(certificates):
        path, source = certificates[len(keys)]
        raise ConfigError(f'no "ssl_certificate_key" is defined for certificate "{path}"', source)
    conf = SslConf(
        certificates=tuple(
            SslCertificate(c, k, source) for (c, source), (k, _) in zip(certificates, keys, strict=False)
        ),
        protocols=_get(chain, "ssl_protocols", ("TLSv1.2", "TLSv1.3")),
        ciphers=_get(chain, "ssl_ciphers", "HIGH:!aNULL:!MD5"),
        prefer_server_ciphers=_get(chain, "ssl_prefer_server_ciphers", False),
        ecdh_curve=_get(chain, "ssl_ecdh_curve", "auto"),
        session_cache=_get(chain, "ssl_session_cache", "none"),
        session_timeout=_get(chain, "ssl_session_timeout", 300.0),
        session_tickets=_get(chain, "ssl_session_tickets", True),
        session_ticket_keys=tuple(_get(chain, "ssl_session_ticket_key", [])),
        client_certificate=_get(chain, "ssl_client_certificate", None),
        trusted_certificate=_get(chain, "ssl_trusted_certificate", None),
        verify_client=_get(chain, "ssl_verify_client", "off"),
        verify_depth=_get(chain, "ssl_verify_depth", 1),
        dhparam=_get(chain, "ssl_dhparam", None),
        password_file=_get(chain, "ssl_password_file", None),
        source=ssl_listen.source,
    )
    from scriptlb.http.tls import TlsConfigError, server_context  # (only configs with TLS load ssl)

    try:
        server_context(conf)
    except TlsConfigError as e:
        raise ConfigError(str(e), e.source) from None
    return conf


def _get(chain: Sequence[LevelDraft], name: str, default: Any) -> Any:
    """The effective value: the innermost level that set it, else nginx's default."""
    for level in chain:
        if name in level.values:
            return level.values[name]
    return default


def _location_tree(
    loc: LocationDraft, parents: Sequence[LevelDraft], resolver: _ProxyPassResolver, nested: bool = False
) -> list[LocationConf]:
    """A location and every location nested in it (they inherit from it), parents first."""
    below: list[LocationConf] = []
    inner: list[LocationConf] = []
    for child in loc.locations:
        tree = _location_tree(child, (loc, *parents), resolver, nested=True)
        inner.append(tree[0])
        below += tree
    conf = _location_conf(loc, parents, resolver)
    if inner or nested:
        conf = dataclasses.replace(conf, inner=tuple(inner), nested=nested)
    return [conf, *below]


def _location_conf(
    loc: LocationDraft, parents: Sequence[LevelDraft], resolver: _ProxyPassResolver
) -> LocationConf:
    chain = (loc, *parents)
    proxy_pass = None
    if loc.proxy_pass is not None:  # checked even under a return, as nginx does
        proxy_pass = resolver.resolve(loc.proxy_pass[0], loc.proxy_pass[1], loc, chain)
    access_logs: list[AccessLogConf] = next(
        (lv.access_logs for lv in chain if lv.access_logs is not None), []
    )
    conf = LocationConf(
        modifier=loc.modifier,
        pattern=loc.pattern,
        proxy_pass=proxy_pass,
        return_=loc.return_,
        proxy=_proxy_conf(chain),
        client_max_body_size=_get(chain, "client_max_body_size", 1024 * 1024),
        client_body_timeout=_get(chain, "client_body_timeout", 60.0),
        keepalive_timeout=_get(chain, "keepalive_timeout", 75.0),
        keepalive_requests=_get(chain, "keepalive_requests", 1000),
        send_timeout=_get(chain, "send_timeout", 60.0),
        keepalive_header=_get(chain, "keepalive_header", None),
        keepalive_time=_get(chain, "keepalive_time", None),
        keepalive_disable=_get(chain, "keepalive_disable", ("msie6",)),
        limit_rate=_get(chain, "limit_rate", 0),
        limit_rate_after=_get(chain, "limit_rate_after", 0),
        proxy_limit_rate=_get(chain, "proxy_limit_rate", 0),
        proxy_store=_proxy_store(chain),
        client_body=_client_body_conf(chain),
        access_log=with_file_cache(access_logs, _get(chain, "open_log_file_cache", None)),
        source=loc.source,
        log_hook=_log_hook(chain),
        add_headers=tuple(_get(chain, "add_header", ())),
        add_trailers=tuple(_get(chain, "add_trailer", ())),
        expires=_expires(chain),
        try_files=_get(chain, "try_files", None),
        limit_except=_limit_except(loc, chain, resolver, proxy_pass),
        rewrite=_rewrite_ops(chain, lambda body: _if_location(body, loc, parents, resolver, proxy_pass)),
        error_pages=tuple(_get(chain, "error_page", ())),
        intercept_errors=_get(chain, "proxy_intercept_errors", False),
        index=_get(chain, "index", ("index.html",)),
        ssi=_ssi_conf(chain),
        **_root_or_alias(chain),
        absolute_redirect=_get(chain, "absolute_redirect", True),
        server_name_in_redirect=_get(chain, "server_name_in_redirect", False),
        port_in_redirect=_get(chain, "port_in_redirect", True),
        **_access_settings(chain, loc),
    )
    if "health_checks" in loc.values:
        resolver.add_health_checks(loc, conf)
    return conf


def _proxy_store(chain: Sequence[LevelDraft]) -> ProxyStoreConf | None:
    store = _get(chain, "proxy_store", False)
    if store is False:
        return None
    return ProxyStoreConf(None if store is True else store, _get(chain, "proxy_store_access", 0o600))


def _ssi_conf(chain: Sequence[LevelDraft]) -> SsiConf | None:
    """``ssi on`` and its settings (each merged on its own, as nginx's); None when off."""
    if not _get(chain, "ssi", False):
        return None
    types = _get(chain, "ssi_types", ())
    return SsiConf(
        types=("*",) if "*" in types else ("text/html", *types),
        silent_errors=_get(chain, "ssi_silent_errors", False),
        last_modified=_get(chain, "ssi_last_modified", False),
        value_length=_get(chain, "ssi_value_length", 256),
    )


def _root_or_alias(chain: Sequence[LevelDraft]) -> dict[str, Any]:
    """root and alias share nginx's slot: the innermost level that sets either wins (a
    nested location inherits its parent's alias, with the parent's prefix)."""
    for level in chain:
        if "alias" in level.values:
            path, prefix = level.values["alias"]
            return {"alias": path, "alias_prefix": prefix}
        if "root" in level.values:
            return {"root": level.values["root"]}
    return {"root": os.path.join(getattr(chain[-1], "prefix", ""), "html")}


def _limit_except(loc: LocationDraft, chain: Sequence[LevelDraft], resolver: _ProxyPassResolver,
                  outer_pass: ProxyPassConf | None) -> LimitExceptConf | None:
    """The location's own limit_except (a nested location does not inherit it, as nginx)."""
    found = loc.values.get("limit_except")
    if found is None:
        return None
    methods, block = found
    settings = _access_settings((block, *chain), loc)
    location = None
    if block.proxy_pass is not None:
        own = _if_location(block, loc, chain[1:], resolver, outer_pass)
        location = dataclasses.replace(own, limit_except=None)
    return LimitExceptConf(methods, settings["access"], settings["auth_basic"],
                           settings["auth_basic_user_file"], location)


def _expires(chain: Sequence[LevelDraft]) -> ExpiresConf | None:
    conf = _get(chain, "expires", None)
    return None if conf is None or conf.kind == "off" else conf


def _access_settings(chain: Sequence[LevelDraft], loc: LocationDraft) -> dict[str, Any]:
    """allow/deny (a level's rules replace the inherited ones), auth_basic (active only with
    a user file, as nginx), and the location's own content handler (never inherited)."""
    realm = _get(chain, "auth_basic", None)
    user_file = _get(chain, "auth_basic_user_file", None)
    handler = loc.values.get("handler")
    return {
        "access": tuple(_get(chain, "access_rules", ())),
        "auth_basic": realm if user_file is not None else None,
        "auth_basic_user_file": user_file if realm is not None else None,
        "handler": handler[0] if handler else None,
        "status_zone": _get(chain, "status_zone", None),
        "api_write": bool(handler and handler[1]),
        "trace_header": _get(chain, "balancer_trace_header", False),
        "trace_allow": tuple(_get(chain, "balancer_trace_allow", ())),
        "realip": _realip_conf(chain),
        "realip_server": _realip_conf(chain[-2:]),
        "limits": _limits_conf(chain),
    }


def _limits_conf(chain: Sequence[LevelDraft]) -> LimitsConf | None:
    reqs = _get(chain, "limit_req", ())
    conns = _get(chain, "limit_conn", ())
    if not reqs and not conns:
        return None
    zones = getattr(chain[-1], "limit_zones", {})
    for kind, limits in (("limit_req", reqs), ("limit_conn", conns)):
        for limit in limits:
            zone = zones.get(limit.zone)
            if zone is None or zone.kind != kind:
                raise ConfigError(f'zero size shared memory zone "{limit.zone}"', limit.source)
    return LimitsConf(
        reqs=tuple(reqs), req_status=_get(chain, "limit_req_status", 503),
        req_log_level=_get(chain, "limit_req_log_level", "error"),
        req_dry_run=_get(chain, "limit_req_dry_run", False),
        conns=tuple(conns), conn_status=_get(chain, "limit_conn_status", 503),
        conn_log_level=_get(chain, "limit_conn_log_level", "error"),
        conn_dry_run=_get(chain, "limit_conn_dry_run", False),
    )


def _realip_conf(chain: Sequence[LevelDraft]) -> RealIpConf | None:
    trusted = _get(chain, "set_real_ip_from", ())
    if not trusted:
        return None  # (nginx: without set_real_ip_from the module does nothing)
    return RealIpConf(tuple(trusted), _get(chain, "real_ip_header", "x-real-ip"),
                      _get(chain, "real_ip_recursive", False))


def _client_body_conf(chain: Sequence[LevelDraft]) -> ClientBodyConf:
    defaults = ClientBodyConf()
    prefix = getattr(chain[-1], "prefix", "")
    return ClientBodyConf(
        buffer_size=_get(chain, "client_body_buffer_size", defaults.buffer_size),
        temp_path=_get(chain, "client_body_temp_path", os.path.join(prefix, defaults.temp_path)),
        in_file_only=_get(chain, "client_body_in_file_only", defaults.in_file_only),
        in_single_buffer=_get(chain, "client_body_in_single_buffer", defaults.in_single_buffer),
    )


def _proxy_buffers(chain: Sequence[LevelDraft]) -> tuple[int, tuple[int, int], int]:
    """proxy_buffer_size, proxy_buffers, proxy_busy_buffers_size, checked as nginx's merge
    does (the error points at the http block's end, as nginx's)."""
    defaults = ProxyConf()
    buffer_size = _get(chain, "proxy_buffer_size", defaults.buffer_size)
    number, size = _get(chain, "proxy_buffers", defaults.buffers)
    where = getattr(chain[-1], "close", None)
    if number < 2:
        raise ConfigError('there must be at least 2 "proxy_buffers"', where)
    largest = max(buffer_size, size)
    busy = _get(chain, "proxy_busy_buffers_size", 2 * largest)
    if busy < largest:
        raise ConfigError('"proxy_busy_buffers_size" must be equal to or greater than the maximum of the '
                          'value of "proxy_buffer_size" and one of the "proxy_buffers"', where)
    if busy > (number - 1) * size:
        raise ConfigError('"proxy_busy_buffers_size" must be less than the size of all "proxy_buffers" '
                          "minus one buffer", where)
    return buffer_size, (number, size), busy


def _proxy_conf(chain: Sequence[LevelDraft]) -> ProxyConf:
    defaults = ProxyConf()
    buffer_size, buffers, busy_buffers_size = _proxy_buffers(chain)
    return ProxyConf(
        buffer_size=buffer_size,
        buffers=buffers,
        busy_buffers_size=busy_buffers_size,
        set_headers=_headers(chain),
        http_version=_get(chain, "proxy_http_version", defaults.http_version),
        connect_timeout=_get(chain, "proxy_connect_timeout", defaults.connect_timeout),
        send_timeout=_get(chain, "proxy_send_timeout", defaults.send_timeout),
        read_timeout=_get(chain, "proxy_read_timeout", defaults.read_timeout),
        next_upstream=_get(chain, "proxy_next_upstream", defaults.next_upstream),
        next_upstream_tries=_get(chain, "proxy_next_upstream_tries", defaults.next_upstream_tries),
        next_upstream_timeout=_get(chain, "proxy_next_upstream_timeout", defaults.next_upstream_timeout),
        request_buffering=_get(chain, "proxy_request_buffering", defaults.request_buffering),
        buffering=_get(chain, "proxy_buffering", defaults.buffering),
        method=_get(chain, "proxy_method", None),
        pass_request_headers=_get(chain, "proxy_pass_request_headers", True),
        pass_request_body=_get(chain, "proxy_pass_request_body", True),
        set_body=_get(chain, "proxy_set_body", None),
        hide_headers=tuple(_get(chain, "proxy_hide_header", ())),
        pass_headers=tuple(_get(chain, "proxy_pass_header", ())),
        ignore_headers=tuple(_get(chain, "proxy_ignore_headers", ())),
        ssl=_proxy_ssl_conf(chain),
        redirects=_redirects(chain),
        cookie_domains=_rules(chain, "proxy_cookie_domain"),
        cookie_paths=_rules(chain, "proxy_cookie_path"),
        cookie_flags=_rules(chain, "proxy_cookie_flags"),
        bind=_rules(chain, "proxy_bind") or None,
    )


def _rules(chain: Sequence[LevelDraft], name: str) -> Any:
    """proxy_cookie_*, proxy_bind: the innermost level's value; () when that level says ``off``."""
    rules = _get(chain, name, OFF)
    return () if rules == OFF else rules if isinstance(rules, Template) else tuple(rules)


def _redirects(chain: Sequence[LevelDraft]) -> tuple[TextRewrite, ...]:
    """proxy_redirect as nginx merges it, outermost level first: a level's own rules (or
    ``off``) replace the inherited ones; a location with proxy_pass that inherits none gets
    ``default`` for its own URL."""
    rules: Any = None
    for level in reversed(chain):
        own = level.values.get("proxy_redirect")
        if own is not None:
            rules = own
        elif rules is None and isinstance(level, LocationDraft) and level.proxy_pass is not None \
                and "$" not in level.proxy_pass[0]:
            rules = [default_redirect(level.proxy_pass[0], level.pattern)]
    return () if rules is None or rules == OFF else tuple(rules)


def _proxy_ssl_conf(chain: Sequence[LevelDraft]) -> ProxySslConf:
    d = ProxySslConf()
    certificate = _get(chain, "proxy_ssl_certificate", None)
    key = _get(chain, "proxy_ssl_certificate_key", None)
    if certificate is not None and key is None:
        shown = certificate[0] if isinstance(certificate[0], str) else certificate[0].raw
        raise ConfigError(f'no "proxy_ssl_certificate_key" is defined for certificate "{shown}"',
                          certificate[1])
    return ProxySslConf(
        server_name=_get(chain, "proxy_ssl_server_name", d.server_name),
        name=_get(chain, "proxy_ssl_name", d.name),
        verify=_get(chain, "proxy_ssl_verify", d.verify),
        trusted_certificate=_get(chain, "proxy_ssl_trusted_certificate", d.trusted_certificate),
        verify_depth=_get(chain, "proxy_ssl_verify_depth", d.verify_depth),
        protocols=_get(chain, "proxy_ssl_protocols", d.protocols),
        ciphers=_get(chain, "proxy_ssl_ciphers", d.ciphers),
        certificate=certificate[0] if certificate is not None else None,
        certificate_key=key[0] if key is not None else None,
        session_reuse=_get(chain, "proxy_ssl_session_reuse", d.session_reuse),
        password_file=_get(chain, "proxy_ssl_password_file", d.password_file),
        crl=_get(chain, "proxy_ssl_crl", d.crl),
        conf_commands=tuple(_get(chain, "proxy_ssl_conf_command", d.conf_commands)),
    )


def _headers(chain: Sequence[LevelDraft]) -> tuple[Header, ...]:
    """nginx's rule: a level's proxy_set_header list replaces the inherited one entirely
    (inherited only if the level defines none); the defaults fill in names not set."""
    own = next((lv.set_headers for lv in chain if lv.set_headers is not None), [])
    names = {h[0] for h in own}
    return (*own, *(h for h in _DEFAULT_HEADERS if h[0] not in names))


# --------------------------------------------------------------------------- listens


def _is_placeholder(addr: PeerAddr) -> bool:
    """OpenResty's ``server 0.0.0.1;``: an address in 0.0.0.0/8 (but 0.0.0.0, which Linux
    connects to the local host), or port 0: nothing can be connected to there."""
    if addr.port == 0:
        return True
    return addr.host is not None and addr.host.startswith("0.") and addr.host != "0.0.0.0"


def _warn_placeholder_fallback(state: State, upstreams: dict[str, UpstreamConf]) -> None:
    """A config mirrored from OpenResty keeps ``server 0.0.0.1;`` beside its hook: with
    balancer_by_python_fallback on, a failed run would fall back to it."""
    for upstream in upstreams.values():
        hook = upstream.hook
        if hook is None or not hook.fallback:
            continue
        if all(_is_placeholder(addr) for server in upstream.servers for addr in server.addrs):
            names = ", ".join(server.name for server in upstream.servers)
            state.warn(f'upstream "{upstream.name}" has only placeholder servers ({names}) and '
                       "balancer_by_python_fallback on: a failed hook run falls back to a server that "
                       'cannot be connected to; "balancer_by_python_fallback off;" answers 500 as OpenResty',
                       hook.source)


def _warn_conflicting_names(state: State, servers: tuple[ServerConf, ...]) -> None:
    """nginx's warning for a name served twice on one address: the later server loses it."""
    seen: set[tuple[tuple[str | None, int, str | None], str]] = set()
    for server in servers:
        for listen in server.listens:
            for name in server.server_names:
                key = (listen.key, name if name.startswith("~") else name.lower())
                if key in seen:
                    state.warn(f'conflicting server name "{name}" on {listen_name(listen)}, ignored', None)
                seen.add(key)


def _check_listens(servers: tuple[ServerConf, ...]) -> tuple[ServerConf, ...]:
    """Cross-server listen rules: one default_server and one set of socket options per
    address; every ListenConf of an address then carries the same socket options."""
    by_key: dict[tuple[str | None, int, str | None], list[ListenConf]] = {}
    for server in servers:
        for listen in server.listens:
            by_key.setdefault(listen.key, []).append(listen)
    options: dict[tuple[str | None, int, str | None], ListenConf] = {}
    for key, listens in by_key.items():
        defaults = [lc for lc in listens if lc.default_server]
        if len(defaults) > 1:
            second = defaults[1]
            raise ConfigError(f"a duplicate default server for {listen_name(second)}", second.source)
        with_options = [lc for lc in listens if lc.reuseport or lc.backlog != 511 or lc.sndbuf or lc.rcvbuf]
        if len(with_options) > 1:
            raise ConfigError(
                f"duplicate listen options for {listen_name(with_options[1])}", with_options[1].source
            )
        if with_options:
            options[key] = with_options[0]
    if not options:
        return servers

    def shared(listen: ListenConf) -> ListenConf:
        opt = options.get(listen.key)
        if opt is None:
            return listen
        return dataclasses.replace(listen, reuseport=opt.reuseport, backlog=opt.backlog, sndbuf=opt.sndbuf,
                                   rcvbuf=opt.rcvbuf)

    return tuple(dataclasses.replace(s, listens=tuple(shared(lc) for lc in s.listens)) for s in servers)
