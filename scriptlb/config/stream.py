"""The ``stream`` block (ngx_stream_*_module): its directives and the frozen ``StreamConf``.

Upstream blocks reuse http's handlers (``server`` lines, balancing methods, balancer hooks) and
build the same ``UpstreamConf``, so the runtime balances TCP with the same classes. What differs
is kept here: the variable names a session has, ``proxy_pass NAME | ADDR | $var`` and the
proxy settings of ngx_stream_proxy_module (nginx's names, defaults and messages).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from scriptlb.config import directives as d
from scriptlb.config.addresses import AddressError, parse_listen, split_host_port
from scriptlb.config.directives import Ctx, State, fail, flag, msec, number
from scriptlb.config.drafts import MainDraft, StreamDraft, StreamServerDraft, UpstreamDraft
from scriptlb.config.errors import ConfigError
from scriptlb.config.model import (
    LimitsConf,
    ListenConf,
    ListenKey,
    PeerAddr,
    RealIpConf,
    ResolverConf,
    Source,
    StreamConf,
    StreamMapConf,
    StreamProxyConf,
    StreamProxyPass,
    StreamServerConf,
    StreamSplitConf,
    UpstreamConf,
    UpstreamServerConf,
)
from scriptlb.config.parser import Node
from scriptlb.config.regex import compile_nginx_regex
from scriptlb.config.templates import compile_template, is_stream_variable
from scriptlb.config.units import parse_size

SS = Ctx.STREAM | Ctx.STREAM_SERVER
SU = Ctx.STREAM_UPSTREAM

# directive -> (StreamProxyConf field, default); the defaults are nginx's
_PROXY_FIELDS = {
    "proxy_connect_timeout": "connect_timeout",
    "proxy_timeout": "timeout",
    "proxy_next_upstream": "next_upstream",
    "proxy_next_upstream_tries": "next_upstream_tries",
    "proxy_next_upstream_timeout": "next_upstream_timeout",
    "proxy_buffer_size": "buffer_size",
    "proxy_download_rate": "download_rate",
    "proxy_upload_rate": "upload_rate",
    "proxy_half_close": "half_close",
    "proxy_protocol": "proxy_protocol",
    "proxy_requests": "requests",
    "proxy_responses": "responses",
}

# listen parameters nginx refuses beside `udp` (ngx_stream_core_listen)
_NOT_WITH_UDP = ("backlog", "ssl", "proxy_protocol", "so_keepalive", "fastopen", "deferred",
                 "accept_filter", "multipath")


# --------------------------------------------------------------------------- handlers


def _stream(state: State, node: Node, draft: MainDraft) -> tuple[Ctx, Any]:
    if draft.stream is not None:
        raise fail(node, '"stream" directive is duplicate')
    draft.stream = state.stream = StreamDraft()
    return Ctx.STREAM, draft.stream


def _upstream(state: State, node: Node, draft: StreamDraft) -> tuple[Ctx, Any]:
    name = node.args[0]
    key = name.lower()
    if key in draft.upstreams:
        raise fail(node, f'duplicate upstream "{name}"')
    upstream = UpstreamDraft(name=name, source=node.source, close=node.close)
    draft.upstreams[key] = upstream
    return Ctx.STREAM_UPSTREAM, upstream


def _upstream_server(state: State, node: Node, draft: UpstreamDraft) -> None:
    """Stream peers need a port (nginx: ``no port in upstream "x"``)."""
    text = node.args[0]
    if not text.startswith("unix:"):
        try:
            target = split_host_port(text)
        except AddressError:
            target = None  # the shared parser words the error
        if target is not None and target.port is None:
            raise fail(node, f'no port in upstream "{text}"')
    d._upstream_server(state, node, draft)


def _check_hash(node: Node) -> None:
    d.template(node, node.args[0], is_stream_variable)
    if len(node.args) > 1 and node.args[1] != "consistent":
        raise fail(node, f'invalid parameter "{node.args[1]}"')


def _server(state: State, node: Node, draft: StreamDraft) -> tuple[Ctx, Any]:
    server = StreamServerDraft(source=node.source)
    draft.servers.append(server)
    return Ctx.STREAM_SERVER, server


def _listen(state: State, node: Node, draft: StreamServerDraft) -> None:
    params = list(node.args[1:])
    for param in params:
        if param in ("default_server", "default"):
            raise fail(node, f'invalid parameter "{param}"')
    udp = "udp" in params
    if udp:
        for param in params:
            name = param.split("=", 1)[0]
            if name in _NOT_WITH_UDP:
                raise fail(node, f'"{name}" parameter is incompatible with "udp"')
    accepts_header = "proxy_protocol" in params
    plain = Node(node.name, tuple(a for a in node.args if a not in ("proxy_protocol", "udp")), node.source)
    listens = parse_listen(plain)
    if udp:
        if any(listen.unix_path is not None for listen in listens):
            raise fail(node, 'the "udp" parameter of "listen" needs an address and port in scriptlb')
        listens = [dataclasses.replace(listen, udp=True) for listen in listens]
    draft.listens.extend(listens)
    if accepts_header:
        draft.proxy_protocol_listens.extend(listen.key for listen in listens)


def _proxy_pass(state: State, node: Node, draft: StreamServerDraft) -> None:
    if draft.proxy_pass is not None:
        raise fail(node, '"proxy_pass" directive is duplicate')
    draft.proxy_pass = (node.args[0], node.source)
    draft.content = "proxy_pass"


def _return(state: State, node: Node, draft: StreamServerDraft) -> None:
    """``return TEXT``: send the text (with variables) and close (ngx_stream_return_module)."""
    if draft.return_text is not None:
        raise fail(node, '"return" directive is duplicate')
    d.template(node, node.args[0], _known(state, node))
    draft.return_text = (node.args[0], node.source)
    draft.content = "return"


def _log_format(state: State, node: Node, draft: StreamDraft) -> None:
    d.add_log_format(node, draft.log_formats, _known(state, node))


def _access_log(state: State, node: Node, draft: Any) -> None:
    assert state.stream is not None
    d.add_access_log(state, node, draft, state.stream.log_formats, None, _known(state, node))


def _known(state: State, node: Node) -> Any:
    """Stream's variable names, or a ``map`` variable: as nginx resolves variables once the
    whole block is read, a name that is neither yet is checked at the block's end."""
    stream = state.stream

    def known(name: str) -> bool:
        if not is_stream_variable(name) and stream is not None and not _declared(stream, name):
            stream.deferred_names.append((name, node.source))
        return True

    return known


