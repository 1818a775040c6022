"""The interface every balancing method implements (nginx's init_peer -> get -> free cycle).

One small class per method (round_robin, least_conn, hash, ip_hash, random, ewma, least_time),
each built from a ``PeerSet`` and holding no per-request state: that lives in the
``BalancerState`` the method's ``new_request`` returns, so one balancer serves every concurrent
request of a worker.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from scriptlb.state.peers import Peer, PeerSet

if TYPE_CHECKING:
    from scriptlb.state.stats import UpstreamStats


class BalancerState:
    """Per-request balancer data (nginx's ``ngx_http_upstream_rr_peer_data_t`` + ``pc->tries``).

    ``tries`` is the remaining budget including the try in progress; the proxy's tries loop may
    add to it (a hook's ``set_more_tries``, a stale keep-alive connection) and reads it to decide
    whether another try is possible.
    """

    __slots__ = ("current", "on_backup", "peer_set", "tried", "tries")

    def __init__(self, peer_set: PeerSet, tries: int) -> None:
        self.peer_set = peer_set  # the set this request started with (survives a rebuild)
        self.tries = tries
        self.tried = 0  # bitmap over the indexes of the list in use: no peer twice per request
        self.on_backup = False  # nginx switches to the backup list once, with a fresh bitmap
        self.current: Peer | None = None  # the peer of the try in progress

    @property
    def peers(self) -> list[Peer]:
        """The list (primary or backup) this request is choosing from now."""
        return self.peer_set.backup if self.on_backup else self.peer_set.primary

    def __repr__(self) -> str:
        if not hasattr(self, "tried"):  # (round robin's state for a single peer: the budget alone)
            return f"<BalancerState tries={self.tries} single>"
        return (
            f"<BalancerState tries={self.tries} tried={self.tried:#b} "
            f"{'backup' if self.on_backup else 'primary'} current={self.current and self.current.name}>"
        )


def initial_tries(peer_set: PeerSet, tries_cap: int) -> int:
    """nginx: non-down primary + non-down backup addresses, capped by proxy_next_upstream_tries."""
    tries = peer_set.tries
    if tries_cap and tries > tries_cap:
        return tries_cap
    return tries


class Balancer(Protocol):
    """What the proxy's tries loop uses; every balancing method implements it."""

    peers: PeerSet

    def new_request(self, tries_cap: int, key: str | bytes | None = None) -> BalancerState:
        """Start a request; ``tries_cap`` is proxy_next_upstream_tries (0 = no cap).

        ``key`` is what a keyed method hashes (``hash $key``, ``ip_hash``'s address), evaluated
        by the caller per request; methods without a key ignore it.
        """
        ...

    def get(self, state: BalancerState, now: float) -> Peer | None:
        """Choose the peer of the next try; ``None`` means "no live upstreams" (502, no retry)."""
        ...

    def free(self, state: BalancerState, peer: Peer, failed: bool, now: float) -> bool:
        """Account the finished try; returns True when nginx would log the warning
        "upstream server temporarily disabled" (the caller logs it with the request context)."""
        ...

    def observe(
        self,
        peer: Peer,
        connect_time: float | None,
        header_time: float | None,
        response_time: float | None,
        now: float,
    ) -> None:
        """A try on ``peer`` got a response: its times (seconds, None when not reached), on
        the clock of ``get``/``free``. Called before that try's ``free``. Methods that learn
        from latency (ewma, least_time) keep statistics; the others ignore it."""
        ...

    def use_statistics(self, stats: UpstreamStats) -> bool:
        """The upstream has live statistics (every worker's tries): a method that learns from
        latency reads its averages there from now on and returns True (``observe`` is then not
        needed); the others return False."""
        ...

    def rebuild(self, peers: PeerSet) -> None:
        """Swap in a new peer set (dynamic upstreams); requests in flight keep their old one."""
        ...

    def weights_changed(self) -> None:
        """Hook-set weights (``upstream.set_peer_weight``) were written into the peers' ``weight``
        and ``effective_weight``: refresh whatever caches them. Must stay cheap (O(peers)): a
        hook decides how often this runs."""
        ...
