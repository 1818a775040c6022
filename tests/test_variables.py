"""nginx variables and compiled templates, against a small fake exchange."""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httptools
import pytest
from helpers import Scriptlb

from scriptlb.config.model import Template, Var
from scriptlb.config.templates import KNOWN_VARIABLES
from scriptlb.config.templates import compile_template as parse
from scriptlb.variables.evaluate import (
    compile_log_format,
    compile_template,
    find_arg,
    find_cookie,
    get_variable,
    json_escape,
    log_escape,
    missing_names,
    variable_getter,
)

START = time.mktime((2026, 11, 22, 10, 0, 0, 0, 0, -1))  # local time, as nginx logs it
CLOCK_NOW = START + 0.25


def clock() -> float:
    return CLOCK_NOW


@dataclass
class Try:
    addr: str
    status: int | None
    connect_time: float | None = None
    header_time: float | None = None
    response_time: float | None = None


@dataclass
class FakeExchange:
    """The attributes of the Request/exchange contract (docs/architecture.md)."""

    method: str = "GET"
    request_uri: str = "/path/x?a=1&B=two&empty="
    uri: str = "/path/x"
    args: str | None = "a=1&B=two&empty="
    http_version: str = "1.1"
    headers: list[tuple[bytes, bytes]] = field(
        default_factory=lambda: [
            (b"Host", b"Example.com:8080"),
            (b"User-Agent", b'curl/8 "quoted"'),
            (b"X-Forwarded-For", b"10.0.0.1"),
            (b"x-forwarded-for", b"10.0.0.2"),
            (b"Cookie", b"a=1; Session=abc"),
            (b"cookie", b"c=3"),
            (b"X-Custom-Thing", b"yes"),
        ]
    )
    remote_addr: str = "127.0.0.1"
    remote_port: int = 53211
    server_addr: str = "127.0.0.1"
    server_port: int = 8080
    server_name: str = "localhost"
    host: str = "example.com"
    scheme: str = "http"
    start_time: float = START
    status: int = 200
    body_bytes_sent: int = 12
    bytes_sent: int = 180
    conn_id: int = 17
    conn_requests: int = 3
    request_length: int = 95
    upstream_name: str | None = "backend"
    proxy_host: str = "backend"
    tries: list[Any] = field(default_factory=list)
    upstream_headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    response_headers: bytes = b""
    ctx: dict[str, Any] = field(default_factory=dict)

    def header(self, name_lower: str) -> str | None:
        for name, value in self.headers:
            if name.lower() == name_lower.encode():
                return value.decode("latin-1")
        return None


def value(name: str, ex: FakeExchange | None = None) -> str | None:
    return variable_getter(name, clock)(ex or FakeExchange())


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("remote_addr", "127.0.0.1"),
        ("remote_port", "53211"),
        ("request", "GET /path/x?a=1&B=two&empty= HTTP/1.1"),
        ("request_method", "GET"),
        ("request_uri", "/path/x?a=1&B=two&empty="),
        ("uri", "/path/x"),
        ("document_uri", "/path/x"),
        ("args", "a=1&B=two&empty="),
        ("query_string", "a=1&B=two&empty="),
        ("is_args", "?"),
        ("host", "example.com"),
        ("http_host", "Example.com:8080"),
        ("scheme", "http"),
        ("server_addr", "127.0.0.1"),
        ("server_port", "8080"),
        ("server_name", "localhost"),
        ("server_protocol", "HTTP/1.1"),
        ("status", "200"),
        ("body_bytes_sent", "12"),
        ("bytes_sent", "180"),
        ("request_length", "95"),
        ("connection", "17"),
        ("connection_requests", "3"),
        ("proxy_host", "backend"),
        ("proxy_add_x_forwarded_for", "10.0.0.1, 10.0.0.2, 127.0.0.1"),
        ("request_time", "0.250"),
        ("msec", f"{CLOCK_NOW:.3f}"),
        ("content_length", None),
        ("upstream_addr", None),
        ("upstream_status", None),
        ("upstream_response_time", None),
    ],
)
def test_fixed_variables(name: str, expected: str | None) -> None:
    assert value(name) == expected


def test_time_formats_are_local_time_like_nginx() -> None:
    tm = time.localtime(START)
    offset = tm.tm_gmtoff // 60
    zone = f"{'-' if offset < 0 else '+'}{abs(offset) // 60:02d}{abs(offset) % 60:02d}"
    assert value("time_local") == f"22/Nov/2026:10:00:00 {zone}"
    assert value("time_iso8601") == f"2026-11-22T10:00:00{zone[:3]}:{zone[3:]}"


