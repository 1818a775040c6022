"""try_files, limit_except, expires, add_trailer, unique request headers, error_page's status
after a redirect and an intercepted 401: beside a real nginx where one is installed (the same
config; the client must get the same answer), plus config errors with file:line."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
from helpers import BackendRequest, Backends, Scriptlb, raw_exchange
from test_compat_directives import conf, load
from test_round_robin import NGINX, free_ports, nginx_running

from scriptlb.config import ConfigError

BLOCK = """
    server {{
        listen 127.0.0.1:{port};
        server_name main.test;
        root {root};
        location / {{ try_files $uri $uri/ /fallback?from=$uri; }}
        location /code/ {{ try_files /nothing =418; }}
        location /named/ {{ try_files /nothing @named; }}
        location @named {{ return 200 "named $uri $args"; }}
        location /fallback {{ return 200 "fallback $uri $args"; }}
        location /files/ {{ alias {root}/sub/; try_files $uri =404; }}
        location /lim {{ limit_except GET {{ deny all; }} return 200 "allowed $request_method"; }}
        location /lim2 {{ deny all; limit_except GET {{ allow 127.0.0.1; }} proxy_pass http://{peer}; }}
        location /exp/epoch {{ expires epoch; return 200 x; }}
        location /exp/max {{ expires max; add_header Cache-Control extra; return 200 x; }}
        location /exp/neg {{ expires -1h; return 200 x; }}
        location /exp/err {{ expires 1h; return 404; }}
        location /exp/var {{ expires $arg_e; return 200 x; }}
        location /exp/peer {{ expires epoch; proxy_pass http://{peer}; }}
        location /trailer {{
            add_trailer X-T one;
            add_trailer X-T two;
            add_trailer X-Seen $sent_trailer_x_t;  # (1.22 gives the first; newer nginx all)
            return 200 body;
        }}
        location /unique {{ return 204; }}
        location /err {{ error_page 404 /dir; return 404; }}
        location /dir {{ }}
        location /auth {{ proxy_pass http://{peer}; proxy_intercept_errors on; error_page 401 /denied; }}
        location /denied {{ return 200 "denied page"; }}
        location /xar {{ proxy_pass http://{peer}; }}
        location /xar-off {{ proxy_pass http://{peer}; proxy_ignore_headers X-Accel-Redirect; }}
        location /after-xar {{ return 200 "after $request_method $uri $args"; }}
        location /bind {{ proxy_bind $arg_b; proxy_pass http://127.0.0.1:{port}/ip; }}
        location /bind-off {{ proxy_bind off; proxy_pass http://127.0.0.1:{port}/ip; }}
        location /ip {{ return 200 "from $remote_addr"; }}
    }}
"""

REQUESTS = [
    b"GET /a.html HTTP/1.0\r\n\r\n",
    b"GET /dir HTTP/1.0\r\nHost: main.test\r\n\r\n",
    b"GET /dir/ HTTP/1.0\r\n\r\n",
    b"GET /missing?x=1 HTTP/1.0\r\n\r\n",
    b"GET /code/x HTTP/1.0\r\n\r\n",
    b"GET /named/x?y=2 HTTP/1.0\r\n\r\n",
    b"GET /files/b.txt HTTP/1.0\r\n\r\n",
    b"GET /files/nope HTTP/1.0\r\n\r\n",
    b"GET /lim HTTP/1.0\r\n\r\n",
    b"HEAD /lim HTTP/1.0\r\n\r\n",
    b"POST /lim HTTP/1.0\r\nContent-Length: 0\r\n\r\n",
    b"GET /exp/epoch HTTP/1.0\r\n\r\n",
    b"GET /exp/max HTTP/1.0\r\n\r\n",
    b"GET /exp/neg HTTP/1.0\r\n\r\n",
    b"GET /exp/err HTTP/1.0\r\n\r\n",
    b"GET /exp/var?e=max HTTP/1.0\r\n\r\n",
    b"GET /exp/var?e=bogus HTTP/1.0\r\n\r\n",
    b"GET /exp/peer HTTP/1.0\r\n\r\n",
    b"GET /trailer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"GET /trailer HTTP/1.0\r\n\r\n",
    b"GET /unique HTTP/1.0\r\nIf-Match: a\r\nIf-Match: b\r\n\r\n",
    b"GET /unique HTTP/1.0\r\nAuthorization: a\r\nauthorization: b\r\n\r\n",
    b"GET /unique HTTP/1.0\r\nTransfer-Encoding: foo\r\nTransfer-Encoding: bar\r\n\r\n",
    b"GET /unique HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"GET /err HTTP/1.0\r\nHost: main.test\r\n\r\n",
    b"GET /auth HTTP/1.0\r\n\r\n",
    b"POST /xar HTTP/1.0\r\nContent-Length: 0\r\n\r\n",
    b"GET /xar-off HTTP/1.0\r\n\r\n",
    b"GET /xar/unsafe HTTP/1.0\r\n\r\n",
    b"GET /xar/loop HTTP/1.0\r\n\r\n",
    b"POST /unique HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
    b"POST /unique HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"GET /bind?b=127.0.0.2 HTTP/1.0\r\n\r\n",
    b"GET /bind HTTP/1.0\r\n\r\n",
    b"GET /bind-off HTTP/1.0\r\n\r\n",
    b"GET /lim2 HTTP/1.0\r\n\r\n",
    b"DELETE /lim2 HTTP/1.0\r\n\r\n",
]
# what may differ between two servers: the date, our Server name, the listening port
_VOLATILE = re.compile(rb"^(Date|Server|Expires|Last-Modified|ETag): .*\r\n", re.M | re.I)


def peer():  # type: ignore[no-untyped-def]
    async def behaviour(req: BackendRequest, writer: asyncio.StreamWriter) -> bool:
        if req.target.startswith("/xar"):
            target = {"/xar/unsafe": b"/after-xar/../x", "/xar/loop": b"/xar/loop"}.get(
                req.target, b"/after%2Dxar?q=1")
            head = (b"HTTP/1.1 200 OK\r\nX-Accel-Redirect: " + target + b"\r\nContent-Type: text/kept\r\n"
                    b"Set-Cookie: c=1\r\nX-Dropped: 1\r\n")
        elif req.target.startswith("/auth"):
            # (one challenge: nginx 1.22 keeps only the first; newer nginx, the suite and we, all)
            head = b"HTTP/1.1 401 No\r\nWWW-Authenticate: Basic realm=a\r\n"
        else:
            head = b"HTTP/1.1 200 OK\r\nCache-Control: private\r\nCache-Control: more\r\nExpires: never\r\n"
        writer.write(head + b"Content-Length: 2\r\n\r\nok")
        await writer.drain()
        return True

    return behaviour


def _answers(port: int) -> list[bytes]:
    return [_VOLATILE.sub(b"", raw_exchange(port, request)).replace(b":%d/" % port, b":PORT/")
            for request in REQUESTS]


def _comparable(answer: bytes) -> tuple[bytes, list[bytes], bytes]:
    """(status line, header lines in order per name, body): nginx and scriptlb order the
    headers of different names differently; nginx's pages name nginx, ours scriptlb."""
    head, _, body = answer.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    if b"<hr><center>" in body:  # (the page's length differs with the server's name)
        lines = [line for line in lines if not line.lower().startswith(b"content-length:")]
    order = sorted(range(len(lines)), key=lambda i: (lines[i].split(b":")[0].lower(), i))
    body = re.sub(rb"<hr><center>(nginx/[0-9.]+|scriptlb)</center>", b"<hr><center>X</center>", body)
    return status, [lines[i] for i in order], body


@pytest.mark.nginx
@pytest.mark.skipif(NGINX is None, reason="nginx is not installed")
def test_phases_and_header_filters_as_nginx(tmp_path: Path) -> None:
    root = tmp_path / "site"
    (root / "dir").mkdir(parents=True)
    (root / "sub").mkdir()
    (root / "a.html").write_text("file a")
    (root / "sub" / "b.txt").write_text("file b")
    port, = free_ports(1)
    with Backends(peer()) as bk:
        ngx_dir, lb_dir = tmp_path / "nginx", tmp_path / "scriptlb"
        ngx_dir.mkdir()
        lb_dir.mkdir()
        block = BLOCK.format(port=port, root=root, peer=bk[0].addr)
        with nginx_running(ngx_dir, block, [port]):
            theirs = _answers(port)
        lb_block = block.replace(f"listen 127.0.0.1:{port};", "listen {port0};").replace(
            f"127.0.0.1:{port}/", "127.0.0.1:{port0}/")
        with Scriptlb(f"daemon off; master_process off; error_log {lb_dir}/error.log info;\n"
                      f"http {{ {lb_block} }}", lb_dir) as lb:
            ours = [answer.replace(b":%d/" % lb.port, b":PORT/") for answer in _answers(lb.port)]
    theirs[18] = theirs[18].replace(b"X-Seen: one\r\n", b"X-Seen: one, two\r\n")
    for request, mine, nginx in zip(REQUESTS, ours, theirs, strict=True):
        assert _comparable(mine) == _comparable(nginx), request
    # and what some of those are, so a change on both sides is noticed
    assert ours[3].endswith(b"fallback /fallback from=/missing")
    assert ours[4].startswith(b"HTTP/1.1 418")
    assert ours[10].startswith(b"HTTP/1.1 403")
    assert b"Cache-Control: no-cache\r\n" in ours[11]
    assert b"Transfer-Encoding: chunked" in ours[18] and ours[18].endswith(
        b"4\r\nbody\r\n0\r\nX-T: one\r\nX-T: two\r\nX-Seen: one, two\r\n\r\n")
    assert ours[20].startswith(b"HTTP/1.1 400") and ours[23].startswith(b"HTTP/1.1 501")
    assert ours[24].startswith(b"HTTP/1.1 301")  # the target's own redirect, not the 404
    assert b"WWW-Authenticate: Basic realm=a\r\n" in ours[25]
    assert ours[26].endswith(b"after GET /after-xar q=1") and b"Content-Type: text/kept" in ours[26]
    assert b"X-Dropped" not in ours[26] and b"Set-Cookie: c=1" in ours[26]
    assert ours[27].endswith(b"ok") and ours[28].startswith(b"HTTP/1.1 404")
    assert ours[29].startswith(b"HTTP/1.1 500")  # a redirect cycle: 10 at most
    assert ours[30].startswith(b"HTTP/1.1 501") and ours[31].startswith(b"HTTP/1.1 400")
    assert ours[32].endswith(b"from 127.0.0.2") and ours[33].endswith(b"from 127.0.0.1")
    assert ours[-2].startswith(b"HTTP/1.1 403") and ours[-1].endswith(b"ok")  # the block's rules only


@pytest.mark.parametrize(
    ("line", "error"),
    [
        ("location / { try_files x; }", 'invalid number of arguments in "try_files" directive'),
        ("location / { try_files x =abc; }", 'invalid code "=abc"'),
        ("location / { try_files x =1000; }", 'invalid code "=1000"'),
        ("location / { try_files x y; try_files x y; }", '"try_files" directive is duplicate'),
        ("location / { limit_except FOO { } }", 'invalid method "FOO"'),
        ("location / { limit_except GET { return 200; } }", '"return" directive is not allowed here'),
        ("location / { limit_except GET { } limit_except POST { } }",
         '"limit_except" directive is duplicate'),
        ("limit_except GET { }", '"limit_except" directive is not allowed here'),
        ("location / { expires 1x; }", '"expires" directive invalid value'),
        ("location / { expires later 1h; }", '"expires" directive invalid value'),
        ("location / { expires @25h; }", '"expires" directive daily time value must be less than 24 hours'),
        ("location / { expires modified @1h; }",
         '"expires" directive daily time cannot be used with "modified" parameter'),
        ("location / { expires 1h; expires 2h; }", '"expires" directive is duplicate'),
        ("proxy_bind 127.0.0.1 transparent;",
         'the "transparent" parameter of "proxy_bind" is not supported by scriptlb'),
        ("proxy_bind nowhere;", 'invalid address "nowhere"'),
        ("proxy_bind off; proxy_bind off;", '"proxy_bind" directive is duplicate'),
        ("location / { add_trailer X; }", 'invalid number of arguments in "add_trailer" directive'),
        ("location / { add_trailer X $nope; }", 'unknown "nope" variable'),
    ],
)
def test_config_errors(tmp_path: Path, line: str, error: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(conf(line), tmp_path)
    assert error in str(err.value) and ".conf:" in str(err.value)


def test_request_body_of_a_streamed_body(tmp_path: Path) -> None:
    """proxy_request_buffering off: $request_body is what came with the head (nginx's
    rb->bufs when proxying starts), here the whole body."""
    from helpers import get, respond

    with Backends(respond(body=b"peer")) as bk:
        text = conf(f"""
            proxy_request_buffering off;
            location / {{ add_header X-Body "$request_body"; proxy_pass http://{bk[0].addr}; }}
        """)
        with Scriptlb(text.replace("{tmp}", str(tmp_path)), tmp_path, tmp=tmp_path) as lb:
            with_body = get(lb.port, "/", method="POST", body=b"0123456789")
            without = get(lb.port, "/")
    assert with_body.header("x-body") == "0123456789" and with_body.body == b"peer"
    assert without.header("x-body") is None
    assert bk[0].requests[0].body == b"0123456789"
