"""log_by_python through real sockets: what the hook sees (compared with the access log line
of the same request), ngx.ctx shared with the balancer hook, innermost-wins inheritance,
failures that never touch the response or the connection, one run per finished request
(proxied, return, 444, 502, 499, 400 rejected by the connection or for its URI),
python_code_cache off, and a real master with two workers."""

from __future__ import annotations

import re
import socket
import struct
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers import (
    Backends,
    HttpConnection,
    Scriptlb,
    answers,
    closed_port,
    free_ports,
    get,
    hang,
    master_process,
    respond,
    wait_for,
)

from scriptlb.config.model import PythonConf
from scriptlb.hookrt import api, hooks
from scriptlb.state.shared_dict import SharedDict, zone_directory

VARS = ("status", "upstream_addr", "upstream_status", "upstream_response_time", "upstream_connect_time",
        "upstream_header_time", "request_time", "bytes_sent")

# The hook logs the variables in the access log's order, then its phase and ngx.ctx's "picked".
SEEN_HOOK = """log_by_python_block {
        v = ngx.var
        n = ngx.shared.counts.incr("n", 1, 0)[0]
        ngx.log(ngx.NOTICE, "seen|", v.status, "|", v.upstream_addr, "|", v.upstream_status, "|",
                v.upstream_response_time, "|", v.upstream_connect_time, "|", v.upstream_header_time,
                "|", v.request_time, "|", v.bytes_sent, "|", ngx.get_phase(), "|",
                ngx.ctx.get("picked"), "|", n)
    }"""


def conf(backend: str, http_extra: str = "", server_extra: str = "", location_extra: str = "") -> str:
    return f"""
daemon off;
master_process off;
error_log {{tmp}}/error.log notice;
http {{
    python_shared_dict counts 1m;
    log_format vars '{"|".join("$" + v for v in VARS)}';
    {http_extra}
    upstream u {{
        server {backend};
        balancer_by_python_block {{
            ngx.ctx["picked"] = "by-balancer"
            balancer.set_current_peer("{backend}")
        }}
    }}
    server {{
        listen 127.0.0.1:{{port0}};
        access_log {{tmp}}/access.log vars;
        {server_extra}
        location / {{
            proxy_pass http://u;
            proxy_read_timeout 30s;
            {location_extra}
        }}
        location /ret {{ return 200 "hello"; }}
        location /close {{ return 444; }}
        location /dead {{ proxy_pass http://127.0.0.1:{closed_port()}; }}
    }}
}}
"""


_ZONES: list[SharedDict] = []


@pytest.fixture(autouse=True)
def _default_python_settings() -> Iterator[None]:
    hooks.configure(PythonConf())  # code cache on, no package path (another test may change it)
    yield
    api.set_shared_dicts({})  # the worker thread's zones: no other test sees them
    while _ZONES:
        _ZONES.pop().close()


def start(text: str, tmp_path: Path, **values: object) -> Scriptlb:
    """A worker thread; its python_shared_dict zones attached as a worker process does."""
    lb = Scriptlb(text, tmp_path, tmp=tmp_path, **values)
    assert lb.conf.http is not None
    zones = {name: SharedDict(zone_directory(str(tmp_path)), name, zone.size)
             for name, zone in lb.conf.http.shared_dicts.items()}
    _ZONES.extend(zones.values())
    api.set_shared_dicts(zones)
    return lb


def error_log(tmp_path: Path) -> str:
    path = tmp_path / "error.log"
    return path.read_text() if path.exists() else ""


def access_lines(tmp_path: Path) -> list[list[str]]:
    path = tmp_path / "access.log"
    text = path.read_text() if path.exists() else ""
    return [line.split("|") for line in text.splitlines()]


def seen(tmp_path: Path) -> list[list[str]]:
    """The SEEN_HOOK lines, in order: its fields between "seen|" and the error log context."""
    found = re.findall(r"seen\|(.*) while logging request, client: ", error_log(tmp_path))
    return [line.split("|") for line in found]


def dash(value: str) -> str:
    return "-" if value == "None" else value  # the access log's "-" is the hook's None


