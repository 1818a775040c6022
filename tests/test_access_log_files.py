"""access_log destinations beyond one plain file: ``gzip`` (each buffer one gzip member),
paths with variables (opened per line) and ``open_log_file_cache``, in http and stream; real
sockets, real nginx as the oracle where the config is shared."""

from __future__ import annotations

import gzip
import os
import socket
from pathlib import Path

import pytest
from helpers import Scriptlb, free_ports, get, load_conf, wait_for
from nginx_oracle import NGINX, nginx_running
from stream_helpers import IO_TIMEOUT, read_until_closed

from scriptlb.config import ConfigError
from scriptlb.config.model import LogFileCacheConf
from scriptlb.request.accesslog import FileCache


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("access_log {d}/a.log f gzip=10;", 'invalid compression level "10"'),
        ("access_log {d}/a.log f gzip=x;", 'invalid compression level "x"'),
        ("access_log {d}/a_$uri.log f buffer=4k;", "buffered logs cannot have variables in name"),
        ("access_log {d}/a_$uri.log f gzip;", "buffered logs cannot have variables in name"),
        ("access_log {d}/a_$nope.log f;", 'unknown "nope" variable'),
        ("open_log_file_cache inactive=1s;", '"open_log_file_cache" must have "max" parameter'),
        ("open_log_file_cache max=0;", 'invalid "max" value "0"'),
        ("open_log_file_cache max=2 bogus=1;", 'invalid "open_log_file_cache" parameter "bogus=1"'),
    ],
)
def test_config_errors_are_nginx_s(tmp_path: Path, line: str, message: str) -> None:
    text = "http { log_format f $uri; server { listen 1; " + line.format(d=tmp_path) + " } }"
    with pytest.raises(ConfigError) as err:
        load_conf(text, tmp_path)
    assert message in str(err.value)
    assert f"{tmp_path}/scriptlb.conf:1" in str(err.value)


def test_gzip_defaults_to_level_one_and_a_64k_buffer(tmp_path: Path) -> None:
    conf = load_conf(f"""http {{ log_format f $uri; server {{ listen 1;
        access_log {tmp_path}/a.log f gzip;
        location /a {{ }}
        location /b {{ access_log {tmp_path}/b.log f gzip=9 buffer=1k flush=1s; }}
    }} }}""", tmp_path)
    (server,) = conf.http.servers
    logs = {log.path.rsplit("/", 1)[1]: log for loc in server.locations for log in loc.access_log}
    assert (logs["a.log"].gzip, logs["a.log"].buffer) == (1, 65536)
    assert (logs["b.log"].gzip, logs["b.log"].buffer, logs["b.log"].flush) == (9, 1024, 1.0)


def test_file_cache_keeps_descriptors_as_nginx_s_open_file_cache(tmp_path: Path) -> None:
    """max=3 min_uses=2: the scenario of nginx's access_log.t, on a fake clock."""
    now = [0.0]
    cache = FileCache(LogFileCacheConf(max=3, inactive=20.0, min_uses=2, valid=60.0), lambda: now[0])
    where = tmp_path / "dir"
    where.mkdir()
    for name in ("lru", "lru", "once", "first", "first", "second", "second"):
        cache.write(str(where / name), b"/\n", 0)
    (tmp_path / "dir").rename(tmp_path / "moved")
    for name in ("lru", "once", "first", "second"):
        cache.write(str(where / name), b"/\n", 0)  # only kept descriptors still write
    cache.close()
    lines = {p.name: p.read_bytes().count(b"/") for p in (tmp_path / "moved").iterdir()}
    assert lines == {"lru": 2, "once": 1, "first": 3, "second": 3}


def test_file_cache_forgets_inactive_paths_and_reopens_after_valid(tmp_path: Path) -> None:
    now = [0.0]
    cache = FileCache(LogFileCacheConf(max=10, inactive=5.0, min_uses=1, valid=30.0), lambda: now[0])
    path = tmp_path / "a"
    cache.write(str(path), b"1\n", 0)
    path.rename(tmp_path / "rotated")
    now[0] = 1.0
    cache.write(str(path), b"2\n", 0)  # kept descriptor: the rotated file
    now[0] = 40.0  # past inactive: forgotten, opened by name again
    cache.write(str(path), b"3\n", 0)
    cache.close()
    assert ((tmp_path / "rotated").read_bytes(), path.read_bytes()) == (b"1\n2\n", b"3\n")
    assert not cache.entries


