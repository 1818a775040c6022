"""Stream access and limits: allow/deny, limit_conn, proxy_bind, tcp_nodelay, error_log in
stream contexts (files and syslog), and the session safety net.

Real sockets on 127.0.0.1: a worker in a thread (``Scriptlb``), TCP peers in threads. Where
nginx's stream module is installed, the same config runs on it and the observable results
(what the client gets, the access log's statuses) must match.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import Scriptlb, free_ports, load_conf, read_log_lines, wait_for
from stream_helpers import HAS_NGINX_STREAM, IO_TIMEOUT, TcpPeer, echo, nginx_stream, read_until_closed

from scriptlb.config import ConfigError
from scriptlb.stream import session as stream_session
from scriptlb.stream.relay import RatedFlow, ReadGate


def exchange(port: int, data: bytes = b"ping", source: str = "127.0.0.1", expect: int | None = None) -> bytes:
    """Send ``data``, read until as many bytes (or ``expect``) came back or the proxy closed."""
    with socket.create_connection(("127.0.0.1", port), IO_TIMEOUT, (source, 0)) as conn:
        with contextlib.suppress(OSError):  # (a refused session may be closed already)
            conn.sendall(data)
        return read_until_closed(conn, expect if expect is not None else len(data))


@contextlib.contextmanager
def held_session(port: int) -> Iterator[socket.socket]:
    """A session kept open (it counts against limit_conn until closed)."""
    conn = socket.create_connection(("127.0.0.1", port), IO_TIMEOUT)
    try:
        conn.sendall(b"hold")
        assert conn.recv(4) == b"hold"  # proxied: past the limit phase
        yield conn
    finally:
        conn.close()


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ("stream { server { listen 1; allow 10.0.0.300; } }", 'invalid parameter "10.0.0.300"'),
        ("stream { server { listen 1; limit_conn z 1; } }", 'zero size shared memory zone "z"'),
        ("stream { limit_conn_zone $remote_addr zone=z:1m; server { listen 1; limit_conn z 0; } }",
         'invalid number of connections "0"'),
        ("stream { limit_conn_zone $uri zone=z:1m; }", 'unknown "uri" variable'),
        ("stream { limit_conn_zone $remote_addr zone=z:1m; limit_conn_zone $remote_addr zone=z:1m; }",
         'limit_conn_zone "z" is already bound to key "$remote_addr"'),
        ("stream { server { listen 1; limit_conn_log_level debug; } }",
         'invalid value "debug" in "limit_conn_log_level" directive, it must be "info", "notice", '
         '"warn" or "error"'),
        ("stream { server { listen 1; tcp_nodelay maybe; } }",
         'invalid value "maybe" in "tcp_nodelay" directive, it must be "on" or "off"'),
        ("stream { server { listen 1; proxy_bind 127.0.0.1 transparent; } }",
         'the "transparent" parameter of "proxy_bind" is not supported by scriptlb'),
        ("stream { server { listen 1; proxy_bind nowhere; } }", 'invalid address "nowhere"'),
        ("stream { server { listen 1; error_log x nope; } }", 'invalid log level "nope"'),
        ("stream { server { listen 1; error_log syslog:facility=local0; } }", "no syslog server specified"),
        ("error_log syslog:server=127.0.0.1,facility=nope;", 'unknown syslog facility "nope"'),
        ("error_log syslog:server=127.0.0.1,tag=a-b;",
         'syslog "tag" only allows alphanumeric characters and underscore'),
        ("error_log syslog:server=127.0.0.1,colour=red;", 'unknown syslog parameter "colour=red"'),
    ],
)
def test_config_errors_are_nginx_s(tmp_path: Path, block: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_conf(block, tmp_path)
    assert message in str(info.value)
    assert "scriptlb.conf:1" in str(info.value)


def test_stream_values_inherit_from_the_block_and_a_server_s_own_replace_them(tmp_path: Path) -> None:
    conf = load_conf("""
        error_log syslog:server=127.0.0.1:5514,facility=local0,tag=lb,nohostname info;
        stream {
            deny 10.0.0.0/8; allow all;
            tcp_nodelay off;
            limit_conn_zone $binary_remote_addr zone=z:1m;
            limit_conn z 2;
            error_log stream.log;
            server { listen 1; }
            server { listen 2; allow 127.0.0.1; deny all; tcp_nodelay on; limit_conn_dry_run on;
                     error_log server.log info; proxy_bind 127.0.0.2; }
        }""", tmp_path)
    (syslog,) = conf.error_log
    assert syslog.syslog is not None and (syslog.syslog.host, syslog.syslog.port) == ("127.0.0.1", 5514)
    assert (syslog.syslog.facility, syslog.syslog.tag, syslog.syslog.hostname) == (16, "lb", False)
    assert conf.stream is not None
    outer, inner = conf.stream.servers
    assert [(r.allow, r.network) for r in outer.access] == [(False, "10.0.0.0/8"), (True, "all")]
    assert [(r.allow, r.network) for r in inner.access] == [(True, "127.0.0.1/32"), (False, "all")]
    assert (outer.tcp_nodelay, inner.tcp_nodelay) == (False, True)
    assert outer.limits is not None and inner.limits is not None
    assert outer.limits.conns[0].conn == 2
    assert (outer.limits.conn_dry_run, inner.limits.conn_dry_run) == (False, True)
    assert [e.path.rsplit("/", 1)[-1] for e in outer.error_log] == ["stream.log"]
    assert [(e.path.rsplit("/", 1)[-1], e.level) for e in inner.error_log] == [("server.log", "info")]
    assert outer.proxy_bind is None and inner.proxy_bind is not None and inner.proxy_bind.raw == "127.0.0.2"


# --------------------------------------------------------------------------- allow / deny

ACCESS_BLOCK = """
    log_format s '$server_port $status';
    access_log {dir}/s.log s;
    server {{ listen 127.0.0.1:{allowed}; proxy_pass {peer}; deny 127.0.0.2; allow 127.0.0.0/8; deny all; }}
    server {{ listen 127.0.0.1:{denied}; proxy_pass {peer}; deny all; }}
