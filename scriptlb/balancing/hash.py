"""``hash KEY [consistent]``: nginx's ``ngx_http_upstream_hash_module.c``, bit for bit.

Plain hash (Cache::Memcached compatible)
    Each attempt hashes ``[REHASH] KEY`` with CRC32, keeps bits 16..30
    (``(crc >> 16) & 0x7fff``), adds that to a running sum, and walks the primary peers in
    declaration order subtracting weights from ``sum % total_weight``. REHASH is the attempt
    number as decimal text, omitted on the first attempt. A peer that is tried, down, failed or
    full costs one of 20 attempts; after 20 (or with fewer than two peers, or an empty key) the
    request falls back to round robin, keeping its tried bitmap.

Consistent hash (ketama, Cache::Memcached::Fast compatible)
    Every peer puts ``160 * weight`` points on a ring: point ``j`` is
    ``crc32(HOST "\\0" PORT prev)`` where ``prev`` is point ``j-1`` as 4 little-endian bytes
    (zero for the first), and HOST/PORT come from the ``server`` line *as written* (a trailing
    ``:digits`` is the port; ``unix:PATH`` has no port). Points are sorted and de-duplicated
    (the first of equal hashes wins). A request starts at the first point ``>= crc32(KEY)``
    (wrapping) and takes that point's server; when no usable peer has that server name it moves
    to the next point, and after 20 misses falls back to round robin. Several addresses of one
    server line share its points and are balanced among themselves by smooth WRR.

Because the ring is built from the names exactly as nginx builds it, the same key maps to the
same server as nginx's ``hash $key consistent`` for the same ``server`` list (tested against a
real nginx in tests/test_balancing_hash.py).

The key is evaluated per request by the caller (a ``$variable`` template) and handed to
``new_request(tries_cap, key)``.
"""

from __future__ import annotations

import bisect
import struct
import zlib
from collections.abc import Iterable

from scriptlb.balancing.base import BalancerState, initial_tries
from scriptlb.balancing.round_robin import RoundRobin
from scriptlb.state.peers import Peer, PeerSet

HASH_ATTEMPTS = 20  # nginx: "tries > 20" falls back to round robin
POINTS_PER_WEIGHT = 160
_PREV = struct.Struct("<I")


def _key_bytes(key: str | bytes | None) -> bytes:
    if key is None:
        return b""
    return key.encode() if isinstance(key, str) else key


class HashState(BalancerState):
    """Per-request data of both hash flavours (nginx's ``ngx_http_upstream_hash_peer_data_t``)."""

    __slots__ = ("hash", "hash_tries", "key", "rehash")

    def __init__(self, peer_set: PeerSet, tries: int, key: bytes) -> None:
        super().__init__(peer_set, tries)
        self.key = key
        self.hash = 0  # plain: the running sum; consistent: the index of the current ring point
        self.rehash = 0
        self.hash_tries = 0  # attempts that hit an unusable peer (nginx's hp->tries)


class Hash(RoundRobin):
    """``hash KEY``: nginx's plain (modulo) hash. Implements ``base.Balancer``."""

    __slots__ = ("total_weight",)

    key_kind = "template"  # the caller evaluates ``args[0]`` per request and passes it as key

    def __init__(self, peers: PeerSet, args: tuple[str, ...] = ()) -> None:
        super().__init__(peers)
        self.total_weight = sum(peer.weight for peer in peers.primary)

    def rebuild(self, peers: PeerSet) -> None:
        super().rebuild(peers)
        self.total_weight = sum(peer.weight for peer in peers.primary)

    def new_request(self, tries_cap: int, key: str | bytes | None = None) -> HashState:  # type: ignore[override]
        return HashState(self.peers, initial_tries(self.peers, tries_cap), _key_bytes(key))

    def get(self, state: BalancerState, now: float) -> Peer | None:
        assert isinstance(state, HashState)
        peers = state.peer_set.primary
        if state.hash_tries > HASH_ATTEMPTS or len(peers) < 2 or not state.key or state.on_backup:
            return super().get(state, now)
        total_weight = self.total_weight if state.peer_set is self.peers else _total_weight(peers)
        while True:
            index, peer = self._next_candidate(state, peers, total_weight)
            if not (state.tried >> index & 1 or peer.is_unavailable(now) or peer.is_full()):
                break
            state.hash_tries += 1
            if state.hash_tries > HASH_ATTEMPTS:
                return super().get(state, now)
        return _take(state, peer, index, now)

    @staticmethod
    def _next_candidate(state: HashState, peers: list[Peer], total_weight: int) -> tuple[int, Peer]:
        if state.rehash:
            crc = zlib.crc32(state.key, zlib.crc32(str(state.rehash).encode()))
        else:
            crc = zlib.crc32(state.key)
        state.hash += (crc >> 16) & 0x7FFF
        state.rehash += 1
        w = state.hash % total_weight
        index = 0
        peer = peers[0]
        while w >= peer.weight:
            w -= peer.weight
            index += 1
            peer = peers[index]
        return index, peer

    def __repr__(self) -> str:
        return f"<Hash {self.peers!r}>"


