"""``ewma``: APISIX's ``balancer/ewma.lua`` (after Finagle's PeakEwma).

Theory of operation
-------------------
Each peer has an exponentially weighted moving average of its round-trip time, decayed by
*time* rather than by sample count (``scriptlb.state.stats.fold``, the one implementation)::

    w    = exp(-(now - last_update) / DECAY_TIME)        # DECAY_TIME = 10 s
    ewma = ewma * w + rtt * (1 - w)                      # on every completed try

and its score is the same average decayed towards 0 for the time since its last sample
(``ewma * exp(-(now - last_update) / DECAY_TIME)``), so a server that has not been used for a
while looks faster and gets tried again: the discovery that the fastest-first post's fourth rule
asks for. A peer never measured scores 0.

A pick draws two distinct peers uniformly at random among the usable ones (not tried by this
request, not down, not failed, not full) as APISIX does (``a = rand(n)``, ``b = rand(n - 1)``,
``b += 1 if b >= a``) and keeps the lower score (a tie keeps ``a``). Weights are ignored, as in
APISIX. With one usable peer that peer is taken; with none the request moves to the backup list
(round robin's rule), then "no live upstreams".

The rtt is the try's ``$upstream_response_time`` (which includes the connect), the same sample
the live statistics average and hooks read. APISIX adds ``upstream_connect_time`` to it, which
counts the connect twice. APISIX's file, despite the PeakEwma lineage, has no "peak" clamp;
``peak=True`` adds Finagle's (a sample above the average replaces it at once, so a sudden
slowdown is seen immediately).

Where the averages live: in the instance's live peer statistics when the upstream has them
(``use_statistics``; ``python_peer_stats on``, the default), so every worker scores a peer on
every worker's tries, as APISIX's shared dict does; otherwise (statistics off, unit tests,
tools) in this balancer (``DecayingAverages``, fed by ``observe``). Clock and RNG are injected:
``now`` arguments (the statistics' own clock when they are used) and ``rng``.
"""

from __future__ import annotations

import random as _random

from scriptlb.balancing.base import BalancerState
from scriptlb.balancing.least_conn import usable_mask
from scriptlb.balancing.round_robin import RoundRobin
from scriptlb.state.peers import Peer, PeerSet
from scriptlb.state.stats import DECAY_TIME, UpstreamStats, decayed, fold


class DecayingAverages:
    """Time-decayed moving averages for the peers of one list, indexed by ``Peer.id``: a
    balancer's own store when no live statistics are shared (the same ``fold``)."""

    __slots__ = ("decay", "peak", "stamps", "values")

    def __init__(self, count: int, decay: float = DECAY_TIME, peak: bool = False) -> None:
        self.decay = decay
        self.peak = peak
        self.values = [0.0] * count
        self.stamps: list[float | None] = [None] * count  # None: never measured

    def update(self, index: int, sample: float, now: float) -> float:
        value = self.values[index]
        average, peak = fold(value, value, self.stamps[index], sample, sample, now, self.decay)
        value = self.values[index] = peak if self.peak else average
        self.stamps[index] = now
        return value

    def decayed(self, index: int, now: float) -> float:
        """The average decayed towards 0 since its last sample (APISIX's ``score``)."""
        return decayed(self.values[index], self.stamps[index], now, self.decay)

    def carry_over(self, old_peers: list[Peer], old: DecayingAverages, new_peers: list[Peer]) -> None:
        """Keep the history of peers that survive a rebuild (matched by address name)."""
        by_name = {peer.name: peer.id for peer in old_peers}
        for peer in new_peers:
            old_index = by_name.get(peer.name)
            if old_index is not None and old_index < len(old.values):
                self.values[peer.id] = old.values[old_index]
                self.stamps[peer.id] = old.stamps[old_index]


class PerPeerTimes:
    """``DecayingAverages`` for both lists of a peer set."""

    __slots__ = ("backup", "peers", "primary")

    def __init__(self, peers: PeerSet, decay: float = DECAY_TIME, peak: bool = False) -> None:
        self.peers = peers
        self.primary = DecayingAverages(len(peers.primary), decay, peak)
        self.backup = DecayingAverages(len(peers.backup), decay, peak)

    def of(self, peer: Peer) -> DecayingAverages | None:
        """The averages that ``peer`` indexes into, or None for a peer of a replaced set."""
        lst = self.peers.backup if peer.backup else self.peers.primary
        if peer.id >= len(lst) or lst[peer.id] is not peer:
            return None
        return self.backup if peer.backup else self.primary

    def rebuilt(self, peers: PeerSet) -> PerPeerTimes:
        fresh = PerPeerTimes(peers, self.primary.decay, self.primary.peak)
        fresh.primary.carry_over(self.peers.primary, self.primary, peers.primary)
        fresh.backup.carry_over(self.peers.backup, self.backup, peers.backup)
        return fresh


class Ewma(RoundRobin):
    """APISIX's ewma balancer (power of two choices on decayed rtt). Implements ``base.Balancer``."""

    __slots__ = ("_rng", "shared", "times")

    def __init__(
        self,
        peers: PeerSet,
        args: tuple[str, ...] = (),
        *,
        rng: _random.Random | None = None,
        decay: float = DECAY_TIME,
        peak: bool = False,
    ) -> None:
        if args:
            raise ValueError(f'invalid parameter "{args[0]}"')  # the directive takes none
        super().__init__(peers)
        self._rng = rng if rng is not None else _random.Random()
        self.times = PerPeerTimes(peers, decay, peak)
        self.shared: UpstreamStats | None = None

    def use_statistics(self, stats: UpstreamStats) -> bool:
        """Score on the instance's shared averages (every worker's tries) from now on."""
        self.shared = stats
        return True

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
        """Feed a try that got a response (rtt: its response time) to this balancer's own
        averages; with shared statistics the tries loop records it there instead."""
        if self.shared is not None or response_time is None:
            return
        averages = self.times.of(peer)
        if averages is not None:
            averages.update(peer.id, response_time, now)

    def score(self, peer: Peer, now: float) -> float:
        """The peer's rtt average decayed to ``now`` (the statistics' clock when shared)."""
        if self.shared is not None:
            value, stamp, clock_now = self.shared.average(peer, peak=self.times.primary.peak)
            return decayed(value, stamp, clock_now, self.times.primary.decay)
        averages = self.times.of(peer)
        return averages.decayed(peer.id, now) if averages is not None else 0.0

    def _get_weighted(self, state: BalancerState, now: float) -> Peer | None:
        if state.peer_set is not self.times.peers:  # a request from before a rebuild
            return super()._get_weighted(state, now)
        peers = state.peers
        usable = usable_mask(peers, state.tried, now)
        count = usable.bit_count()
        if count == 0:
            return None
        if count == 1:
            index = usable.bit_length() - 1
        else:
            a = self._rng.randrange(count)
            b = self._rng.randrange(count - 1)
            if b >= a:
                b += 1
            index = _nth_set_bit(usable, a)
            other = _nth_set_bit(usable, b)
            if self.score(peers[index], now) > self.score(peers[other], now):
                index = other
        best = peers[index]
        state.tried |= 1 << index
        if now - best.checked > best.fail_timeout:
            best.checked = now
        return best

    def __repr__(self) -> str:
        return f"<Ewma {self.peers!r}>"


def _nth_set_bit(mask: int, n: int) -> int:
    """The position of the ``n``-th (0-based) set bit of ``mask``: the ``n``-th usable peer,
    found without building a filtered list."""
    for _ in range(n):
        mask &= mask - 1  # clear the lowest set bit
    return (mask & -mask).bit_length() - 1
