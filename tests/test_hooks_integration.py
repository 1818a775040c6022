"""The example hooks (hooks/*.py) and the fallback cases through real sockets: a scriptlb worker,
asyncio backends, and the per-try trail ($upstream_addr / $upstream_status) from the access log."""

from __future__ import annotations

import time
import zlib
from pathlib import Path

import pytest
from conftest import LOOP_KINDS
from helpers import Backends, Scriptlb, closed_port, get, hang, respond

from scriptlb.config.model import HookConf, PeerAddr, PythonConf, Source
from scriptlb.hookrt.hooks import HookRunner
from scriptlb.replay.synthetic import SyntheticExchange, SyntheticUpstream

ROOT = Path(__file__).resolve().parent.parent


def conf(servers: str, hook: str, location: str = "", upstream_extra: str = "", http_extra: str = "") -> str:
    return f"""
daemon off;
master_process off;
error_log {{tmp}}/error.log info;
http {{
    {http_extra}
    log_format trail '$upstream_addr|$upstream_status|$status|$request';
    upstream u {{
        {servers}
        {hook}
        {upstream_extra}
    }}
    server {{
        listen 127.0.0.1:{{port0}};
        access_log {{tmp}}/access.log trail;
        location / {{
            proxy_pass http://u;
            {location}
        }}
    }}
}}
"""


def install(tmp_path: Path, name: str, **replace: str) -> None:
    """Copy hooks/NAME.py under the test prefix, with text replacements (peer addresses)."""
    text = (ROOT / "hooks" / f"{name}.py").read_text()
    for old, new in replace.items():
        text = text.replace(old, new)
    (tmp_path / "hooks").mkdir(exist_ok=True)
    (tmp_path / "hooks" / f"{name}.py").write_text(text)


def start(text: str, tmp_path: Path) -> Scriptlb:
    return Scriptlb(text, tmp_path, tmp=tmp_path)


def trail(tmp_path: Path) -> list[tuple[str, str, str, str]]:
    """(upstream_addr, upstream_status, status, request) per logged request, in order."""
    lines = (tmp_path / "access.log").read_text().splitlines()
    return [tuple(line.split("|")) for line in lines]  # type: ignore[misc]


def error_log(tmp_path: Path) -> str:
    return (tmp_path / "error.log").read_text()


def servers(backends: Backends) -> str:
    return " ".join(f"server {b.addr};" for b in backends)


# --------------------------------------------------------------------------- examples


def test_hash_by_uri(tmp_path: Path) -> None:
    install(tmp_path, "hash_by_uri")
    with Backends(respond(body=b"0"), respond(body=b"1"), respond(body=b"2")) as bk, start(
            conf(servers(bk), "balancer_by_python_file hooks/hash_by_uri.py;"), tmp_path) as lb:
        bodies = {uri: {get(lb.port, uri).body for _ in range(3)} for uri in ("/a", "/b", "/c", "/d")}
    for uri, seen in bodies.items():
        assert seen == {str(zlib.crc32(uri.encode()) % 3).encode()}, uri
    assert [t[1] for t in trail(tmp_path)] == ["200"] * 12


def test_sticky_by_cookie_and_header_then_moves_on_failure(tmp_path: Path) -> None:
    install(tmp_path, "sticky")
    with Backends(respond(body=b"0"), respond(body=b"1"), respond(body=b"2")) as bk, start(
            conf(servers(bk), "balancer_by_python_file hooks/sticky.py;",
                 "proxy_next_upstream error timeout http_502;"), tmp_path) as lb:
        by_cookie = {get(lb.port, f"/{i}", {"Cookie": "route=user-7"}).body for i in range(4)}
        by_header = {get(lb.port, f"/{i}", {"X-Session": "s-9"}).body for i in range(4)}
        home = zlib.crc32(b"user-7") % 3
        bk[home].behaviour = respond(502)
        moved = get(lb.port, "/x", {"Cookie": "route=user-7"})
    assert by_cookie == {str(home).encode()}
    assert by_header == {str(zlib.crc32(b"s-9") % 3).encode()}
    assert moved.status == 200
    first_other = next(i for i in range(3) if i != home)
    assert moved.body == str(first_other).encode()
    assert trail(tmp_path)[-1][:3] == (f"{bk[home].addr}, {bk[first_other].addr}", "502, 200", "200")
    assert "sticky peer failed (failed 502), moving to" in error_log(tmp_path)


