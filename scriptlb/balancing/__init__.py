"""Balancing methods: one small class per method, all implementing ``base.Balancer``."""

from __future__ import annotations

from scriptlb.balancing.base import Balancer, BalancerState, initial_tries
from scriptlb.balancing.round_robin import RoundRobin
from scriptlb.config.model import UpstreamConf
from scriptlb.peers import PeerSet

# method name as in BalancerMethodConf.kind -> class; later methods register here
METHODS: dict[str, type[RoundRobin]] = {"round_robin": RoundRobin}


def create_balancer(conf: UpstreamConf, peers: PeerSet | None = None) -> Balancer:
    """The balancer an upstream's config asks for, over ``peers`` (built from conf if omitted)."""
    try:
        method = METHODS[conf.method.kind]
    except KeyError:
        raise ValueError(f'unsupported balancing method "{conf.method.kind}"') from None
    return method(peers if peers is not None else PeerSet.from_conf(conf))


__all__ = ["METHODS", "Balancer", "BalancerState", "RoundRobin", "create_balancer", "initial_tries"]
