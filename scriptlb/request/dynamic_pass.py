"""``proxy_pass`` with variables: the URL evaluated per request, with nginx's semantics.

Theory of operation
-------------------
``proxy_pass http://$backend;`` or ``proxy_pass $scheme://$host$uri;`` is evaluated when a
request reaches the location. The URL's host then names, in this order (nginx's
ngx_http_upstream_init_request):

1. an ``upstream`` block, when the URL has no port (or an upstream made implicitly by another
   ``proxy_pass`` with the same host and port);
2. an address: an IP literal or ``unix:`` path, proxied to directly;
3. a name, looked up with the location's ``resolver`` (``NameResolver``: A and AAAA records,
   cached for their TTL or ``valid=``, a lookup in flight shared by the requests that wait
   for it). Without a resolver: "no resolver defined to resolve NAME" and 502; a failed
   lookup: "NAME could not be resolved (N: reason)" and 502, as nginx.

A URL with a URI part sends that URI, as evaluated (the client's arguments are not added:
nginx's rule for proxy_pass with variables); without one, the client's URI goes as it came.

Addresses and names become one-off upstreams (round robin over the addresses), kept per
worker in a bounded table so a repeated target reuses its peers' failure accounting.
Locations without variables in proxy_pass never reach this module.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype

from scriptlb.config.addresses import AddressError, parse_proxy_url, proxy_host_port
from scriptlb.config.model import PeerAddr, ResolverConf, UpstreamConf, UpstreamServerConf
from scriptlb.logs import errorlog

if TYPE_CHECKING:
    from collections.abc import Callable

    from scriptlb.request.runtime import UpstreamRuntime

MAX_ADHOC_UPSTREAMS = 256  # one-off upstreams a worker keeps (oldest dropped first)
MAX_CACHED_NAMES = 4096  # resolved names a worker keeps
RESEND = 5.0  # nginx's resolver resends an unanswered query (to the next server) after 5s
MAX_CNAME_HOPS = 8

# nginx's texts for resolver failures (ngx_resolver_strerror)
_RCODE_TEXT = {
    dns.rcode.FORMERR: (1, "Format error"),
    dns.rcode.SERVFAIL: (2, "Server failure"),
    dns.rcode.NXDOMAIN: (3, "Host not found"),
    dns.rcode.NOTIMP: (4, "Unimplemented"),
    dns.rcode.REFUSED: (5, "Operation refused"),
}
_TIMED_OUT = (110, "Operation timed out")


class ResolveFailed(Exception):
    """A lookup without addresses: ``code`` and ``text`` as nginx logs them."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(f"({code}: {text})")
        self.code = code
        self.text = text