def _declared(stream: StreamDraft, name: str) -> bool:
    """A name the stream block defines itself: map, split_clients, set, named capture."""
    return name in stream.maps or name in stream.split_clients or name in stream.stored


def _new_variable(node: Node, stream: StreamDraft, target: str) -> str:
    """The name a ``map`` / ``split_clients`` defines: not a built-in one; a second definition
    replaces the first, as nginx's changeable variables."""
    if not target.startswith("$"):
        raise fail(node, f'invalid variable name "{target}"')
    name = target[1:].lower()
    if is_stream_variable(name):
        raise fail(node, f'the duplicate "{name}" variable')
    stream.maps.pop(name, None)
    stream.split_clients.pop(name, None)
    return name


def _set(state: State, node: Node, draft: StreamServerDraft) -> None:
    """``set $name value`` (ngx_stream_set_module): run before access checks and content."""
    assert state.stream is not None
    target, raw = node.args
    if not target.startswith("$"):
        raise fail(node, f'invalid variable name "{target}"')
    name = target[1:].lower()
    if is_stream_variable(name):
        raise fail(node, f'the duplicate "{name}" variable')
    state.stream.stored.add(name)
    draft.sets.append((name, d.template(node, raw, _known(state, node))))


def _split_clients(state: State, node: Node, draft: StreamDraft) -> None:
    """``split_clients SOURCE $var { 10% a; * b; }``: the parts' shares of the 32-bit hash."""
    source_text, target = node.args
    name = _new_variable(node, draft, target)
    source = d.template(node, source_text, _known(state, node))
    parts: list[tuple[int, str]] = []
    total = last = 0
    for line in node.children or ():
        if line.children is not None or len(line.args) != 1:
            raise fail(line, f'invalid percent value "{line.name}"')
        share = _percent(line)
        total = total + share if share else 10000
        if total > 10000:
            raise fail(line, "percent total is greater than 100%")
        bound = 0
        if share and total != 10000:
            last += share * 0xFFFFFFFF // 10000
            bound = last
        parts.append((bound, line.args[0]))
    draft.split_clients[name] = StreamSplitConf(name, source, tuple(parts))


