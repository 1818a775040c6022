"""A request as variables, access logs and hooks read it (``scriptlb.request_view.RequestView``),
made of plain fields: the double the variable tests use. tests/test_request_view.py checks it
against the protocol, so it cannot drift from what the proxy's ``Exchange`` offers."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

from scriptlb.request.headers_filter import request_header

START = time.mktime((2026, 11, 22, 10, 0, 0, 0, 0, -1))  # local time, as nginx logs it


@dataclass
class Try:
    addr: str
    status: int | None
    started: float = START
    connect_time: float | None = None
    header_time: float | None = None
    response_time: float | None = None


@dataclass
class FakeExchange:
    """Every field of RequestView, with a typical request's values."""

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
    tries: list[Try] = field(default_factory=list)
    upstream_headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    response_headers: bytes = b""
    ctx: dict[str, object] = field(default_factory=dict)
    tries_left: int = 0
    tries_cap: int = 0
    last_failure: tuple[str, int] | None = None
    connect_timeout: float = 60.0
    send_timeout: float = 60.0
    read_timeout: float = 60.0
    is_stream: Literal[False] = False

    def header(self, name_lower: str) -> str | None:
        return request_header(self.headers, name_lower)
