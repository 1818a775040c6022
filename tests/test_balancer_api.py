"""The hook API (balancer, ngx, upstream): every function, argument form and message, run through
the real sandbox against a synthetic request."""

from __future__ import annotations

import hashlib
import os
import zlib
from pathlib import Path

import pytest
from hook_helpers import run, value

from scriptlb.config.model import PeerAddr

# --------------------------------------------------------------------------- set_current_peer


@pytest.mark.parametrize(("call", "addr", "name"), [
    ('"127.0.0.1:9001"', PeerAddr("127.0.0.1", 9001), "127.0.0.1:9001"),
    ('"127.0.0.1", 9002', PeerAddr("127.0.0.1", 9002), "127.0.0.1:9002"),
    ('"127.0.0.1:9003", 9002', PeerAddr("127.0.0.1", 9003), "127.0.0.1:9003"),  # addr's port wins
    ('"127.0.0.1", "9004"', PeerAddr("127.0.0.1", 9004), "127.0.0.1:9004"),  # numeric string port
    ('"127.0.0.1", 9005.7', PeerAddr("127.0.0.1", 9005), "127.0.0.1:9005"),  # fraction truncated
    ('"127.0.0.1", 65536 + 80', PeerAddr("127.0.0.1", 80), "127.0.0.1:80"),  # 16-bit truncation
    ('"127.0.0.1"', PeerAddr("127.0.0.1", 0), "127.0.0.1:0"),  # no port anywhere: port 0
    ('"010.0.0.1:80"', PeerAddr("10.0.0.1", 80), "10.0.0.1:80"),  # normalized like ngx_sock_ntop
    ('"[::1]:8080"', PeerAddr("::1", 8080), "[::1]:8080"),
    ('"[0:0::1]", 81', PeerAddr("::1", 81), "[::1]:81"),
    ('"unix:/tmp/app.sock"', PeerAddr(None, 0, "/tmp/app.sock"), "unix:/tmp/app.sock"),
])
def test_set_current_peer_accepts(call: str, addr: PeerAddr, name: str) -> None:
    result = run(f"ngx.ctx['r'] = balancer.set_current_peer({call})")
    assert result.ctx["r"] == (True, None)
    assert result.outcome.addr == addr
    assert result.outcome.addr.name == name
    assert result.outcome.host is None
    assert result.kind is None


@pytest.mark.parametrize(("addr", "error"), [
    ("example.com", "no host allowed"),
    ("localhost:80", "no host allowed"),
    ("1.2.3", "no host allowed"),
    ("1.2.3.256", "no host allowed"),
    ("127.0.0.1:0", "invalid port"),
    ("127.0.0.1:65536", "invalid port"),
    ("127.0.0.1:http", "invalid port"),
    ("127.0.0.1:", "invalid port"),
    ("::1", "invalid port"),  # unbracketed IPv6: the first ':' starts the port
    ("127.0.0.1/x", "invalid host"),
    ("127.0.0.1?x", "invalid host"),
    (":80", "no host"),
    ("", "no host"),
    ("[::1", "invalid host"),
    ("[::g]:80", "invalid IPv6 address"),
    ("[]:80", "no host"),
    ("[::1]:0", "invalid port"),
    ("unix:", "no path in the unix domain socket"),
    ("unix:/" + "x" * 107, "too long path in the unix domain socket"),
])
def test_set_current_peer_refusals(addr: str, error: str) -> None:
    result = run(f"ngx.ctx['r'] = balancer.set_current_peer({addr!r})\n")
    assert result.ctx["r"] == (None, error)
    assert result.outcome.addr is None
    assert result.kind == "no_peer"  # a refusal is not a peer: the try falls back


def test_set_current_peer_last_call_wins_including_host() -> None:
    result = run("""
        balancer.set_current_peer("127.0.0.1:1", host="a.example")
        balancer.set_current_peer("127.0.0.1:2")
    """)
    assert result.outcome.addr == PeerAddr("127.0.0.1", 2)
    assert result.outcome.host is None  # a later call without host clears it

    result = run('balancer.set_current_peer("127.0.0.1:2", None, "api.example")')
    assert result.outcome.host == "api.example"
    result = run('balancer.set_current_peer("127.0.0.1:2", host="")')
    assert result.outcome.host is None  # "" is nil


