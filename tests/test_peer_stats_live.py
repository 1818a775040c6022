"""Live peer statistics as the proxy records them, through real sockets: what
every try leaves in ``scriptlb.state.stats`` (requests, failures, active, last status, the averages),
weights set through the shared file reaching the round robin, ``python_peer_stats off``, and a
real master with two workers whose figures add up (and survive a reload, not a restart)."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers import (
    BackendRequest,
    Backends,
    Scriptlb,
    answers,
    closed_port,
    free_ports,
    fresh_get,
    get,
    hang,
    in_loop,
    master_process,
    respond,
    wait_for,
)

from scriptlb.config import load
from scriptlb.state.shared_dict import zone_directory
from scriptlb.state.stats import FILE_NAME, FLUSH_INTERVAL, PeerStats, layout_of


def slow(delay: float, body: bytes = b"slow"):
    """Answers 200 after ``delay`` seconds."""
    answer = respond(body=body)

    async def behaviour(req: BackendRequest, writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(delay)
        return await answer(req, writer)

    return behaviour


def upstream_conf(servers: list[str], extra: str = "", http_extra: str = "", main_extra: str = "") -> str:
    lines = "\n".join(f"        server {s};" for s in servers)
    return f"""
        {main_extra}
        events {{}}
        http {{
            {http_extra}
            upstream b {{
{lines}
                {extra}
            }}
            server {{
                listen 127.0.0.1:{{port0}};
                proxy_read_timeout 300ms;
                location / {{ proxy_pass http://b; }}
                location /long {{ proxy_pass http://b; proxy_read_timeout 10s; }}
                location /retry500 {{
                    proxy_pass http://b;
                    proxy_next_upstream error timeout http_500;
                }}
            }}
        }}
    """


def figures(lb: Scriptlb) -> list[dict]:
    """Every primary peer's record as another worker sees it: published (the worker publishes
    within stats.FLUSH_INTERVAL; here at once, in the worker's loop), read from the shared file."""
    up = lb.runtime().upstreams["b"]
    assert up.stats is not None

    def published() -> list[dict]:
        up.stats.recorder.flush()
        return [up.stats.stats.read(slot) for slot in up.stats.primary]

    return in_loop(lb.thread.loop, published)  # type: ignore[return-value]


def test_every_try_is_counted_once_per_peer(tmp_path: Path) -> None:
    with Backends(respond(body=b"a"), respond(body=b"b"), respond(body=b"c")) as backends:
        conf = upstream_conf([b.addr for b in backends])
        with Scriptlb(conf, tmp_path) as lb:
            before = time.time()
            bodies = Counter(get(lb.port).body for _ in range(30))
            stats = figures(lb)
    assert bodies == {b"a": 10, b"b": 10, b"c": 10}
    assert [s["requests"] for s in stats] == [10, 10, 10]
    assert [s["failures"] for s in stats] == [0, 0, 0]
    assert [s["active"] for s in stats] == [0, 0, 0]
    assert [s["last_status"] for s in stats] == [200, 200, 200]
    assert all(s["last_failure_time"] is None for s in stats)
    for s in stats:
        # a local peer may answer within the millisecond $upstream_response_time resolves: 0.0
        assert 0 <= s["ewma"] < 0.25 and 0 <= s["peak_ewma"] < 0.25
        assert before <= s["ewma_time"] <= time.time()


def test_a_refused_peer_counts_failures_but_no_latency(tmp_path: Path) -> None:
    dead = closed_port()
    with Backends(respond(body=b"a")) as backends:
        conf = upstream_conf([f"127.0.0.1:{dead} max_fails=0", backends[0].addr])
        with Scriptlb(conf, tmp_path) as lb:
            before = time.time()
            statuses = [get(lb.port).status for _ in range(10)]
            dead_peer, live_peer = figures(lb)
    assert statuses == [200] * 10  # every try on the dead peer was retried on the live one
    # round robin: the dead peer is tried on every other request, and each try fails
    assert dead_peer["requests"] == dead_peer["failures"] == 5
    assert dead_peer["last_status"] is None  # never answered
    assert before <= dead_peer["last_failure_time"] <= time.time()
    # a refused connect says nothing about speed: a dead peer must not look like the fastest
    assert dead_peer["ewma"] is None
    assert live_peer["requests"] == 10 and live_peer["failures"] == 0


def test_a_timeout_counts_as_a_slow_sample(tmp_path: Path) -> None:
    with Backends(hang(), respond(body=b"ok")) as backends:
        conf = upstream_conf([f"{backends[0].addr} max_fails=0", backends[1].addr])
        with Scriptlb(conf, tmp_path) as lb:
            assert get(lb.port).status == 200  # first the hanging peer: 300 ms read timeout
            stuck, _ = figures(lb)
    assert stuck["requests"] == stuck["failures"] == 1
    assert 0.29 <= stuck["ewma"] < 2.0  # the timeout's duration: this peer is slow


def test_a_retried_500_is_a_failure_with_its_status_and_time(tmp_path: Path) -> None:
    with Backends(respond(500, b"broken"), respond(body=b"ok")) as backends:
        conf = upstream_conf([f"{backends[0].addr} max_fails=0", backends[1].addr])
        with Scriptlb(conf, tmp_path) as lb:
            assert get(lb.port, "/retry500").body == b"ok"
            assert get(lb.port, "/").status in (200, 500)
            assert get(lb.port, "/").status in (200, 500)
            broken, fine = figures(lb)
    assert broken["last_status"] == 500
    # /retry500 counts the 500 as a failure (proxy_next_upstream http_500); "/" passes it on
    assert broken["failures"] == 1 and broken["requests"] == 2
    assert broken["ewma"] is not None
    assert fine["failures"] == 0 and fine["requests"] == 2


def test_the_averages_tell_a_slow_peer_from_a_fast_one(tmp_path: Path) -> None:
    # The first sample of a peer is taken whole, and dominates a few tries: on a loaded machine
    # the fast peer's first try took 25 ms (this process runs client, worker and backends), a
    # third of a 50 ms peer's. 200 ms is slow beyond any such noise.
    with Backends(respond(body=b"fast"), slow(0.2)) as backends:
        conf = upstream_conf([b.addr for b in backends])
        with Scriptlb(conf, tmp_path) as lb:
            for _ in range(10):
                get(lb.port)
            fast, slow_peer = figures(lb)
    assert slow_peer["ewma"] >= 0.19 and slow_peer["peak_ewma"] >= 0.19
    assert fast["ewma"] < slow_peer["ewma"] / 3


def test_active_counts_tries_in_flight(tmp_path: Path) -> None:
    with Backends(slow(0.5)) as backends:
        conf = upstream_conf([backends[0].addr])
        with Scriptlb(conf, tmp_path) as lb, ThreadPoolExecutor(3) as pool:
            pending = [pool.submit(get, lb.port, "/long") for _ in range(3)]
            wait_for(lambda: figures(lb)[0]["active"] == 3, timeout=5, what="3 tries in flight")
            assert [f.result().status for f in pending] == [200, 200, 200]
            assert figures(lb)[0]["active"] == 0


def test_a_weight_set_in_the_shared_file_reaches_the_round_robin(tmp_path: Path) -> None:
    with Backends(respond(body=b"a"), respond(body=b"b"), respond(body=b"c")) as backends:
        conf = upstream_conf([b.addr for b in backends])
        with Scriptlb(conf, tmp_path) as lb:
            assert Counter(get(lb.port).body for _ in range(6)) == {b"a": 2, b"b": 2, b"c": 2}
            # another process's view of the same file (as another worker's hook would be)
            other = PeerStats.open(zone_directory(str(tmp_path)), layout_of(lb.conf.http))
            try:
                other.set_weight(other.slot("b", False, 0), 5)
                shares = Counter(get(lb.port).body for _ in range(70))
                peers = lb.runtime().upstreams["b"].peers.primary
                weights = in_loop(lb.thread.loop, lambda: [p.weight for p in peers])
            finally:
                other.close()
    assert weights == [5, 1, 1]
    assert shares == {b"a": 50, b"b": 10, b"c": 10}  # smooth WRR 5:1:1 over 10 rounds


@pytest.mark.parametrize(("method", "moved"), [
    ("hash $request_uri", True),
    ("hash $request_uri consistent", False),
])
def test_hash_takes_new_weights_and_the_consistent_ring_keeps_its_own(tmp_path: Path, method: str,
                                                                      moved: bool) -> None:
    with Backends(respond(body=b"a"), respond(body=b"b")) as backends:
        conf = upstream_conf([b.addr for b in backends], extra=f"{method};")
        with Scriptlb(conf, tmp_path) as lb:
            before = [get(lb.port, f"/k{i}").body for i in range(40)]
            other = PeerStats.open(zone_directory(str(tmp_path)), layout_of(lb.conf.http))
            try:
                other.set_weight(other.slot("b", False, 0), 100)
                after = [get(lb.port, f"/k{i}").body for i in range(40)]
            finally:
                other.close()
    assert set(before) == {b"a", b"b"}
    if moved:
        assert after.count(b"a") >= 36  # hash: weight 100 of 101 of the total, nearly every key
    else:
        assert after == before  # the ring (and so every key's peer) is the configured one


def test_python_peer_stats_off(tmp_path: Path) -> None:
    with Backends(respond(body=b"a")) as backends:
        conf = upstream_conf([backends[0].addr], extra="""balancer_by_python_block {
                    peer = upstream.get_primary_peers()[0]
                    ok, err = upstream.set_peer_weight(False, 0, 3)
                    ngx.log(ngx.NOTICE, "requests=", peer["requests"], " err=", err)
                    balancer.set_current_peer(peer["name"])
                }""", http_extra="python_peer_stats off;", main_extra="error_log {tmp}/error.log notice;")
        with Scriptlb(conf.replace("{tmp}", str(tmp_path)), tmp_path) as lb:
            assert get(lb.port).status == 200
            assert lb.runtime().upstreams["b"].stats is None
    assert not (tmp_path / "shared_dicts" / FILE_NAME).exists()
    log = (tmp_path / "error.log").read_text()
    assert "requests=None err=peer statistics are off (python_peer_stats)" in log


def test_a_hook_reads_the_figures_and_sets_weights(tmp_path: Path) -> None:
    with Backends(respond(body=b"a"), respond(body=b"b")) as backends:
        conf = upstream_conf([b.addr for b in backends], extra="""balancer_by_python_block {
                    peers = upstream.get_primary_peers()
                    ngx.log(ngx.NOTICE, "seen=", [p["requests"] for p in peers])
                    if ngx.var.arg_w:
                        ngx.log(ngx.NOTICE, "set=", upstream.set_peer_weight(False, 1, int(ngx.var.arg_w)),
                                " bad=", upstream.set_peer_weight(False, 1, 0),
                                " id=", upstream.set_peer_weight(True, 0, 2),
                                " now=", upstream.get_primary_peers()[1]["weight"])
                    balancer.set_current_peer(peers[0]["name"])
                }""", main_extra="error_log {tmp}/error.log notice;")
        with Scriptlb(conf.replace("{tmp}", str(tmp_path)), tmp_path) as lb:
            for _ in range(3):
                get(lb.port)
            get(lb.port, "/?w=4")
    log = (tmp_path / "error.log").read_text()
    # each run sees the tries before it (the peer it picks is counted once its try starts)
    assert [line.split("seen=")[1].split(" ")[0] for line in log.splitlines() if "seen=" in line] == [
        "[0,", "[1,", "[2,", "[3,"]
    assert "set=(True, None) bad=(None, 'bad weight (an integer from 1 to 100 expected)') " \
           "id=(None, 'bad peer id') now=4" in log


def test_the_tries_to_an_address_a_hook_set_end_in_the_figures(tmp_path: Path) -> None:
    """A try to an address the hook set (no balancer's peer) is recorded at its end as the
    balancer's tries are: no longer active, its status the last."""
    with Backends(respond(body=b"a"), respond(body=b"b")) as backends:
        conf = upstream_conf([b.addr for b in backends], extra="""balancer_by_python_block {
                    first = upstream.get_primary_peers()[0]
                    ngx.log(ngx.NOTICE, "seen=", first["requests"], ",", first["active"], ",",
                            first["last_status"])
                    balancer.set_current_peer(first["name"])
                }""", main_extra="error_log {tmp}/error.log notice;")
        with Scriptlb(conf.replace("{tmp}", str(tmp_path)), tmp_path) as lb:
            bodies = [get(lb.port).body for _ in range(4)]
    log = (tmp_path / "error.log").read_text()
    assert bodies == [b"a"] * 4
    assert [line.split("seen=")[1].split(" ")[0] for line in log.splitlines() if "seen=" in line] == [
        "0,0,None", "1,0,200", "2,0,200", "3,0,200"]


# --------------------------------------------------------------------------- real processes

MASTER_CONF = """
daemon off;
worker_processes 2;
error_log {tmp}/error.log info;
pid {tmp}/scriptlb.pid;
events {{}}
http {{
    upstream backend {{
        server 127.0.0.1:{a};
        server 127.0.0.1:{b};
    }}
    server {{
        listen 127.0.0.1:{lb} reuseport;
        location / {{ proxy_pass http://backend; }}
    }}
    server {{ listen 127.0.0.1:{a}; return 200 "a"; }}
    server {{ listen 127.0.0.1:{b}; return 200 "b"; }}
}}
"""


def _total_requests(tmp_path: Path, conf_file: Path) -> int:
    conf = load(str(conf_file), str(tmp_path))
    assert conf.http is not None
    view = PeerStats.open(zone_directory(str(tmp_path)), layout_of(conf.http))
    try:
        return sum(view.snapshot("backend", False, i)["requests"] for i in range(2))
    finally:
        view.close()


@pytest.mark.slow
def test_two_workers_add_up_keep_figures_on_reload_and_restart_at_zero(tmp_path: Path) -> None:
    lb, a, b = free_ports(3)
    conf = tmp_path / "scriptlb.conf"
    conf.write_text(MASTER_CONF.format(tmp=tmp_path, lb=lb, a=a, b=b))

    def total() -> int:
        return _total_requests(tmp_path, conf)

    with master_process(tmp_path, conf) as proc:
        wait_for(lambda: answers(lb), what="scriptlb to answer")
        start = wait_for(total, what="the probe request, published")
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(lambda _: fresh_get(lb), range(200)))
        # each worker publishes its tries within FLUSH_INTERVAL
        wait_for(lambda: total() - start >= 200, timeout=5, what="200 tries published")
        time.sleep(4 * FLUSH_INTERVAL)  # a try counted twice would be published by now
        served = total() - start
        proc.send_signal(signal.SIGHUP)  # a reload: new workers, same file, same figures
        wait_for(lambda: (tmp_path / "error.log").read_text().count("start worker process") >= 4,
                 what="the reload's new workers")
        for _ in range(10):
            fresh_get(lb)
        wait_for(lambda: total() >= start + 210, timeout=5, what="the new workers' tries, added")
    assert served == 200  # every try of both workers counted once, none lost

    with master_process(tmp_path, conf):  # a cold start begins at zero, as nginx's zones do
        wait_for(lambda: answers(lb), what="scriptlb to answer again")
        restarted = wait_for(total, what="the probe request, published")
    assert 1 <= restarted <= 5  # the probe request(s) only


def test_samples_have_sub_millisecond_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """uvloop's clock ticks in milliseconds: a peer answering in under one would record 0.0 (and
    an average of 0 divides by zero in a hook); the tries' own clock is finer."""
    from scriptlb.state.stats import Recorder

    samples: list[float] = []
    original = Recorder.tally

    def tally(self: Recorder, index: int) -> None:  # (every ended try passes here, recorded or inlined)
        samples.extend(sample for _, sample, *_ in self.ended[index] if sample is not None)
        original(self, index)

    monkeypatch.setattr(Recorder, "tally", tally)
    with Backends(respond(body=b"a")) as backends:
        conf = upstream_conf([backends[0].addr], extra="keepalive 4;").replace(
            "location / { proxy_pass http://b; }",
            'location / { proxy_pass http://b; proxy_http_version 1.1; proxy_set_header Connection ""; }')
        with Scriptlb(conf, tmp_path) as lb:
            for _ in range(20):
                assert get(lb.port).status == 200
    assert len(samples) == 20
    assert all(s > 0 for s in samples)
    assert any(abs(s * 1000 - round(s * 1000)) > 1e-6 for s in samples)  # not whole milliseconds
