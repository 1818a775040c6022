"""``least_time header | last_byte [inflight]``: nginx Plus' method, as documented.

nginx Plus: "a request is passed to the server with the least average response time and least
number of active connections, taking into account weights of servers. If there are several such
servers, they are tried in turn using a weighted round-robin balancing method." Its exact
formula is not published; ours is

    score(peer) = average_time(peer) * (conns(peer) + 1) / weight(peer)

i.e. the expected wait if the peer serves its active requests plus this one at its average
speed, scaled down by weight. ``average_time`` is the time-decayed EWMA of ``ewma.py``
(10 s decay), fed by ``observe`` with the time to the response header (``header``) or to its
last byte (``last_byte``). Scores compare cross-multiplied (no division). Peers never measured
average 0, so they score 0 and are tried first (in WRR order): every server gets measured.
Ties at the lowest score go to smooth WRR among exactly those peers, as nginx's least_conn does.

``inflight`` (Plus: also count requests still in flight for last_byte) is accepted; in-flight
requests already weigh through ``conns``.

Everything else is round robin's: tried/down/failed/full peers are skipped, backup switch,
single peer, ``free``'s failure accounting.
"""

from __future__ import annotations

from scriptlb.balancing.base import BalancerState
from scriptlb.balancing.ewma import DECAY_TIME, PerPeerTimes
from scriptlb.balancing.least_conn import usable_mask
from scriptlb.balancing.round_robin import RoundRobin, smooth_wrr_among
from scriptlb.state.peers import Peer, PeerSet


class LeastTime(RoundRobin):
    """Lowest average time x active connections / weight. Implements ``base.Balancer``."""

    __slots__ = ("last_byte", "times")

    def __init__(
        self, peers: PeerSet, args: tuple[str, ...] = ("header",), *, decay: float = DECAY_TIME
    ) -> None:
        super().__init__(peers)
        if not args or args[0] not in ("header", "last_byte") or args[1:] not in ((), ("inflight",)):
            raise ValueError(f'invalid parameter "{" ".join(args)}"')
        self.last_byte = args[0] == "last_byte"
        self.times = PerPeerTimes(peers, decay)

    def rebuild(self, peers: PeerSet) -> None:
        self.times = self.times.rebuilt(peers)
        super().rebuild(peers)

    def observe(
        self,
        peer: Peer,
        connect_time: float | None,
        header_time: float | None,
        response_time: float | None,
        now: float,
    ) -> None:
        """Feed a try that got a response: its header time or last-byte time, per the mode."""
        sample = response_time if self.last_byte else header_time
        averages = self.times.of(peer)
        if sample is not None and averages is not None:
            averages.update(peer.id, sample, now)

    def average(self, peer: Peer) -> float:
        averages = self.times.of(peer)
        return averages.values[peer.id] if averages is not None else 0.0

    def _get_weighted(self, state: BalancerState, now: float) -> Peer | None:  # type: ignore[override]
        if state.peer_set is not self.times.peers:  # a request from before a rebuild
            return RoundRobin._get_weighted(state, now)
        peers = state.peers
        usable = usable_mask(peers, state.tried, now)
        if not usable:
            return None
        times = (self.times.backup if state.on_backup else self.times.primary).values
        best: Peer | None = None
        best_index = 0
        best_cost = 0.0  # average * (conns + 1): the score times weight
        many = False
        for index, peer in enumerate(peers):
            if not usable >> index & 1:
                continue
            cost = times[index] * (peer.conns + 1)
            if best is None or cost * best.weight < best_cost * peer.weight:
                best, best_index, best_cost, many = peer, index, cost, False
            elif cost * best.weight == best_cost * peer.weight:
                many = True
        assert best is not None
        if many:  # smooth WRR among the usable peers with best's cost per weight, from best on
            ties = [
                i
                for i in range(best_index, len(peers))
                if usable >> i & 1
                and times[i] * (peers[i].conns + 1) * best.weight == best_cost * peers[i].weight
            ]
            best, best_index = smooth_wrr_among(peers, ties)
        state.tried |= 1 << best_index
        if now - best.checked > best.fail_timeout:
            best.checked = now
        return best

    def __repr__(self) -> str:
        return f"<LeastTime {'last_byte' if self.last_byte else 'header'} {self.peers!r}>"