def _gunzipped(path: Path) -> bytes:
    wait_for(lambda: path.exists() and path.stat().st_size > 0, timeout=IO_TIMEOUT)
    return gzip.decompress(path.read_bytes())


HTTP_BLOCK = """
    log_format f "$uri:$status";
    server {{
        listen 127.0.0.1:{port};
        location /z {{ access_log {dir}/z.log f gzip buffer=1m flush=100ms; return 200 z; }}
        location /v {{ access_log {dir}/v_$arg_n f; return 200 v; }}
        location /c {{ open_log_file_cache max=2 min_uses=1; access_log {dir}/c_$arg_n f; return 200 c; }}
    }}
"""
PATHS = ("/z", "/z?2", "/v?n=1", "/v?n=2", "/v?n=1", "/v", "/c?n=a", "/c?n=a")


def _files(where: Path) -> dict[str, bytes]:
    wait_for(lambda: (where / "z.log").exists() and (where / "z.log").stat().st_size > 0, timeout=IO_TIMEOUT)
    found = {}
    for path in sorted(where.iterdir()):
        if path.name.startswith(("v_", "c_")):
            found[path.name] = path.read_bytes()
    found["z.log"] = _gunzipped(where / "z.log")
    return found


def test_gzip_and_variable_paths_over_http(tmp_path: Path) -> None:
    text = "http { " + HTTP_BLOCK.format(port="{port0}", dir=tmp_path) + " }"
    with Scriptlb(text, tmp_path) as lb:
        for path in PATHS:
            assert get(lb.port, path).status == 200
        files = _files(tmp_path)
    assert files == {"v_1": b"/v:200\n/v:200\n", "v_2": b"/v:200\n", "v_": b"/v:200\n",
                     "c_a": b"/c:200\n/c:200\n", "z.log": b"/z:200\n/z:200\n"}


@pytest.mark.nginx
@pytest.mark.skipif(NGINX is None, reason="nginx is not installed")
def test_gzip_and_variable_paths_match_nginx(tmp_path: Path) -> None:
    results = {}
    for who in ("nginx", "scriptlb"):
        where = tmp_path / who
        where.mkdir()
        if who == "nginx":
            (port,) = free_ports(1)
            block = HTTP_BLOCK.format(port=port, dir=where)
            with nginx_running(where, f"root {where}; " + block):
                for path in PATHS:
                    get(port, path)
                results[who] = _files(where)
        else:
            block = HTTP_BLOCK.format(port="{port0}", dir=where)
            with Scriptlb("http { " + block + " }", where) as lb:
                for path in PATHS:
                    get(lb.port, path)
                results[who] = _files(where)
    assert results["scriptlb"] == results["nginx"]


def test_stream_gzip_and_variable_paths(tmp_path: Path) -> None:
    with Scriptlb(f"""stream {{
            log_format f $server_port:$bytes_sent;
            access_log {tmp_path}/created-at-start.log f;
            server {{ listen 127.0.0.1:{{port0}}; return abc;
                     access_log {tmp_path}/z.log f gzip=6 flush=50ms; }}
            server {{ listen 127.0.0.1:{{port1}}; return abcd; access_log {tmp_path}/v_$bytes_sent.log f; }}
        }}""", tmp_path, listens=2) as lb:
        for port in lb.ports:
            with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as conn:
                read_until_closed(conn)
        assert _gunzipped(tmp_path / "z.log") == f"{lb.ports[0]}:3\n".encode()
        wait_for(lambda: (tmp_path / "v_4.log").exists(), timeout=IO_TIMEOUT)
    assert (tmp_path / "v_4.log").read_text() == f"{lb.ports[1]}:4\n"
    assert os.path.getsize(tmp_path / "created-at-start.log") == 0
