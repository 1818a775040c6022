"""``ip_hash``: nginx's ``ngx_http_upstream_ip_hash_module.c``.

The hash starts at 89 and folds in the first three octets of an IPv4 client address (so a /24
sticks to one server) or all sixteen bytes of an IPv6 one: ``hash = (hash * 113 + byte) % 6271``.
``hash % total_weight`` walks the primary peers by weight. An unusable peer (tried, down, failed,
full) folds the same bytes in again from the current hash; after 20 such attempts, or with fewer
than two peers, the request falls back to round robin. The final hash is kept for the request,
so a retry continues the sequence, as nginx does. Non-IP clients (unix sockets) hash three zero
bytes, like nginx's pseudo address.

The caller passes the client address (``$remote_addr``) to ``new_request(tries_cap, key)``.
"""

from __future__ import annotations

import ipaddress

from scriptlb.balancing.base import BalancerState, initial_tries
from scriptlb.balancing.round_robin import RoundRobin
from scriptlb.state.peers import Peer, PeerSet

HASH_ATTEMPTS = 20
_PSEUDO_ADDR = b"\0\0\0"


class IpHashState(BalancerState):
    __slots__ = ("addr", "hash", "hash_tries")

    def __init__(self, peer_set: PeerSet, tries: int, addr: bytes) -> None:
        super().__init__(peer_set, tries)
        self.addr = addr  # the bytes that are hashed: 3 (IPv4) or 16 (IPv6)
        self.hash = 89
        self.hash_tries = 0


def hashed_bytes(remote_addr: str | None) -> bytes:
    """The part of the client address nginx hashes."""
    if not remote_addr:
        return _PSEUDO_ADDR
    parts = remote_addr.split(".")
    if len(parts) == 4:  # the common case without building an ipaddress object
        try:
            return bytes(int(part) for part in parts[:3])
        except ValueError:
            return _PSEUDO_ADDR
    try:
        ip = ipaddress.ip_address(remote_addr)
    except ValueError:
        return _PSEUDO_ADDR  # "unix:" and the like
    if isinstance(ip, ipaddress.IPv4Address):
        return ip.packed[:3]
    return ip.packed


class IpHash(RoundRobin):
    """nginx's ``ip_hash``. Implements ``base.Balancer``."""

    __slots__ = ("total_weight",)

    key_kind = "remote_addr"  # the caller passes $remote_addr as the key

    def __init__(self, peers: PeerSet, args: tuple[str, ...] = ()) -> None:
        if args:
            raise ValueError(f'invalid parameter "{args[0]}"')  # the directive takes none
        super().__init__(peers)
        self.total_weight = sum(peer.weight for peer in peers.primary)

    def rebuild(self, peers: PeerSet) -> None:
        super().rebuild(peers)
        self.total_weight = sum(peer.weight for peer in peers.primary)

    def new_request(self, tries_cap: int, key: str | None = None) -> IpHashState:  # type: ignore[override]
        return IpHashState(self.peers, initial_tries(self.peers, tries_cap), hashed_bytes(key))

    def get(self, state: BalancerState, now: float) -> Peer | None:
        assert isinstance(state, IpHashState)
        peers = state.peer_set.primary
        if state.hash_tries > HASH_ATTEMPTS or len(peers) < 2 or state.on_backup:
            return super().get(state, now)
        total_weight = self.total_weight if state.peer_set is self.peers else sum(p.weight for p in peers)
        hash_value = state.hash
        while True:
            for byte in state.addr:
                hash_value = (hash_value * 113 + byte) % 6271
            w = hash_value % total_weight
            index = 0
            peer = peers[0]
            while w >= peer.weight:
                w -= peer.weight
                index += 1
                peer = peers[index]
            if not (state.tried >> index & 1 or peer.is_unavailable(now) or peer.is_full()):
                break
            state.hash_tries += 1
            if state.hash_tries > HASH_ATTEMPTS:
                return super().get(state, now)
        state.hash = hash_value
        state.tried |= 1 << index
        state.current = peer
        peer.conns += 1
        if now - peer.checked > peer.fail_timeout:
            peer.checked = now
        return peer

    def __repr__(self) -> str:
        return f"<IpHash {self.peers!r}>"
