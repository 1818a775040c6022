"""hooks/fastest_first.py through real sockets: a log_by_python hook turning
the live peer statistics into round-robin weights.

Three backends, one answering 50 ms slower than the other two: after a bounded warm-up at least 80% of 500
sequential requests go to the two fast ones; when a fast one starts failing, its share drops
within a bounded number of requests, and it comes back once it recovers."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from conftest import ROOT
from helpers import BackendRequest, Backends, Scriptlb, get, respond

pytestmark = pytest.mark.slow

HOOK = ROOT / "hooks" / "fastest_first.py"
FAIL_TIMEOUT = 1  # seconds: how long a failure keeps a peer at weight 1 (fail_timeout)

CONF = """
events {{}}
http {{
    python_shared_dict fastest_first 1m;
    upstream b {{
        server {a} max_fails=0 fail_timeout={ft}s;
        server {b} max_fails=0 fail_timeout={ft}s;
        server {c} max_fails=0 fail_timeout={ft}s;
    }}
    server {{
        listen 127.0.0.1:{{port0}};
        location / {{
            proxy_pass http://b;
            proxy_next_upstream error timeout http_500;
            log_by_python_file {hook};
            log_by_python_timeout 1s;  # (the weights are checked here, not the budget)
        }}
    }}
}}
"""


def slow(delay: float):
    answer = respond(body=b"slow")

    async def behaviour(req: BackendRequest, writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(delay)
        return await answer(req, writer)

    return behaviour


def tries(backends: Backends) -> list[int]:
    return [len(b.requests) for b in backends]


def send(port: int, backends: Backends, requests: int) -> list[int]:
    """Send ``requests`` sequential requests (each must succeed); the tries each backend got."""
    before = tries(backends)
    for _ in range(requests):
        assert get(port).status == 200
    return [x - y for x, y in zip(tries(backends), before, strict=True)]


def share_of(port: int, backends: Backends, index: int, requests: int) -> float:
    """The share of the tries of ``requests`` sequential requests that went to ``index``."""
    delta = send(port, backends, requests)
    return delta[index] / sum(delta)


# The fast peers answer in 10 ms, not at once: the hook's weights are ratios of averages, and
# on a loaded machine two sub-millisecond averages differ by whatever noise the machine adds
# (a recovered fast peer got weight 5 against its twin's 10, a share of 0.28). With 10 ms the
# same noise leaves the twins' weights at 8-10; the slow one (60 ms) stays at 2.
FAST, SLOW = 0.010, 0.060


def test_fastest_first_prefers_fast_peers_and_moves_off_a_failing_one(tmp_path: Path) -> None:
    with Backends(slow(FAST), slow(FAST), slow(SLOW)) as backends:
        conf = CONF.format(a=backends[0].addr, b=backends[1].addr, c=backends[2].addr,
                           ft=FAIL_TIMEOUT, hook=HOOK)
        with Scriptlb(conf, tmp_path) as lb:
            send(lb.port, backends, 60)  # warm-up: every peer measured, weights set
            delta = send(lb.port, backends, 500)
            fast_share = (delta[0] + delta[1]) / sum(delta)
            assert fast_share >= 0.8, delta  # plain round robin would give 2/3

            backends[0].behaviour = respond(500, b"broken")  # a fast peer starts failing
            share_of(lb.port, backends, 0, 40)  # the bound: within 40 requests its weight drops to 1
            failing_share = share_of(lb.port, backends, 0, 200)
            assert failing_share <= 0.15, failing_share  # (was about 10/21 before)

            backends[0].behaviour = slow(FAST)  # it recovers
            deadline = time.monotonic() + FAIL_TIMEOUT + 8
            recovered = 0.0
            while time.monotonic() < deadline and recovered < 0.3:
                recovered = share_of(lb.port, backends, 0, 50)
            assert recovered >= 0.3, recovered  # back to a fast peer's share (about 10/21)
    print(f"fastest_first: fast peers {fast_share:.0%} of 500, a failing one {failing_share:.0%}, "
          f"recovered {recovered:.0%}")


ERROR_LOG_CONF = "error_log {tmp}/error.log notice;\n"


def test_fastest_first_with_sub_millisecond_peers(tmp_path: Path) -> None:
    """Backends answering in well under a millisecond: $upstream_response_time reads 0.000 and
    an average can be 0; the hook must keep running (no ZeroDivisionError) and keep every
    peer at a real weight. How even the split is depends on the machine: a loaded one adds
    milliseconds to some tries (this process runs the client, the worker and the backends), and
    a peer whose average is 3 ms gets weight 3; the weights for given averages are
    test_hooks_kit's. Whatever the noise, no weight goes below 1 of 21: every peer is sampled."""
    with Backends(respond(body=b"a"), respond(body=b"b"), respond(body=b"c")) as backends:
        conf = ERROR_LOG_CONF.format(tmp=tmp_path) + CONF.format(
            a=backends[0].addr, b=backends[1].addr, c=backends[2].addr, ft=FAIL_TIMEOUT, hook=HOOK)
        with Scriptlb(conf, tmp_path) as lb:
            send(lb.port, backends, 30)
            delta = send(lb.port, backends, 300)
            weights = [p.weight for p in lb.runtime().upstreams["b"].peers.primary]
    log = (tmp_path / "error.log").read_text()
    assert "log_by_python" not in log, log[-2000:]
    assert min(delta) >= 300 // 21 - 2, delta  # weight 1 against 10 and 10 at the least
    assert all(w >= 1 for w in weights), weights
