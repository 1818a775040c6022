"""ip_hash: nginx's /24 stickiness, the retry sequence, fallbacks, and nginx's own choices."""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from helpers import free_ports

from scriptlb.balancing.ip_hash import IpHash, hashed_bytes
from scriptlb.config.model import PeerAddr, UpstreamConf, UpstreamServerConf
from scriptlb.state.peers import Peer, PeerSet


def upstream(*servers: tuple[int, int]) -> PeerSet:
    confs = []
    for port, weight in servers:
        addr = PeerAddr("127.0.0.1", port)
        confs.append(UpstreamServerConf(name=addr.name, addrs=(addr,), weight=weight))
    return PeerSet.from_conf(UpstreamConf(name="backend", servers=tuple(confs)))


def port_of(peer: Peer | None) -> int | None:
    return None if peer is None else peer.addr.port


def pick(balancer: IpHash, client: str | None, now: float = 100.0) -> int | None:
    state = balancer.new_request(0, client)
    peer = balancer.get(state, now)
    if peer is not None:
        balancer.free(state, peer, False, now)
    return port_of(peer)


SERVERS = ((8001, 1), (8002, 2), (8003, 1), (8004, 3))


def test_hashed_bytes() -> None:
    assert hashed_bytes("10.1.2.3") == bytes([10, 1, 2])
    assert hashed_bytes("::1") == bytes(15) + b"\x01"
    assert hashed_bytes(None) == b"\0\0\0"
    assert hashed_bytes("unix:") == b"\0\0\0"


def test_hash_of_a_known_address_by_hand() -> None:
    # nginx: hash = 89; for each of 10, 1, 2: hash = (hash * 113 + byte) % 6271
    h = 89
    for byte in (10, 1, 2):
        h = (h * 113 + byte) % 6271
    w = h % 7  # total weight of SERVERS; walk the peers subtracting weights
    expected = None
    for port, weight in SERVERS:
        if w < weight:
            expected = port
            break
        w -= weight
    assert pick(IpHash(upstream(*SERVERS)), "10.1.2.3") == expected


def test_same_slash_24_sticks_to_one_server() -> None:
    balancer = IpHash(upstream(*SERVERS))
    assert len({pick(balancer, f"192.168.7.{i}") for i in range(256)}) == 1


def test_shares_over_many_networks_follow_weights() -> None:
    balancer = IpHash(upstream(*SERVERS))
    shares = Counter(
        pick(balancer, f"{10 + i // 65536}.{i // 256 % 256}.{i % 256}.1") for i in range(100_000)
    )
    for port, weight in SERVERS:
        assert shares[port] / 100_000 == pytest.approx(weight / 7, abs=0.03)


def test_retry_continues_the_hash_and_never_repeats() -> None:
    balancer = IpHash(upstream(*SERVERS))
    state = balancer.new_request(0, "10.1.2.3")
    order = []
    peer = balancer.get(state, 100.0)
    while peer is not None:
        order.append(peer.addr.port)
        balancer.free(state, peer, True, 100.0)
        if not state.tries:
            break
        peer = balancer.get(state, 100.0)
    assert sorted(order) == [8001, 8002, 8003, 8004]
    again = IpHash(upstream(*SERVERS))
    state2 = again.new_request(0, "10.1.2.99")  # same /24: same retry order
    replay = []
    while (p := again.get(state2, 100.0)) is not None:
        replay.append(p.addr.port)
        again.free(state2, p, True, 100.0)
        if not state2.tries:
            break
    assert replay == order


def test_down_peer_moves_only_its_clients() -> None:
    peers = upstream(*SERVERS)
    balancer = IpHash(peers)
    clients = [f"10.0.{i}.1" for i in range(200)]
    home = {c: pick(balancer, c) for c in clients}
    peers.primary[1].down = True  # 8002
    for c in clients:
        got = pick(balancer, c)
        assert got != 8002
        if home[c] != 8002:
            assert got == home[c]


def test_single_peer_and_all_down() -> None:
    assert pick(IpHash(upstream((8001, 1))), "1.2.3.4") == 8001
    peers = upstream((8001, 1), (8002, 1))
    for p in peers.primary:
        p.down = True
    assert pick(IpHash(peers), "1.2.3.4") is None


# --------------------------------------------------------------------------- against real nginx

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)


@pytest.mark.nginx
@pytest.mark.skipif(NGINX is None, reason="nginx is not installed")
def test_same_choices_as_real_nginx_for_60_client_networks(tmp_path: Path) -> None:
    *backend_ports, proxy_port = free_ports(5)
    weights = [1, 2, 1, 3]
    servers = "".join(
        f"server 127.0.0.1:{p} weight={w}; " for p, w in zip(backend_ports, weights, strict=True)
    )
    servers_down = servers.replace(f"{backend_ports[2]} weight=1;", f"{backend_ports[2]} weight=1 down;")
    backends = "".join(f"server {{ listen 127.0.0.1:{p}; return 200 '{p}'; }}\n" for p in backend_ports)
    (tmp_path / "logs").mkdir()
    (tmp_path / "nginx.conf").write_text(
        f"""
        daemon off; master_process off; pid {tmp_path}/nginx.pid;
        error_log {tmp_path}/logs/error.log;
        events {{ worker_connections 64; }}
        http {{
            access_log off;
            client_body_temp_path {tmp_path}/body; proxy_temp_path {tmp_path}/proxy;
            fastcgi_temp_path {tmp_path}/fcgi; uwsgi_temp_path {tmp_path}/uwsgi;
            scgi_temp_path {tmp_path}/scgi;
            upstream sticky {{ ip_hash; {servers} }}
            upstream sticky_down {{ ip_hash; {servers_down} }}
            {backends}
            server {{ listen 127.0.0.1:{proxy_port}; location / {{ proxy_pass http://sticky; }}
                location /down {{ proxy_pass http://sticky_down; }} }}
        }}
        """
    )
    proc = subprocess.Popen(
        [NGINX, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    clients = [f"127.{i // 7}.{i * 37 % 256}.1" for i in range(60)]
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", proxy_port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        nginx_choice: dict[str, dict[str, int]] = {"/": {}, "/down": {}}
        for path, choices in nginx_choice.items():
            for client in clients:  # loopback accepts any 127/8 source address
                conn = http.client.HTTPConnection(
                    "127.0.0.1", proxy_port, timeout=5, source_address=(client, 0)
                )
                conn.request("GET", path)
                choices[client] = int(conn.getresponse().read())
                conn.close()
    finally:
        proc.send_signal(signal.SIGQUIT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    ours = IpHash(upstream(*zip(backend_ports, weights, strict=True)))
    assert {c: pick(ours, c) for c in clients} == nginx_choice["/"]
    assert len(set(nginx_choice["/"].values())) > 1  # the sample really exercises several servers
    with_down = upstream(*zip(backend_ports, weights, strict=True))
    with_down.primary[2].down = True  # nginx re-hashes its clients: the retry sequence must match
    ours_down = IpHash(with_down)
    assert {c: pick(ours_down, c) for c in clients} == nginx_choice["/down"]
    assert any(nginx_choice["/"][c] == backend_ports[2] for c in clients)
