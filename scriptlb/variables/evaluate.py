"""nginx variables, evaluated against a request exchange, and templates compiled to callables.

A *getter* reads one variable from an exchange (the attributes listed under "Request/exchange"
in docs/architecture.md) and returns its text, or ``None`` when nginx would call it "not found"
(an absent header, a request that was not proxied, no query string...). Templates decide what
"not found" becomes: ``""`` in ``proxy_set_header`` and friends; in access logs ``-`` with the
default escaping and ``""`` with ``escape=json``/``none``, exactly as ngx_http_log_module.

Templates are compiled once at load time into one ``str.format`` call over their getters, so a
request pays only for its variables. Strings from the exchange are taken as latin-1 text (one
character per byte, how headers are decoded); log escaping works on those bytes like nginx.

The list of names the config accepts lives in ``scriptlb.config.templates``; every one of them
has a getter here (a test checks it).
"""

from __future__ import annotations

import binascii
import ipaddress
import os
import re
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeGuard

from scriptlb.config.model import GeoConf, MapConf, Template, Var
from scriptlb.config.templates import KNOWN_VARIABLES, VARIABLE_PREFIXES
from scriptlb.http.proxy_protocol import tlv_text
from scriptlb.http.tls import TLS_VARIABLES
from scriptlb.request_view import Header, RequestView

Getter = Callable[[RequestView], "str | None"]
Clock = Callable[[], float]
Renderer = Callable[[RequestView], str]

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


# --------------------------------------------------------------------------- request


def _request_line(ex: RequestView) -> str | None:
    return f"{ex.method} {ex.request_uri} HTTP/{ex.http_version}"


def _args(ex: RequestView) -> str | None:
    return ex.args or None  # nginx: "/x?" has no args at all (not found), like "/x"


def _is_args(ex: RequestView) -> str | None:
    return "?" if ex.args else ""  # nginx: "" for "/x?" too (empty args)


def _http_host(ex: RequestView) -> str | None:
    return ex.header("host")


def _connections(ex: RequestView, name: str) -> str | None:
    """``$connections_*``: the instance's counters, as stub_status shows them."""
    runtime = getattr(ex, "runtime", None)  # (a made-up request has no worker: not found)
    if runtime is None:
        return None
    status = runtime.status
    return str(status.totals()[name]) if status is not None else "0"


def _remote_user(ex: RequestView) -> str | None:
    """nginx's ngx_http_auth_basic_user: the user of "Authorization: Basic base64(user:pass)"."""
    authorization = ex.header("authorization")
    if authorization is None:
        return None
    scheme, _, encoded = authorization.strip().partition(" ")
    if scheme.lower() != "basic" or not encoded:
        return None
    try:
        decoded = binascii.a2b_base64(encoded.strip().encode("latin-1"), strict_mode=True)
    except (binascii.Error, UnicodeEncodeError):
        return None
    user, colon, _ = decoded.decode("latin-1").partition(":")
    return user if colon and user else None  # nginx declines without "user:"


def _limit_rate(ex: RequestView) -> str | None:
    """A ``set $limit_rate`` value (a size in bytes already), else the location's limit_rate
    once the response is being sent (nginx takes it then: 0 in the response's own headers)."""
    values = getattr(ex, "variables", None)
    if values and "limit_rate" in values:
        return str(values["limit_rate"])
    location = getattr(ex, "location", None)
    conn = getattr(ex, "conn", None)
    if location is None or conn is None or not conn.response_started:
        return "0"
    return str(location.conf.limit_rate)


def _status(ex: RequestView) -> str | None:
    return f"{ex.status:03d}"


def _port(name: str) -> Getter:
    """A port as nginx prints it: "" when there is none (0: a unix socket, a realip address
    given without one)."""
    def get(ex: RequestView) -> str | None:
        port = getattr(ex, name)
        return str(port) if port else ""

    return get


def _binary_remote_addr(ex: RequestView) -> str | None:
    """The client address as 4 or 16 bytes (one char per byte), the usual limit_*_zone key."""
    addr = ex.remote_addr
    if addr == "unix:":
        return ""
    try:
        return ipaddress.ip_address(addr).packed.decode("latin-1")
    except ValueError:
        return addr


