"""Active health checks (health_check + match): config, the match rules, and a real master with
two workers failing a peer over and back."""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from helpers import Backends, free_ports, load_conf, master_process, wait_for

from scriptlb.config import ConfigError
from scriptlb.ops.health import response_failure

INTERVAL, FAILS, PASSES = 0.3, 2, 2


# --------------------------------------------------------------------------- config and match


def test_health_check_config(tmp_path: Path) -> None:
    conf = load_conf("""
        http {
            match ok { status 200-299; status ! 204; header Content-Type ~ text; body !~ "maint"; }
            upstream u { zone u 64k; server 127.0.0.1:1 slow_start=5s; }
            server { listen 127.0.0.1:1;
                location / { proxy_pass http://u; proxy_connect_timeout 2s;
                             health_check interval=1s fails=3 passes=2 uri=/h match=ok mandatory; } }
        }""", tmp_path)
    assert conf.http is not None
    upstream = conf.http.upstreams["u"]
    (check,) = upstream.health_checks
    assert (check.interval, check.fails, check.passes, check.uri, check.mandatory) == (1.0, 3, 2, "/h", True)
    assert check.match is not None and check.match.statuses == ((False, 200, 299), (True, 204, 204))
    assert (check.host, check.connect_timeout) == ("u", 2.0)
    assert upstream.servers[0].slow_start == 5.0
    for bad, message in (
        ("health_check fails=0;", 'invalid parameter "fails=0"'),
        ("health_check match=nope;", 'match "nope" not found'),
        ("health_check persistent;", '"persistent" requires "mandatory"'),
    ):
        location = f"location / {{ proxy_pass http://u; {bad} }}"
        text = f"http {{ upstream u {{ server 127.0.0.1:1; }} server {{ {location} }} }}"
        with pytest.raises(ConfigError, match=message):
            load_conf(text, tmp_path)


def response(status: int, headers: dict[str, str] | None = None, body: bytes = b"") -> Any:
    return SimpleNamespace(status=status, headers=[(k.lower(), v) for k, v in (headers or {}).items()],
                           body=body)


def test_match_rules(tmp_path: Path) -> None:
    conf = load_conf("""
        http { match m { status 200-399; status ! 302; header X-State = ready; body ~ "^ok"; } }""", tmp_path)
    assert conf.http is not None
    match = conf.http.matches["m"]
    assert response_failure(response(200), None) is None
    assert response_failure(response(503), None) == "checking status code"
    assert response_failure(response(200, {"X-State": "ready"}, b"ok!"), match) is None
    assert response_failure(response(302, {"X-State": "ready"}, b"ok"), match) == "checking status code"
    assert response_failure(response(200, {"X-State": "busy"}, b"ok"), match) == "checking response"
    assert response_failure(response(200, {"X-State": "ready"}, b"no"), match) == "checking response"


# --------------------------------------------------------------------------- real processes


