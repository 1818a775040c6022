"""Smooth weighted round robin with passive health checks: nginx's
``ngx_http_upstream_round_robin.c`` (get/free), statement for statement where it matters.

Theory of operation
-------------------
Every selection adds each eligible peer's ``effective_weight`` to its ``current_weight`` and
picks the highest (ties: declaration order), then subtracts the round's total from the winner.
Over ``sum(weights)`` selections each peer is chosen ``weight`` times, interleaved smoothly
(5:1:1 gives ``a a b a c a a``).

A peer is skipped when it is ``down``, already tried by this request, at ``max_conns``, or has
``fails >= max_fails`` while ``now - checked <= fail_timeout``. A failure (``free`` with
``failed=True``) bumps ``fails``, stamps ``accessed``/``checked`` and lowers ``effective_weight``
by ``weight // max_fails``; each later selection round gives one point back. A success clears
``fails`` only when a selection after the window (which refreshes ``checked``) proved the peer
again, so failures inside one window accumulate even across successes.

When the primary list has nothing eligible, the request switches to the backup list once, with
a fresh tried bitmap; when that has nothing either, ``get`` returns ``None`` (no live upstreams).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from scriptlb.balancing.base import BalancerState
from scriptlb.state.peers import Peer, PeerSet

if TYPE_CHECKING:
    from scriptlb.state.stats import UpstreamStats


_new_state = object.__new__


class RoundRobin:
    """nginx's default balancing method. Implements ``scriptlb.balancing.base.Balancer``."""

    __slots__ = ("peers",)

    def __init__(self, peers: PeerSet) -> None:
        self.peers = peers

    def rebuild(self, peers: PeerSet) -> None:
        self.peers = peers

    def weights_changed(self) -> None:
        """Methods caching weights (hash's total, random's ranges) recompute them; round robin
        reads them live. O(peers) for all of them."""
        self.rebuild(self.peers)

    def new_request(self, tries_cap: int, key: str | bytes | None = None) -> BalancerState:
        # (no key: not hashed; initial_tries and BalancerState's constructor inlined, once
        # per request: a class's Python __init__ costs more than its stores)
        peers = self.peers
        tries = peers.tries
        state = _new_state(BalancerState)
        state.peer_set = peers
        state.tries = tries_cap if tries_cap and tries > tries_cap else tries
        if peers.only is None:
            state.tried = 0
            state.on_backup = False
            state.current = None
        # (else nginx's single peer: nothing to choose, so nothing to remember but the tries
        # budget; get and free read no more of the state then)
        return state

    # ------------------------------------------------------------------ get

    def get(self, state: BalancerState, now: float) -> Peer | None:
        peer_set = state.peer_set
        single = peer_set.only
        if single is not None:
            # A single peer ignores max_fails: there is nothing else to send the request to
            # (nor a backup: a single peer has none).
            # (the tries loop takes a usable single peer itself, without a call: keep both alike)
            if single.down or (single.max_conns and single.conns >= single.max_conns):
                return None  # (Peer.is_full, inlined)
            single.conns += 1
            return single
        peer = self._get_weighted(state, now)
        if peer is None:
            if state.on_backup or not peer_set.backup:
                return None
            # nginx's "backup servers": the same request now chooses among backups only
            state.on_backup = True
            state.tried = 0
            peer = self._get_weighted(state, now)
            if peer is None:
                return None
        state.current = peer
        peer.conns += 1
        return peer

    def _get_weighted(self, state: BalancerState, now: float) -> Peer | None:
        tried = state.tried
        best: Peer | None = None
        best_index = 0
        best_weight = 0  # (best's current_weight: it does not change during the loop)
        total = 0
        peer_set = state.peer_set  # (state.peers, inlined: this runs for every request)
        for index, peer in enumerate(peer_set.backup if state.on_backup else peer_set.primary):
            # Peer.is_unavailable/is_full inlined: this loop runs for every peer of every request
            if tried >> index & 1 or peer.down:
                continue
            # (fails first: 0 for a healthy peer, which ends the test at once)
            if (peer.fails and peer.max_fails and peer.fails >= peer.max_fails
                    and now - peer.checked <= peer.fail_timeout):
                continue
            if peer.max_conns and peer.conns >= peer.max_conns:
                continue
            effective = peer.effective_weight
            peer.current_weight = current = peer.current_weight + effective
            total += effective
            if effective < peer.weight:
                peer.effective_weight = effective + 1  # recovery after failures: one point per round
            if best is None or current > best_weight:
                best = peer
                best_index = index
                best_weight = current
        if best is None:
            return None
        state.tried = tried | 1 << best_index
        best.current_weight -= total
        if now - best.checked > best.fail_timeout:
            best.checked = now  # a selection after the window: a success now clears fails
        return best

    # ------------------------------------------------------------------ free

    def free(self, state: BalancerState, peer: Peer, failed: bool, now: float) -> bool:
        if state.peer_set.single:
            # nginx: no failure accounting for a single peer, and never a retry on it
            peer.conns -= 1
            state.tries = 0
            return False
        state.current = None
        disabled = False
        if failed:
            disabled = self._account_failure(peer, now)
        elif peer.accessed < peer.checked:
            peer.fails = 0  # the peer was chosen again after its window and succeeded
        peer.conns -= 1
        if state.tries:
            state.tries -= 1
        return disabled

    def observe(
        self,
        peer: Peer,
        connect_time: float | None,
        header_time: float | None,
        response_time: float | None,
        now: float,
    ) -> None:
        """Round robin does not learn from latency (ewma and least_time override this)."""

    def use_statistics(self, stats: UpstreamStats) -> bool:
        """Read latency from the upstream's live statistics (every worker's tries) instead of
        learning from ``observe``? True for the methods that do (ewma, least_time)."""
        return False

    @staticmethod
    def _account_failure(peer: Peer, now: float) -> bool:
        peer.fails += 1
        peer.accessed = now
        peer.checked = now
        disabled = False
        if peer.max_fails:
            peer.effective_weight -= peer.weight // peer.max_fails
            disabled = peer.fails >= peer.max_fails
        if peer.effective_weight < 0:
            peer.effective_weight = 0
        return disabled

    def __repr__(self) -> str:
        return f"<RoundRobin {self.peers!r}>"


def smooth_wrr_among(peers: list[Peer], indices: list[int]) -> tuple[Peer, int]:
    """One smooth weighted round robin step over ``peers[i]`` for ``i`` in ``indices`` (not
    empty): how least_conn and least_time break a tie among equally loaded peers (nginx)."""
    best_index = indices[0]
    best = peers[best_index]
    total = 0
    for index in indices:
        peer = peers[index]
        peer.current_weight += peer.effective_weight
        total += peer.effective_weight
        if peer.effective_weight < peer.weight:
            peer.effective_weight += 1
        if peer.current_weight > best.current_weight:
            best, best_index = peer, index
    best.current_weight -= total
    return best, best_index
