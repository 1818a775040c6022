"""Smoke test of the benchmark harness's own pieces (bench/), at a tiny scale.

Needs neither nginx, HAProxy nor wrk, and times nothing: config generation, wrk-output parsing
on captured samples, /proc sampling of this test process, process-group cleanup, report writing
from fake figures, the Python fallback load generator and the idle-connection opener against a
small in-process HTTP server, the py-spy summary, and the hook micro-benchmark parser.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import bench_conf  # noqa: E402
import bench_cprofile  # noqa: E402
import bench_deps  # noqa: E402
import bench_load  # noqa: E402
import bench_proc  # noqa: E402
import bench_profile  # noqa: E402
import bench_report  # noqa: E402
import instructions as bench_instructions  # noqa: E402
import run as bench_run  # noqa: E402

WRK_SMALL = """\
Running 1s test @ http://127.0.0.1:45349/
  1 threads and 8 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    93.17us  343.23us   6.38ms   98.11%
    Req/Sec   110.78k    18.04k  130.94k    80.00%
  Latency Distribution
     50%   53.00us
     75%   66.00us
     90%   89.00us
     99%    1.60ms
  109779 requests in 1.00s, 19.79MB read
Requests/sec: 109758.04
Transfer/sec:     19.78MB
"""

WRK_ERRORS = """\
Running 5s test @ http://127.0.0.1:8080/big
  1 threads and 2000 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    36.33ms   13.35ms  83.83ms   73.76%
    Req/Sec    31.65k     2.89k   34.58k    66.67%
  Latency Distribution
     50%   30.88ms
     75%   42.21ms
     90%   58.34ms
     99%    1.02s
  31116 requests in 5.09s, 1.91GB read
  Socket errors: connect 10, read 2, write 0, timeout 7
  Non-2xx or 3xx responses: 42
