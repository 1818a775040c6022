"""The directive table: name -> contexts, number of arguments, handler.

Dispatch follows nginx's ``ngx_conf_handler`` check for check, so errors come out in the same
order and words: unknown directive; "not allowed here" (the name exists, not in this context);
"is not terminated by ";"" / "has no opening "{""; "invalid number of arguments"; then the
handler's own value checks. A name may have several specs (``server`` is a block in ``http``
and a line in ``upstream``; ``keepalive_timeout`` means different things in each).

Handlers parse and validate their arguments and record them on the current draft
(``drafts.py``). Value syntaxes and nginx's per-slot error wording live in the helpers below.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntFlag
from typing import Any

from scriptlb.config import rewrite
from scriptlb.config.addresses import AddressError, parse_listen, parse_upstream_server, split_host_port
from scriptlb.config.drafts import (
    HookDraft,
    HttpDraft,
    LevelDraft,
    LocationDraft,
    MainDraft,
    MatchDraft,
    ServerDraft,
    UpstreamDraft,
)
from scriptlb.config.errors import ConfigError
from scriptlb.config.maps import parse_map
from scriptlb.config.model import (
    AccessLogConf,
    AccessRule,
    AddHeaderConf,
    BalancerMethodConf,
    BreakerConf,
    CookieFlagsConf,
    DictSyncConf,
    DiscoveryConf,
    ErrorLogConf,
    ErrorPageConf,
    ExpiresConf,
    ListenConf,
    LogFileCacheConf,
    LogFormat,
    NextUpstream,
    PeerAddr,
    ResolverConf,
    ReturnConf,
    RewriteOp,
    SharedDictConf,
    Source,
    SyslogConf,
    Template,
    TextRewrite,
    TryFilesConf,
)
from scriptlb.config.parser import Node
from scriptlb.config.regex import compile_nginx_regex
from scriptlb.config.templates import KNOWN_VARIABLES, TemplateError, compile_template
from scriptlb.config.units import parse_int, parse_offset, parse_size, parse_time


class Ctx(IntFlag):
    MAIN = 1
    EVENTS = 2
    HTTP = 4
    SERVER = 8
    LOCATION = 16
    UPSTREAM = 32
    MATCH = 64  # nginx Plus's `match` block (health checks)
    STREAM = 128
    STREAM_SERVER = 256
    STREAM_UPSTREAM = 512
    IF = 1024  # the rewrite module's `if` block (its own directives only)
    LIMIT_EXCEPT = 2048  # a location's `limit_except` block (access directives only)


HSL = Ctx.HTTP | Ctx.SERVER | Ctx.LOCATION
HS = Ctx.HTTP | Ctx.SERVER

LOG_LEVELS = ("debug", "info", "notice", "warn", "error", "crit", "alert", "emerg")
COMBINED_FORMAT = (
    '$remote_addr - $remote_user [$time_local] "$request" $status $body_bytes_sent '
    '"$http_referer" "$http_user_agent"'
)


@dataclass(slots=True)
class State:
    """What handlers need besides the node and the draft."""

    prefix: str
    warnings: list[str] = field(default_factory=list)
    http: HttpDraft | None = None  # set on entering http: log formats live there
    stream: Any = None  # the StreamDraft, set on entering stream (its own log formats)

    def path(self, value: str) -> str:
        """A path from the config, absolute against the prefix (nginx's ngx_conf_full_name)."""
        return os.path.normpath(os.path.join(self.prefix, value))

    def warn(self, message: str, source: Source | None) -> None:
        self.warnings.append(str(ConfigError(message, source, level="warn")))


Handler = Callable[[State, Node, Any], "tuple[Ctx, Any] | None"]


@dataclass(frozen=True, slots=True)
class Spec:
    name: str
    contexts: Ctx
    min_args: int
    max_args: int | None  # None: any number above min_args
    handler: Handler
    block: bool = False  # requires "{ ... }" (a Python block counts as a block)


# --------------------------------------------------------------------------- value helpers


def fail(node: Node, message: str) -> ConfigError:
    return ConfigError(message, node.source)


def _store(node: Node, values: dict[str, Any], value: Any) -> None:
    """nginx's slot semantics: a second occurrence at the same level is "is duplicate"."""
    if node.name in values:
        raise fail(node, f'"{node.name}" directive is duplicate')
    values[node.name] = value


def flag(node: Node) -> bool:
    value = node.args[0]
    if value.lower() in ("on", "off"):
        return value.lower() == "on"
    raise fail(node, f'invalid value "{value}" in "{node.name}" directive, it must be "on" or "off"')


def msec(node: Node) -> float:
    result = parse_time(node.args[0])
    if result is None:
        raise fail(node, f'"{node.name}" directive invalid value')
    return result


def number(node: Node) -> int:
    result = parse_int(node.args[0])
    if result is None:
        raise fail(node, f'"{node.name}" directive invalid number')
    return result


def template(node: Node, raw: str, known: Callable[[str], bool] | None = None) -> Template:
    try:
        return compile_template(raw, known)
    except TemplateError as e:
        raise fail(node, str(e)) from None


def _slot(parse: Callable[[Node], Any]) -> Handler:
    def handler(state: State, node: Node, draft: Any) -> None:
        _store(node, draft.values, parse(node))

    return handler


# --------------------------------------------------------------------------- main, events


def _worker_processes(state: State, node: Node, draft: MainDraft) -> None:
    value = node.args[0]
    count = (os.cpu_count() or 1) if value == "auto" else parse_int(value)
    if count is None:
        raise fail(node, f'"{node.name}" directive invalid value')
    _store(node, draft.values, count)


def _pid(state: State, node: Node, draft: MainDraft) -> None:
    _store(node, draft.values, state.path(node.args[0]))


def _user(state: State, node: Node, draft: MainDraft) -> None:
    """``user USER [GROUP]``: looked up at load time as nginx does (``getpwnam("x") failed``).
    Without GROUP, the user's own group. Ignored, with nginx's warning, unless run as root."""
    import grp
    import pwd

    if os.geteuid() != 0:
        state.warn('the "user" directive makes sense only if the master process runs with '
                   "super-user privileges, ignored", node.source)
        _store(node, draft.values, None)
        return
    try:
        entry = pwd.getpwnam(node.args[0])
    except KeyError:
        raise fail(node, f'getpwnam("{node.args[0]}") failed') from None
    gid = entry.pw_gid
    if len(node.args) > 1:
        try:
            gid = grp.getgrnam(node.args[1]).gr_gid
        except KeyError:
            raise fail(node, f'getgrnam("{node.args[1]}") failed') from None
    _store(node, draft.values, (entry.pw_uid, gid))


def _error_log(state: State, node: Node, draft: Any) -> None:
    """``error_log FILE | stderr | syslog:... [LEVEL]``: the lines of one level add up; in
    ``stream`` and its servers they replace the outer level's (the values' "error_log")."""
    target = node.args[0]
    if target.startswith("memory:"):
        raise fail(node, f'error_log "{target}" is not supported by scriptlb')
    syslog = None
    if target.startswith("syslog:"):
        path, syslog = target, syslog_conf(node, target[len("syslog:"):])
    else:
        path = "stderr" if target == "stderr" else state.path(target)
    level = "error"
    if len(node.args) > 1:
        level = node.args[1]
        if level not in LOG_LEVELS:
            raise fail(node, f'invalid log level "{level}"')
    conf = ErrorLogConf(path=path, level=level, syslog=syslog)
    if isinstance(draft, MainDraft):
        draft.error_logs.append(conf)
    else:
        draft.values.setdefault("error_log", []).append(conf)


_SYSLOG_FACILITIES = (
    "kern", "user", "mail", "daemon", "auth", "intern", "lpr", "news", "uucp", "clock", "authpriv",
    "ftp", "ntp", "audit", "alert", "cron", "local0", "local1", "local2", "local3", "local4",
    "local5", "local6", "local7",
)


def syslog_conf(node: Node, text: str) -> SyslogConf:
    """``server=ADDR,facility=F,severity=S,tag=T,nohostname`` as ngx_syslog_process_conf reads
    them (its messages); ``severity`` is accepted and, as nginx does for error_log, unused."""
    from scriptlb.config.addresses import resolve

    fields: dict[str, Any] = {}
    server = None
    for param in text.split(","):
        name, eq, value = param.partition("=")
        if param == "nohostname":
            fields["hostname"] = False
        elif name == "server" and eq:
            if server is not None:
                raise fail(node, 'duplicate syslog "server"')
            server = value
        elif name == "facility" and eq:
            if value not in _SYSLOG_FACILITIES:
                raise fail(node, f'unknown syslog facility "{value}"')
            fields["facility"] = _SYSLOG_FACILITIES.index(value)
        elif name == "severity" and eq:
            if value not in LOG_LEVELS:
                raise fail(node, f'unknown syslog severity "{value}"')
        elif name == "tag" and eq:
            if len(value) > 32:
                raise fail(node, 'syslog tag length exceeds 32')
            if not all(c.isalnum() or c == "_" for c in value):
                raise fail(node, 'syslog "tag" only allows alphanumeric characters and underscore')
            fields["tag"] = value
        else:
            raise fail(node, f'unknown syslog parameter "{param}"')
    if server is None:
        raise fail(node, "no syslog server specified")
    if server.startswith("unix:"):
        return SyslogConf(None, 0, server[len("unix:"):], **fields)
    try:
        target = split_host_port(server)
    except AddressError as err:
        raise fail(node, f'{err.kind} in "{server}"') from None
    addrs = resolve(target.host or "", target.port or 514)
    if not addrs:
        raise fail(node, f'host not found in "{server}"')
    return SyslogConf(addrs[0].host, addrs[0].port, **fields)


def _events(state: State, node: Node, draft: MainDraft) -> tuple[Ctx, Any]:
    if draft.events:
        raise fail(node, '"events" directive is duplicate')
    draft.events = True
    return Ctx.EVENTS, draft


def _worker_connections(state: State, node: Node, draft: MainDraft) -> None:
    value = parse_int(node.args[0])
    if value is None:
        raise fail(node, f'invalid number "{node.args[0]}"')
    _store(node, draft.values, value)


def _http(state: State, node: Node, draft: MainDraft) -> tuple[Ctx, Any]:
    if draft.http is not None:
        raise fail(node, '"http" directive is duplicate')
    draft.http = state.http = HttpDraft(close=node.close, prefix=state.prefix)
    return Ctx.HTTP, draft.http


# --------------------------------------------------------------------------- http, server


def _upstream(state: State, node: Node, draft: HttpDraft) -> tuple[Ctx, Any]:
    name = node.args[0]
    key = name.lower()  # nginx compares upstream names case-insensitively
    if key in draft.upstreams:
        raise fail(node, f'duplicate upstream "{name}"')
    upstream = UpstreamDraft(name=name, source=node.source, close=node.close)
    draft.upstreams[key] = upstream
    return Ctx.UPSTREAM, upstream


def _server_block(state: State, node: Node, draft: HttpDraft) -> tuple[Ctx, Any]:
    server = ServerDraft(source=node.source)
    draft.servers.append(server)
    return Ctx.SERVER, server


def _listen(state: State, node: Node, draft: ServerDraft) -> None:
    for listen in parse_listen(node):
        for other in draft.listens:
            if other.key == listen.key:
                raise fail(node, f"a duplicate listen {listen_name(listen)}")
        draft.listens.append(listen)


def listen_name(listen: ListenConf) -> str:
    if listen.unix_path is not None:
        return f"unix:{listen.unix_path}"
    return PeerAddr(listen.host, listen.port).name


def _server_name(state: State, node: Node, draft: ServerDraft) -> None:
    for name in node.args:
        if name.startswith("$"):
            raise fail(node, f'variables in server name "{name}" are not supported')
        if name.startswith("~"):
            _check_regex(node, name[1:], caseless=any("A" <= ch <= "Z" for ch in name))
        # kept as written: scriptlb.routing.locations lower-cases plain names and compiles a regex
        # caselessly when it has an upper-case letter, as nginx does
        draft.server_names.append(name)


_REGEX_MODIFIERS = ("~", "~*")


def _location(state: State, node: Node, draft: Any) -> tuple[Ctx, Any]:
    modifier, pattern = _location_args(node)
    if isinstance(draft, LocationDraft):
        _check_nested(node, draft, modifier, pattern)
    if modifier in _REGEX_MODIFIERS:
        _check_regex(node, pattern, caseless=modifier == "~*")
    else:
        for other in draft.locations:
            if (
                other.modifier not in _REGEX_MODIFIERS
                and other.pattern == pattern
                and ((other.modifier == "=") == (modifier == "="))
            ):
                raise fail(node, f'duplicate location "{pattern}"')
    location = LocationDraft(modifier=modifier, pattern=pattern, source=node.source)
    draft.locations.append(location)
    return Ctx.LOCATION, location


def _check_nested(node: Node, parent: LocationDraft, modifier: str, pattern: str) -> None:
    """A location inside a location: nginx's rules (ngx_http_core_location)."""
    if parent.modifier == "=":
        raise fail(node, f'location "{pattern}" cannot be inside the exact location "{parent.pattern}"')
    if parent.pattern.startswith("@"):
        raise fail(node, f'location "{pattern}" cannot be inside the named location "{parent.pattern}"')
    if pattern.startswith("@"):
        raise fail(node, f'named location "{pattern}" can be on the server level only')
    if modifier not in _REGEX_MODIFIERS and not pattern.startswith(parent.pattern):
        raise fail(node, f'location "{pattern}" is outside location "{parent.pattern}"')


def _check_regex(node: Node, pattern: str, caseless: bool) -> None:
    """Compile as the runtime will (PCRE syntax mapped to ``re``), so a bad one fails here."""
    try:
        compile_nginx_regex(pattern, caseless)
    except re.error as e:
        raise fail(node, f'regex compile failed: {e.msg} in "{pattern}"') from None


def _location_args(node: Node) -> tuple[str, str]:
    """``location [=|~|~*|^~] uri``; like nginx, a modifier may also be glued to the uri."""
    if len(node.args) == 2:
        modifier, pattern = node.args
        if modifier not in ("=", "~", "~*", "^~"):
            raise fail(node, f'invalid location modifier "{modifier}"')
        return modifier, pattern
    arg = node.args[0]
    for modifier in ("^~", "~*", "=", "~"):
        if arg.startswith(modifier) and len(arg) > len(modifier):
            return modifier, arg[len(modifier) :]
    return "", arg


def _proxy_store(state: State, node: Node, draft: LevelDraft) -> None:
    """``proxy_store on | off | string``: True, False or the string's Template."""
    value = node.args[0]
    stored: bool | Template = value == "on" if value in ("on", "off") else template(node, value)
    _store(node, draft.values, stored)


def _store_access(node: Node) -> int:
    """``proxy_store_access users:rw group:rw all:r`` -> a file mode (nginx's words)."""
    mode = 0
    for arg in node.args:
        who, sep, rights = arg.partition(":")
        shift = {"user": 6, "group": 3, "all": 0}.get(who)
        if not sep or shift is None or rights not in ("r", "w", "rw"):
            raise fail(node, f'invalid value "{arg}"')
        bits = (4 if "r" in rights else 0) | (2 if "w" in rights else 0)
        mode |= bits << shift
    return mode


def _in_location_if(handler: Handler) -> Handler:
    """A directive nginx takes in an ``if`` of a location (not of a server)."""

    def checked(state: State, node: Node, draft: Any) -> Any:
        if isinstance(draft, rewrite.IfDraft) and not draft.in_location:
            raise fail(node, f'"{node.name}" directive is not allowed here')
        return handler(state, node, draft)

    return checked


def _proxy_pass(state: State, node: Node, draft: LocationDraft) -> None:
    if draft.proxy_pass is not None:
        raise fail(node, '"proxy_pass" directive is duplicate')
    draft.proxy_pass = (node.args[0], node.source)
    if "$" in node.args[0]:  # evaluated per request (scriptlb.request.dynamic_pass)
        draft.proxy_pass_template = template(node, node.args[0])


def _proxy_set_header(state: State, node: Node, draft: LevelDraft) -> None:
    name, value = node.args
    if draft.set_headers is None:
        draft.set_headers = []
    draft.set_headers.append((name.lower(), name, template(node, value)))


def _proxy_http_version(state: State, node: Node, draft: LevelDraft) -> None:
    value = node.args[0]
    if value not in ("1.0", "1.1"):
        raise fail(node, f'invalid value "{value}"')
    _store(node, draft.values, value)


_NEXT_UPSTREAM = {
    "error": NextUpstream.ERROR,
    "timeout": NextUpstream.TIMEOUT,
    "invalid_header": NextUpstream.INVALID_HEADER,
    "http_500": NextUpstream.HTTP_500,
    "http_502": NextUpstream.HTTP_502,
    "http_503": NextUpstream.HTTP_503,
    "http_504": NextUpstream.HTTP_504,
    "http_403": NextUpstream.HTTP_403,
    "http_404": NextUpstream.HTTP_404,
    "http_429": NextUpstream.HTTP_429,
    "non_idempotent": NextUpstream.NON_IDEMPOTENT,
    "off": NextUpstream.OFF,
}


def _proxy_next_upstream(state: State, node: Node, draft: LevelDraft) -> None:
    """nginx's bitmask slot; "off" anywhere in the list wins (as its merge does)."""
    flags = NextUpstream(0)
    for word in node.args:
        bit = _NEXT_UPSTREAM.get(word.lower())  # nginx's bitmask slot ignores case
        if bit is None:
            raise fail(node, f'invalid value "{word}"')
        if flags & bit:
            state.warn(f'duplicate value "{word}"', node.source)
        flags |= bit
    if flags & NextUpstream.OFF:
        flags = NextUpstream.OFF
    _store(node, draft.values, flags)


def _keepalive_timeout(state: State, node: Node, draft: LevelDraft) -> None:
    timeout = msec(node)
    if len(node.args) > 1:
        header = parse_time(node.args[1], seconds_only=True)  # the Keep-Alive header's time
        if header is None:
            raise fail(node, f'"{node.name}" directive invalid value')
        draft.values["keepalive_header"] = int(header)
    _store(node, draft.values, timeout)


def _size(node: Node) -> int:
    value = parse_size(node.args[0])
    if value is None:
        raise fail(node, f'"{node.name}" directive invalid value')
    return value


def _size_or_off(node: Node) -> int:
    return 0 if node.args[0] == "off" else _size(node)


def _offset(node: Node) -> int:
    value = parse_offset(node.args[0])
    if value is None:
        raise fail(node, f'"{node.name}" directive invalid value')
    return value


def _large_client_header_buffers(state: State, node: Node, draft: LevelDraft) -> None:
    count = parse_int(node.args[0])
    size = parse_size(node.args[1])
    if not count or not size:
        raise fail(node, f'"{node.name}" directive invalid value')
    _store(node, draft.values, (count, size))


def _bufs(node: Node) -> tuple[int, int]:
    """``number size`` (proxy_buffers): nginx's ngx_conf_set_bufs_slot."""
    count = parse_int(node.args[0])
    size = parse_size(node.args[1])
    if not count or not size:
        raise fail(node, f'"{node.name}" directive invalid value')
    return count, size


def _in_file_only(node: Node) -> str:
    value = node.args[0]
    if value not in ("on", "off", "clean"):
        raise fail(node, f'invalid value "{value}"')
    return value


def _temp_path(state: State, node: Node, draft: LevelDraft) -> None:
    """``client_body_temp_path path [level1 [level2 [level3]]]``: the levels are checked and
    not used (one directory holds the files, each unlinked as soon as it is open)."""
    for level in node.args[1:]:
        if not parse_int(level):
            raise fail(node, f'"{node.name}" directive invalid value')
    _store(node, draft.values, state.path(node.args[0]))


def _add_header(state: State, node: Node, draft: LevelDraft) -> None:
    """``add_header name value [always]``: the lines of a level, in order."""
    always = len(node.args) == 3
    if always and node.args[2] != "always":
        raise fail(node, f'invalid parameter "{node.args[2]}"')
    headers = draft.values.setdefault(node.name, [])  # add_header or add_trailer
    headers.append(AddHeaderConf(node.args[0], template(node, node.args[1]), always))


def parse_expires(text: str, modified: bool) -> tuple[str, int] | str:
    """ngx_http_parse_expires: (kind, seconds), or nginx's error text."""
    if not modified and text in ("epoch", "max", "off"):
        return text, 0
    kind = "modified" if modified else "access"
    sign = 1
    if text.startswith("@"):
        if modified:
            return 'daily time cannot be used with "modified" parameter'
        kind, text = "daily", text[1:]
    elif text[:1] in ("+", "-"):
        sign, text = (-1 if text[0] == "-" else 1), text[1:]
    seconds = parse_time(text, seconds_only=True)
    if seconds is None:
        return "invalid value"
    if kind == "daily" and seconds > 24 * 60 * 60:
        return "daily time value must be less than 24 hours"
    return kind, sign * int(seconds)


def _try_files(state: State, node: Node, draft: LevelDraft) -> None:
    """``try_files file ... uri | =code``."""
    if "try_files" in draft.values:
        raise fail(node, '"try_files" directive is duplicate')
    files = []
    for text in node.args[:-1]:
        test_dir = len(text) > 1 and text.endswith("/")
        files.append((template(node, text[:-1] if test_dir else text), test_dir))
    last = node.args[-1]
    if last.startswith("="):
        code = parse_int(last[1:])
        if code is None or code > 999:
            raise fail(node, f'invalid code "{last}"')
        draft.values["try_files"] = TryFilesConf(tuple(files), code=code)
        return
    draft.values["try_files"] = TryFilesConf(tuple(files), fallback=template(node, last))


def _expires(state: State, node: Node, draft: LevelDraft) -> None:
    """``expires [modified] time | epoch | max | off`` (a value with variables is parsed per
    response, as nginx)."""
    if "expires" in draft.values:
        raise fail(node, '"expires" directive is duplicate')
    modified = len(node.args) == 2
    if modified and node.args[0] != "modified":
        raise fail(node, '"expires" directive invalid value')
    text = node.args[-1]
    value = template(node, text)
    if value.static is None:
        draft.values["expires"] = ExpiresConf("modified" if modified else "access", value=value)
        return
    parsed = parse_expires(text, modified)
    if isinstance(parsed, str):
        raise fail(node, f'"expires" directive {parsed}')
    draft.values["expires"] = ExpiresConf(*parsed)


def _error_page(state: State, node: Node, draft: LevelDraft) -> None:
    """``error_page code ... [=[response]] uri`` (nginx's checks and words)."""
    args = node.args
    uri = args[-1]
    response: int | None = None
    codes_args = args[:-1]
    if codes_args and codes_args[-1].startswith("="):
        text = codes_args[-1][1:]
        codes_args = codes_args[:-1]
        if text == "":
            response = 0
        else:
            value = parse_int(text)
            if value is None or value < 100:  # (nginx: any non-negative number)
                raise fail(node, f'invalid value "{args[-2]}"')
            response = value
    if not codes_args:
        raise fail(node, f'invalid number of arguments in "{node.name}" directive')
    codes = []
    for text in codes_args:
        code = parse_int(text)
        if code is None or code < 300 or code > 599:
            raise fail(node, f'value "{text}" must be between 300 and 599')
        if code == 499:
            raise fail(node, 'value "499" must be between 300 and 599')
        codes.append(code)
    pages = draft.values.setdefault("error_page", [])
    pages.append(ErrorPageConf(tuple(codes), response, template(node, uri)))


def _header_name_list(state: State, node: Node, draft: LevelDraft) -> None:
    """proxy_hide_header / proxy_pass_header: one name per directive, a level's names
    together (nginx: the innermost level that has any)."""
    draft.values.setdefault(node.name, []).append(node.args[0].lower())


# proxy_redirect / proxy_cookie_*: a level's value is its list of rules, or OFF
OFF = "off"


def _rewrite_rules(node: Node, draft: LevelDraft, allow_default: bool) -> list[Any] | None:
    """The level's list to append to (None: this line was ``off``), with nginx's checks."""
    current = draft.values.get(node.name)
    if current == OFF:
        raise fail(node, f'"{node.name}" directive is duplicate')
    if len(node.args) == 1:
        value = node.args[0]
        if value == "off":
            if current is not None:
                raise fail(node, f'"{node.name}" directive is duplicate')
            draft.values[node.name] = OFF
            return None
        if not (allow_default and value == "default"):
            raise fail(node, f'invalid parameter "{value}"')
    rules: list[Any] = draft.values.setdefault(node.name, [])
    return rules


def _rewrite_regex(node: Node, text: str) -> tuple[str, bool]:
    """``~regex`` / ``~*regex`` -> (regex, caseless), checked now."""
    caseless = text.startswith("~*")
    regex = text[2:] if caseless else text[1:]
    _check_regex(node, regex, caseless)
    return regex, caseless


def default_redirect(url: str, location_name: str) -> TextRewrite:
    """``proxy_redirect default``: the proxy_pass URL -> the location's name when the URL has
    a URI part, else the URL + "/" -> "/"."""
    start = url.find("://")
    has_uri = start != -1 and url.find("/", start + 3) != -1
    if has_uri:
        return TextRewrite("prefix", _literal(location_name), pattern=_literal(url))
    return TextRewrite("prefix", _literal("/"), pattern=_literal(url + "/"))


def _literal(text: str) -> Template:
    """A template that is ``text`` itself (nginx copies these values, "$" included)."""
    return Template(raw=text, parts=(text,), static=text)


def _proxy_redirect(state: State, node: Node, draft: LevelDraft) -> None:
    """``proxy_redirect default | off | redirect replacement``."""
    rules = _rewrite_rules(node, draft, allow_default=True)
    if rules is None:
        return
    if len(node.args) == 1:  # default
        if not isinstance(draft, LocationDraft) or draft.proxy_pass is None:
            raise fail(node, '"proxy_redirect default" should be placed after the "proxy_pass" directive')
        proxy_pass = draft.proxy_pass
        if "$" in proxy_pass[0]:
            raise fail(node, '"proxy_redirect default" cannot be used with "proxy_pass" directive '
                             "with variables")
        rules.append(default_redirect(proxy_pass[0], draft.pattern))
        return
    pattern, replacement = node.args
    if pattern.startswith("~"):
        regex, caseless = _rewrite_regex(node, pattern)
        rules.append(TextRewrite("regex", template(node, replacement), regex=regex, caseless=caseless))
    else:
        rules.append(TextRewrite("prefix", template(node, replacement), pattern=template(node, pattern)))


def _proxy_cookie_domain(state: State, node: Node, draft: LevelDraft) -> None:
    """``proxy_cookie_domain off | domain replacement`` (a regex is always caseless)."""
    rules = _rewrite_rules(node, draft, allow_default=False)
    if rules is None:
        return
    pattern, replacement = node.args
    if pattern.startswith("~"):
        regex, _ = _rewrite_regex(node, "~*" + pattern[1:])
        rules.append(TextRewrite("regex", template(node, replacement), regex=regex, caseless=True))
        return
    rules.append(TextRewrite("domain", template(node, replacement.removeprefix(".")),
                             pattern=template(node, pattern.removeprefix("."))))


def _proxy_cookie_path(state: State, node: Node, draft: LevelDraft) -> None:
    """``proxy_cookie_path off | path replacement``."""
    rules = _rewrite_rules(node, draft, allow_default=False)
    if rules is None:
        return
    pattern, replacement = node.args
    if pattern.startswith("~"):
        regex, caseless = _rewrite_regex(node, pattern)
        rules.append(TextRewrite("regex", template(node, replacement), regex=regex, caseless=caseless))
    else:
        rules.append(TextRewrite("prefix", template(node, replacement), pattern=template(node, pattern)))


def _proxy_bind(state: State, node: Node, draft: LevelDraft,
                known: Callable[[str], bool] | None = None) -> None:
    """``proxy_bind address [transparent] | off``: the address may have variables (an empty
    value binds nothing, as nginx); ``known``: the block's variable names (stream's)."""
    if "proxy_bind" in draft.values:
        raise fail(node, '"proxy_bind" directive is duplicate')
    if len(node.args) == 2:
        if node.args[1] != "transparent":
            raise fail(node, f'invalid parameter "{node.args[1]}"')
        raise fail(node, 'the "transparent" parameter of "proxy_bind" is not supported by scriptlb')
    value = node.args[0]
    if value == "off":
        draft.values["proxy_bind"] = OFF
        return
    bind = template(node, value, known)
    if bind.static is not None and _bind_address(bind.static) is None:
        raise fail(node, f'invalid address "{value}"')
    draft.values["proxy_bind"] = bind


def _bind_address(text: str) -> tuple[str, int] | None:
    """"ip", "ip:port", "[v6]:port" or "v6": the (host, port) to bind, None if it is not one."""
    import ipaddress

    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":")
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:
        host, port = text, "0"
    number = parse_int(port or "0")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return None
    return (host, number) if number is not None and number <= 65535 else None