def _percent(line: Node) -> int:
    """nginx's ``ngx_atofp(value, 2)`` of ``N[.NN]%`` in hundredths; 0 for ``*``."""
    text = line.name
    if text == "*":
        return 0
    whole, _, fraction = text[:-1].partition(".")
    if (not text.endswith("%") or not whole.isdigit() or len(fraction) > 2
            or (fraction and not fraction.isdigit())):
        raise fail(line, f'invalid percent value "{text}"')
    value = int(whole) * 100 + int(fraction.ljust(2, "0") or 0)
    if value == 0:
        raise fail(line, f'invalid percent value "{text}"')
    return value


def _map(state: State, node: Node, draft: StreamDraft) -> None:
    """``map SOURCE $var { key value; ... }``: read here, its lines are not directives."""
    source_text, target = node.args
    name = _new_variable(node, draft, target)
    known = _known(state, node)
    source = d.template(node, source_text, known)
    exact: dict[str, Any] = {}
    wildcards: list[tuple[str, Any]] = []
    regexes: list[tuple[str, bool, Any]] = []
    default = None
    hostnames = False
    for line in node.children or ():
        words = (line.name, *line.args)
        if line.children is not None:
            raise fail(line, "unexpected \"{\"")
        if words == ("hostnames",):
            hostnames = True
            continue
        if len(words) != 2:
            raise fail(line, "invalid number of the map parameters")
        key, raw = words
        value = d.template(line, raw, known)
        if key == "default":
            if default is not None:
                raise fail(line, 'duplicate default map parameter')
            default = value
        elif key.startswith("~"):
            caseless = key.startswith("~*")
            pattern = key[2:] if caseless else key[1:]
            d._check_regex(line, pattern, caseless)
            draft.stored.update(n.lower() for n in compile_nginx_regex(pattern).groupindex)
            regexes.append((pattern, caseless, value))
        elif hostnames and (key.startswith(("*.", ".")) or key.endswith(".*")):
            wildcards.append((key.lower(), value))
        else:
            key = key[1:] if key.startswith("\\") else key
            if key.lower() in exact:
                raise fail(line, f'duplicate entry "{key}"')
            exact[key.lower()] = value
    draft.maps[name] = StreamMapConf(name, source, tuple(exact.items()), tuple(wildcards), tuple(regexes),
                               default, hostnames)


def _size(node: Node) -> int:
    value = parse_size(node.args[0])
    if value is None:
        raise fail(node, f'"{node.name}" directive invalid value')
    return value


def _rate(state: State, node: Node, draft: Any) -> None:
    """``proxy_download_rate`` / ``proxy_upload_rate SIZE``: a size, or text with variables
    whose value is read as one per session (nginx's complex value size)."""
    if "$" in node.args[0]:
        d._store(node, draft.values, d.template(node, node.args[0], _known(state, node)))
    else:
        d._store(node, draft.values, _size(node))


def _worker_shutdown_timeout(state: State, node: Node, draft: MainDraft) -> None:
    d._store(node, draft.values, msec(node))


