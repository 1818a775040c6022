"""Every hook of hooks/ tested with the hook authors' kit (``scriptlb.testing``: the
``hook_file``/``hook_conf`` fixtures of its pytest plugin), as docs/hooks.md shows; and the
kit itself: outcomes, injected failures, shared dicts, virtual time, the plugin's entry point."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT

HOOKS = ROOT / "hooks"
CONF = ROOT / "conf" / "hooks"
PEERS = ["127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003"]
RETRYING = "proxy_next_upstream error timeout http_502;"
# Hooks building a ring on their first run in a worker get a roomier budget than the default
# 10 ms (on a loaded machine the build can be preempted past it, and the run falls back).
RING_BUDGET_MS = 500
# The budget of every other kit here: it is wall-clock time, and a loaded machine can stall a
# run past the product's 10 ms, turning what a test checks into a "timeout" fallback. A test
# about the budget passes its own.
BUDGET_MS = 1000


@pytest.fixture
def hook_file(hook_file: Callable[..., Any]) -> Callable[..., Any]:
    """The plugin's ``hook_file``, with ``BUDGET_MS`` unless the test says otherwise."""

    def make(path: Any, **options: Any) -> Any:
        options.setdefault("timeout_ms", BUDGET_MS)
        return hook_file(path, **options)

    return make


def warmed(kit, **request):
    """The kit, after a first run built the hook's per-worker state (a ring) within its budget:
    under load that first run may be stopped at the budget, and a later one builds it."""
    for _ in range(5):
        if kit.run(**request).outcome == "ok":
            break
    return kit


# --------------------------------------------------------------------------- the hooks of hooks/


def test_hash_by_uri_same_uri_same_peer_and_spread(hook_file) -> None:
    kit = hook_file(HOOKS / "hash_by_uri.py", peers=PEERS)
    assert kit.run(uri="/a").peer == kit.run(uri="/a?x=1").peer  # the URI, not the args
    chosen = Counter(kit.run(uri=f"/item/{i}").peer for i in range(300))
    assert set(chosen) == set(PEERS) and min(chosen.values()) > 60


def test_consistent_hash_moves_few_uris_when_a_peer_goes(hook_file) -> None:
    lib = str(HOOKS / "lib" / "?.py")
    before = hook_file(HOOKS / "consistent_hash.py", peers=PEERS, package_path=lib, timeout_ms=RING_BUDGET_MS)
    first = {i: before.run(uri=f"/u/{i}").peer for i in range(300)}
    after = hook_file(
        HOOKS / "consistent_hash.py", peers=PEERS[:2], package_path=lib, timeout_ms=RING_BUDGET_MS
    )
    moved = [i for i in range(300) if first[i] != PEERS[2] and after.run(uri=f"/u/{i}").peer != first[i]]
    assert not moved  # only the removed peer's URIs move


def test_chash_by_header_sticks_per_user_and_moves_on_after_a_failure(hook_conf) -> None:
    kit = warmed(hook_conf(CONF / "chash_by_header.conf", prefix=str(ROOT)), uri="/")
    user = {"X-User-Id": "42"}
    peer = kit.run(uri="/a", headers=user).peer
    assert kit.run(uri="/other", headers=user).peer == peer
    walk = kit.request(uri="/a", headers=user, fail=[502])
    assert walk.status == 200 and walk.peers[0] == peer and walk.peers[1] not in (peer, None)
    assert [t.chosen_by for t in walk.tries] == ["hook", "hook"]
    assert any("next on the ring" in line for line in walk.logs)


def test_sticky_cookie_follows_the_route_cookie(hook_conf) -> None:
    kit = warmed(hook_conf(CONF / "sticky_cookie.conf", prefix=str(ROOT)), uri="/")
    by_ip = kit.run(uri="/", remote_addr="10.1.2.3")
    assert by_ip.outcome == "ok" and by_ip.peer in PEERS
    walk = kit.request(uri="/", remote_addr="10.1.2.3", fail=[502])
    assert walk.status == 200 and len(set(walk.peers)) == 2  # the failed sticky peer is left


def test_sticky_keeps_a_session_and_leaves_a_failed_peer(hook_file) -> None:
    kit = hook_file(HOOKS / "sticky.py", peers=PEERS, proxy=RETRYING)
    session = {"X-Session": "s-1"}
    peer = kit.run(headers=session).peer
    assert all(kit.run(uri=f"/{i}", headers=session).peer == peer for i in range(5))
    walk = kit.request(headers=session, fail=[502, 502])
    assert walk.status == 200 and len(set(walk.peers)) == 3 and walk.peers[0] == peer


