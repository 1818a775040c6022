"""The example hooks that keep state across requests (issue 5), through real sockets:
hooks/sticky_cookie.py and hooks/chash_by_header.py (per-worker tables in hooks/lib/ built from
scriptlb.balancers) and hooks/rate_aware.py (per-peer counters in a python_shared_dict zone),
the last one also under a real master with two workers."""

from __future__ import annotations

import hashlib
import re
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers import Backends, Scriptlb, answers, free_ports, fresh_get, get, master_process, respond, wait_for

from scriptlb.balancing.resty import chash
from scriptlb.config.model import PythonConf
from scriptlb.hookrt import api, hooks
from scriptlb.state.shared_dict import SharedDict, zone_directory

ROOT = Path(__file__).resolve().parent.parent
CLIENT = "127.0.0.1"  # every test client's address: the sticky fallback hashes it


def conf(servers: str, hook: str, location: str = "", http_extra: str = "") -> str:
    return f"""
daemon off;
master_process off;
error_log {{tmp}}/error.log info;
http {{
    python_package_path "hooks/lib/?.py";
    {http_extra}
    log_format trail '$upstream_addr|$upstream_status|$status|$request';
    upstream u {{
        {servers}
        balancer_by_python_file hooks/{hook}.py;
    }}
    server {{
        listen 127.0.0.1:{{port0}};
        access_log {{tmp}}/access.log trail;
        location / {{
            proxy_pass http://u;
            proxy_next_upstream error timeout http_502;
            {location}
        }}
    }}
}}
"""


@pytest.fixture(autouse=True)
def _default_python_settings() -> None:
    hooks.configure(PythonConf())  # no package path left over from another test


def install(prefix: Path, name: str, **replace: str) -> None:
    """Copy hooks/NAME.py and the hooks/lib modules under ``prefix``, with text replacements."""
    (prefix / "hooks" / "lib").mkdir(parents=True, exist_ok=True)
    text = (ROOT / "hooks" / f"{name}.py").read_text()
    for old, new in replace.items():
        assert old in text, old  # a replacement that no longer matches would test the wrong thing
        text = text.replace(old, new)
    (prefix / "hooks" / f"{name}.py").write_text(text)
    for module in ("chash_rings.py", "peer_health.py"):
        (prefix / "hooks" / "lib" / module).write_text((ROOT / "hooks" / "lib" / module).read_text())


def start(text: str, tmp_path: Path) -> Scriptlb:
    return Scriptlb(text, tmp_path, tmp=tmp_path)


def servers(backends: Backends, count: int | None = None) -> str:
    return " ".join(f"server {b.addr};" for b in list(backends)[:count])


def trail(tmp_path: Path) -> list[tuple[str, ...]]:
    """(upstream_addr, upstream_status, status, request) per logged request, in order."""
    return [tuple(line.split("|")) for line in (tmp_path / "access.log").read_text().splitlines()]


def route_id(addr: str) -> str:
    return hashlib.md5(addr.encode()).hexdigest()[:8]


def bodies_by_index(count: int, cookie: bool = False) -> Backends:
    """Backends answering their index; with ``cookie``, each sets its route cookie as the
    application behind sticky_cookie.py does."""
    backends = Backends(*[respond(body=str(i).encode()) for i in range(count)])
    if cookie:
        for i, backend in enumerate(backends):
            backend.behaviour = respond(body=str(i).encode(),
                                        headers={"Set-Cookie": f"route={route_id(backend.addr)}; Path=/"})
    return backends


# --------------------------------------------------------------------------- sticky_cookie


def test_sticky_cookie_set_by_the_backend_keeps_the_client_on_its_peer(tmp_path: Path) -> None:
    install(tmp_path, "sticky_cookie")
    with bodies_by_index(3, cookie=True) as bk, start(conf(servers(bk), "sticky_cookie"), tmp_path) as lb:
        first = get(lb.port, "/login")
        cookie = (first.header("set-cookie") or "").split(";")[0]
        again = [get(lb.port, f"/page/{i}", {"Cookie": cookie}).body for i in range(20)]
        # every peer's own cookie leads to it, whatever the client address would pick
        by_route = {i: {get(lb.port, "/", {"Cookie": f"a=1; route={route_id(b.addr)}"}).body
                        for _ in range(20)} for i, b in enumerate(bk)}
        addrs = [b.addr for b in bk]
    by_address = addrs.index(chash(addrs).find(CLIENT)[0])  # no cookie: `hash $remote_addr consistent`
    assert first.body == str(by_address).encode()
    assert cookie == f"route={route_id(addrs[by_address])}"
    assert again == [first.body] * 20
    assert by_route == {i: {str(i).encode()} for i in range(3)}