def _proxy_cookie_flags(state: State, node: Node, draft: LevelDraft) -> None:
    """``proxy_cookie_flags off | cookie flag ...``: flags are templates, read per response
    (an unknown one is ignored then, as nginx)."""
    rules = _rewrite_rules(node, draft, allow_default=False)
    if rules is None:
        return
    flags = tuple(template(node, text) for text in node.args[1:])
    cookie = node.args[0]
    if cookie.startswith("~"):
        regex, _ = _rewrite_regex(node, "~*" + cookie[1:])
        rules.append(CookieFlagsConf(flags, regex=regex))
    else:
        rules.append(CookieFlagsConf(flags, cookie=template(node, cookie)))


_IGNORABLE = ("x-accel-redirect", "x-accel-expires", "x-accel-limit-rate", "x-accel-buffering",
              "x-accel-charset", "expires", "cache-control", "set-cookie", "vary")


def _proxy_ignore_headers(state: State, node: Node, draft: LevelDraft) -> None:
    for name in node.args:
        if name.lower() not in _IGNORABLE:
            raise fail(node, f'invalid value "{name}"')
    _store(node, draft.values, tuple(name.lower() for name in node.args))


def _keepalive_disable(node: Node) -> tuple[str, ...]:
    for value in node.args:
        if value not in ("none", "msie6", "safari"):
            raise fail(node, f'invalid value "{value}"')
    return tuple(node.args)


