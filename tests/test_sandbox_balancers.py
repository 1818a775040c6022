"""``from scriptlb.balancers import chash, roundrobin, ewma`` in hooks: the import forms, the
escape attempts through the objects it hands out (each with the outcome the sandbox gives it),
size limits that keep one call's host work small, and the functional patterns: a ring built
once per worker in a package module, or per run, with a ``next``-style retry over the ring."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from hook_helpers import exchange, run, runner, upstream

from scriptlb.config.model import HookConf, PythonConf, Source
from scriptlb.hookrt.hooks import HookRunner
from scriptlb.sandbox.modules import ALLOWED

PEER = "\nbalancer.set_current_peer('127.0.0.1:1')\n"
SETUP = ("from scriptlb.balancers import chash, roundrobin, ewma\n"
         "import scriptlb.balancers as lb\n"
         "ring = chash({'127.0.0.1:9001': 1, '127.0.0.1:9002': 1})\n"
         "rr = roundrobin(['a', 'b'])\n"
         "e = ewma(['a', 'b'])\n")


def test_the_module_is_on_the_allow_list() -> None:
    assert "scriptlb.balancers" in ALLOWED
    assert "scriptlb" not in ALLOWED


@pytest.mark.parametrize("imports", [
    "from scriptlb.balancers import chash",
    "import scriptlb.balancers\nchash = scriptlb.balancers.chash",
    "import scriptlb.balancers as lb\nchash = lb.chash",
    "from scriptlb import balancers\nchash = balancers.chash",
])
def test_import_forms(imports: str) -> None:
    result = run(imports + "\nngx.ctx['node'] = chash(['127.0.0.1:9001']).find('k')[0]" + PEER)
    assert result.kind is None, result.outcome.message
    assert result.ctx["node"] == "127.0.0.1:9001"


@pytest.mark.parametrize(("code", "message"), [
    ("import scriptlb", "No module named 'scriptlb'"),
    ("import scriptlb.hooks", "No module named 'scriptlb.hooks'"),
    ("import scriptlb.balancing.hash", "No module named 'scriptlb.balancing.hash'"),
    ("from scriptlb import hooks", "ImportError: cannot import name 'hooks'"),
    ("from scriptlb.balancers import HOOK_API", "ImportError: cannot import name 'HOOK_API'"),
    ("from scriptlb.balancers import ketama_ring", "ImportError: cannot import name 'ketama_ring'"),
])
def test_only_the_public_names_of_this_one_module(code: str, message: str) -> None:
    result = run(code + PEER)
    assert result.kind == "runtime_error"
    assert message in result.outcome.message


COMPILE_ERRORS = {
    "instance dunder": ("ring.__class__", "invalid attribute name"),
    "method internals": ("ring.find.__func__.__globals__", "invalid attribute name"),
    "bound self": ("ring.find.__self__", "invalid attribute name"),
    "private import": ("from scriptlb.balancers import _Weighted", "invalid variable name"),
    "module dict": ("lb.__dict__", "invalid attribute name"),
}


@pytest.mark.parametrize(("code", "message"), COMPILE_ERRORS.values(), ids=COMPILE_ERRORS.keys())
def test_compile_errors(code: str, message: str) -> None:
    result = run(SETUP + code + PEER)
    assert result.kind == "compile_error"
    assert message in result.outcome.message


RUNTIME_ERRORS = {
    # attribute reads: instances show only HOOK_API, classes and methods nothing at all
    "getattr dunder": ("getattr(ring, '__class__')", "AttributeError"),
    "getattr private table": ("getattr(ring, '_weights')", "AttributeError"),
    "getattr private ring": ("getattr(ring, '_ring')", "AttributeError"),
    "getattr ewma rng": ("getattr(e, '_rng')", "AttributeError"),
    "getattr ewma clock": ("getattr(e, '_clock')", "AttributeError"),
    "getattr bound self": ("getattr(ring.find, '__self__')", "AttributeError"),
    "getattr func": ("getattr(ring.find, '__func__')", "AttributeError"),
    "class mro": ("chash.mro()", "AttributeError: 'type' object has no attribute 'mro' visible"),
    "unbound method": ("chash.find(ring, 'k')", "AttributeError: 'type' object has no attribute 'find'"),
    "class dict via getattr": ("getattr(chash, '__dict__')", "AttributeError"),
    "method attribute": ("ring.find.func", "AttributeError"),
    "module internals": ("lb.balancers", "AttributeError"),
    "package stand-in": ("import scriptlb.balancers\nscriptlb.hooks",
                         "AttributeError: module 'scriptlb' has no"),
    "hasattr private is false": ("assert not hasattr(ring, '_ring')\n1 / 0", "ZeroDivisionError"),
    # format strings: no str.format (attribute walking), and reprs carry no address
    "str.format walk": ("'{0.__class__}'.format(ring)", "no attribute 'format' visible to hooks"),
    "format_map": ("'{x}'.format_map({'x': ring})", "no attribute 'format_map' visible to hooks"),
    # writes: not into the shared module, its classes, or the objects
    "assign module attr": ("lb.chash = None", "TypeError: a hook cannot modify a 'SafeModule' object"),
    "delete module attr": ("del lb.chash", "TypeError: a hook cannot modify a 'SafeModule' object"),
    "assign class attr": ("chash.find = None", "TypeError: a hook cannot modify a 'type' object"),
    "assign instance attr": ("ring.find = None", "TypeError: a hook cannot modify a 'chash' object"),
    "assign instance private": ("ring.x = 1", "TypeError: a hook cannot modify a 'chash' object"),
    "item store": ("ring['a'] = 1", "TypeError: a hook cannot modify a 'chash' object"),
    # ewma's test hooks (callables run from host code) are not part of the hook API
    "ewma clock": ("ewma(['a'], clock=lambda: 0)", "TypeError"),
    "ewma rng": ("import random\newma(['a'], rng=random)", "TypeError"),
    "ewma bad decay": ("ewma(['a'], decay=0)", "ValueError: decay must be"),
    # sizes: refused before the work, with messages that never repr the caller's value
    "ring weight": ("chash({str(i): 1 for i in range(200)})", "ValueError: total weight 200 of a chash ring"),
    "node weight": ("roundrobin({'a': 10**6})", "ValueError: weight of 'a' must be between 0 and 1000"),
    "huge weight value": ("s = 'x' * 2**20\nchash({'a': [s] * 2**20})",
                          "ValueError: weight of 'a' must be an int >= 0, not list"),
    "too many nodes": ("roundrobin({str(i): 1 for i in range(2000)})",
                       "2000 nodes is over the limit of 1024"),
    "endless nodes": ("import itertools\nroundrobin(str(i) for i in itertools.count())",
                      "more than 1024 nodes is over the limit"),
    "long id": ("roundrobin(['x' * 10000])", "node id of 10000 characters is over the limit of 256"),
    "tuple node (hash bomb)": ("t = ()\nfor _ in range(1000):\n    t = (t, t)\nroundrobin([t])",
                               "TypeError: node ids are strings, not tuple"),
    "tuple delete (hash bomb)": ("t = ()\nfor _ in range(1000):\n    t = (t, t)\nring.delete(t)",
                                 "TypeError: node ids are strings, not tuple"),
    "tuple score (hash bomb)": ("t = ()\nfor _ in range(1000):\n    t = (t, t)\ne.score(t)",
                                "TypeError: node ids are strings, not tuple"),
    "huge tried list": ("ring.find('k', tried=list(range(10**5)))", "tried has 100000 items"),
    "tried generator": ("rr.find(tried=(x for x in 'ab'))", "TypeError: tried must be a set"),
    "non-text key": ("ring.find(['k'])", "TypeError: key must be a str or bytes, not list"),
    "rtt not a number": ("e.observe('a', '1')", "TypeError: rtt must be a number, not str"),
}


@pytest.mark.parametrize(("code", "message"), RUNTIME_ERRORS.values(), ids=RUNTIME_ERRORS.keys())
def test_runtime_errors(code: str, message: str) -> None:
    result = run(SETUP + code + PEER, timeout=0.5)
    # refused up front: a runtime error, not the budget's timeout after doing the work
    assert result.kind == "runtime_error", result.outcome.message
    assert message in result.outcome.message
    assert result.outcome.addr is None


HARMLESS = {
    "repr has no address": ("ngx.ctx['v'] = (repr(ring), f'{rr}', '%s' % e, format(ring, ''))",
                            ("<chash with 2 nodes>", "<roundrobin with 2 nodes>", "<ewma with 2 nodes>",
                             "<chash with 2 nodes>")),
    "nodes() is a copy": ("t = ring.nodes()\nt['x'] = 5\nngx.ctx['v'] = sorted(ring.nodes())",
                          ["127.0.0.1:9001", "127.0.0.1:9002"]),
    "refused change keeps the table": (
        "try:\n    ring.set('z', 1000)\nexcept ValueError:\n    pass\n"
        "ngx.ctx['v'] = (sorted(ring.nodes()), ring.find('k')[0] is not None)",
        (["127.0.0.1:9001", "127.0.0.1:9002"], True)),
    "isinstance works": ("ngx.ctx['v'] = (isinstance(ring, chash), isinstance(e, ewma), "
                         "isinstance(rr, chash))",
                         (True, True, False)),
    "tried as list, dict or set": (
        "ngx.ctx['v'] = [rr.find(tried=t) for t in (['a'], {'a': 1}, {'a'}, ('a',))]", ["b"] * 4),
    "all tried": ("ngx.ctx['v'] = (ring.find('k', tried={'127.0.0.1:9001', '127.0.0.1:9002'})[0], "
                  "rr.find(tried=['a', 'b']), e.find(tried=['a', 'b']))", (None, None, None)),
}


@pytest.mark.parametrize(("code", "expected"), HARMLESS.values(), ids=HARMLESS.keys())
def test_harmless(code: str, expected: object) -> None:
    result = run(SETUP + code + PEER)
    assert result.kind is None, result.outcome.message
    assert result.ctx["v"] == expected


def test_an_attack_in_one_hook_leaves_the_module_intact_for_others() -> None:
    for attack in ("lb.chash = None", "del lb.roundrobin", "chash.find = None"):
        assert run(SETUP + attack + PEER).kind == "runtime_error"
    check = "ngx.ctx['v'] = (lb.chash is chash, rr.find(), ring.find('k')[0] is not None)"
    result = run(SETUP + check + PEER)
    assert result.ctx["v"] == (True, "a", True)


# --------------------------------------------------------------------------- functional

RING_MODULE = """
# built once per worker: the module runs at its first import
from scriptlb.balancers import chash

