"""``geo`` (http and stream): the block's words and checks, the lookups (CIDR and ranges,
delete, IPv6, IPv4-mapped, non-addresses), X-Forwarded-For through ``proxy``, and real nginx
as the oracle for the same blocks served over real sockets."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from helpers import Scriptlb, free_ports, get, load_conf
from nginx_oracle import NGINX, nginx_running
from stream_helpers import HAS_NGINX_STREAM, IO_TIMEOUT, nginx_stream, read_until_closed

from scriptlb.config import ConfigError
from scriptlb.config.geo import parse_geo
from scriptlb.config.parser import Node
from scriptlb.variables.geo import GeoTable, geo_address


def _table(*lines: str, source: str | None = None) -> GeoTable:
    children = []
    for line in lines:
        words = line.split()
        children.append(Node(words[0], tuple(words[1:]), None))
    args = ("$g",) if source is None else (source, "$g")
    return GeoTable(parse_geo(Node("geo", args, None, children=children), None, http=True,
                              warn=lambda message, where: None))


def _look(table: GeoTable, text: str) -> str:
    return table.lookup(geo_address(text))


# --------------------------------------------------------------------------- lookups


def test_cidr_longest_network_wins_and_default_covers_both_families() -> None:
    table = _table("default d", "127.0.0.0/8 loopback", "127.0.0.1 one", "2001:db8::/32 doc",
                   "10.0.0.0/8 ten", "delete 10.0.0.0/8")
    assert [_look(table, a) for a in ("127.0.0.1", "127.0.0.2", "2001:db8::5", "::1", "10.1.1.1")] == \
        ["one", "loopback", "doc", "d", "d"]
    assert _look(table, "::ffff:127.0.0.9") == "loopback"  # IPv4-mapped: looked up as IPv4


def test_without_default_no_match_is_empty_and_a_non_address_is_255_255_255_255() -> None:
    table = _table("192.0.2.0/24 test", "255.255.255.255 none")
    assert (_look(table, "10.0.0.1"), _look(table, "::1")) == ("", "")
    assert _look(table, "unix:") == _look(table, "not an address") == "none"


def test_ranges_later_lines_win_and_delete_takes_a_range_out() -> None:
    table = _table("ranges", "default d", "127.0.0.0-127.0.0.255 test", "127.0.0.1-127.0.0.2 two",
                   "127.0.0.1-127.0.0.1 one", "10.0.0.0-10.0.255.255 ten", "delete 10.0.1.0-10.0.1.255")
    looks = {a: _look(table, a) for a in ("127.0.0.0", "127.0.0.1", "127.0.0.2", "127.0.0.3",
                                          "10.0.0.9", "10.0.1.9", "10.0.2.9", "::1", "::ffff:127.0.0.1")}
    assert looks == {"127.0.0.0": "test", "127.0.0.1": "one", "127.0.0.2": "two", "127.0.0.3": "test",
                     "10.0.0.9": "ten", "10.0.1.9": "d", "10.0.2.9": "ten", "::1": "d",
                     "::ffff:127.0.0.1": "one"}


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ("http { geo $g { 10.0.0.300/8 x; } }", 'invalid network "10.0.0.300/8"'),
        ("http { geo $g { ranges; 10.0.0.1 x; } }", 'invalid range "10.0.0.1"'),
        ("http { geo $g { ranges; 10.0.0.9-10.0.0.1 x; } }", 'invalid range "10.0.0.9-10.0.0.1"'),
        ("http { geo $g { 10.0.0.1 x; ranges; } }",
         'the "ranges" directive must be the first directive inside "geo" block'),
        ("http { geo $g { 10.0.0.1 x y; } }", "invalid number of the geo parameters"),
        ("http { geo g { } }", 'invalid variable name "g"'),
        ("http { geo $host { } }", 'the duplicate "host" variable'),
        ("stream { geo $g { proxy 10.0.0.1; } }", "invalid network \"proxy\""),
        ("stream { geo $nope $g { } }", 'unknown "nope" variable'),
    ],
)
def test_config_errors_are_nginx_s(tmp_path: Path, block: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_conf(block, tmp_path)
    assert message in str(info.value)
    assert "scriptlb.conf:1" in str(info.value)


# --------------------------------------------------------------------------- http, against nginx

HTTP_BLOCK = """
    geo $geo {{
        default        world;
        127.0.0.0/8    loopback;
        192.0.2.0/24   test;
        proxy          127.0.0.1;
    }}
    geo $arg_ip $geo_arg {{
        ranges;
        default                  none;
        10.0.0.0-10.0.0.255      ten;
        10.0.0.128-10.0.0.128    one;
    }}
    server {{
        listen {listen};
        location / {{ return 200 "$geo $geo_arg\\n"; }}
    }}
