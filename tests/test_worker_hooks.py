"""What a worker process gives hooks, checked through a real master with two workers:
``ngx.worker.id()/count()`` per worker, and ``ngx.shared`` zones that all workers update
atomically (issue 5: two workers each doing N increments leave exactly 2N)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers import Backends, answers, free_ports, fresh_get, master_process, respond, wait_for

from scriptlb.state.shared_dict import SharedDict, zone_directory

pytestmark = pytest.mark.slow

REQUESTS = 200

CONF = """
daemon off;
worker_processes 2;
error_log {tmp}/error.log info;
pid {tmp}/scriptlb.pid;
events {{}}
http {{
    python_shared_dict counters 1m;
    upstream backend {{
        server 127.0.0.1:{a};
        balancer_by_python_block {{
            from ngx import balancer
            ngx.shared.counters.incr("requests", 1, 0)
            ngx.shared.counters.incr("worker" + str(ngx.worker.id()), 1, 0)
            port = {a} if ngx.worker.id() == 0 else {b}
            if ngx.worker.count() == 2:
                balancer.set_current_peer("127.0.0.1", port)
        }}
    }}
    server {{
        listen 127.0.0.1:{lb} reuseport;
        location / {{ proxy_pass http://backend; }}
    }}
    server {{ listen 127.0.0.1:{a}; return 200 "worker0"; }}
    server {{ listen 127.0.0.1:{b}; return 200 "worker1"; }}
}}
"""


def test_two_workers_share_a_dict_and_know_their_ids(tmp_path: Path) -> None:
    lb, a, b = free_ports(3)
    conf = tmp_path / "scriptlb.conf"
    conf.write_text(CONF.format(tmp=tmp_path, lb=lb, a=a, b=b))
    with master_process(tmp_path, conf):
        wait_for(lambda: answers(lb), what="scriptlb to answer")
        zone = SharedDict(zone_directory(str(tmp_path)), "counters", 1 << 20)
        before, _ = zone.get("requests")
        with ThreadPoolExecutor(max_workers=8) as pool:
            bodies = list(pool.map(lambda _: fresh_get(lb), range(REQUESTS)))
        after, _ = zone.get("requests")
        per_worker = [zone.get("worker0")[0] or 0, zone.get("worker1")[0] or 0]
    # every hook run counted once, whichever worker ran it: no lost updates across processes
    assert after - before == REQUESTS
    assert sum(per_worker) == after
    # both workers served (reuseport spreads 200 fresh connections) and each knew its own id
    assert set(bodies) == {"worker0", "worker1"}
    assert all(count > 0 for count in per_worker)


def test_a_cold_start_empties_the_shared_dicts(tmp_path: Path) -> None:
    lb, a, b = free_ports(3)
    conf = tmp_path / "scriptlb.conf"
    conf.write_text(CONF.format(tmp=tmp_path, lb=lb, a=a, b=b))
    stale = SharedDict(zone_directory(str(tmp_path)), "counters", 1 << 20)
    stale.set("requests", 1000)
    stale.close()
    with master_process(tmp_path, conf):
        wait_for(lambda: answers(lb), what="scriptlb to answer")  # exactly one request
        count, _ = SharedDict(zone_directory(str(tmp_path)), "counters", 1 << 20).get("requests")
    assert count == 1


GROWING_CONF = """
daemon off;
worker_processes 1;
error_log {tmp}/error.log info;
pid {tmp}/scriptlb.pid;
events {{}}
http {{
    python_package_path "{tmp}/?.py";
    python_memory_limit 160m;
    upstream backend {{
        server {a};
        balancer_by_python_block {{
            import hoard
            for _ in range(4):   # 4 MiB more on every request (1 MiB strings: the size cap)
                hoard.keep("x" * ((1 << 20) - 1))
        }}
    }}
    server {{
        listen 127.0.0.1:{lb};
        location / {{ proxy_pass http://backend; }}
    }}
}}
"""

HOARD = """
kept = []


def keep(item):
    kept.append(item)
"""


def _worker_pids(master: int) -> set[int]:
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    return {int(pid) for pid in children}


def test_a_hook_hoarding_memory_retires_the_worker_and_traffic_goes_on(tmp_path: Path) -> None:
    # the backend lives outside scriptlb: a worker draining for its retirement stops accepting,
    # so a backend served by that same worker would hold its last proxied request until timeout
    lb, = free_ports(1)
    (tmp_path / "hoard.py").write_text(HOARD)
    conf = tmp_path / "scriptlb.conf"
    with Backends(respond(body=b"served")) as backends:
        conf.write_text(GROWING_CONF.format(tmp=tmp_path, lb=lb, a=backends[0].addr))
        with master_process(tmp_path, conf) as proc:
            wait_for(lambda: answers(lb), what="scriptlb to answer")
            first = _worker_pids(proc.pid)
            limits = [Path(f"/proc/{pid}/limits").read_text() for pid in first]
            # 60 requests would hoard 240 MiB: past the 160 MiB limit the worker is retired
            # gracefully and a fresh one (with an empty hoard) serves on; no allocation fails
            bodies = [fresh_get(lb) for _ in range(60)]
            log = wait_for(lambda: "exited with code 0" in (tmp_path / "error.log").read_text()
                           and (tmp_path / "error.log").read_text(), what="the retired worker to exit")
            later = wait_for(lambda: _worker_pids(proc.pid) - first, what="a fresh worker")
    assert not any(str(160 << 20) in text for text in limits)  # no address-space cap
    assert bodies == ["served"] * 60
    assert "over python_memory_limit (160 MiB): shutting it down gracefully" in str(log)
    assert "MemoryError" not in str(log)
    assert later
