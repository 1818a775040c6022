"""HookRunner: fallback cases and their logs, per-run state, code cache, precompile, modules."""

from __future__ import annotations

import subprocess
import textwrap
import zlib
from pathlib import Path

import pytest
from conftest import scriptlb_cmd
from hook_helpers import block as block_conf
from hook_helpers import exchange, run, runner

from scriptlb.config import ConfigError, load
from scriptlb.config.model import HookConf, PeerAddr, PythonConf, Source
from scriptlb.hookrt.hooks import HookRunner, load_and_check, load_code, precompile
from scriptlb.replay.synthetic import SyntheticUpstream
from scriptlb.sandbox.policy import HOOK_FUNCTION

CHUNK = "balancer_by_python(/t/scriptlb.conf:1)"

# --------------------------------------------------------------------------- fallback cases


def test_raise_falls_back_and_logs_file_line() -> None:
    result = run("balancer.set_current_peer('127.0.0.1:1')\nbalancer.set_more_tries(2)\n{}['missing']")
    assert (result.kind, result.outcome.addr, result.outcome.more_tries) == ("runtime_error", None, 0)
    assert result.logs == [("error", f"failed to run balancer_by_python: {CHUNK}:4: KeyError: 'missing'")]


def test_raise_inside_a_function_names_the_innermost_hook_line() -> None:
    result = run("def pick():\n    return 1 // 0\npick()")
    assert result.logs == [
        ("error", f"failed to run balancer_by_python: {CHUNK}:3: "
                  "ZeroDivisionError: integer division or modulo by zero")]


def test_api_argument_error_uncaught_falls_back() -> None:
    result = run("balancer.set_timeouts(0)")
    assert result.kind == "runtime_error"
    assert result.logs == [
        ("error", f"failed to run balancer_by_python: {CHUNK}:2: ValueError: bad connect timeout")]


def test_timeout_falls_back_and_names_the_line() -> None:
    result = run("balancer.set_current_peer('127.0.0.1:1')\nx = 0\nwhile True:\n    x = x + 1", timeout=0.005)
    assert (result.kind, result.outcome.addr) == ("timeout", None)
    [(level, message)] = result.logs
    assert level == "error"
    assert message.startswith(f"balancer_by_python timed out after 5ms at {CHUNK}:")
    assert message.rsplit(":", 1)[1] in ("4", "5")  # the loop's tick or its body


def test_no_peer_falls_back_with_a_warning() -> None:
    result = run("x = 1")
    assert (result.kind, result.outcome.addr, result.outcome.exit_status) == ("no_peer", None, None)
    assert result.logs == [("warn", f"{CHUNK}: python balancer: no peer set, falling back")]


def test_exit_with_error_code_falls_back() -> None:
    result = run("ngx.exit(500 - 300)")
    assert result.kind == "exit_error"
    assert result.logs == [("error", f"{CHUNK}: ngx.exit(200) in a balancer hook, falling back")]


def test_exit_wins_over_peer() -> None:
    result = run("balancer.set_current_peer('127.0.0.1:1')\nngx.exit(ngx.HTTP_FORBIDDEN)")
    assert (result.kind, result.outcome.exit_status, result.logs) == (None, 403, [])


def test_failure_logs_are_rate_limited() -> None:
    logs: list[tuple[str, str]] = []
    hook = runner("1/0", logs=logs)
    for _ in range(15):
        assert hook.run(exchange(), hook.upstream).error == "runtime_error"
    assert len(logs) == 10  # 15 failures, 10 lines in the window
    hook._limit.interval = 0.0  # the window is over
    hook.run(exchange(), hook.upstream)
    assert logs[10] == ("error", f"{CHUNK}: 5 similar messages suppressed")
    assert logs[11][1].endswith("ZeroDivisionError: division by zero")


def test_each_kind_has_its_own_window() -> None:
    logs: list[tuple[str, str]] = []
    failing, silent = runner("1/0", logs=logs), runner("x = 1", logs=logs)
    for _ in range(12):
        failing.run(exchange(), failing.upstream)
    silent.run(exchange(), silent.upstream)
    assert [level for level, _ in logs] == ["error"] * 10 + ["warn"]


# --------------------------------------------------------------------------- per-run state


