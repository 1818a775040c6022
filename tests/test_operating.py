"""Operating scriptlb on a real master with two workers: stream peers' bytes in the API,
``/api/9/workers``, a hook that picks an unhealthy peer, shared ``unavail``, health check
``jitter``/``mandatory persistent``, and a retired worker replaced at once."""

from __future__ import annotations

import http.client
import itertools
import json
import socket
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import free_ports, master_process, wait_for
from stream_helpers import TcpPeer, echo

pytestmark = pytest.mark.slow


def get_json(port: int, path: str) -> Any:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
        assert response.status == 200, (path, response.status, body)
        return json.loads(body)
    finally:
        conn.close()


def answers_json(port: int, path: str) -> Any:
    try:
        return get_json(port, path)
    except OSError:
        return None


def write_conf(prefix: Path, body: str) -> Path:
    conf = prefix / "conf" / "scriptlb.conf"
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text("daemon off;\nworker_processes 2;\nerror_log logs/error.log info;\nevents {}\n"
                    + textwrap.dedent(body))
    return conf


# --------------------------------------------------------------------------- stream bytes


def test_stream_peers_count_their_bytes_over_every_worker(tmp_path: Path) -> None:
    """Bytes relayed to and from a stream peer show as its ``sent``/``received`` in
    ``/api/9/stream/upstreams``, summed over both workers (connections spread by reuseport)."""
    api_port, stream_port = free_ports(2)
    with TcpPeer(echo) as peer:
        conf = write_conf(tmp_path, f"""\
            http {{ server {{ listen 127.0.0.1:{api_port}; location /api {{ api; }} }} }}
            stream {{
                upstream u {{ zone u 64k; server {peer.addr}; }}
                server {{ listen 127.0.0.1:{stream_port} reuseport; proxy_pass u; }}
            }}
            """)
        with master_process(tmp_path, conf):
            wait_for(lambda: answers_json(api_port, "/api/9/stream/upstreams/u"), what="the API")
            sizes = [1000 + n * 137 for n in range(12)]
            for size in sizes:
                with socket.create_connection(("127.0.0.1", stream_port), timeout=10) as conn:
                    conn.sendall(b"x" * size)
                    got = b""
                    while len(got) < size:
                        chunk = conn.recv(65536)
                        assert chunk
                        got += chunk

            def peer_figures() -> Any:
                figures = get_json(api_port, "/api/9/stream/upstreams/u")["peers"][0]
                return figures if figures["connections"] == len(sizes) and figures["active"] == 0 \
                    and figures["received"] == sum(sizes) else None

            figures = wait_for(peer_figures, what="12 finished connections")
    assert figures["sent"] == sum(sizes)
    assert figures["received"] == sum(sizes)
    assert figures["server"] == peer.addr and figures["state"] == "up"
    assert "responses" not in figures and "first_byte_time" in figures


# --------------------------------------------------------------------------- a retiring worker


