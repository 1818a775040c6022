"""Round robin: nginx's smooth WRR sequences, tries budget, passive health, backup, single peer.

Pure unit tests: the clock is the ``now`` argument, peers are built from config objects.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import Scriptlb, free_ports

from scriptlb.balancing import RoundRobin, create_balancer
from scriptlb.config.model import NextUpstream, PeerAddr, ProxyConf, UpstreamConf, UpstreamServerConf
from scriptlb.request.retry import (
    PASS_THROUGH,
    RETRY,
    Failure,
    decide,
    failure_for_status,
    is_counted_failure,
    is_idempotent,
    last_failure_status,
)
from scriptlb.state.peers import Peer, PeerSet

PORTS = {"a": 9001, "b": 9002, "c": 9003, "d": 9004, "e": 9005}
NAMES = {f"127.0.0.1:{port}": letter for letter, port in PORTS.items()}


def server(letter: str, **params: object) -> UpstreamServerConf:
    addr = PeerAddr("127.0.0.1", PORTS[letter])
    return UpstreamServerConf(name=addr.name, addrs=(addr,), **params)  # type: ignore[arg-type]


def balancer(*servers: UpstreamServerConf) -> RoundRobin:
    return RoundRobin(PeerSet.from_conf(UpstreamConf(name="backend", servers=servers)))


def letter(peer: Peer | None) -> str:
    return "-" if peer is None else NAMES[peer.name]


def pick(rr: RoundRobin, now: float = 100.0, failed: bool = False) -> str:
    """One whole request with one try: get then free."""
    state = rr.new_request(0)
    peer = rr.get(state, now)
    if peer is not None:
        rr.free(state, peer, failed, now)
    return letter(peer)


def picks(rr: RoundRobin, count: int, now: float = 100.0) -> str:
    return " ".join(pick(rr, now) for _ in range(count))


# --------------------------------------------------------------------------- smooth WRR


@pytest.mark.parametrize(
    ("weights", "expected"),
    [
        ({"a": 5, "b": 1, "c": 1}, "a a b a c a a a a b a c a a"),
        ({"a": 2, "b": 1}, "a b a a b a"),
        ({"a": 3, "b": 2}, "a b a b a a b a b a"),
        ({"a": 1, "b": 1, "c": 1}, "a b c a b c"),
        ({"a": 1, "b": 2}, "b a b b a b"),
    ],
)
def test_smooth_weighted_sequence(weights: dict[str, int], expected: str) -> None:
    rr = balancer(*(server(name, weight=w) for name, w in weights.items()))
    assert picks(rr, len(expected.split())) == expected


def test_shares_over_100k_picks_are_exact_per_period() -> None:
    rr = balancer(server("a", weight=3), server("b", weight=7), server("c", weight=11))
    counts = Counter(pick(rr) for _ in range(21 * 5000))
    assert counts == {"a": 3 * 5000, "b": 7 * 5000, "c": 11 * 5000}


def test_shares_with_a_down_peer_over_100k_picks() -> None:
    rr = balancer(server("a", weight=5), server("b", weight=1, down=True), server("c", weight=1))
    counts = Counter(pick(rr) for _ in range(6 * 20000))
    assert counts == {"a": 5 * 20000, "c": 20000}


def test_server_line_with_several_addresses_gives_several_peers() -> None:
    addrs = (PeerAddr("10.0.0.1", 80), PeerAddr("10.0.0.2", 80), PeerAddr("::1", 81))
    conf = UpstreamConf(
        name="u", servers=(UpstreamServerConf("name", addrs, weight=2, max_fails=3, fail_timeout=5.0),)
    )
    peer_set = PeerSet.from_conf(conf)
    assert [p.name for p in peer_set.primary] == ["10.0.0.1:80", "10.0.0.2:80", "[::1]:81"]
    assert [(p.id, p.weight, p.max_fails, p.fail_timeout) for p in peer_set.primary] == [
        (0, 2, 3, 5.0),
        (1, 2, 3, 5.0),
        (2, 2, 3, 5.0),
    ]
    assert not peer_set.single
    assert peer_set.tries == 3


def test_create_balancer_by_method_name() -> None:
    conf = UpstreamConf(name="u", servers=(server("a"), server("b")))
    rr = create_balancer(conf)
    assert isinstance(rr, RoundRobin)
    assert [p.name for p in rr.peers.primary] == ["127.0.0.1:9001", "127.0.0.1:9002"]


@pytest.mark.parametrize(
    ("kind", "args", "cls"),
    [
        ("round_robin", (), "RoundRobin"),
        ("least_conn", (), "LeastConn"),
        ("hash", ("$request_uri",), "Hash"),
        ("hash", ("$request_uri", "consistent"), "ConsistentHash"),
        ("ip_hash", (), "IpHash"),
        ("random", ("two",), "Random"),
        ("least_time", ("header",), "LeastTime"),
        ("ewma", (), "Ewma"),
    ],
)
def test_create_balancer_maps_every_method(kind: str, args: tuple[str, ...], cls: str) -> None:
    from scriptlb.config.model import BalancerMethodConf

    conf = UpstreamConf(name="u", servers=(server("a"), server("b")), method=BalancerMethodConf(kind, args))
    assert type(create_balancer(conf)).__name__ == cls


def test_create_balancer_rejects_unknown_method() -> None:
    from scriptlb.config.model import BalancerMethodConf

    conf = UpstreamConf(name="u", servers=(server("a"),), method=BalancerMethodConf(kind="magic"))
    with pytest.raises(ValueError, match='unsupported balancing method "magic"'):
        create_balancer(conf)


# --------------------------------------------------------------------------- tries budget


@pytest.mark.parametrize(
    ("servers", "cap", "tries"),
    [
        ((server("a"), server("b"), server("c")), 0, 3),
        ((server("a"), server("b"), server("c")), 2, 2),
        ((server("a"), server("b"), server("c")), 5, 3),
        ((server("a"), server("b", down=True), server("c")), 0, 2),
        ((server("a"), server("b"), server("c", backup=True)), 0, 3),
        ((server("a"), server("b"), server("c", backup=True, down=True)), 0, 2),
        ((server("a"),), 0, 1),
        ((server("a", down=True),), 0, 0),
    ],
)
def test_initial_tries(servers: tuple[UpstreamServerConf, ...], cap: int, tries: int) -> None:
    assert balancer(*servers).new_request(cap).tries == tries


def test_one_request_never_repeats_a_peer_and_ends_with_no_live() -> None:
    rr = balancer(server("a"), server("b"), server("c"))
    state = rr.new_request(0)
    trail = []
    tries = []
    for _ in range(4):
        peer = rr.get(state, 100.0)
        trail.append(letter(peer))
        if peer is None:
            break
        rr.free(state, peer, True, 100.0)
        tries.append(state.tries)
    assert trail == ["a", "b", "c", "-"]
    assert tries == [2, 1, 0]


def test_new_request_ignores_a_key() -> None:
    rr = balancer(server("a"), server("b"))
    assert rr.new_request(0, "some-key").tries == rr.new_request(0).tries == 2


def test_free_never_takes_tries_below_zero() -> None:
    rr = balancer(server("a"), server("b"))
    state = rr.new_request(1)
    peer = rr.get(state, 1.0)
    assert peer is not None
    rr.free(state, peer, False, 1.0)
    assert state.tries == 0
    peer = rr.get(state, 1.0)
    assert peer is not None
    rr.free(state, peer, False, 1.0)
    assert state.tries == 0


def test_conns_counted_between_get_and_free() -> None:
    rr = balancer(server("a"), server("b"))
    s1, s2 = rr.new_request(0), rr.new_request(0)
    a, b = rr.get(s1, 1.0), rr.get(s2, 1.0)
    assert a is not None and b is not None
    assert (a.conns, b.conns) == (1, 1)
    assert s1.current is a
    rr.free(s1, a, False, 1.0)
    assert (a.conns, b.conns, s1.current) == (0, 1, None)


# --------------------------------------------------------------------------- down, max_conns


def test_down_peer_is_never_chosen() -> None:
    rr = balancer(server("a"), server("b", down=True), server("c"))
    assert picks(rr, 6) == "a c a c a c"


def test_max_conns_skips_a_busy_peer_until_freed() -> None:
    rr = balancer(server("a", max_conns=1), server("b"))
    held = rr.new_request(0)
    assert letter(rr.get(held, 1.0)) == "a"
    # a is at max_conns: every other request goes to b
    assert picks(rr, 3, now=1.0) == "b b b"
    a = held.current
    assert a is not None
    rr.free(held, a, False, 1.0)
    # b's current_weight grew while a was skipped (a: 0, b: +1): b wins once more, then a
    assert picks(rr, 3, now=1.0) == "b a b"


def test_all_peers_at_max_conns_is_no_live() -> None:
    rr = balancer(server("a", max_conns=1), server("b", max_conns=1))
    s1, s2, s3 = rr.new_request(0), rr.new_request(0), rr.new_request(0)
    assert [letter(rr.get(s, 1.0)) for s in (s1, s2, s3)] == ["a", "b", "-"]


# --------------------------------------------------------------------------- max_fails windows


def test_failed_peer_is_skipped_for_fail_timeout_then_probed() -> None:
    rr = balancer(server("a", max_fails=1, fail_timeout=10.0), server("b"))
    assert pick(rr, now=100.0, failed=True) == "a"
    # disabled while now - checked <= fail_timeout (nginx's inclusive bound)
    assert [pick(rr, now=t) for t in (100.0, 105.0, 110.0)] == ["b", "b", "b"]
    # the window is over: a is eligible again, but its failure left current_weight at -1 and
    # effective_weight at 0 (1 - 1 // 1), so it needs two rounds before it wins again
    assert [pick(rr, now=t) for t in (110.5, 111.0, 112.0, 113.0)] == ["b", "b", "a", "b"]


def test_disabled_warning_only_when_max_fails_reached() -> None:
    rr = balancer(server("a", max_fails=3, fail_timeout=10.0), server("b", max_fails=3))
    warnings = []
    a = rr.peers.primary[0]
    for t in (1.0, 2.0, 3.0):
        state = rr.new_request(0)
        state.tried = 0b10  # steer the request to a: b already tried
        peer = rr.get(state, t)
        assert peer is a
        warnings.append(rr.free(state, a, True, t))
    assert warnings == [False, False, True]
    assert (a.fails, a.accessed, a.checked) == (3, 3.0, 3.0)
    assert picks(rr, 3, now=4.0) == "b b b"


def test_max_fails_zero_disables_accounting() -> None:
    rr = balancer(server("a", max_fails=0), server("b"))
    a = rr.peers.primary[0]
    state = rr.new_request(0)
    assert rr.get(state, 1.0) is a
    assert rr.free(state, a, True, 1.0) is False
    assert (a.fails, a.effective_weight) == (1, 1)
    assert picks(rr, 4, now=1.0) == "b a b a"


def test_success_inside_the_window_does_not_clear_fails() -> None:
    rr = balancer(server("a", max_fails=2, fail_timeout=10.0), server("b", max_fails=2))
    a = rr.peers.primary[0]
    assert pick(rr, now=100.0, failed=True) == "a"
    assert a.fails == 1
    assert pick(rr, now=101.0) == "b"
    assert pick(rr, now=102.0) == "a"  # a success, but checked was not refreshed: fails stay
    assert a.fails == 1
    assert pick(rr, now=103.0) == "b"
    assert pick(rr, now=104.0, failed=True) == "a"
    assert a.fails == 2  # accumulated across the success: disabled now
    assert picks(rr, 3, now=105.0) == "b b b"


def test_success_after_the_window_clears_fails() -> None:
    rr = balancer(server("a", max_fails=2, fail_timeout=10.0), server("b", max_fails=2))
    a = rr.peers.primary[0]
    assert pick(rr, now=100.0, failed=True) == "a"
    assert pick(rr, now=101.0) == "b"
    # more than fail_timeout after the last check: the selection refreshes checked
    assert pick(rr, now=111.0) == "a"
    assert (a.fails, a.checked, a.accessed) == (0, 111.0, 100.0)


def test_probe_failure_after_window_disables_again_immediately() -> None:
    rr = balancer(server("a", max_fails=1, fail_timeout=10.0), server("b", max_fails=1))
    assert pick(rr, now=100.0, failed=True) == "a"
    assert pick(rr, now=111.0, failed=True) == "b"
    assert pick(rr, now=111.5, failed=True) == "a"  # b failed; a's window (since 100) is over
    # both disabled now, no backup: no live upstreams until a window ends
    assert pick(rr, now=112.0) == "-"
    assert pick(rr, now=121.5) == "b"


def test_effective_weight_drops_on_failure_and_recovers_one_per_round() -> None:
    rr = balancer(server("a", weight=10, max_fails=2, fail_timeout=10.0), server("b", weight=1))
    a, b = rr.peers.primary
    state = rr.new_request(0)
    assert rr.get(state, 1.0) is a
    rr.free(state, a, True, 1.0)
    assert a.effective_weight == 5  # 10 - 10 // 2
    effective = []
    for _ in range(6):
        state = rr.new_request(0)
        peer = rr.get(state, 2.0)
        assert peer is not None
        rr.free(state, peer, False, 2.0)
        effective.append(a.effective_weight)
    assert effective == [6, 7, 8, 9, 10, 10]
    assert b.effective_weight == 1


def test_effective_weight_floor_is_zero() -> None:
    rr = balancer(server("a", weight=3, max_fails=1, fail_timeout=0.0), server("b"))
    a = rr.peers.primary[0]
    for t in (1.0, 2.0):
        state = rr.new_request(0)
        state.tried = 0b10
        assert rr.get(state, t) is a
        rr.free(state, a, True, t)
    assert a.effective_weight == 0


# --------------------------------------------------------------------------- backup


def test_backup_used_only_when_no_primary_is_usable() -> None:
    rr = balancer(server("a"), server("b", down=True), server("c", backup=True), server("d", backup=True))
    assert picks(rr, 3) == "a a a"
    rr.peers.primary[0].down = True
    assert picks(rr, 4) == "c d c d"


def test_request_switches_to_backup_with_a_fresh_tried_map() -> None:
    rr = balancer(server("a"), server("b"), server("c", backup=True), server("d", backup=True))
    state = rr.new_request(0)
    assert state.tries == 4
    trail = []
    while True:
        peer = rr.get(state, 1.0)
        trail.append(letter(peer))
        if peer is None:
            break
        rr.free(state, peer, True, 1.0)
    assert trail == ["a", "b", "c", "d", "-"]
    assert state.on_backup and state.tries == 0
    # all four failed (max_fails=1): the next request finds no live upstream at all
    assert pick(rr, now=2.0) == "-"


def test_backup_state_is_per_request() -> None:
    rr = balancer(server("a", max_fails=1), server("c", backup=True))
    assert pick(rr, now=1.0, failed=True) == "a"
    assert pick(rr, now=2.0) == "c"
    assert pick(rr, now=12.0) == "a"  # the primary's window ended: back on the primary list


# --------------------------------------------------------------------------- single peer


def test_single_peer_ignores_max_fails_and_is_never_retried() -> None:
    rr = balancer(server("a", max_fails=1, fail_timeout=10.0))
    assert rr.peers.single
    state = rr.new_request(0)
    a = rr.get(state, 1.0)
    assert a is not None
    assert rr.free(state, a, True, 1.0) is False
    assert (state.tries, a.fails, a.conns) == (0, 0, 0)
    assert picks(rr, 2, now=1.5) == "a a"


def test_single_peer_down_or_full_is_no_live() -> None:
    rr = balancer(server("a", max_conns=1))
    held = rr.new_request(0)
    assert letter(rr.get(held, 1.0)) == "a"
    assert pick(rr, now=1.0) == "-"
    assert letter(rr.get(rr.new_request(0), 1.0)) == "-"
    down = balancer(server("a", down=True))
    assert pick(down) == "-"


def test_one_primary_with_a_backup_is_not_single() -> None:
    rr = balancer(server("a", max_fails=1), server("b", backup=True))
    assert not rr.peers.single
    state = rr.new_request(0)
    a = rr.get(state, 1.0)
    assert a is not None
    assert rr.free(state, a, True, 1.0) is True
    assert state.tries == 1
    assert letter(rr.get(state, 1.0)) == "b"


# --------------------------------------------------------------------------- rebuild


def test_rebuild_keeps_requests_in_flight_on_their_peer_set() -> None:
    rr = balancer(server("a"), server("b"))
    old_state = rr.new_request(0)
    old_peer = rr.get(old_state, 1.0)
    rr.rebuild(PeerSet.from_conf(UpstreamConf(name="backend", servers=(server("c"), server("d")))))
    assert old_state.peer_set is not rr.peers
    assert letter(rr.get(old_state, 1.0)) == "b"
    assert old_peer is not None
    rr.free(old_state, old_peer, False, 1.0)
    assert picks(rr, 2) == "c d"


# --------------------------------------------------------------------------- against a real nginx
#
# The same upstreams in a real nginx and in RoundRobin + retry.decide: every request's trail
# ($upstream_addr, $upstream_status) and final status must be identical. Backends are nginx
# `return` servers, a refused port ("connect() failed") and a server answering 502.

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)


@contextlib.contextmanager
def nginx_running(tmp_path: Path, http_block: str, wait_ports: list[int]) -> Iterator[Path]:
    """A real nginx (one process) serving ``http_block``; yields its prefix directory."""
    assert NGINX is not None
    (tmp_path / "logs").mkdir(exist_ok=True)
    (tmp_path / "nginx.conf").write_text(
        f"""
        daemon off; master_process off; worker_processes 1; pid {tmp_path}/nginx.pid;
        error_log {tmp_path}/logs/error.log;
        events {{ worker_connections 128; }}
        http {{
            access_log off;
            client_body_temp_path {tmp_path}/body; proxy_temp_path {tmp_path}/proxy;
            fastcgi_temp_path {tmp_path}/fcgi; uwsgi_temp_path {tmp_path}/uwsgi;
            scgi_temp_path {tmp_path}/scgi;
            {http_block}
        }}
        """
    )
    proc = subprocess.Popen(
        [NGINX, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        for port in wait_ports:
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError((tmp_path / "logs/error.log").read_text()) from None
                    time.sleep(0.02)
        yield tmp_path
    finally:
        proc.send_signal(signal.SIGQUIT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# behaviours that fail the try itself -> nginx's failure kind
_TRY_FAILURES = {
    "refused": Failure.ERROR,
    "closes": Failure.ERROR,
    "garbage": Failure.INVALID_HEADER,
    "hangs": Failure.TIMEOUT,
}


def simulate(
    rr: RoundRobin,
    conf: ProxyConf,
    behaviour: dict[str, Any],
    now: float,
    method: str = "GET",
    durations: dict[str, float] | None = None,
) -> str:
    """One request through RoundRobin + retry, as the proxy's tries loop runs them.

    Returns "addr, addr|status, status|final" like the nginx log line below. Behaviours: "ok",
    "refused" (connect fails), "closes" (reads the request, closes without answering),
    "garbage" (answers no valid HTTP), "hangs" (never answers: read timeout), "502", "404"...
    ``durations``: seconds a try on that peer takes (for proxy_next_upstream_timeout).
    """
    idempotent = is_idempotent(method)
    started = now
    state = rr.new_request(conf.next_upstream_tries)
    addrs: list[str] = []
    statuses: list[str] = []
    while True:
        peer = rr.get(state, now)
        if peer is None:
            addrs.append(rr.peers.name)  # nginx logs the upstream's name for "no live upstreams"
            statuses.append("502")
            final = decide(Failure.NOLIVE, 0, now, now, conf, True, False)
            return f"{', '.join(addrs)}|{', '.join(statuses)}|{final}"
        addrs.append(peer.name)
        now += (durations or {}).get(peer.name, 0.0)
        kind = behaviour[peer.name]
        if callable(kind):
            kind = kind()  # a backend whose answer depends on how many requests it has seen
        if kind == "ok":
            rr.free(state, peer, False, now)
            statuses.append("200")
            return f"{', '.join(addrs)}|{', '.join(statuses)}|200"
        if kind in _TRY_FAILURES:
            failure = _TRY_FAILURES[kind]
            rr.free(state, peer, True, now)
            statuses.append(str(last_failure_status(failure)))
            sent = kind != "refused"
            verdict = decide(failure, state.tries, started, now, conf, idempotent, request_sent=sent)
        else:  # the peer answered with this status of its own ("502", "404"...)
            statuses.append(kind)
            failure = failure_for_status(int(kind))
            assert failure is not None
            verdict = decide(failure, state.tries - 1, started, now, conf, idempotent, True)
            rr.free(state, peer, is_counted_failure(failure, verdict == RETRY), now)
            if verdict == PASS_THROUGH:
                verdict = int(kind)  # the upstream's own response reaches the client
        if verdict != RETRY:
            return f"{', '.join(addrs)}|{', '.join(statuses)}|{verdict}"


@pytest.mark.nginx
@pytest.mark.skipif(NGINX is None, reason="nginx is not installed")
def test_trails_match_a_real_nginx(tmp_path: Path) -> None:
    """RoundRobin + retry.decide, nginx and scriptlb's proxy give every request the same trail."""
    ok_a, ok_b, ok_c, ok_e, bad, dead1, dead2, dead3, proxy = free_ports(9)
    name = {port: f"127.0.0.1:{port}" for port in (ok_a, ok_b, ok_c, ok_e, bad, dead1, dead2, dead3)}
    behaviour = {name[p]: "ok" for p in (ok_a, ok_b, ok_c, ok_e)}
    behaviour |= {name[bad]: "502"} | {name[p]: "refused" for p in (dead1, dead2, dead3)}
    # (upstream name, server lines, proxy_next_upstream, proxy_next_upstream_tries, requests)
    cases = [
        (
            "weighted",
            f"server {name[ok_a]} weight=5; server {name[ok_b]}; server {name[ok_c]};",
            "error",
            0,
            14,
        ),
        (
            "failover",
            f"server {name[ok_a]}; server {name[dead1]} max_fails=2 fail_timeout=30s; "
            f"server {name[ok_b]} weight=2; server {name[ok_e]} backup;",
            "error timeout",
            0,
            12,
        ),
        ("status", f"server {name[ok_a]}; server {name[bad]}; server {name[ok_b]};", "error http_502", 0, 9),
        ("passthru", f"server {name[bad]}; server {name[ok_a]};", "error", 0, 4),
        ("capped", f"server {name[dead1]}; server {name[dead2]}; server {name[ok_a]};", "error", 2, 6),
        ("nolive", f"server {name[dead1]}; server {name[dead2]}; server {name[ok_e]} backup;", "error", 0, 5),
        ("allgone", f"server {name[dead2]} max_fails=1; server {name[dead3]} max_fails=1;", "error", 0, 4),
        ("off", f"server {name[dead3]}; server {name[ok_c]};", "off", 0, 4),
        ("single", f"server {name[dead1]};", "error", 0, 3),
    ]
    upstreams = "".join(f"upstream {u} {{ {servers} }}\n" for u, servers, *_ in cases)
    locations = "".join(
        f"location /{u} {{ proxy_pass http://{u}; proxy_next_upstream {nu}; "
        f"proxy_next_upstream_tries {tries}; access_log {tmp_path}/logs/trail.log trail; }}\n"
        for u, _, nu, tries, _ in cases
    )
    backends = (
        "".join(
            f"server {{ listen 127.0.0.1:{p}; location / {{ return 200 ok; }} }}\n"
            for p in (ok_a, ok_b, ok_c, ok_e)
        )
        + f"server {{ listen 127.0.0.1:{bad}; location / {{ return 502; }} }}\n"
    )
    http_block = f"""
        log_format trail '$uri|$upstream_addr|$upstream_status|$status';
        {upstreams}
        {backends}
        server {{ listen 127.0.0.1:{proxy}; {locations} }}
    """
    order = [u for u, *_, count in cases for _ in range(count)]

    def drive(port: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        for upstream_name in order:
            conn.request("GET", f"/{upstream_name}")
            conn.getresponse().read()
        conn.close()

    lb_dir = tmp_path / "scriptlb"
    lb_dir.mkdir()
    lb_conf = f"""
        daemon off; master_process off; error_log {lb_dir}/error.log info;
        events {{}}
        http {{
            log_format trail '$uri|$upstream_addr|$upstream_status|$status';
            {upstreams}
            server {{ listen 127.0.0.1:{{port0}}; {locations.replace(str(tmp_path / "logs"), str(lb_dir))} }}
        }}
    """
    with nginx_running(tmp_path, http_block, [proxy, ok_a, bad]):
        drive(proxy)
        # the same upstreams behind scriptlb's own proxy (nginx still serves the backends)
        with Scriptlb(lb_conf, lb_dir) as lb:
            drive(lb.port)
    nginx_lines = (tmp_path / "logs/trail.log").read_text().splitlines()
    scriptlb_lines = (lb_dir / "trail.log").read_text().splitlines()
    assert scriptlb_lines == nginx_lines

    ours = []
    confs = {u: (f"upstream {u} {{ {servers} }}", nu, tries) for u, servers, nu, tries, _ in cases}
    balancers = {u: RoundRobin(PeerSet.from_conf(parse_upstream(u, confs[u][0]))) for u in confs}
    for upstream_name in order:
        _, nu, tries = confs[upstream_name]
        conf = ProxyConf(next_upstream=next_upstream_mask(nu), next_upstream_tries=tries)
        ours.append(f"/{upstream_name}|" + simulate(balancers[upstream_name], conf, behaviour, 1000.0))
    assert len(nginx_lines) == len(order)
    assert ours == nginx_lines


def parse_upstream(name: str, text: str) -> UpstreamConf:
    """The few server parameters the nginx comparison uses, parsed by hand."""
    servers = []
    for line in text.split("{", 1)[1].rstrip("} ").split(";"):
        words = line.split()
        if not words:
            continue
        host, port = words[1].rsplit(":", 1)
        params: dict[str, Any] = {}
        for word in words[2:]:
            key, _, val = word.partition("=")
            if key in ("backup", "down"):
                params[key] = True
            elif key == "fail_timeout":
                params[key] = float(val.rstrip("s"))
            else:
                params[key] = int(val)
        servers.append(UpstreamServerConf(words[1], (PeerAddr(host, int(port)),), **params))
    return UpstreamConf(name=name, servers=tuple(servers))


def next_upstream_mask(words: str) -> NextUpstream:
    mask = NextUpstream(0)
    for word in words.split():
        mask |= NextUpstream[word.upper()]
    return mask


class ClosingBackend:
    """Reads each request's head, then closes without a byte of response (nginx: "upstream
    prematurely closed connection", an `error` after the request was sent). With
    ``answer_after=N`` the connections after the first N get a 200 instead (a flaky peer)."""

    def __init__(self, answer_after: int | None = None, delay: float = 0.0, reply: bytes = b"") -> None:
        self.answer_after = answer_after
        self.delay = delay  # seconds between reading a request and closing
        self.reply = reply  # sent before closing (garbage: nginx's invalid_header)
        self.seen = 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(2)
                data = b""
                with contextlib.suppress(OSError):
                    while b"\r\n\r\n" not in data and (chunk := conn.recv(65536)):
                        data += chunk
                    self.seen += 1
                    time.sleep(self.delay)
                    if self.reply:
                        conn.sendall(self.reply)
                    if self.answer_after is not None and self.seen > self.answer_after:
                        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")

    def __enter__(self) -> ClosingBackend:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.thread.join(5)
        self.sock.close()


@pytest.mark.nginx
@pytest.mark.skipif(NGINX is None, reason="nginx is not installed")
def test_non_idempotent_trails_match_a_real_nginx(tmp_path: Path) -> None:
    ok, proxy = free_ports(2)
    with ClosingBackend() as closer:
        servers = f"server 127.0.0.1:{closer.port} max_fails=0; server 127.0.0.1:{ok};"
        behaviour = {f"127.0.0.1:{closer.port}": "closes", f"127.0.0.1:{ok}": "ok"}
        masks = {"plain": "error", "nonidem": "error non_idempotent", "cap1": "error non_idempotent"}
        tries = {"plain": 0, "nonidem": 0, "cap1": 1}
        http_block = f"""
            log_format trail '$request_method $uri|$upstream_addr|$upstream_status|$status';
            {"".join(f"upstream {u} {{ {servers} }}" for u in masks)}
            server {{ listen 127.0.0.1:{ok}; location / {{ return 200 ok; }} }}
            server {{
                listen 127.0.0.1:{proxy};
                {
            "".join(
                f"location /{u} {{ proxy_pass http://{u}; proxy_next_upstream {masks[u]}; "
                f"proxy_next_upstream_tries {tries[u]}; access_log {tmp_path}/logs/trail.log trail; }}"
                for u in masks
            )
        }
            }}
        """
        order = [(method, u) for u in masks for method in ("GET", "POST", "POST", "PATCH", "PUT", "GET")]
        with nginx_running(tmp_path, http_block, [proxy, ok]):
            conn = http.client.HTTPConnection("127.0.0.1", proxy, timeout=5)
            for method, upstream_name in order:
                conn.request(method, f"/{upstream_name}", body=b"x" if method != "GET" else None)
                conn.getresponse().read()
            conn.close()
    nginx_lines = (tmp_path / "logs/trail.log").read_text().splitlines()

    upstream_conf = parse_upstream("u", f"upstream u {{ {servers} }}")
    balancers = {u: RoundRobin(PeerSet.from_conf(upstream_conf)) for u in masks}
    ours = []
    for method, u in order:
        conf = ProxyConf(next_upstream=next_upstream_mask(masks[u]), next_upstream_tries=tries[u])
        ours.append(f"{method} /{u}|" + simulate(balancers[u], conf, behaviour, 1000.0, method))
    assert len(nginx_lines) == len(order)
    assert ours == nginx_lines


@pytest.mark.nginx
@pytest.mark.skipif(NGINX is None, reason="nginx is not installed")
def test_effective_weight_recovery_matches_a_real_nginx(tmp_path: Path) -> None:
    """A weight=6 peer fails its first 3 requests (max_fails=4, so it stays eligible): nginx lowers
    its effective weight by 6 // 4 per failure and gives one point back per selection round."""
    ok_b, ok_c, proxy = free_ports(3)
    with ClosingBackend(answer_after=3) as flaky:
        servers = (
            f"server 127.0.0.1:{flaky.port} weight=6 max_fails=4 fail_timeout=60s; "
            f"server 127.0.0.1:{ok_b} weight=2; server 127.0.0.1:{ok_c};"
        )
        http_block = f"""
            log_format trail '$uri|$upstream_addr|$upstream_status|$status';
            upstream flaky {{ {servers} }}
            server {{ listen 127.0.0.1:{ok_b}; location / {{ return 200 ok; }} }}
            server {{ listen 127.0.0.1:{ok_c}; location / {{ return 200 ok; }} }}
            server {{
                listen 127.0.0.1:{proxy};
                location / {{ proxy_pass http://flaky; access_log {tmp_path}/logs/trail.log trail; }}
            }}
        """
        with nginx_running(tmp_path, http_block, [proxy, ok_b, ok_c]):
            conn = http.client.HTTPConnection("127.0.0.1", proxy, timeout=5)
            for _ in range(30):
                conn.request("GET", "/r")
                conn.getresponse().read()
            conn.close()
    nginx_lines = (tmp_path / "logs/trail.log").read_text().splitlines()

    answers = iter(["closes"] * 3)
    behaviour: dict[str, Any] = {
        f"127.0.0.1:{flaky.port}": lambda: next(answers, "ok"),
        f"127.0.0.1:{ok_b}": "ok",
        f"127.0.0.1:{ok_c}": "ok",
    }
    rr = RoundRobin(PeerSet.from_conf(parse_upstream("flaky", f"upstream flaky {{ {servers} }}")))
    conf = ProxyConf()
    ours = ["/r|" + simulate(rr, conf, behaviour, 1000.0) for _ in range(30)]
    assert len(nginx_lines) == 30
    assert ours == nginx_lines
    assert sum(", " in line for line in ours) == 3  # the three failures were retried elsewhere


@pytest.mark.nginx
@pytest.mark.skipif(NGINX is None, reason="nginx is not installed")
def test_status_failures_are_counted_as_nginx_counts_them(tmp_path: Path) -> None:
    """http_5xx/429 count towards max_fails only when nginx moved on; http_403/404 never do."""
    ok, proxy, *status_ports = free_ports(8)
    statuses = [500, 503, 504, 429, 403, 404]
    by_status = dict(zip(statuses, status_ports, strict=True))
    behaviour: dict[str, Any] = {f"127.0.0.1:{ok}": "ok"}
    behaviour |= {f"127.0.0.1:{port}": str(status) for status, port in by_status.items()}
    cases = {}  # upstream -> (servers, proxy_next_upstream)
    for status, port in by_status.items():
        servers = f"server 127.0.0.1:{port} max_fails=1 fail_timeout=60s; server 127.0.0.1:{ok};"
        cases[f"listed{status}"] = (servers, f"error http_{status}")
        cases[f"unlisted{status}"] = (servers, "error")
    backends = "".join(
        f"server {{ listen 127.0.0.1:{port}; location / {{ return {status}; }} }}\n"
        for status, port in by_status.items()
    )
    http_block = f"""
        log_format trail '$uri|$upstream_addr|$upstream_status|$status';
        {"".join(f"upstream {u} {{ {servers} }}" for u, (servers, _) in cases.items())}
        {backends}
        server {{ listen 127.0.0.1:{ok}; location / {{ return 200 ok; }} }}
        server {{
            listen 127.0.0.1:{proxy};
            {
        "".join(
            f"location /{u} {{ proxy_pass http://{u}; proxy_next_upstream {nu}; "
            f"access_log {tmp_path}/logs/trail.log trail; }}"
            for u, (_, nu) in cases.items()
        )
    }
        }}
    """
    order = [u for u in cases for _ in range(5)]
    with nginx_running(tmp_path, http_block, [proxy, ok, *status_ports]):
        conn = http.client.HTTPConnection("127.0.0.1", proxy, timeout=5)
        for upstream_name in order:
            conn.request("GET", f"/{upstream_name}")
            conn.getresponse().read()
        conn.close()
    nginx_lines = (tmp_path / "logs/trail.log").read_text().splitlines()

    balancers = {
        u: RoundRobin(PeerSet.from_conf(parse_upstream(u, f"upstream {u} {{ {servers} }}")))
        for u, (servers, _) in cases.items()
    }
    ours = []
    for u in order:
        conf = ProxyConf(next_upstream=next_upstream_mask(cases[u][1]))
        ours.append(f"/{u}|" + simulate(balancers[u], conf, behaviour, 1000.0))
    assert len(nginx_lines) == len(order)
    assert ours == nginx_lines


@pytest.mark.nginx
@pytest.mark.skipif(NGINX is None, reason="nginx is not installed")
def test_next_upstream_timeout_matches_a_real_nginx(tmp_path: Path) -> None:
    """Peers that fail after 0.4 s with proxy_next_upstream_timeout 0.6 s: a second failed try
    ends the request (0.8 s >= 0.6 s) however many tries are left."""
    ok, proxy = free_ports(2)
    with ClosingBackend(delay=0.4) as s1, ClosingBackend(delay=0.4) as s2, ClosingBackend(delay=0.4) as s3:
        slow = [f"127.0.0.1:{b.port}" for b in (s1, s2, s3)]
        servers = "".join(f"server {name} max_fails=0; " for name in slow) + f"server 127.0.0.1:{ok};"
        http_block = f"""
            log_format trail '$uri|$upstream_addr|$upstream_status|$status';
            upstream slow {{ {servers} }}
            server {{ listen 127.0.0.1:{ok}; location / {{ return 200 ok; }} }}
            server {{
                listen 127.0.0.1:{proxy};
                location / {{
                    proxy_pass http://slow; proxy_next_upstream_timeout 600ms;
                    access_log {tmp_path}/logs/trail.log trail;
                }}
            }}
        """
        with nginx_running(tmp_path, http_block, [proxy, ok]):
            conn = http.client.HTTPConnection("127.0.0.1", proxy, timeout=10)
            for _ in range(4):
                conn.request("GET", "/t")
                conn.getresponse().read()
            conn.close()
    nginx_lines = (tmp_path / "logs/trail.log").read_text().splitlines()

    rr = RoundRobin(PeerSet.from_conf(parse_upstream("slow", f"upstream slow {{ {servers} }}")))
    behaviour = {name: "closes" for name in slow} | {f"127.0.0.1:{ok}": "ok"}
    conf = ProxyConf(next_upstream_timeout=0.6)
    durations = dict.fromkeys(slow, 0.4)
    ours = ["/t|" + simulate(rr, conf, behaviour, 1000.0 + 10 * i, durations=durations) for i in range(4)]
    assert ours == nginx_lines
    assert any(line.endswith("|502, 502|502") for line in ours)  # stopped with tries left


@pytest.mark.nginx
@pytest.mark.skipif(NGINX is None, reason="nginx is not installed")
def test_invalid_header_and_timeout_match_a_real_nginx(tmp_path: Path) -> None:
    """Garbage is retried only with invalid_header; a read timeout only with timeout (504)."""
    ok, proxy = free_ports(2)
    invalid = b"HTTP/1.1 200 OK\r\nX-A\x00: b\r\n\r\n"  # nginx: "upstream sent invalid header"
    with ClosingBackend(reply=invalid) as garbage, ClosingBackend(delay=1.0) as hang:
        bad = {"garbage": f"127.0.0.1:{garbage.port}", "hangs": f"127.0.0.1:{hang.port}"}
        cases = {  # upstream -> (bad peer kind, proxy_next_upstream)
            "g_default": ("garbage", "error timeout"),
            "g_listed": ("garbage", "error timeout invalid_header"),
            "h_default": ("hangs", "error timeout"),
            "h_unlisted": ("hangs", "error"),
        }
        servers = {u: f"server {bad[k]} max_fails=0; server 127.0.0.1:{ok};" for u, (k, _) in cases.items()}
        http_block = f"""
            log_format trail '$uri|$upstream_addr|$upstream_status|$status';
            {"".join(f"upstream {u} {{ {servers[u]} }}" for u in cases)}
            server {{ listen 127.0.0.1:{ok}; location / {{ return 200 ok; }} }}
            server {{
                listen 127.0.0.1:{proxy};
                proxy_read_timeout 300ms;
                {
            "".join(
                f"location /{u} {{ proxy_pass http://{u}; proxy_next_upstream {nu}; "
                f"access_log {tmp_path}/logs/trail.log trail; }}"
                for u, (_, nu) in cases.items()
            )
        }
            }}
        """
        order = [u for u in cases for _ in range(2)]
        with nginx_running(tmp_path, http_block, [proxy, ok]):
            conn = http.client.HTTPConnection("127.0.0.1", proxy, timeout=10)
            for upstream_name in order:
                conn.request("GET", f"/{upstream_name}")
                conn.getresponse().read()
            conn.close()
    nginx_lines = (tmp_path / "logs/trail.log").read_text().splitlines()

    behaviour = {bad["garbage"]: "garbage", bad["hangs"]: "hangs", f"127.0.0.1:{ok}": "ok"}
    balancers = {
        u: RoundRobin(PeerSet.from_conf(parse_upstream(u, f"upstream {u} {{ {servers[u]} }}"))) for u in cases
    }
    ours = []
    for u in order:
        conf = ProxyConf(next_upstream=next_upstream_mask(cases[u][1]))
        ours.append(f"/{u}|" + simulate(balancers[u], conf, behaviour, 1000.0))
    assert ours == nginx_lines
    assert f"/h_unlisted|{bad['hangs']}|504|504" in ours


@pytest.mark.nginx
@pytest.mark.skipif(NGINX is None, reason="nginx is not installed")
def test_failure_kinds_through_scriptlb_match_a_real_nginx(tmp_path: Path) -> None:
    """Every failure kind (status lists, non_idempotent POST, invalid header, read timeout) gives
    the same trails through scriptlb's proxy as through nginx."""
    ok, proxy, *status_ports = free_ports(8)
    by_status = dict(zip([500, 503, 504, 429, 403, 404], status_ports, strict=True))
    invalid = b"HTTP/1.1 200 OK\r\nX-A\x00: b\r\n\r\n"
    with (
        ClosingBackend() as closer,
        ClosingBackend(reply=invalid) as garbage,
        ClosingBackend(delay=0.5) as hang,
    ):
        cases: dict[str, tuple[str, str, str]] = {}  # upstream -> (servers, proxy_next_upstream, method)
        for status, port in by_status.items():
            servers = f"server 127.0.0.1:{port} max_fails=1 fail_timeout=60s; server 127.0.0.1:{ok};"
            cases[f"listed{status}"] = (servers, f"error http_{status}", "GET")
            cases[f"unlisted{status}"] = (servers, "error", "GET")
        for bad, prefix in ((closer, "close"), (garbage, "garbage"), (hang, "hang")):
            servers = f"server 127.0.0.1:{bad.port} max_fails=0; server 127.0.0.1:{ok};"
            cases[f"{prefix}_get"] = (servers, "error", "GET")
            cases[f"{prefix}_post"] = (servers, "error", "POST")
            cases[f"{prefix}_all"] = (servers, "error timeout invalid_header non_idempotent", "POST")
        upstreams = "".join(f"upstream {u} {{ {servers} }}\n" for u, (servers, _, _) in cases.items())

        def locations(log_dir: Path) -> str:
            return "".join(
                f"location /{u} {{ proxy_pass http://{u}; proxy_next_upstream {nu}; "
                f"access_log {log_dir}/trail.log trail; }}\n"
                for u, (_, nu, _) in cases.items()
            )

        trail = "log_format trail '$request_method $uri|$upstream_addr|$upstream_status|$status';"
        backends = "".join(
            f"server {{ listen 127.0.0.1:{port}; location / {{ return {status}; }} }}\n"
            for status, port in by_status.items()
        )
        http_block = f"""
            {trail}
            {upstreams}
            {backends}
            server {{ listen 127.0.0.1:{ok}; location / {{ return 200 ok; }} }}
            server {{ listen 127.0.0.1:{proxy}; proxy_read_timeout 200ms; {locations(tmp_path / "logs")} }}
        """
        lb_dir = tmp_path / "scriptlb"
        lb_dir.mkdir()
        lb_conf = f"""
            daemon off; master_process off; error_log {lb_dir}/error.log info;
            events {{}}
            http {{
                {trail}
                {upstreams}
                server {{ listen 127.0.0.1:{{port0}}; proxy_read_timeout 200ms; {locations(lb_dir)} }}
            }}
        """
        order = [u for u in cases for _ in range(3)]

        def drive(port: int) -> None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            for u in order:
                method = cases[u][2]
                conn.request(method, f"/{u}", body=b"x" if method == "POST" else None)
                conn.getresponse().read()
            conn.close()

        with nginx_running(tmp_path, http_block, [proxy, ok, *status_ports]):
            drive(proxy)
            with Scriptlb(lb_conf, lb_dir) as lb:
                drive(lb.port)
    nginx_lines = (tmp_path / "logs/trail.log").read_text().splitlines()
    assert len(nginx_lines) == len(order)
    assert (lb_dir / "trail.log").read_text().splitlines() == nginx_lines