@pytest.mark.parametrize(("call", "message"), [
    ("80", "bad argument #1 to 'set_current_peer' (string expected, got int)"),
    ("None", "bad argument #1 to 'set_current_peer' (string expected, got nil)"),
    ('"127.0.0.1", [80]', "bad argument #2 to 'set_current_peer' (number expected, got list)"),
    ('"127.0.0.1", "http"', "bad argument #2 to 'set_current_peer' (number expected, got str)"),
    ('"127.0.0.1:80", None, 5', "bad argument #3 to 'set_current_peer' (string expected, got int)"),
    ("[80]", "bad argument #1 to 'set_current_peer' (string expected, got list)"),
    ('"127.0.0.1", True', "bad argument #2 to 'set_current_peer' (number expected, got bool)"),
])
def test_set_current_peer_argument_errors(call: str, message: str) -> None:
    assert value(f"balancer.set_current_peer({call})") == ("TypeError", message)


def test_set_current_peer_cached_forms_give_the_same_answers() -> None:
    result = run("""
        ngx.ctx["r"] = [balancer.set_current_peer("127.0.0.1", 1), balancer.set_current_peer("127.0.0.1", 1)]
        try:
            balancer.set_current_peer("127.0.0.1", True)  # True == 1, but a bool is not a port
        except TypeError as err:
            ngx.ctx["err"] = str(err)
        balancer.set_current_peer("127.0.0.1", 65536 + 1)
    """)
    assert result.ctx["r"] == [(True, None), (True, None)]
    assert result.ctx["err"] == "bad argument #2 to 'set_current_peer' (number expected, got bool)"
    assert result.outcome.addr == PeerAddr("127.0.0.1", 1)


def test_set_current_peer_false_port_is_zero() -> None:
    result = run('balancer.set_current_peer("127.0.0.1", False)')
    assert result.outcome.addr == PeerAddr("127.0.0.1", 0)


# --------------------------------------------------------------------------- set_more_tries


@pytest.mark.parametrize(("count", "peers", "cap", "earlier", "granted", "warning"), [
    ("1", 1, 0, 0, 1, None),  # no limit
    ("5", 1, 0, 0, 5, None),
    ("2", 1, 3, 0, 2, None),  # total 1 + 2 = 3 <= 3
    ("3", 1, 3, 0, 2, "reduced tries due to limit"),  # reduced to 3 - 1
    ("1", 3, 3, 0, 0, "reduced tries due to limit"),  # budget already 3: reduced to 0
    ("1", 1, 2, 1, 0, "reduced tries due to limit"),  # second run: total = 2 (runs) + 1 - 1
    ("0", 1, 0, 0, 0, None),
    ("-3", 1, 0, 0, 0, None),  # negative grants are clamped, never wrapped
    ("2.9", 1, 0, 0, 2, None),  # fractions truncated like the FFI's int conversion
    ("10**9", 1, 0, 0, 1000, None),  # absurd grants are clamped
    ("float('inf')", 1, 0, 0, 1000, None),
])
def test_set_more_tries_arithmetic(count: str, peers: int, cap: int, earlier: int, granted: int,
                                   warning: str | None) -> None:
    code = f"ngx.ctx['r'] = balancer.set_more_tries({count})\nbalancer.set_current_peer('127.0.0.1:1')\n"
    failure = ("failed", 502) if earlier else None
    result = run(code, peers=peers + earlier, tries_cap=cap, last_failure=failure)
    # SyntheticExchange: one earlier TryRecord when last_failure is given, tries_left = peers - 1
    assert (len(result.exchange.tries), result.exchange.tries_left) == (earlier, peers)
    assert result.ctx["r"] == (True, warning)
    assert result.outcome.more_tries == granted


def test_set_more_tries_counts_only_with_a_peer_in_the_same_run() -> None:
    result = run("balancer.set_more_tries(3)")
    assert result.kind == "no_peer"
    assert result.outcome.more_tries == 0


def test_set_more_tries_last_call_wins() -> None:
    result = run("""
        balancer.set_more_tries(3)
        balancer.set_more_tries(1)
        balancer.set_current_peer('127.0.0.1:1')
    """)
    assert result.outcome.more_tries == 1


