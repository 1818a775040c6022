"""The one list of nginx variable names scriptlb knows, and ``$var`` template splitting.

``scriptlb.variables.evaluate`` (the runtime evaluator) imports ``KNOWN_VARIABLES`` and
``VARIABLE_PREFIXES`` from here and must be able to evaluate every name accepted below; the
config refuses any other name at load time with nginx's ``unknown "foo" variable``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from scriptlb.config.model import Template, Var

# the variables the config being loaded declares with `set` (nginx: a variable set anywhere
# exists everywhere); the loader sets it before building
DECLARED: ContextVar[frozenset[str]] = ContextVar("DECLARED", default=frozenset())

KNOWN_VARIABLES: frozenset[str] = frozenset(
    {
        # request
        "remote_addr",
        "remote_port",
        "remote_user",
        "request",
        "request_method",
        "request_uri",
        "request_length",
        "request_body",
        "request_body_file",
        "uri",
        "document_uri",
        "args",
        "query_string",
        "is_args",
        "host",
        "scheme",
        "server_protocol",
        "server_addr",
        "server_port",
        "server_name",
        "content_length",
        "content_type",
        "hostname",
        "pid",
        # the instance's connection counters (stub_status module)
        "connections_active",
        "connections_reading",
        "connections_writing",
        "connections_waiting",
        # response and timing (log phase)
        "status",
        "body_bytes_sent",
        "bytes_sent",
        "request_time",
        "time_local",
        "time_iso8601",
        "msec",
        "connection",
        "connection_requests",
        "connection_time",
        # proxy
        "proxy_host",
        "proxy_port",
        "proxy_add_x_forwarded_for",
        # upstream, one entry per try joined with ", " as nginx does
        "upstream_addr",
        "upstream_status",
        "upstream_response_time",
        "upstream_connect_time",
        "upstream_header_time",
        "realip_remote_addr",
        "binary_remote_addr",
        "limit_req_status",
        "limit_conn_status",
        "proxy_protocol_addr",
        "proxy_protocol_port",
        "proxy_protocol_server_addr",
        "proxy_protocol_server_port",
        "realip_remote_port",
        "upstream_response_length",
        "upstream_bytes_sent",
        "upstream_bytes_received",
        # TLS termination (scriptlb.http.tls)
        "https",
        "ssl_protocol",
        "ssl_cipher",
        "ssl_server_name",
        "ssl_session_reused",
        "ssl_client_verify",
        "ssl_client_s_dn",
        "ssl_client_i_dn",
        "ssl_client_serial",
        "ssl_client_fingerprint",
        "ssl_client_v_start",
        "ssl_client_v_end",
        "ssl_client_v_remain",
        "ssl_client_raw_cert",
        "ssl_client_escaped_cert",
        "ssl_client_cert",
        "ssl_ciphers",
        "ssl_curves",
        "ssl_alpn_protocol",
        "ssl_session_id",
        # who chose each try's peer and why (scriptlb.variables.trace)
        "balancer_trace",
    }
)

# ngx_stream_*_module variables: a session has no request, so the http names mostly do not apply
STREAM_VARIABLES: frozenset[str] = frozenset(
    {
        "remote_addr", "remote_port", "server_addr", "server_port", "binary_remote_addr",
        "bytes_sent", "bytes_received", "session_time", "status", "protocol", "connection",
        "hostname", "pid", "msec", "time_local", "time_iso8601",
        "upstream_addr", "upstream_connect_time", "upstream_first_byte_time",
        "upstream_session_time", "upstream_bytes_sent", "upstream_bytes_received",
        "ssl_preread_server_name", "ssl_preread_protocol", "ssl_preread_alpn_protocols",
        "proxy_protocol_addr", "proxy_protocol_port",
        "limit_conn_status",
        "nginx_version", "realip_remote_addr", "realip_remote_port",
        "proxy_protocol_server_addr", "proxy_protocol_server_port",
    }
)


# stream's variable families: $proxy_protocol_tlv_NAME
STREAM_PREFIXES: tuple[str, ...] = ("proxy_protocol_tlv_",)


def is_stream_variable(name: str) -> bool:
    return name in STREAM_VARIABLES or any(
        name.startswith(p) and len(name) > len(p) for p in STREAM_PREFIXES)


# families: $http_user_agent, $arg_id, $cookie_session, $sent_http_content_type, ...
VARIABLE_PREFIXES: tuple[str, ...] = (
    "http_", "arg_", "cookie_", "sent_http_", "sent_trailer_", "upstream_http_", "upstream_cookie_",
    "proxy_protocol_tlv_",
)

_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")


class TemplateError(ValueError):
    """A template that nginx would refuse; the message is nginx's text."""


