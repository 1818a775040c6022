"""Directives: valid and invalid forms, contexts, duplicates, defaults and inheritance.

Each config is written to a temporary prefix and loaded through the public ``load()``; error
texts are compared whole (nginx's words), with the file path shortened to ``x.conf``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from scriptlb.config import ConfigError, load
from scriptlb.config.model import (
    LocationConf,
    MainConf,
    NextUpstream,
    PeerAddr,
    ServerConf,
    UpstreamConf,
)


def load_text(tmp_path: Path, text: str, globals_: str | None = None) -> MainConf:
    (tmp_path / "x.conf").write_text(text)
    return load("x.conf", str(tmp_path), globals_)


def error(tmp_path: Path, text: str, globals_: str | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text, globals_)
    return str(info.value).replace(f"{tmp_path}/", "")


def http(tmp_path: Path, body: str) -> MainConf:
    return load_text(tmp_path, f"events {{}}\nhttp {{\n{body}\n}}\n")


def http_error(tmp_path: Path, body: str) -> str:
    return error(tmp_path, f"http {{\n{body}\n}}\n")


def server(tmp_path: Path, body: str, extra: str = "") -> ServerConf:
    conf = http(tmp_path, f"{extra}\nserver {{ listen 127.0.0.1:8080; {body} }}")
    assert conf.http is not None
    return conf.http.servers[0]


def location(tmp_path: Path, body: str, level: str = "", extra: str = "") -> LocationConf:
    return server(tmp_path, f"{level} location / {{ {body} }}", extra).locations[0]


def upstream(tmp_path: Path, body: str, name: str = "u") -> UpstreamConf:
    conf = http(tmp_path, f"upstream {name} {{ {body} }}")
    assert conf.http is not None
    return conf.http.upstreams[name]


# --------------------------------------------------------------------------- main context


def test_main_defaults(tmp_path: Path) -> None:
    conf = load_text(tmp_path, "")
    assert conf.conf_file == str(tmp_path / "x.conf") and conf.prefix == str(tmp_path)
    assert (conf.worker_processes, conf.daemon, conf.master_process) == (1, True, True)
    assert conf.pid == str(tmp_path / "logs" / "scriptlb.pid")  # nginx: NGX_PID_PATH under the prefix
    assert conf.worker_connections == 512 and conf.http is None
    assert [(e.path, e.level) for e in conf.error_log] == [("stderr", "error")]


def test_main_directives(tmp_path: Path) -> None:
    conf = load_text(
        tmp_path,
        "worker_processes 3; daemon off; master_process OFF; pid logs/x.pid;\n"
        "error_log logs/error.log info; error_log stderr;\nevents { worker_connections 64; }\n",
    )
    assert (conf.worker_processes, conf.daemon, conf.master_process) == (3, False, False)
    assert conf.pid == str(tmp_path / "logs/x.pid")
    assert [(e.path, e.level) for e in conf.error_log] == [
        (str(tmp_path / "logs/error.log"), "info"),
        ("stderr", "error"),
    ]
    assert conf.worker_connections == 64


def test_worker_processes_auto(tmp_path: Path) -> None:
    import os

    assert load_text(tmp_path, "worker_processes auto;").worker_processes == (os.cpu_count() or 1)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("worker_processes x;", '"worker_processes" directive invalid value'),
        ("worker_processes 1 2;", 'invalid number of arguments in "worker_processes" directive'),
        ("worker_processes;", 'invalid number of arguments in "worker_processes" directive'),
        ("worker_processes 1; worker_processes 2;", '"worker_processes" directive is duplicate'),
        ("daemon maybe;", 'invalid value "maybe" in "daemon" directive, it must be "on" or "off"'),
        ("daemon off; daemon on;", '"daemon" directive is duplicate'),
        ("error_log x.log loud;", 'invalid log level "loud"'),
        ("events { worker_connections x; }", 'invalid number "x"'),
        ("events {} events {}", '"events" directive is duplicate'),
        ("events;", 'directive "events" has no opening "{"'),
        ("daemon { }", 'directive "daemon" is not terminated by ";"'),
        ("http {} http {}", '"http" directive is duplicate'),
        ("fooo on;", 'unknown directive "fooo"'),
        ("listen 80;", '"listen" directive is not allowed here'),
        ("events { daemon off; }", '"daemon" directive is not allowed here'),
    ],
)
def test_main_errors(tmp_path: Path, text: str, message: str) -> None:
    assert error(tmp_path, text) == f"[emerg] {message} in x.conf:1"


def test_globals_are_parsed_before_the_file(tmp_path: Path) -> None:
    conf = load_text(tmp_path, "worker_processes 2;", globals_="daemon off; master_process off;")
    assert (conf.daemon, conf.master_process, conf.worker_processes) == (False, False, 2)
    # the file's copy is the duplicate, reported at its line (nginx parses -g first)
    assert error(tmp_path, "\ndaemon on;", globals_="daemon off;") == (
        '[emerg] "daemon" directive is duplicate in x.conf:2'
    )
    assert error(tmp_path, "", globals_="fooo;") == '[emerg] unknown directive "fooo" in command line'


# --------------------------------------------------------------------------- http context errors


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("worker_processes 1;", '"worker_processes" directive is not allowed here'),
        ("listen 80;", '"listen" directive is not allowed here'),
        ("proxy_pass http://127.0.0.1;", '"proxy_pass" directive is not allowed here'),
        (
            "server { location / { client_header_timeout 1s; } }",
            '"client_header_timeout" directive is not allowed here',
        ),
        ("server { keepalive 2; }", '"keepalive" directive is not allowed here'),
        (
            "server { balancer_by_python_file x.py; }",
            '"balancer_by_python_file" directive is not allowed here',
        ),
        ("server { python_code_cache on; }", '"python_code_cache" directive is not allowed here'),
        ("server { log_format x y; }", '"log_format" directive is not allowed here'),
        ("upstream u { server 127.0.0.1; listen 80; }", '"listen" directive is not allowed here'),
        ("upstream u { server 127.0.0.1 { } }", 'directive "server" is not terminated by ";"'),
        ("server;", 'directive "server" has no opening "{"'),
        ("server { location /b { location /a { } } }", 'location "/a" is outside location "/b"'),
        ("server { location = /b { location /b { } } }",
         'location "/b" cannot be inside the exact location "/b"'),
        ("server { location @n { location /b { } } }",
         'location "/b" cannot be inside the named location "@n"'),
        ("server { location / { location @n { } } }", 'named location "@n" can be on the server level only'),
        ("server { location / { location /a { } location /a { } } }", 'duplicate location "/a"'),
        ("server { location / { root /a; alias /b; } }",
         '"alias" directive is duplicate, "root" directive was specified earlier'),
        ("server { location / { alias /a; alias /b; } }", '"alias" directive is duplicate'),
        ("server { location @n { alias /b; } }",
         'the "alias" directive cannot be used inside the named location'),
        ("server { alias /b; }", '"alias" directive is not allowed here'),
        ("absolute_redirect yes;",
         'invalid value "yes" in "absolute_redirect" directive, it must be "on" or "off"'),
        ("port_in_redirect on; port_in_redirect on;", '"port_in_redirect" directive is duplicate'),
        ("proxy_redirect foo;", 'invalid parameter "foo"'),
        ("proxy_redirect default;",
         '"proxy_redirect default" should be placed after the "proxy_pass" directive'),
        ("proxy_redirect off; proxy_redirect / /x;", '"proxy_redirect" directive is duplicate'),
        ("proxy_redirect / /x; proxy_redirect off;", '"proxy_redirect" directive is duplicate'),
        ("proxy_redirect ~( /x;", 'regex compile failed: missing ), unterminated subpattern in "("'),
        ("proxy_redirect / $nosuch;", 'unknown "nosuch" variable'),
        ("proxy_cookie_domain foo;", 'invalid parameter "foo"'),
        ("proxy_cookie_path off; proxy_cookie_path off;", '"proxy_cookie_path" directive is duplicate'),
        ("proxy_cookie_flags one;", 'invalid parameter "one"'),
        ("proxy_cookie_flags a b c d e;", 'invalid number of arguments in "proxy_cookie_flags" directive'),
        ("proxy_set_header X;", 'invalid number of arguments in "proxy_set_header" directive'),
        ("proxy_read_timeout 5x;", '"proxy_read_timeout" directive invalid value'),
        ("proxy_read_timeout 1y;", '"proxy_read_timeout" directive invalid value'),
        ("proxy_read_timeout 1s; proxy_read_timeout 2s;", '"proxy_read_timeout" directive is duplicate'),
        ("client_max_body_size 5x;", '"client_max_body_size" directive invalid value'),
        ("keepalive_requests x;", '"keepalive_requests" directive invalid number'),
        ("keepalive_timeout 10s 5x;", '"keepalive_timeout" directive invalid value'),
        ("proxy_next_upstream_tries -1;", '"proxy_next_upstream_tries" directive invalid number'),
        ("proxy_http_version 2.0;", 'invalid value "2.0"'),
        ("proxy_next_upstream error foo;", 'invalid value "foo"'),
        (
            "proxy_buffering maybe;",
            'invalid value "maybe" in "proxy_buffering" directive, it must be "on" or "off"',
        ),
        ("large_client_header_buffers 0 8k;", '"large_client_header_buffers" directive invalid value'),
        ("large_client_header_buffers 4 1g;", '"large_client_header_buffers" directive invalid value'),
        ("proxy_set_header X $foo;", 'unknown "foo" variable'),
        ("proxy_set_header X ${host;", 'the closing bracket in "host" variable is missing'),
        ('proxy_set_header X "$";', "invalid variable name"),
        ("server { return abc; }", 'invalid return code "abc"'),
        ("server { return 1000; }", 'invalid return code "1000"'),
        ("server { return 200 a b; }", 'invalid number of arguments in "return" directive'),
    ],
)
def test_http_errors(tmp_path: Path, body: str, message: str) -> None:
    assert http_error(tmp_path, body) == f"[emerg] {message} in x.conf:2"


# --------------------------------------------------------------------------- listen / server


def test_listen_forms(tmp_path: Path) -> None:
    conf = http(
        tmp_path,
        "server { listen 8081; listen 127.0.0.1:8082 default_server reuseport backlog=64;"
        " listen [::1]:8083; listen unix:/tmp/scriptlb-test.sock; listen 127.0.0.2; }",
    )
    assert conf.http is not None
    listens = conf.http.servers[0].listens
    assert [(lc.host, lc.port, lc.unix_path) for lc in listens] == [
        ("0.0.0.0", 8081, None),
        ("127.0.0.1", 8082, None),
        ("::1", 8083, None),
        (None, 0, "/tmp/scriptlb-test.sock"),
        ("127.0.0.2", 80, None),
    ]
    assert (listens[1].default_server, listens[1].reuseport, listens[1].backlog) == (True, True, 64)
    assert (listens[0].default_server, listens[0].reuseport, listens[0].backlog) == (False, False, 511)
    assert listens[0].source is not None and listens[0].source.line == 3


def test_listen_port_ranges_make_one_socket_per_port(tmp_path: Path) -> None:
    conf = http(tmp_path, "server { listen 127.0.0.1:9001-9003 reuseport; listen [::1]:9005-9006;"
                          " listen 9010-9011; }")
    assert conf.http is not None
    listens = conf.http.servers[0].listens
    assert [(lc.host, lc.port) for lc in listens] == [
        ("127.0.0.1", 9001), ("127.0.0.1", 9002), ("127.0.0.1", 9003), ("::1", 9005), ("::1", 9006),
        ("0.0.0.0", 9010), ("0.0.0.0", 9011),
    ]
    assert all(lc.reuseport for lc in listens[:3])


def test_default_listen_and_server_name(tmp_path: Path) -> None:
    import os

    conf = http(tmp_path, "server { server_name A.example *.b.example; server_name ~^(?<x>W+)\\.c$; }")
    assert conf.http is not None
    srv = conf.http.servers[0]
    assert srv.server_names == ("A.example", "*.b.example", "~^(?<x>W+)\\.c$")  # matching: locations.py
    assert [(lc.host, lc.port) for lc in srv.listens] == [("0.0.0.0", 80 if os.geteuid() == 0 else 8000)]
    assert srv.locations == ()
    assert (srv.client_header_timeout, srv.large_client_header_buffers) == (60.0, (4, 8192))


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("listen 99999;", 'invalid port in "99999" of the "listen" directive'),
        ("listen 127.0.0.1:;", 'invalid port in "127.0.0.1:" of the "listen" directive'),
        ("listen [::1;", 'invalid host in "[::1" of the "listen" directive'),
        (
            "listen nosuchhost.invalid:80;",
            'host not found in "nosuchhost.invalid:80" of the "listen" directive',
        ),
        ("listen 80 bogus;", 'invalid parameter "bogus"'),
        ("listen 127.0.0.1:9002-9001;",
         'invalid port range in "127.0.0.1:9002-9001" of the "listen" directive'),
        ("listen 127.0.0.1:1-x;", 'invalid port range in "127.0.0.1:1-x" of the "listen" directive'),
        ("listen 80 backlog=x;", 'invalid backlog "backlog=x"'),
        ("listen 8080; listen 8080;", "a duplicate listen 0.0.0.0:8080"),
        ("listen [::1]:81; listen [::1]:81;", "a duplicate listen [::1]:81"),
    ],
)
def test_listen_errors(tmp_path: Path, body: str, message: str) -> None:
    assert http_error(tmp_path, f"server {{ {body} }}") == f"[emerg] {message} in x.conf:2"


def test_listen_conflicts_across_servers(tmp_path: Path) -> None:
    assert (
        http_error(
            tmp_path,
            "server { listen 127.0.0.1:80 default_server; }\nserver { listen 127.0.0.1:80 default; }",
        )
        == "[emerg] a duplicate default server for 127.0.0.1:80 in x.conf:3"
    )
    assert (
        http_error(
            tmp_path, "server { listen 127.0.0.1:80 reuseport; }\nserver { listen 127.0.0.1:80 backlog=5; }"
        )
        == "[emerg] duplicate listen options for 127.0.0.1:80 in x.conf:3"
    )


def test_conflicting_server_names_warn(tmp_path: Path) -> None:
    conf = http(
        tmp_path,
        "server { listen 127.0.0.1:80; server_name a; }\n"
        "server { listen 127.0.0.1:80; server_name A b; }\nserver { listen 127.0.0.1:81; server_name a; }",
    )
    assert conf.warnings == ('[warn] conflicting server name "A" on 127.0.0.1:80, ignored',)


def test_listen_options_are_shared_by_every_server_on_the_address(tmp_path: Path) -> None:
    conf = http(
        tmp_path, "server { listen 127.0.0.1:80; }\nserver { listen 127.0.0.1:80 reuseport backlog=9; }"
    )
    assert conf.http is not None
    first, second = (s.listens[0] for s in conf.http.servers)
    assert (first.reuseport, first.backlog) == (second.reuseport, second.backlog) == (True, 9)
    assert not first.default_server


# --------------------------------------------------------------------------- locations


def test_location_modifiers_in_declaration_order(tmp_path: Path) -> None:
    srv = server(
        tmp_path,
        "location = /exact {} location /prefix {} location ^~ /static {} location ~ \\.php$ {}"
        ' location ~* "\\.(gif|jpg){1}$" {} location =/glued {} location ~*/ci {}',
    )
    assert [(loc.modifier, loc.pattern) for loc in srv.locations] == [
        ("=", "/exact"),
        ("", "/prefix"),
        ("^~", "/static"),
        ("~", "\\.php$"),
        ("~*", "\\.(gif|jpg){1}$"),
        ("=", "/glued"),
        ("~*", "/ci"),
    ]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("location / {} location / {}", 'duplicate location "/"'),
        ("location /a {} location ^~ /a {}", 'duplicate location "/a"'),
        ("location = /a {} location = /a {}", 'duplicate location "/a"'),
        ("location @x b {}", 'invalid location modifier "@x"'),
        ("location a b c {}", 'invalid number of arguments in "location" directive'),
        ("location @x {} location @x {}", 'duplicate location "@x"'),
        (
            "location @x { proxy_pass http://127.0.0.1/u; }",
            '"proxy_pass" cannot have URI part in location given by regular expression,'
            ' or inside named location, or inside "if" statement, or inside "limit_except" block',
        ),
        ("location ~ ( {}", 'regex compile failed: missing ), unterminated subpattern in "("'),
    ],
)
def test_location_errors(tmp_path: Path, body: str, message: str) -> None:
    assert http_error(tmp_path, f"server {{ {body} }}") == f"[emerg] {message} in x.conf:2"


def test_exact_and_prefix_of_the_same_uri_coexist(tmp_path: Path) -> None:
    srv = server(tmp_path, "location = /a {} location /a {} location ~ /a {} location ~ /a {}")
    assert len(srv.locations) == 4


# --------------------------------------------------------------------------- proxy_pass


def test_proxy_pass_to_an_explicit_upstream_defined_later(tmp_path: Path) -> None:
    conf = http(
        tmp_path,
        "server { listen 80; location / { proxy_pass http://Backend/base/; } }\n"
        "upstream backend { server 127.0.0.1:9001; }",
    )
    assert conf.http is not None
    pp = conf.http.servers[0].locations[0].proxy_pass
    assert pp is not None
    assert (pp.upstream, pp.uri, pp.proxy_host) == ("backend", "/base/", "backend")
    assert set(conf.http.upstreams) == {"backend"}


def test_proxy_pass_implicit_upstreams_are_shared(tmp_path: Path) -> None:
    conf = http(
        tmp_path,
        "server { listen 80; location / { proxy_pass http://127.0.0.1:9001; }"
        " location /a { proxy_pass http://127.0.0.1:9001/x; } location /b { proxy_pass http://127.0.0.1; }"
        " location /c { proxy_pass http://[::1]:9002; }"
        " location /d { proxy_pass http://unix:/tmp/s.sock:/u; } }",
    )
    assert conf.http is not None
    pps = [loc.proxy_pass for loc in conf.http.servers[0].locations]
    assert [(p.upstream, p.uri, p.proxy_host) for p in pps if p] == [
        ("127.0.0.1:9001", None, "127.0.0.1:9001"),
        ("127.0.0.1:9001", "/x", "127.0.0.1:9001"),
        ("127.0.0.1:80", None, "127.0.0.1"),
        ("[::1]:9002", None, "[::1]:9002"),
        ("unix:/tmp/s.sock", "/u", "localhost"),
    ]
    implicit = conf.http.upstreams["127.0.0.1:9001"]
    assert implicit.implicit and implicit.servers[0].addrs == (PeerAddr("127.0.0.1", 9001),)
    assert conf.http.upstreams["unix:/tmp/s.sock"].servers[0].addrs == (PeerAddr(None, 0, "/tmp/s.sock"),)
    assert len(conf.http.upstreams) == 4


def test_proxy_pass_resolves_host_names_at_load_time(tmp_path: Path) -> None:
    pp = location(tmp_path, "proxy_pass http://localhost:9001;").proxy_pass
    assert pp is not None and pp.upstream == "localhost:9001" and pp.proxy_host == "localhost:9001"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            "location / { proxy_pass http://nosuchhost.invalid:8080/x; }",
            'host not found in upstream "nosuchhost.invalid"',
        ),
        ("location / { proxy_pass ftp://127.0.0.1; }", "invalid URL prefix"),
        ("location / { proxy_pass https://nosuchhost.invalid; }",
         'host not found in upstream "nosuchhost.invalid"'),
        ("location / { proxy_pass http://127.0.0.1:99999; }", 'invalid port in upstream "127.0.0.1:99999"'),
        ("location / { proxy_pass http://127.0.0.1:abc/x; }", 'invalid port in upstream "127.0.0.1:abc"'),
        ("location / { proxy_pass http://; }", 'no host in upstream ""'),
        ("location / { proxy_pass http://$nosuch; }", 'unknown "nosuch" variable'),
        ("location / { proxy_pass http://$host; health_check; }",
         '"health_check" requires "proxy_pass" to an upstream'),
        ("location / { proxy_pass http://u:8080; }", 'upstream "u" may not have port 8080'),
        ("location / { proxy_pass http://u; proxy_pass http://u; }", '"proxy_pass" directive is duplicate'),
        (
            "location ~ /x { proxy_pass http://u/a/; }",
            '"proxy_pass" cannot have URI part in location given by regular expression, or inside named'
            ' location, or inside "if" statement, or inside "limit_except" block',
        ),
    ],
)
def test_proxy_pass_errors(tmp_path: Path, body: str, message: str) -> None:
    text = f"upstream u {{ server 127.0.0.1; }} server {{ listen 80; {body} }}"
    assert http_error(tmp_path, text) == f"[emerg] {message} in x.conf:2"


# --------------------------------------------------------------------------- proxy settings and inheritance


def test_proxy_defaults_are_nginx_defaults(tmp_path: Path) -> None:
    loc = location(tmp_path, "proxy_pass http://127.0.0.1:9001;")
    p = loc.proxy
    assert [(h[0], h[1], h[2].raw) for h in p.set_headers] == [
        ("host", "Host", "$proxy_host"),
        ("connection", "Connection", "close"),
    ]
    assert (p.http_version, p.connect_timeout, p.send_timeout, p.read_timeout) == ("1.0", 60.0, 60.0, 60.0)
    assert p.next_upstream == NextUpstream.ERROR | NextUpstream.TIMEOUT
    assert (p.next_upstream_tries, p.next_upstream_timeout) == (0, 0.0)
    assert (p.request_buffering, p.buffering) == (True, True)
    assert (loc.client_max_body_size, loc.client_body_timeout) == (1024 * 1024, 60.0)
    assert (loc.keepalive_timeout, loc.keepalive_requests, loc.access_log) == (75.0, 1000, ())


def test_settings_inherit_http_to_server_to_location(tmp_path: Path) -> None:
    conf = http(
        tmp_path,
        "proxy_read_timeout 5s; proxy_http_version 1.1; client_max_body_size 10m; keepalive_timeout 0;\n"
        "proxy_next_upstream error TimeOut http_502 non_idempotent; proxy_next_upstream_tries 3;\n"
        "server { listen 80; proxy_read_timeout 7s; client_header_timeout 2s;"
        " large_client_header_buffers 2 1k;\n"
        "  location /a { proxy_read_timeout 500ms; proxy_connect_timeout 1m30s;"
        " proxy_request_buffering off; }\n"
        "  location /b { proxy_next_upstream off; client_max_body_size 0; keepalive_requests 5; } }",
    )
    assert conf.http is not None
    srv = conf.http.servers[0]
    a, b = srv.locations
    assert (a.proxy.read_timeout, a.proxy.connect_timeout, a.proxy.request_buffering) == (0.5, 90.0, False)
    assert (b.proxy.read_timeout, b.proxy.connect_timeout, b.proxy.request_buffering) == (7.0, 60.0, True)
    assert a.proxy.http_version == b.proxy.http_version == "1.1"
    assert a.proxy.next_upstream == (
        NextUpstream.ERROR | NextUpstream.TIMEOUT | NextUpstream.HTTP_502 | NextUpstream.NON_IDEMPOTENT
    )
    assert b.proxy.next_upstream == NextUpstream.OFF
    assert a.proxy.next_upstream_tries == 3
    assert (a.client_max_body_size, b.client_max_body_size) == (10 * 1024 * 1024, 0)
    assert (a.keepalive_timeout, b.keepalive_requests, a.keepalive_requests) == (0.0, 5, 1000)
    assert (srv.client_header_timeout, srv.large_client_header_buffers) == (2.0, (2, 1024))


def test_next_upstream_off_wins_and_duplicates_warn(tmp_path: Path) -> None:
    conf = http(
        tmp_path,
        "proxy_next_upstream error error http_404;\nserver { location / { proxy_next_upstream error off; } }",
    )
    assert conf.warnings == (f'[warn] duplicate value "error" in {tmp_path}/x.conf:3',)
    assert conf.http is not None
    assert conf.http.servers[0].locations[0].proxy.next_upstream == NextUpstream.OFF


def test_proxy_set_header_lists_replace_inherited_ones(tmp_path: Path) -> None:
    conf = http(
        tmp_path,
        "proxy_set_header X-Http 1;\n"
        "server { listen 80;\n"
        "  location /inherit { }\n"
        '  location /own { proxy_set_header X-Real-IP $remote_addr; proxy_set_header Connection ""; }\n'
        "  location /host { proxy_set_header host $host:$server_port; } }",
    )
    assert conf.http is not None
    inherit, own, host = (
        [(h[1], h[2].raw) for h in loc.proxy.set_headers] for loc in conf.http.servers[0].locations
    )
    assert inherit == [("X-Http", "1"), ("Host", "$proxy_host"), ("Connection", "close")]
    assert own == [("X-Real-IP", "$remote_addr"), ("Connection", ""), ("Host", "$proxy_host")]
    assert host == [("host", "$host:$server_port"), ("Connection", "close")]
    empty = conf.http.servers[0].locations[1].proxy.set_headers[1][2]
    assert empty.static == ""  # an empty static value: the runtime removes the header


def test_templates_are_split_at_load_time(tmp_path: Path) -> None:
    loc = location(tmp_path, 'proxy_set_header X-Info "${host}-$HTTP_User_Agent/$arg_id$cookie_s";')
    t = loc.proxy.set_headers[0][2]
    assert t.variables == ("host", "http_user_agent", "arg_id", "cookie_s")
    assert t.parts[1] == "-" and t.static is None


# --------------------------------------------------------------------------- return


def test_return_forms(tmp_path: Path) -> None:
    srv = server(
        tmp_path,
        'location /a { return 200 "hi $remote_addr\\n"; return 500; } location /b { return 204; }'
        " location /c { return http://example.com$request_uri; } location /d { return 301 /new; }",
    )
    a, b, c, d = (loc.return_ for loc in srv.locations)
    assert a is not None and a.status == 200 and a.text is not None and a.text.raw == "hi $remote_addr\n"
    assert b is not None and (b.status, b.text) == (204, None)
    assert c is not None and c.status == 302 and c.text is not None and c.text.variables == ("request_uri",)
    assert d is not None and d.status == 301 and d.text is not None and d.text.static == "/new"


def test_server_level_return_answers_every_request(tmp_path: Path) -> None:
    srv = server(tmp_path, 'return 200 "backend\\n"; location = /x { proxy_pass http://127.0.0.1:1; }')
    assert [(loc.modifier, loc.pattern) for loc in srv.locations] == [("=", "/x"), ("", "/")]
    for loc in srv.locations:
        assert loc.return_ is not None and loc.return_.status == 200
    # the return wins at run time (the runtime checks return_ first); proxy_pass is still checked
    assert srv.locations[0].proxy_pass is not None


# --------------------------------------------------------------------------- logs


def test_log_format_and_access_log(tmp_path: Path) -> None:
    conf = http(
        tmp_path,
        "log_format main escape=json '$remote_addr ' '$upstream_addr';\n"
        "access_log logs/access.log;\n"
        "server { listen 80;\n"
        "  location /a { }\n"
        "  location /b { access_log off; }\n"
        "  location /c { access_log stdout main buffer=32k flush=5s; access_log stderr main; } }",
    )
    assert conf.http is not None
    main = conf.http.log_formats["main"]
    assert (main.escape, main.template.raw) == ("json", "$remote_addr $upstream_addr")
    assert conf.http.log_formats["combined"].template.variables[:2] == ("remote_addr", "remote_user")
    a, b, c = conf.http.servers[0].locations
    assert [(log.path, log.format.name, log.buffer, log.flush) for log in a.access_log] == [
        (str(tmp_path / "logs/access.log"), "combined", 0, 0.0)
    ]
    assert b.access_log == ()
    assert [(log.path, log.format.name, log.buffer, log.flush) for log in c.access_log] == [
        ("stdout", "main", 32 * 1024, 5.0),
        ("stderr", "main", 0, 0.0),
    ]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('log_format x "$foo";', 'unknown "foo" variable'),
        ('log_format combined "$uri";', 'duplicate "log_format" name "combined"'),
        ('log_format x escape=bad "$uri";', 'unknown log format escaping "bad"'),
        ("log_format x escape=json;", 'invalid number of arguments in "log_format" directive'),
        ("access_log logs/a.log nosuchfmt;", 'unknown log format "nosuchfmt"'),
        ("access_log logs/a.log combined buffer=x;", 'invalid buffer size "x"'),
        ("access_log logs/a.log combined flush=x buffer=1k;", 'invalid flush time "x"'),
        ("access_log logs/a.log combined flush=1s;", 'no buffer is defined for access_log "logs/a.log"'),
        ("access_log logs/a.log combined bogus;", 'invalid parameter "bogus"'),
        ("access_log off combined;", 'invalid parameter "combined"'),
        ("access_log logs/$host.log combined buffer=1k;", "buffered logs cannot have variables in name"),
        ("access_log syslog:server=x;", 'access_log "syslog:server=x" is not supported by scriptlb'),
    ],
)
def test_log_errors(tmp_path: Path, body: str, message: str) -> None:
    assert http_error(tmp_path, body) == f"[emerg] {message} in x.conf:2"


# --------------------------------------------------------------------------- upstream


def test_upstream_server_parameters_and_defaults(tmp_path: Path) -> None:
    up = upstream(
        tmp_path,
        "server 127.0.0.1:9001 weight=5 max_fails=3 fail_timeout=30s max_conns=7;"
        " server 127.0.0.1 backup; server [::1]:9003 down; server unix:/tmp/u.sock;"
        " keepalive 16; keepalive_timeout 30s; keepalive_requests 50;",
    )
    s1, s2, s3, s4 = up.servers
    assert (s1.name, s1.addrs, s1.weight, s1.max_fails, s1.fail_timeout, s1.max_conns) == (
        "127.0.0.1:9001",
        (PeerAddr("127.0.0.1", 9001),),
        5,
        3,
        30.0,
        7,
    )
    assert (s2.addrs, s2.backup, s2.weight, s2.max_fails, s2.fail_timeout) == (
        (PeerAddr("127.0.0.1", 80),),
        True,
        1,
        1,
        10.0,
    )
    assert s3.down and s3.addrs == (PeerAddr("::1", 9003),) and s3.addrs[0].name == "[::1]:9003"
    assert s4.addrs[0].name == "unix:/tmp/u.sock"
    assert (up.keepalive, up.keepalive_timeout, up.keepalive_requests) == (16, 30.0, 50)
    assert up.method.kind == "round_robin" and up.hook is None and not up.implicit


def test_upstream_host_names_resolve_to_every_address(tmp_path: Path) -> None:
    import socket

    expected = {info[4][0] for info in socket.getaddrinfo("localhost", 9001, type=socket.SOCK_STREAM)}
    up = upstream(tmp_path, "server localhost:9001;")
    assert {a.host for a in up.servers[0].addrs} == expected
    assert up.servers[0].name == "localhost:9001"


def test_upstream_defaults(tmp_path: Path) -> None:
    up = upstream(tmp_path, "server 127.0.0.1:9001;")
    assert (up.keepalive, up.keepalive_timeout, up.keepalive_requests) == (0, 60.0, 1000)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("server 127.0.0.1 weight=0;", 'invalid parameter "weight=0"'),
        ("server 127.0.0.1 weight=x;", 'invalid parameter "weight=x"'),
        ("server 127.0.0.1 max_fails=x;", 'invalid parameter "max_fails=x"'),
        ("server 127.0.0.1 fail_timeout=500ms;", 'invalid parameter "fail_timeout=500ms"'),
        ("server 127.0.0.1 max_conns=-1;", 'invalid parameter "max_conns=-1"'),
        ("server 127.0.0.1 service=http;", 'service parameter requires "resolve" in upstream "127.0.0.1"'),
        ("server 127.0.0.1:0;", 'invalid port in upstream "127.0.0.1:0"'),
        ("server 127.0.0.1:99999;", 'invalid port in upstream "127.0.0.1:99999"'),
        ("server nosuchhost.invalid:8080;", 'host not found in upstream "nosuchhost.invalid:8080"'),
        ("server unix:;", 'no path in the unix domain socket in upstream "unix:"'),
        ("server 127.0.0.1; keepalive x;", 'invalid value "x" in "keepalive" directive'),
        ("server 127.0.0.1; keepalive 0;", 'invalid value "0" in "keepalive" directive'),
        ("server 127.0.0.1; keepalive 1; keepalive 2;", '"keepalive" directive is duplicate'),
        ("server 127.0.0.1; keepalive_timeout 1x;", '"keepalive_timeout" directive invalid value'),
    ],
)
def test_upstream_errors(tmp_path: Path, body: str, message: str) -> None:
    assert http_error(tmp_path, f"upstream u {{ {body} }}") == f"[emerg] {message} in x.conf:2"


def test_upstream_block_errors(tmp_path: Path) -> None:
    assert http_error(tmp_path, "upstream u {\n}") == "[emerg] no servers are inside upstream in x.conf:3"
    assert http_error(tmp_path, "upstream u { server 127.0.0.1; }\nupstream U { server 127.0.0.1; }") == (
        '[emerg] duplicate upstream "U" in x.conf:3'
    )
    assert http_error(tmp_path, "upstream u { server 127.0.0.1 backup; }") == (
        '[emerg] no servers in upstream "u" in x.conf:2'
    )


# --------------------------------------------------------------------------- python hooks


def test_hook_file_and_python_settings(tmp_path: Path) -> None:
    (tmp_path / "hooks").mkdir()
    (tmp_path / "hooks" / "pick.py").write_text("pass\n")
    conf = http(
        tmp_path,
        'python_package_path "hooks/?.py;;hooks/lib/?.py";\npython_code_cache off;\n'
        "balancer_by_python_timeout 20ms;\n"
        "upstream u { server 127.0.0.1:9001; balancer_by_python_file hooks/pick.py; }\n"
        "upstream v { server 127.0.0.1:9002; balancer_by_python_timeout 1s;"
        " balancer_by_python_file hooks/pick.py; }\n"
        "upstream w { server 127.0.0.1:9003; }",
    )
    assert conf.http is not None
    py = conf.http.python
    assert py.package_path == (str(tmp_path / "hooks/?.py"), str(tmp_path / "hooks/lib/?.py"))
    assert py.code_cache is False
    u, v, w = (conf.http.upstreams[n] for n in "uvw")
    assert u.hook is not None and v.hook is not None and w.hook is None
    assert (u.hook.kind, u.hook.path, u.hook.code) == ("file", str(tmp_path / "hooks/pick.py"), None)
    assert u.hook.chunk_name == str(tmp_path / "hooks/pick.py")
    assert (u.hook.timeout, v.hook.timeout) == (0.020, 1.0)
    assert u.hook.source.line == 6


def test_hook_block_keeps_code_and_lines(tmp_path: Path) -> None:
    conf = http(
        tmp_path,
        "upstream u {\n"
        "    server 127.0.0.1:9001;\n"
        "    balancer_by_python_block {\n"
        "        peers = {'a': ('127.0.0.1', 9001)}  # } inside a comment\n"
        "        balancer.set_current_peer(*peers['a'])\n"
        "    }\n"
        "}",
    )
    assert conf.http is not None
    hook = conf.http.upstreams["u"].hook
    assert hook is not None
    assert hook.kind == "block" and hook.path is None
    assert hook.code == (
        "peers = {'a': ('127.0.0.1', 9001)}  # } inside a comment\nbalancer.set_current_peer(*peers['a'])\n"
    )
    assert (hook.source.line, hook.first_line, hook.timeout) == (5, 6, 0.010)
    assert hook.chunk_name == f"balancer_by_python({tmp_path}/x.conf:5)"


def test_hook_only_upstream_gets_a_placeholder_server(tmp_path: Path) -> None:
    up = upstream(tmp_path, "balancer_by_python_block { pass }")
    assert [s.addrs for s in up.servers] == [(PeerAddr("0.0.0.1", 80),)]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            "server 127.0.0.1; balancer_by_python_file a.py; balancer_by_python_block { pass }",
            '"balancer_by_python_block" directive is duplicate',
        ),
        (
            "server 127.0.0.1; balancer_by_python_block { pass } balancer_by_python_file a.py;",
            '"balancer_by_python_file" directive is duplicate',
        ),
        ("balancer_by_python_file nofile.py;", 'open() "nofile.py" failed (2: No such file or directory)'),
        (
            "balancer_by_python_block { pass } server 127.0.0.1 backup;",
            'balancing method does not support parameter "backup"',
        ),
        (
            "balancer_by_python_block { pass } server 127.0.0.1 max_conns=1;",
            'balancing method does not support parameter "max_conns=1"',
        ),
        (
            "server 127.0.0.1; balancer_by_python_timeout 0;",
            '"balancer_by_python_timeout" directive invalid value',
        ),
        (
            "server 127.0.0.1; balancer_by_python_block;",
            'directive "balancer_by_python_block" has no opening "{"',
        ),
        (
            "server 127.0.0.1; balancer_by_python_block x { pass }",
            'invalid number of arguments in "balancer_by_python_block" directive',
        ),
    ],
)
def test_hook_errors(tmp_path: Path, body: str, message: str) -> None:
    (tmp_path / "a.py").write_text("pass\n")
    # error() shortens "{tmp_path}/" away, in the open() path too
    assert http_error(tmp_path, f"upstream u {{ {body} }}") == f"[emerg] {message} in x.conf:2"


def test_hook_lines_after_it_keep_weight_fails_and_down(tmp_path: Path) -> None:
    up = upstream(
        tmp_path,
        "server 127.0.0.1:1 backup; balancer_by_python_block { pass } server 127.0.0.1:2 weight=2 down;",
    )
    assert [(s.backup, s.weight, s.down) for s in up.servers] == [(True, 1, False), (False, 2, True)]


# --------------------------------------------------------------------------- balancing methods


@pytest.mark.parametrize(
    ("line", "kind", "args"),
    [
        ("least_conn;", "least_conn", ()),
        ("hash $request_uri;", "hash", ("$request_uri",)),
        ("hash $http_x_user consistent;", "hash", ("$http_x_user", "consistent")),
        ("ip_hash;", "ip_hash", ()),
        ("random;", "random", ()),
        ("random two;", "random", ("two",)),
        ("random two least_conn;", "random", ("two", "least_conn")),
        ("least_time header;", "least_time", ("header",)),
        ("least_time last_byte inflight;", "least_time", ("last_byte", "inflight")),
        ("ewma;", "ewma", ()),
    ],
)
def test_balancing_methods(tmp_path: Path, line: str, kind: str, args: tuple[str, ...]) -> None:
    up = upstream(tmp_path, f"{line} server 127.0.0.1:9001;")
    assert (up.method.kind, up.method.args) == (kind, args)
    assert up.method.source is not None and up.method.source.line == 3


def test_round_robin_is_the_default_method(tmp_path: Path) -> None:
    up = upstream(tmp_path, "server 127.0.0.1:9001;")
    assert (up.method.kind, up.method.args, up.method.source) == ("round_robin", (), None)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("least_conn x;", 'invalid number of arguments in "least_conn" directive'),
        ("hash;", 'invalid number of arguments in "hash" directive'),
        ("hash $uri x;", 'invalid parameter "x"'),
        ("hash $foo;", 'unknown "foo" variable'),
        ("random three;", 'invalid parameter "three"'),
        ("random two foo;", 'invalid parameter "foo"'),
        ("least_time;", 'invalid number of arguments in "least_time" directive'),
        ("least_time first_byte;", 'invalid parameter "first_byte"'),
        ("hash $uri; server 127.0.0.1 backup;", 'balancing method does not support parameter "backup"'),
        ("ip_hash; server 127.0.0.1 backup;", 'balancing method does not support parameter "backup"'),
        ("random; server 127.0.0.1 backup;", 'balancing method does not support parameter "backup"'),
    ],
)
def test_balancing_method_errors(tmp_path: Path, body: str, message: str) -> None:
    text = f"upstream u {{ {body} server 127.0.0.1:9001; }}"
    assert http_error(tmp_path, text) == f"[emerg] {message} in x.conf:2"


def test_method_checks_only_the_lines_after_it(tmp_path: Path) -> None:
    up = upstream(tmp_path, "server 127.0.0.1:1; server 127.0.0.1:2 backup; hash $uri;")
    assert [s.backup for s in up.servers] == [False, True]  # as nginx: earlier lines pass


def test_a_later_method_replaces_the_earlier_one_with_a_warning(tmp_path: Path) -> None:
    conf = http(tmp_path, "upstream u { least_conn; server 127.0.0.1:1; ip_hash; }")
    assert conf.http is not None and conf.http.upstreams["u"].method.kind == "ip_hash"
    assert conf.warnings == (f"[warn] load balancing method redefined in {tmp_path}/x.conf:3",)


def test_method_before_a_hook_is_its_fallback(tmp_path: Path) -> None:
    conf = http(tmp_path, "upstream u { least_conn; server 127.0.0.1:1; balancer_by_python_block { pass } }")
    assert conf.http is not None
    up = conf.http.upstreams["u"]
    assert up.method.kind == "least_conn" and up.hook is not None
    assert conf.warnings == (f"[warn] load balancing method redefined in {tmp_path}/x.conf:3",)


def test_method_after_a_hook_replaces_it(tmp_path: Path) -> None:
    # nginx/OpenResty: the later balancer wins; the warning says so
    conf = http(tmp_path, "upstream u { server 127.0.0.1:1; balancer_by_python_block { pass } random; }")
    assert conf.http is not None
    up = conf.http.upstreams["u"]
    assert up.method.kind == "random" and up.hook is None
    assert len(conf.warnings) == 1
    assert (
        http_error(
            tmp_path,
            "upstream u { server 127.0.0.1:1; balancer_by_python_block { pass } random;"
            " balancer_by_python_block { pass } }",
        )
        == '[emerg] "balancer_by_python_block" directive is duplicate in x.conf:2'
    )


def test_client_body_and_proxy_buffer_defaults_and_inheritance(tmp_path: Path) -> None:
    import mmap

    conf = http(tmp_path, """
        client_body_buffer_size 64k;
        server {
            listen 8080; underscores_in_headers on; client_header_buffer_size 2k;
            location / { client_body_temp_path spool 1 2; client_body_in_file_only clean; }
            location /b { proxy_buffer_size 16k; proxy_busy_buffers_size 16k; }
        }
        server { listen 8081; ignore_invalid_headers off; location / { } }
    """)
    assert conf.http is not None
    first, second = conf.http.servers
    plain, buffered = first.locations
    assert (first.underscores_in_headers, first.ignore_invalid_headers, first.client_header_buffer_size) == (
        True, True, 2048)
    assert (second.underscores_in_headers, second.ignore_invalid_headers) == (False, False)
    assert plain.client_body.buffer_size == 64 * 1024
    assert plain.client_body.temp_path == str(tmp_path / "spool")
    assert plain.client_body.in_file_only == "clean" and not plain.client_body.in_single_buffer
    assert buffered.client_body.temp_path == str(tmp_path / "client_body_temp")  # the default
    assert buffered.client_body.in_file_only == "off"
    assert (buffered.proxy.buffer_size, buffered.proxy.busy_buffers_size) == (16384, 16384)
    page = mmap.PAGESIZE
    assert (plain.proxy.buffer_size, plain.proxy.buffers, plain.proxy.busy_buffers_size) == (
        page, (8, page), 2 * page)
    assert second.locations[0].client_body.buffer_size == 64 * 1024  # (from http)
