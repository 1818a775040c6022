"""Upstream membership from DNS: nginx Plus's ``server NAME resolve [service=NAME]`` with
``resolver ADDR[:PORT] [valid=T] [ipv4=on|off] [ipv6=on|off]; resolver_timeout T;``.

Theory of operation
-------------------
One task per upstream, in the node's cluster process (scriptlb.ops.cluster). Each ``resolve`` line
is looked up when due: A (and AAAA unless ``ipv6=off``; A unless ``ipv4=off``) records give
one peer per address with the line's port (80 if none) and parameters; with ``service=``, the
SRV records of ``_service._tcp.NAME`` (or ``service`` as written when it starts with ``_``)
give the ports and weights, their targets' addresses coming from the additional section or
from A/AAAA queries, and records of a higher priority number become backup peers, as nginx
Plus does. A line is due again after the answers' smallest TTL, or ``valid=`` when given.

The upstream's list is then the config's own servers plus every line's peers, written to the
run-time server lists (scriptlb.state.peer_lists) only when it differs from what is stored: every
worker applies it at its next poll, peers that stay keep their ids, statistics and pooled
connections. A failed lookup (timeout, SERVFAIL, REFUSED, no answer from any name server)
keeps the line's last peers and retries sooner; NXDOMAIN or an empty answer is an answer:
the line then has no peers (an upstream left with none answers 502 until it has some).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype

from scriptlb.config.addresses import split_host_port
from scriptlb.config.model import ResolverConf, UpstreamConf, UpstreamServerConf
from scriptlb.logs import errorlog
from scriptlb.ops.discovery import EMPTY_PLACEHOLDER, SourceState, same_members, write_members
from scriptlb.state.dict_sync import raise_lost_cancel
from scriptlb.state.peer_lists import PeerListStore

MIN_TTL = 1.0  # seconds: a TTL of 0 must not make the task query in a loop
RETRY_FIRST, RETRY_MAX = 0.5, 10.0  # after a failed lookup: sooner than the TTL, growing
MAX_TARGETS = 64  # SRV targets looked up per answer (bounded work for a hostile answer)


class LookupFailed(Exception):
    """No usable answer: keep the last peers."""


Member = tuple[str, dict[str, Any]]


def _address(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _fields(server: UpstreamServerConf, **override: Any) -> dict[str, Any]:
    fields = {
        "weight": server.weight,
        "max_fails": server.max_fails,
        "fail_timeout": server.fail_timeout,
        "max_conns": server.max_conns,
        "slow_start": server.slow_start,
        "backup": server.backup,
        "down": server.down,
        "drain": server.drain,
    }
    fields.update(override)
    return fields


def static_members(upstream: UpstreamConf) -> list[Member]:
    """The block's own servers (not ``resolve``, not the start-up placeholder)."""
    members = []
    for server in upstream.servers:
        if server.resolve or (server.source is None and server.name == EMPTY_PLACEHOLDER):
            continue
        for addr in server.addrs:
            members.append((addr.name, _fields(server)))
    return members


@dataclass
class Line:
    """One ``server NAME resolve`` line and what it last resolved to."""

    server: UpstreamServerConf
    host: str
    port: int
    members: list[Member]
    due: float = 0.0  # time.monotonic()
    failures: int = 0


class DnsClient:
    """Queries the configured name servers in order (UDP, TCP when truncated)."""

    def __init__(self, conf: ResolverConf) -> None:
        self.conf = conf

    async def query(self, name: str, rdtype: dns.rdatatype.RdataType) -> dns.message.Message:
        request = dns.message.make_query(name, rdtype)
        errors = []
        for host, port in self.conf.addresses:
            try:
                reply = await dns.asyncquery.udp(request, host, port=port, timeout=self.conf.timeout)
                if reply.flags & dns.flags.TC:
                    reply = await dns.asyncquery.tcp(request, host, port=port, timeout=self.conf.timeout)
            except (dns.exception.DNSException, OSError) as err:
                errors.append(f"{host}:{port}: {err.__class__.__name__}")
                continue
            if reply.rcode() in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
                return reply
            errors.append(f"{host}:{port}: {dns.rcode.to_text(reply.rcode())}")
        raise LookupFailed(f'"{name}" {dns.rdatatype.to_text(rdtype)}: ' + ", ".join(errors))


def _records(reply: dns.message.Message, rdtype: dns.rdatatype.RdataType) -> tuple[list[Any], float | None]:
    """The answer's records of one type and their smallest TTL (None: no record)."""
    items: list[Any] = []
    ttl: float | None = None
    for rrset in reply.answer:
        if rrset.rdtype == rdtype:
            items.extend(rrset)
            ttl = rrset.ttl if ttl is None else min(ttl, rrset.ttl)
    return items, ttl


