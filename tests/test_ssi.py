"""Server side includes (ssi on): the commands nginx's SSI filter runs over a static file, with
subrequests through the normal location handling; real nginx is the oracle for the bodies."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers import Backends, Scriptlb, free_ports, load_conf, raw_exchange, respond
from nginx_oracle import NGINX, nginx_running

from scriptlb.config import ConfigError
from scriptlb.request.ssi import parse

PAGES = {
    "include.html": 'A<!--#include virtual="/ret?x=1" -->B<!--# include virtual="part.html" -->C',
    "set.html": '<!--#include virtual="/ret" set="v" -->[<!--#echo var="v" -->]'
                '<!--#set var="w" value="$v-$uri" --><!--#echo var="w" -->',
    "echo.html": '<!--#echo var="nothing" -->|<!--#echo var="nothing" default="dflt" -->|'
                 '<!--#echo var="arg_q" -->|<!--#echo var="arg_q" encoding="none" -->',
    "errors.html": '1<!--#bogus a="b" -->2<!--#config errmsg="[oops]" --><!--#echo -->3',
    "cond.html": '<!--#if expr="$arg_a" -->yes<!--#else -->no<!--#endif -->,'
                 '<!--#if expr="$arg_a = /^x+/" -->xs<!--#elif expr="$arg_a = b" -->b'
                 '<!--#else -->other<!--#endif -->',
    "part.html": "PART",
    "plain.txt": '<!--#echo var="uri" -->',
}

BLOCK = """
    server {{
        listen {listen};
        root {root};
        location / {{ ssi on; }}
        location /ret {{ return 200 "ret:$arg_x"; }}
    }}
