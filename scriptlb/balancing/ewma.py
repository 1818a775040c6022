"""``ewma``: APISIX's ``balancer/ewma.lua`` (after Finagle's PeakEwma), per worker.

Theory of operation
-------------------
Each peer has an exponentially weighted moving average of its round-trip time, decayed by
*time* rather than by sample count::

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

The rtt fed by ``observe`` is APISIX's ``upstream_connect_time + upstream_response_time``.
APISIX's file, despite the PeakEwma lineage, has no "peak" clamp; ``peak=True`` adds Finagle's
(a sample above the average replaces it at once, so a sudden slowdown is seen immediately).

State is per worker (APISIX keeps it in a shared dict; here the live peer statistics of issue 5
part 3 are the cross-worker view). Clock and RNG are injected: ``now`` arguments and ``rng``.
"""

from __future__ import annotations

import math
import random as _random

from scriptlb.balancing.base import BalancerState
from scriptlb.balancing.least_conn import usable_mask
from scriptlb.balancing.round_robin import RoundRobin
from scriptlb.state.peers import Peer, PeerSet

DECAY_TIME = 10.0  # seconds, APISIX's DECAY_TIME
_NEVER = -math.inf  # "last update" of a peer never measured: its first sample is taken whole


class DecayingAverages:
    """Time-decayed moving averages for the peers of one list, indexed by ``Peer.id``."""

    __slots__ = ("decay", "peak", "stamps", "values")

    def __init__(self, count: int, decay: float = DECAY_TIME, peak: bool = False) -> None:
        self.decay = decay
        self.peak = peak
        self.values = [0.0] * count
        self.stamps = [_NEVER] * count

    def update(self, index: int, sample: float, now: float) -> float:
        value = self.values[index]
        if self.peak and sample > value:
            value = sample
        else:
            weight = math.exp(-max(now - self.stamps[index], 0.0) / self.decay)
            value = value * weight + sample * (1.0 - weight)
        self.values[index] = value
        self.stamps[index] = now
        return value

    def decayed(self, index: int, now: float) -> float:
        """The average decayed towards 0 since its last sample (APISIX's ``score``)."""
        value = self.values[index]
        if not value:
            return 0.0
        return value * math.exp(-max(now - self.stamps[index], 0.0) / self.decay)

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

    __slots__ = ("_rng", "times")

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
        """Feed a try that got a response: rtt = connect time + response time (APISIX)."""
        averages = self.times.of(peer)
        if averages is not None:
            averages.update(peer.id, (connect_time or 0.0) + (response_time or 0.0), now)

    def score(self, peer: Peer, now: float) -> float:
        averages = self.times.of(peer)
        return averages.decayed(peer.id, now) if averages is not None else 0.0

    def _get_weighted(self, state: BalancerState, now: float) -> Peer | None:  # type: ignore[override]
        if state.peer_set is not self.times.peers:  # a request from before a rebuild
            return RoundRobin._get_weighted(state, now)
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
            averages = self.times.backup if state.on_backup else self.times.primary
            if averages.decayed(index, now) > averages.decayed(other, now):
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
