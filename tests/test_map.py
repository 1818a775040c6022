"""The ``map`` block: load-time checks (nginx's words, file:line) and lookups, beside nginx."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import Scriptlb, free_ports, load_conf, raw_exchange
from nginx_oracle import NGINX, nginx_running

from scriptlb.config import ConfigError

MAPS = r"""
    map $http_x_key $mapped {
        default            dflt;
        ''                 empty;
        exact              exact-hit;
        Mixed              mixed-hit;
        \default           escaped;
        ~^re(\d+)$         regex-hit;
        ~*^CASE            caseless-hit;
        var                "from-$uri";
    }
    map $host $by_host {
        hostnames;
        default            none;
        example.com        exact;
        *.example.com      head;
        .other.org         dot;
        www.shop.*         tail;
        ~^z                regex;
    }
    map $mapped $chained { exact-hit chained-exact; default chained-other; }
    map $http_upgrade $connection_upgrade { default upgrade; '' close; }
    map $http_nothing $no_default { a b; }
"""

CASES = [
    ({}, "/"),
    ({"X-Key": "exact"}, "/"),
    ({"X-Key": "EXACT"}, "/"),
    ({"X-Key": "mixed"}, "/"),
    ({"X-Key": "default"}, "/"),
    ({"X-Key": "re42"}, "/"),
    ({"X-Key": "re4x"}, "/"),
    ({"X-Key": "case-insensitive"}, "/"),
    ({"X-Key": "var"}, "/some/uri"),
    ({"X-Key": "other"}, "/"),
    ({"Host": "example.com"}, "/"),
    ({"Host": "a.b.example.com"}, "/"),
    ({"Host": "other.org"}, "/"),
    ({"Host": "x.other.org"}, "/"),
    ({"Host": "www.shop.de"}, "/"),
    ({"Host": "zeta.net"}, "/"),
    ({"Host": "nowhere.net"}, "/"),
    ({"Upgrade": "websocket"}, "/"),
]


def _request(headers: dict[str, str], path: str) -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: {headers.get('Host', 'h')}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers.items() if k != "Host"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _body(response: bytes) -> bytes:
    return response.partition(b"\r\n\r\n")[2]


SERVER = """
    server {{
        listen {listen};
        location / {{ return 200 "$mapped|$by_host|$chained|$connection_upgrade|$no_default\\n"; }}
    }}
"""


@pytest.mark.protocol  # a worker thread on loopback sockets
def test_map_lookups_match_nginx(tmp_path: Path) -> None:
    with Scriptlb("daemon off; master_process off;\nhttp {" + MAPS + SERVER.format(listen="{port0}")
                  + "}", tmp_path) as lb:
        ours = [_body(raw_exchange(lb.port, _request(h, p))) for h, p in CASES]
    assert ours[0] == b"empty|none|chained-other|close|\n"
    assert ours[1] == ours[2] == b"exact-hit|none|chained-exact|close|\n"
    assert ours[8].startswith(b"from-/some/uri|")
    if NGINX is None:
        pytest.skip("nginx is not installed: checked scriptlb's own answers only")
    (port,) = free_ports(1)
    ngx_dir = tmp_path / "nginx"
    ngx_dir.mkdir()
    with nginx_running(ngx_dir, MAPS + SERVER.format(listen=f"127.0.0.1:{port}")):
        theirs = [_body(raw_exchange(port, _request(h, p))) for h, p in CASES]
    assert ours == theirs, theirs


@pytest.mark.parametrize(
    ("block", "error"),
    [
        ("map $uri b { }", 'invalid variable name "b"'),
        ("map $uri $b { x y z; }", "invalid number of the map parameters"),
        ("map $uri $b { default x; default y; }", "duplicate default map parameter"),
        ("map $uri $b { k x; K y; }", 'conflicting parameter "k"'),
        ("map $uri $b { ~(unclosed x; }", "regex compile failed"),
        ("map $uri $b { k $nope; }", 'unknown "nope" variable'),
        ("map $uri $host { k v; }", 'the duplicate "host" variable'),
        ("map $uri $b { hostnames; *.a.* x; }", 'invalid hostname or wildcard "*.a.*"'),
    ],
)
def test_bad_maps_are_config_errors_with_file_and_line(tmp_path: Path, block: str, error: str) -> None:
    text = "http {\n  " + block + "\n  server { listen 127.0.0.1:1; }\n}\n"
    with pytest.raises(ConfigError) as info:
        load_conf(text, tmp_path)
    assert error in str(info.value)
    assert str(info.value).endswith(":2")


def test_a_map_may_be_used_above_its_definition(tmp_path: Path) -> None:
    conf = load_conf(
        "http { server { listen 127.0.0.1:1; location / { proxy_set_header X $later; "
        "proxy_pass http://127.0.0.1:2; } }\n map $uri $later { default x; } }\n",
        tmp_path,
    )
    assert conf.http is not None and "later" in conf.http.maps