"""


def _access_results(port_allowed: int, port_denied: int, log: Path) -> tuple[object, ...]:
    got = (exchange(port_allowed), exchange(port_allowed, source="127.0.0.2"), exchange(port_denied))
    return got, sorted(read_log_lines(log, 3))


def _scriptlb(tmp_path: Path, block: str, listens: int, **values: object) -> Scriptlb:
    """A worker serving ``block`` (formatted with ``values`` and its ports as {port0}...)."""
    ports = {name: f"{{port{i}}}" for i, name in enumerate(values.pop("ports"))}  # type: ignore[attr-defined]
    text = f"error_log {tmp_path}/error.log info;\nstream {{" + block.format(**ports, **values) + "}"
    return Scriptlb(text, tmp_path, listens=listens)


def test_allow_and_deny_first_match_wins_and_denied_sessions_are_403(tmp_path: Path) -> None:
    with TcpPeer(echo) as peer, _scriptlb(tmp_path, ACCESS_BLOCK, 2, ports=("allowed", "denied"),
                                         dir=tmp_path, peer=peer.addr) as lb:
        allowed, denied = lb.ports
        got, log = _access_results(allowed, denied, tmp_path / "s.log")
    assert got == (b"ping", b"", b"")
    assert log == sorted([f"{allowed} 200", f"{allowed} 403", f"{denied} 403"])
    errors = (tmp_path / "error.log").read_text()
    assert f"access forbidden by rule, client: 127.0.0.2, server: 127.0.0.1:{allowed}" in errors
    assert peer.accepted == 1  # a denied session never reaches the peer


@pytest.mark.nginx
@pytest.mark.skipif(not HAS_NGINX_STREAM, reason="nginx stream module missing")
def test_allow_and_deny_match_nginx(tmp_path: Path) -> None:
    results = {}
    with TcpPeer(echo) as peer:
        for who in ("nginx", "scriptlb"):
            where = tmp_path / who
            where.mkdir()
            if who == "nginx":
                allowed, denied = free_ports(2)
                block = ACCESS_BLOCK.format(dir=where, allowed=allowed, denied=denied, peer=peer.addr)
                with nginx_stream(where, block):
                    got, log = _access_results(allowed, denied, where / "s.log")
            else:
                with _scriptlb(where, ACCESS_BLOCK, 2, ports=("allowed", "denied"), dir=where,
                               peer=peer.addr) as lb:
                    got, log = _access_results(*lb.ports, where / "s.log")
            results[who] = (got, sorted(line.split()[1] for line in log))
    assert results["scriptlb"] == results["nginx"]


# --------------------------------------------------------------------------- limit_conn

LIMIT_BLOCK = """
    limit_conn_zone $binary_remote_addr zone=z:1m;
    log_format s '$server_port $status $limit_conn_status';
    access_log {dir}/s.log s;
    server {{ listen 127.0.0.1:{limited}; proxy_pass {peer}; limit_conn z 1; }}
    server {{ listen 127.0.0.1:{dry}; proxy_pass {peer}; limit_conn z 1; limit_conn_dry_run on; }}
    server {{ listen 127.0.0.1:{free}; proxy_pass {peer}; }}
