"""Per-worker objects of the ``stream`` block: upstreams, servers by listen key, access logs.

Upstreams are http's ``UpstreamRuntime`` (peers, balancer, hook, statistics): one balancing
and hook implementation for both. Only the hash key differs: it is evaluated over a session's
variables. Statistics records of stream upstreams are named ``stream:NAME`` so an http and a
stream upstream of the same name keep apart.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeAlias

if TYPE_CHECKING:
    import ssl

from scriptlb.config.addresses import AddressError, split_host_port
from scriptlb.config.model import (
    GeoConf,
    ListenKey,
    MainConf,
    PeerAddr,
    ProxySslConf,
    PythonConf,
    ResolverConf,
    StreamServerConf,
    Template,
    UpstreamConf,
    UpstreamServerConf,
)
from scriptlb.config.units import parse_size
from scriptlb.logs import errorlog
from scriptlb.request.access import rules_check
from scriptlb.request.accesslog import AccessLog, LogFile, open_access_log
from scriptlb.request.dynamic_pass import NameResolver, ResolveFailed
from scriptlb.request.realip import RealIp
from scriptlb.request.runtime import UpstreamRuntime
from scriptlb.state.stats import Recorder, UpstreamStats
from scriptlb.stream import variables
from scriptlb.stream.maps import map_getter, split_getter
from scriptlb.stream.session import Session
from scriptlb.variables.evaluate import compile_template, compile_template_bytes
from scriptlb.variables.geo import GeoVariable

# where a session goes: an upstream, a name lookup under way, or nowhere (status set)
Routed: TypeAlias = "UpstreamRuntime | asyncio.Future[UpstreamRuntime | None] | None"

STATS_PREFIX = "stream:"
_MAX_DYNAMIC = 256  # `proxy_pass $var` addresses kept per worker (values come from clients)


def stats_name(upstream: str) -> str:
    return STATS_PREFIX + upstream


class StreamRuntime:
    """The stream block in one worker."""

    def __init__(self, conf: MainConf, loop: asyncio.AbstractEventLoop,
                 recorder: Recorder | None = None) -> None:
        assert conf.stream is not None
        self.conf = conf.stream
        self.prefix = conf.prefix  # (where ssl_session_cache shared: zones are)
        self.loop = loop
        self.recorder = recorder
        self.python = conf.http.python if conf.http is not None else PythonConf()
        self._maps: dict[str, Any] = {}
        for name in (*self.conf.maps, *self.conf.split_clients):
            self.lookup(name)
        self.upstreams: dict[str, UpstreamRuntime] = {
            key: self._upstream(u) for key, u in self.conf.upstreams.items()
        }
        self._dynamic: dict[str, UpstreamRuntime] = {}
        self._client_contexts: dict[ProxySslConf, ssl.SSLContext] = {}
        self._resolvers: dict[ResolverConf, NameResolver] = {}
        self._getters: dict[str, variables.Getter] = {}
        self._files: dict[str, LogFile] = {}
        self._limit_zones: dict[str, Any] | None = None
        self.conn_ids = itertools.count(1)
        self._datagram_listeners: list[Any] = []  # scriptlb.stream.udp.UdpListener
        self.datagram_sessions = 0  # live UDP sessions in this worker
        self.max_datagram_sessions = conf.worker_connections
        self.servers: dict[ListenKey, StreamServerRuntime] = {}
        for log in self.conf.access_logs:  # (files nginx creates even when no server writes them)
            if log.path_template is None:
                self.open_log(log)
        for server in self.conf.servers:
            runtime = StreamServerRuntime(server, self)
            for listen in server.listens:
                self.servers[listen.key] = runtime

    def _upstream(self, conf: UpstreamConf) -> UpstreamRuntime:
        upstream = UpstreamRuntime(conf, self.loop, self.python, None)
        kind = getattr(upstream.balancer, "key_kind", None)
        if kind == "template":
            upstream.key_getter = self.template(conf.method.args[0])
        if self.recorder is not None and not conf.implicit:
            upstream.stats = UpstreamStats(self.recorder, stats_name(conf.name))
            upstream.stats.assign_indexes(upstream.peers.primary, upstream.peers.backup)
        return upstream

    def template(self, raw: str) -> Any:
        from scriptlb.config.templates import compile_template as split

        return self._compile(split(raw, lambda name: True))  # (checked at load time)

    def _compile(self, template: Any) -> Any:
        return compile_template(template, lookup=self.lookup)

    def template_bytes(self, template: Any) -> Callable[[Any], bytes]:
        """A template rendered to the bytes a session sends (``return``)."""
        return compile_template_bytes(template, lookup=self.lookup)

    def lookup(self, name: str, clock: Any = time.time) -> Any:
        """A stream variable's getter: a ``map``'s or ``split_clients``', else the session's
        own (built-in, ``set``, a capture)."""
        getter = self._maps.get(name)
        if getter is not None:
            return getter
        map_conf = self.conf.maps.get(name)
        split_conf = self.conf.split_clients.get(name)
        if map_conf is None and split_conf is None:
            return variables.variable_getter(name, clock, self.conf.stored)
        # built on first use: a map may name a map defined after it (a cycle reads "")
        self._maps[name] = _empty
        if isinstance(map_conf, GeoConf):
            getter = self._maps[name] = GeoVariable(map_conf, self._compile)
        elif map_conf is not None:
            getter = self._maps[name] = map_getter(map_conf, self._compile)
        else:
            assert split_conf is not None
            getter = self._maps[name] = split_getter(split_conf, self._compile)
        return getter

    def peer_tls(self, conf: ProxySslConf) -> tuple[Any, Callable[[Session], str] | None]:
        """A server's TLS to its peers: (PeerTls, proxy_ssl_name's getter or None). Servers with
        the same settings share one client context (built once per worker)."""
        from scriptlb.http.tls import PeerTls, certificate_pair, client_context  # (only TLS configs)

        context = self._client_contexts.get(conf)
        if context is None:
            context = self._client_contexts[conf] = client_context(conf)
        name = self._compile(conf.name) if conf.name is not None else None
        pair = certificate_pair(conf, self._compile, self.prefix)
        return PeerTls(context, lambda session: "", conf.server_name, conf.session_reuse, conf, pair), name

    def limit_zones(self) -> dict[str, Any]:
        """limit_conn_zone: one scriptlb.request.limits.LimitZone per zone and worker."""
        if self._limit_zones is None:
            from scriptlb.request.limits import LimitZone, stream_zone_directory
            from scriptlb.state.shared_dict import zone_directory

            directory = stream_zone_directory(zone_directory(self.prefix))
            self._limit_zones = {name: LimitZone(zone, directory)
                                 for name, zone in self.conf.limit_zones.items()}
        return self._limit_zones

    def open_log(self, conf: Any) -> AccessLog:
        return open_access_log(conf, self.loop, self._files, lookup=self.lookup)

    def variable(self, session: Session, name: str) -> str | None:
        """``ngx.var.NAME`` in a stream hook: a session variable, None when stream has none."""
        getter = self._getters.get(name)
        if getter is None:
            try:
                getter = self.lookup(name.lower())
            except KeyError:
                return None
            if len(self._getters) < 256:
                self._getters[name] = getter
        return getter(session)

    def dynamic_upstream(self, value: str, session: Session,
                         resolver: NameResolver | None) -> Routed:
        """``proxy_pass $var``'s value, as nginx's ngx_stream_proxy_handler: an upstream's
        name, else an address, else a name looked up with the server's ``resolver`` (a
        future then). A value that names nothing usable is logged, and the session ends 500."""
        upstream = self.upstreams.get(value.lower())
        if upstream is not None:
            return upstream
        try:
            target = split_host_port(value)
        except AddressError as err:
            _refused(session, f'{err.kind} in upstream "{value}"')
            return None
        if target.unix_path is None and target.port is None:
            _refused(session, f'no port in upstream "{target.host}"')
            return None
        if target.unix_path is not None:
            return self._address(value, PeerAddr(None, 0, target.unix_path))
        assert target.port is not None
        if _is_ip(target.host):
            return self._address(value, PeerAddr(target.host, target.port))
        if resolver is None:
            _refused(session, f"no resolver defined to resolve {target.host}")
            return None
        name = target.host.lower().rstrip(".")
        cached = resolver.cached(name)
        if cached is not None:
            # nginx's resolver hands a cached answer out from a random address on
            # (ngx_resolver_export with rotate), a fresh one in the answer's order
            start = random.randrange(len(cached))
            return self._resolved(target.host, cached[start:] + cached[:start], target.port)
        return asyncio.ensure_future(self._lookup(resolver, name, target.host, target.port, session))

    async def _lookup(self, resolver: NameResolver, name: str, host: str, port: int,
                      session: Session) -> UpstreamRuntime | None:
        try:
            addresses = await resolver.resolve(name)
        except ResolveFailed as err:
            _refused(session, f"{host} could not be resolved {err}")
            return None
        return self._resolved(host, addresses, port)

    def _resolved(self, host: str, addresses: tuple[str, ...], port: int) -> UpstreamRuntime:
        """The name's addresses in the answer's order, made afresh for each session as
        nginx's ngx_stream_upstream_create_round_robin_peer (one try per address)."""
        servers = tuple(UpstreamServerConf(f"{ip}:{port}" if ":" not in ip else f"[{ip}]:{port}",
                                           (PeerAddr(ip, port),), max_fails=0) for ip in addresses)
        conf = UpstreamConf(name=f"{host}:{port}", servers=servers, implicit=True)
        return UpstreamRuntime(conf, self.loop, self.python, None)

    def _address(self, value: str, addr: PeerAddr) -> UpstreamRuntime:
        upstream = self._dynamic.get(value)
        if upstream is not None:
            return upstream
        conf = UpstreamConf(name=value, servers=(UpstreamServerConf(value, (addr,)),), implicit=True)
        upstream = UpstreamRuntime(conf, self.loop, self.python, None)
        if len(self._dynamic) >= _MAX_DYNAMIC:
            self._dynamic.pop(next(iter(self._dynamic)))
        self._dynamic[value] = upstream
        return upstream

    def name_resolver(self, conf: ResolverConf | None) -> NameResolver | None:
        """One lookup cache per distinct ``resolver`` configuration in this worker."""
        if conf is None:
            return None
        resolver = self._resolvers.get(conf)
        if resolver is None:
            resolver = self._resolvers[conf] = NameResolver(conf)
        return resolver

    def session_factory(self, keys: list[ListenKey]) -> Callable[[], asyncio.Protocol] | None:
        """The protocol factory of a listening socket serving ``keys`` (None: not stream's).
        Several keys share a wildcard socket: then each connection's local address picks the
        server, as nginx does."""
        served = [key for key in keys if key in self.servers]
        if not served:
            return None
        if len(served) == 1:
            return self.servers[served[0]].session_factory(served[0])
        factories = {key: self.servers[key].session_factory(key) for key in served}
        return lambda: _Dispatch(factories)

    def listen_datagrams(self, sock: socket.socket, keys: list[ListenKey]) -> None:
        """Read a ``listen ... udp`` socket in this worker (one key: UDP sockets are not shared
        by a wildcard and specific addresses)."""
        from scriptlb.stream.udp import UdpListener  # (configs with udp listens only)

        server = next((self.servers[key] for key in keys if key in self.servers), None)
        if server is not None:
            self._datagram_listeners.append(UdpListener(server, sock))

    def stop_datagrams(self) -> None:
        listeners, self._datagram_listeners = self._datagram_listeners, []
        for listener in listeners:
            listener.close()

    def ssl_context(self, keys: list[ListenKey]) -> tuple[ssl.SSLContext, float] | None:
        """The TLS context of a socket whose listen has ``ssl`` and its server's
        ssl_handshake_timeout (None: plain TCP)."""
        for key in keys:
            server = self.servers.get(key)
            if server is None or server.conf.ssl is None:
                continue
            if any(listen.key == key and listen.ssl for listen in server.conf.listens):
                context = server.tls_context()
                assert context is not None  # (a server with an SslConf has a context)
                return context, server.conf.ssl_handshake_timeout
        return None

    def sessions(self) -> list[Session]:
        seen = {id(s): s for s in self.servers.values()}
        return [session for server in seen.values() for session in server.sessions]

    def reopen_logs(self) -> None:
        for file in self._files.values():
            file.reopen()
        for server in self._servers():
            if server.error_log is not None:
                server.error_log.reopen()

    def close(self) -> None:
        self.stop_datagrams()
        for file in self._files.values():
            file.flush()
            file.close()
        for server in self._servers():
            if server.error_log is not None:
                server.error_log.close()

    def _servers(self) -> list[StreamServerRuntime]:
        return list({id(s): s for s in self.servers.values()}.values())