def test_globals_are_fresh_each_run_and_ctx_persists() -> None:
    code = """
    try:
        seen = seen + 1
    except NameError:
        seen = 1
    ngx.ctx["seen"] = seen
    ngx.ctx["runs"] = ngx.ctx.get("runs", 0) + 1
    balancer.set_current_peer("127.0.0.1:1")
    """
    hook = runner(code)
    ex = exchange()
    for _ in range(3):
        hook.run(ex, hook.upstream)
    assert ex.ctx == {"seen": 1, "runs": 3}


def test_shadowing_a_name_lasts_one_run() -> None:
    hook = runner("ngx.ctx['len'] = len('ab')\nlen = None\nbalancer.set_current_peer('127.0.0.1:1')")
    ex = exchange()
    hook.run(ex, hook.upstream)
    hook.run(ex, hook.upstream)
    assert ex.ctx == {"len": 2}


def test_outcome_is_per_run() -> None:
    hook = runner("if ngx.ctx.get('second'):\n    ngx.exit(503)\nelse:\n"
                  "    ngx.ctx['second'] = True\n    balancer.set_current_peer('127.0.0.1:1')")
    ex = exchange()
    first, second = hook.run(ex, hook.upstream), hook.run(ex, hook.upstream)
    assert (first.addr, first.exit_status) == (PeerAddr("127.0.0.1", 1), None)
    assert (second.addr, second.exit_status) == (None, 503)


# A hook's top-level code runs as a function body when nothing tells the two apart (its names
# are the call's locals: fresh every run, read without dict lookups); otherwise as a module body.
FUNCTION_OR_MODULE = [
    ("PORTS = (1, 2)\ni = ngx.crc32_long(ngx.var.uri) % 2\n"
     "ok, err = balancer.set_current_peer('127.0.0.1', PORTS[i])\n", True, 1),  # crc32("/a") is even
    # closures and methods read the top-level names (one bound after the definitions)
    ("PORTS = (9001, 9002)\ndef pick(i):\n    return PORTS[i]\nclass Ring:\n"
     "    def __init__(self, ports):\n        self.ports = ports\n    def first(self):\n"
     "        return self.ports[0] + OFFSET\nOFFSET = 5\n"
     "balancer.set_current_peer('127.0.0.1', Ring(PORTS).first() + pick(1) - 9002)\n", True, 9006),
    # `global` reaches the run's globals: a module body
    ("def bump():\n    global port\n    port = 7\nbump()\nbalancer.set_current_peer('127.0.0.1', port)\n",
     False, 7),
    # a rebound builtin is read before its binding: a global, where a local would be unbound
    ("peer = str(8)\nstr = None\nbalancer.set_current_peer('127.0.0.1', int(peer))\n", False, 8),
    # a class body reads the names it binds from the globals, not from a function around it
    ("PORT = 8\nclass A:\n    PORT = PORT + 1\nbalancer.set_current_peer('127.0.0.1', A.PORT)\n", False, 9),
]


@pytest.mark.parametrize(("code", "as_function", "port"), FUNCTION_OR_MODULE)
def test_top_level_code_runs_as_a_function_when_nothing_tells_them_apart(code: str, as_function: bool,
                                                                         port: int) -> None:
    hook = runner(code)
    assert (load_code(hook.conf).co_names == (HOOK_FUNCTION,)) is as_function
    for uri in ("/a", "/a"):  # twice: the second run sees nothing of the first
        outcome = hook.run(exchange(uri), hook.upstream)
        assert (outcome.error, outcome.addr) == (None, PeerAddr("127.0.0.1", port))


def test_a_name_bound_in_an_earlier_run_is_unbound_in_the_next() -> None:
    logs: list[tuple[str, str]] = []
    hook = runner("if ngx.var.uri == '/set':\n    port = 1\nbalancer.set_current_peer('127.0.0.1', port)\n",
                  logs=logs)
    assert load_code(hook.conf).co_names == (HOOK_FUNCTION,)
    assert hook.run(exchange("/set"), hook.upstream).addr == PeerAddr("127.0.0.1", 1)
    assert hook.run(exchange("/other"), hook.upstream).error == "runtime_error"
    assert "UnboundLocalError" in logs[-1][1] and ":4: " in logs[-1][1]  # (a NameError; its conf line)