"""


def _limit_results(limited: int, dry: int, free: int, log: Path) -> tuple[object, ...]:
    with held_session(limited):
        got = (exchange(limited), exchange(dry), exchange(free))
    # (the held session's end is logged once its close is seen: wait for its line)
    read_log_lines(log, 4)
    again = exchange(limited)
    return (*got, again), sorted(read_log_lines(log, 5))


def test_limit_conn_rejects_past_the_limit_and_counts_until_the_session_ends(tmp_path: Path) -> None:
    with TcpPeer(echo) as peer, _scriptlb(tmp_path, LIMIT_BLOCK, 3, ports=("limited", "dry", "free"),
                                         dir=tmp_path, peer=peer.addr) as lb:
        limited, dry, free = lb.ports
        got, log = _limit_results(limited, dry, free, tmp_path / "s.log")
    assert got == (b"", b"ping", b"ping", b"ping")
    assert log == sorted([f"{limited} 200 PASSED", f"{limited} 503 REJECTED", f"{dry} 200 REJECTED_DRY_RUN",
                          f"{free} 200 -", f"{limited} 200 PASSED"])
    errors = (tmp_path / "error.log").read_text()
    assert f'limiting connections by zone "z", client: 127.0.0.1, server: 127.0.0.1:{limited}' in errors
    assert 'limiting connections, dry run, by zone "z"' in errors


@pytest.mark.nginx
@pytest.mark.skipif(not HAS_NGINX_STREAM, reason="nginx stream module missing")
def test_limit_conn_matches_nginx(tmp_path: Path) -> None:
    results = {}
    with TcpPeer(echo) as peer:
        for who in ("nginx", "scriptlb"):
            where = tmp_path / who
            where.mkdir()
            if who == "nginx":
                limited, dry, free = free_ports(3)
                block = LIMIT_BLOCK.format(dir=where, limited=limited, dry=dry, free=free, peer=peer.addr)
                with nginx_stream(where, block):
                    got, log = _limit_results(limited, dry, free, where / "s.log")
            else:
                with _scriptlb(where, LIMIT_BLOCK, 3, ports=("limited", "dry", "free"), dir=where,
                               peer=peer.addr) as lb:
                    got, log = _limit_results(*lb.ports, where / "s.log")
            results[who] = (got, sorted(line.split(" ", 1)[1] for line in log))
    assert results["scriptlb"] == results["nginx"]


# --------------------------------------------------------------------------- proxy_bind, tcp_nodelay


def test_proxy_bind_sets_the_peer_connection_s_local_address(tmp_path: Path) -> None:
    sources: list[str] = []

    def say_source(conn: socket.socket) -> None:
        sources.append(conn.getpeername()[0])
        conn.sendall(conn.getpeername()[0].encode())

    with TcpPeer(say_source) as peer, Scriptlb(f"""
            stream {{
                server {{ listen 127.0.0.1:{{port0}}; proxy_pass {peer.addr}; proxy_bind 127.0.0.2; }}
                server {{ listen 127.0.0.1:{{port1}}; proxy_pass {peer.addr}; proxy_bind $remote_addr; }}
            }}""", tmp_path, listens=2) as lb:
        assert exchange(lb.ports[0], b"", expect=9) == b"127.0.0.2"
        assert exchange(lb.ports[1], b"", source="127.0.0.3", expect=9) == b"127.0.0.3"


def test_tcp_nodelay_off_clears_the_option_on_both_sides(tmp_path: Path) -> None:
    with TcpPeer(echo) as peer, Scriptlb(f"""
            stream {{
                tcp_nodelay off;
                server {{ listen 127.0.0.1:{{port0}}; proxy_pass {peer.addr}; }}
                server {{ listen 127.0.0.1:{{port1}}; proxy_pass {peer.addr}; tcp_nodelay on; }}
            }}""", tmp_path, listens=2) as lb:
        options = []
        for port in lb.ports:
            with held_session(port):
                (session,) = _sessions(lb)
                assert session.peer is not None and session.transport is not None
                options.append(tuple(
                    t.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
                    for t in (session.transport, session.peer.transport)))
            wait_for(lambda: not _sessions(lb), what="the session's end")
    assert options == [(False, False), (True, True)]


def _sessions(lb: Scriptlb) -> list[stream_session.Session]:
    stream = lb.thread.worker.stream
    return stream.sessions() if stream is not None else []


# --------------------------------------------------------------------------- error_log


@contextlib.contextmanager
def syslog_listener() -> Iterator[tuple[int, list[bytes]]]:
    """A UDP syslog collector on 127.0.0.1 (a thread, stopped on exit)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.1)
    got: list[bytes] = []
    stop = threading.Event()

    def collect() -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError, OSError):
                got.append(sock.recv(8192))

    thread = threading.Thread(target=collect, daemon=True)
    thread.start()
    try:
        yield sock.getsockname()[1], got
    finally:
        stop.set()
        thread.join(2)
        sock.close()


