"""Nested locations, alias, absolute_redirect / server_name_in_redirect / port_in_redirect,
proxy_redirect and proxy_cookie_*: beside a real nginx where one is installed (the same config
and peer; what the client gets must match), and as pure functions."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from helpers import BackendRequest, Backends, Scriptlb, raw_exchange
from test_round_robin import NGINX, free_ports, nginx_running

from scriptlb.config.model import CookieFlagsConf, LocationConf, ProxyConf, TextRewrite
from scriptlb.config.templates import compile_template
from scriptlb.request.peer_rewrite import header_rewrite, parse_cookie
from scriptlb.routing.locations import LocationMatcher

# the peer answers every request with these headers (the path picks the set)
PEER_HEADERS = {
    "/loc": [("Location", "http://PEER/loc/x?a=b"), ("Refresh", "5; url=http://PEER/loc/r")],
    "/rel": [("Location", "/elsewhere")],
    "/regex": [("Location", "http://other/regex_w_caps/y")],
    "/cookie": [("Set-Cookie", "a=1; Domain=.peer.example; Path=/peer/x; Secure"),
                ("Set-Cookie", "b=2; path=/keep; SameSite=Lax"), ("Set-Cookie", "noequals")],
}


def peer():  # type: ignore[no-untyped-def]
    async def behaviour(req: BackendRequest, writer: asyncio.StreamWriter) -> bool:
        key = next((k for k in PEER_HEADERS if req.target.endswith(k)), "/rel")
        host = req.header("host") or ""  # (the peer's own address: proxy_pass's host)
        lines = [f"{name}: {value}".replace("PEER", host) for name, value in PEER_HEADERS[key]]
        writer.write(("HTTP/1.1 302 Found\r\nContent-Length: 0\r\n" + "".join(f"{line}\r\n" for line in lines)
                      + "\r\n").encode())
        await writer.drain()
        return True

    return behaviour


BLOCK = """
    server {{
        listen 127.0.0.1:{port};
        server_name main.test;
        root {root};
        location / {{ }}
        location /i/ {{ alias {root}/; }}
        location /ret {{ return 301 /to; }}
        location /ret/name {{ server_name_in_redirect on; return 301 /to; }}
        location /ret/port {{ port_in_redirect off; return 301 /to; }}
        location /ret/rel {{ absolute_redirect off; return 302 /to; }}
        location /auto/ {{ proxy_pass http://{peer}; }}
        location /p/ {{
            proxy_pass http://{peer}/;
            location /p/nested/ {{
                proxy_pass http://{peer};
                proxy_redirect http://PEER/ /moved/;
                proxy_redirect ~^http://other/regex_w_([^/]+)/(.*)$ /re/$1/$2;
                location /p/nested/deeper/ {{ proxy_pass http://{peer}; }}
            }}
            location ~ /p/off/ {{ proxy_pass http://{peer}; proxy_redirect off; }}
        }}
        location /def/ {{ proxy_pass http://{peer}/loc/; }}
        location /c/ {{
            proxy_pass http://{peer};
            proxy_cookie_domain peer.example front.example;
            proxy_cookie_path ~^/peer/(.*)$ /front/$1;
            proxy_cookie_flags a nosecure httponly samesite=strict;
            proxy_cookie_flags ~^B$ secure samesite=none;
        }}
        location ^~ /nr/ {{ return 200 "prefix"; location ~ x$ {{ return 200 "inner regex"; }} }}
        location ~ y$ {{ return 200 "outer regex"; }}
    }}
"""

REQUESTS = [
    ("/dir", "main.test"), ("/dir?a=b", "main.test"), ("/i/dir", "main.test"), ("/ret", "other.test"),
    ("/ret", None), ("/ret/name", "other.test"), ("/ret/port", "other.test"), ("/ret/rel", "x"),
    ("/auto", "main.test"), ("/def/loc", "main.test"), ("/p/nested/loc", "main.test"),
    ("/p/nested/regex", "main.test"),
    ("/p/nested/deeper/loc", "main.test"), ("/p/off/loc", "main.test"), ("/p/rel", "main.test"),
    ("/c/cookie", "main.test"), ("/nr/ax", "x"), ("/nr/ay", "x"), ("/zy", "x"),
]
KEPT = ("location", "refresh", "set-cookie")


def _answers(port: int, peer_port: int) -> list[list[str]]:
    out = []
    for path, host in REQUESTS:
        head = f"GET {path} HTTP/1.0\r\n" + (f"Host: {host}\r\n" if host else "") + "\r\n"
        raw = raw_exchange(port, head.encode())
        text = raw.decode("latin-1").replace(f":{port}", ":PORT").replace(str(peer_port), "PEERPORT")
        lines = text.split("\r\n\r\n")[0].split("\r\n")
        kept = [line for line in lines[1:] if line.split(":")[0].lower() in KEPT]
        body = text.split("\r\n\r\n", 1)[1] if lines[0].endswith("200 OK") else ""
        out.append([lines[0], *kept, body])
    return out


@pytest.mark.nginx
@pytest.mark.skipif(NGINX is None, reason="nginx is not installed")
def test_redirects_nested_locations_and_cookies_as_nginx(tmp_path: Path) -> None:
    (tmp_path / "site" / "dir").mkdir(parents=True)
    root = tmp_path / "site"
    port, = free_ports(1)
    with Backends(peer()) as bk:
        peer_addr = bk[0].addr
        peer_port = int(peer_addr.rsplit(":", 1)[1])
        ngx_dir, lb_dir = tmp_path / "nginx", tmp_path / "scriptlb"
        ngx_dir.mkdir()
        lb_dir.mkdir()
        block = BLOCK.format(port=port, root=root, peer=peer_addr).replace("PEER/", f"{peer_addr}/")
        with nginx_running(ngx_dir, block, [port]):
            theirs = _answers(port, peer_port)
        lb_block = block.replace(f"listen 127.0.0.1:{port};", "listen {port0};")
        with Scriptlb(f"daemon off; master_process off; error_log {lb_dir}/error.log info;\n"
                      f"http {{ {lb_block} }}", lb_dir) as lb:
            ours = _answers(lb.port, peer_port)
    for request, mine, nginx in zip(REQUESTS, ours, theirs, strict=True):
        assert mine == nginx, request
    # and what those are, so a change on both sides is noticed
    assert ours[0][:2] == ["HTTP/1.1 301 Moved Permanently", "Location: http://main.test:PORT/dir/"]
    assert ours[7][1] == "Location: /to"
    assert ours[9][1] == "Location: http://main.test:PORT/def/x?a=b"  # proxy_redirect default
    assert ours[10][1:3] == ["Location: http://main.test:PORT/moved/loc/x?a=b",
                             "Refresh: 5; url=/moved/loc/r"]
    assert ours[16][-1] == "inner regex" and ours[17][-1] == "prefix"


# --------------------------------------------------------------------------- pure functions


def _loc(modifier: str, pattern: str, *inner: LocationConf) -> LocationConf:
    marked = tuple(LocationConf(modifier=i.modifier, pattern=i.pattern, inner=i.inner, nested=True)
                   for i in inner)
    return LocationConf(modifier=modifier, pattern=pattern, inner=marked)


def test_nested_location_search_order() -> None:
    tree = [
        _loc("", "/a/", _loc("", "/a/b/"), _loc("~", r"\.php$"), _loc("=", "/a/exact")),
        _loc("^~", "/s/", _loc("~", r"\.jpg$")),
        _loc("~", r"\.jpg$", _loc("", "/")),
        _loc("", "/r/"),
    ]
    flat: list[LocationConf] = []
    for loc in tree:
        flat += [loc, *loc.inner]
    matcher = LocationMatcher(flat)

    def found(uri: str) -> tuple[str, str]:
        loc = matcher.match(uri)
        assert loc is not None
        return loc.modifier, loc.pattern

    assert found("/a/b/c") == ("", "/a/b/")  # the inner prefix replaces the outer one
    assert found("/a/x.php") == ("~", r"\.php$")  # an inner regex wins
    assert found("/a/exact") == ("=", "/a/exact")
    assert found("/a/b/x.jpg") == ("", "/")  # the outer regex, then its own inner prefix
    assert found("/s/x.jpg") == ("~", r"\.jpg$") and matcher.match("/s/x.jpg").nested  # type: ignore[union-attr]
    assert found("/r/x.jpg") == ("", "/")
    assert found("/r/x") == ("", "/r/")


def _proxy(**rules: object) -> ProxyConf:
    return ProxyConf(**rules)  # type: ignore[arg-type]


class _Ex:
    captures: tuple[str, ...] | None = None

    def absolute_location(self, location: bytes) -> bytes:
        return b"http://front" + location


def test_proxy_redirect_rules() -> None:
    rewrite = header_rewrite(_proxy(redirects=(
        TextRewrite("prefix", compile_template("/new/"), pattern=compile_template("http://peer/old/")),
        TextRewrite("regex", compile_template("https://$1/z"), regex=r"^http://(X+)/", caseless=True),
    )))
    assert rewrite is not None
    lines = b"Location: http://peer/old/a\r\nRefresh: 3;URL=http://peer/old/r\r\nX: http://peer/old/\r\n"
    assert rewrite(_Ex(), lines) == (b"Location: http://front/new/a\r\nRefresh: 3;URL=/new/r\r\n"
                                     b"X: http://peer/old/\r\n")
    assert rewrite(_Ex(), b"Location: http://xx/q\r\n") == b"Location: https://xx/z\r\n"
    assert rewrite(_Ex(), b"Location: http://other/\r\n") == b"Location: http://other/\r\n"
    assert header_rewrite(ProxyConf()) is None


def test_proxy_cookie_rules() -> None:
    rewrite = header_rewrite(_proxy(
        cookie_domains=(TextRewrite("domain", compile_template("b.example"),
                                    pattern=compile_template("A.example")),),
        cookie_paths=(TextRewrite("prefix", compile_template("/"), pattern=compile_template("/x/")),),
        cookie_flags=(CookieFlagsConf((compile_template("secure"), compile_template("nohttponly"),
                                       compile_template("bogus")), cookie=compile_template("S")),),
    ))
    assert rewrite is not None
    line = b"Set-Cookie: s=1;  domain=.a.example ; Path=/x/y; HttpOnly\r\n"
    assert rewrite(_Ex(), line) == b"Set-Cookie: s=1; domain=.b.example; Path=/y; Secure\r\n"
    untouched = b"Set-Cookie: t=1; Domain=c.example\r\n"
    assert rewrite(_Ex(), untouched) == untouched
    assert parse_cookie("a = 1 ;b;c=") == [["a", "1"], ["b", None], ["c", ""]]
