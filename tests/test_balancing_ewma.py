"""ewma: APISIX's time-decayed rtt and power of two choices, on an injected clock and RNG."""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from balancing_kit import ScriptedRandom, letter, named, peers, server, start

from scriptlb.balancing.ewma import DecayingAverages, Ewma
from scriptlb.balancing.least_time import LeastTime
from scriptlb.state.stats import DECAY_TIME, PeerKey, PeerStats, Recorder, UpstreamLayout, UpstreamStats

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
    balancer.observe(named(balancer, "a"), 0.01, None, 0.30, now=100.0)  # rtt 0.31
    balancer.observe(named(balancer, "b"), 0.01, None, 0.05, now=100.0)  # rtt 0.06
    balancer.observe(named(balancer, "c"), 0.01, None, 0.10, now=100.0)  # rtt 0.11
    assert [letter(start(balancer, 100.0)[1]) for _ in range(3)] == ["b", "b", "b"]


def test_tie_keeps_the_first_draw_and_unmeasured_peers_score_zero() -> None:
    balancer = Ewma(peers("a", "b", "c"), rng=ScriptedRandom([2, 0, 1, 1]))
    assert letter(start(balancer, 1.0)[1]) == "c"  # c vs a, both 0: the first draw
    balancer.observe(named(balancer, "b"), 0.0, None, 0.5, now=1.0)
    assert letter(start(balancer, 1.0)[1]) == "c"  # b (0.5) vs c (0)


def test_idle_peer_score_decays_so_it_is_retried() -> None:
    balancer = Ewma(peers("a", "b"), rng=random.Random(2))
    a, b = named(balancer, "a"), named(balancer, "b")
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
    balancer.observe(named(balancer, "b"), 0, None, 0.25, now=10.0)
    balancer.rebuild(peers("c", "b"))
    assert balancer.score(named(balancer, "b"), 10.0) == pytest.approx(0.25)
    assert balancer.score(named(balancer, "c"), 10.0) == 0.0


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


# --------------------------------------------------------------------------- shared statistics


class NoTimer:
    def cancel(self) -> None:
        pass


class ManualLoop:
    """Enough of a loop for a Recorder: flushes happen when the test calls them."""

    def call_later(self, delay: float, callback: object) -> NoTimer:
        return NoTimer()


class Worker:
    """One worker's view of an upstream: its own peers, recorder and upstream statistics over
    the instance's shared file, as UpstreamRuntime builds them."""

    def __init__(self, stats: PeerStats, clock: list[float], *names: str) -> None:
        self.peers = peers(*names)
        self.recorder = Recorder(stats, ManualLoop(), clock=lambda: clock[0])
        self.upstream = UpstreamStats(self.recorder, "backend")
        self.upstream.assign_indexes(self.peers.primary, self.peers.backup)

    def record(self, name: str, seconds: float, header: float | None = None) -> None:
        peer = next(p for p in self.peers.primary if letter(p) == name)
        self.recorder.start(peer.stats_index)
        self.recorder.finish(peer.stats_index, 200, seconds, False, header_time=header)


@pytest.fixture
def shared(tmp_path: Path) -> Iterator[PeerStats]:
    names = tuple(server(name).name for name in ("a", "b", "c"))
    keys = tuple(PeerKey("backend", name) for name in names)
    opened = PeerStats.open(str(tmp_path), (UpstreamLayout("backend", keys, (), ((1, 1, 1), ())),))
    yield opened
    opened.close()


def test_builtins_score_on_every_workers_tries(shared: PeerStats) -> None:
    """What one worker measured steers another worker's ewma and least_time: the built-in
    methods read the shared averages (the ones hooks read), not a per-worker copy."""
    clock = [1_800_000_000.0]
    first, second = Worker(shared, clock, "a", "b", "c"), Worker(shared, clock, "a", "b", "c")
    for name, seconds in (("a", 0.5), ("b", 0.05), ("c", 0.2)):
        first.record(name, seconds, header=seconds / 10)
    first.recorder.flush()
    ewma = Ewma(second.peers, rng=ScriptedRandom([0, 0, 2, 0]))
    assert ewma.use_statistics(second.upstream)
    assert [letter(start(ewma)[1]) for _ in range(2)] == ["b", "c"]  # a vs b, then c vs a
    assert ewma.score(named(ewma, "a"), 0.0) == pytest.approx(0.5)  # the shared clock decays it
    for mode in ("last_byte", "header"):
        least_time = LeastTime(second.peers, (mode,))
        assert least_time.use_statistics(second.upstream)
        assert letter(start(least_time)[1]) == "b"
    # this worker's own tries count before they are published (folded in at "now")
    clock[0] += 1.0
    second.record("a", 0.001)
    w = math.exp(-1.0 / DECAY_TIME)
    assert ewma.score(named(ewma, "a"), 0.0) == pytest.approx(0.5 * w + 0.001 * (1 - w))
    # observe does not feed a private copy any more: the tries loop records every try
    ewma.observe(named(ewma, "c"), 0.0, None, 9.0, now=0.0)
    assert ewma.score(named(ewma, "c"), 0.0) == pytest.approx(0.2 * w)