_SPECS = (
    d._spec("stream", Ctx.MAIN, d.NONE, _stream, block=True),
    d._spec("worker_shutdown_timeout", Ctx.MAIN, d.ONE, _worker_shutdown_timeout),
    d._spec("upstream", Ctx.STREAM, d.ONE, _upstream, block=True),
    d._spec("server", Ctx.STREAM, d.NONE, _server, block=True),
    d._spec("server", SU, (1, None), _upstream_server),
    d._spec("least_conn", SU, d.NONE, d._method(d._ALL_SERVER_PARAMS)),
    d._spec("hash", SU, (1, 2), d._method(d._NO_BACKUP, _check_hash)),
    d._spec("random", SU, (0, 2), d._method(d._NO_BACKUP, d._check_random)),
    d._spec("zone", SU, (1, 2), d._upstream_zone),
    d._spec("balancer_by_python_file", SU, d.ONE, d._hook_file),
    d._spec("balancer_by_python_block", SU, d.NONE, d._hook_block, block=True),
    d._spec("balancer_by_python_timeout", Ctx.STREAM | SU, d.ONE, d._hook_timeout),
    d._spec("listen", Ctx.STREAM_SERVER, (1, None), _listen),
    d._spec("proxy_pass", Ctx.STREAM_SERVER, d.ONE, _proxy_pass),
    d._spec("proxy_connect_timeout", SS, d.ONE, d._slot(msec)),
    d._spec("proxy_timeout", SS, d.ONE, d._slot(msec)),
    d._spec("proxy_next_upstream", SS, d.FLAG, d._slot(flag)),
    d._spec("proxy_next_upstream_tries", SS, d.ONE, d._slot(number)),
    d._spec("proxy_next_upstream_timeout", SS, d.ONE, d._slot(msec)),
    d._spec("proxy_buffer_size", SS, d.ONE, d._slot(_size)),
    d._spec("proxy_download_rate", SS, d.ONE, _rate),
    d._spec("proxy_upload_rate", SS, d.ONE, _rate),
    d._spec("proxy_half_close", SS, d.FLAG, d._slot(flag)),
    d._spec("proxy_protocol", SS, d.FLAG, d._slot(flag)),
    d._spec("proxy_requests", SS, d.ONE, d._slot(number)),
    d._spec("proxy_responses", SS, d.ONE, d._slot(number)),
    d._spec("log_format", Ctx.STREAM, (2, None), _log_format),
    d._spec("map", Ctx.STREAM, (2, 2), _map, block=True),
    d._spec("access_log", SS, (1, None), _access_log),
    d._spec("return", Ctx.STREAM_SERVER, d.ONE, _return),
    d._spec("set", Ctx.STREAM_SERVER, (2, 2), _set),
    d._spec("set_real_ip_from", SS, d.ONE, d._set_real_ip_from),
    d._spec("resolver", SS | SU, (1, None), d._resolver),
    d._spec("resolver_timeout", SS | SU, d.ONE, d._slot(msec)),
    d._spec("split_clients", Ctx.STREAM, (2, 2), _split_clients, block=True),
)

for _s in _SPECS:
    d.DIRECTIVES[_s.name] = (*d.DIRECTIVES.get(_s.name, ()), _s)


# --------------------------------------------------------------------------- building


def stream_conf(draft: StreamDraft, upstream_conf: Any, ssl_conf: Any, proxy_ssl_conf: Any) -> StreamConf:
    """The frozen stream block; ``upstream_conf(UpstreamDraft, values_owner)``,
    ``ssl_conf(server, chain)`` and ``proxy_ssl_conf(chain, source)`` are http's builders (the
    same UpstreamConf, SslConf and ProxySslConf)."""
    for name, source in draft.deferred_names:
        if not _declared(draft, name):
            raise ConfigError(f'unknown "{name}" variable', source)
    upstreams: dict[str, UpstreamConf] = {
        key: upstream_conf(u, draft) for key, u in draft.upstreams.items()
    }
    servers = tuple(_server_conf(s, draft, upstreams, ssl_conf, proxy_ssl_conf) for s in draft.servers)
    _check_listens(servers)
    return StreamConf(upstreams=upstreams, servers=servers, log_formats=dict(draft.log_formats),
                      maps=dict(draft.maps), limit_zones=dict(draft.limit_zones),
                      split_clients=dict(draft.split_clients),
                      stored=frozenset(draft.stored), access_logs=tuple(draft.access_logs or ()))


def _server_conf(server: StreamServerDraft, stream: StreamDraft,
                 upstreams: dict[str, UpstreamConf], ssl_conf: Any, proxy_ssl_conf: Any) -> StreamServerConf:
    values = {**stream.values, **server.values}
    proxy = StreamProxyConf(**{
        field: values[name] for name, field in _PROXY_FIELDS.items() if name in values
    }, ssl=proxy_ssl_conf((server, stream), server.source) if values.get("proxy_ssl") else None)
    proxy_pass = None
    if server.proxy_pass is not None:
        proxy_pass = _resolve_proxy_pass(*server.proxy_pass, upstreams, stream)
    return_text = None
    if server.content == "return" and server.return_text is not None:
        return_text = _template(*server.return_text, stream)
        proxy_pass = None
    logs = server.access_logs if server.access_logs is not None else stream.access_logs
    listens = tuple(server.listens)
    if not listens:
        raise ConfigError('no "listen" is defined for server', server.source)
    return StreamServerConf(listens=listens, proxy_pass=proxy_pass, proxy=proxy,
                            access_logs=d.with_file_cache(logs or (), values.get("open_log_file_cache")),
                            source=server.source,
                            ssl_preread=bool(values.get("ssl_preread", False)),
                            proxy_protocol_listens=tuple(server.proxy_protocol_listens),
                            ssl=ssl_conf(server, (server, stream)),
                            access=tuple(values.get("access_rules", ())),
                            limits=_limits_conf(values, stream.limit_zones),
                            tcp_nodelay=values.get("tcp_nodelay", True),
                            proxy_bind=_proxy_bind_value(values),
                            error_log=tuple(values.get("error_log", ())),
                            return_text=return_text, sets=tuple(server.sets), realip=_realip(values),
                            resolver=_resolver(values),
                            ssl_handshake_timeout=values.get("ssl_handshake_timeout", 60.0))


