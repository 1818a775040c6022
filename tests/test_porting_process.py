"""A ported balancer_by_lua hook through real sockets and real processes: a class, ngx.ctx
attributes and a helper module beside the hook ($hook_dir); `scriptlb -t` catching the mistakes
that would only fail at run time; balancer_by_python_fallback off beside nginx +
lua-nginx-module (the oracle); the circuit breaker; `-s reload` with a broken config."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import Backends, Scriptlb, answers, free_ports, get, respond, wait_for
from nginx_oracle import NGINX, http_conf, nginx_process

ROOT = Path(__file__).resolve().parent.parent
LUA_MODULE_DIR = "/usr/lib/nginx/modules"
LUA_MODULES = ("ndk_http_module.so", "ngx_http_lua_module.so")
HAS_LUA = NGINX is not None and all(os.path.exists(f"{LUA_MODULE_DIR}/{m}") for m in LUA_MODULES)


# --------------------------------------------------------------------------- a ported hook

PICKER = '''
class Ring:
    """What a Lua module keeps in a metatable-backed table: per-worker state."""

    def __init__(self, peers):
        self.peers = list(peers)
        self.picks = 0

    @property
    def size(self):
        return len(self.peers)

    def pick(self, key, skip):
        self.picks = self.picks + 1
        i = ngx.crc32_short(key) % self.size
        if self.peers[i] == skip:
            i = (i + 1) % self.size
        return self.peers[i]


RING = None


def ring(peers):
    global RING
    if RING is None:
        RING = Ring(peers)
    return RING
'''

HOOK = '''
import picker

r = picker.ring(PEERS)
ngx.ctx.tries = (ngx.ctx.tries or 0) + 1
state, status = balancer.get_last_failure()
peer = r.pick(ngx.var.uri, ngx.ctx.last)
ngx.ctx.last = peer
ok, err = balancer.set_current_peer(peer)
if not ok:
    ngx.log(ngx.ERR, "failed to set the peer: ", err)
elif ngx.ctx.tries < 2:
    balancer.set_more_tries(1)
'''

CONF = """
daemon off;
master_process off;
error_log {tmp}/error.log info;
http {
    python_package_path "$hook_dir/?.py";
    log_format trail '$upstream_addr|$status';
    upstream u {
        server 0.0.0.1;
        balancer_by_python_file hooks/port.py;
        balancer_by_python_fallback off;
    }
    server {
        listen 127.0.0.1:{port0};
        access_log {tmp}/access.log trail;
        location / {
            proxy_pass http://u;
            proxy_next_upstream error http_502;
            log_by_python_block { ngx.log(ngx.NOTICE, "tries=", ngx.ctx.tries, " last=", ngx.ctx.last) }
        }
    }
}
"""


def test_a_ported_hook_with_a_class_ctx_attributes_and_a_module_beside_it(tmp_path: Path) -> None:
    with Backends(respond(502), respond(body=b"second")) as bk:
        peers = [bk[0].addr, bk[1].addr]
        (tmp_path / "hooks").mkdir()
        (tmp_path / "hooks" / "picker.py").write_text(PICKER)
        (tmp_path / "hooks" / "port.py").write_text(f"PEERS = {peers!r}\n" + HOOK)
        first = next(u for u in ("/a", "/b", "/c", "/d") if zlib.crc32(u.encode()) % 2 == 0)  # the 502 first
        with Scriptlb(CONF, tmp_path, tmp=tmp_path) as lb:
            response = get(lb.port, first)
            log = wait_for(lambda: "tries=" in (tmp_path / "error.log").read_text() and
                           (tmp_path / "error.log").read_text(), what="the log hook's line")
    assert (response.status, response.body) == (200, b"second")
    assert (tmp_path / "access.log").read_text().splitlines()[0] == f"{peers[0]}, {peers[1]}|200"
    assert f"tries=2 last={peers[1]}" in str(log)
    assert "failed to run" not in str(log)


# --------------------------------------------------------------------------- -t

MISTAKES = {
    "misspelt global": ("ballancer.set_current_peer('127.0.0.1:1')",
                        "NameError: name 'ballancer' is not defined"),
    "disallowed import": ("import re", "ImportError: import of 're' is not allowed in hooks"),
    "module not on the path": ("import mylib", "No module named 'mylib' (not on python_package_path)"),
    "unknown balancer attribute": ("balancer.set_curent_peer('127.0.0.1:1')",
                                   "AttributeError: 'balancer' has no attribute 'set_curent_peer'"),
    "unknown ngx attribute": ("ngx.lgo(ngx.ERR, 'x')", "AttributeError: 'ngx' has no attribute 'lgo'"),
    "unknown ngx.req attribute": ("ngx.req.get_header()", "'ngx.req' has no attribute 'get_header'"),
    "unknown upstream attribute": ("upstream.get_peers()", "'upstream' has no attribute 'get_peers'"),
    "unknown stand-in member": ("import math; x = math.sqrtt(2)", "module 'math' has no attribute 'sqrtt'"),
    "a package alone": ("import scriptlb", "No module named 'scriptlb'"),
    "relative import": ("from . import helper", "relative imports are not allowed in hooks"),
}

T_CONF = """
events {{}}
http {{
    python_package_path "$hook_dir/lib/?.py";
    upstream u {{
        server 127.0.0.1:1;
        balancer_by_python_file hooks/h.py;
    }}
    server {{ listen 127.0.0.1:1; location / {{ proxy_pass http://u; }} }}
}}
"""


def scriptlb_t(tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "scriptlb", "-p", str(tmp_path), "-c", "t.conf", "-t"],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)


@pytest.mark.parametrize(("line", "message"), MISTAKES.values(), ids=MISTAKES.keys())
def test_t_rejects_mistakes_that_would_only_fail_at_run_time(tmp_path: Path, line: str, message: str) -> None:
    (tmp_path / "hooks").mkdir()
    hook = tmp_path / "hooks" / "h.py"
    hook.write_text("peers = ['127.0.0.1:1']\nif peers:\n    maybe = 1\n" + line + "\nx = maybe\n"
                    "balancer.set_current_peer(peers[0])\n")
    (tmp_path / "t.conf").write_text(T_CONF.format())
    result = scriptlb_t(tmp_path)
    assert result.returncode == 1
    first = result.stderr.splitlines()[0]
    assert first.startswith(f'scriptlb: [emerg] failed to load external Python file "{hook}": ')
    assert message in first and first.endswith(f" in {hook}:4")
    assert result.stderr.splitlines()[-1] == f"scriptlb: configuration file {tmp_path}/t.conf test failed"


def test_t_checks_the_modules_a_hook_imports_with_their_own_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "hooks" / "lib").mkdir(parents=True)
    (tmp_path / "hooks" / "lib" / "helper.py").write_text("def pick():\n    return PERS[0]\n")
    (tmp_path / "hooks" / "h.py").write_text("import helper\nbalancer.set_current_peer(helper.pick())\n")
    (tmp_path / "t.conf").write_text(T_CONF.format())
    result = scriptlb_t(tmp_path)
    assert result.returncode == 1
    assert result.stderr.splitlines()[0].endswith(
        f"NameError: name 'PERS' is not defined in {tmp_path}/hooks/lib/helper.py:2")


def test_t_passes_a_correct_port_and_warns_about_placeholder_fallback(tmp_path: Path) -> None:
    (tmp_path / "hooks" / "lib").mkdir(parents=True)
    (tmp_path / "hooks" / "lib" / "picker.py").write_text(PICKER)
    (tmp_path / "hooks" / "h.py").write_text("PEERS = ['127.0.0.1:1']\n" + HOOK)
    (tmp_path / "t.conf").write_text(T_CONF.format().replace("server 127.0.0.1:1;\n", "server 0.0.0.1;\n", 1))
    result = scriptlb_t(tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert lines[0].startswith('scriptlb: [warn] upstream "u" has only placeholder servers (0.0.0.1) and '
                               "balancer_by_python_fallback on")
    assert lines[0].endswith(f"in {tmp_path}/t.conf:7")
    assert lines[-1] == f"scriptlb: configuration file {tmp_path}/t.conf test is successful"
    off = "server 0.0.0.1;\nbalancer_by_python_fallback off;\n"
    (tmp_path / "t.conf").write_text(T_CONF.format().replace("server 127.0.0.1:1;\n", off, 1))
    assert "[warn]" not in scriptlb_t(tmp_path).stderr


# --------------------------------------------------------------------------- fallback off vs OpenResty

FAILING_HOOKS = {  # (Lua, Python): each fails the run
    "raises": ('error("boom")', "raise ValueError('boom')"),
    "ngx.exit(ngx.ERROR)": ("ngx.exit(ngx.ERROR)", "ngx.exit(ngx.ERROR)"),
    "ngx.exit(200)": ("ngx.exit(200)", "ngx.exit(200)"),
    "bad peer then raises": ('local b = require "ngx.balancer"\nlocal ok = b.set_current_peer("{peer}")\n'
                             'error("after")',
                             "balancer.set_current_peer('{peer}')\nraise ValueError('after')"),
}


@contextlib.contextmanager
def nginx_lua(tmp_path: Path, upstreams: str, locations: str, port: int) -> Iterator[None]:
    loads = "".join(f"load_module {LUA_MODULE_DIR}/{m};\n" for m in LUA_MODULES)
    http_block = f"""lua_package_path "/usr/share/lua/5.1/?.lua;;";
{upstreams}
    server {{ listen 127.0.0.1:{port}; {locations} }}"""
    with nginx_process(tmp_path, http_conf(tmp_path, http_block, head=loads)):
        yield


@pytest.mark.nginx
@pytest.mark.skipif(not HAS_LUA, reason="nginx with lua-nginx-module is not installed "
                    "(Debian packages libnginx-mod-http-lua lua-resty-core: scripts/install-test-tools)")
def test_fallback_off_answers_500_where_openresty_does(tmp_path: Path) -> None:
    with Backends(respond(body=b"backend")) as bk:
        live = bk[0].addr
        names = [f"u{i}" for i in range(len(FAILING_HOOKS))]
        lua_up = "".join(f"    upstream {n} {{ server {live};\n"
                         f"        balancer_by_lua_block {{\n{lua.format(peer=live)}\n}} }}\n"
                         for n, (lua, _) in zip(names, FAILING_HOOKS.values(), strict=True))
        py_up = "".join(f"    upstream {n} {{ server {live}; balancer_by_python_fallback off;\n"
                        f"        balancer_by_python_block {{\n{py.format(peer=live)}\n        }}\n    }}\n"
                        for n, (_, py) in zip(names, FAILING_HOOKS.values(), strict=True))
        # a run that sets no peer is not a failure: both use the upstream's servers
        lua_up += f"    upstream nopeer {{ server {live}; balancer_by_lua_block {{ local x = 1 }} }}\n"
        py_up += (f"    upstream nopeer {{ server {live}; balancer_by_python_fallback off;\n"
                  "        balancer_by_python_block { x = 1 }\n    }\n")
        locations = " ".join(f"location /{n} {{ proxy_pass http://{n}; }}" for n in [*names, "nopeer"])
        ngx_port = free_ports(1)[0]
        with nginx_lua(tmp_path / "nginx", lua_up, locations, ngx_port):
            oracle = [get(ngx_port, f"/{n}").status for n in names]
            oracle_no_peer = get(ngx_port, "/nopeer").status
        conf = (f"daemon off;\nmaster_process off;\nerror_log {tmp_path}/error.log info;\nhttp {{\n{py_up}"
                f"    server {{ listen 127.0.0.1:{{port0}}; {locations} }}\n}}\n")
        (tmp_path / "lb").mkdir()
        with Scriptlb(conf, tmp_path / "lb") as lb:
            ours = [get(lb.port, f"/{n}").status for n in names]
            ours_no_peer = get(lb.port, "/nopeer").status
    assert oracle == [500] * len(names)
    assert ours == oracle
    assert oracle_no_peer == ours_no_peer == 200
    # only the no-peer requests reached the server the failed runs would have fallen back to
    assert [r.target for r in bk[0].requests] == ["/nopeer", "/nopeer"]


def test_fallback_on_serves_failed_runs_from_the_servers(tmp_path: Path) -> None:
    with Backends(respond(body=b"backend")) as bk:
        conf = (f"daemon off;\nmaster_process off;\nerror_log {tmp_path}/error.log info;\nhttp {{\n"
                f"    upstream u {{ server {bk[0].addr};\n"
                "        balancer_by_python_block { raise ValueError('x') } }\n"
                "    server { listen 127.0.0.1:{port0}; location / { proxy_pass http://u; } }\n}\n")
        with Scriptlb(conf, tmp_path) as lb:
            assert get(lb.port, "/").body == b"backend"


# --------------------------------------------------------------------------- circuit breaker


def test_the_breaker_skips_an_overrunning_hook_and_logs_once(tmp_path: Path) -> None:
    with Backends(respond(body=b"backend")) as bk:
        conf = (f"daemon off;\nmaster_process off;\nerror_log {tmp_path}/error.log info;\nhttp {{\n"
                f"    upstream u {{ server {bk[0].addr};\n"
                "        balancer_by_python_timeout 5ms;\n"
                "        balancer_by_python_breaker fails=3 window=60s cooldown=60s;\n"
                "        balancer_by_python_block {\n"
                "            x = [0] * 1000\n"
                "            while True:\n"
                "                x.sort()\n"
                "        }\n    }\n"
                "    server { listen 127.0.0.1:{port0}; location / { proxy_pass http://u; } }\n}\n")
        with Scriptlb(conf, tmp_path) as lb:
            statuses = [get(lb.port, f"/{i}").status for i in range(40)]
            stats = lb.runtime().upstreams["u"].hook.stats()
    assert statuses == [200] * 40  # every request served by the fallback
    log = (tmp_path / "error.log").read_text()
    assert log.count("timed out after 5ms") == 3
    assert log.count("circuit breaker open after 3 failed runs in 60s, skipping the hook for 60s") == 1
    assert stats["breaker"] == "open" and stats["breaker_skipped"] == 37 and stats["breaker_trips"] == 1


# --------------------------------------------------------------------------- -s reload


RELOAD_CONF = """
daemon off;
master_process on;
worker_processes 1;
error_log {tmp}/error.log info;
pid {tmp}/scriptlb.pid;
events {{}}
http {{
    upstream backend {{
        server 127.0.0.1:{a};
        balancer_by_python_file hooks/pick.py;
    }}
    server {{ listen 127.0.0.1:{lb}; location / {{ proxy_pass http://backend; }} }}
    server {{ listen 127.0.0.1:{a}; return 200 "A"; }}
}}
"""


def reload(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*cmd, "-s", "reload"], cwd=ROOT, capture_output=True, text=True, timeout=60)


@pytest.mark.slow
def test_reload_with_a_broken_config_exits_1_with_the_error_and_the_old_config_serves(tmp_path: Path) -> None:
    lb, a = free_ports(2)
    conf = tmp_path / "scriptlb.conf"
    conf.write_text(RELOAD_CONF.format(tmp=tmp_path, lb=lb, a=a))
    (tmp_path / "hooks").mkdir()
    hook = tmp_path / "hooks" / "pick.py"
    hook.write_text(f"balancer.set_current_peer('127.0.0.1:{a}')\n")
    cmd = [sys.executable, "-m", "scriptlb", "-p", str(tmp_path), "-c", str(conf)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: answers(lb) == "A", what="scriptlb to serve")
        for broken, message in ((f"ballancer.set_current_peer('127.0.0.1:{a}')\n",
                                 f"NameError: name 'ballancer' is not defined in {hook}:1"),
                                ("balancer.set_current_peer(\n",
                                 f"SyntaxError: '(' was never closed in {hook}:1")):
            hook.write_text(broken)
            result = reload(cmd)
            assert result.returncode == 1
            lines = result.stderr.splitlines()
            assert lines[0].startswith(f'scriptlb: [emerg] failed to load external Python file "{hook}": ')
            assert lines[0].endswith(message)
            assert lines[-1] == f"scriptlb: configuration file {conf} test failed"
        conf.write_text("http {\n")
        result = reload(cmd)
        assert result.returncode == 1 and "unexpected end of file" in result.stderr
        assert "reconfiguring" not in (tmp_path / "error.log").read_text()  # the master was never asked
        assert {answers(lb) for _ in range(3)} == {"A"}
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()



def test_t_accepts_every_example_config() -> None:
    """The shipped hooks (conf/hooks/*.conf) pass the load-time checks. The checks run side by
    side: one after the other, the interpreter starts alone (a few seconds each on a loaded
    machine) outlasted the test's timeout."""
    command = [sys.executable, "-m", "scriptlb", "-p", str(ROOT), "-t", "-c"]
    checks = {conf: subprocess.Popen([*command, str(conf)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, cwd=ROOT)
              for conf in sorted((ROOT / "conf" / "hooks").glob("*.conf"))}
    try:
        for conf, check in checks.items():
            _, stderr = check.communicate(timeout=50)
            assert check.returncode == 0, (conf, stderr)
    finally:
        for check in checks.values():
            if check.poll() is None:
                check.kill()
                check.wait()


def test_t_leaves_probes_the_hook_handles_itself(tmp_path: Path) -> None:
    (tmp_path / "hooks").mkdir()
    (tmp_path / "hooks" / "h.py").write_text(
        "try:\n    import optional_helper\nexcept ImportError:\n    optional_helper = None\n"
        "try:\n    balancer.set_upstream_tls(False)\nexcept AttributeError:\n    pass\n"
        "try:\n    x = not_defined_here\nexcept Exception:\n    x = 1\n"
        "balancer.set_current_peer('127.0.0.1:1')\n")
    (tmp_path / "t.conf").write_text(T_CONF.format())
    result = scriptlb_t(tmp_path)
    assert result.returncode == 0, result.stderr
    (tmp_path / "hooks" / "h.py").write_text(  # a handler for another error does not hide it
        "try:\n    import optional_helper\nexcept KeyError:\n    pass\n")
    assert "No module named 'optional_helper'" in scriptlb_t(tmp_path).stderr