@pytest.mark.parametrize(("arg", "got"), [('"2"', "str"), ("None", "nil"), ("True", "bool"),
                                          ("float('nan')", "float")])
def test_set_more_tries_argument_errors(arg: str, got: str) -> None:
    assert value(f"balancer.set_more_tries({arg})") == (
        "TypeError", f"bad argument #1 to 'set_more_tries' (number expected, got {got})")


# --------------------------------------------------------------------------- get_last_failure


def test_get_last_failure() -> None:
    assert value("balancer.get_last_failure()") == (None, None)
    assert value("balancer.get_last_failure()", last_failure=("failed", 502)) == ("failed", 502)
    assert value("balancer.get_last_failure()", last_failure=("next", 404)) == ("next", 404)


# --------------------------------------------------------------------------- set_timeouts


def test_set_timeouts_changes_this_request_only() -> None:
    result = run("""
        ngx.ctx["r"] = balancer.set_timeouts(1.234, None, 7.689)
        balancer.set_current_peer("127.0.0.1:1")
    """)
    assert result.ctx["r"] == (True, None)
    ex = result.exchange
    assert (ex.connect_timeout, ex.send_timeout, ex.read_timeout) == (1.234, 60.0, 7.689)


def test_set_timeouts_millisecond_precision() -> None:
    result = run("balancer.set_timeouts(0.0019, 0.0004, 5)\nbalancer.set_current_peer('127.0.0.1:1')")
    ex = result.exchange
    # 1.9 ms -> 1 ms; 0.4 ms truncates to 0 ms, which keeps the current value (as OpenResty)
    assert (ex.connect_timeout, ex.send_timeout, ex.read_timeout) == (0.001, 60.0, 5.0)


@pytest.mark.parametrize(("args", "message"), [
    ("0", "bad connect timeout"),
    ("-1", "bad connect timeout"),
    ('"1.234"', "bad connect timeout"),  # a numeric string is rejected, as in OpenResty
    ("None, 0", "bad send timeout"),
    ("None, None, -0.5", "bad read timeout"),
    ("1, 2, [3]", "bad read timeout"),
    ("0, 0, 0", "bad connect timeout"),  # checked in order: the first bad argument wins
    ("float('inf')", "bad connect timeout"),
    ("True", "bad connect timeout"),
])
def test_set_timeouts_errors(args: str, message: str) -> None:
    result = run(f"""
        try:
            balancer.set_timeouts({args})
        except ValueError as err:
            ngx.ctx["err"] = str(err)
        balancer.set_current_peer("127.0.0.1:1")
    """)
    assert result.ctx["err"] == message
    ex = result.exchange
    assert (ex.connect_timeout, ex.send_timeout, ex.read_timeout) == (60.0, 60.0, 60.0)  # nothing changed


# --------------------------------------------------------------------------- keepalive & co


def test_enable_keepalive() -> None:
    result = run("""
        ngx.ctx["before"] = balancer.enable_keepalive()
        balancer.set_current_peer("127.0.0.1:1")
        ngx.ctx["after"] = balancer.enable_keepalive(30, 0)
    """)
    assert result.ctx["before"] == (None, "no current peer set")
    assert result.ctx["after"] == (True, None)
    assert result.outcome.keepalive == (30.0, 0)
    result = run("balancer.set_current_peer('127.0.0.1:1')\nbalancer.enable_keepalive()")
    assert result.outcome.keepalive == (60.0, 100)


@pytest.mark.parametrize(("args", "error"), [
    ('"60"', ("TypeError", "bad argument #1 to 'enable_keepalive' (number expected, got str)")),
    ("-1", ("ValueError", "bad argument #1 to 'enable_keepalive' (expected >= 0)")),
    ("60, None", ("TypeError", "bad argument #2 to 'enable_keepalive' (number expected, got nil)")),
    ("60, -5", ("ValueError", "bad argument #2 to 'enable_keepalive' (expected >= 0)")),
])
def test_enable_keepalive_errors(args: str, error: tuple[str, str]) -> None:
    assert value(f"balancer.enable_keepalive({args})") == error