def counter(tmp_path: Path, key: str = "n") -> int:
    zone = SharedDict(zone_directory(str(tmp_path)), "counts", 1 << 20)
    try:
        return zone.get(key)[0] or 0
    finally:
        zone.close()


# --------------------------------------------------------------------------- what the hook sees


def test_the_hook_sees_the_access_log_values_and_the_balancer_ctx(tmp_path: Path) -> None:
    with Backends(respond(body=b"from backend")) as bk, \
            start(conf(bk[0].addr, http_extra=SEEN_HOOK), tmp_path) as lb:
        with HttpConnection(lb.port) as client:
            assert client.request(path="/x").body == b"from backend"
            assert client.request(path="/ret").body == b"hello"
        assert get(lb.port, "/dead").status == 502
        wait_for(lambda: len(seen(tmp_path)) == 3, what="three log hook runs")
    hook_lines, log_lines = seen(tmp_path), access_lines(tmp_path)
    assert [line[0] for line in log_lines] == ["200", "200", "502"]
    for hook_line, log_line in zip(hook_lines, log_lines, strict=True):
        assert [dash(field) for field in hook_line[:len(VARS)]] == log_line
        assert hook_line[len(VARS)] == "log"  # ngx.get_phase()
    proxied, returned, failed = hook_lines
    assert proxied[1] == bk[0].addr and proxied[2] == "200"
    assert float(proxied[3]) >= 0 and int(proxied[7]) > len(b"from backend")
    assert proxied[len(VARS) + 1] == "by-balancer"  # the same ngx.ctx the balancer hook wrote
    assert returned[1] == "None" and returned[len(VARS) + 1] == "None"  # no balancer run: empty ctx
    assert failed[2] == "502" and failed[len(VARS) + 1] == "None"  # /dead: no balancer hook
    assert [line[-1] for line in hook_lines] == ["1", "2", "3"]


def test_upstream_api_is_the_locations_upstream_and_balancer_api_is_disabled(tmp_path: Path) -> None:
    hook = """log_by_python_block {
        try:
            name = upstream.current_upstream_name()
            peers = len(upstream.get_primary_peers())
        except RuntimeError as err:
            name, peers = "error", str(err)
        try:
            balancer.get_last_failure()
        except RuntimeError as err:
            disabled = str(err)
        ngx.log(ngx.NOTICE, "api|", ngx.var.uri, "|", name, "|", peers, "|", disabled)
    }"""
    with Backends(respond()) as bk, start(conf(bk[0].addr, http_extra=hook), tmp_path) as lb:
        assert get(lb.port, "/p").status == 200
        assert get(lb.port, "/ret").status == 200
        wait_for(lambda: error_log(tmp_path).count("api|") == 2, what="two log hook runs")
    found = re.findall(r"api\|(.*) while logging request", error_log(tmp_path))
    disabled = "API disabled in the context of log_by_python"
    assert found == [f"/p|u|1|{disabled}", f"/ret|error|no upstream|{disabled}"]


# --------------------------------------------------------------------------- inheritance


def test_the_innermost_hook_wins_and_locations_share_an_inherited_runner(tmp_path: Path) -> None:
    def level(name: str) -> str:
        return f'log_by_python_block {{\n        ngx.log(ngx.NOTICE, "level={name} ", ngx.var.uri)\n    }}'

    text = f"""
daemon off;
master_process off;
error_log {{tmp}}/error.log notice;
http {{
    {level("http")}
    server {{
        listen 127.0.0.1:{{port0}};
        location /a {{ return 200 "a"; }}
        location /b {{ return 200 "b"; }}
        location /loc {{
            {level("location")}
            return 200 "loc";
        }}
    }}
    server {{
        listen 127.0.0.1:{{port1}};
        {level("server")}
        location /s {{ return 200 "s"; }}
        location /inner {{
            {level("inner")}
            return 200 "inner";
        }}
    }}
}}
"""
    with Scriptlb(text, tmp_path, listens=2, tmp=tmp_path) as lb:
        for port, path in ((lb.ports[0], "/a"), (lb.ports[0], "/b"), (lb.ports[0], "/loc"),
                           (lb.ports[1], "/s"), (lb.ports[1], "/inner")):
            assert get(port, path).status == 200
        wait_for(lambda: error_log(tmp_path).count("level=") == 5, what="five log hook runs")
        runtime = lb.runtime()
        first, second = runtime.servers.values()
        a, b, loc = (first.match(uri).log_hook for uri in ("/a", "/b", "/loc"))
        s = second.match("/s").log_hook
    assert re.findall(r"level=(\w+ /\w+)", error_log(tmp_path)) == [
        "http /a", "http /b", "location /loc", "server /s", "inner /inner"]
    assert a is b and a is not None  # one runner per distinct hook, shared by inheriting locations
    assert loc is not a and s is not a and s is not None