def _names_read_through_guards(code: str) -> set[str]:
    hook = runner(code)
    compiled = load_code(hook.conf)
    names: set[str] = set()
    stack = [compiled]
    while stack:
        current = stack.pop()
        names.update(n for n in current.co_names if n.startswith("_") and n.endswith("_"))
        stack.extend(c for c in current.co_consts if isinstance(c, type(compiled)))
    return names


def test_members_of_imported_stand_ins_are_read_directly_and_stay_read_only() -> None:
    code = ("import zlib\nimport math as m\nport = zlib.crc32(b'/') % 2 + int(m.floor(1.5))\n"
            "balancer.set_current_peer('127.0.0.1', port)\n")
    assert "_getattr_" not in _names_read_through_guards(code)
    assert run(code).outcome.addr == PeerAddr("127.0.0.1", zlib.crc32(b"/") % 2 + 1)
    # bound some other way too: no longer known to be a module, read through the guard
    rebound = "import zlib\nif ngx.var.uri:\n    zlib = ngx\nzlib.crc32"
    assert "_getattr_" in _names_read_through_guards(rebound)
    result = run("import zlib\nzlib.crc32 = len\n")
    assert result.kind == "runtime_error" and "cannot modify a 'SafeModule'" in result.logs[0][1]


def test_unpacking_into_names_pulls_one_item_more_at_most() -> None:
    code = ("def endless():\n    while True:\n        yield 1\n"
            "try:\n    a, b = endless()\nexcept ValueError as err:\n    ngx.ctx['err'] = str(err)\n"
            "for k, v in {'127.0.0.1': 9}.items():\n    balancer.set_current_peer(k, v)\n")
    result = run(code)
    assert result.exchange.ctx == {"err": "too many values to unpack (expected 2)"}
    assert result.outcome.addr == PeerAddr("127.0.0.1", 9)
    assert "_unpack_sequence_" not in _names_read_through_guards(code)


# --------------------------------------------------------------------------- files and cache


def _file_hook(path: Path, timeout: float = 1.0) -> HookConf:
    # a budget no loaded machine exceeds: these tests are about which code runs, not its time
    return HookConf("file", str(path), None, Source("/t/scriptlb.conf", 5), timeout=timeout)


def test_code_cache_on_keeps_the_compiled_hook(tmp_path: Path) -> None:
    hook_file = tmp_path / "h.py"
    hook_file.write_text("balancer.set_current_peer('127.0.0.1:1')\n")
    hook = HookRunner(_file_hook(hook_file), SyntheticUpstream([]), PythonConf(code_cache=True), log=_drop)
    hook_file.write_text("balancer.set_current_peer('127.0.0.1:2')\n")
    assert hook.run(exchange(), hook.upstream).addr == PeerAddr("127.0.0.1", 1)


def test_code_cache_off_rereads_the_file_every_run(tmp_path: Path) -> None:
    hook_file = tmp_path / "h.py"
    hook_file.write_text("balancer.set_current_peer('127.0.0.1:1')\n")
    logs: list[tuple[str, str]] = []
    hook = HookRunner(_file_hook(hook_file), SyntheticUpstream([]), PythonConf(code_cache=False),
                      log=lambda level, msg, _ex: logs.append((level, msg)))
    assert hook.run(exchange(), hook.upstream).addr == PeerAddr("127.0.0.1", 1)
    hook_file.write_text("balancer.set_current_peer('127.0.0.1:2')\n")
    assert hook.run(exchange(), hook.upstream).addr == PeerAddr("127.0.0.1", 2)
    hook_file.write_text("x = (\n")
    broken = hook.run(exchange(), hook.upstream)
    assert (broken.error, broken.addr) == ("compile_error", None)
    assert logs == [("error", f'failed to load external Python file "{hook_file}": '
                              f"SyntaxError: '(' was never closed in {hook_file}:1")]


def _drop(level: str, msg: str, exchange: object) -> None:
    pass


# --------------------------------------------------------------------------- precompile