def _limit_status(field: str) -> Getter:
    """$limit_req_status / $limit_conn_status: not found until the limit ran."""
    def get(ex: RequestView) -> str | None:
        limit = getattr(ex, "limit", None)
        return (getattr(limit, field) or None) if limit is not None else None

    return get


def _realip_remote_addr(ex: RequestView) -> str | None:
    conn = getattr(ex, "conn", None)
    return conn.remote_addr if conn is not None else ex.remote_addr


def _realip_remote_port(ex: RequestView) -> str | None:
    conn = getattr(ex, "conn", None)
    port = conn.remote_port if conn is not None else ex.remote_port
    return str(port) if port else ""


def _proxy_protocol(field: str) -> Getter:
    """$proxy_protocol_addr & co: what the connection's PROXY header announced ("" without)."""
    def get(ex: RequestView) -> str | None:
        header = getattr(getattr(ex, "conn", None), "proxy_protocol", None)
        value = getattr(header, field, None) if header is not None else None
        return "" if value is None else str(value)

    return get


def _proxy_host(ex: RequestView) -> str | None:
    return getattr(ex, "proxy_host", None) or None


def _proxy_port(ex: RequestView) -> str | None:
    """nginx's $proxy_port: proxy_pass with variables sets it per request, else the location's."""
    port = getattr(ex, "proxy_port", None)
    if port is None:
        location = getattr(ex, "location", None)
        proxy_pass = getattr(getattr(location, "conf", None), "proxy_pass", None)
        port = None if proxy_pass is None else proxy_pass.proxy_port
    return port


def _proxy_add_x_forwarded_for(ex: RequestView) -> str | None:
    forwarded = _join_headers(ex.headers, b"x_forwarded_for", b", ")
    return ex.remote_addr if forwarded is None else f"{forwarded}, {ex.remote_addr}"


def _attr(name: str) -> Getter:
    """A getter for an exchange attribute, as text (None stays "not found")."""

    def get(ex: RequestView) -> str | None:
        value = getattr(ex, name)
        return None if value is None else str(value)

    get.__name__ = f"get_{name}"
    return get


def _header(name_lower: str) -> Getter:
    def get(ex: RequestView) -> str | None:
        return ex.header(name_lower)

    return get


# --------------------------------------------------------------------------- upstream lists


def _ms(seconds: float | None) -> str:
    """nginx's "%T.%03M" of a duration kept in whole milliseconds; "-" when unknown."""
    if seconds is None:
        return "-"
    ms = max(int(seconds * 1000 + 1e-6), 0)
    return f"{ms // 1000}.{ms % 1000:03d}"


def _upstream_addr(ex: RequestView) -> str | None:
    tries = ex.tries
    return ", ".join([t.addr for t in tries]) if tries else None


def _upstream_status(ex: RequestView) -> str | None:
    tries = ex.tries
    if not tries:
        return None
    return ", ".join([str(t.status) if t.status else "-" for t in tries])


def _upstream_times(field: str) -> Getter:
    def get(ex: RequestView) -> str | None:
        tries = ex.tries
        return ", ".join([_ms(getattr(t, field)) for t in tries]) if tries else None

    return get


# $upstream_bytes_* / $upstream_response_length: a try copies its connection's counts only once
# some template reads them (a config that never does pays nothing per try)
_BYTE_COUNTS = frozenset({"upstream_bytes_sent", "upstream_bytes_received", "upstream_response_length"})
BYTE_COUNTS_READ = [False]


def _upstream_counts(field: str) -> Getter:
    """$upstream_bytes_sent & co: one byte count per try."""
    def get(ex: RequestView) -> str | None:
        tries = ex.tries
        return ", ".join([str(getattr(t, field, 0)) for t in tries]) if tries else None

    return get


def _balancer_trace(ex: RequestView) -> str | None:
    from scriptlb.variables.trace import render  # (imported on first read: most configs never read it)

    return render(ex)