"""

HTTP_REQUESTS = [
    ("/", {}),
    ("/", {"X-Forwarded-For": "192.0.2.7"}),
    ("/", {"X-Forwarded-For": "203.0.113.1"}),
    ("/?ip=10.0.0.128", {}),
    ("/?ip=10.0.0.5", {}),
    ("/?ip=bogus", {}),
]


def _http_answers(port: int) -> list[bytes]:
    return [get(port, path, headers).body for path, headers in HTTP_REQUESTS]


def test_http_geo_reads_the_client_x_forwarded_for_and_a_variable(tmp_path: Path) -> None:
    with Scriptlb(f"http {{ {HTTP_BLOCK.format(listen='127.0.0.1:{port0}')} }}", tmp_path) as lb:
        answers = _http_answers(lb.port)
    assert answers == [b"loopback none\n", b"test none\n", b"world none\n", b"loopback one\n",
                       b"loopback ten\n", b"loopback none\n"]


@pytest.mark.nginx
@pytest.mark.skipif(NGINX is None, reason="nginx missing")
def test_http_geo_matches_nginx(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    ngx_dir, lb_dir = tmp_path / "nginx", tmp_path / "scriptlb"
    ngx_dir.mkdir()
    lb_dir.mkdir()
    with nginx_running(ngx_dir, HTTP_BLOCK.format(listen=f"127.0.0.1:{port}")):
        theirs = _http_answers(port)
    with Scriptlb(f"http {{ {HTTP_BLOCK.format(listen='127.0.0.1:{port0}')} }}", lb_dir) as lb:
        ours = _http_answers(lb.port)
    assert ours == theirs


# --------------------------------------------------------------------------- stream, against nginx

STREAM_BLOCK = """
    map $server_port $addr {{ default "2001:db8::1"; {mapped} "::ffff:192.0.2.1"; }}
    geo $g {{ 127.0.0.0/8 loopback; 0.0.0.0/0 world; delete 127.0.0.0/8; }}
    geo $addr $g6 {{ default d; 2001:db8::/32 doc; 192.0.2.1 test; }}
    geo $remote_addr $gr {{ ranges; default d; 127.0.0.0-127.0.0.1 low; 127.0.0.1-127.0.0.1 one; }}
    server {{ listen 127.0.0.1:{plain}; return "$g $g6 $gr"; }}
    server {{ listen 127.0.0.1:{mapped}; return "$g $g6 $gr"; }}
"""


def _stream_answers(plain: int, mapped: int) -> list[bytes]:
    answers = []
    for port in (plain, mapped):
        with socket.create_connection(("127.0.0.1", port), IO_TIMEOUT) as conn:
            answers.append(read_until_closed(conn))
    return answers


def test_stream_geo_over_ipv6_mapped_and_ranges(tmp_path: Path) -> None:
    block = STREAM_BLOCK.format(plain="{port0}", mapped="{port1}")
    with Scriptlb(f"stream {{ {block} }}", tmp_path, listens=2) as lb:
        answers = _stream_answers(*lb.ports)
    assert answers == [b"world doc one", b"world test one"]


@pytest.mark.nginx
@pytest.mark.skipif(not HAS_NGINX_STREAM, reason="nginx stream module missing")
def test_stream_geo_matches_nginx(tmp_path: Path) -> None:
    plain, mapped = free_ports(2)
    ngx_dir, lb_dir = tmp_path / "nginx", tmp_path / "scriptlb"
    ngx_dir.mkdir()
    lb_dir.mkdir()
    with nginx_stream(ngx_dir, STREAM_BLOCK.format(plain=plain, mapped=mapped)):
        theirs = _stream_answers(plain, mapped)
    block = STREAM_BLOCK.format(plain="{port0}", mapped="{port1}")
    with Scriptlb(f"stream {{ {block} }}", lb_dir, listens=2) as lb:
        ours = _stream_answers(*lb.ports)
    assert ours == theirs
