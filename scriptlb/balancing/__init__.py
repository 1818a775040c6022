"""Balancing methods: one small class per method, all implementing ``base.Balancer``.

``create_balancer`` maps an upstream's ``BalancerMethodConf`` (the directive name as ``kind``,
its words as ``args``) to the class; round robin is the default, as in nginx.
"""

from __future__ import annotations

from collections.abc import Callable

from scriptlb.balancing.base import Balancer, BalancerState, initial_tries
from scriptlb.balancing.ewma import Ewma
from scriptlb.balancing.hash import ConsistentHash, Hash
from scriptlb.balancing.ip_hash import IpHash
from scriptlb.balancing.least_conn import LeastConn
from scriptlb.balancing.least_time import LeastTime
from scriptlb.balancing.random import Random
from scriptlb.balancing.round_robin import RoundRobin
from scriptlb.config.model import UpstreamConf
from scriptlb.state.peers import PeerSet

Factory = Callable[[PeerSet, tuple[str, ...]], Balancer]


def _hash(peers: PeerSet, args: tuple[str, ...]) -> Balancer:
    """``hash KEY [consistent]``: the ketama ring only when asked for."""
    if "consistent" in args[1:]:
        return ConsistentHash(peers, args)
    return Hash(peers, args)


# BalancerMethodConf.kind -> constructor; every class takes (peers, args)
METHODS: dict[str, Factory] = {
    "round_robin": lambda peers, args: RoundRobin(peers),
    "least_conn": LeastConn,
    "hash": _hash,
    "ip_hash": IpHash,
    "random": Random,
    "least_time": LeastTime,
    "ewma": Ewma,
}


def create_balancer(conf: UpstreamConf, peers: PeerSet | None = None) -> Balancer:
    """The balancer an upstream's config asks for, over ``peers`` (built from conf if omitted).

    Raises ValueError for an unknown method or arguments the method refuses.
    """
    try:
        factory = METHODS[conf.method.kind]
    except KeyError:
        raise ValueError(f'unsupported balancing method "{conf.method.kind}"') from None
    return factory(peers if peers is not None else PeerSet.from_conf(conf), conf.method.args)


__all__ = [
    "METHODS",
    "Balancer",
    "BalancerState",
    "ConsistentHash",
    "Ewma",
    "Hash",
    "IpHash",
    "LeastConn",
    "LeastTime",
    "Random",
    "RoundRobin",
    "create_balancer",
    "initial_tries",
]