def test_retry_other_peer_with_more_tries(tmp_path: Path) -> None:
    dead1, dead2 = closed_port(), closed_port()
    with Backends(respond(body=b"alive")) as bk:
        alive = bk[0].addr
        # the hook's own list: two dead peers first; the upstream has one placeholder server
        install(tmp_path, "retry_other_peer", **{
            '["127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003"]':
                f'["127.0.0.1:{dead1}", "127.0.0.1:{dead2}", "{alive}"]',
            "ngx.crc32_short(ngx.var.uri) % len(PEERS)": "0"})
        with start(conf(f"server 127.0.0.1:{dead1};", "balancer_by_python_file hooks/retry_other_peer.py;",
                        "proxy_next_upstream error timeout http_502;"), tmp_path) as lb:
            response = get(lb.port, "/r")
    assert (response.status, response.body) == (200, b"alive")
    tried = f"127.0.0.1:{dead1}, 127.0.0.1:{dead2}, {alive}"
    assert trail(tmp_path)[0][:3] == (tried, "502, 502, 200", "200")
    log = error_log(tmp_path)
    assert f"127.0.0.1:{dead1} failed (failed 502), trying the next peer" in log
    assert f"127.0.0.1:{dead2} failed (failed 502), trying the next peer" in log


def test_without_more_tries_a_single_placeholder_is_not_retried(tmp_path: Path) -> None:
    dead = closed_port()
    with Backends(respond()) as bk:
        install(tmp_path, "retry_other_peer", **{
            '["127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003"]':
                f'["127.0.0.1:{dead}", "{bk[0].addr}"]',
            "ngx.crc32_short(ngx.var.uri) % len(PEERS)": "0",
            "balancer.set_more_tries(1)": "pass"})
        with start(conf(f"server 127.0.0.1:{dead};", "balancer_by_python_file hooks/retry_other_peer.py;"),
                   tmp_path) as lb:
            assert get(lb.port, "/").status == 502
    assert trail(tmp_path)[0][:3] == (f"127.0.0.1:{dead}", "502", "502")


def test_per_path_timeouts(tmp_path: Path) -> None:
    install(tmp_path, "per_path_timeouts",
            **{"balancer.set_timeouts(0.5, 1, 2)": "balancer.set_timeouts(0.5, 1, 0.2)"})
    with Backends(hang()) as bk, start(
            conf(servers(bk), "balancer_by_python_file hooks/per_path_timeouts.py;",
                 "proxy_read_timeout 30s;"), tmp_path) as lb:
        started = time.monotonic()
        assert get(lb.port, "/api/x").status == 504
        elapsed = time.monotonic() - started
    assert 0.15 < elapsed < 5  # the hook's 200 ms read timeout, not the location's 30 s
    assert trail(tmp_path)[0][:3] == (bk[0].addr, "504", "504")


def test_canary_by_header(tmp_path: Path) -> None:
    install(tmp_path, "canary")
    with Backends(respond(body=b"stable-0"), respond(body=b"stable-1"), respond(body=b"canary")) as bk, start(
            conf(servers(bk), "balancer_by_python_file hooks/canary.py;"), tmp_path) as lb:
        forced = {get(lb.port, "/", {"X-Canary": "always", "X-User": str(i)}).body for i in range(5)}
        never = {get(lb.port, "/", {"X-Canary": "never", "X-User": str(i)}).body for i in range(20)}
        users = [get(lb.port, "/", {"X-User": f"user-{i}"}).body for i in range(100)]
    assert forced == {b"canary"}
    assert b"canary" not in never
    expected = [zlib.crc32(f"user-{i}".encode()) % 100 < 10 for i in range(100)]
    assert [body == b"canary" for body in users] == expected
    assert 3 <= sum(expected) <= 20  # about 10% of users


def test_deny_with_exit_403(tmp_path: Path) -> None:
    install(tmp_path, "deny")
    with Backends(respond()) as bk, start(conf(servers(bk), "balancer_by_python_file hooks/deny.py;"),
                                          tmp_path) as lb:
        denied = get(lb.port, "/admin/users")
        allowed = get(lb.port, "/public")
        token = get(lb.port, "/public", {"X-Blocked-Token": "1"})
    assert (denied.status, allowed.status, token.status) == (403, 200, 403)
    assert len(bk[0].requests) == 1  # the denied requests never reached the backend
    assert "denied /admin/users" in error_log(tmp_path)


# --------------------------------------------------------------------------- fallback cases