def test_a_server_s_error_log_takes_its_sessions_lines_and_syslog_gets_them_too(tmp_path: Path) -> None:
    (dead,) = free_ports(1)
    with syslog_listener() as (syslog_port, datagrams), Scriptlb(f"""
            error_log {tmp_path}/main.log info;
            stream {{
                server {{
                    listen 127.0.0.1:{{port0}}; proxy_pass 127.0.0.1:{dead};
                    error_log {tmp_path}/server.log info;
                    error_log syslog:server=127.0.0.1:{syslog_port},facility=local0,tag=edge warn;
                }}
            }}""", tmp_path) as lb:
        assert exchange(lb.port) == b""
        wait_for(lambda: any(b"connect() failed" in d for d in datagrams), what="the syslog datagram")
    server_log = (tmp_path / "server.log").read_text()
    assert "[info]" in server_log and "connected to" in server_log
    assert "connect() failed (111: Connection refused)" in server_log
    assert "connect() failed" not in (tmp_path / "main.log").read_text()
    failed = next(d.decode() for d in datagrams if b"connect() failed" in d)
    # <PRI = local0 (16) * 8 + error (3)>Mmm dd hh:mm:ss host tag: nginx's whole line
    assert failed.startswith("<131>")
    header, _, line = failed.partition(" edge: ")
    assert header.split(" ")[-1] == socket.gethostname().lower()
    assert "[error]" in line and not line.endswith("\n")
    assert not any(b"[info]" in d for d in datagrams)  # the target's own level: warn


# --------------------------------------------------------------------------- safety net