def _root(state: State, node: Node, draft: LevelDraft) -> None:
    """``root path``: the static handler's directory, absolute against the prefix."""
    _check_root_slot(node, draft)
    _store(node, draft.values, state.path(node.args[0]) if node.args[0] else "")


def _alias(state: State, node: Node, draft: LocationDraft) -> None:
    """``alias path``: the location's prefix is replaced by ``path``."""
    _check_root_slot(node, draft)
    if draft.pattern.startswith("@"):
        raise fail(node, 'the "alias" directive cannot be used inside the named location')
    path = node.args[0]
    # (the prefix is replaced textually: a trailing slash is kept, as written)
    absolute = state.path(path) + ("/" if path.endswith("/") and path != "/" else "")
    # (the prefix length it replaces; -1: a regex location's alias names the file)
    prefix = -1 if draft.modifier in _REGEX_MODIFIERS else len(draft.pattern)
    draft.values["alias"] = (absolute, prefix)


def _check_root_slot(node: Node, draft: LevelDraft) -> None:
    """root and alias share one slot in nginx: either is duplicate after the other."""
    for other in ("root", "alias"):
        if other in draft.values:
            if other == node.name:
                raise fail(node, f'"{node.name}" directive is duplicate')
            raise fail(node, f'"{node.name}" directive is duplicate, '
                             f'"{other}" directive was specified earlier')


def _index(state: State, node: Node, draft: LevelDraft) -> None:
    for name in node.args:
        if not name:
            raise fail(node, 'index "" in "index" directive is invalid')
    _store(node, draft.values, tuple(node.args))


def _accepted(parse: Callable[[Node], Any]) -> Handler:
    """A tuning directive nginx needs and scriptlb's runtime has no use for (a hash table's
    size, a memory pool's): checked as nginx checks it, then kept only in the config."""
    return _slot(parse)


_REDIRECTS = (301, 302, 303, 307, 308)


