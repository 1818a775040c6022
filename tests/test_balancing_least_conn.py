"""least_conn: nginx's weighted least connections with smooth WRR among equals."""

from __future__ import annotations

import random
from collections import Counter

from scriptlb.balancing.base import BalancerState
from scriptlb.balancing.least_conn import LeastConn, usable_mask
from scriptlb.config.model import PeerAddr, UpstreamConf, UpstreamServerConf
from scriptlb.state.peers import Peer, PeerSet

PORTS = {"a": 9001, "b": 9002, "c": 9003, "d": 9004}
LETTERS = {port: letter for letter, port in PORTS.items()}


def server(letter: str, **params: object) -> UpstreamServerConf:
    addr = PeerAddr("127.0.0.1", PORTS[letter])
    return UpstreamServerConf(name=addr.name, addrs=(addr,), **params)  # type: ignore[arg-type]


def balancer(*servers: UpstreamServerConf) -> LeastConn:
    return LeastConn(PeerSet.from_conf(UpstreamConf(name="backend", servers=servers)))


def letter(peer: Peer | None) -> str:
    return "-" if peer is None else LETTERS[peer.addr.port]


def start(lc: LeastConn, now: float = 100.0) -> tuple[BalancerState, Peer | None]:
    state = lc.new_request(0)
    return state, lc.get(state, now)


def test_equal_loads_follow_smooth_wrr() -> None:
    lc = balancer(server("a", weight=5), server("b"), server("c"))
    sequence = []
    for _ in range(7):
        state, peer = start(lc)
        sequence.append(letter(peer))
        assert peer is not None
        lc.free(state, peer, False, 100.0)
    assert " ".join(sequence) == "a a b a c a a"


def test_fewest_connections_wins() -> None:
    lc = balancer(server("a"), server("b"), server("c"))
    held = [start(lc) for _ in range(3)]  # one in flight on each
    assert sorted(letter(p) for _, p in held) == ["a", "b", "c"]
    state_b, peer_b = next((s, p) for s, p in held if letter(p) == "b")
    assert peer_b is not None
    lc.free(state_b, peer_b, False, 100.0)  # b now has 0 active
    for _ in range(3):
        state, peer = start(lc)
        assert letter(peer) == "b"
        assert peer is not None
        lc.free(state, peer, False, 100.0)


def test_connections_are_compared_relative_to_weight() -> None:
    lc = balancer(server("a", weight=3), server("b", weight=1))
    held = [start(lc)[1] for _ in range(8)]  # never freed: loads stay as assigned
    counts = Counter(letter(p) for p in held)
    assert counts == {"a": 6, "b": 2}  # 3:1, conns/weight kept level


def test_sequence_with_held_connections_is_exact() -> None:
    lc = balancer(server("a", weight=2), server("b"), server("c"))
    picks = [letter(start(lc)[1]) for _ in range(8)]
    # traced by hand from nginx's rules: ties go to WRR among the tied peers only (pick 2: b, c;
    # pick 5: all three; pick 6: a, b), a single minimum takes no WRR step (picks 3, 4, 7, 8)
    assert " ".join(picks) == "a b c a c a b a"


def test_skips_tried_down_failed_and_full() -> None:
    lc = balancer(server("a"), server("b", max_conns=1), server("c"), server("d", down=True))
    _, busy = start(lc)  # a
    _, full = start(lc)  # b, now at max_conns
    assert (letter(busy), letter(full)) == ("a", "b")
    c = lc.peers.primary[2]
    c.fails, c.checked = 1, 99.0  # failed within fail_timeout (max_fails=1)
    state, peer = start(lc)
    assert letter(peer) == "a"  # b is full, c failed, d down: a despite its load
    assert peer is not None
    lc.free(state, peer, True, 100.0)
    assert lc.get(state, 100.0) is None  # retry: a tried, the rest unusable
    state, peer = start(lc, now=200.0)  # c's window is over
    assert letter(peer) == "c"


def test_retry_never_repeats_a_peer_and_uses_backup() -> None:
    lc = balancer(server("a"), server("b"), server("c", backup=True))
    state, peer = start(lc)
    seen = []
    while peer is not None:
        seen.append(letter(peer))
        lc.free(state, peer, True, 100.0)
        if not state.tries:
            break
        peer = lc.get(state, 100.0)
    assert seen == ["a", "b", "c"]


def test_shares_over_many_picks_with_random_hold_times() -> None:
    rng = random.Random(7)
    lc = balancer(server("a", weight=3), server("b", weight=2), server("c", weight=1))
    in_flight: list[tuple[BalancerState, Peer]] = []
    counts: Counter[str] = Counter()
    for _ in range(100_000):
        state, peer = start(lc)
        assert peer is not None
        counts[letter(peer)] += 1
        in_flight.append((state, peer))
        while len(in_flight) > 12 or (in_flight and rng.random() < 0.5):
            s, p = in_flight.pop(rng.randrange(len(in_flight)))
            lc.free(s, p, False, 100.0)
    total = sum(counts.values())
    # ~12 in flight over 6 weight units: whole connections make the balance approximate
    assert abs(counts["a"] / total - 3 / 6) < 0.05
    assert abs(counts["b"] / total - 2 / 6) < 0.05
    assert abs(counts["c"] / total - 1 / 6) < 0.05


def test_shares_are_exact_by_weight_when_requests_do_not_overlap() -> None:
    lc = balancer(server("a", weight=3), server("b", weight=2), server("c", weight=1))
    counts: Counter[str] = Counter()
    for _ in range(100_000):
        state, peer = start(lc)
        assert peer is not None
        counts[letter(peer)] += 1
        lc.free(state, peer, False, 100.0)
    for name, weight in (("a", 3), ("b", 2), ("c", 1)):
        assert abs(counts[name] - 100_000 * weight / 6) <= 1  # smooth WRR: exact per period of 6


def test_usable_mask_agrees_with_peer_methods() -> None:
    """usable_mask inlines Peer.is_unavailable/is_full for speed: it must never disagree."""
    rng = random.Random(9)
    lc = balancer(server("a", max_conns=2), server("b", max_fails=2), server("c", max_fails=0), server("d"))
    peers = lc.peers.primary
    for _ in range(2000):
        for peer in peers:
            peer.down = rng.random() < 0.2
            peer.conns = rng.randrange(4)
            peer.fails = rng.randrange(3)
            peer.checked = rng.choice([0.0, 95.0, 99.5])
        tried = rng.randrange(16)
        now = rng.choice([100.0, 105.0, 120.0])
        expected = 0
        for index, peer in enumerate(peers):
            if not (tried >> index & 1 or peer.is_unavailable(now) or peer.is_full()):
                expected |= 1 << index
        assert usable_mask(peers, tried, now) == expected