# --------------------------------------------------------------------------- families


def _normalized_name(name: bytes) -> bytes:
    return name.lower().replace(b"-", b"_")


def _join_headers(headers: Iterable[Header], wanted: bytes, separator: bytes) -> str | None:
    """All values of a header (name compared as nginx: case-insensitive, "-" == "_")."""
    size = len(wanted)
    found = [value for name, value in headers if len(name) == size and _normalized_name(name) == wanted]
    if not found:
        return None
    return (found[0] if len(found) == 1 else separator.join(found)).decode("latin-1")


def _http_family(suffix: str) -> Getter:
    wanted = suffix.encode("latin-1")
    separator = b"; " if wanted == b"cookie" else b", "

    def get(ex: RequestView) -> str | None:
        return _join_headers(ex.headers, wanted, separator)

    return get


def _upstream_http_family(suffix: str) -> Getter:
    wanted = suffix.encode("latin-1")

    def get(ex: RequestView) -> str | None:
        headers = getattr(ex, "upstream_headers", ())  # (unset until a peer's response came)
        return _join_headers(headers, wanted, b", ") if headers else None

    return get


# the framing lines the client connection writes itself: nginx's $sent_http_content_length,
# _connection and _transfer_encoding report them (Server and Date it writes unlisted: "-")
_FRAMING_HEADERS = frozenset({b"content_length", b"connection", b"transfer_encoding"})


def _sent_trailer_family(suffix: str) -> Getter:
    """$sent_trailer_NAME: a trailer add_trailer sent (lines joined with ", ", as nginx)."""
    wanted = suffix.encode("latin-1")

    def get(ex: RequestView) -> str | None:
        trailers = getattr(ex, "sent_trailers", b"")
        return _join_headers(_split_header_block(trailers), wanted, b", ") if trailers else None

    return get


def _sent_http_family(suffix: str) -> Getter:
    wanted = suffix.encode("latin-1")
    framing = wanted in _FRAMING_HEADERS

    def get(ex: RequestView) -> str | None:
        if framing:
            head = getattr(ex, "sent_head", b"")  # the whole head as written (framing included)
            return _join_headers(_split_header_block(head), wanted, b", ") if head else None
        block = getattr(ex, "response_headers", b"")  # (unset until a response head was made)
        if not block:
            return None
        return _join_headers(_split_header_block(block), wanted, b", ")

    return get


def _split_header_block(block: bytes) -> list[tuple[bytes, bytes]]:
    """b"A: 1\\r\\nB: 2\\r\\n" -> [(b"A", b"1"), (b"B", b"2")]."""
    pairs = []
    for line in block.split(b"\r\n"):
        name, sep, value = line.partition(b":")
        if sep:
            pairs.append((name.strip(), value.strip()))
    return pairs


def find_arg(args: str | None, name: str) -> str | None:
    """nginx's ngx_http_arg: the raw value of the first ``name=`` (name case-insensitive)."""
    if not args:
        return None
    wanted = name.lower()
    for pair in args.split("&"):
        key, sep, value = pair.partition("=")
        if sep and key.lower() == wanted:
            return value
    return None


def find_cookie(cookie_header: str | None, name: str) -> str | None:
    """The value of cookie ``name`` in a Cookie header (nginx: case-insensitive name)."""
    if not cookie_header:
        return None
    wanted = name.lower()
    for pair in cookie_header.split(";"):
        key, sep, value = pair.strip().partition("=")
        if sep and key.lower() == wanted:
            return value
    return None


def _arg_family(suffix: str) -> Getter:
    def get(ex: RequestView) -> str | None:
        return find_arg(ex.args, suffix)

    return get


def _cookie_family(suffix: str) -> Getter:
    def get(ex: RequestView) -> str | None:
        return find_cookie(_join_headers(ex.headers, b"cookie", b"; "), suffix)

    return get