def _return(state: State, node: Node, draft: Any) -> None:
    """``return code [text]``, ``return code URL`` (redirects), ``return URL`` (302)."""
    conf = _return_conf(node)
    if draft.return_ is None:  # the first return wins: it ends the rewrite phase
        draft.return_ = conf


def _return_conf(node: Node) -> ReturnConf:
    first = node.args[0]
    if len(node.args) == 1 and first.startswith(("http://", "https://", "$scheme")):
        conf = ReturnConf(302, template(node, first), node.source)
    else:
        status = parse_int(first)
        if status is None or status > 999:
            raise fail(node, f'invalid return code "{first}"')
        text = template(node, node.args[1]) if len(node.args) > 1 else None
        conf = ReturnConf(status, text, node.source)
    return conf


# --------------------------------------------------------------------------- rewrite module


def _rewrite_directive(build: Callable[..., RewriteOp]) -> Handler:
    def handler(state: State, node: Node, draft: Any) -> None:
        try:
            op = build(node)
        except ValueError as e:
            raise fail(node, str(e)) from None
        rewrite.ops_of(draft).append(op)

    return handler


def _if(state: State, node: Node, draft: Any) -> tuple[Ctx, Any]:
    try:
        op = rewrite.if_op(node, template, _check_regex)
    except ValueError as e:
        raise fail(node, str(e)) from None
    in_location = isinstance(draft, LocationDraft)
    body = rewrite.IfDraft(modifier=draft.modifier, pattern=draft.pattern, source=node.source,
                           in_location=True) if in_location else rewrite.IfDraft()
    rewrite.ops_of(draft).append((op, body))  # (the body is read next; the builder joins them)
    return Ctx.IF, body


def _log_format(state: State, node: Node, draft: HttpDraft) -> None:
    add_log_format(node, draft.log_formats)


def add_log_format(node: Node, formats: dict[str, LogFormat],
                   known: Callable[[str], bool] | None = None) -> None:
    """``log_format NAME [escape=...] STRING...`` into ``formats`` (http's or stream's)."""
    name, rest = node.args[0], list(node.args[1:])
    if name in formats:
        raise fail(node, f'duplicate "log_format" name "{name}"')
    escape = "default"
    if rest and rest[0].startswith("escape="):
        escape = rest.pop(0)[len("escape=") :]
        if escape not in ("default", "json", "none"):
            raise fail(node, f'unknown log format escaping "{escape}"')
    if not rest:
        raise fail(node, 'invalid number of arguments in "log_format" directive')
    formats[name] = LogFormat(name, template(node, "".join(rest), known), escape)


def _access_log(state: State, node: Node, draft: Any) -> None:
    assert state.http is not None  # access_log exists only inside http
    add_access_log(state, node, draft, state.http.log_formats, "combined")


def add_access_log(state: State, node: Node, draft: Any, formats: dict[str, LogFormat],
                   default_format: str | None, known: Callable[[str], bool] | None = None) -> None:
    """``access_log PATH [FORMAT [buffer=SIZE [flush=TIME]]] | off`` onto ``draft.access_logs``;
    stream has no default format (nginx: "log format is not specified")."""
    if draft.access_logs is None:
        draft.access_logs = []
    target = node.args[0]
    if target == "off":
        if len(node.args) > 1:
            raise fail(node, f'invalid parameter "{node.args[1]}"')
        return  # an empty list at this level: off, and nothing inherited
    if target.startswith("syslog:"):
        raise fail(node, f'access_log "{target}" is not supported by scriptlb')
    format_name = node.args[1] if len(node.args) > 1 else default_format
    if format_name is None:
        raise fail(node, "log format is not specified")
    log_format = formats.get(format_name)
    if log_format is None:
        raise fail(node, f'unknown log format "{format_name}"')
    buffer, flush, condition, gzip = 0, None, None, 0
    for param in node.args[2:]:
        if param == "gzip" or param.startswith("gzip="):
            buffer = buffer or 64 * 1024  # (nginx's default buffer of a compressed log)
            gzip = _gzip_level(node, param)
        elif param.startswith("if="):
            condition = template(node, param[len("if="):], known)
        elif param.startswith("buffer="):
            buffer = parse_size(param[len("buffer=") :]) or 0
            if not buffer:
                raise fail(node, f'invalid buffer size "{param[len("buffer=") :]}"')
        elif param.startswith("flush="):
            flush = parse_time(param[len("flush=") :])
            if not flush:
                raise fail(node, f'invalid flush time "{param[len("flush=") :]}"')
        else:
            raise fail(node, f'invalid parameter "{param}"')
    if flush is not None and not buffer:
        raise fail(node, f'no buffer is defined for access_log "{target}"')
    path = target if target in ("stderr", "stdout") else state.path(target)
    path_template = None
    if "$" in target:
        if buffer:
            raise fail(node, "buffered logs cannot have variables in name")
        path_template = template(node, path, known)
    draft.access_logs.append(AccessLogConf(path, log_format, buffer, flush or 0.0, condition, gzip,
                                           path_template))


def _open_log_file_cache(state: State, node: Node, draft: Any) -> None:
    """``open_log_file_cache max=N [inactive=T] [min_uses=N] [valid=T] | off``."""
    if node.args == ("off",):
        _store(node, draft.values, None)
        return
    found: dict[str, float] = {}
    for arg in node.args:
        name, eq, text = arg.partition("=")
        if name in ("max", "min_uses") and eq:
            value: float | None = parse_int(text)
            if value is None or value <= 0:
                raise fail(node, f'invalid "{name}" value "{text}"')
        elif name in ("inactive", "valid") and eq:
            value = parse_time(text)
            if value is None:
                raise fail(node, f'invalid "{name}" value "{text}"')
        else:
            raise fail(node, f'invalid "open_log_file_cache" parameter "{arg}"')
        found[name] = value
    if "max" not in found:
        raise fail(node, '"open_log_file_cache" must have "max" parameter')
    _store(node, draft.values, LogFileCacheConf(
        int(found["max"]), found.get("inactive", 10.0), int(found.get("min_uses", 1)),
        found.get("valid", 60.0)))


def with_file_cache(logs: Any, cache: LogFileCacheConf | None) -> tuple[AccessLogConf, ...]:
    """The logs of a level with its ``open_log_file_cache`` (only a path with variables uses it)."""
    import dataclasses

    return tuple(dataclasses.replace(log, file_cache=cache) if cache and log.path_template else log
                 for log in logs)


def _gzip_level(node: Node, param: str) -> int:
    """``gzip`` (level 1, zlib's best speed) or ``gzip=1..9``."""
    if param == "gzip":
        return 1
    text = param[len("gzip="):]
    level = int(text) if text.isdigit() else 0
    if not 1 <= level <= 9:
        raise fail(node, f'invalid compression level "{text}"')
    return level


# --------------------------------------------------------------------------- python hooks


def _python_package_path(state: State, node: Node, draft: HttpDraft) -> None:
    patterns = tuple(_package_pattern(state, node, p.strip()) for p in node.args[0].split(";") if p.strip())
    _store(node, draft.values, patterns)


def _package_pattern(state: State, node: Node, pattern: str) -> str:
    """One pattern, absolute: ``$prefix`` is the prefix (as in lua_package_path); ``$hook_dir``
    stays, for the importer to expand with the importing file's directory."""
    if pattern.startswith("$hook_dir"):
        return pattern
    if pattern.startswith("$prefix"):
        pattern = state.prefix + "/" + pattern[len("$prefix"):]
    if "$" in pattern:
        raise fail(node, f'unknown variable in "{pattern}": only $prefix and $hook_dir are allowed')
    return state.path(pattern)


# scriptlb.state.shared_dict.MIN_SIZE, repeated so loading a config does not import LMDB; a test
# keeps the two equal. lua_shared_dict's floor is 8 KiB; an LMDB environment needs more.
MIN_SHARED_DICT_SIZE = 16 * 4096


def _python_shared_dict(state: State, node: Node, draft: HttpDraft) -> None:
    """``python_shared_dict NAME SIZE [sync=URL ...]``, checked in lua_shared_dict's order and
    words, then the cluster parameters."""
    name, size_text = node.args[:2]
    if not name:
        raise fail(node, f'invalid python shared dict name "{name}"')
    size = parse_size(size_text)
    if size is None or size < MIN_SHARED_DICT_SIZE:
        raise fail(node, f'invalid python shared dict size "{size_text}"')
    other = draft.shared_dicts.get(name)
    if other is not None:
        if other.size != size:  # nginx's shared-memory registry speaks first
            raise fail(
                node,
                f'the size {size} of shared memory zone "{name}" '
                f"conflicts with already declared size {other.size}",
            )
        raise fail(node, f'python_shared_dict "{name}" is already defined as "{other.name}"')
    sync = _dict_sync(state, node, name, node.args[2:])
    draft.shared_dicts[name] = SharedDictConf(name, size, node.source, sync)


_SYNC_SCHEMES = ("redis://", "rediss://")


def _dict_sync(state: State, node: Node, name: str, params: tuple[str, ...]) -> DictSyncConf | None:
    """``sync=redis://HOST:PORT/DB [sync_interval=T] [sync_prefix=P] [sync_password_file=F]``."""
    values: dict[str, str] = {}
    if any("=" not in param for param in params):  # lua_shared_dict's words for a third word
        raise fail(node, f'invalid number of arguments in "{node.name}" directive')
    for param in params:
        key, _, value = param.partition("=")
        if key not in ("sync", "sync_interval", "sync_prefix", "sync_password_file") or key in values:
            raise fail(node, f'invalid parameter "{param}"')
        values[key] = value
    if not values:
        return None
    url = values.get("sync")
    if url is None:
        raise fail(node, f'"sync_*" parameters need "sync=" in python_shared_dict "{name}"')
    if not url.startswith(_SYNC_SCHEMES) or len(url) <= len("rediss://"):
        raise fail(node, f'invalid sync URL "{url}" (redis://HOST:PORT/DB or rediss://...)')
    interval = parse_time(values.get("sync_interval", "50ms"))
    if interval is None or interval <= 0:
        raise fail(node, f'invalid sync_interval "{values["sync_interval"]}"')
    password_file = values.get("sync_password_file")
    return DictSyncConf(
        url=url, interval=interval, prefix=values.get("sync_prefix", f"scriptlb:{name}:"),
        password_file=state.path(password_file) if password_file else None,
    )


def _hook_timeout(state: State, node: Node, draft: Any) -> None:
    value = msec(node)
    if value <= 0:
        raise fail(node, f'"{node.name}" directive invalid value')
    _store(node, draft.values, value)


