"""The policy compiles ``%`` and subscripts without their guards only where the code shows a
number (policy.py, "known numbers"), and ``ngx.var.NAME`` as the variable's lookup: the same
results, and every look-alike that could carry text or a container keeps its guard."""

from __future__ import annotations

import textwrap
from types import CodeType

import pytest
from hook_helpers import assert_runtime_error, run

from scriptlb.hookrt import hooks
from scriptlb.sandbox.policy import compile_hook


def _names(code: CodeType) -> set[str]:
    """The names the code and the functions it defines use."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, CodeType):
            names |= _names(const)
    return names


def _compiled_names(source: str) -> set[str]:
    return _names(compile_hook(textwrap.dedent(source), "t.py", 1, hooks._BODY_NAMES))


UNGUARDED = {
    "crc of a variable modulo a length":
        "peers = [1, 2]\nx = peers[ngx.crc32_long(ngx.var.uri) % len(peers)]",
    "a name bound once to a number": "PORTS = (1, 2)\ni = ngx.crc32_short(ngx.var.uri) % 2\nx = PORTS[i]",
    "a chain of such names": "i = len('abc')\nj = i % 2\nk = -j\nx = (1, 2)[k]",
    "zlib's checksum in a function": """
        import zlib
        PORTS = (1, 2)

        def pick(uri):
            return PORTS[zlib.crc32(uri.encode()) % len(PORTS)]
        x = pick("/")
    """,
    "literal keys": "d = {'a': 1, 2: 3}\nx = d['a'] + d[2]",
}


@pytest.mark.parametrize("source", UNGUARDED.values(), ids=UNGUARDED.keys())
def test_numbers_need_no_guard(source: str) -> None:
    names = _compiled_names(source)
    assert "_mod_" not in names and "_getitem_" not in names, sorted(names)


def test_variables_compile_to_their_lookup() -> None:
    names = _compiled_names("x = ngx.var.uri\ny = ngx.var['uri']")
    assert "_var_" in names
    assert "var" in names  # ngx.var["uri"]: the view's own subscript (a literal key)


GUARDED = {
    "a name bound twice": "i = 5\nif ngx.var.uri:\n    i = 'x'\nx = i % 2",
    "a name bound in a loop": "for i in range(3):\n    pass\nx = i % 2",
    "an augmented name": "i = 5\ni += 1\nx = i % 2",
    "a global": "i = 5\ndef f():\n    global i\n    i = 'x'\nx = i % 2",
    "a rebound builtin": "len = str\nx = len(5) % 2",
    "a builtin used as an argument name": "def f(len):\n    return len(5) % 2\nx = f(str)",
    "a text literal": "x = '%d' % 5",
    "a name bound once to text": "fmt = '%d'\nx = fmt % 5",
    "a call of something else": "x = ngx.md5('a') % 5",
    "ngx rebound": "ngx = {}\nx = ngx.crc32_long('a') % 2",
    "a module name also bound otherwise": "import zlib\nzlib = None\nx = zlib.crc32(b'') % 2",
    "a module imported under another name": "import hashlib as zlib\nx = zlib.crc32(b'') % 2",
    "a container key": "d = {}\nk = (1, 2)\nx = d[k]",
}


@pytest.mark.parametrize("source", GUARDED.values(), ids=GUARDED.keys())
def test_look_alikes_keep_their_guard(source: str) -> None:
    names = _compiled_names(source)
    assert "_mod_" in names or "_getitem_" in names, sorted(names)


def test_text_bound_under_a_number_name_is_still_checked() -> None:
    # the first binding is a number, the second a huge format: two bindings, so guarded
    assert_runtime_error("""
        n = 5
        if True:
            n = "%99999999d"
        x = n % 1
    """, "format width")
    assert_runtime_error("""
        len = lambda x: "%99999999d"
        x = len([]) % 1
    """, "format width")


def test_unguarded_code_computes_the_same() -> None:
    import zlib

    result = run("""
        PORTS = (9001, 9002, 9003)
        i = ngx.crc32_long(ngx.var.uri) % len(PORTS)
        j = -i % 3
        d = {"a": 1, 2: "two", None: "none"}
        ngx.ctx["r"] = [PORTS[i], PORTS[j], d["a"], d[2], d[None], 7.5 % 2, (1, 2, 3)[len("ab") % 3]]
        ok, err = balancer.set_current_peer("127.0.0.1", PORTS[i])
    """, uri="/some/path")
    assert result.kind is None, result.outcome.message
    i = zlib.crc32(b"/some/path") % 3
    ports = (9001, 9002, 9003)
    assert result.ctx["r"] == [ports[i], ports[-i % 3], 1, "two", "none", 1.5, 3]
    assert result.outcome.addr is not None and result.outcome.addr.port == ports[i]


def test_variable_reads_keep_their_answers() -> None:
    result = run("""
        v = ngx.var
        ngx.ctx["r"] = [ngx.var.uri, ngx.var.request_uri, ngx.var.URI, ngx.var.no_such_thing,
                        v.uri, ngx.var["uri"], ngx.var.request_method]
        balancer.set_current_peer("127.0.0.1", 1)
    """, uri="/a/b?x=1")
    assert result.kind is None, result.outcome.message
    assert result.ctx["r"] == ["/a/b", "/a/b?x=1", "/a/b", None, "/a/b", "/a/b", "GET"]


def test_encode_without_arguments_keeps_its_answers() -> None:
    assert "_encode_" in _compiled_names("x = ngx.var.uri.encode()")
    assert "_encode_" not in _compiled_names("import zlib\nx = 'a'.encode('latin-1')")
    result = run("""
        class Text:
            def encode(self):
                return "own"
        ngx.ctx["r"] = ["é/a".encode(), ngx.var.uri.encode(), Text().encode()]
        balancer.set_current_peer("127.0.0.1", 1)
    """, uri="/u")
    assert result.kind is None, result.outcome.message
    assert result.ctx["r"] == ["é/a".encode(), b"/u", "own"]
    refused = run('x = b"a".encode()\nbalancer.set_current_peer("127.0.0.1", 1)')
    plain = run('f = b"a".encode\nbalancer.set_current_peer("127.0.0.1", 1)')
    assert refused.kind == plain.kind == "runtime_error"
    assert refused.outcome.message.split(": ", 2)[2] == plain.outcome.message.split(": ", 2)[2]
