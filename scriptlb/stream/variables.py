"""The variables of a stream session (ngx_stream_core/upstream/ssl_preread modules).

Getters take a ``scriptlb.stream.session.Session`` (duck-typed: its attributes below) and
return the value as nginx prints it, or None ("not found": "-" in a log line). Per-try values
(``$upstream_*``) are joined with ", " as nginx does, one entry per try.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from typing import Any

from scriptlb.config.templates import STREAM_VARIABLES
from scriptlb.http.proxy_protocol import tlv_text
from scriptlb.variables.evaluate import _ms, _TimeFormats

Getter = Callable[[Any], "str | None"]
Clock = Callable[[], float]

_HOSTNAME = socket.gethostname().lower()  # (nginx lower-cases it)
# $nginx_version: the nginx release whose behaviour scriptlb follows (what configs compare)
NGINX_VERSION = "1.22.1"


def _attr(name: str) -> Getter:
    def get(session: Any) -> str | None:
        value = getattr(session, name)
        return None if value is None else str(value)

    return get


def _per_try(field: str, timed: bool) -> Getter:
    def get(session: Any) -> str | None:
        tries = session.tries
        if not tries:
            return None
        if timed:
            return ", ".join([_ms(getattr(t, field)) for t in tries])
        return ", ".join([str(getattr(t, field, 0) or 0) for t in tries])

    return get


def _cached(name: str) -> Getter:
    """A counter read once per session: nginx caches a cacheable variable's first value, so a
    log line after ``return $bytes_sent`` repeats what the text said."""
    slot = "var_" + name
    get_value = _attr(name)

    def get(session: Any) -> str | None:
        cache: dict[str, str | None] = session.ctx_cache
        if slot not in cache:
            cache[slot] = get_value(session)
        return cache[slot]

    return get


def _upstream_addr(session: Any) -> str | None:
    tries = session.tries
    return ", ".join([t.addr for t in tries]) if tries else None


def _binary_remote_addr(session: Any) -> str | None:
    addr = session.remote_addr
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    try:
        return socket.inet_pton(family, addr).decode("latin-1")
    except OSError:
        return None


def _limit_conn_status(session: Any) -> str | None:
    limit = session.limit
    return (limit.conn_status or None) if limit is not None else None


_SIMPLE: dict[str, Getter] = {
    "remote_addr": _attr("remote_addr"),
    "remote_port": _attr("remote_port"),
    "binary_remote_addr": _binary_remote_addr,
    "server_addr": _attr("server_addr"),
    "server_port": _attr("server_port"),
    "bytes_sent": _cached("bytes_sent"),
    "bytes_received": _cached("bytes_received"),
    "status": lambda s: str(s.status) if s.ended else "000",  # (nginx's, before the end)
    "protocol": _attr("protocol"),
    "connection": _attr("conn_id"),
    "hostname": lambda s: _HOSTNAME,
    "pid": lambda s: str(os.getpid()),
    "nginx_version": lambda s: NGINX_VERSION,
    "upstream_addr": _upstream_addr,
    "upstream_connect_time": _per_try("connect_time", timed=True),
    "upstream_first_byte_time": _per_try("header_time", timed=True),
    "upstream_session_time": _per_try("response_time", timed=True),
    "upstream_bytes_sent": _per_try("bytes_sent", timed=False),
    "upstream_bytes_received": _per_try("bytes_received", timed=False),
    "ssl_preread_server_name": _attr("ssl_server_name"),
    "ssl_preread_protocol": _attr("ssl_protocol"),
    "ssl_preread_alpn_protocols": _attr("ssl_alpn_protocols"),
    "limit_conn_status": _limit_conn_status,
    "proxy_protocol_addr": _attr("proxy_protocol_addr"),
    "proxy_protocol_port": _attr("proxy_protocol_port"),
    "proxy_protocol_server_addr": lambda s: _header_field(s, "server_addr"),
    "proxy_protocol_server_port": lambda s: _header_field(s, "server_port"),
    "realip_remote_addr": lambda s: s.realip_remote_addr or s.remote_addr,
    "realip_remote_port": lambda s: s.realip_remote_port or s.remote_port,
}


def _clocked(name: str, clock: Clock) -> Getter:
    formats = _TimeFormats()
    if name == "session_time":
        return lambda s: _ms(clock() - s.start_time)
    if name == "msec":
        return lambda s: f"{clock():.3f}"
    if name == "time_local":
        return lambda s: formats.refresh(clock()).local
    return lambda s: formats.refresh(clock()).iso8601


_CLOCKED = frozenset({"session_time", "msec", "time_local", "time_iso8601"})


class _TlsView:
    """What http's ``$ssl_*`` getters read of an exchange (``ex.conn.tls``), for a session:
    the SSLObject of its ``listen ... ssl`` connection, None on a plain one."""

    __slots__ = ("conn", "tls")

    def __init__(self, session: Any) -> None:
        self.conn = self
        transport = session.transport
        self.tls = transport.get_extra_info("ssl_object") if transport is not None else None


def _tls_getter(http_getter: Getter) -> Getter:
    def get(session: Any) -> str | None:
        return http_getter(_TlsView(session))

    return get


def _header_field(session: Any, field: str) -> str | None:
    header = session.proxy_protocol
    value = getattr(header, field, None) if header is not None else None
    return None if value is None else str(value)


def _tlv(name: str) -> Getter:
    return lambda session: tlv_text(session.proxy_protocol, name)


_TLV_PREFIX = "proxy_protocol_tlv_"


def _capture(number: int) -> Getter:
    def get(session: Any) -> str | None:
        captures: tuple[str, ...] = session.captures
        return captures[number] if number < len(captures) else None

    return get


def _tls_names() -> frozenset[str]:
    return frozenset(name for name in STREAM_VARIABLES if name.startswith("ssl_")
                     and not name.startswith("ssl_preread_"))


def _stored(name: str) -> Getter:
    """A variable the session holds itself (``set``, a named capture): "" until given one."""

    def get(session: Any) -> str | None:
        value: str | None = session.ctx_cache.get(name, "")
        return value

    return get


def variable_getter(name: str, clock: Clock = time.time, stored: frozenset[str] = frozenset()) -> Getter:
    """The getter of stream variable ``$name`` (``stored``: the names sessions hold, ``set``
    targets and named captures); KeyError for a name stream does not have."""
    getter = _SIMPLE.get(name)
    if getter is not None:
        return getter
    if name in _CLOCKED:
        return _clocked(name, clock)
    if name.isdigit():
        return _capture(int(name))
    if name.startswith(_TLV_PREFIX) and len(name) > len(_TLV_PREFIX):
        return _tlv(name[len(_TLV_PREFIX):])
    if name in stored:
        return _stored(name)
    if name in _tls_names():
        from scriptlb.http.tls import TLS_VARIABLES  # (the same values as http's, one implementation)

        return _tls_getter(TLS_VARIABLES[name])
    raise KeyError(name)


def missing_names() -> frozenset[str]:
    """Names the config accepts in stream that have no getter here (kept empty by a test)."""
    return STREAM_VARIABLES - frozenset(_SIMPLE) - _CLOCKED - _tls_names()
