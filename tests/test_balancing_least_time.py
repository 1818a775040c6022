"""least_time header|last_byte: lowest average time x (active + 1) / weight, WRR among equals."""

from __future__ import annotations

from collections import Counter

import pytest

from scriptlb.balancing.base import BalancerState
from scriptlb.balancing.least_time import LeastTime
from scriptlb.config.model import PeerAddr, UpstreamConf, UpstreamServerConf
from scriptlb.state.peers import Peer, PeerSet

PORTS = {"a": 9001, "b": 9002, "c": 9003}
LETTERS = {port: letter for letter, port in PORTS.items()}


def peers(**weights: int) -> PeerSet:
    servers = tuple(
        UpstreamServerConf(name=f"127.0.0.1:{PORTS[n]}", addrs=(PeerAddr("127.0.0.1", PORTS[n]),), weight=w)
        for n, w in weights.items()
    )
    return PeerSet.from_conf(UpstreamConf(name="backend", servers=servers))


def letter(peer: Peer | None) -> str:
    return "-" if peer is None else LETTERS[peer.addr.port]


def named(balancer: LeastTime, name: str) -> Peer:
    return next(p for p in balancer.peers.primary if letter(p) == name)


def start(balancer: LeastTime, now: float = 100.0) -> tuple[BalancerState, Peer | None]:
    state = balancer.new_request(0)
    return state, balancer.get(state, now)


def one_request(balancer: LeastTime, now: float = 100.0) -> str:
    state, peer = start(balancer, now)
    assert peer is not None
    balancer.free(state, peer, False, now)
    return letter(peer)


def test_unmeasured_peers_go_first_in_wrr_order() -> None:
    balancer = LeastTime(peers(a=2, b=1, c=1))
    assert [one_request(balancer) for _ in range(4)] == ["a", "b", "c", "a"]


def test_fastest_average_wins_when_idle() -> None:
    balancer = LeastTime(peers(a=1, b=1, c=1))
    for name, seconds in (("a", 0.3), ("b", 0.1), ("c", 0.2)):
        balancer.observe(named(balancer, name), 0.0, seconds, 1.0, now=100.0)
    assert [one_request(balancer) for _ in range(3)] == ["b", "b", "b"]


def test_active_connections_multiply_the_average() -> None:
    balancer = LeastTime(peers(a=1, b=1, c=1))
    # binary-exact times, so that the tie below is an exact tie
    for name, seconds in (("a", 0.125), ("b", 0.1875), ("c", 0.5)):
        balancer.observe(named(balancer, name), 0.0, seconds, None, now=100.0)
    held = [start(balancer)[1] for _ in range(5)]
    # costs (average x (active + 1)): a .125 -> a; a .25 vs b .1875 -> b; a .25 vs b .375 -> a;
    # a .375 ties b .375 -> WRR between a and b: a; a .5 vs b .375 -> b
    assert [letter(p) for p in held] == ["a", "b", "a", "a", "b"]


def test_weight_divides_the_score_and_ties_use_wrr() -> None:
    balancer = LeastTime(peers(a=2, b=1))
    balancer.observe(named(balancer, "a"), 0.0, 0.2, None, now=100.0)  # 0.2 / 2 = 0.1
    balancer.observe(named(balancer, "b"), 0.0, 0.1, None, now=100.0)  # 0.1 / 1 = 0.1
    assert [one_request(balancer) for _ in range(6)] == ["a", "b", "a", "a", "b", "a"]


@pytest.mark.parametrize(("mode", "expected"), [("header", 0.05), ("last_byte", 0.5)])
def test_mode_selects_the_time_that_is_averaged(mode: str, expected: float) -> None:
    balancer = LeastTime(peers(a=1, b=1), (mode,))
    balancer.observe(named(balancer, "a"), 0.01, 0.05, 0.5, now=100.0)
    assert balancer.average(named(balancer, "a")) == pytest.approx(expected)


def test_bad_parameters_are_rejected() -> None:
    with pytest.raises(ValueError, match="invalid parameter"):
        LeastTime(peers(a=1), ("first_byte",))
    LeastTime(peers(a=1), ("last_byte", "inflight"))


def test_skips_tried_down_and_failed() -> None:
    ps = peers(a=1, b=1, c=1)
    ps.primary[2].down = True
    balancer = LeastTime(ps)
    balancer.observe(named(balancer, "a"), 0.0, 0.1, None, now=100.0)
    balancer.observe(named(balancer, "b"), 0.0, 0.5, None, now=100.0)
    state, first = start(balancer)
    assert letter(first) == "a"
    assert first is not None
    balancer.free(state, first, True, 100.0)  # a fails (max_fails 1): out for fail_timeout
    assert letter(balancer.get(state, 100.0)) == "b"
    assert one_request(balancer, 105.0) == "b"
    assert one_request(balancer, 200.0) == "a"


def test_shares_over_100k_picks_favour_the_fast_server() -> None:
    """Sequential requests whose times depend on the server; each reports its header time."""
    balancer = LeastTime(peers(a=1, b=1, c=1))
    service = {"a": 0.010, "b": 0.020, "c": 0.040}
    counts: Counter[str] = Counter()
    in_flight: list[tuple[float, BalancerState, Peer]] = []
    now = 0.0
    for _ in range(100_000):
        now += 0.004  # arrivals every 4 ms: several requests overlap
        while in_flight and in_flight[0][0] <= now:
            done, state, peer = in_flight.pop(0)
            balancer.free(state, peer, False, done)
            balancer.observe(peer, 0.0, service[letter(peer)], None, done)
        state, peer = start(balancer, now)
        assert peer is not None
        counts[letter(peer)] += 1
        in_flight.append((now + service[letter(peer)], state, peer))
        in_flight.sort(key=lambda item: item[0])
    shares = {name: counts[name] / 100_000 for name in "abc"}
    # a takes what it can finish soonest; c only when a has 3 and b 1 in flight (rare at this load)
    assert shares["a"] > 0.7
    assert 0.1 < shares["b"] < 0.3
    assert 0 < shares["c"] < 0.01
