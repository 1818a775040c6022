"""``least_conn``: nginx's ``ngx_http_upstream_least_conn_module.c``.

The peer with the fewest active connections relative to its weight wins: ``a`` beats ``b`` when
``a.conns * b.weight < b.conns * a.weight`` (cross-multiplied, so no division and no floats).
When several peers tie at that minimum, smooth weighted round robin chooses among them, over
*those peers only* and starting the scan at the first of them, exactly as nginx does; so equal
loads still spread by weight and repeat the RR sequences.

Everything else is round robin's: skipping tried/down/failed/full peers, the switch to the backup
list, a single peer, and ``free``'s failure accounting (``conns`` is what ``free`` decrements).
"""

from __future__ import annotations

from scriptlb.balancing.base import BalancerState
from scriptlb.balancing.round_robin import RoundRobin, smooth_wrr_among
from scriptlb.state.peers import Peer, PeerSet


class LeastConn(RoundRobin):
    """nginx's weighted least connections. Implements ``scriptlb.balancing.base.Balancer``."""

    __slots__ = ()

    def __init__(self, peers: PeerSet, args: tuple[str, ...] = ()) -> None:
        if args:
            raise ValueError(f'invalid parameter "{args[0]}"')  # the directive takes none
        super().__init__(peers)

    def _get_weighted(self, state: BalancerState, now: float) -> Peer | None:  # type: ignore[override]
        peers = state.peers
        usable = usable_mask(peers, state.tried, now)
        if not usable:
            return None
        best: Peer | None = None
        best_index = 0
        many = False
        for index, peer in enumerate(peers):
            if not usable >> index & 1:
                continue
            if best is None or peer.conns * best.weight < best.conns * peer.weight:
                best, best_index, many = peer, index, False
            elif peer.conns * best.weight == best.conns * peer.weight:
                many = True
        assert best is not None
        if many:  # smooth WRR among the usable peers as loaded as best, from best on
            ties = [
                i
                for i in range(best_index, len(peers))
                if usable >> i & 1 and peers[i].conns * best.weight == best.conns * peers[i].weight
            ]
            best, best_index = smooth_wrr_among(peers, ties)
        state.tried |= 1 << best_index
        if now - best.checked > best.fail_timeout:
            best.checked = now
        return best

    def __repr__(self) -> str:
        return f"<LeastConn {self.peers!r}>"


def usable_mask(peers: list[Peer], tried: int, now: float) -> int:
    """Bit ``i`` set when ``peers[i]`` may take this request: not tried, not down, not failed
    ``max_fails`` times within ``fail_timeout``, not at ``max_conns``.

    ``Peer.is_unavailable``/``is_full`` inlined: two method calls per peer were most of a pick's
    cost. The bitmap then serves every later pass of the pick without re-testing (or allocating).
    """
    mask = 0
    bit = 1
    for peer in peers:
        if not (
            tried & bit
            or peer.down
            or (peer.max_conns and peer.conns >= peer.max_conns)
            or (peer.max_fails and peer.fails >= peer.max_fails and now - peer.checked <= peer.fail_timeout)
        ):
            mask |= bit
        bit <<= 1
    return mask