# --------------------------------------------------------------------------- failures


BROKEN = [
    pytest.param("x = 1\nx = 1 / 0\n", 2, "failed to run log_by_python: {file}:2: ZeroDivisionError: "
                 "division by zero", id="raises"),
    pytest.param("x = 0\nwhile True:\n    x += 1\n", 2, "log_by_python timed out after 10ms at {file}:2",
                 id="loops"),
    # (the innermost frame of a RecursionError is at its function's entry: the def line)
    pytest.param("def f(n):\n    return f(n + 1)\nf(0)\n", 1, "failed to run log_by_python: {file}:1: "
                 "RecursionError: maximum recursion depth exceeded", id="recurses"),
    pytest.param("x = 1\nballancer = balancer\nballancer.set_current_peer('127.0.0.1', 1)\n", 3,
                 "failed to run log_by_python: {file}:3: RuntimeError: API disabled in the context of "
                 "log_by_python", id="balancer-api"),
    pytest.param("ngx.exit(500)\n", 1, "failed to run log_by_python: {file}:1: RuntimeError: API disabled "
                 "in the context of log_by_python", id="ngx-exit"),
]


@pytest.mark.parametrize(("code", "line", "message"), BROKEN)
def test_a_failing_hook_changes_nothing_the_client_sees(tmp_path: Path, code: str, line: int,
                                                        message: str) -> None:
    hook_file = tmp_path / "log_hook.py"
    hook_file.write_text(code)
    timeout = "log_by_python_timeout 1s;" if "RecursionError" in message else ""
    http_extra = f"log_by_python_file {hook_file}; {timeout}"
    with Backends(respond(body=b"payload" * 100)) as bk, \
            start(conf(bk[0].addr, http_extra=http_extra), tmp_path) as lb:
        with HttpConnection(lb.port) as client:
            first = client.request(path="/x")
            second = client.request(path="/ret")  # the same keep-alive connection still serves
            third = client.request(path="/x")
        wait_for(lambda: error_log(tmp_path).count("while logging request") == 3, what="three failures")
    assert (first.status, first.body, first.complete) == (200, b"payload" * 100, True)
    assert (second.status, second.body) == (200, b"hello")
    assert third.body == b"payload" * 100
    assert len(bk[0].requests) == 2  # both proxied requests reached the backend
    assert [entry[0] for entry in access_lines(tmp_path)] == ["200", "200", "200"]
    failures = [ln for ln in error_log(tmp_path).splitlines() if "log_by_python" in ln]
    assert len(failures) == 3  # one line per request, nothing else
    expected = message.format(file=hook_file)
    for entry in failures:
        assert "[error]" in entry
        assert expected in entry
        assert f"{hook_file}:{line}" in entry
        assert " while logging request, client: 127.0.0.1" in entry


# --------------------------------------------------------------------------- once per request


