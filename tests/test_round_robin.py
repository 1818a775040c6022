"""Round robin: nginx's smooth WRR sequences, tries budget, passive health, backup, single peer.

Pure unit tests: the clock is the ``now`` argument, peers are built from config objects.
"""

from __future__ import annotations

from collections import Counter

import pytest

from scriptlb.balancing import RoundRobin, create_balancer
from scriptlb.config.model import PeerAddr, UpstreamConf, UpstreamServerConf
from scriptlb.peers import Peer, PeerSet

PORTS = {"a": 9001, "b": 9002, "c": 9003, "d": 9004, "e": 9005}
NAMES = {f"127.0.0.1:{port}": letter for letter, port in PORTS.items()}


def server(letter: str, **params: object) -> UpstreamServerConf:
    addr = PeerAddr("127.0.0.1", PORTS[letter])
    return UpstreamServerConf(name=addr.name, addrs=(addr,), **params)  # type: ignore[arg-type]


def balancer(*servers: UpstreamServerConf) -> RoundRobin:
    return RoundRobin(PeerSet.from_conf(UpstreamConf(name="backend", servers=servers)))


def letter(peer: Peer | None) -> str:
    return "-" if peer is None else NAMES[peer.name]


def pick(rr: RoundRobin, now: float = 100.0, failed: bool = False) -> str:
    """One whole request with one try: get then free."""
    state = rr.new_request(0)
    peer = rr.get(state, now)
    if peer is not None:
        rr.free(state, peer, failed, now)
    return letter(peer)


def picks(rr: RoundRobin, count: int, now: float = 100.0) -> str:
    return " ".join(pick(rr, now) for _ in range(count))


# --------------------------------------------------------------------------- smooth WRR


@pytest.mark.parametrize(
    ("weights", "expected"),
    [
        ({"a": 5, "b": 1, "c": 1}, "a a b a c a a a a b a c a a"),
        ({"a": 2, "b": 1}, "a b a a b a"),
        ({"a": 3, "b": 2}, "a b a b a a b a b a"),
        ({"a": 1, "b": 1, "c": 1}, "a b c a b c"),
        ({"a": 1, "b": 2}, "b a b b a b"),
    ],
)
def test_smooth_weighted_sequence(weights: dict[str, int], expected: str) -> None:
    rr = balancer(*(server(name, weight=w) for name, w in weights.items()))
    assert picks(rr, len(expected.split())) == expected


def test_shares_over_100k_picks_are_exact_per_period() -> None:
    rr = balancer(server("a", weight=3), server("b", weight=7), server("c", weight=11))
    counts = Counter(pick(rr) for _ in range(21 * 5000))
    assert counts == {"a": 3 * 5000, "b": 7 * 5000, "c": 11 * 5000}


def test_shares_with_a_down_peer_over_100k_picks() -> None:
    rr = balancer(server("a", weight=5), server("b", weight=1, down=True), server("c", weight=1))
    counts = Counter(pick(rr) for _ in range(6 * 20000))
    assert counts == {"a": 5 * 20000, "c": 20000}


def test_server_line_with_several_addresses_gives_several_peers() -> None:
    addrs = (PeerAddr("10.0.0.1", 80), PeerAddr("10.0.0.2", 80), PeerAddr("::1", 81))
    conf = UpstreamConf(
        name="u", servers=(UpstreamServerConf("name", addrs, weight=2, max_fails=3, fail_timeout=5.0),)
    )
    peer_set = PeerSet.from_conf(conf)
    assert [p.name for p in peer_set.primary] == ["10.0.0.1:80", "10.0.0.2:80", "[::1]:81"]
    assert [(p.id, p.weight, p.max_fails, p.fail_timeout) for p in peer_set.primary] == [
        (0, 2, 3, 5.0),
        (1, 2, 3, 5.0),
        (2, 2, 3, 5.0),
    ]
    assert not peer_set.single
    assert peer_set.tries == 3


def test_create_balancer_by_method_name() -> None:
    conf = UpstreamConf(name="u", servers=(server("a"), server("b")))
    rr = create_balancer(conf)
    assert isinstance(rr, RoundRobin)
    assert [p.name for p in rr.peers.primary] == ["127.0.0.1:9001", "127.0.0.1:9002"]


