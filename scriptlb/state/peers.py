"""Runtime peer state of one upstream in one worker (nginx's ``ngx_http_upstream_rr_peer_t``).

Built once per worker from the frozen ``UpstreamConf``; mutated only by the balancer's
``get``/``free`` (weights, fails, checked/accessed, active connections). Like nginx without a
``zone``, this state is per worker process: workers do not share failure counts.

Times (``accessed``, ``checked``) are in whatever clock the caller passes to the balancer as
``now`` (seconds, float); nginx uses whole seconds, we keep the fraction so sub-second windows in
tests behave exactly as written.
"""

from __future__ import annotations

from scriptlb.config.model import PeerAddr, UpstreamConf, UpstreamServerConf


class Peer:
    """One address of one ``server`` line: its configuration and its live counters."""

    __slots__ = (
        "accessed",
        "addr",
        "backup",
        "checked",
        "config_down",
        "conns",
        "current_weight",
        "down",
        "draining",
        "effective_weight",
        "fail_timeout",
        "fails",
        "id",
        "max_conns",
        "max_fails",
        "name",
        "server",
        "slow_start",
        "stats_index",
        "unhealthy",
        "weight",
    )

    def __init__(self, peer_id: int, addr: PeerAddr, server: UpstreamServerConf) -> None:
        self.id = peer_id  # index in its list (primary or backup), as ngx.upstream reports it
        self.addr = addr
        self.name = addr.name  # "127.0.0.1:9001": what $upstream_addr shows
        self.server = server.name  # the server line as written, for ngx.upstream.get_servers
        self.backup = server.backup
        self.down = server.down or server.drain  # draining: chosen by no new request
        self.draining = server.drain
        # active health checks (scriptlb.ops.health) set down while unhealthy, then back to this
        self.config_down = self.down
        self.unhealthy = False
        self.slow_start = server.slow_start  # seconds of weight ramp after recovering
        self.weight = server.weight
        self.max_fails = server.max_fails
        self.fail_timeout = server.fail_timeout
        self.max_conns = server.max_conns
        # smooth weighted round robin: nginx starts every peer at current 0, effective = weight
        self.effective_weight = server.weight
        self.current_weight = 0
        # passive health: failures in the window, when the last failure happened (accessed) and
        # when the window was last (re)opened by a selection or a failure (checked)
        self.fails = 0
        self.accessed = 0.0
        self.checked = 0.0
        self.conns = 0  # requests currently using this peer in this worker
        self.stats_index = -1  # its index in this worker's stats.Recorder; -1: no statistics

    def is_unavailable(self, now: float) -> bool:
        """Down, or failed ``max_fails`` times with the ``fail_timeout`` window still open."""
        if self.down:
            return True
        return bool(
            self.max_fails and self.fails >= self.max_fails and now - self.checked <= self.fail_timeout
        )

    def avoided(self, now: float) -> str | None:
        """Why the upstream's own methods would not choose this peer now: ``draining``,
        ``down``, ``unhealthy`` (active health checks, first pass of a ``mandatory`` check
        included) or ``unavail`` (``max_fails`` reached in ``fail_timeout``); None when they
        might. (The API's ``state`` words.)"""
        if self.draining:
            return "draining"
        if self.unhealthy:
            return "unhealthy"
        if self.down:
            return "down"
        if self.max_fails and self.fails >= self.max_fails and now - self.checked <= self.fail_timeout:
            return "unavail"
        return None

    def is_full(self) -> bool:
        return bool(self.max_conns) and self.conns >= self.max_conns

    def __repr__(self) -> str:
        return (
            f"<Peer {self.name} weight={self.weight} effective={self.effective_weight} "
            f"current={self.current_weight} fails={self.fails}/{self.max_fails} conns={self.conns}"
            f"{' backup' if self.backup else ''}{' down' if self.down else ''}>"
        )


class PeerSet:
    """One upstream's peers in a worker: the primary list and the backup list.

    ``single`` is nginx's fast path: exactly one primary address and no backup. Such a peer is
    never subject to ``max_fails`` and a failure on it is never retried.
    """

    __slots__ = ("backup", "by_name", "name", "only", "primary", "single", "tries")

    def __init__(self, name: str, primary: list[Peer], backup: list[Peer]) -> None:
        self.name = name  # $upstream_addr shows the upstream name when no peer is live
        self.primary = primary
        self.backup = backup
        self.single = len(primary) == 1 and not backup
        self.only = primary[0] if self.single else None  # (single's peer)
        # nginx >= 1.19.6: the initial tries budget counts the addresses that are not down
        self.tries = sum(1 for p in primary if not p.down) + sum(1 for p in backup if not p.down)
        # address -> its first peer (primary list first): what a hook's set_current_peer names
        self.by_name: dict[str, Peer] = {}
        for peer in (*primary, *backup):
            self.by_name.setdefault(peer.name, peer)

    @classmethod
    def from_conf(cls, conf: UpstreamConf) -> PeerSet:
        primary: list[Peer] = []
        backup: list[Peer] = []
        for server in conf.servers:
            target = backup if server.backup else primary
            for addr in server.addrs:
                target.append(Peer(len(target), addr, server))
        return cls(conf.name, primary, backup)

    def holds(self, peer: Peer) -> bool:
        """Is ``peer`` one of this set's (not of a list replaced since its request began)?"""
        peers = self.backup if peer.backup else self.primary
        return peer.id < len(peers) and peers[peer.id] is peer

    def __repr__(self) -> str:
        return f"<PeerSet {self.name} primary={len(self.primary)} backup={len(self.backup)}>"
