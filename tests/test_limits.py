"""limit_req / limit_conn (scriptlb.request.limits): nginx's leaky bucket and concurrency limit, beside a
real nginx where the config is shared, and one zone shared by the workers of a real master."""

from __future__ import annotations

import re
import socket
import struct
import time
from pathlib import Path

import pytest
from helpers import (
    Backends,
    Scriptlb,
    answers,
    fresh_get,
    hang,
    master_process,
    raw_exchange,
    respond,
    wait_for,
)
from test_round_robin import NGINX, free_ports, nginx_running

from scriptlb.config.errors import ConfigError
from scriptlb.request import limits

BLOCK = """
    limit_req_zone $binary_remote_addr zone=one:64k rate=1r/m;
    limit_req_zone $http_x_key zone=keyed:64k rate=1r/m;
    limit_conn_zone $binary_remote_addr zone=conns:64k;
    log_format lim '$uri $status $limit_req_status $limit_conn_status';
    server {{
        listen {listen};
        access_log {log} lim;
        proxy_read_timeout 1s;
        location /burst {{ limit_req zone=one burst=2 nodelay; proxy_pass http://{peer}; }}
        location /status {{ limit_req zone=keyed; limit_req_status 429; limit_req_log_level warn;
                           proxy_pass http://{peer}; }}
        location /dry {{ limit_req zone=keyed; limit_req_dry_run on; proxy_pass http://{peer}; }}
        location /conn {{ limit_conn conns 1; proxy_pass http://{slow}; }}
        location /ret {{ limit_req zone=keyed; return 204; }}
    }}
"""

# (path, X-Key header): the bucket of "one" takes three at once (burst=2), then refuses
REQUESTS = [("/burst", None)] * 4 + [("/status", "a"), ("/status", "a"), ("/status", None),
                                     ("/dry", "b"), ("/dry", "b"), ("/ret", "c"), ("/ret", "c")]

_ERROR = re.compile(r"\[(\w+)\] \d+#\d+: \*\d+ "
                    r"(limiting [^,]*(?:, dry run)?(?:, excess: [\d.]+)? by zone \"\w+\")")


def _request(path: str, key: str | None) -> bytes:
    extra = f"X-Key: {key}\r\n" if key else ""
    return f"GET {path} HTTP/1.0\r\nHost: t\r\n{extra}\r\n".encode()


def _status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def _run(port: int, conn_port: int) -> list[int]:
    statuses = [_status(raw_exchange(port, _request(path, key))) for path, key in REQUESTS]
    held = socket.create_connection(("127.0.0.1", conn_port))  # one /conn request in progress
    try:
        held.sendall(_request("/conn", None))
        time.sleep(0.3)
        statuses.append(_status(raw_exchange(port, _request("/conn", None))))
    finally:
        held.close()
    return statuses


def _errors(path: Path) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in _ERROR.finditer(path.read_text())]