def test_an_unexpected_exception_closes_both_sides_and_the_worker_serves_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ending the session raises too (here: ending its try): both the client and the peer
    connection are closed all the same, the error is logged, the next session is served."""
    peer_closed = threading.Event()

    def echo_then_note_the_close(conn: socket.socket) -> None:
        echo(conn)
        peer_closed.set()

    original_end = stream_session.StreamAttempt.end

    def end(self: stream_session.StreamAttempt, *args: object, **kw: object) -> object:
        if self.bytes_sent == 4 and self.bytes_received == 4 and b"boom" in boom:
            raise RuntimeError("boom")
        return original_end(self, *args, **kw)  # type: ignore[arg-type]

    boom = [b"boom"]
    monkeypatch.setattr(stream_session.StreamAttempt, "end", end)
    with TcpPeer(echo_then_note_the_close) as peer, Scriptlb(f"""
            error_log {tmp_path}/error.log;
            stream {{ server {{ listen 127.0.0.1:{{port0}}; proxy_pass {peer.addr}; }} }}""", tmp_path) as lb:
        with socket.create_connection(("127.0.0.1", lb.port), IO_TIMEOUT) as conn:
            conn.sendall(b"boom")
            assert conn.recv(4) == b"boom"
            conn.shutdown(socket.SHUT_WR)  # the session ends: ending the try raises
            assert read_until_closed(conn) == b""
        assert peer_closed.wait(IO_TIMEOUT / 2), "the peer connection was left open"
        boom.clear()
        assert exchange(lb.port, b"after") == b"after"
    assert "RuntimeError: boom" in (tmp_path / "error.log").read_text()


# --------------------------------------------------------------------------- rates, recovery


class _Loop:
    """Timers on a clock the test moves (the flow's arithmetic, not the event loop, is tested)."""

    def __init__(self, now: float) -> None:
        self.now = now
        self.timers: list[tuple[float, Callable[[], None]]] = []

    def call_later(self, delay: float, callback: Callable[[], None]) -> _Loop:
        self.timers.append((self.now + delay, callback))
        return self

    def cancel(self) -> None:
        self.timers.clear()

    def run(self) -> None:
        while self.timers:
            self.timers.sort(key=lambda timer: timer[0])
            self.now, callback = self.timers.pop(0)
            callback()


class _Transport:
    def __init__(self) -> None:
        self.paused = False

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


def test_a_rated_flow_passes_its_budget_per_whole_second_as_nginx() -> None:
    """stream_limit_rate.t's case: 1011 bytes at 250 bytes/s, the session started mid-second:
    250 bytes at once, then 250 each second (the budget grows when a second begins, and every
    read waits n/rate after it), the last 11 four seconds later; reading paused meanwhile."""
    loop = _Loop(100.5)
    transport = _Transport()
    sent: list[tuple[float, int]] = []
    flow = RatedFlow(250, 100, ReadGate(transport), lambda data: sent.append((loop.now, len(data))),
                     loop, clock=lambda: loop.now)
    flow.feed(b"x" * 1011)
    assert sent == [(100.5, 250)] and transport.paused
    loop.run()
    assert sent == [(100.5, 250), (101.5, 250), (102.5, 250), (103.5, 250), (104.5, 11)]
    assert not transport.paused and not flow.held


def test_download_rate_from_a_variable_holds_the_peer_back(tmp_path: Path) -> None:
    data = b"z" * 200000
    with TcpPeer(lambda conn: conn.sendall(data)) as peer, Scriptlb(f"""
            stream {{
                map $server_port $down {{ default 100000; }}
                server {{ listen 127.0.0.1:{{port0}}; proxy_pass {peer.addr}; proxy_download_rate $down; }}
            }}""", tmp_path) as lb:
        started = time.monotonic()
        assert exchange(lb.port, b"", expect=len(data)) == data
        elapsed = time.monotonic() - started
    # 100000 bytes at once, the rest one second later at the earliest
    assert elapsed >= 0.9


def test_a_peer_back_after_fail_timeout_takes_every_new_session(tmp_path: Path) -> None:
    """nginx forgives a peer's failures once it accepts a connection again (not once that
    session ends): sessions opened while the first one is still open go to it too."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    primary = listener.getsockname()[1]  # bound, not listening: connections are refused
    with TcpPeer(banner_peer(b"B")) as backup, Scriptlb(f"""
            stream {{
                upstream u {{ server 127.0.0.1:{primary} fail_timeout=1s; server {backup.addr} backup; }}
                server {{ listen 127.0.0.1:{{port0}}; proxy_pass u; }}
            }}""", tmp_path) as lb:
        assert exchange(lb.port, b"", expect=1) == b"B"
        listener.listen(16)
        time.sleep(1.2)  # past fail_timeout
        listener.settimeout(IO_TIMEOUT)
        held: list[socket.socket] = []
        try:
            for _ in range(3):  # each relayed (a byte back from the primary) before the next
                held.append(socket.create_connection(("127.0.0.1", lb.port), IO_TIMEOUT))
                conn, _ = listener.accept()
                held.append(conn)
                conn.sendall(b"P")
                assert held[-2].recv(1) == b"P"
        finally:
            for conn in held:
                conn.close()
            listener.close()
    assert backup.accepted == 1


def banner_peer(text: bytes) -> Callable[[socket.socket], None]:
    def say(conn: socket.socket) -> None:
        conn.sendall(text)
        conn.recv(1)

    return say