class DnsMembership:
    """One upstream's ``resolve`` lines (see the module docstring)."""

    def __init__(self, upstream: UpstreamConf, conf: ResolverConf, store: PeerListStore) -> None:
        self.upstream = upstream
        self.conf = conf
        self.store = store
        self.client = DnsClient(conf)
        self.static = static_members(upstream)
        self.lines = []
        for server in upstream.servers:
            if server.resolve:
                hp = split_host_port(server.name)
                self.lines.append(Line(server, hp.host or "", hp.port or 80, []))
        servers = ", ".join(f"{a}:{p}" for a, p in conf.addresses)
        self.states = {
            id(line): SourceState(f'upstream "{upstream.name}": resolving "{line.server.name}" via {servers}')
            for line in self.lines
        }

    def source_states(self) -> list[SourceState]:
        return list(self.states.values())

    async def run(self) -> None:
        while True:
            now = time.monotonic()
            changed = False
            for line in self.lines:
                if line.due <= now:
                    changed = await self.refresh(line) or changed
            if changed:
                self.apply()
            next_due = min(line.due for line in self.lines)
            raise_lost_cancel()  # (dnspython's queries are wait_for calls)
            await asyncio.sleep(max(0.05, next_due - time.monotonic()))

    async def refresh(self, line: Line) -> bool:
        """Look one line up; whether its peers changed."""
        state = self.states[id(line)]
        try:
            members, ttl = await self.lookup(line)
        except asyncio.CancelledError:
            raise
        except Exception as err:  # a failed lookup keeps the last peers
            state.failed(err)
            line.failures += 1
            line.due = time.monotonic() + min(RETRY_FIRST * 2 ** (line.failures - 1), RETRY_MAX)
            return False
        state.ok()
        line.failures = 0
        valid = self.conf.valid if self.conf.valid is not None else max(ttl or MIN_TTL, MIN_TTL)
        line.due = time.monotonic() + valid
        if members == line.members:
            return False
        line.members = members
        return True

    async def lookup(self, line: Line) -> tuple[list[Member], float | None]:
        if line.server.service:
            return await self._lookup_srv(line)
        addresses, ttl = await self._addresses(line.host)
        return [(_address(ip, line.port), _fields(line.server)) for ip in addresses], ttl

    async def _addresses(
        self, host: str, reply: dns.message.Message | None = None
    ) -> tuple[list[str], float | None]:
        """A then AAAA (as enabled); addresses found in ``reply``'s additional section first."""
        found: list[str] = []
        ttls: list[float] = []
        wanted = [
            t for t, on in ((dns.rdatatype.A, self.conf.ipv4), (dns.rdatatype.AAAA, self.conf.ipv6)) if on
        ]
        for rdtype in wanted:
            items: list[Any] = []
            if reply is not None:
                for rrset in reply.additional:
                    if rrset.rdtype == rdtype and rrset.name.to_text().rstrip(".") == host.rstrip("."):
                        items.extend(rrset)
                        ttls.append(rrset.ttl)
            if not items:
                answer = await self.client.query(host, rdtype)
                items, ttl = _records(answer, rdtype)
                if ttl is not None:
                    ttls.append(ttl)
            found.extend(sorted(item.address for item in items))
        return found, min(ttls) if ttls else None

    async def _lookup_srv(self, line: Line) -> tuple[list[Member], float | None]:
        service = line.server.service or ""
        name = f"{service}.{line.host}" if service.startswith("_") else f"_{service}._tcp.{line.host}"
        reply = await self.client.query(name, dns.rdatatype.SRV)
        records, ttl = _records(reply, dns.rdatatype.SRV)
        if not records:
            return [], ttl
        best = min(r.priority for r in records)
        members: list[Member] = []
        ttls = [ttl] if ttl is not None else []
        for record in sorted(records, key=lambda r: (r.priority, r.target.to_text(), r.port))[:MAX_TARGETS]:
            addresses, target_ttl = await self._addresses(record.target.to_text(), reply)
            if target_ttl is not None:
                ttls.append(target_ttl)
            fields = _fields(
                line.server,
                weight=max(1, record.weight) if record.weight else line.server.weight,
                backup=line.server.backup or record.priority != best,
            )
            members.extend((_address(ip, record.port), dict(fields)) for ip in addresses)
        return members, min(ttls) if ttls else None

    def members(self) -> list[Member]:
        members = list(self.static)
        for line in self.lines:
            members.extend(line.members)
        return members

    def apply(self) -> None:
        members = self.members()
        if same_members(self.store.current(self.upstream), members):
            return
        write_members(self.store, self.upstream, members)
        errorlog.log_error(
            "info",
            f'upstream "{self.upstream.name}": servers from DNS: '
            + (", ".join(address for address, _ in members) or "none"),
        )