@pytest.mark.parametrize("cookie", ["route=deadbeef", "route=", "other=1", "route=127.0.0.1:1",
                                    f"route={route_id('127.0.0.1:1')}"])
def test_sticky_cookie_unknown_or_stale_falls_back_to_the_client_address(tmp_path: Path, cookie: str) -> None:
    install(tmp_path, "sticky_cookie")
    with bodies_by_index(3) as bk, start(conf(servers(bk), "sticky_cookie"), tmp_path) as lb:
        got = {get(lb.port, f"/{i}", {"Cookie": cookie}).body for i in range(5)}
        addrs = [b.addr for b in bk]
    assert got == {str(addrs.index(chash(addrs).find(CLIENT)[0])).encode()}


def test_sticky_cookie_peer_down_moves_on_and_the_next_request_goes_straight_to_a_live_peer(
        tmp_path: Path) -> None:
    install(tmp_path, "sticky_cookie")
    with bodies_by_index(3, cookie=True) as bk, start(conf(servers(bk), "sticky_cookie"), tmp_path) as lb:
        addrs = [b.addr for b in bk]
        ring = chash(addrs)
        home = addrs.index(ring.find(CLIENT)[0])  # also the address fallback: the move is not trivial
        cookie = {"Cookie": f"route={route_id(addrs[home])}"}
        assert get(lb.port, "/before", cookie).body == str(home).encode()
        bk[home].behaviour = respond(502)
        moved = get(lb.port, "/retry", cookie)
        after = [get(lb.port, f"/after/{i}", cookie) for i in range(5)]
    other = addrs.index(ring.find(CLIENT, tried={addrs[home]})[0])
    assert (moved.status, moved.body) == (200, str(other).encode())
    assert moved.header("set-cookie") == f"route={route_id(addrs[other])}; Path=/"  # the client re-sticks
    log = trail(tmp_path)
    assert log[1][:3] == (f"{addrs[home]}, {addrs[other]}", "502, 200", "200")
    # the failed peer is remembered by the worker: the old cookie no longer reaches it
    assert [(r.status, r.body) for r in after] == [(200, str(other).encode())] * 5
    assert [t[:2] for t in log[2:]] == [(addrs[other], "200")] * 5
    assert f"sticky peer {addrs[home]} failed (failed 502), moving on" in (tmp_path / "error.log").read_text()


# --------------------------------------------------------------------------- chash_by_header


def _peer_per_key(port: int, keys: list[str]) -> dict[str, int]:
    return {key: int(get(port, "/same/uri", {"X-User-Id": key}).body) for key in keys}


def test_chash_by_header_same_user_same_peer_and_uri_fallback(tmp_path: Path) -> None:
    install(tmp_path, "chash_by_header")
    with bodies_by_index(4) as bk, start(conf(servers(bk), "chash_by_header"), tmp_path) as lb:
        users = {f"u{i}": {get(lb.port, f"/{j}", {"X-User-Id": f"u{i}"}).body for j in range(3)}
                 for i in range(10)}
        no_header = {f"/p{i}": get(lb.port, f"/p{i}").body for i in range(10)}
        addrs = [b.addr for b in bk]
    ring = chash(addrs)  # the same nginx ketama ring the hook builds from the upstream
    assert users == {u: {str(addrs.index(ring.find(u)[0])).encode()} for u in users}
    assert no_header == {uri: str(addrs.index(ring.find(uri)[0])).encode() for uri in no_header}
    assert len({b for seen in users.values() for b in seen}) > 1


def test_chash_by_header_distribution_and_removing_a_server_moves_only_its_keys(tmp_path: Path) -> None:
    # a reload without bk[3]: new workers, whose per-worker rings start empty (a fresh prefix
    # gives this process a fresh module, as a new worker process would have)
    old, new = tmp_path / "old", tmp_path / "new"
    for prefix in (old, new):
        install(prefix, "chash_by_header")
    keys = [f"user-{i}" for i in range(300)]
    with bodies_by_index(4) as bk:
        with start(conf(servers(bk), "chash_by_header"), old) as lb:
            before = _peer_per_key(lb.port, keys)
        with start(conf(servers(bk, 3), "chash_by_header"), new) as lb:
            after = _peer_per_key(lb.port, keys)
    shares = Counter(before.values())
    assert sorted(shares) == [0, 1, 2, 3]
    assert all(75 * 0.5 <= n <= 75 * 1.5 for n in shares.values()), shares  # 300 keys, 4 equal peers
    moved = [k for k in keys if before[k] != after[k]]
    assert 0.10 <= len(moved) / len(keys) <= 0.40, len(moved)
    assert all(before[k] == 3 for k in moved)  # only the removed server's keys moved...
    assert all(after[k] != 3 for k in keys)  # ...to the surviving peers
    assert all(after[k] == before[k] for k in keys if before[k] != 3)


