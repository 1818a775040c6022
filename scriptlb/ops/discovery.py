"""Upstream membership from etcd (``discovery etcd=URL prefix=P;``), fed into the run-time
server lists every worker applies (``scriptlb.state.peer_lists``), from the node's cluster process.

Theory of operation
-------------------
Each key under the prefix is one server: the key's last part is its address (``IP:PORT`` or
``[IPv6]:PORT``), the value a JSON object with the API's fields (``weight``, ``max_fails``,
``fail_timeout``, ``max_conns``, ``slow_start``, ``backup``, ``down``, ``drain``; all
optional). The task reads the prefix once (a range at revision R), then watches it from R+1;
each watch message's events update the members and, when the resulting list differs from the
last one written, the list is written with ``PeerListStore.change`` exactly like an API call:
every worker picks it up at its next poll (50 ms), peers that stay keep their ids and
statistics. A dropped watch resumes from the last revision seen; a compacted revision means
reading the range again.

etcd unreachable: the last membership stays in force (the store is only written on news), the
error log says so once per change of state, and the task retries with a growing delay.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable
from typing import Any

from scriptlb.config.model import DiscoveryConf, UpstreamConf
from scriptlb.logs import errorlog
from scriptlb.ops.etcd import Etcd, EtcdError, WatchEvent
from scriptlb.state.peer_lists import PeerList, PeerListStore, ServerEntry

BACKOFF_FIRST, BACKOFF_MAX = 0.1, 5.0
# An upstream whose source lists no server at all still needs one peer (nginx Plus keeps an
# empty upstream, answering 502): a placeholder that is always down.
EMPTY_PLACEHOLDER = "0.0.0.1:80"

_FIELDS: dict[str, Callable[[Any], bool]] = {
    "weight": lambda v: type(v) is int and v >= 1,
    "max_fails": lambda v: type(v) is int and v >= 0,
    "max_conns": lambda v: type(v) is int and v >= 0,
    "fail_timeout": lambda v: isinstance(v, int | float | str),
    "slow_start": lambda v: isinstance(v, int | float | str),
    "backup": lambda v: type(v) is bool,
    "down": lambda v: type(v) is bool,
    "drain": lambda v: type(v) is bool,
}


class BadMember(ValueError):
    """A key or value that does not describe a server."""


def member_fields(value: bytes) -> dict[str, Any]:
    """The server fields of one etcd value (empty value: defaults)."""
    if not value.strip():
        return {}
    try:
        data = json.loads(value)
    except ValueError:
        raise BadMember("value is not JSON")
    if not isinstance(data, dict):
        raise BadMember("value is not a JSON object")
    fields: dict[str, Any] = {}
    for name, item in data.items():
        check = _FIELDS.get(name)
        if check is None or not check(item):
            raise BadMember(f'invalid field "{name}"')
        if name in ("fail_timeout", "slow_start"):
            item = _seconds(item)
        fields[name] = item
    return fields


def _seconds(value: int | float | str) -> float:
    if isinstance(value, str):
        from scriptlb.config.units import parse_time

        seconds = parse_time(value, seconds_only=True)
        if seconds is None:
            raise BadMember(f'invalid time "{value}"')
        return seconds
    if not math.isfinite(value) or value < 0:
        raise BadMember(f"invalid time {value}")
    return float(value)


def member_address(key: bytes, prefix: bytes) -> str:
    """``IP:PORT`` from a key under the prefix (IP literals only: no DNS lookup here)."""
    from scriptlb.config.addresses import AddressError, split_host_port

    text = key[len(prefix) :].decode("utf-8", "replace")
    try:
        hp = split_host_port(text)
    except AddressError:
        raise BadMember(f'invalid address "{text}"')
    if hp.unix_path is not None or hp.port is None or not _is_ip(hp.host):
        raise BadMember(f'"{text}" is not IP:PORT')
    return text


def _is_ip(host: str | None) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address((host or "").strip("[]"))
        return True
    except ValueError:
        return False


def write_members(
    store: PeerListStore, upstream: UpstreamConf, members: list[tuple[str, dict[str, Any]]]
) -> PeerList:
    """Make ``members`` (address, fields) the upstream's run-time list. Entries for addresses
    already listed keep their ids (and so their API identity and statistics)."""

    def edit(current: PeerList) -> PeerList:
        ids: dict[str, list[int]] = {}
        for entry in current.servers:
            ids.setdefault(entry.server, []).append(entry.id)
        next_id = current.next_id
        servers = []
        wanted = members or [(EMPTY_PLACEHOLDER, {"down": True})]
        for address, fields in wanted:
            kept = ids.get(address)
            if kept:
                server_id = kept.pop(0)
            else:
                server_id, next_id = next_id, next_id + 1
            servers.append(ServerEntry(id=server_id, server=address, **fields))
        if not any(not s.backup for s in servers):
            servers.append(ServerEntry(id=next_id, server=EMPTY_PLACEHOLDER, down=True))
            next_id += 1
        return PeerList(tuple(servers), next_id, current.generation, current.fingerprint)

    return store.change(upstream, edit)


def same_members(current: PeerList, members: list[tuple[str, dict[str, Any]]]) -> bool:
    """Whether the stored list already says what ``members`` say (no write, no new generation)."""
    wanted = members or [(EMPTY_PLACEHOLDER, {"down": True})]
    if len(current.servers) != len(wanted):
        return False
    for entry, (address, fields) in zip(current.servers, wanted, strict=True):
        expected = ServerEntry(id=entry.id, server=address, **fields)
        if entry != expected:
            return False
    return True


_WRITES: set[asyncio.Task] = set()  # write-throughs in flight (the loop keeps weak references)


def entry_value(entry: ServerEntry) -> bytes:
    """A server's etcd value: the API's fields (the key holds the address)."""
    fields = entry.to_json()
    del fields["id"], fields["server"]
    return json.dumps(fields, sort_keys=True).encode()


def write_through(
    loop: asyncio.AbstractEventLoop, upstream: UpstreamConf, before: PeerList, after: PeerList
) -> None:
    """An API change of an etcd-backed upstream, written to etcd (PUT what was added or changed,
    DELETE what went), in the background: every node's watch then applies it. A failure is
    logged; this node keeps the change until etcd says otherwise."""
    conf = upstream.discovery
    assert conf is not None
    old = {e.server: e for e in before.servers if e.server != EMPTY_PLACEHOLDER}
    new = {e.server: e for e in after.servers if e.server != EMPTY_PLACEHOLDER}
    prefix = conf.prefix.encode()
    puts = [(prefix + a.encode(), entry_value(e)) for a, e in new.items() if old.get(a) != e]
    deletes = [prefix + a.encode() for a in old if a not in new]

    async def write() -> None:
        etcd = Etcd(conf.etcd, timeout=conf.timeout)
        try:
            for key, value in puts:
                await etcd.put(key, value)
            for key in deletes:
                await etcd.delete(key)
        except Exception as err:
            errorlog.log_error(
                "error",
                f'upstream "{upstream.name}": writing the API change to etcd '
                f"{etcd.url} failed ({err.__class__.__name__}: {err})",
            )

    task = loop.create_task(write())
    _WRITES.add(task)
    task.add_done_callback(_WRITES.discard)


class SourceState:
    """Logs a membership source's reachability once per change of state."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.reachable: bool | None = None
        self.on_state: Callable[[bool, str], None] | None = None  # (up, error) at each change

    def failed(self, err: BaseException) -> None:
        if self.reachable is not False and self.on_state is not None:
            self.on_state(False, f"{err.__class__.__name__}: {err}")
        if self.reachable is not False:
            errorlog.log_error(
                "error",
                f"{self.what} unavailable ({err.__class__.__name__}: {err}), "
                "keeping the last known servers, retrying",
            )
        self.reachable = False

    def ok(self) -> None:
        if self.reachable is not True and self.on_state is not None:
            self.on_state(True, "")
        if self.reachable is False:
            errorlog.log_error("notice", f"{self.what} reachable again")
        self.reachable = True


