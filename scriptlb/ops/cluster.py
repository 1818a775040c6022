"""The node's cluster process: the one place where a node talks to the cluster's stores.

Theory of operation
-------------------
Hooks never wait on the network, and a node must talk to Redis (shared dicts), etcd and DNS
(upstream membership) once, not once per worker: N workers each merging a zone would push the
same keys N times and multiply the load on Redis. So the master forks one more child beside
its workers, like nginx's cache manager: the *cluster process*. It runs its own event loop with
one task per source:

- ``DictSync`` per ``python_shared_dict ... sync=redis://`` zone (scriptlb.state.dict_sync): merges
  the LMDB zone, which every worker reads and writes locally, with Redis.
- ``EtcdMembership`` per upstream with ``discovery etcd=...`` (scriptlb.ops.discovery) and
  ``DnsMembership`` per upstream with ``server ... resolve`` (scriptlb.ops.resolver): both write
  the upstream's run-time server list (scriptlb.state.peer_lists), which every worker polls and
  applies, exactly as it applies an API change.

Why a child and not the master: the master stays single-threaded and loop-free (it forks
workers; a thread or a loop in it would be copied half-made into every child), and a bug or a
hang in a client library costs a respawn, not the supervisor. Why not "worker 0": a worker is
busy with traffic and is replaced on reload at different times than the zones live.

The master supervises it like a worker (respawned when it dies, replaced on reload: for the
~100 ms two generations overlap, both may merge the same zone, which is harmless since every
push is a whole state). With ``master_process off`` the tasks run in the only worker's loop.
QUIT makes it push what hooks wrote since the last round, then exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from typing import TYPE_CHECKING, Any

from scriptlb.config.model import HttpConf, MainConf
from scriptlb.logs import errorlog
from scriptlb.state.shared_dict import SyncedSharedDict, zone_directory

if TYPE_CHECKING:
    from scriptlb.ops.discovery import EtcdMembership
    from scriptlb.ops.resolver import DnsMembership
    from scriptlb.state.dict_sync import DictSync

FINAL_ROUND_TIMEOUT = 1.0  # seconds a stopping node spends pushing its last writes
STATUS_FILE = "cluster_status.json"


class ClusterStatus:
    """Whether each store this node depends on is reachable, in ``<zones>/cluster_status.json``
    (written by the cluster process at each change of state; read by the metrics of any
    worker): ``{"redis": {dict: {...}}, "etcd": {upstream: {...}}, "dns": {upstream: {...}}}``,
    each ``{"up": bool, "since": unix time, "error": text}``."""

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, STATUS_FILE)
        self.state: dict[str, dict[str, dict[str, Any]]] = {}
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # a previous run's; this process reports afresh

    def report(self, kind: str, name: str, up: bool, error: str = "") -> None:
        self.state.setdefault(kind, {})[name] = {"up": up, "since": time.time(), "error": error}
        tmp = f"{self.path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(self.state, f)
            os.replace(tmp, self.path)
        except OSError as err:
            errorlog.log_error("alert", f"cannot write {self.path}: {err}")

    @staticmethod
    def read(directory: str) -> dict[str, dict[str, dict[str, Any]]]:
        try:
            with open(os.path.join(directory, STATUS_FILE), encoding="utf-8") as f:
                states: dict[str, dict[str, dict[str, Any]]] = json.load(f)
                return states
        except (OSError, ValueError):
            return {}


def feeds_peer_lists(http: HttpConf) -> bool:
    """Whether some upstream's servers come from etcd or DNS at run time."""
    return any(
        upstream.discovery is not None or any(s.resolve for s in upstream.servers)
        for upstream in http.upstreams.values()
    )


def needed(conf: MainConf) -> bool:
    """Whether this config has anything for a cluster process to do."""
    http = conf.http
    if http is None:
        return False
    return any(zone.sync is not None for zone in http.shared_dicts.values()) or feeds_peer_lists(http)


class ClusterNode:
    """The tasks of one node's cluster process."""

    def __init__(self, conf: MainConf) -> None:
        self.conf = conf
        self.syncs: list[DictSync] = []
        self.memberships: list[EtcdMembership | DnsMembership] = []
        self.status: ClusterStatus | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        from scriptlb.state.dict_sync import DictSync

        http = self.conf.http
        if http is None:
            return
        directory = zone_directory(self.conf.prefix)
        status = self.status = ClusterStatus(directory)
        for name, zone in http.shared_dicts.items():
            if zone.sync is None:
                continue
            shared = SyncedSharedDict(directory, name, zone.size)
            sync = DictSync(shared, zone.sync)
            sync.on_state = lambda up, error, name=name: status.report("redis", name, up, error)
            self.syncs.append(sync)
        self._tasks = [loop.create_task(sync.run()) for sync in self.syncs]
        self._start_memberships(http, directory, status, loop)

    def _start_memberships(self, http: HttpConf, directory: str, status: ClusterStatus,
                           loop: asyncio.AbstractEventLoop) -> None:
        from scriptlb.ops.discovery import EtcdMembership
        from scriptlb.ops.resolver import DnsMembership
        from scriptlb.state.peer_lists import PeerListStore

        store = PeerListStore(directory)
        for upstream in http.upstreams.values():
            if upstream.discovery is not None:
                member: EtcdMembership | DnsMembership = EtcdMembership(upstream, upstream.discovery, store)
                kind = "etcd"
            elif upstream.resolver is not None and any(s.resolve for s in upstream.servers):
                member, kind = DnsMembership(upstream, upstream.resolver, store), "dns"
            else:
                continue
            for state in member.source_states():
                state.on_state = lambda up, error, kind=kind, name=upstream.name: status.report(
                    kind, name, up, error)
            self.memberships.append(member)
        self._tasks += [loop.create_task(member.run()) for member in self.memberships]

    async def stop(self, graceful: bool) -> None:
        for sync in self.syncs:
            sync.stop()
        if graceful:
            with contextlib.suppress(Exception, asyncio.TimeoutError):
                async with asyncio.timeout(FINAL_ROUND_TIMEOUT):
                    await asyncio.gather(*(sync.final_round() for sync in self.syncs))
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for sync in self.syncs:
            with contextlib.suppress(Exception):
                await sync.close()


def run(conf: MainConf) -> None:
    """The cluster process's main: serve the node's sync tasks until QUIT/TERM/INT."""
    import uvloop

    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    node = ClusterNode(conf)
    stopped: asyncio.Future[bool] = loop.create_future()

    def on_signal(signo: signal.Signals) -> None:
        if signo == signal.SIGUSR1:
            errorlog.reopen()
        elif not stopped.done():
            stopped.set_result(signo == signal.SIGQUIT)

    for signo in (signal.SIGQUIT, signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        loop.add_signal_handler(signo, on_signal, signo)

    async def serve() -> None:
        node.start(loop)
        graceful = await stopped
        await node.stop(graceful)

    try:
        loop.run_until_complete(serve())
    finally:
        asyncio.set_event_loop(None)
        loop.close()