def _hook_breaker(state: State, node: Node, draft: Any) -> None:
    """``balancer_by_python_breaker off | [fails=N] [window=TIME] [cooldown=TIME]``."""
    if list(node.args) == ["off"]:
        _store(node, draft.values, None)
        return
    values = {"fails": 10, "window": 10.0, "cooldown": 30.0}
    for arg in node.args:
        name, eq, text = arg.partition("=")
        if not eq or name not in values:
            raise fail(node, f'invalid parameter "{arg}"')
        value = (int(text) if text.isdigit() else None) if name == "fails" else parse_time(text)
        if not value or value <= 0:
            raise fail(node, f'invalid {name} value "{text}"')
        values[name] = value
    _store(node, draft.values, BreakerConf(int(values["fails"]), float(values["window"]),
                                           float(values["cooldown"])))


def _hook_file(state: State, node: Node, draft: UpstreamDraft) -> None:
    _declare_hook(state, node, draft)
    draft.hook = HookDraft(node.name, "file", _existing_file(state, node), None, node.source)


def _hook_block(state: State, node: Node, draft: UpstreamDraft) -> None:
    _declare_hook(state, node, draft)
    draft.hook = HookDraft(node.name, "block", None, node.code, node.source, node.code_line)


def _log_hook_file(state: State, node: Node, draft: LevelDraft) -> None:
    _declare_log_hook(node, draft)
    draft.log_hook = HookDraft(node.name, "file", _existing_file(state, node), None, node.source, phase="log")


def _log_hook_block(state: State, node: Node, draft: LevelDraft) -> None:
    _declare_log_hook(node, draft)
    draft.log_hook = HookDraft(node.name, "block", None, node.code, node.source, node.code_line, "log")


def _declare_log_hook(node: Node, draft: LevelDraft) -> None:
    """One log hook per level, file or block (ngx_lua's log_handler slot): a second one at
    the same level is "is duplicate"; an inner level's replaces the inherited one."""
    if draft.log_hook is not None:
        raise fail(node, f'"{node.name}" directive is duplicate')


def _existing_file(state: State, node: Node) -> str:
    path = state.path(node.args[0])
    if not os.path.isfile(path):
        raise fail(node, f'open() "{path}" failed (2: {os.strerror(2)})')
    return path


# what lines after a balancer hook may still say (OpenResty resets the upstream's flags)
_HOOK_SERVER_PARAMS = frozenset({"weight", "max_fails", "fail_timeout", "down"})


def _declare_hook(state: State, node: Node, draft: UpstreamDraft) -> None:
    """One hook per upstream. A method declared before it stays as the fallback balancer
    (lua-nginx-module >= 0.10.27 does the same, with the same warning)."""
    if draft.hook_declared:
        raise fail(node, f'"{node.name}" directive is duplicate')
    draft.hook_declared = True
    if draft.method_declared:
        state.warn("load balancing method redefined", node.source)
    draft.allowed_params = _HOOK_SERVER_PARAMS


# --------------------------------------------------------------------------- upstream


def _upstream_server(state: State, node: Node, draft: UpstreamDraft) -> None:
    draft.servers.append(parse_upstream_server(node, draft.allowed_params))


# --------------------------------------------------------------------------- balancing methods

_ALL_SERVER_PARAMS = frozenset(
    {"weight", "max_fails", "fail_timeout", "down", "backup", "max_conns", "slow_start", "drain",
     "resolve", "service"}
)
_NO_BACKUP = _ALL_SERVER_PARAMS - {"backup"}


def _method(params: frozenset[str], check: Callable[[Node], None] | None = None) -> Handler:
    """A balancing method directive -> BalancerMethodConf(kind=name, args=words).

    As in nginx, a method replaces the one before it (with a warning), and lines after it may
    only use the server parameters it supports. A method after a balancer hook replaces the
    hook (nginx's and OpenResty's rule); one before a hook stays as the hook's fallback.
    """

    def handler(state: State, node: Node, draft: UpstreamDraft) -> None:
        if check is not None:
            check(node)
        if draft.method_declared or draft.hook is not None:
            state.warn("load balancing method redefined", node.source)
        draft.hook = None
        draft.method = BalancerMethodConf(node.name, node.args, node.source)
        draft.method_declared = True
        draft.allowed_params = params

    return handler


def _check_hash(node: Node) -> None:
    template(node, node.args[0])  # the key: unknown variables fail here
    if len(node.args) > 1 and node.args[1] != "consistent":
        raise fail(node, f'invalid parameter "{node.args[1]}"')


def _check_random(node: Node) -> None:
    for word, expected in zip(node.args, ("two", "least_conn"), strict=False):
        if word != expected:
            raise fail(node, f'invalid parameter "{word}"')


def _check_least_time(node: Node) -> None:
    for word, expected in zip(node.args, (("header", "last_byte"), ("inflight",)), strict=False):
        if word not in expected:
            raise fail(node, f'invalid parameter "{word}"')


def _upstream_keepalive(state: State, node: Node, draft: UpstreamDraft) -> None:
    value = parse_int(node.args[0])
    if not value:
        raise fail(node, f'invalid value "{node.args[0]}" in "{node.name}" directive')
    _store(node, draft.values, value)


# --------------------------------------------------------------------------- access, status, api


def _access_rule(state: State, node: Node, draft: LevelDraft) -> None:
    """``allow|deny address | CIDR | unix: | all`` (ngx_http_access_rule's checks and words)."""
    rules = draft.values.setdefault("access_rules", [])
    rules.append(AccessRule(node.name == "allow", _network(state, node, node.args[0]), node.source))


def _network(state: State, node: Node, value: str) -> str:
    """``address | CIDR | unix: | all`` checked as ngx_http_access_rule does; a CIDR comes
    back normalized ("10.0.0.0/8", "::1/128")."""
    import ipaddress

    if value in ("all", "unix:"):
        return value
    try:
        parsed = ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise fail(node, f'invalid parameter "{value}"') from None
    if "/" in value and parsed.network_address != ipaddress.ip_address(value.split("/")[0]):
        state.warn(f"low address bits of {value} are meaningless", node.source)
    return str(parsed)


def _trace_allow(state: State, node: Node, draft: LevelDraft) -> None:
    """``balancer_trace_allow address | CIDR | unix: | all ...``: the lines of one level add
    up; an inner level's list replaces the inherited one (as allow/deny)."""
    networks = draft.values.setdefault(node.name, [])
    networks.extend(_network(state, node, value) for value in node.args)


# --------------------------------------------------------------------------- limit_req / limit_conn

_LIMIT_LOG_LEVELS = ("info", "notice", "warn", "error")
_MIN_LIMIT_ZONE = 8 * 4096  # nginx: 8 pages


def _limit_zone(state: State, node: Node, draft: HttpDraft,
                known: Callable[[str], bool] | None = None) -> None:
    """``limit_req_zone KEY zone=NAME:SIZE rate=N(r/s|r/m)`` / ``limit_conn_zone KEY zone=NAME:SIZE``
    (ngx_http_limit_req_zone's checks and words); ``known``: the block's variable names
    (stream's limit_conn_zone)."""
    from scriptlb.config.model import LimitZoneConf

    kind = node.name[: -len("_zone")]
    key = template(node, node.args[0], known)
    name = ""
    size = rate = 0
    for value in node.args[1:]:
        if value.startswith("zone="):
            name, colon, size_text = value[5:].partition(":")
            parsed = parse_size(size_text) if colon else None
            if not name or parsed is None:
                raise fail(node, f'invalid zone size "{value}"')
            if parsed < _MIN_LIMIT_ZONE:
                raise fail(node, f'zone "{value[5:]}" is too small')
            size = parsed
        elif value.startswith("rate=") and kind == "limit_req":
            text, scale = value[5:], 1
            if text.endswith("r/s"):
                text = text[:-3]
            elif text.endswith("r/m"):
                text, scale = text[:-3], 60
            number = parse_int(text)
            if number is None or number <= 0:
                raise fail(node, f'invalid rate "{value}"')
            rate = number * 1000 // scale
        else:
            raise fail(node, f'invalid parameter "{value}"')
    if not name:
        raise fail(node, f'"{node.name}" must have "zone" parameter')
    other = draft.limit_zones.get(name)
    if other is not None:
        raise fail(node, f'{node.name} "{name}" is already bound to key "{other.key.raw}"'
                   if other.kind == kind else f'the size {size} of shared memory zone "{name}" conflicts '
                   f"with already declared size {other.size}")
    draft.limit_zones[name] = LimitZoneConf(kind, name, size, key, rate or 1000, node.source)


def _limit_req(state: State, node: Node, draft: LevelDraft) -> None:
    """``limit_req zone=NAME [burst=N] [nodelay | delay=N]``: one level's lines add up."""
    from scriptlb.config.model import LimitReqConf

    zone = ""
    burst = delay = 0
    nodelay = False
    for value in node.args:
        if value.startswith("zone="):
            zone = value[5:]
        elif value.startswith("burst="):
            number = parse_int(value[6:])
            if number is None or number <= 0:
                raise fail(node, f'invalid burst value "{value}"')
            burst = number
        elif value.startswith("delay="):
            number = parse_int(value[6:])
            if number is None or number <= 0:
                raise fail(node, f'invalid delay value "{value}"')
            delay = number
        elif value == "nodelay":
            nodelay = True
        else:
            raise fail(node, f'invalid parameter "{value}"')
    if not zone:
        raise fail(node, f'"{node.name}" must have "zone" parameter')
    limits = draft.values.setdefault("limit_req", [])
    if any(limit.zone == zone for limit in limits):
        raise fail(node, f'"{node.name}" directive is duplicate')
    # (nodelay: no request is ever delayed; nginx's NGX_MAX_INT_T_VALUE / 1000)
    limits.append(LimitReqConf(zone, burst * 1000, (2**62 if nodelay else delay * 1000), node.source))


def _limit_conn(state: State, node: Node, draft: LevelDraft) -> None:
    """``limit_conn ZONE NUMBER``: one level's lines add up."""
    from scriptlb.config.model import LimitConnConf

    zone, number_text = node.args
    number = parse_int(number_text)
    if number is None or number <= 0 or number > 65535:
        raise fail(node, f'invalid number of connections "{number_text}"' if number is None or number <= 0
                   else "connection limit must be less 65536")
    limits = draft.values.setdefault("limit_conn", [])
    if any(limit.zone == zone for limit in limits):
        raise fail(node, f'"{node.name}" directive is duplicate')
    limits.append(LimitConnConf(zone, number, node.source))


def _limit_status(state: State, node: Node, draft: LevelDraft) -> None:
    status = parse_int(node.args[0])
    if status is None or not 400 <= status <= 599:
        raise fail(node, "value must be between 400 and 599")
    _store(node, draft.values, status)


def _limit_log_level(state: State, node: Node, draft: LevelDraft) -> None:
    level = node.args[0]
    if level not in _LIMIT_LOG_LEVELS:
        raise fail(node, f'invalid value "{level}" in "{node.name}" directive, it must be "info", '
                   '"notice", "warn" or "error"')
    _store(node, draft.values, level)


