"""scriptlb.balancing.resty (``scriptlb.balancers`` to hooks): the hook-side chash / roundrobin /
ewma objects (lua-resty-balancer style)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from scriptlb.balancing.resty import HOOK_API, chash, ewma, roundrobin

# recorded from nginx 1.22.1 `hash $arg_k consistent` over these servers (see test_balancing_hash)
NGINX_SERVERS = {"127.0.0.1:8001": 1, "127.0.0.1:8002": 2, "127.0.0.1:8003": 1, "127.0.0.1:8004": 3}
NGINX_CONSISTENT = {"a": 8004, "b": 8001, "user:1": 8003, "user:2": 8003, "/index.html": 8004, "k42": 8002}


class ScriptedRandom(random.Random):
    def __init__(self, values: list[int]) -> None:
        super().__init__(0)
        self.values = list(values)

    def randrange(self, *args: int, **kwargs: object) -> int:  # type: ignore[override]
        return self.values.pop(0)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --------------------------------------------------------------------------- chash


def test_chash_maps_keys_like_nginx() -> None:
    ring = chash(NGINX_SERVERS)
    for key, port in NGINX_CONSISTENT.items():
        node, _ = ring.find(key)
        assert node == f"127.0.0.1:{port}"


def test_chash_next_walks_to_other_nodes_and_skips_tried() -> None:
    ring = chash(NGINX_SERVERS)
    node, index = ring.find("user:1")
    tried = {node}
    order = [node]
    while True:
        node, index = ring.next(index, tried)
        if node is None:
            break
        assert node not in tried
        tried.add(node)
        order.append(node)
    assert sorted(order) == sorted(NGINX_SERVERS)
    # find with tried gives the same first untried node as the walk
    assert ring.find("user:1", tried={order[0]})[0] == order[1]


def test_chash_weight_shares_and_minimal_movement() -> None:
    ring = chash(NGINX_SERVERS)
    keys = [f"key-{i}" for i in range(100_000)]
    before = {k: ring.find(k)[0] for k in keys}
    shares = Counter(before.values())
    for node, weight in NGINX_SERVERS.items():
        assert shares[node] / len(keys) == pytest.approx(weight / 7, abs=0.05)
    ring.delete("127.0.0.1:8002")
    after = {k: ring.find(k)[0] for k in keys[:5000]}
    assert all(after[k] == before[k] for k in after if before[k] != "127.0.0.1:8002")
    assert "127.0.0.1:8002" not in after.values()


def test_chash_empty_and_zero_weight() -> None:
    assert chash({}).find("x") == (None, 0)
    ring = chash({"a:1": 0, "b:1": 1})
    assert {ring.find(f"k{i}")[0] for i in range(100)} == {"b:1"}
    ring.incr("a:1")
    assert {ring.find(f"k{i}")[0] for i in range(100)} == {"a:1", "b:1"}


# --------------------------------------------------------------------------- roundrobin


def test_roundrobin_smooth_sequence() -> None:
    rr = roundrobin({"a": 5, "b": 1, "c": 1})
    assert [rr.find() for _ in range(14)] == list("aabacaa" * 2)


def test_roundrobin_skips_tried_and_ends_with_none() -> None:
    rr = roundrobin(["a", "b", "c"])
    tried: set[str] = set()
    picks = []
    while (node := rr.next(tried)) is not None:
        picks.append(node)
        tried.add(node)
    assert sorted(picks) == ["a", "b", "c"]


def test_roundrobin_table_changes() -> None:
    rr = roundrobin({"a": 1, "b": 1})
    rr.set("c", 2)
    rr.decr("a")  # weight 0: never chosen
    rr.delete("missing")
    assert Counter(rr.find() for _ in range(300)) == {"c": 200, "b": 100}
    assert rr.nodes() == {"a": 0, "b": 1, "c": 2}
    with pytest.raises(ValueError):
        rr.set("d", -1)


def test_roundrobin_shares_over_100k_picks_are_exact() -> None:
    rr = roundrobin({"a": 3, "b": 2, "c": 1})
    counts = Counter(rr.find() for _ in range(99_996))
    assert counts == {"a": 49_998, "b": 33_332, "c": 16_666}


# --------------------------------------------------------------------------- ewma


def test_ewma_prefers_the_lower_decayed_rtt() -> None:
    clock = Clock()
    balancer = ewma(["a", "b", "c"], rng=ScriptedRandom([0, 0, 2, 0]), clock=clock)
    balancer.observe("a", 0.5)
    balancer.after_balance("b", 0.05)
    assert balancer.find() == "b"  # a vs b
    assert balancer.find() == "c"  # c (never measured, 0) vs a
    assert balancer.score("a") == pytest.approx(0.5)
    clock.now += 10
    assert balancer.score("a") == pytest.approx(0.5 * 2.718281828**-1, rel=1e-6)


def test_ewma_skips_tried() -> None:
    balancer = ewma(["a", "b"], rng=random.Random(1), clock=Clock())
    assert balancer.find({"a"}) == "b"
    assert balancer.next(["a", "b"]) is None


def test_ewma_reinit_keeps_what_it_learnt() -> None:
    clock = Clock()
    balancer = ewma({"a": 1, "b": 1}, clock=clock)
    balancer.observe("b", 0.3)
    balancer.reinit({"b": 1, "c": 1})
    assert balancer.score("b") == pytest.approx(0.3)
    assert balancer.score("a") == 0.0


def test_ewma_shares_over_100k_picks() -> None:
    clock = Clock()
    balancer = ewma(["a", "b", "c"], rng=random.Random(4), clock=clock)
    rtt = {"a": 0.01, "b": 0.01, "c": 0.2}
    counts: Counter[str] = Counter()
    for _ in range(100_000):
        clock.now += 0.001
        node = balancer.find()
        assert node is not None
        counts[node] += 1
        balancer.observe(node, rtt[node])
    assert counts["c"] / 100_000 < 0.05
    assert counts["a"] / 100_000 == pytest.approx(counts["b"] / 100_000, abs=0.03)


def test_hook_api_names_exist_and_are_public() -> None:
    for cls, names in HOOK_API.items():
        for name in names:
            assert not name.startswith("_")
            assert callable(getattr(cls, name))
