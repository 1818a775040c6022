"""What a port of a balancer_by_lua hook meets: ngx.ctx as attributes, hostile strings refused at
the API (unit level, against a synthetic request; the real-socket parts are in
test_porting_process.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hook_helpers import exchange, run, upstream, value

from scriptlb.config import ConfigError, load
from scriptlb.config.model import HookConf, PythonConf, Source
from scriptlb.hookrt import hooks
from scriptlb.hookrt.hooks import HookRunner, LogHookRunner

PEER = "\nbalancer.set_current_peer('127.0.0.1:1')\n"


def test_ctx_attributes_read_and_write_the_same_dict() -> None:
    code = """
    ngx.ctx.tries = (ngx.ctx.tries or 0) + 1      # a missing name reads as None, like Lua's nil
    ngx.ctx.first = ngx.ctx.get("first", "x")     # dict methods still read as methods
    ngx.ctx["item"] = ngx.ctx.never_set
    ngx.ctx.gone = 1
    del ngx.ctx.gone
    ngx.ctx.n = len(ngx.ctx.items())
    balancer.set_current_peer("127.0.0.1:1")
    """
    result = run(code)
    assert result.kind is None, result.outcome.message
    assert dict(result.ctx) == {"tries": 1, "first": "x", "item": None, "n": 3}


def test_ctx_attributes_keep_the_dict_guards() -> None:
    result = run("ngx.ctx.key = ([0] * 2**16,) * 100\nngx.ctx.update([(ngx.ctx.key, 1)])" + PEER)
    assert result.kind == "runtime_error" and "hash work" in result.outcome.message


def test_ctx_attributes_in_the_log_phase_see_the_balancer_runs_values() -> None:
    balancer_run = run("ngx.ctx.tries = 2\nngx.ctx.peer = 'a'" + PEER)
    assert balancer_run.kind is None
    hook = HookConf("block", None, "ngx.ctx.seen = (ngx.ctx.tries, ngx.ctx.peer, ngx.ctx.missing)\n",
                    Source("/t/x.conf", 1), phase="log", first_line=2)
    logs: list[tuple[str, str]] = []
    runner = LogHookRunner(hook, PythonConf(), log=lambda level, msg, _ex: logs.append((level, msg)))
    assert runner.run(balancer_run.exchange) is None, logs
    assert balancer_run.ctx["seen"] == (2, "a", None)


HOSTILE = ["127.0.0.1\r\nX-Evil: 1", "127.0.0.1\n", "127.0.0.1\x00", "127.0.0.1 ", " 127.0.0.1",
           "127.0.0.1\t", "unix:/tmp/a\nb", "unix:/tmp/a b", "unix:/tmp/\x00",
           "[::1\r\n]:80", "[fe80::1%eth0\n]",
           "127.0.0.1:80\r", "127.0.0.1\u2028", "127.0.0.1\x85", "\x1b[31m127.0.0.1"]


@pytest.mark.parametrize("addr", HOSTILE)
def test_hostile_peer_addresses_are_refused(addr: str) -> None:
    assert value(f"balancer.set_current_peer({addr!r})") == (None, "invalid address")


@pytest.mark.parametrize("host", ["a\r\nX-Evil: 1", "a\n", "a\x00", "a b", " a", "a\t", "a\u2028",
                                  "é.example", "a/b", "a?b", "a#b", "a@b", "a;b", "[::1\n]", "x" * 300])
def test_hostile_peer_host_names_are_refused(host: str) -> None:
    assert value(f"balancer.set_current_peer('127.0.0.1:1', host={host!r})") == (None, "invalid host name")


@pytest.mark.parametrize("host", ["api.internal", "a-b.example.com", "10.0.0.1", "[::1]", "[::1]:8443",
                                  "example.com:8080", "under_score.local"])
def test_ordinary_host_names_pass(host: str) -> None:
    code = f"ngx.ctx['r'] = balancer.set_current_peer('127.0.0.1:1', host={host!r})"
    result = run(code)
    assert result.ctx["r"] == (True, None) and result.outcome.host == host


def test_a_refused_host_leaves_the_peer_unset() -> None:
    result = run("ngx.ctx['r'] = balancer.set_current_peer('127.0.0.1:1', host='a\\r\\nb')")
    assert result.ctx["r"] == (None, "invalid host name")
    assert result.outcome.addr is None and result.kind == "no_peer"


@pytest.mark.parametrize("addr", ["127.0.0.1\n", "127.0.0.1 ", "unix:/x\r"])
def test_hostile_local_addresses_are_refused(addr: str) -> None:
    assert value(f"balancer.bind_to_local_addr({addr!r})") == (None, f"invalid addr {addr}")


def test_log_lines_from_hooks_stay_one_line() -> None:
    result = run("ngx.log(ngx.ERR, 'a\\r\\n2026/01/01 [emerg] forged')" + PEER)
    [(_level, message)] = result.logs
    assert "\n" not in message and "\r" not in message and "\\x0D\\x0A2026" in message



# --------------------------------------------------------------------------- widened stand-ins

STAND_INS = {
    "namedtuple": ("import collections\nPoint = collections.namedtuple('Point', 'x y', defaults=[0])\n"
                   "p = Point(1)\nr = (p.x, p.y, p == Point(1, 0), Point(3, 4).count(3), "
                   "collections.namedtuple('Point', ['x', 'y'], defaults=[0]) is Point)",
                   (1, 0, True, 1, True)),
    "json.loads object_hook": ("import json, collections\n"
                               "r = json.loads('{\"a\": {\"b\": 1}}', object_hook=lambda o: len(o))", 1),
    "json.loads parse_int": ("import json\nr = json.loads('[1, 2]', parse_int=float)", [1.0, 2.0]),
    "operator.itemgetter": ("import operator\nr = sorted([(2, 'b'), (1, 'a')], key=operator.itemgetter(0))",
                            [(1, "a"), (2, "b")]),
    "string constants": ("import string\nr = string.hexdigits", "0123456789abcdefABCDEF"),
    "base64": ("import base64\nr = base64.urlsafe_b64decode(base64.urlsafe_b64encode(b'\\xff\\xfe'))",
               b"\xff\xfe"),
}


@pytest.mark.parametrize(("code", "expected"), STAND_INS.values(), ids=STAND_INS.keys())
def test_widened_stand_ins(code: str, expected: object) -> None:
    result = run(code + "\nngx.ctx['r'] = r" + PEER)
    assert result.kind is None, result.outcome.message
    assert result.ctx["r"] == expected


REFUSED = {
    "namedtuple private field": ("import collections\ncollections.namedtuple('P', ['_x'])",
                                 "a field name must be a public identifier"),
    "namedtuple helper": ("import collections\nP = collections.namedtuple('P', 'x')\n"
                          "getattr(P(1), '_replace')",
                          "no attribute '_replace'"),
    "namedtuple object default": ("import collections\ncollections.namedtuple('P', 'x', defaults=[[]])",
                                  "defaults in hooks are str, int, float, bool or None"),
    "namedtuple subclass": ("import collections\nP = collections.namedtuple('P', 'x')\nclass Q(P):\n    pass",
                            "can derive only from hook classes"),
    "attrgetter": ("import operator\noperator.attrgetter('x')", "no attribute 'attrgetter'"),
    "itemgetter of a huge key": ("import operator\nk = ([0] * 2**20,) * 8\noperator.itemgetter(k)",
                                 "hash work"),
    "json.loads cls": ("import json\njson.loads('[1]', cls=dict)", "unexpected keyword argument 'cls'"),
    "re": ("import re", "No module named 're'"),
    "dataclasses": ("import dataclasses", "No module named 'dataclasses'"),
    "copy": ("import copy", "No module named 'copy'"),
}


@pytest.mark.parametrize(("code", "message"), REFUSED.values(), ids=REFUSED.keys())
def test_refused_stand_ins(code: str, message: str) -> None:
    result = run(code + PEER)
    assert result.kind == "runtime_error", result.outcome.message
    assert message in result.outcome.message


def test_json_object_hook_runs_inside_the_budget() -> None:
    code = "import json\ndef hook(o):\n    while True:\n        pass\njson.loads('[{}]', object_hook=hook)"
    assert run(code + PEER, timeout=0.02).kind == "timeout"


# --------------------------------------------------------------------------- package path and imports


def _http(tmp_path: Path, line: str) -> PythonConf:
    (tmp_path / "x.conf").write_text("events {}\nhttp {\n    " + line + "\n}\n")
    conf = load(str(tmp_path / "x.conf"), str(tmp_path))
    assert conf.http is not None
    return conf.http.python


def test_package_path_expands_prefix_and_keeps_hook_dir(tmp_path: Path) -> None:
    python = _http(tmp_path, 'python_package_path "$prefix/lib/?.py;$hook_dir/?.py;rel/?.py;;";')
    assert python.package_path == (f"{tmp_path}/lib/?.py", "$hook_dir/?.py", f"{tmp_path}/rel/?.py")


def test_package_path_refuses_other_variables(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        _http(tmp_path, 'python_package_path "$home/?.py";')
    assert "only $prefix and $hook_dir are allowed" in str(err.value)
    assert f"{tmp_path}/x.conf:3" in str(err.value)


def _file_hook(path: Path) -> HookRunner:
    hook = HookConf("file", str(path), None, Source(str(path), 1), breaker=None)
    return HookRunner(hook, upstream(), PythonConf(package_path=("$hook_dir/?.py",)), log=lambda *_: None)


def test_hook_dir_finds_the_modules_beside_each_hook(tmp_path: Path) -> None:
    for name in ("a", "b"):  # two hooks, each with its own `helper` beside it
        (tmp_path / name).mkdir()
        (tmp_path / name / "helper.py").write_text(f"PEER = '127.0.0.1:{ord(name)}'\n")
        (tmp_path / name / "hook.py").write_text("import helper\nbalancer.set_current_peer(helper.PEER)\n")
    ports = {name: _file_hook(tmp_path / name / "hook.py").run(exchange()).addr.port for name in ("a", "b")}
    assert ports == {"a": ord("a"), "b": ord("b")}


def test_an_import_after_the_first_is_a_cache_hit(tmp_path: Path) -> None:
    (tmp_path / "helper.py").write_text("PEER = '127.0.0.1:7'\n")
    (tmp_path / "hook.py").write_text("import helper\nbalancer.set_current_peer(helper.PEER)\n")
    hook = _file_hook(tmp_path / "hook.py")
    assert hook.run(exchange()).addr.port == 7
    (tmp_path / "helper.py").unlink()  # not looked up again: resolved once per hook, per worker
    assert hook.run(exchange()).addr.port == 7
    hooks.IMPORTER.forget()  # python_code_cache off / a new package path: resolved again
    assert hook.run(exchange()).error == "runtime_error"