def _conf(tmp_path: Path, upstream_body: str, http_extra: str = "") -> Path:
    conf = tmp_path / "scriptlb.conf"
    conf.write_text(textwrap.dedent("""\
        events {}
        http {
            %s
            upstream backend {
                server 127.0.0.1:9001;
        %s
            }
            server {
                listen 127.0.0.1:8080;
                location / { proxy_pass http://backend; }
            }
        }
        """) % (http_extra, textwrap.indent(textwrap.dedent(upstream_body), "        ")))
    return conf


def test_precompile_reports_a_file_hook_syntax_error_at_its_line(tmp_path: Path) -> None:
    (tmp_path / "hooks").mkdir()
    (tmp_path / "hooks" / "bad.py").write_text("x = 1\nif x\n    pass\n")
    conf = _conf(tmp_path, "balancer_by_python_file hooks/bad.py;")
    with pytest.raises(ConfigError) as err:
        load_and_check(str(conf), str(tmp_path))
    path = tmp_path / "hooks" / "bad.py"
    assert str(err.value) == (f'[emerg] failed to load external Python file "{path}": '
                              f"SyntaxError: expected ':' in {path}:2")


def test_precompile_reports_a_policy_error_in_a_block_at_its_conf_line(tmp_path: Path) -> None:
    conf = _conf(tmp_path, """\
        balancer_by_python_block {
            peer = "127.0.0.1:9001"
            x = peer.__class__
            balancer.set_current_peer(peer)
        }
    """)
    with pytest.raises(ConfigError) as err:
        load_and_check(str(conf), str(tmp_path))
    lines = conf.read_text().splitlines()
    line = next(i for i, text in enumerate(lines, 1) if "__class__" in text)
    assert str(err.value) == (
        '[emerg] failed to load inlined Python code: SandboxError: "__class__" is an invalid attribute '
        f'name because it starts with "_". in {conf}:{line}')


def test_precompile_reports_a_missing_file_at_the_directive(tmp_path: Path) -> None:
    (tmp_path / "hooks").mkdir()
    hook_file = tmp_path / "hooks" / "gone.py"
    hook_file.write_text("pass\n")
    conf_file = _conf(tmp_path, "balancer_by_python_file hooks/gone.py;")
    conf = load(str(conf_file), str(tmp_path))
    hook_file.unlink()  # removed between the config check and the compile
    with pytest.raises(ConfigError) as err:
        precompile(conf)
    line = next(i for i, t in enumerate(conf_file.read_text().splitlines(), 1) if "gone.py" in t)
    assert str(err.value) == (f'[emerg] failed to load external Python file "{hook_file}": '
                              f"No such file or directory in {conf_file}:{line}")


def test_block_hook_runs_with_conf_line_numbers(tmp_path: Path) -> None:
    conf_file = _conf(tmp_path, """\
        balancer_by_python_block {
            # braces { } and quotes " inside Python must not confuse the parser
            peers = {"a": "127.0.0.1:9001"}
            ngx.log(ngx.ERR, "picked ", peers["a"])
            balancer.set_current_peer(peers["a"])
        }
    """)
    conf = load(str(conf_file), str(tmp_path))
    precompile(conf)
    hook_conf = conf.http.upstreams["backend"].hook
    logs: list[tuple[str, str]] = []
    hook = HookRunner(hook_conf, SyntheticUpstream([]), log=lambda lv, msg, _ex: logs.append((lv, msg)))
    outcome = hook.run(exchange(), hook.upstream)
    assert outcome.addr == PeerAddr("127.0.0.1", 9001)
    line = next(i for i, t in enumerate(conf_file.read_text().splitlines(), 1) if "ngx.log" in t)
    assert logs == [("error", f"[python] {hook_conf.chunk_name}:{line}: picked 127.0.0.1:9001")]
    assert hook_conf.chunk_name == f"balancer_by_python({conf_file}:{hook_conf.source.line})"


# --------------------------------------------------------------------------- package modules


def _lib(tmp_path: Path, files: dict[str, str]) -> PythonConf:
    lib = tmp_path / "lib"
    lib.mkdir(exist_ok=True)
    for name, text in files.items():
        (lib / name).write_text(textwrap.dedent(text))
    return PythonConf(package_path=(str(lib / "?.py"),), code_cache=True)