def test_recreate_request_and_bind_to_local_addr() -> None:
    result = run("""
        ngx.ctx["recreate"] = balancer.recreate_request()
        ngx.ctx["bind"] = balancer.bind_to_local_addr("127.0.0.2")
        ngx.ctx["bad"] = balancer.bind_to_local_addr("not-an-ip")
        ngx.ctx["zero"] = balancer.bind_to_local_addr("1.2.3.4:0")
        balancer.set_current_peer("127.0.0.1:1")
    """)
    assert result.ctx == {"recreate": (True, None), "bind": (True, None),
                          "bad": (None, "invalid addr not-an-ip"), "zero": (None, "invalid addr 1.2.3.4:0")}
    assert result.outcome.recreate is True
    assert result.outcome.local_addr == "127.0.0.2"
    result = run("balancer.bind_to_local_addr('127.0.0.2:4000')\nbalancer.set_current_peer('127.0.0.1:1')")
    assert result.outcome.local_addr == "127.0.0.2:4000"
    assert value("balancer.bind_to_local_addr(1)") == (
        "TypeError", "bad argument #1 to 'bind_to_local_addr' (string expected, got int)")


# --------------------------------------------------------------------------- ngx


def test_ngx_var_reads_request_variables() -> None:
    result = run("""
        v = ngx.var
        ngx.ctx["r"] = [v.uri, v.request_uri, v.args, v.arg_a, v.arg_zz, v.http_x_user, v["cookie_sid"],
                        v.host, v.request_method, v.remote_addr, v.scheme, v.no_such_variable]
        balancer.set_current_peer("127.0.0.1:1")
    """, uri="/p/q?a=1&b=2", headers={"Host": "Example.com", "X-User": "u1", "Cookie": "sid=42; x=1"},
        method="POST")
    assert result.ctx["r"] == ["/p/q", "/p/q?a=1&b=2", "a=1&b=2", "1", None, "u1", "42", "example.com",
                               "POST", "127.0.0.1", "http", None]
    more = value("[ngx.var.remote_port, ngx.var.server_addr, ngx.var.server_port, ngx.var.server_name, "
                 "ngx.var.http_host, ngx.var.is_args]", uri="/x?y=1", headers={"Host": "h:81"})
    assert more == ["40000", "127.0.0.1", "80", "localhost", "h:81", "?"]


def test_ngx_var_name_must_be_a_string() -> None:
    assert value("ngx.var[1]") == ("TypeError", "bad variable name (string expected, got int)")
    assert value("getattr(ngx.var, 'uri')", uri="/g") == "/g"


def test_ngx_var_is_read_only() -> None:
    result = run("ngx.var.uri = '/x'")
    assert result.kind == "runtime_error"
    assert "TypeError: a hook cannot modify a 'VarView' object" in result.outcome.message


def test_ngx_ctx_survives_tries_of_one_request() -> None:
    code = """
        ngx.ctx["runs"] = ngx.ctx.get("runs", 0) + 1
        balancer.set_current_peer("127.0.0.1:1")
    """
    from hook_helpers import exchange, runner

    hook = runner(code)
    ex = exchange()
    hook.run(ex, hook.upstream)
    hook.run(ex, hook.upstream)
    assert ex.ctx == {"runs": 2}
    other = exchange()
    hook.run(other, hook.upstream)
    assert other.ctx == {"runs": 1}


@pytest.mark.parametrize(("level", "name"), [("STDERR", "emerg"), ("EMERG", "emerg"), ("ALERT", "alert"),
                                             ("CRIT", "crit"), ("ERR", "error"), ("WARN", "warn"),
                                             ("NOTICE", "notice"), ("INFO", "info"), ("DEBUG", "debug")])
def test_ngx_log_levels_and_location(level: str, name: str) -> None:
    result = run(f"""
        balancer.set_current_peer("127.0.0.1:1")
        ngx.log(ngx.{level}, "picked ", 1, " ", None)
    """)
    assert result.logs == [(name, "[python] balancer_by_python(/t/scriptlb.conf:1):4: picked 1 None")]