def _children(master: int) -> set[int]:
    return {int(pid) for pid in Path(f"/proc/{master}/task/{master}/children").read_text().split()}


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_worker_shutting_down_on_its_own_is_replaced_before_it_exits(tmp_path: Path) -> None:
    """A worker asked to stop by someone else than the master (the sandbox's watchdog retires
    a worker for its memory with a QUIT) drains its in-flight request while its replacement,
    started at once, serves new connections."""
    import asyncio
    import os
    import signal
    import threading

    from helpers import Backends, answers, fresh_get

    release = threading.Event()

    async def slow(req: Any, writer: asyncio.StreamWriter) -> bool:
        if req.target == "/slow":
            await asyncio.get_running_loop().run_in_executor(None, release.wait, 20)
        writer.write(b"HTTP/1.1 200 X\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        return True

    (port,) = free_ports(1)
    with Backends(slow) as bk:
        conf = write_conf(tmp_path, f"""\
            http {{ server {{ listen 127.0.0.1:{port};
                location / {{ proxy_pass http://{bk[0].addr}; proxy_read_timeout 30s; }} }} }}
            """).read_text().replace("worker_processes 2;", "worker_processes 1;")
        (tmp_path / "conf" / "scriptlb.conf").write_text(conf)
        with master_process(tmp_path, tmp_path / "conf" / "scriptlb.conf") as proc:
            wait_for(lambda: answers(port) == "ok", what="the first answer")
            (old,) = _children(proc.pid)
            held: list[str] = []
            client = threading.Thread(target=lambda: held.append(fresh_get(port, "/slow", timeout=30)))
            client.start()
            wait_for(lambda: any(r.target == "/slow" for r in bk[0].requests), what="the slow request")
            os.kill(old, signal.SIGQUIT)  # what the memory watchdog does
            new = wait_for(lambda: _children(proc.pid) - {old}, what="the replacement", timeout=10)
            assert _alive(old), "the replacement started while the old worker drains"
            assert fresh_get(port) == "ok"  # served by the replacement
            release.set()
            client.join(20)
            wait_for(lambda: old not in _children(proc.pid), what="the old worker to exit (reaped)")
            assert _children(proc.pid) == new  # replaced once, not twice
    assert held == ["ok"]
    log = (tmp_path / "logs" / "error.log").read_text()
    assert f"worker process {old} is shutting down on its own, starting its replacement" in log
    assert f"worker process {old} exited with code 0" in log


# --------------------------------------------------------------------------- /workers


def test_api_workers_lists_each_worker_process_with_its_own_counts(tmp_path: Path) -> None:
    from helpers import Backends, fresh_get, respond

    (port,) = free_ports(1)
    with Backends(respond(body=b"ok")) as bk:
        conf = write_conf(tmp_path, f"""\
            http {{ server {{ listen 127.0.0.1:{port} reuseport;
                location / {{ proxy_pass http://{bk[0].addr}; }}
                location /api {{ api write=on; }} }} }}
            """)
        with master_process(tmp_path, conf) as proc:
            sent = [0]  # requests scriptlb answered (each on its own connection)

            def answered(path: str) -> Any:
                found = answers_json(port, path)
                sent[0] += found is not None
                return found

            def every_request_counted() -> Any:
                listed = answered("/api/9/workers")  # counts itself, live, in its worker
                total = sum(w["http"]["requests"]["total"] for w in listed)
                # another worker's row may lag (published every 100 ms): never above the truth
                assert total <= sent[0]
                return listed if total == sent[0] and len(listed) == 2 else None

            wait_for(lambda: answered("/api/9/nginx"), what="the API")
            for _ in range(30):
                assert fresh_get(port) == "ok"
                sent[0] += 1
            listed = wait_for(every_request_counted, what="every request counted by some worker")
            assert [w["id"] for w in listed] == [0, 1]
            assert {w["pid"] for w in listed} == _children(proc.pid)
            accepted = sum(w["connections"]["accepted"] for w in listed)
            assert accepted == sent[0]  # one request per connection
            assert all(w["connections"]["dropped"] == 0 for w in listed)
            assert all(w["http"]["requests"]["total"] > 0 for w in listed), "reuseport spread them"
            # the worker answering is writing this very response: one current request
            assert sum(w["http"]["requests"]["current"] for w in listed) >= 1
            one = get_json(port, "/api/9/workers/1")
            assert one["id"] == 1 and one["pid"] in _children(proc.pid)
            assert set(one) == {"id", "pid", "connections", "http"}
            for path, status, code in (("/api/9/workers/7", 404, "WorkerNotFound"),
                                       ("/api/9/workers/x", 400, "WorkerBadId")):
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                conn.request("GET", path)
                response = conn.getresponse()
                assert (response.status, json.loads(response.read())["error"]["code"]) == (status, code)
                conn.close()
            assert "workers" in get_json(port, "/api/9")

            def delete(path: str) -> int:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                conn.request("DELETE", path)
                response = conn.getresponse()
                response.read()
                conn.close()
                return response.status

            assert delete("/api/9/workers/7") == 404
            time.sleep(0.3)  # every worker published what it counted (a reset starts from that)
            assert delete("/api/9/workers") == 204
            time.sleep(0.3)
            after = get_json(port, "/api/9/workers")
            # counted again from zero: the reading request (and the DELETE, if a publish raced it)
            assert 1 <= sum(w["http"]["requests"]["total"] for w in after) <= 2, after
            assert get_json(port, "/api/9/connections")["accepted"] >= accepted  # totals kept


# --------------------------------------------------------------------------- a hook's choice


def _traced(port: int) -> tuple[int, str, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/", headers={"X-Balancer-Trace": "1"})
        response = conn.getresponse()
        return response.status, response.read().decode(), response.getheader("X-Balancer-Trace") or ""
    finally:
        conn.close()


def test_a_hook_that_picks_an_avoided_peer_gets_it_and_the_trail_says_so(tmp_path: Path) -> None:
    """Health checks mark a peer unhealthy; a hook names it anyway: the request goes there, the
    trace says ``hook(unhealthy)``, a warn line says it too. A drained peer: ``hook(draining)``."""
    import asyncio
    import re

    from helpers import Backends

    health = {"status": 500}

    def behaviour(name: bytes) -> Any:
        async def answer(req: Any, writer: asyncio.StreamWriter) -> bool:
            status = health["status"] if req.target == "/health" and name == b"sick" else 200
            writer.write(b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n%s" % (status, len(name), name))
            await writer.drain()
            return True
        return answer

    (port,) = free_ports(1)
    with Backends(behaviour(b"well"), behaviour(b"sick")) as bk:
        conf = write_conf(tmp_path, f"""\
            http {{
                upstream backend {{
                    zone backend 64k;
                    server {bk[0].addr};
                    server {bk[1].addr};
                    balancer_by_python_block {{ balancer.set_current_peer("{bk[1].addr}") }}
                }}
                server {{
                    listen 127.0.0.1:{port} reuseport;
                    balancer_trace_header on; balancer_trace_allow 127.0.0.1;
                    location / {{ proxy_pass http://backend;
                        health_check interval=100ms fails=1 passes=1 uri=/health; }}
                    location /api {{ api write=on; }}
                }}
            }}
            """)
        with master_process(tmp_path, conf):
            def sick_state() -> Any:
                found = answers_json(port, "/api/9/http/upstreams/backend")
                return found is not None and found["peers"][1]["state"] == "unhealthy"

            wait_for(sick_state, what="the sick peer to be unhealthy")
            time.sleep(0.3)  # both workers applied the health state (every 100 ms)
            for _ in range(6):  # fresh connections: both workers
                status, body, trace = _traced(port)
                assert (status, body) == (200, "sick"), "the hook's choice stands"
                assert trace.startswith(f"hook(unhealthy) {bk[1].addr} "), trace

            health["status"] = 200  # healthy again, then drained through the API
            wait_for(lambda: not sick_state(), what="the peer to pass its check")
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("PATCH", "/api/9/http/upstreams/backend/servers/1", body=b'{"drain": true}')
            assert conn.getresponse().status == 200
            conn.close()
            time.sleep(0.3)  # every worker took the new list (polled every 50 ms)
            status, body, trace = _traced(port)
            assert (status, body) == (200, "sick")
            assert trace.startswith(f"hook(draining) {bk[1].addr} "), trace
    log = (tmp_path / "logs" / "error.log").read_text()
    line = rf"\[warn\] \d+#0: \*\d+ balancer_by_python chose unhealthy peer {re.escape(bk[1].addr)} " \
           rf"while connecting to upstream, client: 127\.0\.0\.1, server: , request: \"GET / HTTP/1\.1\", " \
           rf"upstream: \"http://{re.escape(bk[1].addr)}/\""
    assert re.search(line, log), log[-2000:]
    assert f"balancer_by_python chose draining peer {bk[1].addr}" in log


# --------------------------------------------------------------------------- health checks


def _health_recorder(times: list[float], hang: dict[str, bool] | None = None, status: int = 200) -> Any:
    """/health answers ``status`` (and records when it came), or hangs while ``hang["on"]``;
    other paths answer 200 "ok"."""
    import asyncio

    async def answer(req: Any, writer: asyncio.StreamWriter) -> bool:
        if req.target == "/health":
            times.append(time.monotonic())
            if hang is not None and hang["on"]:
                await asyncio.sleep(20)  # until the checker's read timeout ends it
            writer.write(b"HTTP/1.1 %d X\r\nContent-Length: 2\r\n\r\nok" % status)
            await writer.drain()
            return True
        writer.write(b"HTTP/1.1 200 X\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        return True

    return answer


def test_health_check_jitter_spreads_the_checks(tmp_path: Path) -> None:
    """``jitter=400ms`` on a 100 ms interval: every gap is at least the interval and the gaps
    differ (random delays), where without jitter they would all be one interval."""
    from helpers import Backends, Scriptlb

    from scriptlb.config.model import HealthCheckConf
    from scriptlb.ops.health import check_delay

    times: list[float] = []
    with Backends(_health_recorder(times)) as bk, Scriptlb(f"""
            daemon off; master_process off; error_log {tmp_path}/e.log info;
            http {{ upstream b {{ server {bk[0].addr}; }}
                server {{ listen {{port0}}; location / {{ proxy_pass http://b;
                    health_check interval=100ms jitter=400ms uri=/health; }} }} }}""", tmp_path):
        wait_for(lambda: len(times) >= 9, what="nine checks", timeout=30)
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert min(gaps) >= 0.09, gaps
    assert max(gaps) - min(gaps) >= 0.1, gaps  # eight gaps all within 100 ms: p < 1e-4
    plain = HealthCheckConf(interval=0.1)
    assert {check_delay(plain) for _ in range(20)} == {0.1}
    delays = [check_delay(HealthCheckConf(interval=0.1, jitter=0.4)) for _ in range(200)]
    assert min(delays) >= 0.1 and max(delays) <= 0.5 and max(delays) - min(delays) > 0.2


def test_mandatory_persistent_keeps_an_up_peer_up_across_a_reload(tmp_path: Path) -> None:
    """Peers that passed their first check, then their health URIs hang. After a reload the
    ``persistent`` one stays up and serves at once; the plain ``mandatory`` one is back to
    "checking" and not chosen (502) until a check ends; a ``persistent`` one that was
    unhealthy before the reload starts "checking" too (only "up" persists)."""
    import os
    import signal

    from helpers import Backends

    a_times: list[float] = []
    b_times: list[float] = []
    c_times: list[float] = []
    hang = {"on": False}
    (port,) = free_ports(1)
    with Backends(_health_recorder(a_times, hang), _health_recorder(b_times, hang),
                  _health_recorder(c_times, hang, status=500)) as bk:
        conf = write_conf(tmp_path, f"""\
            http {{
                upstream a {{ zone a 64k; server {bk[0].addr}; }}
                upstream b {{ zone b 64k; server {bk[1].addr}; }}
                upstream c {{ zone c 64k; server {bk[2].addr}; }}
                server {{
                    listen 127.0.0.1:{port} reuseport;
                    location /a {{ proxy_pass http://a; proxy_read_timeout 10s;
                        health_check interval=300ms uri=/health mandatory persistent; }}
                    location /b {{ proxy_pass http://b; proxy_read_timeout 10s;
                        health_check interval=300ms uri=/health mandatory; }}
                    location /c {{ proxy_pass http://c; proxy_read_timeout 10s;
                        health_check interval=300ms uri=/health mandatory persistent; }}
                    location /api {{ api; }}
                }}
            }}
            """)

        def states() -> tuple[str, ...] | None:
            found = [answers_json(port, f"/api/9/http/upstreams/{name}") for name in "abc"]
            return tuple(u["peers"][0]["state"] for u in found) if all(found) else None

        with master_process(tmp_path, conf) as proc:
            wait_for(lambda: states() == ("up", "up", "unhealthy"), what="a and b up, c unhealthy")
            hang["on"] = True  # every check from now on hangs (10 s read timeout)
            seen = len(a_times), len(b_times), len(c_times)
            wait_for(lambda: (len(a_times), len(b_times), len(c_times)) > seen and min(
                len(a_times) - seen[0], len(b_times) - seen[1], len(c_times) - seen[2]) > 0,
                what="hanging checks")
            old = _children(proc.pid)
            os.kill(proc.pid, signal.SIGHUP)
            wait_for(lambda: not (_children(proc.pid) & old) and len(_children(proc.pid)) == 2,
                     what="the new workers alone", timeout=20)
            # (each peer's new checker marks it once its worker has started: c "checking" says
            # worker 0, which also checks a, runs; a still "up" is then the persisted state)
            wait_for(lambda: states() == ("up", "checking", "checking"), what="a up, b and c checking")
            time.sleep(0.3)  # every worker applied the shared health words (every 100 ms)
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            for path, expected in (("/a", 200), ("/b", 502)):
                conn.request("GET", path)
                response = conn.getresponse()
                response.read()
                assert response.status == expected, path
            conn.close()
            hang["on"] = False


# --------------------------------------------------------------------------- shared max_fails


def test_a_zone_upstream_counts_failures_and_unavail_over_every_worker(tmp_path: Path) -> None:
    """``zone``: the peers' passive health is one state for all workers, as nginx's zone
    keeps it. A refusing peer with max_fails=3 is disabled after three failures wherever they
    happened, counted once in ``unavail`` and logged once, and every worker avoids it."""
    from helpers import Backends, closed_port, fresh_get, respond

    dead = closed_port()
    (port,) = free_ports(1)
    with Backends(respond(body=b"ok")) as bk:
        conf = write_conf(tmp_path, f"""\
            http {{
                upstream backend {{
                    zone backend 64k;
                    server 127.0.0.1:{dead} max_fails=3 fail_timeout=60s;
                    server {bk[0].addr};
                }}
                server {{ listen 127.0.0.1:{port} reuseport;
                    location / {{ proxy_pass http://backend; }}
                    location /api {{ api; }} }}
            }}
            """)
        with master_process(tmp_path, conf):
            wait_for(lambda: answers_json(port, "/api/9/nginx"), what="the API")
            answered = [fresh_get(port) for _ in range(16)]  # spread over both workers
            time.sleep(0.3)  # every worker took the shared state; the statistics are published
            answered += [fresh_get(port) for _ in range(16)]
            views = [get_json(port, "/api/9/http/upstreams/backend")["peers"][0] for _ in range(12)]
            time.sleep(0.3)
            final = get_json(port, "/api/9/http/upstreams/backend")["peers"][0]
    assert answered == ["ok"] * 32  # each failure retried on the good peer
    assert {v["state"] for v in views} == {"unavail"}, "every worker sees it disabled"
    assert final["unavail"] == 1
    # three failures disable it; the other worker, until it syncs (100 ms) or fails there
    # itself (which syncs that peer at once), may try it once more
    assert 3 <= final["fails"] <= 4, final
    log = (tmp_path / "logs" / "error.log").read_text()
    assert log.count("upstream server temporarily disabled") == 1


def test_a_stream_hook_that_picks_a_down_peer_gets_it_and_a_warn_line_says_so(tmp_path: Path) -> None:
    from helpers import Scriptlb
    from stream_helpers import banner

    with TcpPeer(banner(b"A")) as a, TcpPeer(banner(b"B")) as b, Scriptlb(f"""
            daemon off; master_process off; error_log {tmp_path}/e.log info;
            stream {{
                upstream u {{
                    server {a.addr}; server {b.addr} down;
                    balancer_by_python_block {{ balancer.set_current_peer("{b.addr}") }}
                }}
                server {{ listen 127.0.0.1:{{port0}}; proxy_pass u; }}
            }}""", tmp_path) as lb, socket.create_connection(("127.0.0.1", lb.port), timeout=10) as conn:
        assert conn.recv(1) == b"B"
    log = (tmp_path / "e.log").read_text()
    assert "[warn]" in log and f"balancer_by_python chose down peer {b.addr} while proxying connection" in log


# --------------------------------------------------------------------------- a quit after a reload


def test_a_quit_right_after_a_reload_stops_the_new_workers_too(tmp_path: Path) -> None:
    """QUIT just after HUP reaches workers still installing their handlers: each must stop
    (a signal arriving while the loop replaced the early handlers used to be lost, leaving a
    worker, and so the master, running)."""
    import os
    import signal
    import subprocess
    import sys

    from helpers import answers

    for round_ in range(6):
        where = tmp_path / str(round_)
        (port,) = free_ports(1)
        conf = write_conf(where, f"""\
            http {{ server {{ listen 127.0.0.1:{port}; location / {{ return 200 "up"; }} }} }}
            """)
        proc = subprocess.Popen([sys.executable, "-m", "scriptlb", "-p", str(where), "-c", str(conf)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for(lambda: answers(port) == "up", what="the first answer")  # noqa: B023
            os.kill(proc.pid, signal.SIGHUP)
            wait_for(lambda: "reconfiguring" in (where / "logs" / "error.log").read_text(),  # noqa: B023
                     what="the reload")
            os.kill(proc.pid, signal.SIGQUIT)
            try:
                assert proc.wait(timeout=15) == 0
            except subprocess.TimeoutExpired:
                children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text()
                raise AssertionError((children, (where / "logs" / "error.log").read_text())) from None
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
