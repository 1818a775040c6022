"""Several scriptlb nodes as one cluster: shared dicts merged through a real Redis (started and
killed by the tests), three real masters on loopback ports, real clients."""

from __future__ import annotations

import asyncio
import base64
import http.client
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
from cluster_servers import DnsServer, EtcdServer, RedisServer
from helpers import (
    Backend,
    Backends,
    answers,
    free_ports,
    master_process,
    respond,
    wait_for,
    with_hook_budget,
)

from scriptlb.config.model import DictSyncConf
from scriptlb.ops.cluster import ClusterStatus
from scriptlb.state.dict_sync import DictSync
from scriptlb.state.shared_dict import SharedDict, SyncedSharedDict, zone_directory

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

ZONE_SIZE = 1 << 20


# --------------------------------------------------------------------------- in one process


async def _converged(zones: list[SyncedSharedDict], key: str, value: object, timeout: float = 10.0) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if all(zone.get(key)[0] == value for zone in zones):
            return time.monotonic() - start
        await asyncio.sleep(0.01)
    raise AssertionError(f"{key}: {[zone.get(key)[0] for zone in zones]} != {value}")


async def _until(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Until ``predicate`` holds (checked while the sync tasks run), or fail saying what."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


def test_three_zones_merge_counters_exactly_through_a_redis_crash(tmp_path: Path) -> None:
    """Three nodes' zones, each with its DictSync: increments add up exactly, sets are
    last-writer-wins, deletes reach everyone, and a Redis killed (losing everything, no
    persistence) and restarted under writes loses and doubles nothing."""

    async def scenario(redis: RedisServer) -> None:
        conf = DictSyncConf(redis.url, 0.02, "t:")
        zones = [SyncedSharedDict(str(tmp_path / f"node{i}"), "d", ZONE_SIZE) for i in range(3)]
        syncs = [DictSync(zone, conf) for zone in zones]
        tasks = [asyncio.create_task(sync.run()) for sync in syncs]
        try:
            for _ in range(100):
                for zone in zones:
                    zone.incr("hits", 1, 0)
            await _converged(zones, "hits", 300)
            zones[0].set("motd", "hello", 30)
            await _converged(zones, "motd", "hello")
            assert 29 < zones[2].ttl("motd")[0] <= 30
            zones[1].set("motd", "bye")
            await _converged(zones, "motd", "bye")
            redis.kill()
            for _ in range(50):
                for zone in zones:
                    zone.incr("hits", 1, 0)
            assert [zone.get("hits")[0] for zone in zones] == [350, 350, 350]  # local, go on serving
            await _until(lambda: all(sync.reachable is False for sync in syncs),
                         "every zone to see Redis gone")
            redis.start()
            await _converged(zones, "hits", 450)
            await _converged(zones, "motd", "bye")  # restored from the nodes
            stored = redis.client().hgetall("t:k:hits")
            assert sorted(int(v) for f, v in stored.items() if f.startswith(b"n:")) == [150, 150, 150]
            zones[2].delete("motd")
            zones[0].set("n", 5)
            await _converged(zones, "motd", None)
            await _converged(zones, "n", 5)
            zones[1].incr("n", 2)
            await _converged(zones, "n", 7)  # a set value, then increments on top
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for sync in syncs:
                await sync.close()
            for zone in zones:
                zone.close()

    with RedisServer(tmp_path / "redis") as redis:
        asyncio.run(scenario(redis))


def test_password_from_a_file_and_a_wrong_one(tmp_path: Path) -> None:
    """``sync_password_file``: the right password merges; a wrong one is "unavailable" (logged
    once) and the zone keeps serving its local values."""
    from scriptlb.logs import errorlog

    async def scenario(redis: RedisServer) -> None:
        (tmp_path / "good").write_text("s3cret\n")
        (tmp_path / "bad").write_text("nope\n")
        good = SyncedSharedDict(str(tmp_path / "a"), "d", ZONE_SIZE)
        bad = SyncedSharedDict(str(tmp_path / "b"), "d", ZONE_SIZE)
        syncs = [DictSync(good, DictSyncConf(redis.url, 0.02, "p:", str(tmp_path / "good"))),
                 DictSync(bad, DictSyncConf(redis.url, 0.02, "p:", str(tmp_path / "bad")))]
        tasks = [asyncio.create_task(sync.run()) for sync in syncs]
        try:
            good.incr("n", 2, 0)
            bad.incr("n", 5, 0)
            await _converged([good], "n", 2)
            await _until(lambda: syncs[1].reachable is False, "the wrong password to be refused")
            assert bad.get("n")[0] == 5
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for sync in syncs:
                await sync.close()
            good.close()
            bad.close()

    log = tmp_path / "error.log"
    previous = errorlog.install(errorlog.ErrorLog((errorlog.ErrorLogConf(str(log), "info"),)))
    try:
        with RedisServer(tmp_path / "redis", "--requirepass", "s3cret") as redis:
            asyncio.run(scenario(redis))
    finally:
        errorlog.install(previous).close()
    text = log.read_text()
    assert text.count("unavailable (") == 1 and "s3cret" not in text and "nope" not in text


# --------------------------------------------------------------------------- three real nodes


def node_conf(prefix: Path, port: int, backends: str, http_extra: str, hook: str) -> str:
    return f"""
daemon off;
worker_processes 1;
error_log {prefix}/error.log notice;
pid {prefix}/scriptlb.pid;
events {{}}
http {{
    access_log off;
    {http_extra}
    upstream u {{
        {backends}
        {hook}
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{ proxy_pass http://u; }}
    }}
}}
"""


def store_up(prefix: Path, kind: str, name: str) -> bool | None:
    """Whether the node's cluster process last saw its ``kind`` store for ``name`` reachable
    (None: it has not reported that store yet)."""
    state = ClusterStatus.read(zone_directory(str(prefix))).get(kind, {}).get(name)
    return None if state is None else bool(state["up"])


def wait_stores(nodes: list[tuple[Path, int]], kind: str, name: str, up: bool) -> None:
    """Until every node's cluster process has seen the store ``up`` (or down): a test that kills
    a store, or needs the nodes merged, waits on this instead of a sleep, which a loaded machine
    can outlast (a cluster process not yet connected when Redis is killed sees no outage)."""
    for prefix, _ in nodes:
        wait_for(lambda prefix=prefix: store_up(prefix, kind, name) is up, 20,
                 f"{prefix.name} to see {kind} {name} {'up' if up else 'down'}")


@contextmanager
def three_nodes(tmp_path: Path, conf_for: Callable[[Path, int], str], count: int = 3,
                synced: tuple[str, ...] = ()) -> Iterator[list[tuple[Path, int]]]:
    """Three masters (one worker and one cluster process each) on their own ports/prefixes,
    answering, and merged with Redis for the ``synced`` dicts. Hooks get the suite's budget
    (``with_hook_budget``): a hook cut off by the 10 ms default under load falls back to the
    upstream's balancer, which a test of a hook's policy would count against the policy."""
    ports = free_ports(count)
    nodes = []
    with ExitStack() as stack:
        for i, port in enumerate(ports):
            prefix = tmp_path / f"node{i}"
            prefix.mkdir()
            (prefix / "scriptlb.conf").write_text(with_hook_budget(conf_for(prefix, port)))
            stack.enter_context(master_process(prefix, prefix / "scriptlb.conf"))
            nodes.append((prefix, port))
        for _, port in nodes:
            wait_for(lambda port=port: answers(port, "/ready") is not None, 20, f"node on {port}")
        for name in synced:
            wait_stores(nodes, "redis", name, up=True)
        yield nodes


class Load:
    """One paced client per node: ``rate`` requests per second over a keep-alive connection,
    at most ``seconds`` long; statuses collected."""

    def __init__(self, ports: list[int], rate: float, seconds: float) -> None:
        self.ports = ports
        self.rate = rate
        self.seconds = seconds
        self.statuses: Counter[int] = Counter()
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._client, args=(p,), daemon=True) for p in ports]

    def _client(self, port: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        start = time.monotonic()
        sent = 0
        while not self._stop.is_set() and time.monotonic() - start < self.seconds:
            try:
                conn.request("GET", f"/{sent}")
                response = conn.getresponse()
                response.read()
                with self._lock:
                    self.statuses[response.status] += 1
            except (OSError, http.client.HTTPException) as err:
                with self._lock:
                    self.failures.append(f"{port}: {err!r}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            sent += 1
            delay = start + sent / self.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        conn.close()

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def wait(self) -> None:
        for thread in self._threads:
            thread.join(self.seconds + 30)

    def served(self) -> int:
        with self._lock:
            return sum(self.statuses.values())

    def wait_served(self, count: int) -> None:
        """Until ``count`` requests have been answered in all (a step of a test measured in
        requests, not in seconds a loaded machine may not give the clients)."""
        wait_for(lambda: self.served() >= count, 20, f"{count} requests served")

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.wait()


def _arrivals() -> tuple[list[float], object]:
    """A backend behaviour recording each request's arrival (wall clock, as the hook's windows)."""
    times: list[float] = []
    answer = respond(200, b"ok")

    async def behaviour(req, writer) -> bool:
        times.append(time.time())
        return await answer(req, writer)

    return times, behaviour


def test_rate_aware_limit_holds_for_the_cluster(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """hooks/rate_aware.py in cluster mode on three nodes sharing one Redis: with an even load
    of twice the limit, every full second admits between 90% and 110% of LIMIT in total."""
    limit = 60
    hook_text = (ROOT / "hooks" / "rate_aware.py").read_text()
    for old, new in {"LIMIT = 50": f"LIMIT = {limit}", "NODES = 1": "NODES = 3"}.items():
        assert old in hook_text
        hook_text = hook_text.replace(old, new)
    hook_file = tmp_path / "rate_aware.py"
    hook_file.write_text(hook_text)
    times, behaviour = _arrivals()
    with RedisServer(tmp_path / "redis") as redis, Backends(behaviour) as backends:
        zones = (f"python_shared_dict rate 1m sync={redis.url} sync_interval=50ms;\n"
                 "python_shared_dict rate_local 1m;")

        def conf_for(prefix: Path, port: int) -> str:
            return node_conf(prefix, port, f"server {backends[0].addr};", zones,
                             f"balancer_by_python_file {hook_file};")

        with three_nodes(tmp_path, conf_for, synced=("rate",)) as nodes:
            time.sleep(1.0 - time.time() % 1.0)
            started = time.time()
            with Load([port for _, port in nodes], rate=2 * limit / 3, seconds=5.2) as load:
                load.wait()
    assert not load.failures
    assert load.statuses[200] > 0 and load.statuses[503] > 0
    per_second = Counter(int(t) for t in times if t >= started)  # not the readiness probes
    full = [per_second[s] for s in sorted(per_second)[1:-1]]  # the first and last are partial
    assert len(full) >= 3, per_second
    with capsys.disabled():
        print(f"\ncluster rate limit {limit}/s on 3 nodes, admitted per full second: {full}")
    for admitted in full:
        assert 0.9 * limit <= admitted <= 1.1 * limit, full


def test_counts_survive_a_redis_crash_under_load(tmp_path: Path) -> None:
    """Every request counts once in a cluster-wide counter: Redis killed (losing its data) and
    restarted while three nodes serve; no client request fails, and afterwards every node and
    Redis hold exactly the number of requests served."""
    with RedisServer(tmp_path / "redis") as redis, Backends(respond(200, b"ok")) as backends:
        zone = f"python_shared_dict hits 1m sync={redis.url} sync_interval=50ms;"
        hook = 'balancer_by_python_block { ngx.shared.hits.incr("total", 1, 0) }'

        def conf_for(prefix: Path, port: int) -> str:
            return node_conf(prefix, port, f"server {backends[0].addr};", zone, hook)

        with three_nodes(tmp_path, conf_for, synced=("hits",)) as nodes:
            readiness = 3  # the probes counted too
            with Load([port for _, port in nodes], rate=50, seconds=30.0) as load:
                load.wait_served(50)
                redis.kill()
                wait_stores(nodes, "redis", "hits", up=False)
                load.wait_served(load.served() + 50)  # served while Redis is gone
                redis.start()
                wait_stores(nodes, "redis", "hits", up=True)
                load.wait_served(load.served() + 50)
            served = sum(load.statuses.values()) + readiness
            zones = [SharedDict(zone_directory(str(prefix)), "hits", ZONE_SIZE) for prefix, _ in nodes]
            try:
                wait_for(lambda: all(z.get("total")[0] == served for z in zones), 15,
                         f"every node to count {served}: {[z.get('total')[0] for z in zones]}")
            finally:
                for z in zones:
                    z.close()
            stored = redis.client().hgetall("scriptlb:hits:k:total")
            logs = [(prefix / "error.log").read_text() for prefix, _ in nodes]
    assert not load.failures
    assert set(load.statuses) == {200}
    assert sum(int(v) for f, v in stored.items() if f.startswith(b"n:")) == served
    for log in logs:
        assert log.count("unavailable (") == 1, log  # once per state change, not per retry
        assert log.count("reachable again") == 1


# --------------------------------------------------------------------------- etcd membership


def _bodies(port: int, count: int) -> set[str]:
    """The backends that answered ``count`` requests on new connections (None: no answer)."""
    seen = set()
    for _ in range(count):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request("GET", "/")
            response = conn.getresponse()
            seen.add(response.read().decode() if response.status == 200 else str(response.status))
        finally:
            conn.close()
    return seen


def _propagation(ports: list[int], expected: set[str], timeout: float = 10.0) -> float:
    """Seconds until every node's traffic goes to exactly the ``expected`` backends."""
    start = time.monotonic()
    wait_for(lambda: all(_bodies(port, 4) == expected for port in ports), timeout,
             f"every node to serve {expected}")
    return time.monotonic() - start


def _store_up(port: int, store: str, name: str) -> float | None:
    from prometheus_client.parser import text_string_to_metric_families

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "scriptlb_cluster_store_up" and sample.labels == {"store": store, "name": name}:
                return sample.value
    return None


def test_etcd_membership_reaches_every_node_and_survives_an_etcd_crash(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Three nodes take an upstream's servers from one etcd prefix: a key added, changed (down)
    or deleted reaches the traffic of all three (through the watch: at once); etcd killed under load keeps
    the last servers (no failed request, one error line per node, the metric and the API say
    so) and a change made after its restart arrives through the resumed watch."""
    from test_plus_api import api

    with EtcdServer(tmp_path / "etcd") as etcd, \
            Backends(respond(200, b"b0"), respond(200, b"b1")) as backends:
        prefix = "/scriptlb/upstreams/u/"
        b0, b1 = (prefix + b.addr for b in backends)

        def conf_for(node_prefix: Path, port: int) -> str:
            text = node_conf(node_prefix, port, "zone u 64k;",
                             "", f"discovery etcd={etcd.url} prefix={prefix} timeout=1s;")
            return text.replace("location / {", "location /metrics { prometheus; }\n"
                                "        location /api { api; }\n        location / {")

        etcd.put(b0, "")
        with three_nodes(tmp_path, conf_for) as nodes:
            ports = [port for _, port in nodes]
            # (the watch delivers a change at once; the bound leaves room for a loaded machine,
            # where asking three nodes four times each takes a while by itself)
            delays = []
            etcd.put(b1, '{"weight": 2}')
            delays.append(_propagation(ports, {"b0", "b1"}, timeout=5.0))
            etcd.put(b0, '{"down": true}')
            delays.append(_propagation(ports, {"b1"}, timeout=5.0))
            etcd.put(b0, "{}")
            etcd.delete(b1)
            delays.append(_propagation(ports, {"b0"}, timeout=5.0))
            assert _store_up(ports[0], "etcd", "u") == 1
            with Load(ports, rate=30, seconds=2.0) as load:
                time.sleep(0.3)
                etcd.kill()
                wait_for(lambda: _store_up(ports[0], "etcd", "u") == 0, 10, "the metric to say etcd is down")
                membership = api(ports[1], "GET", "/api/9/http/upstreams/u")[1]["membership"]
                assert (membership["store"], membership["up"]) == ("etcd", False), membership
                assert membership["error"]
                load.wait()
            etcd.start()
            etcd.put(b1, "")
            after_restart = _propagation(ports, {"b0", "b1"}, timeout=15)
            logs = [(p / "error.log").read_text() for p, _ in nodes]
    with capsys.disabled():
        print(f"\netcd change -> traffic on all 3 nodes: {[round(d, 3) for d in delays]} s; "
              f"after an etcd restart: {after_restart:.3f} s")
    assert not load.failures and set(load.statuses) == {200}, (load.failures, load.statuses)
    for log in logs:
        assert log.count(f"etcd {etcd.url} unavailable (") == 1, log
        assert "keeping the last known servers" in log
        assert f"etcd {etcd.url} reachable again" in log


# --------------------------------------------------------------------------- DNS membership


def _workers(backend: Backend) -> set[str | None]:
    """The workers (``$pid``, sent by ``_dns_conf``'s nodes) whose requests ``backend`` got."""
    return {request.header("X-Worker") for request in backend.requests}


def _dns_conf(dns: DnsServer, servers: str) -> Callable[[Path, int], str]:
    def conf_for(node_prefix: Path, port: int) -> str:
        text = node_conf(node_prefix, port, "zone u 64k;\n" + servers, "", "")
        text = text.replace("worker_processes 1;", "worker_processes 2;")
        text = text.replace("proxy_pass http://u;", "proxy_pass http://u; proxy_set_header X-Worker $pid;")
        return text.replace("access_log off;", f"access_log off;\n    resolver 127.0.0.1:{dns.port} ipv6=off;"
                                               "\n    resolver_timeout 1s;")
    return conf_for


def test_srv_records_changing_under_load(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``server svc.test service=_http._tcp resolve``: SRV records give the peers' ports; a
    record added or removed reaches the traffic of both workers without a reload and without a
    failed request, a peer that stays keeps its id, and a resolver answering SERVFAIL keeps
    the last peers."""
    from scriptlb.state.peer_lists import PeerListStore

    with DnsServer() as dns, Backends(respond(200, b"b0"), respond(200, b"b1")) as backends:
        srv = ("_http._tcp.svc.test", "SRV")
        dns.records = {srv: [(f"10 1 {backends[0].port} b.svc.test.", 1)],
                       ("b.svc.test", "A"): [("127.0.0.1", 1)]}
        conf_for = _dns_conf(dns, "server svc.test service=_http._tcp resolve;")
        with three_nodes(tmp_path, conf_for, count=1) as nodes:
            prefix, port = nodes[0]
            store = PeerListStore(zone_directory(str(prefix)))
            # each worker applies the list at its next poll of the store: until both have, one
            # may still have none, and the load's first request to it would get a 502
            wait_for(lambda: _bodies(port, 4) == {"b0"} and len(_workers(backends[0])) == 2, 10,
                     "b0 from DNS in both workers")
            with Load([port], rate=40, seconds=8.0) as load:
                dns.records[srv] = [(f"10 1 {backends[0].port} b.svc.test.", 1),
                                    (f"10 1 {backends[1].port} b.svc.test.", 1)]
                added = _propagation([port], {"b0", "b1"})
                b1_id = {e.server: e.id for e in store.read()["u"].servers}[backends[1].addr]
                dns.records[srv] = [(f"10 1 {backends[1].port} b.svc.test.", 1)]
                removed = _propagation([port], {"b1"})
                assert {e.server: e.id for e in store.read()["u"].servers} == {backends[1].addr: b1_id}
                failing_from = dns.queries
                dns.fail = True
                wait_for(lambda: dns.queries >= failing_from + 2, 10, "two failed lookups")
                assert _bodies(port, 4) == {"b1"}
                dns.fail = False
                load.wait()
            log = (prefix / "error.log").read_text()
    with capsys.disabled():
        print(f"\nDNS SRV change -> traffic (TTL 1 s): added {added:.3f} s, removed {removed:.3f} s")
    assert not load.failures and set(load.statuses) == {200}, (load.failures, load.statuses)
    assert log.count('resolving "svc.test" via') >= 1 and "SERVFAIL" in log
    assert "keeping the last known servers" in log


def test_a_records_and_nxdomain(tmp_path: Path) -> None:
    """``server NAME:PORT resolve``: A records give the addresses; NXDOMAIN is an answer (no
    peer left: 502), and the name coming back brings the peer back."""
    with DnsServer() as dns, Backends(respond(200, b"b0")) as backends:
        dns.records = {("app.test", "A"): [("127.0.0.1", 1)]}
        servers = f"server app.test:{backends[0].port} resolve;"
        with three_nodes(tmp_path, _dns_conf(dns, servers), count=1) as nodes:
            port = nodes[0][1]
            wait_for(lambda: _bodies(port, 2) == {"b0"}, 10, "app.test resolved")
            dns.records = {("other.test", "A"): [("127.0.0.1", 1)]}
            wait_for(lambda: _bodies(port, 2) == {"502"}, 10, "app.test gone")
            dns.records = {("app.test", "A"): [("127.0.0.1", 1)]}
            wait_for(lambda: _bodies(port, 2) == {"b0"}, 10, "app.test back")


def test_api_change_of_an_etcd_backed_upstream_reaches_every_node(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """One cluster on one etcd and one Redis: the API on one node writes through to etcd, so a
    server drained with PATCH (down) on node 0 stops taking traffic on all three nodes within
    a second and the key holds the change; meanwhile every node counts the requests of all
    three in a synced dict."""
    from test_plus_api import api

    with EtcdServer(tmp_path / "etcd") as etcd, RedisServer(tmp_path / "redis") as redis, \
            Backends(respond(200, b"b0"), respond(200, b"b1")) as backends:
        prefix = "/scriptlb/upstreams/u/"
        for b in backends:
            etcd.put(prefix + b.addr, "")

        def conf_for(node_prefix: Path, port: int) -> str:
            text = node_conf(node_prefix, port, "zone u 64k;",
                             f"python_shared_dict hits 1m sync={redis.url} sync_interval=20ms;",
                             f"discovery etcd={etcd.url} prefix={prefix};\n"
                             'balancer_by_python_block { ngx.shared.hits.incr("total", 1, 0) }')
            return text.replace("location / {", "location /api { api write=on; }\n        location / {")

        with three_nodes(tmp_path, conf_for) as nodes:
            ports = [port for _, port in nodes]
            _propagation(ports, {"b0", "b1"})
            status, servers = api(ports[0], "GET", "/api/9/http/upstreams/u/servers")
            assert status == 200, servers
            b0_id = next(s["id"] for s in servers if s["server"] == backends[0].addr)
            start = time.monotonic()
            status, entry = api(ports[0], "PATCH", f"/api/9/http/upstreams/u/servers/{b0_id}", {"down": True})
            assert (status, entry["down"]) == (200, True)
            _propagation(ports, {"b1"})
            delay = time.monotonic() - start
            stored = etcd._call("/v3/kv/range", {"key": _b64(prefix + backends[0].addr)})
            served = sum(len(b.requests) for b in backends)
            zones = [SharedDict(zone_directory(str(p)), "hits", ZONE_SIZE) for p, _ in nodes]

            def same_total() -> bool:
                stored = redis.client().hgetall("scriptlb:hits:k:total")
                in_redis = sum(int(v) for f, v in stored.items() if f.startswith(b"n:"))
                return {z.get("total")[0] for z in zones} == {in_redis}

            try:
                wait_for(same_total, 10, "every node to count the requests of all three")
                counted = zones[0].get("total")[0]
            finally:
                for z in zones:
                    z.close()
    with capsys.disabled():
        print(f"\nAPI PATCH on one node -> traffic on all 3 nodes through etcd: {delay:.3f} s")
    assert delay < 1.0
    assert counted >= served  # (plus the hooks' runs for the start-up probes, answered 502)
    assert '"down": true' in base64.b64decode(stored["kvs"][0]["value"]).decode()


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_the_cluster_process_follows_reloads_and_is_respawned(tmp_path: Path) -> None:
    """One cluster process per node: a reload replaces it (the old one pushes and exits), a
    SIGKILLed one is respawned by the master, and increments made meanwhile still reach Redis
    exactly once."""
    import os
    import re
    import signal

    with RedisServer(tmp_path / "redis") as redis, Backends(respond(200, b"ok")) as backends:
        zone = f"python_shared_dict hits 1m sync={redis.url} sync_interval=20ms;"
        hook = 'balancer_by_python_block { ngx.shared.hits.incr("total", 1, 0) }'

        def conf_for(prefix: Path, port: int) -> str:
            return node_conf(prefix, port, f"server {backends[0].addr};", zone, hook)

        def in_redis() -> int:
            stored = redis.client().hgetall("scriptlb:hits:k:total")
            return sum(int(v) for f, v in stored.items() if f.startswith(b"n:"))

        def cluster_pids(log: Path) -> list[int]:
            return [int(p) for p in re.findall(r"start cluster process (\d+)", log.read_text())]

        with three_nodes(tmp_path, conf_for, count=1) as nodes:
            prefix, port = nodes[0]
            log = prefix / "error.log"
            master_pid = int((prefix / "scriptlb.pid").read_text())
            _bodies(port, 5)
            wait_for(lambda: in_redis() == 6, 10, "6 counted in Redis")  # 5 + the readiness probe
            os.kill(master_pid, signal.SIGHUP)
            wait_for(lambda: len(cluster_pids(log)) == 2, 10, "a new cluster process after the reload")
            _bodies(port, 5)
            wait_for(lambda: in_redis() == 11, 10, "11 counted in Redis")
            os.kill(cluster_pids(log)[-1], signal.SIGKILL)
            wait_for(lambda: len(cluster_pids(log)) == 3, 10, "the cluster process respawned")
            _bodies(port, 5)
            wait_for(lambda: in_redis() == 16, 10, "16 counted in Redis")
            assert len(set(cluster_pids(log))) == 3
            first, second, _ = cluster_pids(log)
            wait_for(lambda: f"cluster process {first} exited with code 0" in log.read_text(), 10,
                     "the first cluster process to stop after the reload (QUIT)")
            assert f"cluster process {second} exited on signal 9" in log.read_text()


def test_dns_lookups_a_aaaa_srv_priorities_and_ttl(tmp_path: Path) -> None:
    """What one lookup makes of the answers: A and AAAA peers with the line's port and
    parameters, SRV ports and weights with higher priority numbers as backup peers, the
    smallest TTL as the next lookup's delay, NXDOMAIN as no peer, SERVFAIL as a failure."""
    from test_config_directives import http

    from scriptlb.ops.resolver import DnsMembership, LookupFailed
    from scriptlb.state.peer_lists import PeerListStore

    with DnsServer() as dns:
        dns.records = {
            ("app.test", "A"): [("127.0.0.1", 30)], ("app.test", "AAAA"): [("::1", 20)],
            ("_http._tcp.svc.test", "SRV"): [("10 5 8001 a.svc.test.", 40), ("20 1 8002 a.svc.test.", 40)],
            ("a.svc.test", "A"): [("127.0.0.1", 50)],
        }
        conf = http(tmp_path, f"resolver 127.0.0.1:{dns.port}; resolver_timeout 1s;\n"
                              "upstream u { zone u; server app.test:8080 resolve max_fails=3;\n"
                              "server svc.test service=http resolve weight=7; }")
        assert conf.http is not None
        membership = DnsMembership(conf.http.upstreams["u"], conf.http.upstreams["u"].resolver,
                                   PeerListStore(str(tmp_path)))
        a_line, srv_line = membership.lines

        async def lookups() -> None:
            members, ttl = await membership.lookup(a_line)
            assert [(m, f["max_fails"]) for m, f in members] == [("127.0.0.1:8080", 3), ("[::1]:8080", 3)]
            assert ttl == 20
            members, ttl = await membership.lookup(srv_line)
            assert [(m, f["weight"], f["backup"]) for m, f in members] == [
                ("127.0.0.1:8001", 5, False), ("127.0.0.1:8002", 1, True)]
            assert ttl == 40
            dns.records = {("other.test", "A"): [("127.0.0.1", 1)]}
            assert await membership.lookup(a_line) == ([], None)  # NXDOMAIN: an answer
            dns.fail = True
            with pytest.raises(LookupFailed, match="SERVFAIL"):
                await membership.lookup(a_line)

        asyncio.run(lookups())