def _resolver(values: dict[str, Any]) -> ResolverConf | None:
    """The server's ``resolver`` (else the block's), for ``proxy_pass $var`` names."""
    resolver = values.get("resolver")
    if resolver is None:
        return None
    conf: ResolverConf = dataclasses.replace(resolver, timeout=values.get("resolver_timeout", 30.0))
    return conf


def _realip(values: dict[str, Any]) -> RealIpConf | None:
    """ngx_stream_realip_module: a trusted peer's PROXY header gives the client address (the
    server's own list replaces the block's)."""
    trusted = values.get("set_real_ip_from")
    return RealIpConf(tuple(trusted), "proxy_protocol") if trusted else None


def _template(text: str, source: Source, stream: StreamDraft) -> Any:
    """A stream template, its names checked once every ``map`` of the block is known."""
    try:
        return compile_template(text, lambda name: is_stream_variable(name) or _declared(stream, name))
    except ValueError as err:
        raise ConfigError(str(err), source) from None


def _resolve_proxy_pass(text: str, source: Source, upstreams: dict[str, UpstreamConf],
                        stream: StreamDraft) -> StreamProxyPass:
    if "$" in text:
        return StreamProxyPass(None, _template(text, source, stream), source)
    key = text.lower()
    if key in upstreams:
        return StreamProxyPass(key, None, source)
    addrs = implicit_addresses(text, source)
    upstreams[key] = UpstreamConf(
        name=text, servers=(UpstreamServerConf(text, addrs, source=source),), implicit=True, source=source
    )
    return StreamProxyPass(key, None, source)


def implicit_addresses(text: str, source: Source | None) -> tuple[PeerAddr, ...]:
    """``proxy_pass ADDR``: a literal address with a port (nginx resolves names at load time)."""
    from scriptlb.config.addresses import resolve

    try:
        target = split_host_port(text)
    except AddressError as err:
        raise ConfigError(f'{err.kind} in upstream "{text}"', source) from None
    if target.unix_path is not None:
        return (PeerAddr(None, 0, target.unix_path),)
    if target.port is None:
        raise ConfigError(f'no port in upstream "{text}"', source)
    addrs = resolve(target.host, target.port)
    if not addrs:
        raise ConfigError(f'host not found in upstream "{text}"', source)
    return addrs


def _check_listens(servers: Sequence[StreamServerConf]) -> None:
    seen: dict[ListenKey, ListenConf] = {}
    for server in servers:
        for listen in server.listens:
            if listen.key in seen:
                raise ConfigError(f'duplicate "{d.listen_name(listen)}" address and port pair',
                                  listen.source)
            seen[listen.key] = listen


def _ssl_preread(state: State, node: Node, draft: Any) -> None:
    d._store(node, draft.values, flag(node))


d.DIRECTIVES["ssl_preread"] = (d._spec("ssl_preread", SS, d.FLAG, _ssl_preread),)

# TLS termination: http's certificate directives, with the same handlers and checks
_SSL_DIRECTIVES = (
    "ssl_certificate", "ssl_certificate_key", "ssl_protocols", "ssl_ciphers", "ssl_prefer_server_ciphers",
    "ssl_ecdh_curve", "ssl_session_cache", "ssl_session_timeout", "ssl_session_tickets",
    "ssl_session_ticket_key", "ssl_client_certificate", "ssl_trusted_certificate",
    "ssl_verify_client", "ssl_verify_depth",
    "ssl_dhparam", "ssl_password_file",
)
# TLS to the peers (ngx_stream_proxy_module's proxy_ssl_*): http's handlers and checks, but
# proxy_ssl_name takes stream's variables
_PROXY_SSL_DIRECTIVES = (
    "proxy_ssl_server_name", "proxy_ssl_verify", "proxy_ssl_trusted_certificate", "proxy_ssl_verify_depth",
    "proxy_ssl_protocols", "proxy_ssl_ciphers", "proxy_ssl_certificate", "proxy_ssl_certificate_key",
    "proxy_ssl_session_reuse", "proxy_ssl_password_file", "proxy_ssl_conf_command", "proxy_ssl_crl",
)
for _name in (*_SSL_DIRECTIVES, *_PROXY_SSL_DIRECTIVES):
    _http = next(s for s in d.DIRECTIVES[_name] if s.contexts & Ctx.SERVER)
    d.DIRECTIVES[_name] = (*d.DIRECTIVES[_name],
                           d._spec(_name, SS, (_http.min_args, _http.max_args), _http.handler))


