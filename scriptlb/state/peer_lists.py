"""Change an upstream's servers at run time, in every worker, without a reload.

Writers (the API today; DNS or etcd feeds later) call ``PeerListStore.change(upstream, fn)``;
every worker's ``PeerListWatcher`` applies the result to its ``UpstreamRuntime`` (new
``PeerSet``, ``Balancer.rebuild``, statistics records for new peers): built-in methods and
hooks see the new list, requests in flight keep the peers they started with.

Theory of operation
-------------------
The store is one JSON file, ``<zone directory>/peer_lists.json``, beside the other shared
zones: per upstream that has been changed, its servers (``ServerEntry``: nginx Plus's fields,
with the stable ``id`` the API shows), the next id, a generation, and the fingerprint of the
config block the list started from. A change is a read-modify-write under ``flock`` on a lock
file, written to a temporary file and renamed into place, so concurrent writers (workers
serving API calls at once) serialize, a reader never sees half a file, and a change that
raises writes nothing. Workers poll the file's identity (``stat``: inode, size, mtime) every
``POLL_INTERVAL``: nothing on the request path; the writing worker applies at once.

Lifetime: the master removes the store at a cold start with the other zones; a reload keeps
it, and a worker of the new generation takes an upstream's stored list only while the
config's block is the one the list started from (same fingerprint): a reload that edits an
upstream's servers wins over earlier run-time changes, as nginx Plus's does. ``state FILE``
in the upstream persists its list across restarts in nginx Plus's format (``server`` lines,
read by the config loader at start).
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from scriptlb.config.model import HttpConf, MainConf, UpstreamConf, UpstreamServerConf
from scriptlb.logs import errorlog

FILE_NAME = "peer_lists.json"
POLL_INTERVAL = 0.05  # seconds: how late another worker's change may reach this one


@dataclass(frozen=True, slots=True)
class ServerEntry:
    """One server of a run-time list, in nginx Plus's API terms."""

    id: int
    server: str  # "IP:PORT" or "unix:/path", as given
    weight: int = 1
    max_conns: int = 0
    max_fails: int = 1
    fail_timeout: float = 10.0
    slow_start: float = 0.0
    backup: bool = False
    down: bool = False
    drain: bool = False

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ServerEntry:
        return cls(**data)

    def conf(self) -> UpstreamServerConf:
        from scriptlb.config.addresses import resolve_upstream_address
        from scriptlb.config.parser import Node

        addrs = resolve_upstream_address(Node("server", (self.server,), None), self.server)  # type: ignore[arg-type]
        return UpstreamServerConf(
            name=self.server, addrs=addrs, weight=self.weight, max_fails=self.max_fails,
            fail_timeout=self.fail_timeout, max_conns=self.max_conns, backup=self.backup,
            down=self.down, slow_start=self.slow_start, drain=self.drain,
        )

    def state_line(self) -> str:
        """The entry as a ``server`` line of nginx Plus's state file."""
        words = [f"server {self.server}", f"weight={self.weight}", f"max_fails={self.max_fails}",
                 f"fail_timeout={_seconds(self.fail_timeout)}", f"max_conns={self.max_conns}"]
        if self.slow_start:
            words.append(f"slow_start={_seconds(self.slow_start)}")
        words.extend(flag for flag in ("backup", "down", "drain") if getattr(self, flag))
        return " ".join(words) + ";\n"


def _seconds(value: float) -> str:
    return f"{value:g}s"


@dataclass(frozen=True, slots=True)
class PeerList:
    """One upstream's run-time servers."""

    servers: tuple[ServerEntry, ...]
    next_id: int
    generation: int
    fingerprint: str


def entries_from_conf(conf: UpstreamConf) -> tuple[ServerEntry, ...]:
    """A config block's servers as entries, ids in file order. A line naming several
    addresses (a host name) becomes one entry per address, as nginx Plus lists its peers."""
    entries = []
    for server in conf.servers:
        for addr in server.addrs:
            entries.append(ServerEntry(
                id=len(entries), server=addr.name, weight=server.weight, max_conns=server.max_conns,
                max_fails=server.max_fails, fail_timeout=server.fail_timeout,
                slow_start=server.slow_start, backup=server.backup, down=server.down,
                drain=server.drain,
            ))
    return tuple(entries)


def fingerprint(conf: UpstreamConf) -> str:
    text = json.dumps([e.to_json() for e in entries_from_conf(conf)], sort_keys=True)
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def apply_list(conf: UpstreamConf, peer_list: PeerList) -> UpstreamConf:
    """The upstream's config with the list's servers (primary order kept; PeerSet splits)."""
    return dataclasses.replace(conf, servers=tuple(entry.conf() for entry in peer_list.servers))


