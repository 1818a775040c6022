"""``random [two [least_conn]]``: nginx's ``ngx_http_upstream_random_module.c``.

``random``: a peer is drawn with probability proportional to its weight (``x = rand % total``
looked up in the cumulative weight ranges by binary search); an unusable peer (tried, down,
failed, full) costs one of 20 attempts, then the request falls back to round robin.

``random two [least_conn]``: two distinct usable peers are drawn that way and the one with
fewer connections relative to weight wins (``b.conns * a.weight > a.conns * b.weight`` keeps
the first drawn ``a``; a tie keeps the second, ``b``, exactly as nginx; so even idle peers are
not chosen in proportion to weight, see the share test). ``least_conn`` is nginx's only (and
default) method for the second step. The 20-attempt budget counts draws of the same or an
unusable peer, and the first good draw too.

Randomness comes from the injected ``random.Random`` (``rng``), so sequences are testable.
"""

from __future__ import annotations

import bisect
import random as _random

from scriptlb.balancing.base import BalancerState, initial_tries
from scriptlb.balancing.round_robin import RoundRobin
from scriptlb.state.peers import Peer, PeerSet

DRAW_ATTEMPTS = 20


class RandomState(BalancerState):
    __slots__ = ("draws",)

    def __init__(self, peer_set: PeerSet, tries: int) -> None:
        super().__init__(peer_set, tries)
        self.draws = 0  # failed draws so far (nginx's rp->tries)


class Random(RoundRobin):
    """nginx's ``random`` / ``random two``. Implements ``base.Balancer``."""

    __slots__ = ("_range_starts", "_rng", "total_weight", "two")

    def __init__(
        self, peers: PeerSet, args: tuple[str, ...] = (), *, rng: _random.Random | None = None
    ) -> None:
        super().__init__(peers)
        if args not in ((), ("two",), ("two", "least_conn")):
            raise ValueError(f'invalid parameter "{" ".join(args)}"')
        self.two = bool(args)
        self._rng = rng if rng is not None else _random.Random()
        self._range_starts, self.total_weight = _ranges(peers.primary)

    def rebuild(self, peers: PeerSet) -> None:
        super().rebuild(peers)
        self._range_starts, self.total_weight = _ranges(peers.primary)

    def new_request(self, tries_cap: int, key: object = None) -> RandomState:  # type: ignore[override]
        return RandomState(self.peers, initial_tries(self.peers, tries_cap))

    def get(self, state: BalancerState, now: float) -> Peer | None:
        assert isinstance(state, RandomState)
        peers = state.peer_set.primary
        if (
            state.draws > DRAW_ATTEMPTS
            or len(peers) < 2
            or state.on_backup
            or state.peer_set is not self.peers
        ):
            return super().get(state, now)
        found = self._draw_two(state, peers, now) if self.two else self._draw_one(state, peers, now)
        if found is None:
            return super().get(state, now)
        index, peer = found
        state.tried |= 1 << index
        state.current = peer
        peer.conns += 1
        if now - peer.checked > peer.fail_timeout:
            peer.checked = now
        return peer

    def _peek(self) -> int:
        """A peer index drawn with probability weight / total_weight."""
        x = self._rng.randrange(self.total_weight)
        return bisect.bisect_right(self._range_starts, x) - 1

    def _draw_one(self, state: RandomState, peers: list[Peer], now: float) -> tuple[int, Peer] | None:
        while True:
            index = self._peek()
            peer = peers[index]
            if not (state.tried >> index & 1 or peer.is_unavailable(now) or peer.is_full()):
                return index, peer
            state.draws += 1
            if state.draws > DRAW_ATTEMPTS:
                return None

    def _draw_two(self, state: RandomState, peers: list[Peer], now: float) -> tuple[int, Peer] | None:
        first: Peer | None = None
        first_index = 0
        while True:
            index = self._peek()
            peer = peers[index]
            usable = peer is not first and not (
                state.tried >> index & 1 or peer.is_unavailable(now) or peer.is_full()
            )
            if usable:
                if first is not None:
                    if peer.conns * first.weight > first.conns * peer.weight:
                        return first_index, first
                    return index, peer
                first, first_index = peer, index
            state.draws += 1  # nginx counts the first good draw too ("prev = peer; ... next:")
            if state.draws > DRAW_ATTEMPTS:
                return None

    def __repr__(self) -> str:
        return f"<Random{' two' if self.two else ''} {self.peers!r}>"


def _ranges(peers: list[Peer]) -> tuple[list[int], int]:
    """Cumulative weight starts: peer i owns [starts[i], starts[i] + weight)."""
    starts: list[int] = []
    total = 0
    for peer in peers:
        starts.append(total)
        total += peer.weight
    return starts, total
