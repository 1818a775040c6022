"""Balancers a hook can build and drive itself, as lua-resty-balancer's ``resty.chash`` and
``resty.roundrobin`` (plus APISIX's ``ewma``). Hooks import them as ``scriptlb.balancers``
(the sandbox's stand-in for this module, ``scriptlb.sandbox.modules``):

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

# Hooks call these objects inside a run whose CPU budget only hook code can check: building a
# ring or walking a node list is host code no tick interrupts, so its size is capped up front.
MAX_NODES = 1024  # ids in one table
MAX_ID_LENGTH = 256  # characters of one id ("host:port" is ~20)
MAX_WEIGHT = 1000  # of one node
MAX_RING_WEIGHT = 128  # chash: total weight, 160 ring points each (~30 ms to build 128, once)
MAX_TRIED = 4096  # items of a non-set ``tried`` (copied into a set once per call)


def _node_weights(nodes: Nodes) -> dict[str, int]:
    if isinstance(nodes, Mapping):
        if len(nodes) > MAX_NODES:
            raise ValueError(f"{len(nodes)} nodes is over the limit of {MAX_NODES}")
        weights = dict(nodes)
        for node, weight in weights.items():
            _check_node(node, weight)
        return weights
    weights = {}
    for count, node in enumerate(nodes):  # type-checked before hashing: no tuple-hash bombs
        if count >= MAX_NODES:
            raise ValueError(f"more than {MAX_NODES} nodes is over the limit")
        _check_node(node, 1)
        weights[node] = 1
    return weights


def _check_node(node: object, weight: object) -> None:
    # messages name types and sizes, never the repr of a caller's value (which could be huge);
    # exact types: a subclass of str or int is hostile input posing as one
    if type(node) is not str:
        raise TypeError(f"node ids are strings, not {type(node).__name__}")
    if len(node) > MAX_ID_LENGTH:
        raise ValueError(f"node id of {len(node)} characters is over the limit of {MAX_ID_LENGTH}")
    if type(weight) is not int:
        raise ValueError(f"weight of {node!r} must be an int >= 0, not {type(weight).__name__}")
    if not 0 <= weight <= MAX_WEIGHT:
        raise ValueError(f"weight of {node!r} must be between 0 and {MAX_WEIGHT}")


def _membership(tried: object) -> Container[str]:
    """``tried`` as something whose ``in`` costs O(1): sets and dicts as they are, other
    containers (a list kept in ngx.ctx) copied into a frozenset, once per call."""
    if tried is None:
        return _NOTHING
    if isinstance(tried, (set, frozenset, dict)):
        return tried
    if isinstance(tried, (list, tuple)):
        if len(tried) > MAX_TRIED:
            raise ValueError(f"tried has {len(tried)} items, over the limit of {MAX_TRIED}")
        return frozenset(item for item in tried if type(item) is str)
    raise TypeError(f"tried must be a set, dict, list or tuple, not {type(tried).__name__}")


class _Weighted:
    """The node table shared by the three balancers: reinit/set/delete/incr/decr."""

    def __init__(self, nodes: Nodes) -> None:
        self._weights = _node_weights(nodes)
        self._changed()

    def _changed(self) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:  # no address: what a hook's log line or f-string shows
        return f"<{type(self).__name__} with {len(self._weights)} nodes>"

    def reinit(self, nodes: Nodes) -> None:
        """Replace the whole node table."""
        self._apply(_node_weights(nodes))

    def _apply(self, weights: dict[str, int]) -> None:
        # all or nothing: a refused change (chash's total weight) leaves the table as it was
        old, self._weights = self._weights, weights
        try:
            self._changed()
        except BaseException:
            self._weights = old
            raise

    def set(self, node: str, weight: int) -> None:
        """Add a node or change its weight (0 keeps it known but never chosen)."""
        _check_node(node, weight)
        if node not in self._weights and len(self._weights) >= MAX_NODES:
            raise ValueError(f"{len(self._weights) + 1} nodes is over the limit of {MAX_NODES}")
        self._apply({**self._weights, node: weight})

    def delete(self, node: str) -> None:
        _check_node(node, 0)
        if node in self._weights:
            self._apply({n: w for n, w in self._weights.items() if n != node})

    def incr(self, node: str, weight: int = 1) -> None:
        _check_node(node, weight)
        self.set(node, self._weights.get(node, 0) + weight)

    def decr(self, node: str, weight: int = 1) -> None:
        _check_node(node, weight)
        self.set(node, max(0, self._weights.get(node, 0) - weight))

    def nodes(self) -> dict[str, int]:
        """A copy of the node table."""
        return dict(self._weights)


class chash(_Weighted):  # lower-case: named like resty.chash, which hook authors know
    """Consistent hashing on nginx's ketama ring."""

    def _changed(self) -> None:
        total = sum(self._weights.values())
        if total > MAX_RING_WEIGHT:
            raise ValueError(f"total weight {total} of a chash ring is over the limit of {MAX_RING_WEIGHT}")
        self._hashes, self._ring = ketama_ring((n, w) for n, w in self._weights.items() if w > 0)

    def find(self, key: str | bytes, tried: Container[str] | None = None) -> tuple[str | None, int]:
        """The node for ``key`` (the first point at or after crc32(key)) and its ring index; with
        ``tried``, the first untried node clockwise from there."""
        if type(key) is not str and type(key) is not bytes:
            raise TypeError(f"key must be a str or bytes, not {type(key).__name__}")
        if not self._hashes:
            return None, 0
        raw = key.encode() if type(key) is str else key
        index = bisect.bisect_left(self._hashes, zlib.crc32(raw)) % len(self._hashes)
        return self._walk(index, None, _membership(tried))

    def next(self, index: int, tried: Container[str] | None = None) -> tuple[str | None, int]:
        """The next node clockwise after ring ``index`` that differs from the node at ``index``
        and is not in ``tried``: the retry of ``find``."""
        if not self._hashes:
            return None, 0
        index %= len(self._hashes)
        return self._walk(index + 1, self._ring[index], _membership(tried))

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
        tried = _membership(tried)
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
        tried = _membership(tried)
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
        if type(rtt) is not int and type(rtt) is not float:
            raise TypeError(f"rtt must be a number, not {type(rtt).__name__}")
        _check_node(node, 0)
        index = self._index.get(node)
        if index is not None:
            self._averages.update(index, rtt, self._clock())

    after_balance = observe  # APISIX's name for the same step

    def score(self, node: str) -> float:
        """The node's decayed average rtt now (0 for a node never measured)."""
        _check_node(node, 0)
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