class EtcdMembership:
    """One upstream's ``discovery etcd=...`` task."""

    def __init__(self, upstream: UpstreamConf, conf: DiscoveryConf, store: PeerListStore) -> None:
        self.upstream = upstream
        self.conf = conf
        self.store = store
        self.etcd = Etcd(conf.etcd, timeout=conf.timeout)
        self.prefix = conf.prefix.encode()
        self.members: dict[bytes, bytes] = {}  # key -> value, as etcd holds them
        self.revision: int | None = None  # last revision applied; None: read the range
        self.state = SourceState(f'upstream "{upstream.name}": etcd {self.etcd.url}')
        self._bad: set[tuple[bytes, bytes]] = set()  # invalid key/values already logged

    async def run(self) -> None:
        backoff = BACKOFF_FIRST
        while True:
            try:
                if self.revision is None:
                    self.revision, kvs = await self.etcd.range_prefix(self.prefix)
                    self.members = {kv.key: kv.value for kv in kvs}
                    self.apply()
                    self.state.ok()
                async for revision, events in self.etcd.watch_prefix(self.prefix, self.revision + 1):
                    self.state.ok()
                    backoff = BACKOFF_FIRST
                    self.on_events(events)
                    self.revision = max(self.revision, revision)
            except asyncio.CancelledError:
                raise
            except Exception as err:
                if isinstance(err, EtcdError) and "canceled" in str(err):
                    self.revision = None  # compacted: read the whole prefix again
                self.state.failed(err)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)

    def source_states(self) -> list[SourceState]:
        return [self.state]

    def on_events(self, events: list[WatchEvent]) -> None:
        if not events:
            return
        for event in events:
            if event.kind == "DELETE":
                self.members.pop(event.kv.key, None)
            else:
                self.members[event.kv.key] = event.kv.value
        self.apply()

    def current_members(self) -> list[tuple[str, dict[str, Any]]]:
        members = []
        for key in sorted(self.members):
            value = self.members[key]
            try:
                members.append((member_address(key, self.prefix), member_fields(value)))
            except BadMember as err:
                if (key, value) not in self._bad:
                    self._bad.add((key, value))
                    errorlog.log_error(
                        "warn",
                        f'upstream "{self.upstream.name}": etcd key '
                        f'"{key.decode("utf-8", "replace")}" ignored: {err}',
                    )
        return members

    def apply(self) -> None:
        members = self.current_members()
        if same_members(self.store.current(self.upstream), members):
            return
        write_members(self.store, self.upstream, members)