def test_without_query_string() -> None:
    ex = FakeExchange(request_uri="/p", args=None)
    assert (value("args", ex), value("is_args", ex), value("arg_a", ex)) == (None, "", None)
    empty = FakeExchange(request_uri="/p?", args="")
    assert (value("args", empty), value("is_args", empty)) == (None, "")  # as nginx: not found


def test_status_zero_is_000_and_request_time_never_negative() -> None:
    ex = FakeExchange(status=0, start_time=CLOCK_NOW + 5)
    assert (value("status", ex), value("request_time", ex)) == ("000", "0.000")


def test_http_family_is_case_insensitive_with_dashes_as_underscores() -> None:
    assert value("http_user_agent") == 'curl/8 "quoted"'
    assert value("http_x_custom_thing") == "yes"
    assert value("http_x_forwarded_for") == "10.0.0.1, 10.0.0.2"  # nginx joins repeated headers
    assert value("http_cookie") == "a=1; Session=abc; c=3"  # Cookie lines join with "; "
    assert value("http_referer") is None


@pytest.mark.parametrize(
    ("authorization", "user"),
    [
        (None, None),
        (b"Basic dXNlcjpwYXNz", "user"),  # user:pass
        (b"basic   dXNlcjpwYXNz", "user"),
        (b"Basic dXNlcg==", None),  # "user" without a colon
        (b"Basic OnBhc3M=", None),  # ":pass": empty user
        (b"Bearer dXNlcjpwYXNz", None),
        (b"Basic !!!", None),
    ],
)
def test_remote_user(authorization: bytes | None, user: str | None) -> None:
    headers = [] if authorization is None else [(b"Authorization", authorization)]
    assert value("remote_user", FakeExchange(headers=headers)) == user


def test_no_x_forwarded_for_gives_the_client_address() -> None:
    assert value("proxy_add_x_forwarded_for", FakeExchange(headers=[])) == "127.0.0.1"


@pytest.mark.parametrize(
    ("name", "expected"),
    [("arg_a", "1"), ("arg_b", "two"), ("arg_empty", ""), ("arg_missing", None)],
)
def test_arg_family(name: str, expected: str | None) -> None:
    assert value(name) == expected


@pytest.mark.parametrize(
    ("name", "expected"),
    [("cookie_a", "1"), ("cookie_session", "abc"), ("cookie_c", "3"), ("cookie_zzz", None)],
)
def test_cookie_family(name: str, expected: str | None) -> None:
    assert value(name) == expected


def test_find_arg_and_cookie_edge_cases() -> None:
    assert find_arg("a&a=2", "a") == "2"  # "a" without "=" is not a value
    assert find_arg("", "a") is None
    assert find_cookie("x=1;y=2", "y") == "2"
    assert find_cookie(None, "y") is None


def test_sent_and_upstream_header_families() -> None:
    ex = FakeExchange(
        response_headers=b"Content-Type: text/plain\r\nX-Served-By: b1\r\nX-Served-By: b2\r\n",
        upstream_headers=[(b"X-Upstream", b"u1"), (b"Set-Cookie", b"s=1")],
    )
    assert value("sent_http_content_type", ex) == "text/plain"
    assert value("sent_http_x_served_by", ex) == "b1, b2"
    assert value("sent_http_location", ex) is None
    assert value("upstream_http_x_upstream", ex) == "u1"
    assert value("upstream_http_set_cookie", ex) == "s=1"
    assert value("upstream_http_none", ex) is None
    assert value("sent_http_content_type") is None  # nothing sent yet
    listed = FakeExchange(response_headers=[(b"Content-Type", b"a/b")])  # type: ignore[arg-type]
    assert value("sent_http_content_type", listed) == "a/b"


def test_upstream_lists_per_try() -> None:
    ex = FakeExchange(
        tries=[
            Try("127.0.0.1:9001", 502, connect_time=None, header_time=None, response_time=0.0015),
            Try("127.0.0.1:9002", 504, connect_time=0.001, header_time=None, response_time=1.0),
            Try("127.0.0.1:9003", 200, connect_time=0.002, header_time=0.012, response_time=0.0349),
        ]
    )
    assert value("upstream_addr", ex) == "127.0.0.1:9001, 127.0.0.1:9002, 127.0.0.1:9003"
    assert value("upstream_status", ex) == "502, 504, 200"
    assert value("upstream_connect_time", ex) == "-, 0.001, 0.002"
    assert value("upstream_header_time", ex) == "-, -, 0.012"
    assert value("upstream_response_time", ex) == "0.001, 1.000, 0.034"


