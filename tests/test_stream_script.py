"""The scripting side of the stream block: ``return``, ``set``, ``split_clients``, realip and
the session variables, with real sockets; real nginx (its stream module) is the oracle where a
config is shared."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from helpers import Scriptlb, free_ports, load_conf, read_log_lines
from stream_helpers import HAS_NGINX_STREAM, IO_TIMEOUT, nginx_stream, read_until_closed

from scriptlb.config import ConfigError


def receive(port: int, send: bytes = b"") -> bytes:
    """What a connection to ``port`` gets until the server closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as conn:
        if send:
            conn.sendall(send)
        return read_until_closed(conn)


def both(tmp_path: Path, block: str, ports: int, probe):  # type: ignore[no-untyped-def]
    """``probe(ports, log_dir)`` against real nginx, then against scriptlb, serving ``block``
    (its listens are ``{port0}``, ``{port1}``..., its files under ``{dir}``)."""
    results = {}
    for who in ("nginx", "scriptlb"):
        where = tmp_path / who
        where.mkdir()
        text = block.replace("{dir}", str(where))
        if who == "nginx":
            numbers = free_ports(ports)
            for i, port in enumerate(numbers):
                text = text.replace(f"{{port{i}}}", str(port))
            with nginx_stream(where, text):
                results[who] = probe(numbers, where)
        else:
            (where / "logs").mkdir()
            with Scriptlb(f"error_log {where}/logs/error.log info;\nstream {{ {text} }}", where,
                          listens=ports) as lb:
                results[who] = probe(lb.ports, where)
    return results