# variables the config being loaded declares itself (``map``): nginx resolves variable names
# after the whole file is read, so a map may be used above the line that defines it
_DECLARED: ContextVar[frozenset[str]] = ContextVar("declared_variables", default=frozenset())


@contextmanager
def declared_variables(names: frozenset[str]) -> Iterator[None]:
    """Accept ``names`` as known variables while one config is being built."""
    token = _DECLARED.set(names)
    try:
        yield
    finally:
        _DECLARED.reset(token)


def is_known_variable(name: str) -> bool:
    """Whether ``name`` (lower-case, without ``$``) is a variable scriptlb can evaluate."""
    if name in KNOWN_VARIABLES or name in _DECLARED.get():
        return True
    # ($arg_ with an empty name is nginx's too: it is never found)
    return any(name.startswith(p) and (len(name) > len(p) or p == "arg_") for p in VARIABLE_PREFIXES)


def has_variables(raw: str) -> bool:
    return "$" in raw


def compile_template(raw: str, known: Callable[[str], bool] | None = None) -> Template:
    """Split ``raw`` into literals and ``Var``s (nginx's ``ngx_http_script_compile`` rules).

    ``$name`` takes ``[A-Za-z0-9_]+``; ``${name}`` delimits a name glued to text. Names are
    case-insensitive (stored lower-case). Raises TemplateError with nginx's messages.
    ``known`` says which names exist (default: http's; ``is_stream_variable`` in stream).
    """
    parts: list[str | Var] = []
    literal: list[str] = []
    i, n = 0, len(raw)
    while i < n:
        ch = raw[i]
        if ch != "$":
            literal.append(ch)
            i += 1
            continue
        name, i = _read_name(raw, i + 1)
        if literal:
            parts.append("".join(literal))
            literal = []
        parts.append(_variable(name, known or is_known_variable))
    if literal:
        parts.append("".join(literal))
    static = raw if not any(isinstance(p, Var) for p in parts) else None
    return Template(raw=raw, parts=tuple(parts), static=static)


def _read_name(raw: str, i: int) -> tuple[str, int]:
    """The variable name starting at ``i`` (just after ``$``) and the index after it."""
    n = len(raw)
    bracketed = i < n and raw[i] == "{"
    if bracketed:
        i += 1
    start = i
    while i < n and raw[i] in _NAME_CHARS:
        i += 1
    name = raw[start:i]
    if bracketed:
        if i >= n or raw[i] != "}":
            raise TemplateError(f'the closing bracket in "{name}" variable is missing')
        i += 1
    if not name:
        raise TemplateError("invalid variable name")
    return name, i


def _variable(name: str, known: Callable[[str], bool]) -> Var:
    if name[0].isdigit():
        # regex captures ($1..$9) of the last rewrite / if match (locations do not capture)
        if not name.isdigit() or int(name) > 9:
            raise TemplateError(f'regex capture "${name}" is not supported')
        return Var(name, "capture")
    lowered = name.lower()
    if lowered in DECLARED.get() and lowered not in KNOWN_VARIABLES:
        return Var(lowered, "set")
    if not known(lowered):
        raise TemplateError(f'unknown "{lowered}" variable')
    return Var(lowered)
