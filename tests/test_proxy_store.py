"""proxy_store: a proxied 200's body also lands in a file (root + URI, or a named path), whole
or not at all. Real sockets: scriptlb proxies to a backend."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from helpers import Backends, Scriptlb, get, load_conf, raw, raw_exchange, respond

from scriptlb.config import ConfigError

BODY = b"stored body"


def _conf(tmp_path: Path, addr: str) -> str:
    return f"""daemon off; master_process off; error_log {tmp_path}/error.log info;
    http {{ server {{
        listen {{port0}};
        root {tmp_path}/html;
        location /store/ {{
            proxy_pass http://{addr}; proxy_store on; proxy_store_access user:rw group:r all:r;
        }}
        location /named/ {{ proxy_pass http://{addr}; proxy_store {tmp_path}/named$uri; }}
        location /missing/ {{ proxy_pass http://{addr}/404; proxy_store on; }}
    }} }}"""


def test_store_on_and_named_path(tmp_path: Path) -> None:
    with Backends(respond(body=BODY)) as bk, Scriptlb(_conf(tmp_path, bk[0].addr), tmp_path) as lb:
        on = get(lb.port, "/store/a/b.html")
        named = get(lb.port, "/named/c.txt")
        head = get(lb.port, "/store/head.html", method="HEAD")
    assert on.body == named.body == BODY
    stored = tmp_path / "html" / "store" / "a" / "b.html"
    assert stored.read_bytes() == BODY
    assert stat.S_IMODE(stored.stat().st_mode) == 0o644
    assert (tmp_path / "named" / "named" / "c.txt").read_bytes() == BODY
    assert head.status == 200 and not (tmp_path / "html" / "store" / "head.html").exists()
    leftovers = [name for _, _, files in os.walk(tmp_path) for name in files if name.startswith(".store-")]
    assert leftovers == []


def test_no_file_for_other_statuses_or_a_cut_response(tmp_path: Path) -> None:
    with (Backends(respond(status=404, body=b"nope")) as bk,
          Scriptlb(_conf(tmp_path, bk[0].addr), tmp_path) as lb):
        missing = get(lb.port, "/missing/x.html")
    assert missing.status == 404 and not (tmp_path / "html" / "missing").exists()

    cut = raw(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")  # (93 bytes never come)
    with Backends(cut) as bk, Scriptlb(_conf(tmp_path, bk[0].addr), tmp_path) as lb:
        cut_response = raw_exchange(lb.port, b"GET /store/cut.html HTTP/1.0\r\n\r\n")
        after = raw_exchange(lb.port, b"GET /store/cut.html HTTP/1.0\r\n\r\n")  # still serving
    assert cut_response.endswith(b"partial") and after.endswith(b"partial")
    assert not (tmp_path / "html" / "store" / "cut.html").exists()
    leftovers = [name for _, _, files in os.walk(tmp_path) for name in files if name.startswith(".store-")]
    assert leftovers == []


@pytest.mark.parametrize(
    ("line", "error"),
    [
        ("proxy_store_access user:x;", 'invalid value "user:x"'),
        ("proxy_store $nope;", 'unknown "nope" variable'),
    ],
)
def test_store_directive_errors(tmp_path: Path, line: str, error: str) -> None:
    with pytest.raises(ConfigError) as err:
        text = f"daemon off;\nhttp {{ server {{ listen 127.0.0.1:1; location / {{ {line} }} }} }}"
        load_conf(text, tmp_path)
    assert error in str(err.value) and ".conf:2" in str(err.value)