BUILDS = [0]
ring = chash({"127.0.0.1:9001": 1, "127.0.0.1:9002": 1, "127.0.0.1:9003": 1, "127.0.0.1:9004": 1})
BUILDS.append(1)
"""

NEXT_HOOK = """
import lbring
ctx = ngx.ctx
tried = ctx.setdefault("tried", [])
if balancer.get_last_failure()[0] is None:
    node, index = lbring.ring.find(ngx.var.uri)
else:
    node, index = lbring.ring.next(ctx["index"], tried)
if node is not None:
    tried.append(node)
    ctx["index"] = index
    ctx["builds"] = len(lbring.BUILDS)
    balancer.set_current_peer(node)
    balancer.set_more_tries(1)
"""


def _module_runner(tmp_path: Path, code: str) -> HookRunner:
    (tmp_path / "lbring.py").write_text(RING_MODULE)
    python = PythonConf(package_path=(str(tmp_path / "?.py"),))
    hook = HookConf("block", None, textwrap.dedent(code), Source("/t/t.conf", 1), timeout=0.05, first_line=2)
    return HookRunner(hook, upstream(4), python, log=lambda *_: None)


def test_a_ring_in_a_package_module_is_built_once_and_next_skips_tried(tmp_path: Path) -> None:
    hook = _module_runner(tmp_path, NEXT_HOOK)
    up = hook.upstream
    first: dict[str, int] = {}
    for uri in ("/a", "/b", "/c", "/a"):
        ex = exchange(uri, peers=4)
        outcome = hook.run(ex, up)
        assert outcome.error is None, outcome.message
        assert ex.ctx["builds"] == 2  # BUILDS = [0] + one append: the module ran once
        first.setdefault(uri, outcome.addr.port)
        assert outcome.addr.port == first[uri]  # the same key, the same peer
    # a request whose peers all fail: each retry goes to a peer not tried yet, then none is left
    ex = exchange("/a", peers=4)
    ports = []
    for _ in range(5):
        outcome = hook.run(ex, up)
        if outcome.addr is None:
            break
        ports.append(outcome.addr.port)
        ex.last_failure = ("failed", 502)
    assert ports[0] == first["/a"]
    assert sorted(ports) == [9001, 9002, 9003, 9004]
    assert outcome.addr is None and outcome.error == "no_peer"


def test_a_roundrobin_built_per_run_rotates_with_the_request_ctx() -> None:
    code = """
    from scriptlb.balancers import roundrobin
    rr = roundrobin(["127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003"])
    tried = ngx.ctx.setdefault("tried", [])
    node = rr.find(tried=tried)
    tried.append(node)
    balancer.set_current_peer(node)
    """
    hook = runner(code, peers=3)
    ex = exchange("/", peers=3)
    ports = []
    for _ in range(3):
        ports.append(hook.run(ex, hook.upstream).addr.port)
        ex.last_failure = ("failed", 502)
    assert ports == [9001, 9002, 9003]  # a fresh table each run: the request's tried drive it