def test_canary_sends_about_ten_percent_and_obeys_the_header(hook_file) -> None:
    kit = hook_file(HOOKS / "canary.py", peers=PEERS)
    canary = PEERS[-1]
    share = sum(kit.run(headers={"X-User": f"u{i}"}).peer == canary for i in range(1000)) / 1000
    assert 0.05 < share < 0.15
    assert kit.run(headers={"X-Canary": "always"}).peer == canary
    never = kit.run(headers={"X-Canary": "never", "X-User": "u1"})
    assert never.peer != canary and never.ctx == {"canary": False}


def test_deny_answers_403_without_a_peer(hook_file) -> None:
    kit = hook_file(HOOKS / "deny.py", peers=PEERS)
    denied = kit.run(uri="/admin/users")
    assert (denied.outcome, denied.exit_status, denied.peer) == ("exit", 403, None)
    assert any("denied /admin/users" in line for line in denied.logs)
    assert kit.run(uri="/public", headers={"X-Blocked-Token": "1"}).exit_status == 403
    assert kit.run(uri="/public").peer in PEERS
    walk = kit.request(uri="/admin")
    assert (walk.status, walk.peers, walk.tries[0].chosen_by) == (403, [None], "hook(exit)")


def test_per_path_timeouts(hook_file) -> None:
    kit = hook_file(HOOKS / "per_path_timeouts.py", peers=PEERS)
    assert kit.run(uri="/reports/q1").timeouts == {"connect": 1.0, "send": 5.0, "read": 30.0}
    assert kit.run(uri="/api/x").timeouts == {"connect": 0.5, "send": 1.0, "read": 2.0}
    assert kit.run(uri="/").timeouts == {"connect": 60.0, "send": 60.0, "read": 60.0}


def test_retry_other_peer_walks_every_peer_once(hook_file) -> None:
    kit = hook_file(HOOKS / "retry_other_peer.py", peers=PEERS, proxy=RETRYING)
    first = kit.run(uri="/a")
    assert first.more_tries == 1 and first.ctx["tried"] == [PEERS.index(first.peer)]
    walk = kit.request(uri="/a", fail=[502, "timeout", "error"])
    # three peers' tries plus the hook's grants: after every peer failed, the first again
    assert sorted(walk.peers[:3]) == PEERS and walk.peers[3] == walk.peers[0]
    assert [t.status for t in walk.tries] == [502, 504, 502, 200] and walk.status == 200
    assert len([line for line in walk.logs if "trying the next peer" in line]) == 3
    capped = kit.request(uri="/a", fail=[502, 502], tries_cap=2)  # proxy_next_upstream_tries 2
    assert (len(capped.tries), capped.status) == (2, 502)


def test_rate_aware_spreads_then_refuses_over_the_limit(hook_file, tmp_path: Path) -> None:
    hook = tmp_path / "rate_aware.py"
    hook.write_text((HOOKS / "rate_aware.py").read_text().replace("LIMIT = 50", "LIMIT = 2"))
    kit = hook_file(hook, peers=PEERS, shared_dicts={"rate": "1m"})
    chosen = [kit.run().peer for _ in range(6)]
    assert Counter(chosen) == {p: 2 for p in PEERS}
    full = kit.run()
    assert (full.outcome, full.exit_status) == ("exit", 503)
    assert kit.shared["rate"].get(PEERS[0] + "@" + str(int(kit.now)))[0] == 2
    kit.advance(1.0)  # a new second: new counters
    assert kit.run().outcome == "ok"


def test_rate_aware_without_its_zone_falls_back(hook_file) -> None:
    result = hook_file(HOOKS / "rate_aware.py", peers=PEERS).run()
    assert (result.outcome, result.peer, result.fallback) == ("ok", None, "no_peer")
    assert any("no python_shared_dict rate" in line for line in result.logs)


def test_fastest_first_turns_latencies_into_weights(hook_file) -> None:
    kit = hook_file(
        HOOKS / "fastest_first.py",
        phase="log",
        peers=PEERS,
        server_args=" max_fails=0",
        shared_dicts={"fastest_first": "1m"},
    )
    for peer, latency in zip(PEERS, (0.010, 0.020, 0.100), strict=True):
        kit.record(peer, latency=latency)
    assert (
        kit.log(upstream_addr=PEERS[0], upstream_status="200", upstream_response_time="0.010").outcome == "ok"
    )
    assert [kit.peer(p).weight for p in PEERS] == [10, 5, 1]
    kit.record(PEERS[0], status=502, latency=None, failed=True)  # the fast one fails
    kit.advance(0.2)  # past the hook's evaluation period
    kit.log(upstream_addr=PEERS[0], upstream_status="502")
    assert kit.peer(PEERS[0]).weight == 1
    kit.advance(11)  # fail_timeout (10s) later it is fast again
    kit.log(upstream_addr=PEERS[1])
    assert kit.peer(PEERS[0]).weight == 10