def _set_real_ip_from(state: State, node: Node, draft: LevelDraft) -> None:
    """``set_real_ip_from address | CIDR | unix: | name``: the lines of one level add up, an
    inner level's list replaces the inherited one; a name stands for its addresses."""
    trusted = draft.values.setdefault(node.name, [])
    value = node.args[0]
    if value == "all":
        raise fail(node, f'invalid parameter "{value}"')
    try:
        trusted.append(_network(state, node, value))
    except ConfigError:
        from scriptlb.config.addresses import resolve

        addrs = resolve(value, 0)
        if not addrs:
            raise fail(node, f'host not found in set_real_ip_from "{value}"') from None
        trusted.extend(_network(state, node, addr.host or "") for addr in addrs)


def _real_ip_header(state: State, node: Node, draft: LevelDraft) -> None:
    _store(node, draft.values, node.args[0].lower())


def _auth_basic(state: State, node: Node, draft: LevelDraft) -> None:
    value = node.args[0]
    if "$" in value:
        raise fail(node, f'variables in "{node.name}" are not supported by scriptlb')
    _store(node, draft.values, None if value == "off" else value)


def _auth_basic_user_file(state: State, node: Node, draft: LevelDraft) -> None:
    _store(node, draft.values, state.path(node.args[0]))


# ngx_methods_names: the methods limit_except can name
_LIMIT_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "MKCOL", "COPY", "MOVE", "OPTIONS", "PROPFIND",
                  "PROPPATCH", "LOCK", "UNLOCK", "PATCH")


def _limit_except(state: State, node: Node, draft: LocationDraft) -> tuple[Ctx, Any]:
    """``limit_except method ... { ... }``: the block's access rules apply to the other methods
    (GET allows HEAD too)."""
    if "limit_except" in draft.values:
        raise fail(node, '"limit_except" directive is duplicate')
    methods = set()
    for name in node.args:
        if name.upper() not in _LIMIT_METHODS:  # (nginx compares caselessly)
            raise fail(node, f'invalid method "{name}"')
        methods.add(name.upper())
    if "GET" in methods:
        methods.add("HEAD")
    # (a location's draft: proxy_pass may stand in the block, as in nginx)
    block = LocationDraft(modifier=draft.modifier, pattern=draft.pattern, source=node.source)
    draft.values["limit_except"] = (frozenset(methods), block)
    return Ctx.LIMIT_EXCEPT, block


def _content_handler(state: State, node: Node, draft: LocationDraft) -> None:
    """stub_status, api [write=on|off], prometheus: the location answers by itself."""
    write = False
    for arg in node.args:
        if node.name == "stub_status" and arg in ("on", "off"):  # nginx < 1.7.5's form
            continue
        if node.name == "api" and arg in ("write=on", "write=off"):
            write = arg == "write=on"
            continue
        raise fail(node, f'invalid parameter "{arg}"')
    if "handler" in draft.values:
        raise fail(node, f'"{node.name}" directive is duplicate')
    draft.values["handler"] = (node.name, write)


def _upstream_zone(state: State, node: Node, draft: UpstreamDraft) -> None:
    """``zone NAME [SIZE]``: nginx Plus needs it for the API; scriptlb's statistics are shared
    anyway, so it is checked and recorded only."""
    if len(node.args) > 1 and parse_size(node.args[1]) is None:
        raise fail(node, f'invalid zone size "{node.args[1]}"')
    _store(node, draft.values, node.args[0])


def _upstream_state(state: State, node: Node, draft: UpstreamDraft) -> None:
    _store(node, draft.values, state.path(node.args[0]))


def _discovery(state: State, node: Node, draft: UpstreamDraft) -> None:
    """``discovery etcd=http://HOST:PORT prefix=/KEY/PREFIX/ [timeout=T]``: the servers are the
    keys under the prefix in etcd (scriptlb.ops.discovery)."""
    values: dict[str, str] = {}
    for param in node.args:
        key, eq, value = param.partition("=")
        if not eq or not value or key not in ("etcd", "prefix", "timeout") or key in values:
            raise fail(node, f'invalid parameter "{param}"')
        values[key] = value
    if "etcd" not in values or "prefix" not in values:
        raise fail(node, '"discovery" needs "etcd=" and "prefix="')
    if not values["etcd"].startswith("http://"):
        raise fail(node, f'invalid etcd URL "{values["etcd"]}" (http://HOST:PORT)')
    timeout = parse_time(values.get("timeout", "3s"))
    if timeout is None or timeout <= 0:
        raise fail(node, f'invalid timeout "{values["timeout"]}"')
    _store(node, draft.values, DiscoveryConf(values["etcd"], values["prefix"], timeout))


def _resolver(state: State, node: Node, draft: Any) -> None:
    """``resolver ADDRESS ... [valid=T] [ipv4=on|off] [ipv6=on|off]`` (name servers: IP
    literals, port 53 unless given)."""
    addresses: list[tuple[str, int]] = []
    options: dict[str, Any] = {}
    for arg in node.args:
        name, eq, value = arg.partition("=")
        if eq and name == "valid":
            valid = parse_time(value, seconds_only=True)
            if valid is None:
                raise fail(node, f'invalid parameter "{arg}"')
            options["valid"] = valid
        elif eq and name in ("ipv4", "ipv6"):
            if value not in ("on", "off"):
                raise fail(node, f'invalid parameter "{arg}"')
            options[name] = value == "on"
        elif eq:
            raise fail(node, f'invalid parameter "{arg}"')
        else:
            addresses.append(_name_server(node, arg))
    if not options.get("ipv4", True) and not options.get("ipv6", True):
        raise fail(node, '"ipv4" and "ipv6" cannot both be "off"')
    _store(node, draft.values, ResolverConf(tuple(addresses), **options))


def _name_server(node: Node, text: str) -> tuple[str, int]:
    import ipaddress

    host = text
    port: int | None = 53
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            port = parse_int(rest[1:]) if rest.startswith(":") else None
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        port = parse_int(port_text)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise fail(node, f'invalid resolver address "{text}" (an IP address is needed)')
    if port is None or not 0 < port < 65536:
        raise fail(node, f'invalid port in resolver "{text}"')
    return host, port


# --------------------------------------------------------------------------- health checks


def _health_check(state: State, node: Node, draft: LocationDraft) -> None:
    """``health_check [interval=T] [jitter=T] [fails=N] [passes=N] [uri=U] [port=N]
    [match=NAME] [mandatory [persistent]] [type=http|tcp]`` (nginx Plus), checked here;
    the builder ties it to the location's upstream."""
    params: dict[str, Any] = {"source": node.source}
    for arg in node.args:
        name, eq, value = arg.partition("=")
        if not eq and name in ("mandatory", "persistent"):
            params[name] = True
        elif name in ("interval", "jitter") and eq:
            seconds = parse_time(value)
            if seconds is None or (name == "interval" and seconds <= 0):
                raise fail(node, f'invalid parameter "{arg}"')
            params[name] = seconds
        elif name in ("fails", "passes", "port") and eq:
            count = parse_int(value)
            if not count or (name == "port" and count > 65535):
                raise fail(node, f'invalid parameter "{arg}"')
            params[name] = count
        elif name == "uri" and eq and value.startswith("/"):
            params["uri"] = value
        elif name == "match" and eq and value:
            params["match"] = value
        elif name == "type" and value in ("http", "tcp"):
            params["type"] = value
        else:
            raise fail(node, f'invalid parameter "{arg}"')
    if params.get("persistent") and not params.get("mandatory"):
        raise fail(node, '"persistent" requires "mandatory"')
    draft.values.setdefault("health_checks", []).append(params)


def _map(state: State, node: Node, draft: HttpDraft) -> None:
    conf = parse_map(node, _check_regex)
    # a map may not redefine a built-in variable; a second map of the same name replaces the
    # first (nginx's map variables are "changeable")
    if conf.variable in KNOWN_VARIABLES:
        raise fail(node, f'the duplicate "{conf.variable}" variable')
    draft.maps[conf.variable] = conf


def _geo(state: State, node: Node, draft: HttpDraft) -> None:
    """``geo [ADDRESS] $variable { ... }`` (ngx_http_geo_module; scriptlb.config.geo)."""
    from scriptlb.config.geo import parse_geo

    conf = parse_geo(node, None, http=True, warn=state.warn)
    if conf.variable in KNOWN_VARIABLES:
        raise fail(node, f'the duplicate "{conf.variable}" variable')
    draft.maps[conf.variable] = conf


def _match(state: State, node: Node, draft: HttpDraft) -> tuple[Ctx, Any]:
    name = node.args[0]
    if name in draft.matches:
        raise fail(node, f'duplicate match "{name}"')
    match = draft.matches[name] = MatchDraft(name, node.source)
    return Ctx.MATCH, match


def _match_status(state: State, node: Node, draft: MatchDraft) -> None:
    words = list(node.args)
    negated = words[0] == "!"
    if negated:
        words = words[1:]
    if not words:
        raise fail(node, 'invalid number of arguments in "status" directive')
    for word in words:
        low_text, _, high_text = word.partition("-")
        low, high = parse_int(low_text), parse_int(high_text or low_text)
        if low is None or high is None or not 100 <= low <= high <= 999:
            raise fail(node, f'invalid status "{word}"')
        draft.statuses.append((negated, low, high))


def _match_header(state: State, node: Node, draft: MatchDraft) -> None:
    args = node.args
    if len(args) == 1:
        draft.headers.append((args[0].lower(), "present", ""))
    elif len(args) == 2 and args[0] == "!":
        draft.headers.append((args[1].lower(), "absent", ""))
    elif len(args) == 3 and args[1] in ("=", "!=", "~", "!~"):
        if "~" in args[1]:
            _check_regex(node, args[2], caseless=False)
        draft.headers.append((args[0].lower(), args[1], args[2]))
    else:
        raise fail(node, 'invalid number of arguments in "header" directive')


def _match_body(state: State, node: Node, draft: MatchDraft) -> None:
    operator, regex = node.args
    if operator not in ("~", "!~"):
        raise fail(node, f'invalid parameter "{operator}"')
    _check_regex(node, regex, caseless=False)
    draft.bodies.append((operator == "!~", regex))


def _match_send(state: State, node: Node, draft: MatchDraft) -> None:
    if draft.send is not None:
        raise fail(node, '"send" directive is duplicate')
    draft.send = node.args[0].replace("\\r", "\r").replace("\\n", "\n")


def _match_expect(state: State, node: Node, draft: MatchDraft) -> None:
    if draft.expect is not None:
        raise fail(node, '"expect" directive is duplicate')
    value = node.args[-1]
    if len(node.args) == 2:
        if node.args[0] != "~":
            raise fail(node, f'invalid parameter "{node.args[0]}"')
        _check_regex(node, value, caseless=False)
    else:
        value = re.escape(value)
    draft.expect = value


# --------------------------------------------------------------------------- ssl (termination)

SSL_PROTOCOLS = ("SSLv2", "SSLv3", "TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")