class ConsistentHash(RoundRobin):
    """``hash KEY consistent``: nginx's ketama ring. Implements ``base.Balancer``."""

    __slots__ = ("_point_hashes", "_point_servers")

    key_kind = "template"

    def __init__(self, peers: PeerSet, args: tuple[str, ...] = ()) -> None:
        super().__init__(peers)
        self._point_hashes, self._point_servers = ketama_points(peers.primary)

    def rebuild(self, peers: PeerSet) -> None:
        super().rebuild(peers)
        self._point_hashes, self._point_servers = ketama_points(peers.primary)

    def weights_changed(self) -> None:
        """The ring keeps the weights it was built with. Rebuilding it costs 160 points per unit
        of weight (hundreds of ms for a few peers at weight 100) and would let a hook stall the
        worker at will; it would also remap keys, which is what consistent hashing avoids. The
        round robin it falls back to reads the new weights live."""

    def new_request(self, tries_cap: int, key: str | bytes | None = None) -> HashState:  # type: ignore[override]
        state = HashState(self.peers, initial_tries(self.peers, tries_cap), _key_bytes(key))
        if self._point_hashes:
            state.hash = bisect.bisect_left(self._point_hashes, zlib.crc32(state.key))
        return state

    def get(self, state: BalancerState, now: float) -> Peer | None:
        assert isinstance(state, HashState)
        peer_set = state.peer_set
        if state.hash_tries > HASH_ATTEMPTS or peer_set.single or not state.key or state.on_backup:
            return super().get(state, now)
        if peer_set is not self.peers:  # the upstream was rebuilt while this request was running
            return super().get(state, now)
        if not peer_set.primary:
            return None
        servers = self._point_servers
        while True:
            server = servers[state.hash % len(servers)]
            found = self._best_of_server(state, server, now)
            if found is not None:
                return _take(state, found[1], found[0], now)
            state.hash += 1
            state.hash_tries += 1
            if state.hash_tries > HASH_ATTEMPTS:
                return super().get(state, now)

    @staticmethod
    def _best_of_server(state: HashState, server: str, now: float) -> tuple[int, Peer] | None:
        """Smooth WRR among the usable addresses of one server line (usually exactly one)."""
        best: Peer | None = None
        best_index = 0
        total = 0
        tried = state.tried
        for index, peer in enumerate(state.peer_set.primary):
            if tried >> index & 1 or peer.server != server:
                continue
            if peer.is_unavailable(now) or peer.is_full():
                continue
            peer.current_weight += peer.effective_weight
            total += peer.effective_weight
            if peer.effective_weight < peer.weight:
                peer.effective_weight += 1
            if best is None or peer.current_weight > best.current_weight:
                best, best_index = peer, index
        if best is None:
            return None
        best.current_weight -= total
        return best_index, best

    def server_for(self, key: str | bytes) -> str | None:
        """The server line a key maps to when every peer is usable (diagnostics and tests)."""
        if not self._point_hashes:
            return None
        index = bisect.bisect_left(self._point_hashes, zlib.crc32(_key_bytes(key)))
        return self._point_servers[index % len(self._point_servers)]

    def __repr__(self) -> str:
        return f"<ConsistentHash {self.peers!r} points={len(self._point_hashes)}>"


def ketama_points(peers: list[Peer]) -> tuple[list[int], list[str]]:
    """nginx's ring for a peer list: sorted unique point hashes and, in parallel, server names."""
    return ketama_ring((peer.server, peer.weight) for peer in peers)


def ketama_ring(servers: Iterable[tuple[str, int]]) -> tuple[list[int], list[str]]:
    """The ring of ``(name, weight)`` entries, built exactly as nginx builds it from ``server``
    lines: ``160 * weight`` CRC32 points per entry, sorted, equal hashes reduced to the first."""
    points: list[tuple[int, int, str]] = []
    for order, (server, weight) in enumerate(servers):
        base = server_hash_prefix(server)
        prev = 0
        for _ in range(POINTS_PER_WEIGHT * weight):
            prev = zlib.crc32(_PREV.pack(prev), base)
            # order keeps nginx's qsort + "keep the first of equal hashes" deterministic; nginx's
            # qsort is not stable, but equal 32-bit points are vanishingly rare
            points.append((prev, order, server))
    points.sort()
    hashes: list[int] = []
    names: list[str] = []
    for point_hash, _, server in points:
        if hashes and hashes[-1] == point_hash:
            continue
        hashes.append(point_hash)
        names.append(server)
    return hashes, names


def server_hash_prefix(server: str) -> int:
    """CRC32 state after ``HOST "\\0" PORT``, split as nginx does (a trailing ``:digits`` is the
    port; ``unix:`` paths have none; a name without a port has none)."""
    raw = server.encode()
    if raw[:5].lower() == b"unix:":
        host, port = raw[5:], b""
    else:
        head, sep, tail = raw.rpartition(b":")
        if sep and (not tail or tail.isdigit()):
            host, port = head, tail
        else:
            host, port = raw, b""
    return zlib.crc32(port, zlib.crc32(b"\0", zlib.crc32(host)))


def _total_weight(peers: list[Peer]) -> int:
    return sum(peer.weight for peer in peers)


def _take(state: BalancerState, peer: Peer, index: int, now: float) -> Peer:
    """What nginx does with a hash-chosen peer: mark tried, count the connection, and reopen
    the fail_timeout window if it has passed."""
    state.tried |= 1 << index
    state.current = peer
    peer.conns += 1
    if now - peer.checked > peer.fail_timeout:
        peer.checked = now
    return peer
