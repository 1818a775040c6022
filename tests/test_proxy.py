"""Integration tests of the proxy on real sockets: scriptlb in a thread, asyncio backends that
misbehave on demand, a blocking raw-socket client."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import (
    Backends,
    HttpConnection,
    Scriptlb,
    build_request,
    close_now,
    closed_port,
    echo,
    get,
    hang,
    raw,
    raw_exchange,
    respond,
)

KEEPALIVE = """
    proxy_http_version 1.1;
    proxy_set_header Connection "";
"""


def conf(upstream: str, location: str = "", http: str = "") -> str:
    return f"""
daemon off;
master_process off;
error_log {{tmp}}/error.log info;
http {{
    {http}
    upstream u {{
        {upstream}
    }}
    server {{
        listen 127.0.0.1:{{port0}};
        location / {{
            proxy_pass http://u;
            {location}
        }}
        location /ret {{
            return 200 "returned $uri\\n";
        }}
    }}
}}
"""


def servers(*backends: object, extra: str = "") -> str:
    return "\n".join(f"server {b.addr} {extra};" for b in backends)  # type: ignore[attr-defined]


def run(text: str, tmp_path: Path) -> Scriptlb:
    return Scriptlb(text, tmp_path, tmp=tmp_path)


# --------------------------------------------------------------------------- basics


def test_round_robin_rotation_and_upstream_keepalive(tmp_path: Path) -> None:
    with Backends(respond(body=b"a"), respond(body=b"b"), respond(body=b"c")) as bk:
        text = conf(servers(bk[0], extra="weight=5") + servers(bk[1], bk[2]) + "keepalive 8;", KEEPALIVE)
        with run(text, tmp_path) as lb, HttpConnection(lb.port) as client:
            bodies = [client.request("GET", "/").body.decode() for _ in range(14)]
        assert " ".join(bodies) == "a a b a c a a a a b a c a a"
        # one upstream connection per backend, reused for every request
        assert [b.connections for b in bk] == [1, 1, 1]


def test_no_pooling_without_the_nginx_recipe(tmp_path: Path) -> None:
    with (
        Backends(respond(body=b"a")) as bk,
        run(conf(servers(bk[0]) + "keepalive 8;"), tmp_path) as lb,
        HttpConnection(lb.port) as client,
    ):
        for _ in range(3):
            assert client.request("GET", "/").status == 200
        assert bk[0].connections == 3  # nginx's default "Connection: close" to the upstream
        assert bk[0].requests[0].header("connection") == "close"
        assert bk[0].requests[0].version == "1.0"


def test_request_headers_sent_upstream(tmp_path: Path) -> None:
    with Backends(echo()) as bk:
        location = KEEPALIVE + 'proxy_set_header X-Real-IP $remote_addr; proxy_set_header X-Empty "";'
        with run(conf(servers(bk[0]), location), tmp_path) as lb:
            response = get(lb.port, "/p?q=1", headers={
                "Host": "example.test", "X-Custom": "yes", "X-Empty": "dropped",
                "Connection": "keep-alive, X-Hop", "X-Hop": "hop", "Keep-Alive": "300", "TE": "trailers",
            })
        text = response.body.decode()
        head = text.split("\n\n")[0].split("\n")
        assert head[0] == "GET /p?q=1 HTTP/1.1"
        names = [line.split(":")[0].lower() for line in head[1:]]
        assert "Host: u\n" in text  # Host $proxy_host: the upstream's name
        assert "x-custom" in names and "x-real-ip" in names
        for hop in ("x-empty", "x-hop", "keep-alive", "te", "connection"):
            assert hop not in names


def test_proxy_pass_uri_replaces_location_prefix(tmp_path: Path) -> None:
    with Backends(echo()) as bk:
        text = f"""