def _upstream_cookie_family(suffix: str) -> Getter:
    """$upstream_cookie_NAME: the value of cookie NAME the peer set (its Set-Cookie lines)."""
    wanted = suffix.lower()

    def get(ex: RequestView) -> str | None:
        # ngx_http_parse_set_cookie_lines: the name first, spaces (not tabs) around "="
        headers: Sequence[tuple[bytes, bytes]] = getattr(ex, "upstream_headers", ())  # (unset until one came)
        for name, value in headers:
            if name.lower() == b"set-cookie":
                text = value.decode("latin-1")
                if text[:len(wanted)].lower() != wanted:
                    continue
                rest = text[len(wanted):].lstrip(" ")
                if rest[:1] == "=":
                    return rest[1:].partition(";")[0].strip(" ")
        return None

    return get


def _proxy_protocol_tlv_family(name: str) -> Getter:
    """$proxy_protocol_tlv_NAME: a TLV of the connection's PROXY v2 header."""
    def get(ex: RequestView) -> str | None:
        return tlv_text(getattr(getattr(ex, "conn", None), "proxy_protocol", None), name)

    return get


_FAMILIES: dict[str, Callable[[str], Getter]] = {
    "proxy_protocol_tlv_": _proxy_protocol_tlv_family,
    "upstream_cookie_": _upstream_cookie_family,
    "http_": _http_family,
    "arg_": _arg_family,
    "cookie_": _cookie_family,
    "sent_http_": _sent_http_family,
    "sent_trailer_": _sent_trailer_family,
    "upstream_http_": _upstream_http_family,
}


# --------------------------------------------------------------------------- time


class _TimeFormats:
    """$time_local / $time_iso8601 of the current second, formatted once per second."""

    __slots__ = ("iso8601", "local", "second")

    def __init__(self) -> None:
        self.second = -1
        self.local = ""
        self.iso8601 = ""

    def refresh(self, now: float) -> _TimeFormats:
        second = int(now)
        if second != self.second:
            self.second = second
            tm = time.localtime(second)
            offset = tm.tm_gmtoff // 60
            sign = "-" if offset < 0 else "+"
            hours, minutes = divmod(abs(offset), 60)
            self.local = (
                f"{tm.tm_mday:02d}/{_MONTHS[tm.tm_mon - 1]}/{tm.tm_year}:"
                f"{tm.tm_hour:02d}:{tm.tm_min:02d}:{tm.tm_sec:02d} {sign}{hours:02d}{minutes:02d}"
            )
            self.iso8601 = (
                f"{tm.tm_year}-{tm.tm_mon:02d}-{tm.tm_mday:02d}T"
                f"{tm.tm_hour:02d}:{tm.tm_min:02d}:{tm.tm_sec:02d}{sign}{hours:02d}:{minutes:02d}"
            )
        return self


def _clocked(name: str, clock: Clock) -> Getter:
    formats = _TimeFormats()
    if name == "request_time":
        return lambda ex: _ms(clock() - ex.start_time)
    if name == "msec":
        return lambda ex: f"{clock():.3f}"
    if name == "time_local":
        return lambda ex: formats.refresh(clock()).local
    return lambda ex: formats.refresh(clock()).iso8601  # time_iso8601


_CLOCKED = frozenset({"request_time", "msec", "time_local", "time_iso8601"})

_HOSTNAME = socket.gethostname()

def _request_body(ex: RequestView) -> str | None:
    body = getattr(getattr(ex, "request", None), "body", None)  # (offline tools' requests have none)
    body = body.kept if body is not None else None
    return body.decode("latin-1") if body is not None else None


def _request_body_file(ex: RequestView) -> str | None:
    body = getattr(getattr(ex, "request", None), "body", None)
    return body.file_path if body is not None and body.in_file else None


def _connection_time(ex: RequestView) -> str | None:
    conn = getattr(ex, "conn", None)
    if conn is None:
        return None
    return f"{conn.loop.time() - conn.opened:.3f}"


