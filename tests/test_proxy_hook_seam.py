"""The hook seam of the tries loop, with a stand-in HookRunner plugged into the runtime upstream
(the real one, scriptlb.hookrt.hooks, is tested by its own suite): before every try the hook may name
the peer, add tries, end the request with a status, and change this request's timeouts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from helpers import Backends, Scriptlb, closed_port, echo, get, hang, in_loop, respond

from scriptlb.config.model import PeerAddr

CONF = """
daemon off;
master_process off;
error_log {tmp}/error.log info;
http {
    log_format trail '$upstream_addr|$upstream_status|$status';
    upstream u {
        server {placeholder};
    }
    server {
        listen 127.0.0.1:{port0};
        access_log {tmp}/access.log trail;
        location / {
            proxy_pass http://u;
            proxy_next_upstream error timeout http_502;
        }
        location /ka/ {
            proxy_pass http://u;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Try $upstream_addr;
        }
    }
}
"""


@dataclass
class Outcome:
    addr: PeerAddr | None = None
    host: str | None = None
    more_tries: int = 0
    exit_status: int | None = None
    keepalive: tuple[float, int] | None = None  # enable_keepalive(idle_timeout, max_requests)
    local_addr: str | None = None  # bind_to_local_addr
    recreate: bool = False  # recreate_request


class FakeHook:
    """Calls ``decide(exchange, run_number)`` before every try and records what it saw."""

    def __init__(self, decide: Callable[[Any, int], Outcome]) -> None:
        self.decide = decide
        self.seen: list[tuple[int, tuple[str, int] | None]] = []  # (tries_left, last_failure)

    def run(self, exchange: Any, upstream: Any) -> Outcome:
        self.seen.append((exchange.tries_left, exchange.last_failure))
        return self.decide(exchange, len(self.seen))


def peer(port: int) -> PeerAddr:
    return PeerAddr("127.0.0.1", port)


def start(tmp_path: Path, placeholder: str, hook: FakeHook) -> Scriptlb:
    lb = Scriptlb(CONF, tmp_path, tmp=tmp_path, placeholder=placeholder)
    lb.__enter__()
    upstream = lb.runtime().upstreams["u"]
    in_loop(lb.thread.loop, lambda: setattr(upstream, "hook", hook))
    return lb


def trail(tmp_path: Path) -> list[str]:
    return (tmp_path / "access.log").read_text().splitlines()


def test_hook_names_the_peer_and_grants_a_retry(tmp_path: Path) -> None:
    dead = closed_port()
    with Backends(respond(body=b"good")) as bk:

        def decide(exchange: Any, run: int) -> Outcome:
            if run == 1:
                return Outcome(addr=peer(dead), more_tries=1)
            return Outcome(addr=peer(bk[0].port))

        hook = FakeHook(decide)
        lb = start(tmp_path, f"127.0.0.1:{closed_port()}", hook)
        try:
            response = get(lb.port, "/")
        finally:
            lb.__exit__()
    assert response.body == b"good"
    assert trail(tmp_path) == [f"127.0.0.1:{dead}, {bk[0].addr}|502, 200|200"]
    # a single placeholder server: budget 1, plus the granted try; the retry saw the failure
    assert hook.seen == [(1, None), (1, ("failed", 502))]


def test_without_more_tries_a_failed_hook_peer_is_final(tmp_path: Path) -> None:
    dead = closed_port()
    hook = FakeHook(lambda exchange, run: Outcome(addr=peer(dead)))
    lb = start(tmp_path, f"127.0.0.1:{closed_port()}", hook)
    try:
        assert get(lb.port, "/").status == 502
    finally:
        lb.__exit__()
    assert trail(tmp_path) == [f"127.0.0.1:{dead}|502|502"]
    assert len(hook.seen) == 1


def test_hook_exit_status_ends_the_request_without_a_peer(tmp_path: Path) -> None:
    with Backends(respond()) as bk:
        hook = FakeHook(lambda exchange, run: Outcome(exit_status=403))
        lb = start(tmp_path, bk[0].addr, hook)
        try:
            response = get(lb.port, "/")
        finally:
            lb.__exit__()
    assert response.status == 403 and b"403 Forbidden" in response.body
    assert bk[0].connections == 0


def test_no_peer_from_the_hook_falls_back_to_the_balancer(tmp_path: Path) -> None:
    with Backends(respond(body=b"fallback")) as bk:
        hook = FakeHook(lambda exchange, run: Outcome())
        lb = start(tmp_path, bk[0].addr, hook)
        try:
            assert get(lb.port, "/").body == b"fallback"
        finally:
            lb.__exit__()
    assert trail(tmp_path) == [f"{bk[0].addr}|200|200"]


def test_hook_timeouts_apply_to_this_request_only(tmp_path: Path) -> None:
    with Backends(hang()) as bk:

        def decide(exchange: Any, run: int) -> Outcome:
            if exchange.header("x-short") is not None:
                exchange.read_timeout = 0.1  # balancer.set_timeouts(nil, nil, 0.1)
            return Outcome(addr=peer(bk[0].port))

        lb = start(tmp_path, bk[0].addr, FakeHook(decide))
        try:
            assert get(lb.port, "/", headers={"X-Short": "1"}).status == 504
            conf_timeout = lb.runtime().servers  # the location's own value is untouched
            assert all(
                loc.conf.proxy.read_timeout == 60.0
                for server in conf_timeout.values()
                for loc in server._by_id.values()
                if loc.upstream is not None
            )
        finally:
            lb.__exit__()


def test_enable_keepalive_pools_hook_peers_and_bind_address_is_used(tmp_path: Path) -> None:
    with Backends(echo()) as bk:
        keepalive = FakeHook(lambda exchange, run: Outcome(
            addr=peer(bk[0].port), keepalive=(60.0, 100), local_addr="127.0.0.1"))
        lb = start(tmp_path, bk[0].addr, keepalive)
        try:
            for _ in range(3):
                assert get(lb.port, "/ka/x").status == 200
            plain = FakeHook(lambda exchange, run: Outcome(addr=peer(bk[0].port)))
            upstream = lb.runtime().upstreams["u"]
            in_loop(lb.thread.loop, lambda: setattr(upstream, "hook", plain))
            for _ in range(2):
                assert get(lb.port, "/ka/x").status == 200
        finally:
            lb.__exit__()
    # one pooled connection for the three enable_keepalive tries, then one per plain try
    assert bk[0].connections == 3


def test_recreate_request_rebuilds_the_head(tmp_path: Path) -> None:
    with Backends(echo()) as bk:
        dead = closed_port()  # chosen while the backend listens: the OS cannot hand it that port

        def decide(exchange: Any, run: int) -> Outcome:
            if run == 1:
                return Outcome(addr=peer(dead), more_tries=1)
            # the head was built before the first try, when $upstream_addr was empty (so the
            # X-Try header was left out); rebuilt now, it names the failed first try
            return Outcome(addr=peer(bk[0].port), recreate=exchange.header("x-recreate") is not None)

        lb = start(tmp_path, bk[0].addr, FakeHook(decide))
        try:
            rebuilt = get(lb.port, "/ka/x", headers={"X-Recreate": "1"}).body.decode()
            kept = get(lb.port, "/ka/x").body.decode()
        finally:
            lb.__exit__()
    assert f"X-Try: 127.0.0.1:{dead}\n" in rebuilt
    assert "X-Try" not in kept


REAL_HOOK = """
daemon off;
master_process off;
error_log {tmp}/error.log info;
http {
    log_format trail '$upstream_addr|$upstream_status|$status';
    upstream u {
        server 0.0.0.1;
        balancer_by_python_block {
            state, status = balancer.get_last_failure()
            if state is None:
                balancer.set_current_peer("127.0.0.1", {dead})
                balancer.set_more_tries(1)
            else:
                balancer.set_current_peer("127.0.0.1", {good})
        }
    }
    server {
        listen 127.0.0.1:{port0};
        access_log {tmp}/access.log trail;
        location / {
            proxy_pass http://u;
        }
    }
}
"""


def test_real_balancer_by_python_hook_drives_the_tries(tmp_path: Path) -> None:
    dead = closed_port()
    with (
        Backends(respond(body=b"from hook peer")) as bk,
        Scriptlb(REAL_HOOK, tmp_path, tmp=tmp_path, dead=dead, good=bk[0].port) as lb,
    ):
        response = get(lb.port, "/")
    assert response.body == b"from hook peer"
    assert trail(tmp_path) == [f"127.0.0.1:{dead}, {bk[0].addr}|502, 200|200"]