def health_backend(state: dict[str, int]) -> Any:
    """/health answers state["health"]; anything else 200 with the LB worker's pid."""

    async def behaviour(req: Any, writer: asyncio.StreamWriter) -> bool:
        if req.target == "/health":
            status, body = state["health"], b"health"
        else:
            status, body = 200, (req.header("X-Worker") or "").encode()
        writer.write(b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n%s" % (status, len(body), body))
        await writer.drain()
        return True

    return behaviour


def fetch(port: int, path: str = "/") -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def proxied(backend: Any) -> list[Any]:
    return [r for r in backend.requests if r.target != "/health"]


@pytest.mark.slow
def test_failing_peer_is_avoided_by_every_worker_and_comes_back(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    good, flaky = {"health": 200}, {"health": 200}
    with Backends(health_backend(good), health_backend(flaky)) as bk:
        conf = tmp_path / "conf" / "scriptlb.conf"
        conf.parent.mkdir()
        conf.write_text(textwrap.dedent(f"""\
            daemon off;
            worker_processes 2;
            error_log logs/error.log notice;
            events {{}}
            http {{
                upstream backend {{ zone backend 64k; server {bk[0].addr}; server {bk[1].addr}; }}
                server {{
                    listen 127.0.0.1:{port} reuseport;
                    location / {{
                        proxy_pass http://backend;
                        proxy_set_header X-Worker $pid;
                        proxy_connect_timeout 1s; proxy_read_timeout 1s;
                        health_check interval={int(INTERVAL * 1000)}ms fails={FAILS} passes={PASSES}
                                     uri=/health;
                    }}
                    location /api {{ api; }}
                }}
            }}
            """))
        with master_process(tmp_path, conf):
            wait_for(lambda: _ok(port), what="first answer")
            wait_for(lambda: _workers_used(port, bk[1]) == 2, what="both workers using the flaky peer")

            # one checker for the peer across both workers: at most one check per interval
            checks_before, started = _checks(bk[1]), time.monotonic()
            time.sleep(1.5)
            window = time.monotonic() - started
            assert _checks(bk[1]) - checks_before <= window / INTERVAL + 2

            flaky["health"] = 500
            failed_at = time.monotonic()
            time.sleep(INTERVAL * FAILS + 1.0)
            served = len(proxied(bk[1]))
            workers = {fetch(port)[1] for _ in range(20)}
            assert len(proxied(bk[1])) == served, "no worker chooses the unhealthy peer"
            assert len(workers) == 2, "both workers answered (from the healthy peer)"
            assert time.monotonic() - failed_at < 30
            peers = json.loads(fetch(port, "/api/9/http/upstreams/backend")[1])["peers"]
            assert [p["state"] for p in peers] == ["up", "unhealthy"]
            checks = peers[1]["health_checks"]
            assert checks["fails"] >= FAILS and checks["unhealthy"] == 1
            assert peers[1]["health_checks"]["last_passed"] is False
            assert peers[1]["downtime"] > 0 and peers[0]["downtime"] == 0  # milliseconds

            flaky["health"] = 200
            time.sleep(INTERVAL * PASSES + 1.0)
            deadline = time.monotonic() + 10
            while len(proxied(bk[1])) == served and time.monotonic() < deadline:
                fetch(port)
            assert len(proxied(bk[1])) > served, "the recovered peer gets traffic again"
        log = (tmp_path / "logs" / "error.log").read_text()
        label = f'health check "" of peer {bk[1].addr} in upstream "backend"'
        unhealthy = "peer is unhealthy while checking status code"
        assert re.search(rf"\[warn\] \d+#0: {unhealthy}, {re.escape(label)}", log)
        assert f"peer is healthy while checking status code, {label}" in log
        assert f'{unhealthy}, health check "" of peer {bk[0].addr}' not in log


def _workers_used(port: int, backend: Any) -> int:
    fetch(port)
    return len({r.header("X-Worker") for r in proxied(backend)})


def _ok(port: int) -> bool:
    try:
        return fetch(port)[0] == 200
    except OSError:
        return False


def _checks(backend: Any) -> int:
    return sum(1 for r in backend.requests if r.target == "/health")


def test_mandatory_peer_waits_for_its_first_pass(tmp_path: Path) -> None:
    """In one process (master_process off): a mandatory check marks the peers "checking" (not
    chosen) until they pass; a failing one stays out."""
    from helpers import Scriptlb, get

    good, bad = {"health": 200}, {"health": 503}
    with Backends(health_backend(good), health_backend(bad)) as bk:
        http = f"""upstream b {{ server {bk[0].addr}; server {bk[1].addr}; }}
            server {{ listen {{port0}}; location / {{ proxy_pass http://b;
                health_check interval=200ms uri=/health mandatory; }} }}"""
        with Scriptlb(f"daemon off; master_process off; error_log {tmp_path}/e.log info;\nhttp {{ {http} }}",
                      tmp_path) as lb:
            wait_for(lambda: _checks(bk[1]) >= 2 and _checks(bk[0]) >= 1, what="checks of both")
            # the good peer's pass is applied once its check's answer is read: until then no
            # peer may be chosen (a 502), which a sleep only guessed the end of
            wait_for(lambda: get(lb.port).status == 200, what="the good peer's first pass")
            statuses = [get(lb.port).status for _ in range(10)]
            assert statuses == [200] * 10
            assert proxied(bk[1]) == []


def test_tcp_checks_port_and_send_expect(tmp_path: Path) -> None:
    """type=tcp with match send/expect, on another port than the peer's (port=): the peer is
    up although its own port is closed; a peer whose check port is closed is unhealthy."""
    from helpers import Scriptlb, closed_port, get

    async def pong(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if b"PING" in await reader.readline():
            writer.write(b"PONG\r\n")
            await writer.drain()
        writer.close()

    dead = closed_port()
    with Backends(None) as bk:  # type: ignore[arg-type]
        bk[0].raw_handler = pong
        http = f"""match banner {{ send "PING\\r\\n"; expect ~ "PONG"; }}
            upstream a {{ server 127.0.0.1:{dead}; }}
            upstream b {{ server 127.0.0.1:{dead}; }}
            server {{ listen {{port0}};
                location /a {{ proxy_pass http://a; health_check type=tcp port={bk[0].port} match=banner
                                                                interval=100ms mandatory; }}
                location /b {{ proxy_pass http://b; health_check type=tcp interval=100ms mandatory; }}
                location /api {{ api; }}
            }}"""
        with Scriptlb(f"daemon off; master_process off; error_log {tmp_path}/e.log info;\nhttp {{ {http} }}",
                      tmp_path) as lb:
            def states() -> tuple[str, str]:
                a = json.loads(get(lb.port, "/api/9/http/upstreams/a").body)["peers"][0]["state"]
                b = json.loads(get(lb.port, "/api/9/http/upstreams/b").body)["peers"][0]["state"]
                return a, b

            wait_for(lambda: states() == ("up", "unhealthy"), what="a up, b unhealthy")
            assert get(lb.port, "/b").status == 502  # no live upstreams
    log = (tmp_path / "e.log").read_text()
    refused = "connect() failed (111: Connection refused) while connecting to upstream"
    assert f'{refused}, health check "" of peer 127.0.0.1:{dead} in upstream "b"' in log


def test_slow_start_ramps_the_weight_back() -> None:
    from scriptlb.ops.health import HealthView

    view = HealthView(runtime=None)
    peer = SimpleNamespace(weight=10, effective_weight=10, slow_start=10.0, unhealthy=False)
    since = 1000.0
    view._slow_start(peer, since, since + 2.5)
    assert (peer.weight, peer.effective_weight) == (2, 2)
    view._slow_start(peer, since, since + 5.0)
    assert peer.weight == 5
    view._slow_start(peer, since, since + 10.5)  # over: the full weight again
    assert peer.weight == 10
    view._slow_start(peer, since, since + 11.0)
    assert peer.weight == 10