daemon off; master_process off; error_log {{tmp}}/error.log info;
http {{
    server {{
        listen 127.0.0.1:{{port0}};
        location /app/ {{ proxy_pass http://{bk[0].addr}/base/; }}
    }}
}}
"""
        with run(text, tmp_path) as lb:
            response = get(lb.port, "/app/x/y?z=1")
        assert response.body.startswith(b"GET /base/x/y?z=1 HTTP/1.0\n")


def test_return_location_and_client_keepalive(tmp_path: Path) -> None:
    with (
        Backends(respond()) as bk,
        run(conf(servers(bk[0])), tmp_path) as lb,
        HttpConnection(lb.port) as client,
    ):
        for i in range(3):
            response = client.request("GET", f"/ret{i}")
            assert response.status == 200
            assert response.body == f"returned /ret{i}\n".encode()
            assert response.header("connection") == "keep-alive"
            assert response.header("server") == "scriptlb"


def test_response_headers_rewritten(tmp_path: Path) -> None:
    headers = {"Server": "backend/1.0", "X-Accel-Expires": "10", "X-Kept": "1", "Connection": "X-Secret",
               "X-Secret": "s", "Date": "Mon, 01 Jan 2001 00:00:00 GMT"}
    with Backends(respond(headers=headers)) as bk, run(conf(servers(bk[0])), tmp_path) as lb:
        response = get(lb.port, "/")
    names = [name.lower() for name, _ in response.headers]
    assert response.header("server") == "scriptlb"
    assert response.header("x-kept") == "1"
    assert "x-accel-expires" not in names and "x-secret" not in names
    assert names.count("date") == 1 and "2001" not in (response.header("date") or "")


# --------------------------------------------------------------------------- failures and retries


def test_refused_port_fails_over_to_next_peer(tmp_path: Path) -> None:
    dead = closed_port()
    with Backends(respond(body=b"alive")) as bk:
        text = conf(f"server 127.0.0.1:{dead};" + servers(bk[0]))
        with run(text, tmp_path) as lb:
            assert get(lb.port, "/").body == b"alive"
        log = (tmp_path / "error.log").read_text()
        assert ("connect() failed (111: Connection refused) while connecting to upstream, "
                "client: 127.0.0.1") in log
        assert f'upstream: "http://127.0.0.1:{dead}/"' in log


def test_all_refused_gives_502_page(tmp_path: Path) -> None:
    text = conf(f"server 127.0.0.1:{closed_port()}; server 127.0.0.1:{closed_port()};")
    with run(text, tmp_path) as lb:
        response = get(lb.port, "/")
    assert response.status == 502
    assert b"<title>502 Bad Gateway</title>" in response.body
    assert response.header("content-type") == "text/html"


def test_5xx_retried_only_when_listed(tmp_path: Path) -> None:
    with (
        Backends(respond(502, b"bad"), respond(200, b"good")) as bk,
        run(conf(servers(*bk), "proxy_next_upstream error http_502;"), tmp_path) as lb,
    ):
        assert [get(lb.port, "/").body for _ in range(2)] == [b"good", b"good"]
    with (
        Backends(respond(502, b"bad"), respond(200, b"good")) as bk,
        run(conf(servers(*bk)), tmp_path) as lb,
    ):
        first = get(lb.port, "/")
        assert (first.status, first.body) == (502, b"bad")  # the upstream's own response


def test_last_try_passes_upstream_status_response_through(tmp_path: Path) -> None:
    with (
        Backends(respond(503, b"busy1"), respond(503, b"busy2")) as bk,
        run(conf(servers(*bk), "proxy_next_upstream http_503;"), tmp_path) as lb,
    ):
        response = get(lb.port, "/")
    assert response.status == 503
    assert response.body in (b"busy1", b"busy2")
    assert len(bk[0].requests) + len(bk[1].requests) == 2


def test_hanging_backend_times_out_with_504(tmp_path: Path) -> None:
    with (
        Backends(hang()) as bk,
        run(conf(servers(bk[0]), "proxy_read_timeout 200ms;"), tmp_path) as lb,
    ):
        response = get(lb.port, "/")
    assert response.status == 504
    log = (tmp_path / "error.log").read_text()
    assert "upstream timed out (110: Connection timed out) while reading response header from upstream" in log


def test_backend_closing_early_gives_502(tmp_path: Path) -> None:
    with Backends(close_now()) as bk, run(conf(servers(bk[0])), tmp_path) as lb:
        response = get(lb.port, "/")
    assert response.status == 502
    log = (tmp_path / "error.log").read_text()
    assert "upstream prematurely closed connection while reading response header from upstream" in log


def test_garbage_backend_gives_502_invalid_header(tmp_path: Path) -> None:
    with (
        Backends(raw(b"\x00\x01garbage\r\n\r\n")) as bk,
        run(conf(servers(bk[0])), tmp_path) as lb,
    ):
        response = get(lb.port, "/")
    assert response.status == 502
    log = (tmp_path / "error.log").read_text()
    assert "upstream sent invalid header while reading response header from upstream" in log


def test_backend_closing_mid_body_closes_client_connection(tmp_path: Path) -> None:
    truncated = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10
    with (
        Backends(raw(truncated)) as bk,
        run(conf(servers(bk[0])), tmp_path) as lb,
        HttpConnection(lb.port) as client,
    ):
        response = client.request("GET", "/")
        assert response.status == 200
        assert not response.complete  # never a silently "complete" response
        assert response.body == b"x" * 10
    log = (tmp_path / "error.log").read_text()
    assert "upstream prematurely closed connection while reading upstream" in log


def test_chunked_body_truncated_by_backend_aborts_client(tmp_path: Path) -> None:
    truncated = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
    with (
        Backends(raw(truncated)) as bk,
        run(conf(servers(bk[0])), tmp_path) as lb,
        HttpConnection(lb.port) as client,
    ):
        response = client.request("GET", "/")
    assert response.status == 200 and not response.complete and response.body == b"hello"


# --------------------------------------------------------------------------- framing


def test_chunked_response_reframed_for_11_and_close_delimited_for_10(tmp_path: Path) -> None:
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    with (
        Backends(raw(chunked, close=False)) as bk,
        run(conf(servers(bk[0])), tmp_path) as lb,
        HttpConnection(lb.port) as client,
    ):
        response = client.request("GET", "/")
        assert response.body == b"hello world"
        assert response.header("transfer-encoding") == "chunked"
        assert client.request("GET", "/").body == b"hello world"  # still keep-alive
        with HttpConnection(lb.port) as client:
            response = client.request("GET", "/", version="1.0")
            assert response.body == b"hello world"
            assert response.header("transfer-encoding") is None
            assert response.header("connection") == "close"


def test_close_delimited_upstream_body(tmp_path: Path) -> None:
    backend = raw(b"HTTP/1.0 200 OK\r\n\r\nuntil close")
    with Backends(backend) as bk, run(conf(servers(bk[0])), tmp_path) as lb:
        response = get(lb.port, "/")
    assert response.body == b"until close"


def test_chunked_request_body_is_buffered_and_sent_with_length(tmp_path: Path) -> None:
    with Backends(echo()) as bk, run(conf(servers(bk[0])), tmp_path) as lb:
        request = (b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                   b"3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n")
        with HttpConnection(lb.port) as client:
            client.send(request)
            response = client.read_response()
    assert bk[0].requests[0].body == b"abcdefg"
    assert bk[0].requests[0].header("content-length") == "7"
    assert bk[0].requests[0].header("transfer-encoding") is None
    assert response.body.endswith(b"\n\nabcdefg")


def test_expect_100_continue(tmp_path: Path) -> None:
    with (
        Backends(echo()) as bk,
        run(conf(servers(bk[0])), tmp_path) as lb,
        HttpConnection(lb.port) as client,
    ):
        client.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        interim = client.sock.recv(100)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        client.send(b"hello")
        response = client.read_response()
    assert response.status == 200 and response.body.endswith(b"hello")
    assert bk[0].requests[0].header("expect") is None


def test_head_has_no_body_and_connection_is_reused(tmp_path: Path) -> None:
    with (
        Backends(respond(body=b"0123456789")) as bk,
        run(conf(servers(bk[0])), tmp_path) as lb,
        HttpConnection(lb.port) as client,
    ):
        response = client.request("HEAD", "/")
        assert response.status == 200 and response.body == b""
        assert response.header("content-length") == "10"
        assert client.request("GET", "/").body == b"0123456789"


def test_pipelined_requests_answered_in_order(tmp_path: Path) -> None:
    with (
        Backends(echo()) as bk,
        run(conf(servers(bk[0])), tmp_path) as lb,
        HttpConnection(lb.port) as client,
    ):
        client.send(b"".join(build_request("GET", f"/{p}") for p in ("one", "ret", "two", "three")))
        bodies = [client.read_response().body for _ in range(4)]
    assert bodies[0].startswith(b"GET /one ")
    assert bodies[1] == b"returned /ret\n"
    assert bodies[2].startswith(b"GET /two ")
    assert bodies[3].startswith(b"GET /three ")


def test_client_max_body_size_413(tmp_path: Path) -> None:
    with (
        Backends(echo()) as bk,
        run(conf(servers(bk[0]), "client_max_body_size 10;"), tmp_path) as lb,
    ):
        data = raw_exchange(lb.port, build_request("POST", "/", body=b"x" * 11))
        assert data.startswith(b"HTTP/1.1 413 Request Entity Too Large\r\n")
        assert b"Connection: close" in data
        chunked = (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                   b"8\r\n12345678\r\n8\r\n12345678\r\n0\r\n\r\n")
        assert raw_exchange(lb.port, chunked).startswith(b"HTTP/1.1 413 ")
        assert get(lb.port, "/", method="POST", body=b"x" * 10).status == 200
    assert len(bk[0].requests) == 1


# --------------------------------------------------------------------------- return, routing


RETURNS = """
daemon off;
master_process off;
error_log {tmp}/error.log info;
http {
    server {
        listen 127.0.0.1:{port0};
        server_name example.test;
        location = /moved { return 301 /new/place; }
        location = /away { return 302 http://elsewhere.test/x; }
        location = /gone { return 444; }
        location = /teapot { return 418; }
        location = /empty { return 204; }
        location /dir/ { proxy_pass http://127.0.0.1:{dead}; }
    }
    server {
        listen 127.0.0.1:{port0};
        server_name other.test;
        location / { return 200 "other $host $server_name\\n"; }
    }
}
"""


def test_return_redirects_pages_and_444(tmp_path: Path) -> None:
    with Scriptlb(RETURNS, tmp_path, tmp=tmp_path, dead=closed_port()) as lb:
        moved = get(lb.port, "/moved", headers={"Host": "example.test"})
        assert moved.status == 301
        assert moved.header("location") == f"http://example.test:{lb.port}/new/place"
        assert b"<title>301 Moved Permanently</title>" in moved.body
        assert get(lb.port, "/away").header("location") == "http://elsewhere.test/x"
        teapot = get(lb.port, "/teapot")
        assert teapot.status == 418
        empty = get(lb.port, "/empty")
        assert (empty.status, empty.body) == (204, b"")
        assert raw_exchange(lb.port, build_request("GET", "/gone")) == b""  # closed, no response
        # nginx's automatic redirect for a proxied prefix location without its slash
        assert get(lb.port, "/dir?a=1").header("location") == f"http://localhost:{lb.port}/dir/?a=1"


def test_server_selected_by_host_and_invalid_host_is_400(tmp_path: Path) -> None:
    with (
        Scriptlb(RETURNS, tmp_path, tmp=tmp_path, dead=closed_port()) as lb,
        HttpConnection(lb.port) as client,
    ):
        other = client.request("GET", "/", headers={"Host": "Other.Test:8080"})
        assert other.body == b"other other.test other.test\n"
        again = client.request("GET", "/", headers={"Host": "Other.Test:8080"})  # cached route
        assert again.body == other.body
        assert client.request("GET", "/", headers={"Host": "bad/host"}).status == 400
        assert client.is_closed_by_peer()


def test_x_forwarded_for_and_dynamic_headers(tmp_path: Path) -> None:
    with Backends(echo()) as bk:
        location = ("proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for; "
                    "proxy_set_header X-Uri $uri; proxy_set_header Host $host;")
        with run(conf(servers(bk[0]), location), tmp_path) as lb:
            body = get(lb.port, "/a%20b", headers={"Host": "front.test", "X-Forwarded-For": "10.0.0.1"}).body
    text = body.decode()
    assert "X-Forwarded-For: 10.0.0.1, 127.0.0.1\n" in text
    assert "X-Uri: /a b\n" in text
    assert "Host: front.test\n" in text
    assert text.startswith("GET /a%20b HTTP/1.0\n")  # the client's URI as sent


def test_unix_socket_peer(tmp_path: Path) -> None:
    import asyncio
    import socket as socketlib

    path = tmp_path / "peer.sock"
    unix = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
    unix.bind(str(path))
    unix.listen(8)
    with Backends(respond(body=b"via unix")) as bk:
        bk[0].server.close()  # type: ignore[union-attr]

        async def serve() -> None:
            bk[0].server = await asyncio.start_unix_server(bk[0].handle, sock=unix)

        bk.run(serve())
        with run(conf(f"server unix:{path};"), tmp_path) as lb:
            assert get(lb.port, "/").body == b"via unix"


def test_empty_post_keeps_its_content_length(tmp_path: Path) -> None:
    with Backends(echo()) as bk, run(conf(servers(bk[0])), tmp_path) as lb:
        assert get(lb.port, "/", method="POST", headers={"Content-Length": "0"}).status == 200
        assert get(lb.port, "/", method="GET").status == 200
    assert bk[0].requests[0].header("content-length") == "0"
    assert bk[0].requests[1].header("content-length") is None


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("/a/b", "/a/b"),
        ("/a//b/./c/", "/a/b/c/"),
        ("/a/b/../c", "/a/c"),
        ("/a%20b/%2e%2e/c", "/c"),
        ("/..", None),
        ("/a/%00", None),
        ("/a/..", "/"),
        ("/a/b%", None),  # an escape without its two hex digits: 400, as nginx
        ("/a/b%1", None),
        ("/a/b%zz", None),
    ],
)
def test_uri_normalization(raw: str, normalized: str | None) -> None:
    from scriptlb.routing.uri import normalize_uri

    assert normalize_uri(raw) == normalized


@pytest.mark.parametrize(
    ("target", "split"),
    [
        (b"/a?x=1", ("/a", "x=1")),
        (b"/a/.#frag", ("/a/.", None)),  # the fragment is dropped
        (b"/a?x#frag", ("/a", "x")),
        (b"http://h", ("/", None)),
        (b"http://h?args#f", ("/", "args")),
        (b"http://h:80/p?q", ("/p", "q")),
        (b"h/p", None),
    ],
)
def test_request_target_split(target: bytes, split: tuple[str, str | None] | None) -> None:
    from scriptlb.routing.uri import split_target

    assert split_target(target) == split


def test_location_match_memo_gives_the_matchers_answer_and_stays_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    from helpers import load_conf

    from scriptlb.request import runtime as runtime_module
    from scriptlb.request.runtime import Runtime

    monkeypatch.setattr(runtime_module, "_MATCH_CACHE_SIZE", 8)
    conf = load_conf(f"""
        daemon off; master_process off; error_log {tmp_path}/error.log;
        http {{
            server {{
                listen 127.0.0.1:1;
                location = /exact {{ return 200 exact; }}
                location /a/ {{ return 200 a; }}
                location ~ \\.png$ {{ return 200 png; }}
                location / {{ return 200 root; }}
            }}
        }}
    """, tmp_path)
    loop = asyncio.new_event_loop()
    try:
        server = next(iter(Runtime(conf, loop).servers.values()))
        uris = ["/exact", "/a/x", "/a/x.png", "/b", "/a", *(f"/n{i}" for i in range(30))]
        for _ in range(2):  # the second round is answered from the memo (where it kept them)
            got = [server.match(uri).conf.pattern for uri in uris]
            assert got[:5] == ["/exact", "/a/", "\\.png$", "/", "/"]
            assert set(got[5:]) == {"/"}
            assert len(server.matched) <= 8
    finally:
        loop.close()


@pytest.mark.parametrize(
    ("target", "host"),
    [
        (b"http://h:8/p", b"h:8"),
        (b"http://[::1]:8/", b"[::1]:8"),
        (b"http://[v1.a!$&'()*+,;=-._~:]/", b"[v1.a!$&'()*+,;=-._~:]"),  # IPvFuture
        (b"http://h h/", None),
    ],
)
def test_absolute_form_host(target: bytes, host: bytes | None) -> None:
    from scriptlb.routing.uri import absolute_host

    assert absolute_host(target) == host