@pytest.mark.parametrize(
    ("kind", "args", "cls"),
    [
        ("round_robin", (), "RoundRobin"),
        ("least_conn", (), "LeastConn"),
        ("hash", ("$request_uri",), "Hash"),
        ("hash", ("$request_uri", "consistent"), "ConsistentHash"),
        ("ip_hash", (), "IpHash"),
        ("random", ("two",), "Random"),
        ("least_time", ("header",), "LeastTime"),
        ("ewma", (), "Ewma"),
    ],
)
def test_create_balancer_maps_every_method(kind: str, args: tuple[str, ...], cls: str) -> None:
    from scriptlb.config.model import BalancerMethodConf

    conf = UpstreamConf(name="u", servers=(server("a"), server("b")), method=BalancerMethodConf(kind, args))
    assert type(create_balancer(conf)).__name__ == cls


def test_create_balancer_rejects_unknown_method() -> None:
    from scriptlb.config.model import BalancerMethodConf

    conf = UpstreamConf(name="u", servers=(server("a"),), method=BalancerMethodConf(kind="magic"))
    with pytest.raises(ValueError, match='unsupported balancing method "magic"'):
        create_balancer(conf)


# --------------------------------------------------------------------------- tries budget


@pytest.mark.parametrize(
    ("servers", "cap", "tries"),
    [
        ((server("a"), server("b"), server("c")), 0, 3),
        ((server("a"), server("b"), server("c")), 2, 2),
        ((server("a"), server("b"), server("c")), 5, 3),
        ((server("a"), server("b", down=True), server("c")), 0, 2),
        ((server("a"), server("b"), server("c", backup=True)), 0, 3),
        ((server("a"), server("b"), server("c", backup=True, down=True)), 0, 2),
        ((server("a"),), 0, 1),
        ((server("a", down=True),), 0, 0),
    ],
)
def test_initial_tries(servers: tuple[UpstreamServerConf, ...], cap: int, tries: int) -> None:
    assert balancer(*servers).new_request(cap).tries == tries


def test_one_request_never_repeats_a_peer_and_ends_with_no_live() -> None:
    rr = balancer(server("a"), server("b"), server("c"))
    state = rr.new_request(0)
    trail = []
    tries = []
    for _ in range(4):
        peer = rr.get(state, 100.0)
        trail.append(letter(peer))
        if peer is None:
            break
        rr.free(state, peer, True, 100.0)
        tries.append(state.tries)
    assert trail == ["a", "b", "c", "-"]
    assert tries == [2, 1, 0]


def test_free_never_takes_tries_below_zero() -> None:
    rr = balancer(server("a"), server("b"))
    state = rr.new_request(1)
    peer = rr.get(state, 1.0)
    assert peer is not None
    rr.free(state, peer, False, 1.0)
    assert state.tries == 0
    peer = rr.get(state, 1.0)
    assert peer is not None
    rr.free(state, peer, False, 1.0)
    assert state.tries == 0


def test_conns_counted_between_get_and_free() -> None:
    rr = balancer(server("a"), server("b"))
    s1, s2 = rr.new_request(0), rr.new_request(0)
    a, b = rr.get(s1, 1.0), rr.get(s2, 1.0)
    assert a is not None and b is not None
    assert (a.conns, b.conns) == (1, 1)
    assert s1.current is a
    rr.free(s1, a, False, 1.0)
    assert (a.conns, b.conns, s1.current) == (0, 1, None)


# --------------------------------------------------------------------------- down, max_conns


def test_down_peer_is_never_chosen() -> None:
    rr = balancer(server("a"), server("b", down=True), server("c"))
    assert picks(rr, 6) == "a c a c a c"


def test_max_conns_skips_a_busy_peer_until_freed() -> None:
    rr = balancer(server("a", max_conns=1), server("b"))
    held = rr.new_request(0)
    assert letter(rr.get(held, 1.0)) == "a"
    # a is at max_conns: every other request goes to b
    assert picks(rr, 3, now=1.0) == "b b b"
    a = held.current
    assert a is not None
    rr.free(held, a, False, 1.0)
    # b's current_weight grew while a was skipped (a: 0, b: +1): b wins once more, then a
    assert picks(rr, 3, now=1.0) == "b a b"


