"""Balancers a hook can build and drive itself, as lua-resty-balancer's ``resty.chash`` and
``resty.roundrobin`` (plus APISIX's ``ewma``):

    from scriptlb.balancers import chash, roundrobin, ewma

    ring = chash({"10.0.0.1:80": 1, "10.0.0.2:80": 2})     # id -> weight
    server, index = ring.find(ngx.var.http_x_user)           # first try
    server, index = ring.next(index, tried=ngx.ctx["tried"]) # a retry: skips ids already tried

Nodes are ``{id: weight}`` (a list of ids means weight 1 each); ids are strings, typically
``"host:port"``. Every ``find``/``next`` takes ``tried``: any container of ids this request has
already used (a set, list or dict kept in ``ngx.ctx``), which are skipped; ``None`` is returned
when every id has been tried.

``chash`` builds nginx's ketama ring (``hash ... consistent``): with ids written like the
``server`` lines, a key maps to the same server as nginx's consistent hash would. (lua-resty-
balancer's own ring differs; nginx compatibility is the more useful property here.)

These objects hold per-worker state (like Lua module-level tables in OpenResty): build them at
module level of a hook, or keep them across requests, and call ``reinit``/``set`` when the node
list changes. They never see scriptlb's internal peers.
"""

from __future__ import annotations

import bisect
import random as _random
import time
import zlib
from collections.abc import Callable, Container, Iterable, Mapping

from scriptlb.balancing.ewma import DECAY_TIME, DecayingAverages
from scriptlb.balancing.hash import ketama_ring

Nodes = Mapping[str, int] | Iterable[str]
_NOTHING: frozenset[str] = frozenset()


def _node_weights(nodes: Nodes) -> dict[str, int]:
    weights = dict(nodes) if isinstance(nodes, Mapping) else dict.fromkeys(nodes, 1)
    for node, weight in weights.items():
        if not isinstance(node, str):
            raise TypeError(f"node ids are strings, not {type(node).__name__}")
        if not isinstance(weight, int) or isinstance(weight, bool) or weight < 0:
            raise ValueError(f"weight of {node!r} must be an int >= 0, not {weight!r}")
    return weights


class _Weighted:
    """The node table shared by the three balancers: reinit/set/delete/incr/decr."""

    def __init__(self, nodes: Nodes) -> None:
        self._weights = _node_weights(nodes)
        self._changed()

    def _changed(self) -> None:
        raise NotImplementedError

    def reinit(self, nodes: Nodes) -> None:
        """Replace the whole node table."""
        self._weights = _node_weights(nodes)
        self._changed()

    def set(self, node: str, weight: int) -> None:
        """Add a node or change its weight (0 keeps it known but never chosen)."""
        self._weights[node] = _node_weights({node: weight})[node]
        self._changed()

    def delete(self, node: str) -> None:
        if self._weights.pop(node, None) is not None:
            self._changed()

    def incr(self, node: str, weight: int = 1) -> None:
        self.set(node, self._weights.get(node, 0) + weight)

    def decr(self, node: str, weight: int = 1) -> None:
        self.set(node, max(0, self._weights.get(node, 0) - weight))

    def nodes(self) -> dict[str, int]:
        """A copy of the node table."""
        return dict(self._weights)


class chash(_Weighted):  # lower-case: named like resty.chash, which hook authors know
    """Consistent hashing on nginx's ketama ring."""

    def _changed(self) -> None:
        self._hashes, self._ring = ketama_ring((n, w) for n, w in self._weights.items() if w > 0)

    def find(self, key: str | bytes, tried: Container[str] | None = None) -> tuple[str | None, int]:
        """The node for ``key`` (the first point at or after crc32(key)) and its ring index; with
        ``tried``, the first untried node clockwise from there."""
        if not self._hashes:
            return None, 0
        raw = key.encode() if isinstance(key, str) else key
        index = bisect.bisect_left(self._hashes, zlib.crc32(raw)) % len(self._hashes)
        return self._walk(index, None, tried or _NOTHING)

    def next(self, index: int, tried: Container[str] | None = None) -> tuple[str | None, int]:
        """The next node clockwise after ring ``index`` that differs from the node at ``index``
        and is not in ``tried``: the retry of ``find``."""
        if not self._hashes:
            return None, 0
        index %= len(self._hashes)
        return self._walk(index + 1, self._ring[index], tried or _NOTHING)

    def _walk(self, start: int, skip: str | None, tried: Container[str]) -> tuple[str | None, int]:
        ring = self._ring
        size = len(ring)
        for step in range(size):
            index = (start + step) % size
            node = ring[index]
            if node != skip and node not in tried:
                return node, index
        return None, start % size