def test_package_module_is_imported_once_and_keeps_state(tmp_path: Path) -> None:
    python = _lib(tmp_path, {"picker.py": """
        loads = [0]
        loads[0] = loads[0] + 1
        seen = {}

        def pick(uri):
            seen[uri] = seen.get(uri, 0) + 1
            ngx.log(ngx.INFO, "seen ", uri)
            return "127.0.0.1:9001"
    """})
    code = """
        import picker
        from picker import pick
        balancer.set_current_peer(pick(ngx.var.uri))
        ngx.ctx["state"] = (picker.loads[0], picker.seen[ngx.var.uri])
    """
    logs: list[tuple[str, str]] = []
    hook = runner(code, python=python, logs=logs)
    results = []
    for _ in range(3):
        ex = exchange("/a")
        assert hook.run(ex, hook.upstream).addr == PeerAddr("127.0.0.1", 9001)
        results.append(ex.ctx["state"])
    assert results == [(1, 1), (1, 2), (1, 3)]
    assert logs[0] == ("info", f"[python] {tmp_path}/lib/picker.py:8: seen /a")


def test_package_module_is_sandboxed_and_read_only(tmp_path: Path) -> None:
    python = _lib(tmp_path, {"evil.py": "import os\n", "helper.py": "value = 1\n",
                             "broken.py": "def f(:\n"})
    result = run("import evil", python=python)
    assert "ModuleNotFoundError: No module named 'os'" in result.outcome.message
    result = run("import helper\nhelper.value = 2", python=python)
    assert "TypeError: a hook cannot modify a 'PackageModule' object" in result.outcome.message
    result = run("import broken", python=python)
    assert result.outcome.message.endswith(
        f"ImportError: cannot load module 'broken': SyntaxError: invalid syntax in "
        f"{tmp_path}/lib/broken.py:1")
    result = run("import nothere", python=python)
    assert "ModuleNotFoundError: No module named 'nothere'" in result.outcome.message


def test_package_module_reloaded_with_code_cache_off(tmp_path: Path) -> None:
    python = _lib(tmp_path, {"port.py": "PORT = 1\n"})
    python = PythonConf(package_path=python.package_path, code_cache=False)
    hook = runner("import port\nbalancer.set_current_peer('127.0.0.1', port.PORT)", python=python)
    assert hook.run(exchange(), hook.upstream).addr == PeerAddr("127.0.0.1", 1)
    (tmp_path / "lib" / "port.py").write_text("PORT = 2\n")
    assert hook.run(exchange(), hook.upstream).addr == PeerAddr("127.0.0.1", 2)


def test_a_failing_log_sink_does_not_escape_run() -> None:
    def broken(level: str, msg: str, exchange: object) -> None:
        raise OSError("disk full")

    hook = HookRunner(block_conf("1/0"), SyntheticUpstream([]), PythonConf(), log=broken)
    outcome = hook.run(exchange(), hook.upstream)
    assert (outcome.error, outcome.addr) == ("runtime_error", None)


def test_failed_run_discards_everything_it_set() -> None:
    result = run("""
        balancer.set_current_peer("127.0.0.1:1", host="h")
        balancer.set_more_tries(2)
        balancer.enable_keepalive()
        balancer.bind_to_local_addr("127.0.0.2")
        balancer.recreate_request()
        ngx.exit(503)
        1 / 0
    """)
    out = result.outcome
    decided = (out.addr, out.host, out.more_tries, out.keepalive, out.local_addr, out.recreate,
               out.exit_status)
    assert decided == (None, None, 0, None, None, False, None)


def test_long_error_messages_are_cut() -> None:
    result = run("raise ValueError('x' * 5000)")
    assert len(result.outcome.message) == 2048
    assert len(result.logs[0][1]) == 2048