def test_upstream_status_unknown_is_dash() -> None:
    ex = FakeExchange(tries=[Try("backend", 502), Try("127.0.0.1:1", None)])
    assert value("upstream_status", ex) == "502, -"


def test_every_known_config_variable_has_a_getter() -> None:
    assert missing_names() == frozenset()
    for name in KNOWN_VARIABLES:
        variable_getter(name, clock)


def test_unknown_variable_is_a_key_error() -> None:
    with pytest.raises(KeyError):
        variable_getter("no_such_variable")
    with pytest.raises(KeyError):
        variable_getter("http_")  # a family prefix alone is not a name


def test_get_variable_for_hooks() -> None:
    assert get_variable(FakeExchange(), "REMOTE_ADDR") == "127.0.0.1"
    assert get_variable(FakeExchange(), "http_referer") is None


# --------------------------------------------------------------------------- templates


def test_static_template_returns_the_constant() -> None:
    render = compile_template(parse("close"))
    assert render(FakeExchange()) == "close"
    assert compile_template(parse(""))(FakeExchange()) == ""


def test_literal_only_template_without_static_text() -> None:
    template = Template(raw="ab", parts=("a", "b"), static=None)
    assert compile_template(template)(FakeExchange()) == "ab"
    assert compile_log_format(template)(FakeExchange()) == "ab"


def test_template_with_variables_and_braces() -> None:
    render = compile_template(parse("{$remote_addr}:${server_port}x $http_referer|"))
    assert render(FakeExchange()) == "{127.0.0.1}:8080x |"


def test_single_variable_template_missing_is_empty() -> None:
    assert compile_template(parse("$http_referer"))(FakeExchange()) == ""
    assert compile_template(parse("$proxy_host"))(FakeExchange()) == "backend"


def test_template_built_by_hand() -> None:
    template = Template(raw="$uri$is_args$args", parts=(Var("uri"), Var("is_args"), Var("args")), static=None)
    assert compile_template(template)(FakeExchange()) == "/path/x?a=1&B=two&empty="


COMBINED = parse(
    '$remote_addr - $remote_user [$time_local] "$request" $status $body_bytes_sent '
    '"$http_referer" "$http_user_agent"'
)


def test_combined_log_line_with_default_escaping() -> None:
    line = compile_log_format(COMBINED, "default", clock)(FakeExchange())
    time_local = value("time_local")
    assert line == (
        f'127.0.0.1 - - [{time_local}] "GET /path/x?a=1&B=two&empty= HTTP/1.1" 200 12 "-" '
        '"curl/8 \\x22quoted\\x22"'
    )


def test_log_format_not_found_and_empty_values() -> None:
    fmt = parse("[$http_referer][$is_args][$upstream_addr]")
    ex = FakeExchange(args=None)
    assert compile_log_format(fmt, "default", clock)(ex) == "[-][][-]"
    assert compile_log_format(fmt, "json", clock)(ex) == "[][][]"
    assert compile_log_format(fmt, "none", clock)(ex) == "[][][]"


def test_log_format_escaping_modes() -> None:
    fmt = parse('"$http_user_agent"')
    ex = FakeExchange(headers=[(b"User-Agent", b'a"b\\c\td\x7f\xe9')])
    assert compile_log_format(fmt, "default", clock)(ex) == '"a\\x22b\\x5Cc\\x09d\\x7F\\xE9"'
    assert compile_log_format(fmt, "json", clock)(ex) == '"a\\"b\\\\c\\td\x7f\xe9"'
    assert compile_log_format(fmt, "none", clock)(ex) == '"a"b\\c\td\x7f\xe9"'


def test_static_log_format_and_unknown_escape() -> None:
    assert compile_log_format(parse("static"), "default")(FakeExchange()) == "static"
    with pytest.raises(ValueError, match='unknown log escaping "xml"'):
        compile_log_format(parse("$uri"), "xml")


@pytest.mark.parametrize(
    ("raw", "escaped"),
    [
        ("plain text", "plain text"),
        ('"', "\\x22"),
        ("\\", "\\x5C"),
        ("\x00\x1f", "\\x00\\x1F"),
        ("\xff", "\\xFF"),
        ("\udcc3", "\\xC3"),  # a raw byte from surrogateescape decoding
        ("\u20ac", "\\xE2\\x82\\xAC"),  # beyond latin-1: its UTF-8 bytes
    ],
)
def test_log_escape(raw: str, escaped: str) -> None:
    assert log_escape(raw) == escaped