"""

REQUESTS = [
    "/include.html",
    "/set.html",
    "/echo.html?q=%3Cb%3E",
    "/errors.html",
    "/cond.html",
    "/cond.html?a=xxx",
    "/cond.html?a=b",
    "/plain.txt",  # not an ssi_types type: served as it is
]


def _body(port: int, path: str) -> tuple[int, bytes]:
    response = raw_exchange(port, f"GET {path} HTTP/1.0\r\nHost: t\r\n\r\n".encode())
    head, _, body = response.partition(b"\r\n\r\n")
    status = int(head.split(b" ")[1])
    return status, body


def _write_pages(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for name, text in PAGES.items():
        (root / name).write_text(text)


@pytest.mark.nginx
@pytest.mark.skipif(NGINX is None, reason="nginx is not installed")
def test_ssi_commands_as_nginx(tmp_path: Path) -> None:
    root = tmp_path / "html"
    _write_pages(root)
    (port,) = free_ports(1)
    ngx_dir, lb_dir = tmp_path / "nginx", tmp_path / "scriptlb"
    ngx_dir.mkdir()
    lb_dir.mkdir()
    with nginx_running(ngx_dir, BLOCK.format(listen=f"127.0.0.1:{port}", root=root)):
        theirs = [_body(port, path) for path in REQUESTS]
    block = BLOCK.format(listen="{port0}", root=root)
    with Scriptlb(f"daemon off; master_process off;\nhttp {{ {block} }}", lb_dir) as lb:
        ours = [_body(lb.port, path) for path in REQUESTS]
    assert ours == theirs
    assert ours[0] == (200, b"Aret:1BPARTC")
    assert ours[1] == (200, b"[ret:]ret:-/set.html")


def test_include_of_a_proxied_location_and_ssi_off(tmp_path: Path) -> None:
    root = tmp_path / "html"
    _write_pages(root)
    (root / "page.html").write_text('<!--#include virtual="/up/x" set="got" -->got=<!--#echo var="got" -->')
    with Backends(respond(body=b"FROM-PEER")) as bk:
        text = f"""daemon off; master_process off; error_log {tmp_path}/error.log info;
        http {{ server {{
            listen {{port0}};
            root {root};
            location / {{ ssi on; }}
            location /off/ {{ alias {root}/; }}
            location /up/ {{ proxy_pass http://{bk[0].addr}; }}
        }} }}"""
        with Scriptlb(text, tmp_path) as lb:
            proxied = _body(lb.port, "/page.html")
            off = _body(lb.port, "/off/page.html")
            served = raw_exchange(lb.port, b"GET /up/x HTTP/1.0\r\nHost: t\r\n\r\n")
    assert proxied == (200, b"got=FROM-PEER")
    assert off == (200, (root / "page.html").read_bytes())  # no ssi here: the file as it is
    assert served.endswith(b"FROM-PEER")  # the peer's connection after the subrequest still serves


def test_failed_command_is_logged_and_the_worker_keeps_serving(tmp_path: Path) -> None:
    root = tmp_path / "html"
    _write_pages(root)
    (root / "bad.html").write_text('x<!--#include virtual="/../etc/passwd" -->y')
    text = f"""daemon off; master_process off; error_log {tmp_path}/error.log info;
    http {{ server {{ listen {{port0}}; root {root}; location / {{ ssi on; ssi_silent_errors on; }} }} }}"""
    with Scriptlb(text, tmp_path) as lb:
        bad = _body(lb.port, "/bad.html")
        good = _body(lb.port, "/part.html")
    assert bad == (200, b"xy")  # silent: no errmsg in the page
    assert good == (200, b"PART")
    assert re.search(r"\[error\] .*unsafe URI", (tmp_path / "error.log").read_text())


def test_parse_splits_text_and_commands() -> None:
    parts = parse(b'a<!--#echo var="x" -->b<!--# include virtual=\'/y\' wait="yes" -->c<!--#broken')
    assert parts == [b"a", ("echo", {"var": "x"}), b"b", ("include", {"virtual": "/y", "wait": "yes"}),
                     b"c<!--#broken"]


@pytest.mark.parametrize(
    ("line", "error"),
    [
        ("ssi maybe;", 'it must be "on" or "off"'),
        ("ssi_value_length x;", '"ssi_value_length" directive invalid value'),
        ("ssi_types;", 'invalid number of arguments in "ssi_types" directive'),
    ],
)
def test_ssi_directive_errors(tmp_path: Path, line: str, error: str) -> None:
    text = f"daemon off;\nhttp {{ server {{ listen 127.0.0.1:1; location / {{ {line} }} }} }}"
    with pytest.raises(ConfigError) as err:
        load_conf(text, tmp_path)
    assert error in str(err.value)
    assert re.search(r"nginx.conf:2|\.conf:2", str(err.value))


def test_ssi_over_a_proxied_response(tmp_path: Path) -> None:
    page = b'X<!--#include virtual="/ret?x=2" -->Y<!--#echo var="uri" -->'
    with (Backends(respond(body=page, headers={"Content-Type": "text/html", "ETag": '"e"'})) as html_peer,
          Backends(respond(body=page, headers={"Content-Type": "text/plain"})) as text_peer):
        text = f"""daemon off; master_process off;
        http {{ server {{
            listen {{port0}};
            location /ret {{ return 200 "ret:$arg_x"; }}
            location /html/ {{ ssi on; proxy_pass http://{html_peer[0].addr}; }}
            location /text/ {{ ssi on; proxy_pass http://{text_peer[0].addr}; }}
        }} }}"""
        with Scriptlb(text, tmp_path) as lb:
            html = raw_exchange(lb.port, b"GET /html/p HTTP/1.0\r\n\r\n")
            plain = raw_exchange(lb.port, b"GET /text/p HTTP/1.0\r\n\r\n")
    head, _, body = html.partition(b"\r\n\r\n")
    assert body == b"Xret:2Y/html/p"
    assert b"Content-Length: %d\r\n" % len(body) in head and b"ETag" not in head
    assert plain.endswith(page)  # not an ssi_types type