def _proxy_ssl_name(state: State, node: Node, draft: Any) -> None:
    d._store(node, draft.values, d.template(node, node.args[0], _known(state, node)))


def _proxy_ssl_file(state: State, node: Node, draft: Any) -> None:
    d.proxy_ssl_file(state, node, draft, _known(state, node))


for _name in ("proxy_ssl_certificate", "proxy_ssl_certificate_key"):
    d.DIRECTIVES[_name] = (*(s for s in d.DIRECTIVES[_name] if not s.contexts & SS),
                           d._spec(_name, SS, d.ONE, _proxy_ssl_file))


d.DIRECTIVES["proxy_ssl"] = (d._spec("proxy_ssl", SS, d.FLAG, d._slot(flag)),)
d.DIRECTIVES["ssl_handshake_timeout"] = (d._spec("ssl_handshake_timeout", SS, d.ONE, d._slot(msec)),)
d.DIRECTIVES["proxy_ssl_name"] = (*d.DIRECTIVES["proxy_ssl_name"],
                                  d._spec("proxy_ssl_name", SS, d.ONE, _proxy_ssl_name))


# --------------------------------------------------------------------------- access, limit_conn,
# tcp_nodelay, proxy_bind: http's handlers over stream's variable names


def _limit_conn_zone(state: State, node: Node, draft: StreamDraft) -> None:
    d._limit_zone(state, node, draft, _known(state, node))  # type: ignore[arg-type]  # (a StreamDraft has limit_zones too)


def _stream_proxy_bind(state: State, node: Node, draft: Any) -> None:
    d._proxy_bind(state, node, draft, _known(state, node))


def _limits_conf(values: dict[str, Any], zones: dict[str, Any]) -> LimitsConf | None:
    """A server's limit_conn lines (the innermost level's), each naming a limit_conn_zone."""
    conns = values.get("limit_conn", ())
    if not conns:
        return None
    for limit in conns:
        if limit.zone not in zones:
            raise ConfigError(f'zero size shared memory zone "{limit.zone}"', limit.source)
    return LimitsConf(conns=tuple(conns), conn_log_level=values.get("limit_conn_log_level", "error"),
                      conn_dry_run=values.get("limit_conn_dry_run", False))


def _proxy_bind_value(values: dict[str, Any]) -> Any:
    bind = values.get("proxy_bind")
    return None if bind is None or bind == d.OFF else bind


def _geo(state: State, node: Node, draft: StreamDraft) -> None:
    """``geo [ADDRESS] $variable { ... }`` (ngx_stream_geo_module: no ``proxy`` lines)."""
    from scriptlb.config.geo import parse_geo

    conf = parse_geo(node, _known(state, node), http=False, warn=state.warn)
    if is_stream_variable(conf.variable):
        raise fail(node, f'the duplicate "{conf.variable}" variable')
    draft.maps[conf.variable] = conf


_MORE_SPECS = (
    d._spec("allow", SS, d.ONE, d._access_rule),
    d._spec("deny", SS, d.ONE, d._access_rule),
    d._spec("limit_conn_zone", Ctx.STREAM, (2, 2), _limit_conn_zone),
    d._spec("limit_conn", SS, (2, 2), d._limit_conn),
    d._spec("limit_conn_log_level", SS, d.ONE, d._limit_log_level),
    d._spec("limit_conn_dry_run", SS, d.FLAG, d._slot(flag)),
    d._spec("tcp_nodelay", SS, d.FLAG, d._slot(flag)),
    d._spec("proxy_bind", SS, (1, 2), _stream_proxy_bind),
    d._spec("error_log", SS, (1, 2), d._error_log),
    d._spec("geo", Ctx.STREAM, (1, 2), _geo, block=True),
)


for _s in _MORE_SPECS:
    d.DIRECTIVES[_s.name] = (*d.DIRECTIVES.get(_s.name, ()), _s)
