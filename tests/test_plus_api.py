"""nginx Plus's API (``api [write=on]``) on a real master with two workers: reads, servers
added/changed/removed without a reload in every worker, ``state`` across a restart, drain,
and bad input that changes nothing."""

from __future__ import annotations

import asyncio
import http.client
import json
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import Backend, Backends, closed_port, echo, free_ports, master_process, wait_for

from scriptlb.ops.plus_api import Api, ApiError
from scriptlb.state.peer_lists import PeerList, PeerListStore, ServerEntry, entries_from_conf

pytestmark = pytest.mark.slow


def api(port: int, method: str, path: str, body: Any = None, raw: bytes | None = None) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        text = response.read()
        return response.status, json.loads(text) if text else None
    finally:
        conn.close()


def api_ready(port: int) -> bool:
    try:
        return api(port, "GET", "/api/9/http/upstreams/backend")[0] == 200
    except OSError:
        return False


def worker_of(port: int) -> str:
    """A proxied GET over a new connection; the backend echoes the LB worker's pid."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/")
        return conn.getresponse().read().decode()
    finally:
        conn.close()


def write_conf(prefix: Path, port: int, servers: list[str]) -> Path:
    lines = "\n".join(f"server {s};" for s in servers)
    conf = prefix / "conf" / "scriptlb.conf"
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text(textwrap.dedent(f"""\
        daemon off;
        worker_processes 2;
        error_log logs/error.log info;
        events {{}}
        http {{
            upstream backend {{
                zone backend 64k;
                state backend.state;
        {textwrap.indent(lines, "        ")}
            }}
            server {{
                listen 127.0.0.1:{port} reuseport;
                location / {{ proxy_pass http://backend; proxy_set_header X-Worker $pid; }}
                location /api {{ api write=on; allow 127.0.0.1; deny all; }}
                location /ro/api {{ api; }}
            }}
        }}
        """))
    return conf


def no_new_request_reaches(backend: Any, port: int, per_worker: int = 10, workers: int = 2) -> bool:
    """Proxied GETs over new connections until each of the ``workers`` answered ``per_worker``
    of them (bounded): did none reach ``backend``?

    Counted per worker because a worker that has not polled a change yet sends the server only
    its share of requests. Smooth weighted round robin gives every peer its weight in each cycle
    of sum(weights) requests, so with ``per_worker`` above that sum a worker that had not
    applied the change would almost surely have sent the server one of them."""
    served = len(backend.requests)
    answered: dict[str, int] = {}
    for _ in range(per_worker * workers * 10):
        worker = worker_of(port)  # (the echo of the request, whose X-Worker is the worker's pid)
        answered[worker] = answered.get(worker, 0) + 1
        if len(backend.requests) != served:
            return False
        if len(answered) >= workers and min(answered.values()) >= per_worker:
            return True
    return False  # the connections never reached every worker: not known yet


def workers_seen(backend: Any) -> set[str]:
    return {r.header("X-Worker") or "" for r in backend.requests}


def test_api_reads_writes_in_every_worker_and_survives_a_restart(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    with Backends(echo(), echo(), echo()) as bk:
        conf = write_conf(tmp_path, port, [bk[0].addr, bk[1].addr])
        with master_process(tmp_path, conf):
            wait_for(lambda: api_ready(port), what="the API")
            status, upstream = api(port, "GET", "/api/9/http/upstreams/backend")
            assert [p["server"] for p in upstream["peers"]] == [bk[0].addr, bk[1].addr]
            assert [p["id"] for p in upstream["peers"]] == [0, 1]
            assert {p["state"] for p in upstream["peers"]} == {"up"}
            assert api(port, "GET", "/api/")[1] == list(range(1, 10))
            before = api(port, "GET", "/api/9/http/upstreams/backend/servers")[1]

            # bad input: nginx Plus's error JSON, and nothing changes
            servers = "/api/9/http/upstreams/backend/servers"
            bad = [
                ("POST", servers, None, b"{not json", 400, "UpstreamConfFormatError"),
                ("POST", servers, {"server": bk[2].addr, "colour": 1}, None, 400, "UpstreamConfFormatError"),
                ("POST", servers, {"server": bk[2].addr, "weight": 0}, None, 400, "UpstreamConfFormatError"),
                ("POST", servers, {"weight": 2}, None, 400, "UpstreamConfFormatError"),
                ("POST", "/api/9/http/upstreams/nope/servers", {"server": bk[2].addr}, None, 404,
                 "UpstreamNotFound"),
                ("PATCH", "/api/9/http/upstreams/backend/servers/7", {"weight": 2}, None, 404,
                 "UpstreamServerNotFound"),
                ("PATCH", "/api/9/http/upstreams/backend/servers/0", {"backup": True}, None, 400,
                 "UpstreamServerImmutable"),
                ("POST", "/ro/api/9/http/upstreams/backend/servers", {"server": bk[2].addr}, None, 405,
                 "MethodDisabled"),
                ("GET", "/api/9/nothing", None, None, 404, "PathNotFound"),
                ("GET", "/api/10/nginx", None, None, 404, "UnknownVersion"),
            ]
            for method, path, body, raw, status, code in bad:
                got_status, error = api(port, method, path, body, raw)
                got = (got_status, error["error"]["status"], error["error"]["code"])
                assert got == (status, status, code), error
                assert error["href"].startswith("https://nginx.org/")
            assert api(port, "GET", "/api/9/http/upstreams/backend/servers")[1] == before

            # add a server: both workers send it traffic, without a reload
            status, added = api(port, "POST", "/api/9/http/upstreams/backend/servers",
                                {"server": bk[2].addr, "weight": 2})
            assert status == 201 and added["id"] == 2 and added["weight"] == 2
            deadline = time.monotonic() + 30
            while len(workers_seen(bk[2])) < 2 and time.monotonic() < deadline:
                worker_of(port)
            assert len(workers_seen(bk[2])) == 2, "both workers use the added server"
            # another worker's tries reach the statistics within 50 ms, later on a loaded machine
            peers = wait_for(lambda: _peers_when(port, lambda p: p[2]["requests"] >= 2),
                             what="both workers' tries of the added server in the statistics")
            assert [p["server"] for p in peers] == [bk[0].addr, bk[1].addr, bk[2].addr]
            assert peers[2]["requests"] >= 2  # the shared statistics know the new peer
            assert peers[2]["selected"].endswith("Z") and peers[2]["responses"]["2xx"] >= 2

            # PATCH and DELETE
            assert api(port, "PATCH", f"{servers}/0", {"weight": 5})[1]["weight"] == 5
            status, left = api(port, "DELETE", "/api/9/http/upstreams/backend/servers/1")
            assert status == 200 and [s["id"] for s in left] == [0, 2]
            assert (tmp_path / "backend.state").read_text() == (
                f"server {bk[0].addr} weight=5 max_fails=1 fail_timeout=10s max_conns=0;\n"
                f"server {bk[2].addr} weight=2 max_fails=1 fail_timeout=10s max_conns=0;\n"
            )
            # every worker polls the change (within 50 ms, later on a loaded machine); weights
            # 5 + 1 + 2 before: 10 requests per worker show a worker that has not
            wait_for(lambda: no_new_request_reaches(bk[1], port), timeout=40,
                     what="every worker to drop the server")
            assert no_new_request_reaches(bk[1], port), "a removed server gets no new request"

        # a restart keeps the list through the state file
        with master_process(tmp_path, conf):
            wait_for(lambda: api_ready(port), what="the API")
            servers = api(port, "GET", "/api/9/http/upstreams/backend/servers")[1]
            assert [(s["server"], s["weight"]) for s in servers] == [(bk[0].addr, 5), (bk[2].addr, 2)]


def test_drain_lets_requests_in_flight_finish(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    started = []

    def slow() -> Any:
        async def behaviour(req: Any, writer: asyncio.StreamWriter) -> bool:
            started.append(time.monotonic())
            await asyncio.sleep(1.0)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nslow")
            await writer.drain()
            return True
        return behaviour

    with Backends(slow(), echo()) as bk:
        conf = write_conf(tmp_path, port, [bk[0].addr, bk[1].addr])
        with master_process(tmp_path, conf):
            wait_for(lambda: api_ready(port), what="the API")
            conn = None
            for _ in range(10):  # a request in flight on the slow server
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                before = len(started)
                conn.request("GET", "/")
                # (this request's start: an earlier one that started late, on a loaded machine,
                # must not pass for it)
                if wait_for_started(started, before):
                    break
                conn.getresponse().read()
                conn.close()
            assert conn is not None and started
            status, entry = api(port, "PATCH", "/api/9/http/upstreams/backend/servers/0", {"drain": True})
            assert status == 200 and entry["drain"] is True
            assert conn.getresponse().read() == b"slow"  # the one in flight finished
            conn.close()
            # every worker polls the change (within 50 ms, later on a loaded machine)
            wait_for(lambda: no_new_request_reaches(bk[0], port), timeout=40,
                     what="every worker to stop sending to the draining server")
            assert no_new_request_reaches(bk[0], port)
            peers = api(port, "GET", "/api/9/http/upstreams/backend")[1]["peers"]
            assert peers[0]["state"] == "draining"


def _peers_when(port: int, holds: Callable[[list[dict[str, Any]]], bool]) -> list[dict[str, Any]] | None:
    """The upstream's peers as the API shows them, once ``holds`` is true of them."""
    peers = api(port, "GET", "/api/9/http/upstreams/backend")[1]["peers"]
    return peers if holds(peers) else None


def wait_for_started(started: list[float], before: int, timeout: float = 0.5) -> bool:
    """Did the slow server start a request after it had started ``before`` of them?"""
    deadline = time.monotonic() + timeout
    while len(started) <= before and time.monotonic() < deadline:
        time.sleep(0.01)
    return len(started) > before


# --------------------------------------------------------------------------- in-process


def test_concurrent_changes_never_half_apply(tmp_path: Path) -> None:
    """Several writers at once: each change is whole, none is lost (the store's lock)."""
    import threading

    from scriptlb.config import load

    conf_file = tmp_path / "x.conf"
    conf_file.write_text("http { upstream u { server 127.0.0.1:1; } server { listen 127.0.0.1:1; } }")
    upstream = load(str(conf_file), str(tmp_path)).http.upstreams["u"]  # type: ignore[union-attr]
    store = PeerListStore(str(tmp_path / "zones"))

    def add(port: int) -> None:
        def edit(current: PeerList) -> PeerList:
            entry = ServerEntry(id=current.next_id, server=f"127.0.0.1:{port}")
            return PeerList((*current.servers, entry), current.next_id + 1, 0, current.fingerprint)
        store.change(upstream, edit)

    threads = [threading.Thread(target=add, args=(1000 + i,)) for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    final = store.current(upstream)
    assert len(final.servers) == 21 and final.next_id == 21 and final.generation == 20
    assert sorted(e.id for e in final.servers) == list(range(21))

    def refuse(current: PeerList) -> PeerList:
        raise ApiError(400, "no", "UpstreamConfFormatError")

    with pytest.raises(ApiError):
        store.change(upstream, refuse)
    assert store.current(upstream) == final
    assert entries_from_conf(upstream)[0].server == "127.0.0.1:1"


def test_read_only_api_refuses_writes_before_reading_anything() -> None:
    api_handler = Api(runtime=None, write=False)
    with pytest.raises(ApiError) as err:
        api_handler.handle("DELETE", ["9", "http", "upstreams", "x", "servers", "0"], b"")
    assert (err.value.status, err.value.code) == (405, "MethodDisabled")


@pytest.mark.parametrize(("body", "code"), [
    (b"[" * 100_000, "UpstreamConfFormatError"),  # nesting deep enough to exhaust the recursion limit
    (b'{"server": "example.com:80"}', "UpstreamBadAddress"),  # no DNS lookup in the worker's loop
    (b'{"server": "127.0.0.1:99999"}', "UpstreamBadAddress"),
    (b'{"server": 7}', "UpstreamConfFormatError"),
    (b'{"server": "127.0.0.1:1", "fail_timeout": "soon"}', "UpstreamConfFormatError"),
    (b'{"server": "127.0.0.1:1", "down": "yes"}', "UpstreamConfFormatError"),
    (b'"just a string"', "UpstreamConfFormatError"),
])
def test_hostile_api_input_is_refused_before_any_change(body: bytes, code: str) -> None:
    from scriptlb.ops.plus_api import _parse_fields

    with pytest.raises(ApiError) as err:
        _parse_fields(body, require_server=True)
    assert (err.value.status, err.value.code) == (400, code)


def counting_backend(statuses: list[int], seen: list[int]) -> Backend:
    """Answers GETs with the next of ``statuses`` (a fixed-size response), keeping the
    connection; ``seen`` gets the byte count of every request it read."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while statuses:
                head = await reader.readuntil(b"\r\n\r\n")
                seen.append(len(head))
                writer.write(COUNTED_RESPONSE % statuses.pop(0))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    return Backend(echo(), raw_handler=handler)


COUNTED_RESPONSE = b"HTTP/1.1 %d X\r\nContent-Length: 5\r\n\r\nhello"


def test_peer_codes_bytes_unavail_and_header_time(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    seen: list[int] = []
    bk = Backends()
    bk.backends.append(counting_backend([200, 404, 200], seen))
    dead = f"127.0.0.1:{closed_port()}"
    with bk:
        conf = write_conf(tmp_path, port, [bk[0].addr, f"{dead} max_fails=1 fail_timeout=60s"])
        conf.write_text(conf.read_text().replace("worker_processes 2;", "worker_processes 1;"))
        with master_process(tmp_path, conf):
            wait_for(lambda: api_ready(port), what="the API")
            for _ in range(3):  # the dead peer is tried once, then unavailable for 60 s
                worker_of(port)
            # the tries reach the statistics within 50 ms, later on a loaded machine
            live, down = wait_for(lambda: _peers_when(port, lambda p: p[0]["responses"]["total"] == 3),
                                  what="the three tries in the statistics")
    assert live["responses"]["codes"] == {"200": 2, "404": 1}
    assert (live["responses"]["2xx"], live["responses"]["4xx"], live["responses"]["total"]) == (2, 1, 3)
    assert live["sent"] == sum(seen) and len(seen) == 3
    assert live["received"] == 3 * len(COUNTED_RESPONSE % 200)
    assert (live["unavail"], live["fails"]) == (0, 0)
    assert isinstance(live["header_time"], int) and live["header_time"] >= 0
    assert (down["requests"], down["fails"], down["unavail"], down["state"]) == (1, 1, 1, "unavail")
    assert (down["responses"]["codes"], down["sent"], down["received"]) == ({}, 0, 0)
    assert "header_time" not in down  # no response header ever came