def _ssl_file_list(state: State, node: Node, draft: LevelDraft) -> None:
    """ssl_certificate / ssl_certificate_key: several per level (RSA and ECDSA), in order."""
    draft.values.setdefault(node.name, []).append((state.path(node.args[0]), node.source))


def _ssl_path(state: State, node: Node, draft: LevelDraft) -> None:
    _store(node, draft.values, state.path(node.args[0]))


def _ssl_protocols(state: State, node: Node, draft: LevelDraft) -> None:
    for name in node.args:
        if name not in SSL_PROTOCOLS:
            raise fail(node, f'invalid value "{name}"')
    _store(node, draft.values, tuple(node.args))


def _ssl_verify_client(state: State, node: Node, draft: LevelDraft) -> None:
    value = node.args[0]
    if value not in ("on", "off", "optional", "optional_no_ca"):
        raise fail(node, f'invalid value "{value}" in "{node.name}" directive, '
                         'it must be "on", "off", "optional" or "optional_no_ca"')
    _store(node, draft.values, value)


def _ssl_session_cache(state: State, node: Node, draft: LevelDraft) -> None:
    for value in node.args:
        if value in ("off", "none") or value == "builtin" or (
                value.startswith("builtin:") and value[len("builtin:"):].isdigit()):
            continue
        name, _, size = value[len("shared:"):].partition(":") if value.startswith("shared:") else ("", "", "")
        if not name or parse_size(size) is None:
            raise fail(node, f'invalid session cache "{value}"')
    _store(node, draft.values, " ".join(node.args))


def proxy_ssl_file(state: State, node: Node, draft: Any, known: Callable[[str], bool] | None = None) -> None:
    """proxy_ssl_certificate / _key: the path and the line (where a missing pair points); with
    variables a template, its value's path resolved against the prefix per connection."""
    raw = node.args[0]
    value = template(node, raw, known) if "$" in raw else state.path(raw)
    _store(node, draft.values, (value, node.source))


def _proxy_ssl_conf_command(state: State, node: Node, draft: Any) -> None:
    """proxy_ssl_conf_command NAME VALUE: OpenSSL's SSL_CONF_cmd, every line in order (a level
    with its own lines replaces the inherited ones). The value is kept as written and against
    the prefix too: a command taking a file or directory gets the latter, as nginx's."""
    name, value = node.args
    draft.values.setdefault(node.name, []).append((name, value, state.path(value)))


def _proxy_ssl_name(state: State, node: Node, draft: LevelDraft) -> None:
    _store(node, draft.values, template(node, node.args[0]))


# --------------------------------------------------------------------------- the table


def _spec(name: str, contexts: Ctx, args: tuple[int, int | None], handler: Handler, **kw: Any) -> Spec:
    return Spec(name, contexts, args[0], args[1], handler, **kw)


ONE, FLAG = (1, 1), (1, 1)
NONE = (0, 0)

