"""Shared scaffolding of the balancing methods' unit tests: peers named by letters, one try
started by hand, and a scripted RNG, so each test can state the exact sequence nginx would give.

Peers are built from config objects (``PeerSet.from_conf``) like the runtime builds them; the
addresses are never connected to. A name ending in ``*`` is a backup server.
"""

from __future__ import annotations

import random

from scriptlb.balancing.base import Balancer, BalancerState
from scriptlb.config.model import PeerAddr, UpstreamConf, UpstreamServerConf
from scriptlb.state.peers import Peer, PeerSet

PORTS = {"a": 9001, "b": 9002, "c": 9003, "d": 9004, "e": 9005}
LETTERS = {port: letter for letter, port in PORTS.items()}


def server(name: str, **params: object) -> UpstreamServerConf:
    """``server 127.0.0.1:900N params;`` for the letter ``name`` (``"d*"``: a backup)."""
    addr = PeerAddr("127.0.0.1", PORTS[name.rstrip("*")])
    if name.endswith("*"):
        params["backup"] = True
    return UpstreamServerConf(name=addr.name, addrs=(addr,), **params)  # type: ignore[arg-type]


def peer_set(*servers: UpstreamServerConf) -> PeerSet:
    return PeerSet.from_conf(UpstreamConf(name="backend", servers=servers))


def peers(*names: str, **params: object) -> PeerSet:
    """Peers for the letters ``names``, each with the same server ``params``."""
    return peer_set(*(server(name, **params) for name in names))


def weighted_peers(**weights: int) -> PeerSet:
    """Peers for the letters given as keywords, with those weights (``a=2, b=1``)."""
    return peer_set(*(server(name, weight=weight) for name, weight in weights.items()))


def letter(peer: Peer | None) -> str:
    """The peer's letter, ``-`` for no peer (nginx's "no live upstreams")."""
    return "-" if peer is None else LETTERS[peer.addr.port]


def named(balancer: Balancer, name: str) -> Peer:
    """The balancer's peer (primary or backup) with the letter ``name``."""
    return next(p for p in balancer.peers.primary + balancer.peers.backup if letter(p) == name)


def start(balancer: Balancer, now: float = 100.0) -> tuple[BalancerState, Peer | None]:
    """A new request and its first try's peer (not freed: the caller decides how it ends)."""
    state = balancer.new_request(0)
    return state, balancer.get(state, now)


class ScriptedRandom(random.Random):
    """``randrange`` returns the scripted values in order, so draws are exact sequences; running
    out of values fails the test (IndexError) instead of drawing something unplanned."""

    def __init__(self, values: list[int]) -> None:
        super().__init__(0)
        self.values = list(values)

    def randrange(self, *args: int, **kwargs: object) -> int:  # type: ignore[override]
        return self.values.pop(0)