def test_fastest_first_treats_sub_millisecond_peers_as_equally_fast(hook_file) -> None:
    """Below the resolution of $upstream_response_time (1 ms) a difference is noise: averages of
    0 and 0.9 ms give the same weight (not 10 against 1), and 2 ms is half as fast as 1 ms."""
    kit = hook_file(HOOKS / "fastest_first.py", phase="log", peers=PEERS, server_args=" max_fails=0",
                    shared_dicts={"fastest_first": "1m"})
    for peer, latency in zip(PEERS, (0.0, 0.0009, 0.002), strict=True):
        kit.record(peer, latency=latency)
    outcome = kit.log(upstream_addr=PEERS[0], upstream_status="200", upstream_response_time="0.000").outcome
    assert outcome == "ok"
    assert [kit.peer(p).weight for p in PEERS] == [10, 10, 5]


# --------------------------------------------------------------------------- the kit itself


def test_outcomes_of_broken_hooks(hook_file, tmp_path: Path) -> None:
    cases = {"x = (\n": "compile_error", "1 / 0\n": "runtime_error", "while True:\n    pass\n": "timeout"}
    for text, outcome in cases.items():
        hook = tmp_path / f"{outcome}.py"
        hook.write_text(text)
        result = hook_file(hook, timeout_ms=10).run()
        assert (result.outcome, result.peer, result.fallback) == (outcome, None, outcome)
        assert result.logs and result.logs[0].startswith("[error]")


def test_a_failing_hook_falls_back_to_the_method_in_a_walk(hook_file, tmp_path: Path) -> None:
    hook = tmp_path / "broken.py"
    hook.write_text("1 / 0\n")
    walk = hook_file(hook, peers=PEERS, method="least_conn;").request()
    assert walk.status == 200 and walk.peers[0] in PEERS
    assert walk.tries[0].chosen_by == "fallback(runtime_error): least_conn"


def test_max_fails_in_a_walk(hook_file, tmp_path: Path) -> None:
    hook = tmp_path / "none.py"
    hook.write_text("x = 1\n")  # sets no peer: round robin chooses
    kit = hook_file(hook, peers=PEERS[:2], server_args=" max_fails=1 fail_timeout=10s")
    walk = kit.request(fail=["error"])
    assert walk.status == 200 and walk.peers == PEERS[:2]
    assert kit.peer(PEERS[0]).fails == 1
    assert [kit.request().peers for _ in range(2)] == [[PEERS[1]], [PEERS[1]]]  # 9001 rests
    kit.advance(11)  # fail_timeout over: it is chosen again (its weight climbs back first)
    assert {kit.request().peers[0] for _ in range(4)} == set(PEERS[:2])


def test_a_config_block_hook(hook_conf, tmp_path: Path) -> None:
    conf = tmp_path / "block.conf"
    conf.write_text("""
events {}
http {
    upstream a { server 127.0.0.1:1; }
    upstream b {
        server 127.0.0.1:7001;
        server 127.0.0.1:7002;
        balancer_by_python_block {
            balancer.set_current_peer(upstream.get_primary_peers()[1]["name"])
            ngx.log(ngx.INFO, "remote ", ngx.var.remote_addr)
        }
    }
    server { listen 127.0.0.1:1; location / { proxy_pass http://b; } }
}
""")
    result = hook_conf(conf, upstream="b").run(remote_addr="10.0.0.9")
    assert (result.outcome, result.peer) == ("ok", "127.0.0.1:7002")
    assert result.logs == [f"[info] [python] balancer_by_python({conf}:8):10: remote 10.0.0.9"]


@pytest.mark.integration  # real processes
def test_plugin_is_registered_by_entry_point(tmp_path: Path) -> None:
    """A project of its own (no conftest of ours) gets the fixtures from the installed package."""
    (tmp_path / "hook.py").write_text('balancer.set_current_peer("127.0.0.1:9002")\n')
    (tmp_path / "test_mine.py").write_text(
        "def test_mine(hook_file):\n    assert hook_file('hook.py').run().peer == '127.0.0.1:9002'\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_mine.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout


def test_bad_failure_is_refused(hook_file) -> None:
    with pytest.raises(ValueError, match="a failure is a status"):
        hook_file(HOOKS / "hash_by_uri.py").request(fail=["oops"])