def test_ngx_log_errors_and_print() -> None:
    assert value("ngx.log(9, 'x')") == ("ValueError", "bad log level")
    assert value("ngx.log('error', 'x')") == ("ValueError", "bad log level")
    result = run("print('hello', 42)\nbalancer.set_current_peer('127.0.0.1:1')")
    assert result.logs == [("notice", "[python] balancer_by_python(/t/scriptlb.conf:1):2: hello 42")]


def test_ngx_log_lines_per_run_are_capped() -> None:
    result = run("for i in range(150):\n    ngx.log(ngx.INFO, i)\nbalancer.set_current_peer('127.0.0.1:1')")
    assert len(result.logs) == 101
    assert result.logs[99] == ("info", "[python] balancer_by_python(/t/scriptlb.conf:1):3: 99")
    assert result.logs[100] == (
        "warn", "[python] balancer_by_python(/t/scriptlb.conf:1):3: more than 100 log lines in one run, "
        "dropping the rest")


def test_ngx_exit() -> None:
    result = run("ngx.exit(403)\nngx.ctx['after'] = True")  # asynchronous: the code after it runs
    assert (result.kind, result.outcome.exit_status, result.outcome.addr) == (None, 403, None)
    assert result.ctx == {"after": True}
    result = run("ngx.exit(ngx.OK)\nbalancer.set_current_peer('127.0.0.1:1')")
    assert (result.kind, result.outcome.exit_status) == (None, None)
    for status in ("ngx.ERROR", "ngx.DECLINED", "200", "1000"):
        result = run(f"balancer.set_current_peer('127.0.0.1:1')\nngx.exit({status})")
        assert result.kind == "exit_error", status
        assert (result.outcome.addr, result.outcome.exit_status) == (None, None)
    assert value("ngx.exit(ngx.AGAIN)") == (
        "ValueError", "bad argument to 'ngx.exit': does not accept NGX_AGAIN or NGX_DONE")
    assert value("ngx.exit(ngx.DONE)") == (
        "ValueError", "bad argument to 'ngx.exit': does not accept NGX_AGAIN or NGX_DONE")
    assert value("ngx.exit('403')") == ("TypeError", "bad argument #1 to 'exit' (number expected, got str)")


def test_ngx_helpers() -> None:
    got = value("[ngx.crc32_short('/a/b'), ngx.crc32_long('/a/b'), ngx.md5('abc'), ngx.md5_bin('abc'), "
                "ngx.crc32_short(b'\\xff'), ngx.get_phase(), ngx.worker.id(), ngx.worker.count()]")
    assert value("ngx.worker.pid()") == os.getpid()
    assert got == [zlib.crc32(b"/a/b"), zlib.crc32(b"/a/b"), hashlib.md5(b"abc").hexdigest(),
                   hashlib.md5(b"abc").digest(), zlib.crc32(b"\xff"), "balancer", 0, 1]
    assert value("ngx.crc32_short(1)") == (
        "TypeError", "bad argument #1 to 'crc32_short' (string expected, got int)")
    now, seconds = value("(ngx.now(), ngx.time())")
    assert isinstance(now, float) and isinstance(seconds, int) and abs(now - seconds) < 2


def test_ngx_req() -> None:
    got = value("(ngx.req.get_headers(), ngx.req.get_headers(raw=True), ngx.req.get_method(), "
                "ngx.req.get_uri_args())", uri="/x?a=1&b&a=2&c=", headers={"X-A": "1", "Host": "h"})
    assert got == ({"x-a": "1", "host": "h"}, {"X-A": "1", "Host": "h"}, "GET",
                   {"a": ["1", "2"], "b": True, "c": ""})
    repeated = run("ngx.ctx['h'] = ngx.req.get_headers(1)\nbalancer.set_current_peer('127.0.0.1:1')",
                   headers={"A": "1", "B": "2"})
    assert repeated.ctx["h"] == {"a": "1"}


def test_ngx_balancer_is_the_same_api_and_importable() -> None:
    result = run("""
        from ngx import balancer as b
        import ngx.balancer
        ngx.balancer.set_current_peer("127.0.0.1:7")
        ngx.ctx["same"] = b.get_last_failure() == balancer.get_last_failure()
    """)
    assert result.outcome.addr == PeerAddr("127.0.0.1", 7)
    assert result.ctx == {"same": True}


# --------------------------------------------------------------------------- upstream