_SIMPLE: dict[str, Getter] = {
    "connection_time": _connection_time,
    "request_body": _request_body,
    "request_body_file": _request_body_file,
    "remote_addr": _attr("remote_addr"),
    "remote_port": _port("remote_port"),
    "realip_remote_addr": _realip_remote_addr,
    "binary_remote_addr": _binary_remote_addr,
    "limit_req_status": _limit_status("req_status"),
    "limit_conn_status": _limit_status("conn_status"),
    "proxy_protocol_addr": _proxy_protocol("addr"),
    "proxy_protocol_port": _proxy_protocol("port"),
    "proxy_protocol_server_addr": _proxy_protocol("server_addr"),
    "proxy_protocol_server_port": _proxy_protocol("server_port"),
    "realip_remote_port": _realip_remote_port,
    "remote_user": _remote_user,
    "request": _request_line,
    "request_method": _attr("method"),
    "request_uri": _attr("request_uri"),
    "request_length": _attr("request_length"),
    "limit_rate": _limit_rate,
    "uri": _attr("uri"),
    "document_uri": _attr("uri"),
    "args": _args,
    "query_string": _args,
    "is_args": _is_args,
    "host": _attr("host"),
    "http_host": _http_host,
    "scheme": _attr("scheme"),
    "server_protocol": lambda ex: f"HTTP/{ex.http_version}",
    "server_addr": _attr("server_addr"),
    "server_port": _port("server_port"),
    "server_name": _attr("server_name"),
    "content_length": _header("content-length"),
    "content_type": _header("content-type"),
    "hostname": lambda ex: _HOSTNAME,
    "pid": lambda ex: str(os.getpid()),
    "connections_active": lambda ex: _connections(ex, "active"),
    "connections_reading": lambda ex: _connections(ex, "reading"),
    "connections_writing": lambda ex: _connections(ex, "writing"),
    "connections_waiting": lambda ex: _connections(ex, "waiting"),
    "status": _status,
    # (an exchange sets them as its log phase begins: 0 before)
    "body_bytes_sent": lambda ex: str(getattr(ex, "body_bytes_sent", 0)),
    "bytes_sent": lambda ex: str(getattr(ex, "bytes_sent", 0)),
    "connection": _attr("conn_id"),
    "connection_requests": _attr("conn_requests"),
    "proxy_host": _proxy_host,
    "proxy_port": _proxy_port,
    "proxy_add_x_forwarded_for": _proxy_add_x_forwarded_for,
    "upstream_addr": _upstream_addr,
    "upstream_status": _upstream_status,
    "upstream_response_time": _upstream_times("response_time"),
    "upstream_connect_time": _upstream_times("connect_time"),
    "upstream_header_time": _upstream_times("header_time"),
    "upstream_response_length": _upstream_counts("response_length"),
    "upstream_bytes_sent": _upstream_counts("bytes_sent"),
    "upstream_bytes_received": _upstream_counts("bytes_received"),
    "balancer_trace": _balancer_trace,
}


# the variables the running configuration declares (``map``), by name; set by use_maps
_DECLARED: dict[str, Getter] = {}


def use_maps(maps: dict[str, MapConf | GeoConf], forwarded: Callable[[GeoConf], Any] | None = None) -> None:
    """Make the ``map`` and ``geo`` variables of a configuration (HttpConf.maps) readable,
    replacing the previous configuration's. Called before the configuration's templates are
    compiled. ``forwarded(conf)``: a geo block's X-Forwarded-For reader, for one with ``proxy``."""
    from scriptlb.variables.geo import GeoVariable
    from scriptlb.variables.maps import MapVariable

    _DECLARED.clear()
    for name, conf in maps.items():
        if isinstance(conf, GeoConf):
            reader = forwarded(conf) if forwarded is not None and conf.proxies else None
            _DECLARED[name] = GeoVariable(conf, compile_template, reader)
        else:
            _DECLARED[name] = MapVariable(conf, compile_template)


_SIMPLE.update(TLS_VARIABLES)