class roundrobin(_Weighted):  # named like resty.roundrobin
    """Smooth weighted round robin (nginx's), with the request's tried nodes skipped."""

    def _changed(self) -> None:
        self._names = [n for n, w in self._weights.items() if w > 0]
        self._node_weight = [self._weights[n] for n in self._names]
        self._current = [0] * len(self._names)

    def find(self, tried: Container[str] | None = None) -> str | None:
        """The next node in the smooth WRR sequence, among the nodes not in ``tried``."""
        tried = tried or _NOTHING
        names, weights, current = self._names, self._node_weight, self._current
        best = -1
        total = 0
        for i, name in enumerate(names):
            if name in tried:
                continue
            current[i] += weights[i]
            total += weights[i]
            if best < 0 or current[i] > current[best]:
                best = i
        if best < 0:
            return None
        current[best] -= total
        return names[best]

    next = find  # lua-resty-balancer's alias: a retry is just another pick without the tried


class ewma(_Weighted):  # named like APISIX's balancer/ewma
    """APISIX's ewma: two random untried nodes, the lower decayed rtt wins (weights ignored,
    except that weight 0 takes a node out). Feed it with ``observe(node, rtt)``."""

    def __init__(
        self,
        nodes: Nodes,
        *,
        decay: float = DECAY_TIME,
        peak: bool = False,
        rng: _random.Random | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._rng = rng if rng is not None else _random.Random()
        self._clock = clock
        self._decay = decay
        self._peak = peak
        self._averages = DecayingAverages(0, decay, peak)
        self._index: dict[str, int] = {}
        super().__init__(nodes)

    def _changed(self) -> None:
        names = [n for n, w in self._weights.items() if w > 0]
        fresh = DecayingAverages(len(names), self._decay, self._peak)
        for i, name in enumerate(names):  # keep what was learnt about surviving nodes
            old = self._index.get(name)
            if old is not None:
                fresh.values[i] = self._averages.values[old]
                fresh.stamps[i] = self._averages.stamps[old]
        self._names = names
        self._index = {name: i for i, name in enumerate(names)}
        self._averages = fresh

    def find(self, tried: Container[str] | None = None) -> str | None:
        tried = tried or _NOTHING
        names = self._names
        usable = sum(1 for name in names if name not in tried)
        if usable == 0:
            return None
        if usable == 1:
            return next(name for name in names if name not in tried)
        a = self._rng.randrange(usable)
        b = self._rng.randrange(usable - 1)
        if b >= a:
            b += 1
        first, second = self._nth_untried(a, tried), self._nth_untried(b, tried)
        now = self._clock()
        if self._averages.decayed(first, now) > self._averages.decayed(second, now):
            first = second
        return names[first]

    next = find

    def _nth_untried(self, n: int, tried: Container[str]) -> int:
        for index, name in enumerate(self._names):
            if name in tried:
                continue
            if n == 0:
                return index
            n -= 1
        raise IndexError(n)

    def observe(self, node: str, rtt: float) -> None:
        """Record a completed request's round-trip time (seconds) to ``node``."""
        index = self._index.get(node)
        if index is not None:
            self._averages.update(index, rtt, self._clock())

    after_balance = observe  # APISIX's name for the same step

    def score(self, node: str) -> float:
        """The node's decayed average rtt now (0 for a node never measured)."""
        index = self._index.get(node)
        return 0.0 if index is None else self._averages.decayed(index, self._clock())


# What a hook may call on each object (the sandbox's deny-by-default attribute registry, e.g.
# ``guards.expose(cls, names)`` for each entry); private names never pass.
_TABLE_METHODS = ("reinit", "set", "delete", "incr", "decr", "nodes")
HOOK_API: dict[type, frozenset[str]] = {
    chash: frozenset(("find", "next", *_TABLE_METHODS)),
    roundrobin: frozenset(("find", "next", *_TABLE_METHODS)),
    ewma: frozenset(("find", "next", "observe", "after_balance", "score", *_TABLE_METHODS)),
}