def test_the_hook_runs_once_for_every_way_a_request_ends(tmp_path: Path) -> None:
    with Backends(respond(body=b"ok"), hang()) as bk:
        text = conf(bk[0].addr, http_extra=SEEN_HOOK).replace(
            "location /ret", f"location /hang {{ proxy_pass http://{bk[1].addr}; }}\n        location /ret")
        with start(text, tmp_path) as lb:
            assert get(lb.port, "/x").status == 200
            assert get(lb.port, "/ret").status == 200
            assert get(lb.port, "/dead").status == 502
            with socket.create_connection(("127.0.0.1", lb.port), timeout=5) as sock:
                sock.sendall(b"GET /close HTTP/1.1\r\nHost: x\r\n\r\n")
                assert sock.recv(100) == b""  # 444: closed without a response
            with socket.create_connection(("127.0.0.1", lb.port), timeout=5) as sock:
                sock.sendall(b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n")
                wait_for(lambda: len(bk[1].requests) == 1, what="the request to reach the backend")
                # a reset, not a half-close (which may still read the answer): 499 at once
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            with socket.create_connection(("127.0.0.1", lb.port), timeout=5) as sock:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")
                assert sock.recv(100).startswith(b"HTTP/1.1 400 ")
            with socket.create_connection(("127.0.0.1", lb.port), timeout=5) as sock:
                sock.sendall(b"GET /../x HTTP/1.1\r\nHost: x\r\n\r\n")  # above the root: 400
                assert sock.recv(100).startswith(b"HTTP/1.1 400 ")
            wait_for(lambda: len(seen(tmp_path)) >= 7, what="seven log hook runs")
            time.sleep(0.2)  # a second run of any of them would show by now
        statuses = [line[0] for line in seen(tmp_path)]
    assert statuses == ["200", "200", "502", "444", "499", "400", "400"]
    assert [line[0] for line in access_lines(tmp_path)] == statuses  # one run per access line
    assert counter(tmp_path) == 7


def test_python_code_cache_off_reloads_the_log_hook_file(tmp_path: Path) -> None:
    hook_file = tmp_path / "log_hook.py"
    hook_file.write_text('ngx.log(ngx.NOTICE, "version one")\n')
    http_extra = f"python_code_cache off; log_by_python_file {hook_file};"
    with Backends(respond()) as bk, start(conf(bk[0].addr, http_extra=http_extra), tmp_path) as lb:
        assert get(lb.port, "/ret").status == 200
        wait_for(lambda: "version one" in error_log(tmp_path), what="the first version")
        hook_file.write_text('ngx.log(ngx.NOTICE, "version two")\n')
        assert get(lb.port, "/ret").status == 200
        wait_for(lambda: "version two" in error_log(tmp_path), what="the edited version")
    assert error_log(tmp_path).count("version one") == 1


# --------------------------------------------------------------------------- master + workers

MASTER_CONF = """
daemon off;
worker_processes 2;
error_log {tmp}/error.log info;
pid {tmp}/scriptlb.pid;
events {{}}
http {{
    python_shared_dict counts 1m;
    log_by_python_block {{
        ngx.shared.counts.incr("n", 1, 0)
        ngx.shared.counts.incr("worker" + str(ngx.worker.id()), 1, 0)
    }}
    server {{
        listen 127.0.0.1:{lb} reuseport;
        location / {{ return 200 "ok"; }}
    }}
}}
"""


@pytest.mark.slow
def test_two_workers_run_the_log_hook_once_per_request(tmp_path: Path) -> None:
    (lb,) = free_ports(1)
    conf_file = tmp_path / "scriptlb.conf"
    conf_file.write_text(MASTER_CONF.format(tmp=tmp_path, lb=lb))
    requests = 200
    with master_process(tmp_path, conf_file):
        wait_for(lambda: answers(lb), what="scriptlb to answer")
        # the readiness request's run may land after its response: count it first
        wait_for(lambda: counter(tmp_path) >= 1, what="the first log hook run")
        before = counter(tmp_path)
        with ThreadPoolExecutor(max_workers=8) as pool:
            bodies = list(pool.map(lambda _: answers(lb), range(requests)))
        wait_for(lambda: counter(tmp_path) - before >= requests, timeout=10, what="every log hook run")
        time.sleep(0.2)  # a duplicate run would land by now
        after = counter(tmp_path)
        per_worker = [counter(tmp_path, "worker0"), counter(tmp_path, "worker1")]
    assert bodies == ["ok"] * requests
    assert after - before == requests
    assert sum(per_worker) == after