def variable_getter(name: str, clock: Clock = time.time) -> Getter:
    """The getter of ``$name`` (lower-case, without "$"); KeyError for an unknown name.

    ``clock`` (wall-clock seconds) serves $request_time, $msec, $time_local, $time_iso8601.
    """
    getter = _SIMPLE.get(name) or _DECLARED.get(name)
    if getter is not None:
        if name in _BYTE_COUNTS:
            BYTE_COUNTS_READ[0] = True  # tries keep their byte counts from now on
        return getter
    if name in _CLOCKED:
        return _clocked(name, clock)
    for prefix in VARIABLE_PREFIXES:
        if name.startswith(prefix) and (len(name) > len(prefix) or prefix == "arg_"):
            return _FAMILIES[prefix](name[len(prefix) :])
    raise KeyError(name)


def var_getter(var: Var, clock: Clock = time.time) -> Getter:
    """The getter of a template's variable: a built-in one, a `set` one or a capture."""
    if var.kind == "set":
        return _set_variable(var.name)
    if var.kind == "capture":
        return _capture(int(var.name))
    return variable_getter(var.name, clock)


def _getter(var: Var, clock: Clock, lookup: Callable[[str, Clock], Getter]) -> Getter:
    """A template variable's getter: http's (``var_getter``: built-in, `set` or capture), or
    by name from another module's table (stream sessions have their own variables)."""
    return var_getter(var, clock) if lookup is variable_getter else lookup(var.name, clock)


def _set_variable(name: str) -> Getter:
    def get(ex: RequestView) -> str | None:
        values = getattr(ex, "variables", None)
        if values:
            value: str | None = values.get(name)
            if value is not None:
                return value
        # a named capture of the server_name regex that selected the server (matched again
        # only when read: the request pays nothing for it otherwise)
        regexes = getattr(getattr(ex, "server", None), "name_regexes", None)
        return name_capture(regexes, getattr(ex, "host", ""), name) if regexes else None

    return get


def name_capture(regexes: tuple[re.Pattern[str], ...], host: str, name: str) -> str | None:
    """``name``'s group in the first of ``regexes`` that matches ``host`` (the server's
    server_name regexes, tried in nginx's order)."""
    for regex in regexes:
        match = regex.search(host)
        if match is not None:
            return match.group(name) if name in regex.groupindex else None
    return None


def _capture(number: int) -> Getter:
    def get(ex: RequestView) -> str | None:
        captures: tuple[str, ...] | None = getattr(ex, "captures", None)
        if not captures or number >= len(captures):
            return None
        return captures[number]

    return get


def get_variable(ex: RequestView, name: str) -> str | None:
    """One variable's value now (for ngx.var reads from hooks); None when not found."""
    return variable_getter(name.lower())(ex)


def supported_names() -> frozenset[str]:
    """Every fixed variable name this module evaluates (families are prefixes)."""
    return frozenset(_SIMPLE) | _CLOCKED


def missing_names() -> frozenset[str]:
    """Names the config accepts that have no getter here (a test keeps this empty)."""
    return KNOWN_VARIABLES - supported_names()


# --------------------------------------------------------------------------- escaping

_LOG_UNSAFE = re.compile(r'["\\\x00-\x1f\x7f-\U0010ffff]')
_JSON_UNSAFE = re.compile(r'["\\\x00-\x1f]')
_JSON_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b", "\f": "\\f", '"': '\\"', "\\": "\\\\"}


def _hex_bytes(match: re.Match[str]) -> str:
    ch = match.group()
    code = ord(ch)
    if code <= 0xFF:
        return f"\\x{code:02X}"
    if 0xDC80 <= code <= 0xDCFF:  # a raw byte kept by surrogateescape decoding
        return f"\\x{code - 0xDC00:02X}"
    return "".join(f"\\x{byte:02X}" for byte in ch.encode("utf-8"))


def log_escape(value: str) -> str:
    """nginx's default access-log escaping: ``"``, ``\\``, control and high bytes as \\xHH."""
    if _LOG_UNSAFE.search(value) is None:
        return value
    return _LOG_UNSAFE.sub(_hex_bytes, value)


def _json_char(match: re.Match[str]) -> str:
    ch = match.group()
    return _JSON_SHORT.get(ch) or f"\\u{ord(ch):04X}"