@pytest.mark.parametrize(
    ("raw", "escaped"),
    [
        ("plain", "plain"),
        ('"\\', '\\"\\\\'),
        ("\n\r\t\b\f", "\\n\\r\\t\\b\\f"),
        ("\x01\x1f", "\\u0001\\u001F"),
        ("\xe9", "\xe9"),
    ],
)
def test_json_escape(raw: str, escaped: str) -> None:
    assert json_escape(raw) == escaped


# --------------------------------------------------------------------------- against a real nginx

from test_round_robin import NGINX, free_ports, nginx_running  # noqa: E402  (the shared runner)

LOGGED = "$http_x_a|$arg_q|$arg_none|$http_missing|$is_args|$args|$request|$cookie_c|$status|$body_bytes_sent"
NGINX_REQUESTS = [
    ("/p", [(b"X-A", b"plain")]),
    ("/p?q=a%22b&x=1", [(b"X-A", b'quote " backslash \\ tab \t end')]),
    ('/p?q="raw"', [(b"X-A", b"ctl \x01\x1f del \x7f high \xe9\xff"), (b"Cookie", b"a=1; c=cookie\\v")]),
    ("/p?", [(b"Cookie", b"c=")]),
    ("/p?Q=upper&q=", []),
    ("/p?h=1", [(b"X-A", b"high \xe9\xff"), (b"Cookie", b"c=hi\xe9")]),
    ("/p?h=\xe9", []),
]


def request_bytes(target: str, headers: list[tuple[bytes, bytes]]) -> bytes:
    head = f"GET {target} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n".encode("latin-1")
    return head + b"".join(name + b": " + value + b"\r\n" for name, value in headers) + b"\r\n"


def httptools_accepts(request: bytes) -> bool:
    """llhttp (strict) refuses control bytes in header values and raw high bytes in the target,
    which nginx accepts: those requests are compared with nginx only, not sent to scriptlb."""
    try:
        httptools.HttpRequestParser(object()).feed_data(request)
    except httptools.HttpParserError:
        return False
    return True


@pytest.mark.nginx
@pytest.mark.skipif(NGINX is None, reason="nginx is not installed")
@pytest.mark.parametrize("escape", ["default", "json", "none"])
def test_log_lines_equal_a_real_nginx(tmp_path: Path, escape: str) -> None:
    (port,) = free_ports(1)
    http_block = f"""
        log_format probe escape={escape} '{LOGGED}';
        server {{
            listen 127.0.0.1:{port};
            location / {{ return 200 ok; access_log {tmp_path}/logs/probe.log probe; }}
        }}
    """

    def send_requests(server_port: int, requests: list[tuple[str, list[tuple[bytes, bytes]]]]) -> None:
        for target, headers in requests:
            with socket.create_connection(("127.0.0.1", server_port), timeout=5) as sock:
                sock.sendall(request_bytes(target, headers))
                while sock.recv(65536):
                    pass

    with nginx_running(tmp_path, http_block, [port]):
        send_requests(port, NGINX_REQUESTS)
    nginx_lines = (tmp_path / "logs/probe.log").read_bytes().decode("latin-1").splitlines()
    lb_dir = tmp_path / "scriptlb"
    lb_dir.mkdir()
    lb_block = http_block.replace(f"listen 127.0.0.1:{port}", "listen 127.0.0.1:{port0}")
    lb_block = lb_block.replace(str(tmp_path / "logs"), str(lb_dir))
    lb_conf = f"""
        daemon off; master_process off; error_log {lb_dir}/error.log info;
        events {{}}
        http {{ {lb_block} }}
    """
    clean = [i for i, request in enumerate(NGINX_REQUESTS) if httptools_accepts(request_bytes(*request))]
    assert len(clean) >= 5
    with Scriptlb(lb_conf, lb_dir) as lb:  # the same log_format through scriptlb's pipeline
        send_requests(lb.port, [NGINX_REQUESTS[i] for i in clean])
    lb_lines = (lb_dir / "probe.log").read_bytes().decode("latin-1").splitlines()
    assert lb_lines == [nginx_lines[i] for i in clean]

    render = compile_log_format(parse(LOGGED), escape, clock)
    ours = []
    for target, headers in NGINX_REQUESTS:
        path, sep, args = target.partition("?")
        ex = FakeExchange(
            request_uri=target,
            uri=path,
            args=args if sep else None,
            headers=[(b"Host", b"t"), (b"Connection", b"close"), *headers],
            body_bytes_sent=2,
        )
        ours.append(render(ex))
    assert ours == nginx_lines