class NameResolver:
    """Request-time lookups through one ``resolver`` configuration, cached in this worker."""

    def __init__(self, conf: ResolverConf) -> None:
        self.conf = conf
        self._cache: OrderedDict[str, tuple[tuple[str, ...], float]] = OrderedDict()
        self._pending: dict[str, asyncio.Future[tuple[str, ...]]] = {}
        self._next_server = 0

    def cached(self, name: str) -> tuple[str, ...] | None:
        entry = self._cache.get(name)
        if entry is None:
            return None
        if entry[1] <= time.monotonic():
            del self._cache[name]
            return None
        return entry[0]

    async def resolve(self, name: str) -> tuple[str, ...]:
        """The addresses of ``name`` (lower-case); raises ResolveFailed."""
        found = self.cached(name)
        if found is not None:
            return found
        pending = self._pending.get(name)
        if pending is None:
            pending = self._pending[name] = asyncio.ensure_future(self._lookup(name))
            pending.add_done_callback(lambda _f: self._pending.pop(name, None))
        # shield: a request that goes away does not cancel the others' lookup
        return await asyncio.shield(pending)

    async def _lookup(self, name: str) -> tuple[str, ...]:
        deadline = time.monotonic() + self.conf.timeout
        server = self._next_server  # nginx sends a name's questions to one server (then the next)
        self._next_server += 1
        target = dns.name.from_text(name)
        min_ttl = float("inf")
        for _ in range(MAX_CNAME_HOPS):
            addresses, ttl, cname = await self._ask_all(target, server, deadline)
            min_ttl = min(min_ttl, ttl)
            if addresses:
                result = tuple(addresses)
                valid = self.conf.valid if self.conf.valid is not None else min_ttl
                if valid and valid != float("inf"):  # (a TTL of 0: not cached)
                    self._cache[name] = (result, time.monotonic() + valid)
                    while len(self._cache) > MAX_CACHED_NAMES:
                        self._cache.popitem(last=False)
                return result
            if cname is None:
                raise ResolveFailed(*_RCODE_TEXT[dns.rcode.NXDOMAIN])
            target = cname  # only a CNAME: its target is asked for both types
        raise ResolveFailed(*_RCODE_TEXT[dns.rcode.SERVFAIL])

    async def _ask_all(self, name: dns.name.Name, server: int,
                       deadline: float) -> tuple[list[str], float, dns.name.Name | None]:
        """A and AAAA (as configured) at once, combined as nginx does: any error fails the
        lookup; the addresses of both types; a bare CNAME is followed only when it is the
        answer nginx processes last (AAAA's, or A's without ipv6) and no address came."""
        conf = self.conf
        kinds = [t for t, on in ((dns.rdatatype.A, conf.ipv4), (dns.rdatatype.AAAA, conf.ipv6)) if on]
        answers = await asyncio.gather(*(self._ask(name, kind, server, deadline) for kind in kinds),
                                       return_exceptions=True)
        for answer in answers:
            if isinstance(answer, BaseException):
                raise answer
        addresses: list[str] = []
        min_ttl = float("inf")
        # (gather's results are typed with the exceptions it may return; they were raised above)
        for _canonical, ttl, found in answers:  # type: ignore[misc]
            if found:
                addresses.extend(found)
                min_ttl = min(min_ttl, ttl)
        canonical, ttl, found = answers[-1]  # type: ignore[misc]  # (idem)
        if addresses or canonical == name:
            return addresses, min_ttl, None
        return [], ttl, canonical

    async def _ask(self, name: dns.name.Name, kind: dns.rdatatype.RdataType, server: int,
                   deadline: float) -> tuple[dns.name.Name, float, list[str]]:
        reply = await self._query(name, kind, server, deadline)
        rcode = reply.rcode()
        if rcode != dns.rcode.NOERROR:
            raise ResolveFailed(*_RCODE_TEXT.get(rcode, (rcode, "Unknown error")))
        return _follow(reply, name, kind)

    async def _query(self, name: dns.name.Name, kind: dns.rdatatype.RdataType, server: int,
                     deadline: float) -> dns.message.Message:
        """One question, resent to the next name server every RESEND seconds until the
        deadline (UDP; TCP when the answer comes truncated)."""
        request = dns.message.make_query(name, kind)
        request.flags |= dns.flags.RD
        servers = self.conf.addresses
        last_error: ResolveFailed = ResolveFailed(*_TIMED_OUT)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise last_error
            host, port = servers[server % len(servers)]
            server += 1
            try:
                reply = await dns.asyncquery.udp(request, host, port=port, timeout=min(RESEND, left),
                                                 ignore_unexpected=True, ignore_errors=True,
                                                 one_rr_per_rrset=True, ignore_trailing=True)
                if reply.flags & dns.flags.TC:
                    left = deadline - time.monotonic()
                    reply = await dns.asyncquery.tcp(request, host, port=port, timeout=max(left, 0.001),
                                                     one_rr_per_rrset=True)
            except dns.exception.Timeout:
                last_error = ResolveFailed(*_TIMED_OUT)
                continue
            except (dns.exception.DNSException, OSError, ValueError):
                last_error = ResolveFailed(*_RCODE_TEXT[dns.rcode.FORMERR])
                await asyncio.sleep(min(0.05, max(deadline - time.monotonic(), 0)))
                continue
            return reply