def json_escape(value: str) -> str:
    """nginx's ngx_escape_json: ``"`` and ``\\`` backslashed, control characters as JSON escapes."""
    if _JSON_UNSAFE.search(value) is None:
        return value
    return _JSON_UNSAFE.sub(_json_char, value)


# --------------------------------------------------------------------------- templates


def _format_string(template: Template) -> str:
    """The template's literals with one "{}" per variable (literal braces doubled)."""
    return "".join(
        "{}" if isinstance(part, Var) else part.replace("{", "{{").replace("}", "}}")
        for part in template.parts
    )


def compile_template(template: Template, clock: Clock = time.time,
                     lookup: Callable[[str, Clock], Getter] = variable_getter) -> Renderer:
    """A callable rendering ``template`` for an exchange; "not found" variables give ""."""
    getters = tuple(_getter(v, clock, lookup) for v in template.parts if isinstance(v, Var))
    if not getters:
        constant = template.static if template.static is not None else "".join(map(str, template.parts))
        return lambda ex: constant
    if len(template.parts) == 1:
        (only,) = getters
        return lambda ex: only(ex) or ""
    fmt = _format_string(template).format

    def render(ex: RequestView) -> str:
        return fmt(*[g(ex) or "" for g in getters])

    return render


def _value_bytes(value: str) -> bytes:
    """A variable's value as the bytes it came from: request strings are one char per byte
    (latin-1); a wider character can only come from elsewhere (config text: UTF-8)."""
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogateescape")


def compile_template_bytes(template: Template, clock: Clock = time.time,
                           lookup: Callable[[str, Clock], Getter] = variable_getter,
                           ) -> Callable[[RequestView], bytes]:
    """``compile_template`` for bytes on the wire (``return`` bodies, Location): literals are
    the config file's bytes, variables the bytes they were read from (nginx copies bytes)."""
    pieces: list[bytes | Getter] = [
        _getter(part, clock, lookup) if isinstance(part, Var)
        else part.encode("utf-8", "surrogateescape")
        for part in template.parts
    ]
    if not any(callable(p) for p in pieces):
        constant = b"".join(p for p in pieces if isinstance(p, bytes))
        return lambda ex: constant

    def render(ex: RequestView) -> bytes:
        out = []
        for piece in pieces:
            if isinstance(piece, bytes):
                out.append(piece)
            elif (value := piece(ex)) is not None:
                out.append(_value_bytes(value))
        return b"".join(out)

    return render


def _all_found(values: list[str | None]) -> TypeGuard[list[str]]:
    return None not in values


def compile_log_format(template: Template, escape: str = "default", clock: Clock = time.time,
                       lookup: Callable[[str, Clock], Getter] = variable_getter) -> Renderer:
    """A callable rendering one access-log line (without the newline) as ngx_http_log_module.

    ``escape``: "default" (not found -> "-", \\xHH escaping), "json" (not found -> "", JSON
    escaping) or "none" (not found -> "", no escaping). ``lookup`` gives a variable's getter
    (stream sessions have their own variables).
    """
    getters = tuple(_getter(v, clock, lookup) for v in template.parts if isinstance(v, Var))
    if not getters:
        constant = template.static if template.static is not None else "".join(map(str, template.parts))
        return lambda ex: constant
    fmt = _format_string(template).format
    if escape == "default":

        def render(ex: RequestView) -> str:
            found = [g(ex) for g in getters]
            values = found if _all_found(found) else ["-" if v is None else v for v in found]  # not found: -
            # one search over the whole line instead of one per value: values rarely need
            # escaping, and when one does, each is escaped on its own (literals never are)
            if _LOG_UNSAFE.search("".join(values)) is not None:
                values = [_LOG_UNSAFE.sub(_hex_bytes, v) for v in values]
            return fmt(*values)

    elif escape == "json":

        def render(ex: RequestView) -> str:
            return fmt(*[json_escape(v) if (v := g(ex)) else "" for g in getters])

    elif escape == "none":

        def render(ex: RequestView) -> str:
            return fmt(*[g(ex) or "" for g in getters])

    else:
        raise ValueError(f'unknown log escaping "{escape}"')
    return render