class PeerListStore:
    """The shared lists of one instance (see the module docstring)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.path = os.path.join(directory, FILE_NAME)
        self._lock_path = self.path + ".lock"

    # ----------------------------------------------------------------- reading

    def identity(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    def read(self) -> dict[str, PeerList]:
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return {}
        return {
            name: PeerList(tuple(ServerEntry.from_json(s) for s in item["servers"]), item["next_id"],
                           item["generation"], item["fingerprint"])
            for name, item in data.get("upstreams", {}).items()
        }

    def current(self, conf: UpstreamConf, lists: dict[str, PeerList] | None = None) -> PeerList:
        """The upstream's list: the stored one if it started from this config, else the config's."""
        stored = (self.read() if lists is None else lists).get(conf.name)
        mark = fingerprint(conf)
        if stored is not None and stored.fingerprint == mark:
            return stored
        entries = entries_from_conf(conf)
        return PeerList(entries, len(entries), 0, mark)

    # ----------------------------------------------------------------- writing

    def change(self, conf: UpstreamConf, edit: Callable[[PeerList], PeerList]) -> PeerList:
        """Read-modify-write one upstream's list atomically; ``edit`` returns the new list
        (its generation is set here) or raises, and then nothing is written."""
        os.makedirs(self.directory, exist_ok=True)
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            lists = self.read()
            before = self.current(conf, lists)
            after = dataclasses.replace(edit(before), generation=before.generation + 1,
                                        fingerprint=before.fingerprint)
            lists[conf.name] = after
            self._write(lists)
            if conf.state_file is not None:
                write_state_file(conf.state_file, after.servers)
            return after
        finally:
            os.close(fd)  # releases the lock

    def _write(self, lists: dict[str, PeerList]) -> None:
        data = {"version": 1, "upstreams": {
            name: {"servers": [s.to_json() for s in item.servers], "next_id": item.next_id,
                   "generation": item.generation, "fingerprint": item.fingerprint}
            for name, item in lists.items()
        }}
        _atomic_write(self.path, json.dumps(data, indent=1))

    @staticmethod
    def reset(directory: str) -> None:
        """Forget every run-time change (the master's cold start)."""
        for name in (FILE_NAME, FILE_NAME + ".lock"):
            try:
                os.unlink(os.path.join(directory, name))
            except FileNotFoundError:
                pass


def write_state_file(path: str, servers: tuple[ServerEntry, ...]) -> None:
    _atomic_write(path, "".join(entry.state_line() for entry in servers))


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def effective_conf(conf: MainConf, store: PeerListStore) -> MainConf:
    """``conf`` with each upstream's run-time list in place of its block's servers (what a
    worker starts from, so its statistics layout and balancers see the current lists)."""
    http = conf.http
    if http is None:
        return conf
    lists = store.read()
    if not lists:
        return conf
    upstreams = {}
    for name, upstream in http.upstreams.items():
        peer_list = lists.get(name)
        if peer_list is not None and peer_list.fingerprint == fingerprint(upstream):
            upstream = apply_list(upstream, peer_list)
        upstreams[name] = upstream
    return dataclasses.replace(conf, http=dataclasses.replace(http, upstreams=upstreams))


class PeerListWatcher:
    """A worker's side: polls the store and applies changed lists to its upstreams.

    ``apply(name, upstream_conf)`` is the worker's way of swapping an upstream's servers
    (``Runtime.replace_servers``); the watcher calls it once per upstream whose stored
    generation moved."""

    def __init__(self, store: PeerListStore, http: HttpConf,
                 apply: Callable[[dict[str, UpstreamConf]], None]) -> None:
        self.store = store
        self.http = http  # the config as loaded: fingerprints are taken from its blocks
        self._apply = apply
        self._seen = store.identity()
        self._generations = {name: self._stored_generation(name) for name in http.upstreams}
        self._timer: Any = None

    def _stored_generation(self, name: str, lists: dict[str, PeerList] | None = None) -> int:
        return self.store.current(self.http.upstreams[name], lists).generation

    def start(self, loop: Any) -> None:
        self._timer = loop.call_later(POLL_INTERVAL, self._tick, loop)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _tick(self, loop: Any) -> None:
        try:
            self.check()
        except Exception as err:  # a torn or foreign file must not stop the polling
            errorlog.log_error("alert", f"applying upstream changes failed: {err!r}")
        self._timer = loop.call_later(POLL_INTERVAL, self._tick, loop)

    def check(self) -> None:
        """Apply what changed since the last check (the writer calls it at once)."""
        identity = self.store.identity()
        if identity == self._seen:
            return
        self._seen = identity
        lists = self.store.read()
        changed: dict[str, UpstreamConf] = {}
        for name, upstream in self.http.upstreams.items():
            peer_list = self.store.current(upstream, lists)
            if peer_list.generation != self._generations.get(name):
                self._generations[name] = peer_list.generation
                changed[name] = apply_list(upstream, peer_list)
        if changed:
            self._apply(changed)