def test_chash_by_header_retries_the_next_distinct_peer_on_the_ring(tmp_path: Path) -> None:
    install(tmp_path, "chash_by_header")
    with bodies_by_index(4) as bk, start(conf(servers(bk), "chash_by_header"), tmp_path) as lb:
        addrs = [b.addr for b in bk]
        ring = chash(addrs)
        home, index = ring.find("u7")
        bk[addrs.index(home)].behaviour = respond(502)
        second, index2 = ring.next(index, [home])
        bk[addrs.index(second)].behaviour = respond(502)
        third, _ = ring.next(index2, [home, second])
        response = get(lb.port, "/x", {"X-User-Id": "u7"})
    assert (response.status, response.body) == (200, str(addrs.index(third)).encode())
    assert trail(tmp_path)[0][:3] == (f"{home}, {second}, {third}", "502, 502, 200", "200")
    assert f"{home} failed (failed 502), next on the ring: {second}" in (tmp_path / "error.log").read_text()


# --------------------------------------------------------------------------- rate_aware

RATE_ZONE = 'python_shared_dict rate 1m;'


def rate_conf(servers: str) -> str:
    return conf(servers, "rate_aware", http_extra=RATE_ZONE)


@pytest.fixture
def rate_zone(tmp_path: Path) -> Iterator[SharedDict]:
    """The `rate` zone for a worker in a thread: a master process's worker opens its zones in
    attach_hook_runtime, which a WorkerThread does not run."""
    zone = _zone(tmp_path)
    api.set_shared_dicts({"rate": zone})
    try:
        yield zone
    finally:
        api.set_shared_dicts({})
        zone.close()


def _zone(prefix: Path) -> SharedDict:
    return SharedDict(zone_directory(str(prefix)), "rate", 1 << 20)


def _windows(zone: SharedDict) -> dict[str, dict[str, int]]:
    """{second: {peer: tries}} from the hook's "<peer>@<second>" counters."""
    windows: dict[str, dict[str, int]] = {}
    for key in zone.get_keys(0):
        assert isinstance(key, str)
        peer, _, second = key.rpartition("@")
        windows.setdefault(second, {})[peer] = zone.get(key)[0]
    return windows


def test_rate_aware_spreads_a_burst_evenly(tmp_path: Path, rate_zone: SharedDict) -> None:
    install(tmp_path, "rate_aware", **{"WINDOW_TTL = 3": "WINDOW_TTL = 60"})  # counters outlive the test
    with bodies_by_index(3) as bk, start(rate_conf(servers(bk)), tmp_path) as lb:
        statuses = [get(lb.port, f"/{i}").status for i in range(30)]
        served = [len(b.requests) for b in bk]
        windows = _windows(rate_zone)
        addrs = {b.addr for b in bk}
    assert statuses == [200] * 30
    assert sum(served) == 30 and max(served) - min(served) <= 2  # <= 1 per window, two windows at most
    assert 1 <= len(windows) <= 2  # 30 sequential requests span at most one second boundary
    for counts in windows.values():
        assert set(counts) <= addrs
        full = [counts.get(a, 0) for a in addrs]
        assert max(full) - min(full) <= 1, counts
    assert sum(n for counts in windows.values() for n in counts.values()) == 30