_SPECS: tuple[Spec, ...] = (
    # main
    _spec("worker_processes", Ctx.MAIN, ONE, _worker_processes),
    _spec("daemon", Ctx.MAIN, FLAG, _slot(flag)),
    _spec("master_process", Ctx.MAIN, FLAG, _slot(flag)),
    _spec("pid", Ctx.MAIN, ONE, _pid),
    _spec("user", Ctx.MAIN, (1, 2), _user),
    _spec("error_log", Ctx.MAIN, (1, 2), _error_log),
    _spec("events", Ctx.MAIN, NONE, _events, block=True),
    _spec("worker_connections", Ctx.EVENTS, ONE, _worker_connections),
    _spec("http", Ctx.MAIN, NONE, _http, block=True),
    # http / server / location
    _spec("server", Ctx.HTTP, NONE, _server_block, block=True),
    _spec("upstream", Ctx.HTTP, ONE, _upstream, block=True),
    _spec("listen", Ctx.SERVER, (1, None), _listen),
    _spec("server_name", Ctx.SERVER, (1, None), _server_name),
    _spec("location", Ctx.SERVER | Ctx.LOCATION, (1, 2), _location, block=True),
    _spec("proxy_pass", Ctx.LOCATION | Ctx.IF | Ctx.LIMIT_EXCEPT, ONE, _in_location_if(_proxy_pass)),
    _spec("proxy_set_header", HSL, (2, 2), _proxy_set_header),
    _spec("proxy_http_version", HSL, ONE, _proxy_http_version),
    _spec("proxy_connect_timeout", HSL, ONE, _slot(msec)),
    _spec("proxy_send_timeout", HSL, ONE, _slot(msec)),
    _spec("proxy_read_timeout", HSL, ONE, _slot(msec)),
    _spec("proxy_next_upstream", HSL, (1, None), _proxy_next_upstream),
    _spec("proxy_next_upstream_tries", HSL, ONE, _slot(number)),
    _spec("proxy_next_upstream_timeout", HSL, ONE, _slot(msec)),
    _spec("proxy_request_buffering", HSL, FLAG, _slot(flag)),
    _spec("proxy_buffering", HSL, FLAG, _slot(flag)),
    _spec("client_max_body_size", HSL, ONE, _slot(_offset)),
    _spec("client_header_timeout", HS, ONE, _slot(msec)),
    _spec("client_body_timeout", HSL, ONE, _slot(msec)),
    _spec("keepalive_timeout", HSL, (1, 2), _keepalive_timeout),
    _spec("keepalive_requests", HSL, ONE, _slot(number)),
    _spec("send_timeout", HSL, ONE, _slot(msec)),
    _spec("limit_rate", HSL | Ctx.IF, ONE, _in_location_if(_slot(_size))),
    _spec("limit_rate_after", HSL | Ctx.IF, ONE, _in_location_if(_slot(_size))),
    _spec("proxy_limit_rate", HSL, ONE, _slot(_size)),
    _spec("proxy_store", HSL, ONE, _proxy_store),
    _spec("proxy_store_access", HSL, (1, 3), _slot(_store_access)),
    _spec("large_client_header_buffers", HS, (2, 2), _large_client_header_buffers),
    _spec("max_headers", HS, ONE, _slot(number)),
    _spec("return", Ctx.SERVER | Ctx.LOCATION, (1, 2), _return),
    _spec("log_format", Ctx.HTTP, (2, None), _log_format),
    _spec("access_log", HSL | Ctx.IF, (1, None), _in_location_if(_access_log)),
    # client request heads and bodies
    _spec("client_header_buffer_size", HS, ONE, _slot(_size)),
    _spec("underscores_in_headers", HS, FLAG, _slot(flag)),
    _spec("ignore_invalid_headers", HS, FLAG, _slot(flag)),
    _spec("client_body_buffer_size", HSL, ONE, _slot(_size)),
    _spec("client_body_temp_path", HSL, (1, 4), _temp_path),
    _spec("client_body_in_file_only", HSL, ONE, _slot(_in_file_only)),
    _spec("client_body_in_single_buffer", HSL, FLAG, _slot(flag)),
    # server side includes (ngx_http_ssi_module)
    _spec("ssi", HSL | Ctx.IF, FLAG, _in_location_if(_slot(flag))),
    _spec("ssi_types", HSL, (1, None), _slot(lambda node: tuple(node.args))),
    _spec("ssi_silent_errors", HSL, FLAG, _slot(flag)),
    _spec("ssi_last_modified", HSL, FLAG, _slot(flag)),
    _spec("ssi_value_length", HSL, ONE, _slot(_size)),
    _spec("ssi_min_file_chunk", HSL, ONE, _accepted(_size)),
    # upstream response buffers
    _spec("proxy_buffer_size", HSL, ONE, _slot(_size)),
    _spec("proxy_buffers", HSL, (2, 2), _slot(_bufs)),
    _spec("proxy_busy_buffers_size", HSL, ONE, _slot(_size)),
    _spec("proxy_max_temp_file_size", HSL, ONE, _accepted(_size)),
    # python hooks
    _spec("python_package_path", Ctx.HTTP, ONE, _python_package_path),
    _spec("python_code_cache", Ctx.HTTP, FLAG, _slot(flag)),
    _spec("python_memory_limit", Ctx.HTTP, ONE, _slot(_size_or_off)),
    _spec("python_peer_stats", Ctx.HTTP, FLAG, _slot(flag)),
    _spec("balancer_by_python_timeout", Ctx.HTTP | Ctx.UPSTREAM, ONE, _hook_timeout),
    _spec("balancer_by_python_fallback", Ctx.HTTP | Ctx.UPSTREAM, FLAG, _slot(flag)),
    _spec("balancer_by_python_breaker", Ctx.HTTP | Ctx.UPSTREAM, (1, 3), _hook_breaker),
    _spec("balancer_by_python_file", Ctx.UPSTREAM, ONE, _hook_file),
    _spec("balancer_by_python_block", Ctx.UPSTREAM, NONE, _hook_block, block=True),
    _spec("python_shared_dict", Ctx.HTTP, (2, 6), _python_shared_dict),
    _spec("log_by_python_file", HSL, ONE, _log_hook_file),
    _spec("log_by_python_block", HSL, NONE, _log_hook_block, block=True),
    _spec("log_by_python_timeout", HSL, ONE, _hook_timeout),
    _spec("balancer_trace_header", HSL, FLAG, _slot(flag)),
    _spec("balancer_trace_allow", HSL, (1, None), _trace_allow),
    _spec("set_real_ip_from", HSL, ONE, _set_real_ip_from),
    _spec("open_log_file_cache", HSL | Ctx.STREAM | Ctx.STREAM_SERVER, (1, 4), _open_log_file_cache),
    _spec("limit_req_zone", Ctx.HTTP, (2, 3), _limit_zone),
    _spec("limit_req", HSL, (1, 3), _limit_req),
    _spec("limit_req_status", HSL, ONE, _limit_status),
    _spec("limit_req_log_level", HSL, ONE, _limit_log_level),
    _spec("limit_req_dry_run", HSL, FLAG, _slot(flag)),
    _spec("limit_conn_zone", Ctx.HTTP, (2, 2), _limit_zone),
    _spec("limit_conn", HSL, (2, 2), _limit_conn),
    _spec("limit_conn_status", HSL, ONE, _limit_status),
    _spec("limit_conn_log_level", HSL, ONE, _limit_log_level),
    _spec("limit_conn_dry_run", HSL, FLAG, _slot(flag)),
    _spec("real_ip_header", HSL, ONE, _real_ip_header),
    _spec("real_ip_recursive", HSL, FLAG, _slot(flag)),
    # upstream
    _spec("server", Ctx.UPSTREAM, (1, None), _upstream_server),
    _spec("keepalive", Ctx.UPSTREAM, ONE, _upstream_keepalive),
    # OpenResty's pool for hook-set peers (enable_keepalive): same checks as keepalive
    _spec("balancer_keepalive", Ctx.UPSTREAM, ONE, _upstream_keepalive),
    _spec("least_conn", Ctx.UPSTREAM, NONE, _method(_ALL_SERVER_PARAMS)),
    _spec("hash", Ctx.UPSTREAM, (1, 2), _method(_NO_BACKUP, _check_hash)),
    _spec("ip_hash", Ctx.UPSTREAM, NONE, _method(_NO_BACKUP)),
    _spec("random", Ctx.UPSTREAM, (0, 2), _method(_NO_BACKUP, _check_random)),
    _spec("least_time", Ctx.UPSTREAM, (1, 2), _method(_ALL_SERVER_PARAMS, _check_least_time)),
    _spec("ewma", Ctx.UPSTREAM, NONE, _method(_ALL_SERVER_PARAMS)),
    _spec("keepalive_timeout", Ctx.UPSTREAM, ONE, _slot(msec)),
    _spec("keepalive_requests", Ctx.UPSTREAM, ONE, _slot(number)),
    _spec("zone", Ctx.UPSTREAM, (1, 2), _upstream_zone),
    _spec("health_check", Ctx.LOCATION, (0, None), _health_check),
    _spec("match", Ctx.HTTP, ONE, _match, block=True),
    _spec("map", Ctx.HTTP, (2, 2), _map, block=True),
    _spec("geo", Ctx.HTTP, (1, 2), _geo, block=True),
    _spec("status", Ctx.MATCH, (1, None), _match_status),
    _spec("header", Ctx.MATCH, (1, 3), _match_header),
    _spec("body", Ctx.MATCH, (2, 2), _match_body),
    _spec("send", Ctx.MATCH, ONE, _match_send),
    _spec("expect", Ctx.MATCH, (1, 2), _match_expect),
    _spec("state", Ctx.UPSTREAM, ONE, _upstream_state),
    # membership at run time (the cluster process): etcd, DNS
    _spec("discovery", Ctx.UPSTREAM, (1, 3), _discovery),
    _spec("resolver", HSL | Ctx.UPSTREAM, (1, None), _resolver),
    _spec("resolver_timeout", HSL | Ctx.UPSTREAM, ONE, _slot(msec)),
    # access control, status and the API
    _spec("allow", HSL | Ctx.LIMIT_EXCEPT, ONE, _access_rule),
    _spec("deny", HSL | Ctx.LIMIT_EXCEPT, ONE, _access_rule),
    _spec("auth_basic", HSL | Ctx.LIMIT_EXCEPT, ONE, _auth_basic),
    _spec("auth_basic_user_file", HSL | Ctx.LIMIT_EXCEPT, ONE, _auth_basic_user_file),
    _spec("limit_except", Ctx.LOCATION, (1, None), _limit_except, block=True),
    _spec("stub_status", Ctx.LOCATION, (0, 1), _content_handler),
    _spec("api", Ctx.LOCATION, (0, 1), _content_handler),
    _spec("prometheus", Ctx.LOCATION, NONE, _content_handler),
    _spec("status_zone", Ctx.SERVER, ONE, _slot(lambda node: node.args[0])),
    _spec("add_header", HSL | Ctx.IF, (2, 3), _in_location_if(_add_header)),
    _spec("add_trailer", HSL | Ctx.IF, (2, 3), _in_location_if(_add_header)),  # (same syntax and merge)
    _spec("expires", HSL | Ctx.IF, (1, 2), _in_location_if(_expires)),
    _spec("try_files", Ctx.SERVER | Ctx.LOCATION, (2, None), _try_files),
    # the rewrite module (return is above; inside `if` it is one of the ordered directives)
    _spec("set", Ctx.SERVER | Ctx.LOCATION | Ctx.IF, (2, 2),
          _rewrite_directive(lambda node: rewrite.set_op(node, template))),
    _spec("rewrite", Ctx.SERVER | Ctx.LOCATION | Ctx.IF, (2, 3),
          _rewrite_directive(lambda node: rewrite.rewrite_op(node, template, _check_regex))),
    _spec("break", Ctx.SERVER | Ctx.LOCATION | Ctx.IF, NONE,
          _rewrite_directive(lambda node: RewriteOp("break"))),
    _spec("return", Ctx.IF, (1, 2), _rewrite_directive(lambda node: rewrite.return_op(_return_conf(node)))),
    _spec("if", Ctx.SERVER | Ctx.LOCATION, (1, None), _if, block=True),
    _spec("error_page", HSL, (2, None), _error_page),
    _spec("proxy_intercept_errors", HSL, FLAG, _slot(flag)),
    _spec("proxy_method", HSL, ONE, _slot(lambda node: template(node, node.args[0]))),
    _spec("proxy_pass_request_headers", HSL, FLAG, _slot(flag)),
    _spec("proxy_pass_request_body", HSL, FLAG, _slot(flag)),
    _spec("proxy_set_body", HSL, ONE, _slot(lambda node: template(node, node.args[0]))),
    _spec("proxy_hide_header", HSL, ONE, _header_name_list),
    _spec("proxy_pass_header", HSL, ONE, _header_name_list),
    _spec("proxy_ignore_headers", HSL, (1, None), _proxy_ignore_headers),
    _spec("proxy_redirect", HSL, (1, 2), _proxy_redirect),
    _spec("proxy_cookie_domain", HSL, (1, 2), _proxy_cookie_domain),
    _spec("proxy_cookie_path", HSL, (1, 2), _proxy_cookie_path),
    _spec("proxy_cookie_flags", HSL, (1, 4), _proxy_cookie_flags),
    _spec("proxy_bind", HSL, (1, 2), _proxy_bind),
    # static files (ngx_http_core_module's root, ngx_http_index_module)
    _spec("root", HSL, ONE, _root),
    _spec("index", HSL, (1, None), _index),
    _spec("alias", Ctx.LOCATION, ONE, _alias),
    _spec("absolute_redirect", HSL, FLAG, _slot(flag)),
    _spec("server_name_in_redirect", HSL, FLAG, _slot(flag)),
    _spec("port_in_redirect", HSL, FLAG, _slot(flag)),
    # tuning that has no counterpart in scriptlb's runtime: accepted, checked, unused
    _spec("proxy_temp_path", HSL, (1, 4), _temp_path),
    _spec("connection_pool_size", HS, ONE, _accepted(_size)),
    _spec("request_pool_size", HS, ONE, _accepted(_size)),
    _spec("server_names_hash_bucket_size", Ctx.HTTP, ONE, _accepted(_size)),
    _spec("server_names_hash_max_size", Ctx.HTTP, ONE, _accepted(_size)),
    _spec("variables_hash_bucket_size", Ctx.HTTP, ONE, _accepted(_size)),
    _spec("variables_hash_max_size", Ctx.HTTP, ONE, _accepted(_size)),
    _spec("types_hash_bucket_size", HSL, ONE, _accepted(_size)),
    _spec("types_hash_max_size", HSL, ONE, _accepted(_size)),
    _spec("sendfile", HSL, FLAG, _accepted(flag)),
    _spec("tcp_nopush", HSL, FLAG, _accepted(flag)),
    _spec("tcp_nodelay", HSL, FLAG, _accepted(flag)),
    _spec("keepalive_time", HSL | Ctx.UPSTREAM, ONE, _slot(msec)),
    _spec("keepalive_disable", HSL, (1, None), _slot(_keepalive_disable)),
    # TLS termination (ngx_http_ssl_module)
    _spec("ssl_certificate", HS, ONE, _ssl_file_list),
    _spec("ssl_certificate_key", HS, ONE, _ssl_file_list),
    _spec("ssl_protocols", HS, (1, None), _ssl_protocols),
    _spec("ssl_ciphers", HS, ONE, _slot(lambda node: node.args[0])),
    _spec("ssl_prefer_server_ciphers", HS, FLAG, _slot(flag)),
    _spec("ssl_ecdh_curve", HS, ONE, _slot(lambda node: node.args[0])),
    _spec("ssl_session_cache", HS, (1, 2), _ssl_session_cache),
    _spec("ssl_session_timeout", HS, ONE, _slot(msec)),
    _spec("ssl_session_tickets", HS, FLAG, _slot(flag)),
    _spec("ssl_session_ticket_key", HS, ONE, _ssl_file_list),
    _spec("ssl_client_certificate", HS, ONE, _ssl_path),
    _spec("ssl_trusted_certificate", HS, ONE, _ssl_path),
    _spec("ssl_verify_client", HS, ONE, _ssl_verify_client),
    _spec("ssl_verify_depth", HS, ONE, _slot(number)),
    _spec("ssl_dhparam", HS, ONE, _ssl_path),
    _spec("ssl_password_file", HS, ONE, _ssl_path),
    # TLS to the peers (ngx_http_proxy_module)
    _spec("proxy_ssl_server_name", HSL, FLAG, _slot(flag)),
    _spec("proxy_ssl_name", HSL, ONE, _proxy_ssl_name),
    _spec("proxy_ssl_verify", HSL, FLAG, _slot(flag)),
    _spec("proxy_ssl_trusted_certificate", HSL, ONE, _ssl_path),
    _spec("proxy_ssl_verify_depth", HSL, ONE, _slot(number)),
    _spec("proxy_ssl_protocols", HSL, (1, None), _ssl_protocols),
    _spec("proxy_ssl_ciphers", HSL, ONE, _slot(lambda node: node.args[0])),
    _spec("proxy_ssl_certificate", HSL, ONE, proxy_ssl_file),
    _spec("proxy_ssl_certificate_key", HSL, ONE, proxy_ssl_file),
    _spec("proxy_ssl_conf_command", HSL, (2, 2), _proxy_ssl_conf_command),
    _spec("proxy_ssl_crl", HSL, ONE, _ssl_path),
    _spec("proxy_ssl_session_reuse", HSL, FLAG, _slot(flag)),
    _spec("proxy_ssl_password_file", HSL, ONE, _ssl_path),
)

DIRECTIVES: dict[str, tuple[Spec, ...]] = {}
for _s in _SPECS:
    DIRECTIVES[_s.name] = (*DIRECTIVES.get(_s.name, ()), _s)


def lookup(node: Node, ctx: Ctx) -> Spec:
    """The spec that handles ``node`` in ``ctx``, checked exactly as nginx checks it."""
    specs = DIRECTIVES.get(node.name)
    if specs is None:
        raise fail(node, f'unknown directive "{node.name}"')
    for spec in specs:
        if not spec.contexts & ctx:
            continue
        is_block = node.children is not None
        if not spec.block and is_block:
            raise fail(node, f'directive "{node.name}" is not terminated by ";"')
        if spec.block and not is_block:
            raise fail(node, f'directive "{node.name}" has no opening "{{"')
        n = len(node.args)
        if n < spec.min_args or (spec.max_args is not None and n > spec.max_args):
            raise fail(node, f'invalid number of arguments in "{node.name}" directive')
        return spec
    raise fail(node, f'"{node.name}" directive is not allowed here')
