"""nginx directives that real configs (and nginx's own test suite) rely on: add_header, static
files (root, index), accepted tuning directives. Real sockets, scriptlb in a thread."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import Backends, Scriptlb, get, load_conf, raw, respond

from scriptlb.config import ConfigError


def conf(body: str, http: str = "") -> str:
    return f"""
daemon off;
master_process off;
error_log {{tmp}}/error.log info;
http {{
    {http}
    server {{
        listen 127.0.0.1:{{port0}};
        {body}
    }}
}}
"""


def load(text: str, tmp_path: Path) -> None:
    load_conf(text.replace("{tmp}", str(tmp_path)).replace("{port0}", "1"), tmp_path)


def run(text: str, tmp_path: Path) -> Scriptlb:
    return Scriptlb(text, tmp_path, tmp=tmp_path)


# --------------------------------------------------------------------------- add_header


def test_add_header_on_return_proxy_and_inheritance(tmp_path: Path) -> None:
    with Backends(respond(headers={"X-Peer": "1"})) as bk:
        text = conf(f"""
            add_header X-Server "s $uri";
            location /own {{ add_header X-Own own; return 204; }}
            location /inherit {{ return 200 ok; }}
            location /proxy {{ add_header X-Up $upstream_addr; proxy_pass http://{bk[0].addr}; }}
        """)
        with run(text, tmp_path) as lb:
            own = get(lb.port, "/own")
            inherited = get(lb.port, "/inherit")
            proxied = get(lb.port, "/proxy")
    assert own.status == 204 and own.header("x-own") == "own"
    assert own.header("x-server") is None  # a level's list replaces the inherited one
    assert inherited.header("x-server") == "s /inherit"
    assert proxied.header("x-peer") == "1" and proxied.header("x-up") == bk[0].addr


def test_add_header_always_and_error_statuses(tmp_path: Path) -> None:
    text = conf("""
        location /plain { add_header X-A a; return 404; }
        location /always { add_header X-A a always; add_header X-Empty $arg_none always; return 404; }
    """)
    with run(text, tmp_path) as lb:
        plain = get(lb.port, "/plain")
        always = get(lb.port, "/always")
    assert plain.status == 404 and plain.header("x-a") is None
    assert always.status == 404 and always.header("x-a") == "a"
    assert always.header("x-empty") is None  # an empty value adds nothing


@pytest.mark.parametrize(
    ("line", "error"),
    [
        ("add_header X;", 'invalid number of arguments in "add_header" directive'),
        ("add_header X y sometimes;", 'invalid parameter "sometimes"'),
        ("add_header X $nope;", 'unknown "nope" variable'),
    ],
)
def test_add_header_errors(tmp_path: Path, line: str, error: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(conf(f"location / {{ {line} return 204; }}"), tmp_path)
    assert error in str(err.value) and ".conf:" in str(err.value)


# --------------------------------------------------------------------------- static files


def test_static_files_index_redirect_and_methods(tmp_path: Path) -> None:
    root = tmp_path / "site"
    (root / "dir").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "index.html").write_text("home")
    (root / "dir" / "a.txt").write_text("file a")
    text = conf(f"root {root}; location / {{ }}")
    with run(text, tmp_path) as lb:
        home = get(lb.port, "/")
        a = get(lb.port, "/dir/a.txt")
        head = get(lb.port, "/dir/a.txt", method="HEAD")
        missing = get(lb.port, "/nope")
        redirect = get(lb.port, "/dir")
        no_index = get(lb.port, "/empty/")
        post = get(lb.port, "/dir/a.txt", method="POST")
    assert home.status == 200 and home.body == b"home" and home.header("content-type") == "text/html"
    assert a.body == b"file a" and a.header("content-type") == "text/plain"
    assert a.header("last-modified") and a.header("etag")
    assert head.status == 200 and head.body == b"" and head.header("content-length") == "6"
    assert missing.status == 404
    assert redirect.status == 301 and (redirect.header("location") or "").endswith("/dir/")
    assert no_index.status == 403
    assert post.status == 405


def test_static_files_stay_under_root(tmp_path: Path) -> None:
    root = tmp_path / "site"
    root.mkdir()
    (tmp_path / "secret").write_text("no")
    with run(conf(f"root {root}; location / {{ }}"), tmp_path) as lb:
        assert get(lb.port, "/../secret").status in (400, 404)
        assert get(lb.port, "/%2e%2e/secret").status in (400, 404)


# --------------------------------------------------------------------------- accepted tuning


def test_tuning_directives_are_accepted_and_checked(tmp_path: Path) -> None:
    http = """
        proxy_temp_path proxy_temp 1 2;
        server_names_hash_bucket_size 64; server_names_hash_max_size 512;
        variables_hash_max_size 1024; types_hash_max_size 2048;
        sendfile on; tcp_nopush on; tcp_nodelay off; keepalive_time 1h; keepalive_disable msie6 safari;
    """
    load(conf("connection_pool_size 512; location / { return 204; }", http), tmp_path)
    with pytest.raises(ConfigError) as err:
        load(conf("location / { return 204; }", "sendfile maybe;"), tmp_path)
    assert "sendfile" in str(err.value)


# --------------------------------------------------------------------------- error_page


def test_error_page_internal_named_and_external(tmp_path: Path) -> None:
    from helpers import closed_port

    dead = closed_port()
    text = conf(f"""
        location /missing {{ error_page 404 /page; return 404; }}
        location /changed {{ error_page 404 =200 /page; return 404; }}
        location /own {{ error_page 404 = /created; return 404; }}
        location /named {{ error_page 502 @fallback; proxy_pass http://127.0.0.1:{dead}; }}
        location /away {{ error_page 404 https://example.test/x; return 404; }}
        location /page {{ return 200 "page for $uri $request_method"; }}
        location /created {{ return 201 created; }}
        location @fallback {{ return 200 fallback; }}
    """)
    with run(text, tmp_path) as lb:
        missing = get(lb.port, "/missing", method="POST")
        changed = get(lb.port, "/changed")
        own = get(lb.port, "/own")
        named = get(lb.port, "/named")
        away = get(lb.port, "/away")
    assert missing.status == 404 and missing.body == b"page for /page GET"
    assert changed.status == 200
    assert own.status == 201 and own.body == b"created"
    assert named.status == 502 and named.body == b"fallback"
    assert away.status == 302 and away.header("location") == "https://example.test/x"


def test_error_page_redirects_once(tmp_path: Path) -> None:
    text = conf("""
        location /a { error_page 404 /b; return 404; }
        location /b { error_page 404 /c; return 404; }
        location /c { return 200 c; }
    """)
    with run(text, tmp_path) as lb:
        response = get(lb.port, "/a")
    assert response.status == 404 and response.body != b"c"  # /b's 404 is not redirected again


def test_proxy_intercept_errors(tmp_path: Path) -> None:
    with Backends(respond(status=503, body=b"peer page")) as bk:
        text = conf(f"""
            location /on {{
                proxy_intercept_errors on; error_page 503 /mine; proxy_pass http://{bk[0].addr};
            }}
            location /off {{ error_page 503 /mine; proxy_pass http://{bk[0].addr}; }}
            location /mine {{ return 200 "my page"; }}
        """)
        with run(text, tmp_path) as lb:
            on = get(lb.port, "/on")
            off = get(lb.port, "/off")
            again = get(lb.port, "/on")
    assert on.status == 503 and on.body == b"my page"
    assert off.status == 503 and off.body == b"peer page"
    assert again.body == b"my page"  # the dropped peer connection left nothing behind


@pytest.mark.parametrize(
    ("line", "error"),
    [
        ("error_page 200 /x;", 'value "200" must be between 300 and 599'),
        ("error_page 404 =abc /x;", 'invalid value "=abc"'),
        ("error_page =200 /x;", 'invalid number of arguments in "error_page" directive'),
    ],
)
def test_error_page_errors(tmp_path: Path, line: str, error: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(conf(f"location / {{ {line} return 204; }}"), tmp_path)
    assert error in str(err.value)


def test_request_body_variable(tmp_path: Path) -> None:
    from helpers import echo

    with Backends(echo()) as bk:
        text = conf(f"location / {{ add_header X-Body $request_body; proxy_pass http://{bk[0].addr}; }}")
        with run(text, tmp_path) as lb:
            response = get(lb.port, "/", method="POST", body=b"hello")
    assert response.header("x-body") == "hello"


# --------------------------------------------------------------------------- absolute-form


def test_absolute_form_host_wins_over_host_header(tmp_path: Path) -> None:
    from helpers import raw_exchange

    with run(conf("location / { return 200 $host; }"), tmp_path) as lb:
        good = raw_exchange(lb.port, b"GET http://Example.ORG:81/x HTTP/1.0\r\nHost: other\r\n\r\n")
        bad = raw_exchange(lb.port, b"GET http://example.com.:1.2/ HTTP/1.0\r\nHost: other\r\n\r\n")
    assert good.endswith(b"\r\n\r\nexample.org")
    assert b" 400 " in bad.split(b"\r\n", 1)[0]


# --------------------------------------------------------------------------- proxy request/response


def test_proxy_method_headers_and_body_directives(tmp_path: Path) -> None:
    from helpers import echo

    with Backends(echo()) as bk:
        peer = f"proxy_pass http://{bk[0].addr};"
        text = conf(f"""
            location /method {{ proxy_method PUT; {peer} }}
            location /noheaders {{ proxy_pass_request_headers off; {peer} }}
            location /nobody {{ proxy_pass_request_body off; {peer} }}
            location /setbody {{ proxy_set_body "new $request_method"; {peer} }}
        """)
        with run(text, tmp_path) as lb:
            method = get(lb.port, "/method", method="POST", body=b"b").body
            noheaders = get(lb.port, "/noheaders", headers={"X-Client": "1"}).body
            nobody = get(lb.port, "/nobody", method="POST", body=b"secret").body
            setbody = get(lb.port, "/setbody", method="POST", body=b"old").body
    assert method.startswith(b"PUT /method ") and method.endswith(b"\n\nb")
    assert b"X-Client" not in noheaders and b"Host: " in noheaders  # proxy_set_header still applies
    assert b"secret" not in nobody and b"Content-Length" not in nobody
    assert setbody.endswith(b"\n\nnew POST") and b"Content-Length: 8" in setbody


def test_proxy_hide_and_pass_header(tmp_path: Path) -> None:
    headers = {"X-Secret": "s", "X-Kept": "k", "X-Accel-Mine": "a"}
    with Backends(respond(headers=headers)) as bk:
        text = conf(f"""
            location / {{
                proxy_hide_header X-Secret; proxy_pass_header X-Accel-Mine;
                proxy_ignore_headers X-Accel-Redirect Expires;
                proxy_pass http://{bk[0].addr};
            }}
        """)
        with run(text, tmp_path) as lb:
            response = get(lb.port, "/")
    assert response.header("x-secret") is None and response.header("x-kept") == "k"
    assert response.header("x-accel-mine") == "a"


def test_peer_response_with_bare_lf_lines(tmp_path: Path) -> None:
    from helpers import raw

    with Backends(raw(b"HTTP/1.1 200 OK\nX-A: b\nContent-Length: 2\n\nok")) as bk:
        text = conf(f"location / {{ proxy_pass http://{bk[0].addr}; }}")
        with run(text, tmp_path) as lb:
            response = get(lb.port, "/")
    assert response.status == 200 and response.header("x-a") == "b" and response.body == b"ok"


def test_proxy_ignore_headers_refuses_unknown(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load(conf("location / { proxy_ignore_headers X-Nope; return 204; }"), tmp_path)
    assert 'invalid value "X-Nope"' in str(err.value)


def test_access_log_if(tmp_path: Path) -> None:
    from helpers import read_log_lines

    log = tmp_path / "cond.log"
    text = conf(f"location / {{ access_log {log} short if=$arg_log; return 204; }}",
                'log_format short "$uri";')
    with run(text, tmp_path) as lb:
        for path in ("/a", "/b?log=0", "/c?log=1", "/d?log=", "/e?log=yes"):
            get(lb.port, path)
    assert read_log_lines(log, 2) == ["/c", "/e"]


# --------------------------------------------------------------------------- the rewrite module


def test_set_if_and_return_in_if(tmp_path: Path) -> None:
    text = conf("""
        set $who server;
        location / {
            set $greeting "hello $who";
            if ($arg_mode = quiet) { return 204; }
            if ($arg_name) { set $greeting "hi $arg_name"; }
            if ($http_user_agent ~* ^(curl|wget)/([0-9]+)) { set $greeting "tool $1 v$2"; }
            return 200 $greeting;
        }
    """)
    with run(text, tmp_path) as lb:
        plain = get(lb.port, "/").body
        quiet = get(lb.port, "/?mode=quiet").status
        named = get(lb.port, "/?name=ann").body
        zero = get(lb.port, "/?name=0").body
        tool = get(lb.port, "/", headers={"User-Agent": "Curl/8"}).body
    assert plain == b"hello server"
    assert quiet == 204
    assert named == b"hi ann" and zero == b"hello server"  # "0" is false, as nginx
    assert tool == b"tool Curl v8"


def test_rewrite_flags(tmp_path: Path) -> None:
    from helpers import echo

    with Backends(echo()) as bk:
        text = conf(f"""
            location /old/ {{ rewrite ^/old/(.*)$ /new/$1 last; return 500; }}
            location /new/ {{ return 200 "new $uri $args"; }}
            location /brk/ {{ rewrite ^/brk/(.*)$ /up/$1?x=1 break; proxy_pass http://{bk[0].addr}; }}
            location /perm {{ rewrite ^ /new/p permanent; }}
            location /ext {{ rewrite ^ https://example.test/e?; }}
            location /loop {{ rewrite ^ /loop last; }}
        """)
        with run(text, tmp_path) as lb:
            last = get(lb.port, "/old/a?q=1").body
            brk = get(lb.port, "/brk/b?y=2").body
            perm = get(lb.port, "/perm?z=3")
            ext = get(lb.port, "/ext?z=3")
            loop = get(lb.port, "/loop").status
    assert last == b"new /new/a q=1"
    assert brk.startswith(b"GET /up/b?x=1&y=2 HTTP/1.0")
    assert perm.status == 301 and (perm.header("location") or "").endswith("/new/p?z=3")
    assert ext.status == 302 and ext.header("location") == "https://example.test/e"
    assert loop == 500


@pytest.mark.parametrize(
    ("line", "error"),
    [
        ("set a b;", 'invalid variable name "a"'),
        ("rewrite ^ /x sometimes;", 'invalid parameter "sometimes"'),
        ("if ($uri) return 204;", 'directive "if" has no opening "{"'),
        ("if (-f $uri) { return 204; }", "file tests"),
        ("if ($uri) { proxy_pass http://127.0.0.1:1; }", '"proxy_pass" directive is not allowed here'),
        ("return 200 $undeclared;", 'unknown "undeclared" variable'),
    ],
)
def test_rewrite_module_errors(tmp_path: Path, line: str, error: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(conf(f"location / {{ {line} }}"), tmp_path)
    assert error in str(err.value)


# --------------------------------------------------------------------------- variables


def test_upstream_cookie_connection_time_and_empty_arg(tmp_path: Path) -> None:
    with Backends(respond(headers={"Set-Cookie": "tc=abc; path=/"})) as bk:
        text = conf(f"""
            location / {{
                add_header X-Cookie $upstream_cookie_tc;
                add_header X-Time $connection_time;
                add_header X-Empty "[$arg_]";
                proxy_pass http://{bk[0].addr};
            }}
        """)
        with run(text, tmp_path) as lb:
            response = get(lb.port, "/?a=1")
    assert response.header("x-cookie") == "abc"
    seconds = response.header("x-time") or ""
    assert seconds.count(".") == 1 and len(seconds.split(".")[1]) == 3 and float(seconds) >= 0
    assert response.header("x-empty") == "[]"


def test_upstream_http_variables_read_the_peer_head_as_it_came(tmp_path: Path) -> None:
    # (the proxy reads the pairs of a response head only when a variable asks: mixed-case
    # names, blanks around values, a repeated header and a hidden one all read as parsed)
    head = (b"HTTP/1.1 200 OK\r\nx-MIXED-case:  v1 \r\nX-Hidden: h\r\nX-Two: a\r\nX-Two: b\r\n"
            b"Content-Length: 2\r\n\r\nok")
    with Backends(raw(head, close=False)) as bk:
        text = conf(f"""
            location / {{
                proxy_hide_header X-Hidden;
                add_header X-Seen
                    "[$upstream_http_x_mixed_case|$upstream_http_x_hidden|$upstream_http_x_two]";
                proxy_pass http://{bk[0].addr};
            }}
        """)
        with run(text, tmp_path) as lb:
            response = get(lb.port, "/")
    assert response.status == 200 and response.body == b"ok"
    assert response.header("x-mixed-case") == "v1" and response.header("x-hidden") is None
    assert [v for k, v in response.headers if k == "X-Two"] == ["a", "b"]
    assert response.header("x-seen") == "[v1|h|a, b]"


def test_default_root_is_under_the_prefix_and_unmatched_uris_get_404(tmp_path: Path) -> None:
    (tmp_path / "html" / "a").mkdir(parents=True)
    (tmp_path / "html" / "a" / "f").write_text("under prefix")
    (tmp_path / "html" / "x").write_text("not reachable: no location matches /x")
    with run(conf("location /a/ { }"), tmp_path) as lb:
        assert get(lb.port, "/a/f").body == b"under prefix"
        assert get(lb.port, "/x").status == 404