def test_rate_aware_answers_503_past_the_limit_within_one_window(
        tmp_path: Path, rate_zone: SharedDict) -> None:
    install(tmp_path, "rate_aware", **{"LIMIT = 50": "LIMIT = 5"})
    with bodies_by_index(3) as bk, start(rate_conf(servers(bk)), tmp_path) as lb:
        for _attempt in range(3):  # a burst that straddles a second boundary is sent again
            wait_for(lambda: time.time() % 1 < 0.2, timeout=2, what="the start of a second")
            second = int(time.time())
            statuses = [get(lb.port, f"/{i}").status for i in range(20)]
            if int(time.time()) == second:
                break
        else:
            pytest.fail("every burst straddled a second boundary")
        window = _windows(rate_zone)[str(second)]
    assert Counter(statuses) == {200: 15, 503: 5}  # 3 peers x LIMIT 5, the rest refused
    assert statuses[:15] == [200] * 15
    assert window == {b.addr: 5 for b in bk}
    assert "rate_aware: every peer is at 5 tries this second" in (tmp_path / "error.log").read_text()


@pytest.mark.slow
def test_rate_aware_counts_across_two_workers_add_up(tmp_path: Path) -> None:
    """The shipped conf/hooks/rate_aware.conf under a real master with two workers."""
    lb, *backend_ports = free_ports(4)
    text = (ROOT / "conf" / "hooks" / "rate_aware.conf").read_text()
    for old, new in [("127.0.0.1:8080", f"127.0.0.1:{lb}"), ("error_log stderr notice;",
                                                              f"error_log {tmp_path}/error.log info;"),
                     ("access_log stdout trail;", f"access_log {tmp_path}/access.log trail;"),
                     *[(f"127.0.0.1:{9001 + i}", f"127.0.0.1:{p}") for i, p in enumerate(backend_ports)],
                     *[(f"backend {9001 + i}", f"backend {i}") for i in range(3)],
                     # counting is what is checked here, not the budget: a run that a loaded
                     # machine stretches past 10 ms would fall back uncounted
                     ("balancer_by_python_timeout 10ms;", "balancer_by_python_timeout 1s;")]:
        assert old in text, old
        text = text.replace(old, new)
    assert "worker_processes 2;" in text
    (tmp_path / "rate_aware.conf").write_text(text)
    install(tmp_path, "rate_aware", **{"LIMIT = 50": "LIMIT = 100000", "WINDOW_TTL = 3": "WINDOW_TTL = 60"})
    requests = 200
    with master_process(tmp_path, tmp_path / "rate_aware.conf"):
        wait_for(lambda: answers(lb), what="scriptlb to answer")
        zone = _zone(tmp_path)
        before = sum(n for counts in _windows(zone).values() for n in counts.values())
        with ThreadPoolExecutor(max_workers=8) as pool:
            bodies = list(pool.map(lambda _: fresh_get(lb), range(requests)))
        per_peer: Counter[str] = Counter()
        for counts in _windows(zone).values():
            per_peer.update(counts)
    assert before >= 1  # the request that found the server up
    assert sum(per_peer.values()) - before == requests  # no lost or double counts across workers
    assert set(per_peer) == {f"127.0.0.1:{p}" for p in backend_ports}
    assert all(n >= requests / 3 / 2 for n in per_peer.values()), per_peer  # least loaded first
    served = Counter(bodies)  # each peer's count is what it served (plus the first request)
    extra = [per_peer[f"127.0.0.1:{p}"] - served[f"backend {i}\n"] for i, p in enumerate(backend_ports)]
    assert min(extra) >= 0 and sum(extra) == before
    pids = {m.group(1) for m in re.finditer(r"pid=(\d+)", (tmp_path / "access.log").read_text())}
    assert len(pids) == 2  # both workers served and counted into the one zone


def test_chash_by_header_keeps_one_ring_per_upstream(tmp_path: Path) -> None:
    """chash_rings caches per worker by upstream name: two upstreams sharing the hook each hash
    over their own peers."""
    install(tmp_path, "chash_by_header")
    text = conf("", "chash_by_header").replace("upstream u {", "upstream v {\n{v_servers}\n"
                                                "balancer_by_python_file hooks/chash_by_header.py;\n}\n"
                                                "upstream u {")
    text = text.replace("location / {", "location /v/ { proxy_pass http://v; }\n        location / {")
    with bodies_by_index(4) as bk:
        text = text.replace("upstream u {", "upstream u {\n" + servers(bk, 2), 1)
        text = text.replace("{v_servers}", " ".join(f"server {b.addr};" for b in list(bk)[2:]))
        with start(text, tmp_path) as lb:
            on_u = {get(lb.port, "/x", {"X-User-Id": f"u{i}"}).body for i in range(20)}
            on_v = {get(lb.port, "/v/x", {"X-User-Id": f"u{i}"}).body for i in range(20)}
    assert on_u == {b"0", b"1"}
    assert on_v == {b"2", b"3"}