def _follow(reply: dns.message.Message, name: dns.name.Name,
            kind: dns.rdatatype.RdataType) -> tuple[dns.name.Name, float, list[str]]:
    """The answer's CNAME chain from ``name``: where it ends, its smallest TTL, and that
    name's addresses of ``kind`` (repeated records kept, as nginx does: each is a peer)."""
    cnames: dict[dns.name.Name, tuple[dns.name.Name, int]] = {}
    addresses: dict[dns.name.Name, tuple[list[str], int]] = {}
    for rrset in reply.answer:
        if rrset.rdtype == dns.rdatatype.CNAME:
            cnames.setdefault(rrset.name, (rrset[0].target, rrset.ttl))
        elif rrset.rdtype == kind:
            found, ttl = addresses.setdefault(rrset.name, ([], rrset.ttl))
            found.extend(rdata.address for rdata in rrset)
            addresses[rrset.name] = (found, min(ttl, rrset.ttl))
    min_ttl = float("inf")
    for _ in range(MAX_CNAME_HOPS):
        if name in addresses:
            found, ttl = addresses[name]
            return name, min(min_ttl, ttl), found
        if name not in cnames:
            break
        name, ttl = cnames[name]
        min_ttl = min(min_ttl, ttl)
    return name, min_ttl, []


class AdhocUpstreams:
    """This worker's one-off upstreams for addresses proxy_pass evaluated to."""

    def __init__(self, make: Callable[[UpstreamConf], UpstreamRuntime]) -> None:
        self._make = make
        self._table: OrderedDict[tuple[str, tuple[PeerAddr, ...]], UpstreamRuntime] = OrderedDict()

    def get(self, key: str, addrs: tuple[PeerAddr, ...]) -> UpstreamRuntime:
        table_key = (key, addrs)
        upstream = self._table.get(table_key)
        if upstream is not None:
            self._table.move_to_end(table_key)
            return upstream
        # max_fails=0: nginx makes these peers afresh for every request, so a failure is
        # never remembered (the round robin still turns over them request after request)
        servers = tuple(UpstreamServerConf(name=addr.name, addrs=(addr,), max_fails=0) for addr in addrs)
        upstream = self._table[table_key] = self._make(UpstreamConf(name=key, servers=servers, implicit=True))
        while len(self._table) > MAX_ADHOC_UPSTREAMS:
            self._table.popitem(last=False)
        return upstream


class Target:
    """What one evaluation of the URL asks for."""

    __slots__ = ("host", "port", "proxy_host", "proxy_port", "ssl", "unix_path", "uri")

    def __init__(self, host: str, port: int | None, unix_path: str | None, uri: str | None, ssl: bool,
                 proxy_host: str, proxy_port: str) -> None:
        self.host = host
        self.port = port
        self.unix_path = unix_path
        self.uri = uri
        self.ssl = ssl
        self.proxy_host = proxy_host
        self.proxy_port = proxy_port


def parse_target(url: str) -> Target:
    """The evaluated URL; raises AddressError with nginx's error head."""
    start = url.find("://") + 3
    rest = url[start:]
    query, slash = rest.find("?"), rest.find("/")
    if start > 2 and query >= 0 and (slash < 0 or query < slash) and not rest.lower().startswith("unix:"):
        url = url[: start + query] + "/" + url[start + query :]  # nginx: "http://h?a" sends "/?a"
    parsed = parse_proxy_url(url)
    target = parsed.target
    uri = parsed.uri
    proxy_host, proxy_port = proxy_host_port(parsed)
    return Target(target.host, target.port, target.unix_path, uri, parsed.ssl, proxy_host, proxy_port)


