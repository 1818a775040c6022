"""random [two [least_conn]]: weighted draws from an injected RNG, nginx's 20-draw budget."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from scriptlb.balancing.base import BalancerState
from scriptlb.balancing.random import Random
from scriptlb.config.model import PeerAddr, UpstreamConf, UpstreamServerConf
from scriptlb.state.peers import Peer, PeerSet

PORTS = {"a": 9001, "b": 9002, "c": 9003}
LETTERS = {port: letter for letter, port in PORTS.items()}


class ScriptedRandom(random.Random):
    """randrange returns the scripted values in order: exact draw sequences."""

    def __init__(self, values: list[int]) -> None:
        super().__init__(0)
        self.values = list(values)

    def randrange(self, *args: int, **kwargs: object) -> int:  # type: ignore[override]
        return self.values.pop(0)


def peers(**weights: int) -> PeerSet:
    servers = tuple(
        UpstreamServerConf(name=f"127.0.0.1:{PORTS[n]}", addrs=(PeerAddr("127.0.0.1", PORTS[n]),), weight=w)
        for n, w in weights.items()
    )
    return PeerSet.from_conf(UpstreamConf(name="backend", servers=servers))


def letter(peer: Peer | None) -> str:
    return "-" if peer is None else LETTERS[peer.addr.port]


def start(balancer: Random, now: float = 100.0) -> tuple[BalancerState, Peer | None]:
    state = balancer.new_request(0)
    return state, balancer.get(state, now)


def test_draws_map_through_weight_ranges() -> None:
    # a=1, b=2, c=1: x in [0,1) -> a, [1,3) -> b, [3,4) -> c
    balancer = Random(peers(a=1, b=2, c=1), rng=ScriptedRandom([0, 1, 2, 3, 2, 0]))
    assert [letter(start(balancer)[1]) for _ in range(6)] == ["a", "b", "b", "c", "b", "a"]


def test_unusable_draw_costs_a_draw_and_redraws() -> None:
    ps = peers(a=1, b=2, c=1)
    ps.primary[1].down = True
    balancer = Random(ps, rng=ScriptedRandom([1, 2, 3]))
    state, peer = start(balancer)
    assert letter(peer) == "c"
    assert state.draws == 2  # type: ignore[attr-defined]


def test_retry_skips_the_tried_peer() -> None:
    balancer = Random(peers(a=1, b=1, c=1), rng=ScriptedRandom([0, 0, 0, 2]))
    state, first = start(balancer)
    assert first is not None
    balancer.free(state, first, True, 100.0)
    assert letter(balancer.get(state, 100.0)) == "c"  # three draws of a skipped


def test_after_20_bad_draws_falls_back_to_round_robin() -> None:
    ps = peers(a=1, b=1, c=1)
    ps.primary[0].down = True
    balancer = Random(ps, rng=ScriptedRandom([0] * 21))  # a (down) every time
    _, peer = start(balancer)
    assert letter(peer) == "b"  # round robin's first usable peer


def test_two_keeps_the_less_loaded_of_two_draws() -> None:
    balancer = Random(peers(a=1, b=1, c=1), ("two", "least_conn"), rng=ScriptedRandom([0, 2, 0, 2, 1, 1, 0]))
    _, first = start(balancer)  # a vs c, both idle: nginx keeps the second drawn on a tie
    assert letter(first) == "c"
    _, second = start(balancer)  # a (0 conns) vs c (1): a
    assert letter(second) == "a"
    state, third = start(balancer)  # b, b again (same peer: redraw), then a: b (0) vs a (1): b
    assert letter(third) == "b"
    assert state.draws == 2  # type: ignore[attr-defined]


def test_two_with_weights_compares_conns_per_weight() -> None:
    ps = peers(a=3, b=1)
    ps.primary[0].conns = 2  # 2/3 per weight
    ps.primary[1].conns = 1  # 1/1
    balancer = Random(ps, ("two",), rng=ScriptedRandom([3, 0]))  # b then a
    assert letter(start(balancer)[1]) == "a"


def test_bad_parameters_are_rejected() -> None:
    with pytest.raises(ValueError, match="invalid parameter"):
        Random(peers(a=1, b=1), ("three",))


WEIGHTS = {"a": 5, "b": 3, "c": 2}


def expected_shares(two: bool) -> dict[str, float]:
    """random: weight / total. random two with idle peers: nginx keeps the *second* of two
    distinct weighted draws on a tie, so P(x) = sum over y != x of p(y) * p(x) / (1 - p(y))."""
    total = sum(WEIGHTS.values())
    p = {name: weight / total for name, weight in WEIGHTS.items()}
    if not two:
        return p
    return {x: sum(p[y] * p[x] / (1 - p[y]) for y in p if y != x) for x in p}


@pytest.mark.parametrize("args", [(), ("two",)])
def test_shares_over_100k_picks(args: tuple[str, ...]) -> None:
    balancer = Random(peers(**WEIGHTS), args, rng=random.Random(1))
    counts: Counter[str] = Counter()
    for _ in range(100_000):
        state, peer = start(balancer)
        assert peer is not None
        counts[letter(peer)] += 1
        balancer.free(state, peer, False, 100.0)
    for name, share in expected_shares(bool(args)).items():
        assert counts[name] / 100_000 == pytest.approx(share, abs=0.01)


def test_two_least_conn_evens_out_held_connections() -> None:
    balancer = Random(peers(a=1, b=1, c=1), ("two", "least_conn"), rng=random.Random(3))
    held = [start(balancer)[1] for _ in range(300)]
    counts = Counter(letter(p) for p in held)
    assert max(counts.values()) - min(counts.values()) <= 10  # plain random would spread ~±30
