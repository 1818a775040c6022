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
            with Scriptlb(f"stream {{ {text} }}", where, listens=ports) as lb:
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
