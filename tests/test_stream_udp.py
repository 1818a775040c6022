"""``listen ... udp`` in the stream block: datagram sessions, proxy_requests/_responses, UDP
peers and their failures, against real nginx where its stream module is installed.

Real processes (scriptlb's command, nginx) and real UDP sockets on 127.0.0.1: UDP peers in
threads (``stream_helpers.UdpPeer``), one client socket per session (a session is a client
address).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import free_ports, load_conf, read_log_lines, wait_for
from stream_helpers import (
    HAS_NGINX_STREAM,
    TcpPeer,
    UdpPeer,
    echo,
    free_udp_ports,
    nginx_stream,
    round_trip,
    udp_ask,
    udp_client,
)

from scriptlb.config import ConfigError

LOG = "log_format s '$protocol $status $bytes_sent $bytes_received $upstream_addr $upstream_bytes_received';"


@contextlib.contextmanager
def scriptlb_stream(where: Path, block: str, main: str = "master_process off;") -> Iterator[Path]:
    """scriptlb's command serving ``stream { block }`` until the block ends (QUIT)."""
    conf = where / "scriptlb.conf"
    conf.write_text(f"daemon off; {main} pid {where}/pid; error_log {where}/error.log info;\n"
                    f"stream {{ {block} }}\n")
    proc = subprocess.Popen([sys.executable, "-m", "scriptlb", "-p", str(where), "-c", str(conf)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: (where / "pid").exists() or proc.poll() is not None, timeout=15)
        assert proc.poll() is None, (where / "error.log").read_text()
        yield where
    finally:
        proc.send_signal(signal.SIGQUIT)
        proc.wait(timeout=15)


def source_port(data: bytes, addr: tuple[str, int]) -> list[bytes]:
    """A peer that answers with the source port the datagram came from (the session's socket)."""
    return [str(addr[1]).encode()]


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("listen", "message"),
    [
        ("listen 1 udp ssl;", '"ssl" parameter is incompatible with "udp"'),
        ("listen 1 udp backlog=10;", '"backlog" parameter is incompatible with "udp"'),
        ("listen 1 udp proxy_protocol;", '"proxy_protocol" parameter is incompatible with "udp"'),
        ("listen 1 udp; proxy_responses x;", '"proxy_responses" directive invalid number'),
        ("listen 1 udp; } server { listen 1 udp;", 'duplicate "0.0.0.0:1" address and port pair'),
    ],
)
def test_config_errors_are_nginx_s(tmp_path: Path, listen: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_conf(f"stream {{ server {{ {listen} proxy_pass 127.0.0.1:9; }} }}", tmp_path)
    assert message in str(err.value)
    assert f"{tmp_path}/scriptlb.conf:1" in str(err.value)


def test_the_same_port_over_tcp_and_udp_is_two_sockets(tmp_path: Path) -> None:
    conf = load_conf("""
        stream {
            server { listen 127.0.0.1:5300; proxy_pass 127.0.0.1:9; }
            server { listen 127.0.0.1:5300 udp; proxy_pass 127.0.0.1:9; proxy_responses 1; proxy_requests 2; }
        }""", tmp_path)
    tcp, udp = (server.listens[0] for server in conf.stream.servers)
    assert (tcp.udp, udp.udp) == (False, True)
    assert tcp.key != udp.key
    proxy = conf.stream.servers[1].proxy
    assert (proxy.responses, proxy.requests) == (1, 2)
    assert conf.stream.servers[0].proxy.responses is None  # nginx's default: any number


def test_bad_udp_config_fails_the_command_with_file_and_line(tmp_path: Path) -> None:
    conf = tmp_path / "bad.conf"
    conf.write_text("stream {\n  server {\n    listen 53 udp ssl;\n  }\n}\n")
    done = subprocess.run([sys.executable, "-m", "scriptlb", "-t", "-p", str(tmp_path), "-c", str(conf)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert f'"ssl" parameter is incompatible with "udp" in {conf}:3' in done.stderr


# --------------------------------------------------------------------------- sessions


def test_datagrams_keep_their_boundaries_and_each_session_is_logged(tmp_path: Path) -> None:
    """One datagram in, one out (an empty one too); TCP on the same port still works; the
    session's line has $protocol UDP and the bytes of each direction."""
    udp_port, tcp_port = free_udp_ports(1)[0], free_ports(1)[0]
    with UdpPeer() as peer, TcpPeer(echo) as tcp_peer, scriptlb_stream(tmp_path, f"""
            {LOG}
            access_log {tmp_path}/s.log s;
            proxy_timeout 300ms;
            server {{ listen 127.0.0.1:{udp_port} udp; proxy_pass {peer.addr}; }}
            server {{ listen 127.0.0.1:{tcp_port}; proxy_pass {tcp_peer.addr}; }}
            """):
        with udp_client() as client:
            # nginx's cut at proxy_buffer_size (16k): not the first datagram in, any one out
            assert udp_ask(client, udp_port, b"x" * 30000) == [b"x" * 16384]
            for size in (1, 1200, 0):
                assert udp_ask(client, udp_port, b"x" * size) == [b"x" * size]
            assert udp_ask(client, udp_port, b"x" * 20000) == [b"x" * 16384]
        assert round_trip(tcp_port, b"tcp") == b"tcp"
        lines = read_log_lines(tmp_path / "s.log", 2)
    assert sorted(lines) == sorted([f"UDP 200 33969 47585 {peer.addr} 33969",
                                    f"TCP 200 3 3 {tcp_peer.addr} 3"])
    assert "udp timed out, packets from/to client:5/5" in (tmp_path / "error.log").read_text()


def test_proxy_requests_and_responses_end_sessions_as_nginx(tmp_path: Path) -> None:
    """proxy_requests 2: the binding (the peer socket) lasts two datagrams; proxy_responses 1
    without proxy_requests: each datagram is a session of its own, ended by its answer."""
    pairs, single = free_udp_ports(2)
    with UdpPeer(source_port) as peer, scriptlb_stream(tmp_path, f"""
            log_format s '$status $bytes_received $bytes_sent';
            access_log {tmp_path}/s.log s;
            proxy_timeout 5s;
            server {{ listen 127.0.0.1:{pairs} udp; proxy_pass {peer.addr};
                      proxy_requests 2; proxy_responses 1; }}
            server {{ listen 127.0.0.1:{single} udp; proxy_pass {peer.addr}; proxy_responses 1; }}
            """):
        with udp_client() as client:
            got = [udp_ask(client, pairs, b"?")[0] for _ in range(4)]
        assert got[0] == got[1] != got[2] == got[3]
        with udp_client() as client:
            first, second = (udp_ask(client, single, b"?")[0] for _ in range(2))
        assert first != second
        lines = read_log_lines(tmp_path / "s.log", 4)
    assert sorted(lines) == ["200 1 5", "200 1 5", "200 2 10", "200 2 10"]


def test_a_refused_peer_fails_and_the_next_sessions_avoid_it(tmp_path: Path) -> None:
    """The ICMP port unreachable comes back as ECONNREFUSED on the session's socket: nginx's
    error line, no retry on the other peer (the datagram went out), the peer marked failed, so
    the following sessions all go to the live one."""
    (dead,) = free_udp_ports(1)
    (port,) = free_udp_ports(1)
    with UdpPeer(source_port) as peer, scriptlb_stream(tmp_path, f"""
            {LOG}
            access_log {tmp_path}/s.log s;
            proxy_timeout 2s;
            proxy_responses 1;
            upstream u {{ server 127.0.0.1:{dead}; server {peer.addr}; }}
            server {{ listen 127.0.0.1:{port} udp; proxy_pass u; }}
            """):
        with udp_client() as client:
            assert udp_ask(client, port, b"?") == [b""]  # (nginx's: the failed read, passed on)
        for _ in range(4):
            with udp_client() as client:
                assert len(udp_ask(client, port, b"?")) == 1
        lines = read_log_lines(tmp_path / "s.log", 5)
    assert lines[0] == f"UDP 200 0 1 127.0.0.1:{dead} 0"
    assert all(line.startswith("UDP 200 ") and peer.addr in line for line in lines[1:])
    assert peer.received == 4
    assert (f'recv() failed (111: Connection refused) while proxying and reading from upstream, '
            f'client: 127.0.0.1, server: 127.0.0.1:{port}, upstream: "127.0.0.1:{dead}"'
            in (tmp_path / "error.log").read_text())


def test_a_silent_peer_times_out_502_when_answers_were_expected(tmp_path: Path) -> None:
    (port,) = free_udp_ports(1)
    with UdpPeer(lambda data, addr: []) as peer, scriptlb_stream(tmp_path, f"""
            {LOG}
            access_log {tmp_path}/s.log s;
            proxy_timeout 200ms;
            proxy_responses 1;
            server {{ listen 127.0.0.1:{port} udp; proxy_pass {peer.addr}; }}
            """):
        with udp_client(timeout=0.5) as client:
            assert udp_ask(client, port, b"?") == []
        (line,) = read_log_lines(tmp_path / "s.log", 1)
    assert line == f"UDP 502 0 1 {peer.addr} 0"
    assert ("upstream timed out (110: Connection timed out) while proxying connection"
            in (tmp_path / "error.log").read_text())


def test_proxy_protocol_rides_in_the_first_datagram(tmp_path: Path) -> None:
    """nginx's PROXY v1 header (TCP4: nginx names the family only) and the client's first
    datagram go out as one datagram; the next ones go as they came."""
    (port,) = free_udp_ports(1)
    with UdpPeer() as peer, scriptlb_stream(tmp_path, f"""
            server {{ listen 127.0.0.1:{port} udp; proxy_pass {peer.addr}; proxy_protocol on; }}
            """), udp_client() as client:
        first = udp_ask(client, port, b"hello")
        assert udp_ask(client, port, b"again") == [b"again"]
    assert first[0].startswith(b"PROXY TCP4 127.0.0.1 127.0.0.1 ")
    assert first[0].endswith(f" {port}\r\nhello".encode())


def test_proxy_bind_sets_the_peer_socket_s_source_address(tmp_path: Path) -> None:
    (port,) = free_udp_ports(1)
    with UdpPeer(lambda data, addr: [addr[0].encode()]) as peer, scriptlb_stream(tmp_path, f"""
            server {{ listen 127.0.0.1:{port} udp; proxy_pass {peer.addr}; proxy_bind 127.0.0.2; }}
            """), udp_client() as client:
        assert udp_ask(client, port, b"?") == [b"127.0.0.2"]


def test_a_rate_limit_delays_datagrams_but_never_splits_one(tmp_path: Path) -> None:
    """proxy_download_rate 500 and 1000-byte datagrams: each comes whole (nginx cuts a TCP
    stream to the budget, never a datagram), the second after the pause the first earned."""
    (port,) = free_udp_ports(1)
    with UdpPeer() as peer, scriptlb_stream(tmp_path, f"""
            server {{ listen 127.0.0.1:{port} udp; proxy_pass {peer.addr}; proxy_download_rate 500; }}
            """), udp_client() as client:
        assert udp_ask(client, port, b"d" * 1000) == [b"d" * 1000]
        started = time.monotonic()
        assert udp_ask(client, port, b"e" * 1000) == [b"e" * 1000]
        assert time.monotonic() - started >= 0.5  # (earned: 2 s; only a lower bound is safe)


def test_sessions_are_bounded_by_worker_connections(tmp_path: Path) -> None:
    """Forged source addresses cost nothing: past worker_connections live sessions a new
    client's datagram is dropped, with nginx's alert, and the live sessions go on."""
    (port,) = free_udp_ports(1)
    with UdpPeer() as peer, scriptlb_stream(tmp_path, f"""
            proxy_timeout 1s;
            server {{ listen 127.0.0.1:{port} udp; proxy_pass {peer.addr}; }}
            """, main="master_process off; events { worker_connections 2; }"):
        # an answer is waited for as long as a loaded machine may take (the first one includes
        # the worker's start); only the datagram that must go unanswered gets a short wait
        clients = [udp_client(), udp_client(), udp_client(timeout=0.3)]
        try:
            assert udp_ask(clients[0], port, b"a") == [b"a"]
            assert udp_ask(clients[1], port, b"b") == [b"b"]
            assert udp_ask(clients[2], port, b"c") == []
            assert udp_ask(clients[0], port, b"d") == [b"d"]
            # once the two sessions timed out, their places are free again
            wait_for(lambda: udp_ask(clients[2], port, b"e") == [b"e"], timeout=10)
        finally:
            for client in clients:
                client.close()
    assert "[alert]" in (tmp_path / "error.log").read_text()
    assert "2 worker_connections are not enough" in (tmp_path / "error.log").read_text()


def test_a_hook_balances_datagram_sessions_with_the_session_s_variables(tmp_path: Path) -> None:
    """balancer_by_python over UDP peers: ngx.var has $protocol UDP and the client's port; the
    hook's pick holds for the session's later datagrams (one peer socket per session)."""
    (port,) = free_udp_ports(1)
    with UdpPeer(lambda data, addr: [b"A"]) as a, UdpPeer(lambda data, addr: [b"B"]) as b, \
            scriptlb_stream(tmp_path, f"""
            log_format s '$protocol $upstream_addr';
            access_log {tmp_path}/s.log s;
            proxy_timeout 300ms;
            upstream u {{
                server {a.addr}; server {b.addr};
                balancer_by_python_block {{
                    if ngx.var.protocol == "UDP":
                        peers = upstream.get_primary_peers()
                        balancer.set_current_peer(peers[int(ngx.var.remote_port) % 2]["name"])
                }}
            }}
            server {{ listen 127.0.0.1:{port} udp; proxy_pass u; }}
            """):
        for _ in range(4):
            with udp_client() as client:
                chosen = b"AB"[client.getsockname()[1] % 2:][:1]
                assert {udp_ask(client, port, b"?")[0] for _ in range(3)} == {chosen}
        lines = read_log_lines(tmp_path / "s.log", 4)
    assert len(lines) == 4 and all(line.startswith("UDP 127.0.0.1:") for line in lines)


@pytest.mark.slow
def test_workers_with_reuseport_keep_a_client_on_its_session(tmp_path: Path) -> None:
    """Two workers, one socket each: the kernel hashes a client address to one socket, so a
    client's datagrams stay in one session (the same peer socket) across the workers."""
    (port,) = free_udp_ports(1)
    with UdpPeer(source_port) as peer, scriptlb_stream(tmp_path, f"""
            proxy_timeout 5s;
            server {{ listen 127.0.0.1:{port} udp reuseport; proxy_pass {peer.addr}; }}
            """, main="worker_processes 2;"):
        time.sleep(0.3)  # (both workers up: the test is about their sharing, not their start)
        for _ in range(3):
            with udp_client() as client:
                answers = {udp_ask(client, port, b"?")[0] for _ in range(4)}
            assert len(answers) == 1


@pytest.mark.slow
def test_a_reload_keeps_the_socket_and_old_workers_end_their_sessions(tmp_path: Path) -> None:
    """HUP: the new worker reads the same socket (a datagram sent meanwhile waits in it); the
    old worker ends its datagram sessions at once, as nginx ("disconnected on shutdown")."""
    (port,) = free_udp_ports(1)
    with UdpPeer(source_port) as peer, scriptlb_stream(tmp_path, f"""
            proxy_timeout 1m;
            server {{ listen 127.0.0.1:{port} udp; proxy_pass {peer.addr}; }}
            """, main="") as where, udp_client() as client:
        (before,) = udp_ask(client, port, b"?")
        conf = where / "scriptlb.conf"
        conf.write_text(conf.read_text().replace("proxy_timeout 1m;", "proxy_timeout 50s;"))
        log = where / "error.log"
        pid = int((where / "pid").read_text())
        os.kill(pid, signal.SIGHUP)
        wait_for(lambda: log.read_text().count("start worker process") >= 2)
        wait_for(lambda: "disconnected on shutdown" in log.read_text())
        (after,) = udp_ask(client, port, b"?")
    assert after != before  # a new session (its own peer socket) in the new worker


# --------------------------------------------------------------------------- against nginx


@pytest.mark.nginx
@pytest.mark.skipif(not HAS_NGINX_STREAM, reason="nginx stream module missing")
def test_sessions_and_logs_match_nginx(tmp_path: Path) -> None:
    """The same config on nginx and scriptlb: answers per datagram, session ends
    (proxy_requests/proxy_responses, the refused peer) and the access log lines."""
    with UdpPeer(lambda data, addr: [data, data.upper()]) as peer:
        dead, a, b, c = free_udp_ports(4)
        block = f"""
            log_format s '$protocol $status $bytes_sent $bytes_received $upstream_addr '
                         '$upstream_bytes_sent $upstream_bytes_received';
            access_log {{dir}}/s.log s;
            proxy_timeout 300ms;
            server {{ listen 127.0.0.1:{a} udp; proxy_pass {peer.addr}; proxy_responses 2; }}
            server {{ listen 127.0.0.1:{b} udp; proxy_pass {peer.addr}; proxy_requests 2; }}
            server {{ listen 127.0.0.1:{c} udp; proxy_pass 127.0.0.1:{dead}; proxy_responses 1; }}
        """
        results = {}
        for who in ("nginx", "scriptlb"):
            where = tmp_path / who
            where.mkdir()
            text = block.replace("{dir}", str(where))
            runner = nginx_stream(where, text) if who == "nginx" else scriptlb_stream(where, text)
            with runner:
                answers = []
                with udp_client() as client:
                    answers.append(udp_ask(client, a, b"ab", 2))
                    answers.append(udp_ask(client, a, b"cd", 2))
                with udp_client() as client:
                    answers.append(udp_ask(client, b, b"ef", 2))
                    answers.append(udp_ask(client, b, b"gh", 2))
                with udp_client() as client:  # (the refused read, passed on: an answer)
                    answers.append(udp_ask(client, c, b"ij"))
                with udp_client() as client:  # (longer than proxy_buffer_size: cut as nginx)
                    answers.append([len(d) for d in udp_ask(client, a, b"k" * 20000, 2)])
                    answers.append([len(d) for d in udp_ask(client, a, b"l" * 20000, 2)])
                results[who] = (answers, sorted(read_log_lines(where / "s.log", 5)))
    assert results["scriptlb"] == results["nginx"]