Requests/sec:   6113.20
Transfer/sec:    384.20MB
"""


# --------------------------------------------------------------------------- config generation


def test_configs_for_every_target(tmp_path: Path) -> None:
    ports = [9101, 9102, 9103, 9104]
    conf = bench_conf.write_backends(str(tmp_path / "be"), ports, status_port=9105)
    text = Path(conf).read_text()
    assert "listen 127.0.0.1:9105;" in text and "stub_status;" in text
    for p in ports:
        assert f"listen 127.0.0.1:{p}" in text
        assert f"X-Backend {p}" in text
    assert "worker_processes 1;" in text
    assert (tmp_path / "be/html/big.bin").stat().st_size == bench_conf.BIG_SIZE

    for t in bench_conf.TARGETS:
        path = Path(bench_conf.write_target(t, str(tmp_path / t.name), 9200, ports, fd_limit=20000))
        text = path.read_text()
        if t.kind == "floor":
            assert text == "9200 9101,9102,9103,9104\n"
            continue
        for p in ports:
            assert f"127.0.0.1:{p}" in text, (t.name, p)
        if t.kind in ("nginx", "scriptlb"):
            assert "listen 127.0.0.1:9200" in text
            assert f"keepalive {bench_conf.UPSTREAM_KEEPALIVE};" in text
            assert "proxy_http_version 1.1;" in text and 'proxy_set_header Connection "";' in text
            assert f"worker_processes {t.workers};" in text
            assert text.count("{") == text.count("}")
        if t.name == "nginx-lua":
            assert "load_module" in text and "ngx_http_lua_module.so" in text
            assert "balancer_by_lua_block" in text and "ngx.crc32_long(ngx.var.uri) % 4 + 1" in text
        if t.name == "scriptlb-hook":
            assert "balancer_by_python_block" in text and "ngx.crc32_long(ngx.var.uri) % 4" in text
        if t.kind == "haproxy":
            assert "balance roundrobin" in text and "http-reuse always" in text
            assert "bind 127.0.0.1:9200" in text
            assert "maxconn 9900" in text  # (20000 - 200) // 2: two descriptors per connection


def test_python_hook_is_valid_python_and_matches_crc32() -> None:
    code = bench_conf.python_hook([1, 2, 3, 4])
    compile(code, "<hook>", "exec")
    picked = []

    class Balancer:
        def set_current_peer(self, addr: str, port: int) -> tuple[bool, None]:
            picked.append((addr, port))
            return True, None

        def enable_keepalive(self, idle: float, max_requests: int) -> tuple[bool, None]:
            picked.append(("keepalive", idle, max_requests))
            return True, None

    class Var:
        uri = "/some/path"

    class Ngx:
        var = Var()
        ERR = 4

        @staticmethod
        def crc32_long(s: str) -> int:
            return zlib.crc32(s.encode())

    exec(code, {"balancer": Balancer(), "ngx": Ngx()})
    assert picked == [("127.0.0.1", [1, 2, 3, 4][bench_conf.hook_backend_index("/some/path")]),
                      ("keepalive", 60, 0)]


def test_scriptlb_accepts_generated_configs(tmp_path: Path) -> None:
    config = pytest.importorskip("scriptlb.config")
    if not hasattr(config, "load"):
        pytest.skip("scriptlb.config.load not there yet")
    ports = [9101, 9102, 9103, 9104]
    for t in bench_conf.TARGETS:
        if t.kind != "scriptlb":
            continue
        prefix = tmp_path / t.name
        path = bench_conf.write_target(t, str(prefix), 9200, ports)
        try:
            conf = config.load(path, prefix=str(prefix))
        except Exception as e:  # the harness does the same when scriptlb lacks balancer_keepalive
            if "balancer_keepalive" not in str(e):
                raise
            path = bench_conf.write_target(t, str(prefix), 9200, ports, balancer_keepalive=None)
            conf = config.load(path, prefix=str(prefix))
        up = conf.http.upstreams["backend"]
        assert len(up.servers) == 4
        assert up.keepalive == bench_conf.UPSTREAM_KEEPALIVE
        assert (up.hook is not None) == t.hook
        assert conf.worker_processes == t.workers


# --------------------------------------------------------------------------- wrk output


def test_parse_wrk_samples() -> None:
    r = bench_load.parse_wrk(WRK_SMALL)
    assert r.requests == 109779
    assert r.rps == pytest.approx(109758.04)
    assert r.duration == pytest.approx(1.0)
    assert r.p50_ms == pytest.approx(0.053)
    assert r.p99_ms == pytest.approx(1.6)
    assert (r.errors, r.non2xx) == (0, 0)

    r = bench_load.parse_wrk(WRK_ERRORS)
    assert r.requests == 31116 and r.duration == pytest.approx(5.09)
    assert r.p50_ms == pytest.approx(30.88) and r.p99_ms == pytest.approx(1020.0)
    assert r.errors == 19 and r.non2xx == 42
    assert r.bytes_read == pytest.approx(1.91 * 1024**3)

    with pytest.raises(ValueError):
        bench_load.parse_wrk("unable to connect to 127.0.0.1:1 Connection refused\n")


def test_wrk_argv() -> None:
    argv = bench_load.wrk_argv("/usr/bin/wrk", "http://127.0.0.1:1/", 5, 64)
    assert argv == ["/usr/bin/wrk", "-t1", "-c64", "-d5s", "--timeout=2s", "--latency",
                    "http://127.0.0.1:1/"]


# --------------------------------------------------------------------------- /proc and processes


def test_proc_sampling_of_this_process() -> None:
    me = os.getpid()
    assert bench_proc.tree_pids(me)[0] == me
    sum(i * i for i in range(200_000))  # burn a little CPU so the counters are non-zero
    assert bench_proc.cpu_seconds(me) >= 0.0
    user, system = bench_proc.cpu_split(me)
    assert user >= 0.0 and system >= 0.0
    rss = bench_proc.rss_kib(me)
    hwm = bench_proc.rss_kib(me, "VmHWM")
    assert rss > 0 and hwm >= rss
    busy, steal = bench_proc.core_ticks(set(os.sched_getaffinity(0)))
    assert busy > 0 and steal >= 0
    assert bench_proc.status_kib(me, "NoSuchField") == 0


def test_procs_start_and_stop_process_groups(tmp_path: Path) -> None:
    procs = bench_proc.Procs(tmp_path / "logs")
    code = ("import subprocess, sys, time; "
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)")
    p = procs.start("sleeper", [sys.executable, "-c", code])
    try:
        tree: list[int] = []
        for _ in range(200):  # bounded wait for the grandchild to appear
            tree = bench_proc.tree_pids(p.pid)
            if len(tree) == 2:
                break
            threading.Event().wait(0.02)
        assert p.pid in bench_proc.tree_pids(os.getpid())
        assert len(tree) == 2
    finally:
        procs.stop_all()
    assert not p.alive()
    assert procs.procs == []

    def gone(pid: int) -> bool:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return True
        return state in ("Z", "X")  # a zombie waiting for its (new) parent is gone too

    for pid in tree:
        for _ in range(250):  # SIGKILL is delivered asynchronously: bounded wait
            if gone(pid):
                break
            threading.Event().wait(0.02)
        assert gone(pid), pid


def test_parse_stub_status() -> None:
    body = (b"Active connections: 3 \nserver accepts handled requests\n 17 17 4242 \n"
            b"Reading: 0 Writing: 1 Waiting: 2 \n")
    assert bench_proc.parse_stub_status(body) == {"active": 3, "accepts": 17, "handled": 17, "requests": 4242}


def test_free_ports_are_distinct() -> None:
    ports = bench_proc.free_ports(5)
    assert len(set(ports)) == 5


# --------------------------------------------------------------------------- load generators


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = b"hello\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Backend", "test")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    try:
        yield srv.server_address[1]
    finally:
        srv.shutdown()
        srv.server_close()
        th.join(5)


def test_python_fallback_load(http_server: int) -> None:
    r = bench_load.python_load(http_server, "/", duration=20, connections=2, max_requests=20)
    assert r.tool == "python"
    assert 20 <= r.requests <= 22  # bounded by count (each connection may finish its request)
    assert r.errors == 0 and r.non2xx == 0
    assert r.p50_ms is not None and r.p99_ms is not None and r.p99_ms >= r.p50_ms


def test_hold_idle(http_server: int) -> None:
    seen = []
    r = bench_load.hold_idle(http_server, 5, seen.append, concurrency=5, timeout=20)
    assert seen == [5]
    assert (r.opened, r.errors) == (5, 0)


def test_http_get(http_server: int) -> None:
    status, headers, body = bench_proc.http_get(http_server, "/")
    assert (status, headers["x-backend"], body) == (200, "test", b"hello\n")


# --------------------------------------------------------------------------- reports


def _fake_figures() -> dict:
    def path(rps: float, p99: float) -> dict:
        reps = [{"rps": rps * f, "p50_ms": 1.0, "p99_ms": p99, "requests": int(rps * 5), "cpu_s": 4.0,
                 "errors": 0, "non2xx": 0} for f in (0.9, 1.0, 1.1)]
        return bench_report.summarize_reps(reps)

    targets = {}
    for name, rps, p99 in (("nginx", 40000, 3.0), ("nginx-lua", 38000, 4.0), ("haproxy", 50000, 2.0),
                           ("scriptlb", 20000, 6.0), ("scriptlb-hook", 18000, 8.0)):
        paths = {"/": path(rps, p99), "/big": path(rps / 4, p99)}
        targets[name] = {"label": name, "status": "ok", "paths": paths,
                         "peak_rss_kib": 30000, "idle": {"wanted": 10, "opened": 10, "rss_before_kib": 100,
                                                         "rss_after_kib": 150, "kib_per_conn": 5.0}}
    targets["scriptlb-2w"] = {"label": "2w", "status": "missing: scriptlb", "paths": {}}
    return {"meta": {"started": "now", "machine": "test", "cpus": 2, "command": "python bench/run.py"},
            "settings": {"paths": ["/", "/big"], "connections": 64, "threads": 1, "duration": 5, "warmup": 1,
                         "reps": 3, "loadgen": "wrk"},
            "pinning": "fake", "targets": targets, "notes": ["a note"],
            "hook_micro": {"us_per_try": 2.5, "status": "ok", "output": "2.5 us per try"},
            "profile": {"scriptlb": {"tool": "py-spy", "samples": 10, "status": "ok",
                                     "self": [(50.0, "f (a.py)")], "inclusive": [(100.0, "main (m.py)")]}}}


def test_report_from_fake_figures(tmp_path: Path) -> None:
    fig = _fake_figures()
    assert fig["targets"]["nginx"]["paths"]["/"]["rps"] == pytest.approx(40000)
    assert fig["targets"]["nginx"]["paths"]["/"]["cpu_s_per_1k"] == pytest.approx(4.0 / 200000 * 1000)
    ratios = {r["name"]: r for r in bench_report.ratios(fig)}
    assert ratios["scriptlb / nginx req/s"]["value"] == pytest.approx(0.5)
    assert ratios["scriptlb / nginx req/s"]["met"] is False
    assert ratios["scriptlb-hook / nginx-lua p99"]["value"] == pytest.approx(2.0)
    assert ratios["scriptlb-hook / scriptlb req/s"]["value"] == pytest.approx(0.9)
    assert ratios["scriptlb-hook / scriptlb req/s"]["met"] is True
    assert ratios["scriptlb-2w / scriptlb req/s"]["value"] is None
    written = bench_report.write_all(fig, tmp_path)
    md = Path(written["md"]).read_text()
    assert "| nginx | 40,000 |" in md
    assert "missing: scriptlb" in md
    assert "| scriptlb / nginx req/s | 0.50 | >= 0.9 | **no** |" in md
    assert "`f (a.py)`" in md
    data = json.loads(Path(written["json"]).read_text())
    assert data["targets"]["scriptlb"]["paths"]["/"]["rps"] == pytest.approx(20000)
    assert any(r["name"] == "scriptlb / nginx req/s" for r in data["ratios"])
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert written["png"].startswith("missing: matplotlib")
    else:
        assert Path(written["png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- other parsers


def test_summarize_pyspy_raw() -> None:
    raw = (
        "run (scriptlb/process/worker.py:10);data_received (/x/scriptlb/http/downstream.py:50);"
        "parse (h.py:3) 6\n"
        "run (scriptlb/process/worker.py:10);data_received (/x/scriptlb/http/downstream.py:51) 3\n"
        "run (scriptlb/process/worker.py:12);select (/usr/lib/python3.11/selectors.py:468) 3\n"
    )
    s = bench_profile.summarize_raw(raw)
    assert s["samples"] == 12
    assert s["self"][0] == (50.0, "parse (h.py)")
    incl = dict((fn, pct) for pct, fn in s["inclusive"])
    assert "run (scriptlb/process/worker.py)" not in incl
    assert s["root"] == ["run (scriptlb/process/worker.py)"]
    assert incl["data_received (scriptlb/http/downstream.py)"] == 75.0
    assert bench_profile.summarize_raw("")["samples"] == 0


def test_cprofile_summary(tmp_path: Path) -> None:
    import cProfile

    def handle() -> int:
        return len(str(42))

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(10):
        handle()
    prof.disable()
    prof.dump_stats(tmp_path / "x.prof")
    s = bench_cprofile.summarize(str(tmp_path / "x.prof"), requests=10)
    assert s["requests"] == 10 and s["calls_per_request"] >= 1.0
    row = next(r for r in s["top"] if r["function"].startswith("handle "))
    assert row["calls_per_request"] == 1.0


def test_nostats_target_turns_peer_statistics_off() -> None:
    t = bench_conf.target("scriptlb-nostats")
    _, text = bench_conf.config_for(t, "/p", 9200, [1, 2])
    assert "python_peer_stats off;" in text
    _, text = bench_conf.config_for(bench_conf.target("scriptlb"), "/p", 9200, [1, 2])
    assert "python_peer_stats" not in text  # on by default: the plain target keeps them


def test_single_process_scriptlb_conf() -> None:
    text = bench_conf.scriptlb_conf("/p", 9200, [1, 2, 3, 4], hook=True, master=False)
    assert "master_process off;" in text and "balancer_by_python_block {" in text


def test_missing_software_is_named() -> None:
    none = bench_deps.Deps()
    assert none.missing("nginx") == "missing: nginx (Debian package nginx)"
    lua = none.missing("lua")
    assert lua is not None and "libnginx-mod-http-lua" in lua and "lua-resty-core" in lua
    assert "Debian package wrk" in (none.missing("wrk") or "")
    assert "haproxy" in (none.missing("haproxy") or "")
    full = bench_deps.Deps(nginx="/n", lua_modules="/m", lua_resty_core="/l", haproxy="/h", wrk="/w",
                           taskset="/t", matplotlib=True)
    assert all(full.missing(w) is None for w in ("nginx", "lua", "haproxy", "wrk", "matplotlib"))
    bench_deps.check()  # looks around without installing anything


def test_parse_hook_micro() -> None:
    assert bench_run.parse_hook_micro('noise\n{"hook": "crc32", "us_per_try": 1.75}\n') == 1.75
    assert bench_run.parse_hook_micro("crc32 hook: 2.40 µs per try (1000000 runs)") == 2.40
    assert bench_run.parse_hook_micro("nothing here") is None
    out = ("crc32 of URI, literal peers (target <= 3 us)       2.36 us/try\n"
           "hooks/hash_by_uri.py (peers from upstream)         6.46 us/try\n")
    assert bench_run.parse_hook_micro(out) == 2.36


def test_cli_arguments() -> None:
    a = bench_run.parse_args(["--quick", "--targets", "nginx,scriptlb", "--out", "/tmp/x"])
    h = bench_run.Harness(a)
    assert [t.name for t in h.targets] == ["nginx", "scriptlb"]
    assert h.duration == bench_run.QUICK["duration"] and h.paths == ["/"]
    h = bench_run.Harness(bench_run.parse_args(["--duration", "7"]))
    assert h.duration == 7 and h.paths == ["/", "/big"] and h.idle_n == 10000
    assert [t.name for t in h.targets] == ["nginx", "nginx-lua", "haproxy", "scriptlb", "scriptlb-hook",
                                           "scriptlb-2w", "scriptlb-nostats"]
    with pytest.raises(KeyError):
        bench_run.Harness(bench_run.parse_args(["--targets", "nope"]))


@pytest.mark.parametrize("extra", bench_instructions.CONFIGS.values())
def test_instruction_count_configs_pass_t(tmp_path: Path, extra: str) -> None:
    """bench/instructions.py's proxy and backend configs are valid (scriptlb -t)."""
    import subprocess

    for name, text in (("p.conf", bench_instructions.proxy_conf(tmp_path, 9301, 9302, extra)),
                       ("b.conf", bench_instructions.backend_conf(tmp_path, 9302))):
        (tmp_path / name).write_text(text)
        result = subprocess.run([sys.executable, "-m", "scriptlb", "-t", "-p", str(tmp_path), "-c", name],
                                capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, result.stderr


def test_module_hook_target_imports_its_picker(tmp_path: Path) -> None:
    """The ported-hook target: `keepalive 128`, no enable_keepalive, the picking function in a
    module on python_package_path that chooses as the inline hooks do."""
    ports = [9101, 9102, 9103, 9104]
    t = bench_conf.target("scriptlb-hook-module")
    prefix = tmp_path / t.name
    text = Path(bench_conf.write_target(t, str(prefix), 9200, ports)).read_text()
    assert f'python_package_path "{prefix}/lib/?.py";' in text
    assert "import picker" in text and "enable_keepalive" not in text and "balancer_keepalive" not in text
    namespace: dict = {}
    exec((prefix / "lib" / "picker.py").read_text(), namespace)
    for uri in ("/", "/big", "/x/y"):
        assert namespace["pick"](uri) == ports[bench_conf.hook_backend_index(uri)]
    assert "scriptlb-hook-module" not in bench_conf.DEFAULT_TARGETS


def test_parse_wrk_counts_timeouts() -> None:
    out = ("Running 1s test @ http://127.0.0.1:1/\n  1 threads and 1000 connections\n"
           "  100 requests in 1.00s, 10.00KB read\n"
           "  Socket errors: connect 0, read 3, write 0, timeout 7\nRequests/sec:    100.00\n")
    res = bench_load.parse_wrk(out)
    assert (res.errors, res.timeouts) == (10, 7)


def test_report_shows_the_overload_run(tmp_path: Path) -> None:
    fig = {"targets": {}, "overload": {"connections": 1000, "targets": {
        "scriptlb": {"/": {"rps": 5000.0, "p99_ms": 80.0, "errors": 2, "timeouts": 1, "non2xx": 0}}}}}
    text = bench_report.markdown(fig)
    assert "## 1,000 concurrent connections" in text
    assert "| scriptlb | / | 5,000 | 80.0 | 2 | 1 | 0 |" in text


def test_bytecode_count_lists_the_request_path(tmp_path: Path) -> None:
    """bench/bytecodes.py counts a proxied request's bytecodes by function (real processes, a
    handful of requests: the difference between 3 and 6 requests is 3 requests' worth)."""
    import subprocess

    result = subprocess.run([sys.executable, str(Path(bench_instructions.__file__).parent / "bytecodes.py"),
                             "--low", "3", "--high", "6", "--min", "1"],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    total = int(result.stdout.split(" bytecodes per request", 1)[0].replace(",", ""))
    assert total > 500
    assert "upstream_head (" in result.stdout and "build_head (" in result.stdout  # the tries loop's