@pytest.mark.integration  # real processes
def test_scriptlb_t_reports_a_broken_hook(tmp_path: Path) -> None:
    (tmp_path / "hooks").mkdir()
    hook_file = tmp_path / "hooks" / "bad.py"
    hook_file.write_text("peers = upstream.get_primary_peers()\nx = peers.__len__()\n")
    conf = _conf(tmp_path, "balancer_by_python_file hooks/bad.py;")
    done = subprocess.run(scriptlb_cmd("-t", "-p", str(tmp_path), "-c", str(conf)), capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 1
    expected = (f'scriptlb: [emerg] failed to load external Python file "{hook_file}": SandboxError: '
                f'"__len__" is an invalid attribute name because it starts with "_". in {hook_file}:2')
    assert expected in done.stderr
    assert "test failed" in done.stderr


# --------------------------------------------------------------------------- example: consistent hash


def test_consistent_hash_example_moves_only_the_new_peers_share() -> None:
    from hook_helpers import upstream as make_upstream

    root = Path(__file__).resolve().parent.parent
    python = PythonConf(package_path=(str(root / "hooks" / "lib" / "?.py"),))
    # the budget is wall-clock time: 10 ms (the default) can pass while a loaded machine runs
    # other processes, and this test is about the ring, not the budget
    hook_conf = HookConf("file", str(root / "hooks" / "consistent_hash.py"), None, Source(CHUNK, 1),
                         timeout=1.0)

    def owners(peers: int) -> dict[str, PeerAddr]:
        up = make_upstream(peers)
        hook = HookRunner(hook_conf, up, python, log=_drop)
        picks = {}
        for i in range(300):
            outcome = hook.run(exchange(f"/item/{i}"), up)
            assert outcome.error is None, outcome.message
            picks[f"/item/{i}"] = outcome.addr
        return picks

    three, four = owners(3), owners(4)
    moved = [uri for uri in three if three[uri] != four[uri]]
    new_peer = PeerAddr("127.0.0.1", 9004)
    assert all(four[uri] == new_peer for uri in moved)  # only to the new server
    assert 30 < len(moved) < 130  # about a quarter of the keys
    assert len(set(three.values())) == 3


def test_runners_use_the_code_checked_at_load_time(tmp_path: Path) -> None:
    """A worker started (or respawned) after the file changed still runs what the config load
    compiled: only a reload reloads."""
    (tmp_path / "hooks").mkdir()
    hook_file = tmp_path / "hooks" / "h.py"
    hook_file.write_text("balancer.set_current_peer('127.0.0.1:1')\n")
    conf = load_and_check(str(_conf(tmp_path, "balancer_by_python_file hooks/h.py;")), str(tmp_path))
    hook_file.write_text("balancer.set_current_peer('127.0.0.1:2')\n")
    hook_conf = conf.http.upstreams["backend"].hook
    runner_ = HookRunner(hook_conf, SyntheticUpstream([]), conf.http.python, log=_drop)
    assert runner_.run(exchange(), runner_.upstream).addr == PeerAddr("127.0.0.1", 1)


def test_a_refused_config_keeps_the_loaded_code(tmp_path: Path) -> None:
    (tmp_path / "hooks").mkdir()
    hook_file = tmp_path / "hooks" / "h.py"
    hook_file.write_text("balancer.set_current_peer('127.0.0.1:1')\n")
    conf_file = _conf(tmp_path, "balancer_by_python_file hooks/h.py;")
    conf = load_and_check(str(conf_file), str(tmp_path))
    hook_file.write_text("balancer.set_current_peer(\n")
    with pytest.raises(ConfigError):
        load_and_check(str(conf_file), str(tmp_path))  # a reload with a broken hook
    hook_conf = conf.http.upstreams["backend"].hook
    runner_ = HookRunner(hook_conf, SyntheticUpstream([]), conf.http.python, log=_drop)  # a respawn
    assert runner_.run(exchange(), runner_.upstream).addr == PeerAddr("127.0.0.1", 1)


def test_precompile_checks_log_hooks_too(tmp_path: Path) -> None:
    conf = tmp_path / "scriptlb.conf"
    conf.write_text(textwrap.dedent("""\
        events {}
        http {
            server {
                listen 127.0.0.1:8080;
                location / {
                    return 200;
                    log_by_python_block {
                        x = ().__class__
                    }
                }
            }
        }
        """))
    with pytest.raises(ConfigError) as err:
        load_and_check(str(conf), str(tmp_path))
    line = next(i for i, t in enumerate(conf.read_text().splitlines(), 1) if "__class__" in t)
    assert str(err.value) == ('[emerg] failed to load inlined Python code: SandboxError: "__class__" is an '
                              f'invalid attribute name because it starts with "_". in {conf}:{line}')