def test_all_peers_at_max_conns_is_no_live() -> None:
    rr = balancer(server("a", max_conns=1), server("b", max_conns=1))
    s1, s2, s3 = rr.new_request(0), rr.new_request(0), rr.new_request(0)
    assert [letter(rr.get(s, 1.0)) for s in (s1, s2, s3)] == ["a", "b", "-"]


# --------------------------------------------------------------------------- max_fails windows


def test_failed_peer_is_skipped_for_fail_timeout_then_probed() -> None:
    rr = balancer(server("a", max_fails=1, fail_timeout=10.0), server("b"))
    assert pick(rr, now=100.0, failed=True) == "a"
    # disabled while now - checked <= fail_timeout (nginx's inclusive bound)
    assert [pick(rr, now=t) for t in (100.0, 105.0, 110.0)] == ["b", "b", "b"]
    # the window is over: a is eligible again, but its failure left current_weight at -1 and
    # effective_weight at 0 (1 - 1 // 1), so it needs two rounds before it wins again
    assert [pick(rr, now=t) for t in (110.5, 111.0, 112.0, 113.0)] == ["b", "b", "a", "b"]


def test_disabled_warning_only_when_max_fails_reached() -> None:
    rr = balancer(server("a", max_fails=3, fail_timeout=10.0), server("b", max_fails=3))
    warnings = []
    a = rr.peers.primary[0]
    for t in (1.0, 2.0, 3.0):
        state = rr.new_request(0)
        state.tried = 0b10  # steer the request to a: b already tried
        peer = rr.get(state, t)
        assert peer is a
        warnings.append(rr.free(state, a, True, t))
    assert warnings == [False, False, True]
    assert (a.fails, a.accessed, a.checked) == (3, 3.0, 3.0)
    assert picks(rr, 3, now=4.0) == "b b b"


def test_max_fails_zero_disables_accounting() -> None:
    rr = balancer(server("a", max_fails=0), server("b"))
    a = rr.peers.primary[0]
    state = rr.new_request(0)
    assert rr.get(state, 1.0) is a
    assert rr.free(state, a, True, 1.0) is False
    assert (a.fails, a.effective_weight) == (1, 1)
    assert picks(rr, 4, now=1.0) == "b a b a"


def test_success_inside_the_window_does_not_clear_fails() -> None:
    rr = balancer(server("a", max_fails=2, fail_timeout=10.0), server("b", max_fails=2))
    a = rr.peers.primary[0]
    assert pick(rr, now=100.0, failed=True) == "a"
    assert a.fails == 1
    assert pick(rr, now=101.0) == "b"
    assert pick(rr, now=102.0) == "a"  # a success, but checked was not refreshed: fails stay
    assert a.fails == 1
    assert pick(rr, now=103.0) == "b"
    assert pick(rr, now=104.0, failed=True) == "a"
    assert a.fails == 2  # accumulated across the success: disabled now
    assert picks(rr, 3, now=105.0) == "b b b"


def test_success_after_the_window_clears_fails() -> None:
    rr = balancer(server("a", max_fails=2, fail_timeout=10.0), server("b", max_fails=2))
    a = rr.peers.primary[0]
    assert pick(rr, now=100.0, failed=True) == "a"
    assert pick(rr, now=101.0) == "b"
    # more than fail_timeout after the last check: the selection refreshes checked
    assert pick(rr, now=111.0) == "a"
    assert (a.fails, a.checked, a.accessed) == (0, 111.0, 100.0)


def test_probe_failure_after_window_disables_again_immediately() -> None:
    rr = balancer(server("a", max_fails=1, fail_timeout=10.0), server("b", max_fails=1))
    assert pick(rr, now=100.0, failed=True) == "a"
    assert pick(rr, now=111.0, failed=True) == "b"
    assert pick(rr, now=111.5, failed=True) == "a"  # b failed; a's window (since 100) is over
    # both disabled now, no backup: no live upstreams until a window ends
    assert pick(rr, now=112.0) == "-"
    assert pick(rr, now=121.5) == "b"