class DynamicPass:
    """One location's ``proxy_pass`` with variables (see the module docstring)."""

    def __init__(self, url: Callable[[Any], str], resolver: NameResolver | None,
                 upstreams: dict[str, UpstreamRuntime], adhoc: AdhocUpstreams) -> None:
        self.url = url
        self.resolver = resolver
        self.upstreams = upstreams
        self.adhoc = adhoc

    def start(self, exchange: Any) -> None:
        """Pick the upstream for this request, then proxy (now, or once a name resolved)."""
        url = self.url(exchange)
        try:
            target = parse_target(url)
        except AddressError as err:
            where = url if err.kind == "invalid URL prefix" else url.split("://", 1)[-1].split("/")[0]
            text = f'{err.kind} in "{where}"' if err.kind == "invalid URL prefix" else \
                f'{err.kind} in upstream "{where}"'
            errorlog.log_error("error", text, exchange.conn_id, exchange.log_context(None))
            exchange.finish_with_page(500)
            return
        exchange.proxy_host = target.proxy_host
        exchange.proxy_port = target.proxy_port
        upstream = self._named(target)
        if upstream is not None:
            exchange.proxy_to(upstream, target.uri)
            return
        port = (443 if target.ssl else 80) if target.port is None else target.port
        if target.unix_path is not None:
            addr = PeerAddr(None, 0, target.unix_path)
            exchange.proxy_to(self.adhoc.get(addr.name, (addr,)), target.uri)
            return
        try:
            ip = str(ipaddress.ip_address(target.host))
        except ValueError:
            pass
        else:
            addr = PeerAddr(ip, port)
            exchange.proxy_to(self.adhoc.get(addr.name, (addr,)), target.uri)
            return
        self._resolve(exchange, target, port)

    def _named(self, target: Target) -> UpstreamRuntime | None:
        """An upstream block (URL without a port) or an implicit upstream of the same host:port."""
        if target.unix_path is not None:
            return None
        host = target.host.lower()
        if target.port is None:
            upstream = self.upstreams.get(host)
            if upstream is not None and not upstream.conf.implicit:
                return upstream
        port = (443 if target.ssl else 80) if target.port is None else target.port
        key = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        upstream = self.upstreams.get(key)
        return upstream if upstream is not None and upstream.conf.implicit else None

    def _resolve(self, exchange: Any, target: Target, port: int) -> None:
        name = target.host.lower().rstrip(".")
        resolver = self.resolver
        if resolver is None:
            errorlog.log_error("error", f"no resolver defined to resolve {target.host}",
                               exchange.conn_id, exchange.log_context(None))
            exchange.finish_with_page(502)
            return
        cached = resolver.cached(name)
        if cached is not None:
            exchange.proxy_to(self._resolved(target.host, cached, port), target.uri)
            return
        from scriptlb.request.exchange import Waiting

        pending = Waiting(None)
        exchange.upstream_request = pending  # (the exchange's calls land there meanwhile)
        lookup = self._after_lookup(exchange, pending, resolver, name, target, port)
        pending.pending = asyncio.ensure_future(lookup)

    async def _after_lookup(self, exchange: Any, pending: Any, resolver: NameResolver, name: str,
                            target: Target, port: int) -> None:
        try:
            addresses = await resolver.resolve(name)
        except ResolveFailed as err:
            if exchange.upstream_request is pending:
                exchange.upstream_request = None
                errorlog.log_error("error", f"{target.host} could not be resolved {err}",
                                   exchange.conn_id, exchange.log_context(None))
                exchange.finish_with_page(502)
            return
        except Exception as exc:  # a bug: the request must still finish
            if exchange.upstream_request is pending:
                exchange.upstream_request = None
                exchange.crashed(exc, "resolving a proxy_pass name")
            return
        if exchange.upstream_request is pending:
            try:
                exchange.proxy_to(self._resolved(target.host, addresses, port), target.uri)
            except Exception as exc:
                exchange.crashed(exc, "starting request")

    def _resolved(self, host: str, addresses: tuple[str, ...], port: int) -> UpstreamRuntime:
        # (the one-off upstream is kept: its round robin turns over the name's addresses
        # request after request)
        return self.adhoc.get(f"{host}:{port}", tuple(PeerAddr(ip, port) for ip in sorted(addresses)))
