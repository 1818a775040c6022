"""ewma: APISIX's time-decayed rtt and power of two choices, on an injected clock and RNG."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from scriptlb.balancing.base import BalancerState
from scriptlb.balancing.ewma import DECAY_TIME, DecayingAverages, Ewma
from scriptlb.config.model import PeerAddr, UpstreamConf, UpstreamServerConf
from scriptlb.state.peers import Peer, PeerSet

PORTS = {"a": 9001, "b": 9002, "c": 9003, "d": 9004}
LETTERS = {port: letter for letter, port in PORTS.items()}


class ScriptedRandom(random.Random):
    def __init__(self, values: list[int]) -> None:
        super().__init__(0)
        self.values = list(values)

    def randrange(self, *args: int, **kwargs: object) -> int:  # type: ignore[override]
        return self.values.pop(0)


def peers(*names: str, **params: object) -> PeerSet:
    servers = []
    for name in names:
        addr = PeerAddr("127.0.0.1", PORTS[name.rstrip("*")])
        backup = name.endswith("*")
        servers.append(UpstreamServerConf(name=addr.name, addrs=(addr,), backup=backup, **params))  # type: ignore[arg-type]
    return PeerSet.from_conf(UpstreamConf(name="backend", servers=tuple(servers)))


def letter(peer: Peer | None) -> str:
    return "-" if peer is None else LETTERS[peer.addr.port]


def peer_named(balancer: Ewma, name: str) -> Peer:
    return next(p for p in balancer.peers.primary + balancer.peers.backup if letter(p) == name)


def start(balancer: Ewma, now: float) -> tuple[BalancerState, Peer | None]:
    state = balancer.new_request(0)
    return state, balancer.get(state, now)


# --------------------------------------------------------------------------- the average


def test_first_sample_is_taken_whole_then_decays_by_time() -> None:
    averages = DecayingAverages(1)
    assert averages.update(0, 0.2, now=50.0) == pytest.approx(0.2)
    w = math.exp(-10.0 / DECAY_TIME)
    assert averages.update(0, 0.6, now=60.0) == pytest.approx(0.2 * w + 0.6 * (1 - w))
    # the score decays towards 0 while no sample comes (APISIX's score with rtt 0)
    value = averages.values[0]
    assert averages.decayed(0, now=80.0) == pytest.approx(value * math.exp(-2.0))
    assert averages.decayed(0, now=60.0) == pytest.approx(value)


def test_same_instant_sample_does_not_move_the_average() -> None:
    averages = DecayingAverages(1)
    averages.update(0, 0.2, now=5.0)
    assert averages.update(0, 9.0, now=5.0) == pytest.approx(0.2)  # w = exp(0) = 1, as APISIX


def test_peak_option_jumps_to_a_slower_sample() -> None:
    averages = DecayingAverages(1, peak=True)
    averages.update(0, 0.1, now=1.0)
    assert averages.update(0, 0.9, now=1.1) == pytest.approx(0.9)
    assert averages.update(0, 0.1, now=11.1) == pytest.approx(0.9 * math.exp(-1) + 0.1 * (1 - math.exp(-1)))


# --------------------------------------------------------------------------- picking


def test_two_draws_keep_the_lower_score() -> None:
    # draws as APISIX: first = rand(3), second = rand(2), +1 when >= first:
    # (0, 0) -> a vs b; (2, 1) -> c vs b; (1, 0) -> b vs a. b has the lowest rtt every time.
    balancer = Ewma(peers("a", "b", "c"), rng=ScriptedRandom([0, 0, 2, 1, 1, 0]))
    balancer.observe(peer_named(balancer, "a"), 0.01, None, 0.30, now=100.0)  # rtt 0.31
    balancer.observe(peer_named(balancer, "b"), 0.01, None, 0.05, now=100.0)  # rtt 0.06
    balancer.observe(peer_named(balancer, "c"), 0.01, None, 0.10, now=100.0)  # rtt 0.11
    assert [letter(start(balancer, 100.0)[1]) for _ in range(3)] == ["b", "b", "b"]


def test_tie_keeps_the_first_draw_and_unmeasured_peers_score_zero() -> None:
    balancer = Ewma(peers("a", "b", "c"), rng=ScriptedRandom([2, 0, 1, 1]))
    assert letter(start(balancer, 1.0)[1]) == "c"  # c vs a, both 0: the first draw
    balancer.observe(peer_named(balancer, "b"), 0.0, None, 0.5, now=1.0)
    assert letter(start(balancer, 1.0)[1]) == "c"  # b (0.5) vs c (0)


def test_idle_peer_score_decays_so_it_is_retried() -> None:
    balancer = Ewma(peers("a", "b"), rng=random.Random(2))
    a, b = peer_named(balancer, "a"), peer_named(balancer, "b")
    balancer.observe(a, 0, None, 1.0, now=0.0)  # a was slow once
    balancer.observe(b, 0, None, 0.1, now=0.0)
    first_a = None
    for t in range(1, 40):  # one request a second; b keeps reporting 0.1 s
        state, peer = start(balancer, float(t))
        assert peer is not None
        balancer.free(state, peer, False, float(t))
        if peer is a:
            first_a = t
            break
        balancer.observe(b, 0, None, 0.1, now=float(t))
    # a's score exp(-t/10) drops below b's 0.1 * exp(-0.1) between t = 24 and t = 25
    assert first_a == 25


def test_retry_skips_tried_and_unusable_then_backup() -> None:
    ps = peers("a", "b", "c", "d*")
    ps.primary[2].down = True  # c
    balancer = Ewma(ps, rng=ScriptedRandom([0, 0]))
    state, first = start(balancer, 100.0)  # a vs b: both 0 -> a
    assert letter(first) == "a"
    assert first is not None
    balancer.free(state, first, True, 100.0)
    second = balancer.get(state, 100.0)  # only b usable: no draw needed
    assert letter(second) == "b"
    assert second is not None
    balancer.free(state, second, True, 100.0)
    third = balancer.get(state, 100.0)
    assert letter(third) == "d"  # the backup list, as round robin switches to it
    assert third is not None
    balancer.free(state, third, True, 100.0)
    assert balancer.get(state, 100.0) is None


def test_failed_peer_is_not_drawn_until_its_window_passes() -> None:
    ps = peers("a", "b")
    ps.primary[0].fails, ps.primary[0].checked = 1, 99.0
    balancer = Ewma(ps, rng=random.Random(5))
    assert {letter(start(balancer, 100.0)[1]) for _ in range(50)} == {"b"}
    assert "a" in {letter(start(balancer, 200.0)[1]) for _ in range(50)}


def test_rebuild_keeps_history_of_surviving_peers() -> None:
    balancer = Ewma(peers("a", "b"), rng=random.Random(1))
    balancer.observe(peer_named(balancer, "b"), 0, None, 0.25, now=10.0)
    balancer.rebuild(peers("c", "b"))
    assert balancer.score(peer_named(balancer, "b"), 10.0) == pytest.approx(0.25)
    assert balancer.score(peer_named(balancer, "c"), 10.0) == 0.0


# --------------------------------------------------------------------------- shares


def simulate(balancer: Ewma, rtts: dict[str, float], picks: int) -> Counter[str]:
    """Sequential requests, 1 ms apart; each completed try reports its fixed rtt."""
    counts: Counter[str] = Counter()
    now = 1000.0
    for _ in range(picks):
        now += 0.001
        state, peer = start(balancer, now)
        assert peer is not None
        name = letter(peer)
        counts[name] += 1
        balancer.free(state, peer, False, now)
        balancer.observe(peer, 0.0, None, rtts[name], now)
    return counts


def test_equal_peers_share_evenly_over_100k_picks() -> None:
    balancer = Ewma(peers("a", "b", "c"), rng=random.Random(11))
    counts = simulate(balancer, {"a": 0.05, "b": 0.05, "c": 0.05}, 100_000)
    for name in "abc":
        assert counts[name] / 100_000 == pytest.approx(1 / 3, abs=0.02)


def test_slow_peer_gets_little_traffic_over_100k_picks() -> None:
    balancer = Ewma(peers("a", "b", "c"), rng=random.Random(12))
    counts = simulate(balancer, {"a": 0.02, "b": 0.02, "c": 0.50}, 100_000)
    assert counts["c"] / 100_000 < 0.05
    assert counts["a"] / 100_000 == pytest.approx(counts["b"] / 100_000, abs=0.03)