# --------------------------------------------------------------------------- return


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ("stream { server { listen 1; return a; return b; } }", '"return" directive is duplicate'),
        ("stream { server { listen 1; return $nope; } }", 'unknown "nope" variable'),
        ("stream { server { listen 1; return a b; } }",
         'invalid number of arguments in "return" directive'),
        ("stream { return a; }", '"return" directive is not allowed here'),
    ],
)
def test_return_config_errors_are_nginx_s(tmp_path: Path, block: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_conf(block, tmp_path)
    assert message in str(err.value)
    assert f"{tmp_path}/scriptlb.conf:1" in str(err.value)


def test_the_last_of_return_and_proxy_pass_is_the_server_s_handler(tmp_path: Path) -> None:
    conf = load_conf("""stream {
        server { listen 1; proxy_pass 127.0.0.1:9; return x; }
        server { listen 2; return x; proxy_pass 127.0.0.1:9; }
    }""", tmp_path)
    returns, proxies = conf.stream.servers
    assert returns.return_text is not None and returns.proxy_pass is None
    assert proxies.return_text is None and proxies.proxy_pass is not None


def test_return_sends_the_text_closes_and_logs_it(tmp_path: Path) -> None:
    with Scriptlb(f"""stream {{
            log_format s '$status $bytes_sent $bytes_received $protocol';
            access_log {tmp_path}/s.log s;
            server {{ listen 127.0.0.1:{{port0}}; return "$remote_addr $nginx_version"; }}
            server {{ listen 127.0.0.1:{{port1}}; return ""; }}
        }}""", tmp_path, listens=2) as lb:
        text = receive(lb.ports[0])
        empty = receive(lb.ports[1])
        lines = sorted(read_log_lines(tmp_path / "s.log", 2))
    assert text == b"127.0.0.1 1.22.1"
    assert empty == b""
    assert lines == ["200 0 0 TCP", f"200 {len(text)} 0 TCP"]


@pytest.mark.nginx
@pytest.mark.skipif(not HAS_NGINX_STREAM, reason="nginx stream module missing")
def test_return_matches_nginx(tmp_path: Path) -> None:
    block = """
        log_format s '$status $bytes_sent $protocol $binary_remote_addr';
        access_log {dir}/s.log s;
        server { listen 127.0.0.1:{port0}; return "text $remote_addr $server_addr
second line"; }
        server { listen 127.0.0.1:{port1}; return $bytes_sent:$status; }
        server { listen 127.0.0.1:{port2}; return ''; }
    """

    def probe(ports: list[int], where: Path) -> tuple[object, ...]:
        got = tuple(receive(port, b"ignored") for port in ports)
        return got, sorted(read_log_lines(where / "s.log", 3))

    results = both(tmp_path, block, 3, probe)
    assert results["scriptlb"] == results["nginx"]


# --------------------------------------------------------------------------- set, map, split_clients


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ("stream { server { listen 1; set x 1; } }", 'invalid variable name "x"'),
        ("stream { server { listen 1; set $remote_addr 1; } }", 'the duplicate "remote_addr" variable'),
        ("stream { server { listen 1; set $x $nope; } }", 'unknown "nope" variable'),
        ("stream { set $x 1; }", '"set" directive is not allowed here'),
        ("stream { split_clients $connection $v { 50% a; 60% b; } }",
         "percent total is greater than 100%"),
        ("stream { split_clients $connection $v { 1.234% a; } }", 'invalid percent value "1.234%"'),
        ("stream { split_clients $connection $v { 0% a; } }", 'invalid percent value "0%"'),
        ("stream { split_clients $connection $v { 5 a; } }", 'invalid percent value "5"'),
        ("stream { split_clients $connection $status { * a; } }", 'the duplicate "status" variable'),
        ("stream { map $remote_addr $protocol { default a; } }", 'the duplicate "protocol" variable'),
    ],
)
def test_set_and_split_clients_config_errors_are_nginx_s(tmp_path: Path, block: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_conf(block, tmp_path)
    assert message in str(err.value)
    assert f"{tmp_path}/scriptlb.conf:1" in str(err.value)


def test_murmur_hash2_keeps_nginx_s_values() -> None:
    """Values the split_clients oracle test below checks against nginx's buckets, kept here
    so a change shows without nginx installed (tails of 0 to 3 bytes)."""
    from scriptlb.stream.maps import murmur_hash2

    keys = (b"", b"k", b"k1", b"key", b"key1", b"key12", b"key123", b"key1234")
    assert [murmur_hash2(k) for k in keys] == [
        0x0, 0xC3FE128C, 0xA05FD026, 0xC9055F70, 0xD27B86FB, 0xA7A5D5EA, 0x6263EF41, 0xAA262008]


@pytest.mark.nginx
@pytest.mark.skipif(not HAS_NGINX_STREAM, reason="nginx stream module missing")
def test_set_map_captures_and_split_clients_match_nginx(tmp_path: Path) -> None:
    block = """
        map 0 $map_var { default "original"; }
        map $server_port $port_kind { ~^(?<first>\\d)(\\d+)$ "$1-$2"; }
        split_clients "${remote_addr}x$server_addr" $variant { 33.3% a; 33.3% b; * c; }
        split_clients $key $tenth {
            10% 0; 10% 1; 10% 2; 10% 3; 10% 4; 10% 5; 10% 6; 10% 7; 10% 8.5; * 9;
        }
        log_format s '$map_var|$set_var|$variant|$split';
        access_log {dir}/s.log s;
        server {
            listen 127.0.0.1:{port0};
            set $set_var $map_var;
            set $map_var "new";
            set $split "$variant$tenth";
            return $map_var:$set_var:$variant;
        }
        server { listen 127.0.0.1:{port1}; return "$set_var|$port_kind|$first"; }
        server { listen 127.0.0.1:{port2}; set $key ""; return $tenth; }
        server { listen 127.0.0.1:{port3}; set $key k; return $tenth; }
        server { listen 127.0.0.1:{port4}; set $key k1; return $tenth; }
        server { listen 127.0.0.1:{port5}; set $key key; return $tenth; }
        server { listen 127.0.0.1:{port6}; set $key key1; return $tenth; }
        server { listen 127.0.0.1:{port7}; set $key key12; return $tenth; }
        server { listen 127.0.0.1:{port8}; set $key key123; return $tenth; }
        server { listen 127.0.0.1:{port9}; set $key key1234; return $tenth; }
    """

    def probe(ports: list[int], where: Path) -> tuple[object, ...]:
        first = receive(ports[0])
        second = receive(ports[1]).decode()
        lines = read_log_lines(where / "s.log", 2)[:2]
        port = str(ports[1])
        expected = f"|{port[0]}-{port[1:]}|{port[0]}"
        tenths = [receive(p) for p in ports[2:]]
        return first, second == expected, sorted(lines), tenths

    results = both(tmp_path, block, 10, probe)
    assert results["scriptlb"] == results["nginx"]


# --------------------------------------------------------------------------- realip, PROXY v2 TLVs


def pp2(tlvs: bytes = b"") -> bytes:
    """A PROXY v2 header from 192.0.2.1:123 to 192.0.2.2:5678 with ``tlvs``."""
    addrs = bytes([192, 0, 2, 1, 192, 0, 2, 2]) + (123).to_bytes(2, "big") + (5678).to_bytes(2, "big")
    body = addrs + tlvs
    return b"\r\n\r\n\x00\r\nQUIT\n\x21\x11" + len(body).to_bytes(2, "big") + body


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + len(value).to_bytes(2, "big") + value


def test_tlv_values_are_nginx_s() -> None:
    from scriptlb.http.proxy_protocol import TlvError, tlv_value

    ssl = tlv(0x20, b"\x01" + (255).to_bytes(4, "big") + tlv(0x21, b"TLSv1.3") + tlv(0x22, b"cn"))
    tlvs = tlv(0x01, b"h2") + tlv(0xAE, b"x") + ssl
    assert tlv_value(tlvs, "alpn") == b"h2"
    assert tlv_value(tlvs, "0x000ae") == b"x"
    assert tlv_value(tlvs, "0x3") is None
    assert tlv_value(tlvs, "ssl_verify") == b"255"
    assert tlv_value(tlvs, "ssl_version") == b"TLSv1.3"
    assert tlv_value(tlvs, "ssl_cn") == b"cn"
    assert tlv_value(tlvs, "ssl_cipher") is None
    assert tlv_value(tlvs, "nosuch") is None
    with pytest.raises(TlvError):
        tlv_value(tlvs, "0xzz")
    with pytest.raises(TlvError):
        tlv_value(tlvs[:-1], "0x3")  # a length past the end: broken


def test_realip_trusts_only_listed_senders_and_tlvs_read_the_v2_header(tmp_path: Path) -> None:
    with Scriptlb(f"""stream {{
            log_format s '$remote_addr $realip_remote_addr $proxy_protocol_tlv_alpn';
            access_log {tmp_path}/s.log s;
            server {{
                listen 127.0.0.1:{{port0}} proxy_protocol;
                set_real_ip_from 127.0.0.0/8;
                set $to $proxy_protocol_server_port;
                return "$remote_addr:$remote_port|$realip_remote_addr|$proxy_protocol_tlv_alpn|$to";
            }}
            server {{
                listen 127.0.0.1:{{port1}} proxy_protocol;
                set_real_ip_from 192.0.2.0/24;
                return "$remote_addr|$realip_remote_addr";
            }}
        }}""", tmp_path, listens=2) as lb:
        trusted = receive(lb.ports[0], pp2(tlv(0x01, b"h2"))).decode()
        untrusted = receive(lb.ports[1], pp2()).decode()
        unknown = receive(lb.ports[0], b"PROXY UNKNOWN\r\n").decode()
        lines = read_log_lines(tmp_path / "s.log", 3)
    assert trusted == "192.0.2.1:123|127.0.0.1|h2|5678"
    assert untrusted == "127.0.0.1|127.0.0.1"
    assert unknown.startswith("127.0.0.1:") and unknown.endswith("|127.0.0.1||")
    assert "192.0.2.1 127.0.0.1 h2" in lines


def test_set_real_ip_from_errors_are_nginx_s(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_conf("stream { server { listen 1; set_real_ip_from no.such.name.invalid; } }", tmp_path)
    assert 'host not found in set_real_ip_from "no.such.name.invalid"' in str(err.value)


@pytest.mark.nginx
@pytest.mark.skipif(not HAS_NGINX_STREAM, reason="nginx stream module missing")
def test_realip_matches_nginx(tmp_path: Path) -> None:
    block = """
        log_format s '$remote_addr $realip_remote_addr $proxy_protocol_addr $status';
        access_log {dir}/s.log s;
        server {
            listen 127.0.0.1:{port0} proxy_protocol;
            set_real_ip_from 127.0.0.1;
            return "$remote_addr:$remote_port $binary_remote_addr";
        }
        server {
            listen 127.0.0.1:{port1} proxy_protocol;
            set_real_ip_from ::1;
            return "$proxy_protocol_addr:$proxy_protocol_port";
        }
    """

    def probe(ports: list[int], where: Path) -> tuple[object, ...]:
        header = b"PROXY TCP6 2001:db8::1 2001:db8::2 1234 5678\r\n"
        got = (receive(ports[0], header), receive(ports[1], header), receive(ports[0], b"PROXY bad\r\n"))
        lines = read_log_lines(where / "s.log", 3)
        return got, sorted(line for line in lines if "2001:db8" in line)

    results = both(tmp_path, block, 2, probe)
    assert results["scriptlb"] == results["nginx"]


# --------------------------------------------------------------------------- proxy_pass $var names


@pytest.mark.nginx
@pytest.mark.skipif(not HAS_NGINX_STREAM, reason="nginx stream module missing")
def test_proxy_pass_names_resolve_as_nginx(tmp_path: Path) -> None:
    """Names through ``resolver`` (in the answer's order, one try per address), no port,
    unknown names, no resolver: nginx's statuses and error lines."""
    pytest.importorskip("dnslib")
    from cluster_servers import DnsServer

    with DnsServer() as dns:
        dns.records[("a.test", "A")] = [("127.0.0.1", 3600)]
        for name in ("many.test", "more.test"):  # (two names: a cached answer starts anywhere)
            dns.records[(name, "A")] = [("127.0.0.2", 3600), ("127.0.0.2", 3600), ("127.0.0.1", 3600)]
        block = f"""
            log_format s '$server_port $status "$upstream_addr"';
            access_log {{dir}}/s.log s;
            map $server_port $target {{
                {{port0}} a.test:{{port6}};
                {{port1}} a.test;
                {{port2}} nx.test:{{port6}};
                {{port3}} many.test:{{port6}};
                default more.test:{{port6}};
            }}
            proxy_connect_timeout 2s;
            server {{ listen 127.0.0.1:{{port0}}; listen 127.0.0.1:{{port1}}; listen 127.0.0.1:{{port2}};
                     proxy_pass $target; resolver 127.0.0.1:{dns.port}; }}
            server {{ listen 127.0.0.1:{{port3}}; proxy_pass $target; proxy_next_upstream_tries 2;
                     resolver 127.0.0.1:{dns.port}; }}
            server {{ listen 127.0.0.1:{{port4}}; proxy_pass $target; resolver 127.0.0.1:{dns.port}; }}
            server {{ listen 127.0.0.1:{{port5}}; proxy_pass $target; }}
            server {{ listen 127.0.0.1:{{port6}}; return SEE-THIS; }}
        """

        def probe(ports: list[int], where: Path) -> tuple[object, ...]:
            got = [receive(port) for port in ports[:6]]
            lines = read_log_lines(where / "s.log", 8)
            names = {str(port): f"P{i}" for i, port in enumerate(ports)}
            shown = []
            for line in [*lines, *_error_lines(where / "logs" / "error.log")]:
                for port, alias in names.items():
                    line = line.replace(port, alias)
                shown.append(line)
            return got, sorted(shown)

        results = both(tmp_path, block, 7, probe)
    assert results["scriptlb"] == results["nginx"]
    got, _ = results["scriptlb"]
    assert got == [b"SEE-THIS", b"", b"", b"", b"SEE-THIS", b""]


def _error_lines(path: Path) -> list[str]:
    """The texts of the [error] lines about names, without time, pid and connection number."""
    wanted = ("no port", "could not be resolved", "no resolver")
    return sorted(line.split("] ", 1)[1].split(" ", 2)[2] for line in path.read_text().splitlines()
                  if any(w in line for w in wanted))


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"PROXY INVALID", "broken"),  # nginx refuses it at once (stream_status_variable.t: 400)
        (b"PROXY TCP5 ", "broken"),
        (b"PROXY TCP4 192.0.2.1", "again"),  # a header still coming
        (b"PROXY UNK", "again"),
        (b"PROXY ", "again"),
    ],
)
def test_an_unfinished_v1_header_that_cannot_become_one_is_broken_at_once(data: bytes, expected: str) -> None:
    from scriptlb.http.proxy_protocol import read_header

    assert read_header(data) == expected


def test_a_broken_header_without_its_line_end_is_400_at_once(tmp_path: Path) -> None:
    with Scriptlb(f"""stream {{
            log_format s $status; access_log {tmp_path}/s.log s;
            server {{ listen 127.0.0.1:{{port0}} proxy_protocol; return x; }}
        }}""", tmp_path) as lb:
        with socket.create_connection(("127.0.0.1", lb.port), timeout=IO_TIMEOUT) as conn:
            conn.sendall(b"PROXY INVALID")  # and nothing more: the session must not wait
            assert read_until_closed(conn) == b""
        assert read_log_lines(tmp_path / "s.log", 1) == ["400"]