@pytest.mark.nginx
@pytest.mark.skipif(NGINX is None, reason="nginx is not installed")
def test_limits_answer_and_log_as_nginx(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    ngx_dir, lb_dir = tmp_path / "nginx", tmp_path / "scriptlb"
    ngx_dir.mkdir()
    lb_dir.mkdir()
    with Backends(respond(), hang()) as bk:
        values = dict(peer=bk[0].addr, slow=bk[1].addr)
        with nginx_running(ngx_dir, BLOCK.format(listen=f"127.0.0.1:{port}", log=f"{ngx_dir}/lim.log",
                                                 **values), [port]):
            theirs = _run(port, port)
        block = BLOCK.format(listen="{port0}", log=f"{lb_dir}/lim.log", **values)
        with Scriptlb(f"daemon off; master_process off; error_log {lb_dir}/error.log info;\n"
                      f"http {{ {block} }}", lb_dir) as lb:
            ours = _run(lb.port, lb.port)
    assert ours == theirs
    assert ours[:4] == [200, 200, 200, 503]
    assert ours[4:7] == [200, 429, 200]  # (an empty key is not limited)
    assert ours[-1] == 503
    # (the oracle logs at "error" and above, ours at "info")
    ours_logged = _errors(lb_dir / "error.log")
    assert [e for e in ours_logged if e[0] == "error"] == _errors(ngx_dir / "logs" / "error.log")
    assert ("warn", 'limiting requests, excess: 1.000 by zone "keyed"') in ours_logged
    log = (lb_dir / "lim.log").read_text().splitlines()
    assert "/burst 503 REJECTED -" in log
    assert "/dry 200 REJECTED_DRY_RUN -" in log
    assert "/ret 204 - -" in log  # (return answers in the rewrite phase, before any limit)


def test_leaky_bucket_delays_and_refuses_as_nginx_computes() -> None:
    """The arithmetic of ngx_http_limit_req_lookup/account with a pinned clock."""
    from scriptlb.config.model import LimitZoneConf, Template

    now = [1_000_000]
    limits._CLOCK = lambda: now[0]
    try:
        import tempfile

        with tempfile.TemporaryDirectory() as directory:
            zone = limits.LimitZone(LimitZoneConf("limit_req", "z", 65536, Template("k", ("k",), "k"),
                                                  rate=2000), directory)
            assert zone.req_lookup(b"k", 1000, True) == (0, False)  # first: a new key, excess 0
            assert zone.req_lookup(b"k", 1000, True) == (1000, False)  # +1 request
            assert zone.req_lookup(b"k", 1000, True) == (2000, True)  # over burst=1: not charged
            now[0] += 250  # 2 r/s: 250 ms drain half a request
            assert zone.req_lookup(b"k", 1000, True) == (1500, True)
            now[0] += 1000
            assert zone.req_lookup(b"k", 1000, True) == (0, False)  # drained
    finally:
        limits._CLOCK = None


@pytest.mark.slow
def test_one_zone_is_shared_by_every_worker(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    conf = tmp_path / "scriptlb.conf"
    conf.write_text(f"""
        daemon off; worker_processes 2; error_log {tmp_path}/error.log info;
        http {{
            limit_req_zone $host zone=all:64k rate=1r/m;
            server {{
                listen 127.0.0.1:{port} reuseport;
                location /ok {{ return 200 "$pid"; }}
                location /l {{ limit_req zone=all burst=3 nodelay; proxy_pass http://127.0.0.1:{port}/ok; }}
            }}
        }}
    """)
    with master_process(tmp_path, conf):
        wait_for(lambda: answers(port, "/ok") is not None, what="scriptlb answering")
        bodies = [fresh_get(port, "/l") for _ in range(12)]  # new connections: spread by reuseport
        wait_for(lambda: (tmp_path / "error.log").read_text().count("limiting requests") == 8,
                 what="8 refusals logged")
    # burst=3 allows 4 requests in all, whichever worker took them
    assert sum(body.isdigit() for body in bodies) == 4


def test_config_errors_name_file_and_line(tmp_path: Path) -> None:
    from helpers import load_conf

    cases = [
        ("limit_req_zone $binary_remote_addr zone=one:64k rate=x;", 'invalid rate "rate=x"'),
        ("limit_req_zone $binary_remote_addr zone=one:1k rate=1r/s;", 'zone "one:1k" is too small'),
        ("limit_req_zone $binary_remote_addr rate=1r/s;", '"limit_req_zone" must have "zone" parameter'),
        ("limit_req_zone $nope zone=one:64k rate=1r/s;", 'unknown "nope" variable'),
        ("server { listen 127.0.0.1:1; location / { limit_req zone=none; } }",
         'zero size shared memory zone "none"'),
        ("server { listen 127.0.0.1:1; limit_req zone=a burst=x; }", 'invalid burst value "burst=x"'),
        ("server { listen 127.0.0.1:1; limit_conn a 0; }", 'invalid number of connections "0"'),
        ("server { listen 127.0.0.1:1; limit_req_status 200; }", "value must be between 400 and 599"),
        ("server { listen 127.0.0.1:1; limit_conn_log_level debug; }", 'invalid value "debug"'),
    ]
    for body, message in cases:
        with pytest.raises(ConfigError, match=re.escape(message) + r".* in .*scriptlb.conf:2"):
            load_conf(f"http {{\n{body} }}", tmp_path)


def test_a_request_over_the_rate_waits_then_goes_on(tmp_path: Path) -> None:
    log = tmp_path / "lim.log"
    conf = ("daemon off; master_process off;\nhttp {"
            " limit_req_zone $binary_remote_addr zone=z:64k rate=4r/s;"
            " log_format lim '$status $limit_req_status';"
            " server { listen {port0}; access_log " + str(log) + " lim;"
            " location / { limit_req zone=z burst=5; proxy_pass http://{peer}; } } }")
    with Backends(respond()) as bk, Scriptlb(conf, tmp_path, peer=bk[0].addr) as lb:
        statuses = [_status(raw_exchange(lb.port, _request("/", None))) for _ in range(3)]
        # a client that leaves while its request waits: nothing reaches the peer for it
        gone = socket.create_connection(("127.0.0.1", lb.port))
        gone.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # a reset
        gone.sendall(_request("/", None))
        time.sleep(0.02)
        gone.close()
        wait_for(lambda: log.exists() and len(log.read_text().splitlines()) == 4, what="4 log lines")
    assert statuses == [200, 200, 200]
    lines = log.read_text().splitlines()
    assert lines[0] == "200 PASSED" and "200 DELAYED" in lines[1:3]
    assert lines[3] == "499 DELAYED"