class StreamServerRuntime:
    """One stream ``server`` block in a worker: where its sessions go and what logs them."""

    def __init__(self, conf: StreamServerConf, runtime: StreamRuntime) -> None:
        self.conf = conf
        self.runtime = runtime
        self.loop = runtime.loop
        self.sessions: set[Session] = set()
        self._tls: ssl.SSLContext | None = None  # the server's TLS context, built on first use
        self.access_logs = [runtime.open_log(log) for log in conf.access_logs]
        self.upload_rate = self._rate(conf.proxy.upload_rate)
        self.download_rate = self._rate(conf.proxy.download_rate)
        self.error_log = errorlog.ErrorLog(conf.error_log) if conf.error_log else None
        # nginx's preaccess (limit_conn) and access (allow/deny) phases; None: nothing to do
        self.limits: Any = None
        if conf.limits is not None:
            from scriptlb.request.limits import LimitPhase

            self.limits = LimitPhase(conf.limits, runtime.limit_zones(), runtime._compile)
        self.access: Callable[[Any], bool] | None = rules_check(conf.access) if conf.access else None
        self.proxy_bind: Callable[[Any], str] | None = (
            runtime._compile(conf.proxy_bind) if conf.proxy_bind is not None else None)
        proxy_pass = conf.proxy_pass
        self._upstream = None
        self._route = None
        # `return`: the text a session gets instead of a proxied connection
        self.returns = runtime.template_bytes(conf.return_text) if conf.return_text is not None else None
        # `set`: (name, value) in order, run before the content phase
        self.sets = tuple((name, runtime._compile(value)) for name, value in conf.sets)
        self.realip = RealIp(conf.realip) if conf.realip is not None else None
        self.resolver = runtime.name_resolver(conf.resolver)
        if proxy_pass is not None:
            if proxy_pass.template is not None:
                self._route = runtime.template(proxy_pass.template.raw)
            elif proxy_pass.upstream is not None:
                self._upstream = runtime.upstreams[proxy_pass.upstream]
        self.peer_tls: Any = None  # proxy_ssl on: a scriptlb.http.tls.PeerTls
        self._tls_name: Callable[[Session], str] | None = None
        if conf.proxy.ssl is not None and proxy_pass is not None:
            self.peer_tls, self._tls_name = runtime.peer_tls(conf.proxy.ssl)

    def peer_tls_name(self, session: Session) -> str:
        """The name a session's TLS to its peer is for (proxy_ssl_name, else the host of
        proxy_pass: the upstream's name, the address, the variable's value), without a port,
        as nginx's ngx_stream_proxy_ssl_name."""
        if self._tls_name is not None:
            name = self._tls_name(session)
        elif self._upstream is not None:
            name = self._upstream.conf.name
        else:
            name = session.proxy_target
        from scriptlb.http.tls import name_without_port  # (only configs with TLS load ssl)

        return name_without_port(name)

    def _rate(self, value: int | Template) -> Callable[[Any], int]:
        """A session's rate: the configured size, or its template's value read as a size (0,
        unlimited, when it is not one, as nginx)."""
        if isinstance(value, int):
            return lambda session: value
        render = self.runtime._compile(value)

        def rate(session: Any) -> int:
            return parse_size(render(session) or "") or 0

        return rate

    def tls_context(self) -> ssl.SSLContext | None:
        if self._tls is None and self.conf.ssl is not None:
            from scriptlb.http.tls import server_context, sni_context  # (only configs with TLS load ssl)
            from scriptlb.http.tls_sessions import sessions_directory

            context = server_context(self.conf.ssl, sessions_directory(self.runtime.prefix))
            # one server per stream listen: the callback only keeps the name ($ssl_server_name)
            self._tls = sni_context(context, lambda name: context)
        return self._tls

    def session_factory(self, key: ListenKey) -> Callable[[], Session]:
        """What a listening socket of ``key`` makes of each accepted connection."""
        reads_header = key in self.conf.proxy_protocol_listens

        def new_session() -> Session:
            return Session(self, next(self.runtime.conn_ids), reads_header)

        return new_session

    def upstream_for(self, session: Session) -> Routed:
        """Where the session goes: an upstream, a lookup under way, or None (logged, with the
        session's status set)."""
        if self._upstream is not None:
            return self._upstream
        if self._route is None:
            _refused(session, "no upstream configuration")
            return None
        value = session.proxy_target = self._route(session)
        return self.runtime.dynamic_upstream(value, session, self.resolver)

    def log_session(self, session: Session) -> None:
        for log in self.access_logs:
            log.write(session)


class _Dispatch(asyncio.Protocol):
    """Picks a connection's server by its local address, then hands the transport over."""

    def __init__(self, factories: dict[ListenKey, Callable[[], Session]]) -> None:
        self.factories = factories

    def connection_made(self, transport: Any) -> None:
        local = transport.get_extra_info("sockname")
        factory = None
        if isinstance(local, tuple):
            factory = self.factories.get((local[0], local[1], None))
            if factory is None:
                wildcard = "::" if ":" in local[0] else "0.0.0.0"
                factory = self.factories.get((wildcard, local[1], None))
        if factory is None:
            factory = next(iter(self.factories.values()))
        session = factory()
        transport.set_protocol(session)
        session.connection_made(transport)


def _refused(session: Session, text: str) -> None:
    """A session nginx ends 500 before any try: the reason at error level."""
    errorlog.log_error("error", text, session.conn_id, session.log_context(None, proxying=True))
    session.status = 500


def _empty(session: Any) -> str:
    return ""


def _is_ip(host: str | None) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(host or "")
    except ValueError:
        return False
    return True