def test_effective_weight_drops_on_failure_and_recovers_one_per_round() -> None:
    rr = balancer(server("a", weight=10, max_fails=2, fail_timeout=10.0), server("b", weight=1))
    a, b = rr.peers.primary
    state = rr.new_request(0)
    assert rr.get(state, 1.0) is a
    rr.free(state, a, True, 1.0)
    assert a.effective_weight == 5  # 10 - 10 // 2
    effective = []
    for _ in range(6):
        state = rr.new_request(0)
        peer = rr.get(state, 2.0)
        assert peer is not None
        rr.free(state, peer, False, 2.0)
        effective.append(a.effective_weight)
    assert effective == [6, 7, 8, 9, 10, 10]
    assert b.effective_weight == 1


def test_effective_weight_floor_is_zero() -> None:
    rr = balancer(server("a", weight=3, max_fails=1, fail_timeout=0.0), server("b"))
    a = rr.peers.primary[0]
    for t in (1.0, 2.0):
        state = rr.new_request(0)
        state.tried = 0b10
        assert rr.get(state, t) is a
        rr.free(state, a, True, t)
    assert a.effective_weight == 0


# --------------------------------------------------------------------------- backup


def test_backup_used_only_when_no_primary_is_usable() -> None:
    rr = balancer(server("a"), server("b", down=True), server("c", backup=True), server("d", backup=True))
    assert picks(rr, 3) == "a a a"
    rr.peers.primary[0].down = True
    assert picks(rr, 4) == "c d c d"


def test_request_switches_to_backup_with_a_fresh_tried_map() -> None:
    rr = balancer(server("a"), server("b"), server("c", backup=True), server("d", backup=True))
    state = rr.new_request(0)
    assert state.tries == 4
    trail = []
    while True:
        peer = rr.get(state, 1.0)
        trail.append(letter(peer))
        if peer is None:
            break
        rr.free(state, peer, True, 1.0)
    assert trail == ["a", "b", "c", "d", "-"]
    assert state.on_backup and state.tries == 0
    # all four failed (max_fails=1): the next request finds no live upstream at all
    assert pick(rr, now=2.0) == "-"


def test_backup_state_is_per_request() -> None:
    rr = balancer(server("a", max_fails=1), server("c", backup=True))
    assert pick(rr, now=1.0, failed=True) == "a"
    assert pick(rr, now=2.0) == "c"
    assert pick(rr, now=12.0) == "a"  # the primary's window ended: back on the primary list


# --------------------------------------------------------------------------- single peer


def test_single_peer_ignores_max_fails_and_is_never_retried() -> None:
    rr = balancer(server("a", max_fails=1, fail_timeout=10.0))
    assert rr.peers.single
    state = rr.new_request(0)
    a = rr.get(state, 1.0)
    assert a is not None
    assert rr.free(state, a, True, 1.0) is False
    assert (state.tries, a.fails, a.conns) == (0, 0, 0)
    assert picks(rr, 2, now=1.5) == "a a"


def test_single_peer_down_or_full_is_no_live() -> None:
    rr = balancer(server("a", max_conns=1))
    held = rr.new_request(0)
    assert letter(rr.get(held, 1.0)) == "a"
    assert pick(rr, now=1.0) == "-"
    assert letter(rr.get(rr.new_request(0), 1.0)) == "-"
    down = balancer(server("a", down=True))
    assert pick(down) == "-"


def test_one_primary_with_a_backup_is_not_single() -> None:
    rr = balancer(server("a", max_fails=1), server("b", backup=True))
    assert not rr.peers.single
    state = rr.new_request(0)
    a = rr.get(state, 1.0)
    assert a is not None
    assert rr.free(state, a, True, 1.0) is True
    assert state.tries == 1
    assert letter(rr.get(state, 1.0)) == "b"


# --------------------------------------------------------------------------- rebuild


def test_rebuild_keeps_requests_in_flight_on_their_peer_set() -> None:
    rr = balancer(server("a"), server("b"))
    old_state = rr.new_request(0)
    old_peer = rr.get(old_state, 1.0)
    rr.rebuild(PeerSet.from_conf(UpstreamConf(name="backend", servers=(server("c"), server("d")))))
    assert old_state.peer_set is not rr.peers
    assert letter(rr.get(old_state, 1.0)) == "b"
    assert old_peer is not None
    rr.free(old_state, old_peer, False, 1.0)
    assert picks(rr, 2) == "c d"