def test_upstream_peers() -> None:
    result = run("""
        ngx.ctx["primary"] = upstream.get_primary_peers()
        ngx.ctx["backup"] = upstream.get_backup_peers()
        ngx.ctx["name"] = upstream.current_upstream_name()
        balancer.set_current_peer(ngx.ctx["primary"][1]["name"])
    """)
    primary = result.ctx["primary"]
    assert [p["name"] for p in primary] == ["127.0.0.1:9001", "127.0.0.1:9002"]
    assert primary[0] == {"id": 0, "name": "127.0.0.1:9001", "weight": 1, "backup": False, "down": False,
                          "fails": 0, "max_fails": 1, "fail_timeout": 10.0, "current_weight": 0,
                          "effective_weight": 1, "conns": 0, "max_conns": 0,
                          # no live statistics in this runtime: the fields are there, as None
                          "requests": None, "failures": None, "active": None, "last_status": None,
                          "last_failure_time": None, "ewma": None, "peak_ewma": None,
                          "ewma_time": None, "weight_override": None,
                          # active health checks (none here): healthy, state from down/unhealthy
                          "healthy": True, "state": "up"}
    assert result.ctx["backup"] == []
    assert result.ctx["name"] == "backend"
    assert result.outcome.addr == PeerAddr("127.0.0.1", 9002)


def test_upstream_set_peer_down() -> None:
    result = run("""
        ngx.ctx["down"] = upstream.set_peer_down(False, 1, True)
        ngx.ctx["bad"] = upstream.set_peer_down(False, 5, True)
        ngx.ctx["nobackup"] = upstream.set_peer_down(True, 0, True)
        balancer.set_current_peer("127.0.0.1:1")
    """)
    assert result.ctx == {"down": (True, None), "bad": (None, "bad peer id"),
                          "nobackup": (None, "bad peer id")}
    peers = result.upstream.peers.primary
    assert (peers[0].down, peers[1].down) == (False, True)


def test_set_peer_down_false_resets_fails() -> None:
    from hook_helpers import exchange, runner

    hook = runner("upstream.set_peer_down(False, 0, False)\nbalancer.set_current_peer('127.0.0.1:1')")
    peer = hook.upstream.peers.primary[0]
    peer.down, peer.fails = True, 4
    hook.run(exchange(), hook.upstream)
    assert (peer.down, peer.fails) == (False, 0)


def test_api_outside_a_run() -> None:
    from scriptlb.hookrt import api

    with pytest.raises(RuntimeError, match="no request found"):
        api.balancer.set_current_peer("127.0.0.1:1")
    with pytest.raises(RuntimeError, match="no request found"):
        _ = api.ngx.ctx


def test_ngx_shared(tmp_path: Path) -> None:
    from scriptlb.hookrt import api
    from scriptlb.state.shared_dict import SharedDict

    counters = SharedDict(str(tmp_path), "counters", 1 << 20)
    api.set_shared_dicts({"counters": counters})
    try:
        code = """
            d = ngx.shared.counters
            ngx.ctx["n"] = [d.incr("hits", 1, 0)[0], ngx.shared["counters"].incr("hits", 1)[0]]
            ngx.ctx["missing"] = ngx.shared.nope
            d.set("last", ngx.var.uri)
            balancer.set_current_peer("127.0.0.1:1")
        """
        result = run(code, uri="/seen")
        assert result.ctx == {"n": [1, 2], "missing": None}
        assert counters.get("last") == ("/seen", None)
        closed = run("ngx.shared.counters.close()")
        assert "no attribute 'close' visible to hooks" in closed.outcome.message
    finally:
        api.set_shared_dicts({})
        counters.close()


def test_caches_keep_no_hook_made_junk() -> None:
    from scriptlb.hookrt import api

    peers, getters = len(api._PEER_CACHE), len(api._GETTERS)
    result = run("""
        for i in range(50):
            balancer.set_current_peer("x" * 1000 + str(i))
            v = ngx.var["http_" + "y" * 1000 + str(i)]
        balancer.set_current_peer("127.0.0.1:1")
    """)
    assert result.kind is None
    assert len(api._GETTERS) == getters
    assert len(api._PEER_CACHE) <= peers + 1