@pytest.mark.parametrize(("body", "log_text"), [
    ("1 / 0", "failed to run balancer_by_python: "),
    ("while True:\n            pass", "balancer_by_python timed out after 10ms at "),
    ("x = 1", "python balancer: no peer set, falling back"),
    ("ngx.exit(200)", "ngx.exit(200) in a balancer hook, falling back"),
])
def test_broken_hooks_fall_back_to_round_robin(tmp_path: Path, body: str, log_text: str) -> None:
    # the timeout at nginx's default budget, said explicitly: the log line names it; the other
    # hooks get a roomy one, or a loaded machine's preemption would make them time out instead
    budget = "10ms" if "while True" in body else "1s"
    hook = f"balancer_by_python_timeout {budget}; balancer_by_python_block {{\n        {body}\n    }}"
    with Backends(respond(body=b"a"), respond(body=b"b")) as bk, \
            start(conf(servers(bk), hook), tmp_path) as lb:
        got = [get(lb.port, "/").body for _ in range(4)]
    assert got == [b"a", b"b", b"a", b"b"]  # plain round robin, no 500
    assert [t[2] for t in trail(tmp_path)] == ["200"] * 4
    assert log_text in error_log(tmp_path)


@pytest.mark.parametrize("loop_kind", LOOP_KINDS, indirect=True)  # (an integration test on both loops)
def test_hook_set_peer_and_more_tries_trail(tmp_path: Path) -> None:
    dead = closed_port()
    with Backends(respond(body=b"ok")) as bk:
        hook = f"""balancer_by_python_block {{
        state, status = balancer.get_last_failure()
        if state is None:
            balancer.set_current_peer("127.0.0.1:{dead}")
            balancer.set_more_tries(1)
        else:
            ngx.log(ngx.WARN, "last failure ", state, " ", status)
            balancer.set_current_peer("{bk[0].addr}")
    }}"""
        with Scriptlb(conf(f"server 127.0.0.1:{dead};", hook), tmp_path, tmp=tmp_path) as lb:
            assert get(lb.port, "/").body == b"ok"
    assert trail(tmp_path)[0][:3] == (f"127.0.0.1:{dead}, {bk[0].addr}", "502, 200", "200")
    assert "last failure failed 502" in error_log(tmp_path)


def test_method_declared_before_the_hook_is_the_fallback(tmp_path: Path) -> None:
    hook = "balancer_by_python_block {\n        x = 1\n    }"  # never sets a peer
    with Backends(respond(body=b"a"), respond(body=b"b"), respond(body=b"c")) as bk, \
            start(conf("hash $request_uri; " + servers(bk), hook), tmp_path) as lb:
        by_uri = {uri: {get(lb.port, uri).body for _ in range(4)} for uri in ("/1", "/2", "/3", "/4")}
    assert all(len(bodies) == 1 for bodies in by_uri.values())  # hash: one peer per URI, no rotation
    assert len(set().union(*by_uri.values())) > 1


def test_consistent_hash_with_a_package_module(tmp_path: Path) -> None:
    install(tmp_path, "consistent_hash")
    (tmp_path / "hooks" / "lib").mkdir()
    (tmp_path / "hooks" / "lib" / "ring.py").write_text((ROOT / "hooks" / "lib" / "ring.py").read_text())
    with Backends(respond(body=b"0"), respond(body=b"1"), respond(body=b"2")) as bk, start(
            conf(servers(bk), "balancer_by_python_file hooks/consistent_hash.py;",
                 http_extra='python_package_path "hooks/lib/?.py";'), tmp_path) as lb:
        by_uri = {f"/{i}": {get(lb.port, f"/{i}").body for _ in range(2)} for i in range(12)}
        # the same ring, computed outside the server for the same peers
        ports = [b.port for b in bk]
    up = SyntheticUpstream([PeerAddr("127.0.0.1", p) for p in ports])
    python = PythonConf(package_path=(str(tmp_path / "hooks" / "lib" / "?.py"),))
    hook = HookRunner(HookConf("file", str(tmp_path / "hooks" / "consistent_hash.py"), None,
                               Source("t.conf", 1)), up, python, log=lambda *_: None)
    expected = {uri: {str(ports.index(hook.run(SyntheticExchange("GET", uri, [], 3, None, 0), up).addr.port))
                      .encode()} for uri in by_uri}
    assert by_uri == expected
    assert [t[1] for t in trail(tmp_path)] == ["200"] * 24
