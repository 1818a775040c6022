"""Access-log lines back into requests: a parser built from a ``log_format`` string.

Each ``$variable`` of the format becomes a lazy regex group between the format's literal text
(the way nginx wrote the line), so any format works as long as two variables are not glued
together. A line starting with ``{`` is read as JSON: its keys are variable names, or the
keys of a JSON-shaped format (``'{"uri":"$uri",...}'`` maps ``uri`` to ``$uri``).

What a replay needs from a line: the request (``$request``, or ``$request_method`` with
``$request_uri``/``$uri``+``$args``), the client (``$remote_addr``), request headers
(``$http_NAME``, ``$host``, ``$cookie_NAME``), when it arrived (``$msec``, ``$time_iso8601`` or
``$time_local``, minus ``$request_time`` when logged) and the tries as nginx lists them
(``$upstream_addr``, ``$upstream_status``, ``$upstream_response_time``: ``", "`` between tries,
``" : "`` between upstream groups).
"""

from __future__ import annotations

import calendar
import gzip
import io
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from operator import itemgetter
from typing import IO, Any

from scriptlb.config.model import MainConf, Template, Var
from scriptlb.config.templates import compile_template

COMBINED = (
    '$remote_addr - $remote_user [$time_local] "$request" $status $body_bytes_sent '
    '"$http_referer" "$http_user_agent"'
)
_MONTHS = {
    m: i
    for i, m in enumerate(
        ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1
    )
}
_ESCAPED = re.compile(r"\\x([0-9A-Fa-f]{2})")
_JSON_KEY = re.compile(r'"([^"]+)"\s*:\s*"?\$\{?([A-Za-z0-9_]+)')
_TRIES = re.compile(r", | : ")
_PROTOCOLS = ("HTTP/1.0", "HTTP/1.1", "HTTP/2.0")
_LIST = r"[^ ,]*(?:(?:, | : )[^ ,]*)*"  # nginx's per-try lists: "a, b : c"


class LogFormatError(ValueError):
    """The format cannot be used to read requests back."""


@dataclass(slots=True)
class Recorded:
    """One logged request, as the replay reads it."""

    line: int  # 1-based, over all inputs
    time: float  # when it was logged (epoch seconds); arrival = time - request_time
    method: str
    target: str
    headers: list[tuple[bytes, bytes]]
    remote_addr: str
    status: int  # the final status sent to the client (0: not logged)
    request_time: float | None
    second_only: bool  # the time has one-second resolution ($time_local, $time_iso8601)
    # (its tries are the first pass's: ``Timing``; replaying needs none of them)


def _unescape(value: str) -> str:
    if "\\x" not in value:
        return value
    return _ESCAPED.sub(lambda m: chr(int(m.group(1), 16)), value)


def _time_local(text: str) -> float:
    """``04/Dec/2026:23:10:18 +0100`` -> epoch seconds."""
    day, month, year = int(text[0:2]), _MONTHS[text[3:6]], int(text[7:11])
    hour, minute, second = int(text[12:14]), int(text[15:17]), int(text[18:20])
    offset = _offset(text[21:26])
    return calendar.timegm((year, month, day, hour, minute, second)) - offset


def _time_iso(text: str) -> float:
    """``2026-12-04T23:10:18+01:00`` -> epoch seconds."""
    year, month, day = int(text[0:4]), int(text[5:7]), int(text[8:10])
    hour, minute, second = int(text[11:13]), int(text[14:16]), int(text[17:19])
    zone = text[19:]
    offset = 0 if zone in ("", "Z") else _offset(zone.replace(":", ""))
    return calendar.timegm((year, month, day, hour, minute, second)) - offset


def _offset(zone: str) -> int:
    sign = -1 if zone[:1] == "-" else 1
    return sign * (int(zone[1:3]) * 3600 + int(zone[3:5]) * 60)


def _number(text: str | None) -> float | None:
    if not text or text == "-":
        return None
    try:
        return float(text)
    except ValueError:
        return None


def _status(text: str | None) -> int:
    return int(text) if text and text.isdigit() else 0


def parse_tries(
    addrs: str | None, statuses: str | None, times: str | None
) -> list[tuple[str, int, float | None]]:
    """nginx's per-try lists back into (addr, status, response time) per try."""
    if not addrs or addrs == "-":
        return []
    if "," not in addrs and " : " not in addrs:  # one try: most requests
        return [(addrs, _status(statuses), _number(times))]
    names = _TRIES.split(addrs)
    codes = _TRIES.split(statuses) if statuses and statuses != "-" else []
    durations = _TRIES.split(times) if times and times != "-" else []
    tries = []
    for i, name in enumerate(names):
        code = _status(codes[i]) if i < len(codes) else 0
        duration = _number(durations[i]) if i < len(durations) else None
        tries.append((name, code, duration))
    return tries


# variables whose values never hold a space (what a lazy group would backtrack over)
_NO_SPACE = frozenset(
    {
        "msec",
        "status",
        "request_time",
        "remote_addr",
        "remote_port",
        "body_bytes_sent",
        "bytes_sent",
        "request_length",
        "connection",
        "connection_requests",
        "pid",
        "server_port",
        "server_addr",
        "scheme",
        "request_method",
        "request_uri",
        "uri",
        "args",
        "query_string",
        "host",
    }
)


def _value_pattern(name: str, parts: tuple[str | Var, ...], at: int) -> str:
    """A variable's group: ``[^"]*`` inside quotes (nginx writes a value's quotes as \\x22),
    ``[^ ]*`` for a value that has no spaces before a space, else lazy."""
    before = parts[at - 1] if at > 0 else ""
    after = parts[at + 1] if at + 1 < len(parts) else None
    if isinstance(before, str) and isinstance(after, str):
        if before.endswith('"') and after.startswith('"'):
            return '[^"]*'
        if name in _NO_SPACE and after.startswith(" "):
            return "[^ ]*"
    return ".*?"


class LineParser:
    """Parses lines of one format into field dicts (variable name -> text)."""

    def __init__(self, template: Template) -> None:
        self.template = template
        pattern: list[str] = []
        self.names: list[str] = []
        previous_var = False
        parts = template.parts
        for at, part in enumerate(parts):
            if isinstance(part, Var):
                if previous_var:
                    raise LogFormatError(
                        f'variables "${self.names[-1]}" and "${part.name}" touch: they cannot be told apart'
                    )
                # a per-try list may hold the ", " a lazy group would stop at: its items have no
                # spaces and only its separators do
                value = _LIST if part.name.startswith("upstream_") else _value_pattern(part.name, parts, at)
                pattern.append(f"(?P<v{len(self.names)}>{value})")
                self.names.append(part.name)
                previous_var = True
            else:
                pattern.append(re.escape(part))
                previous_var = False
        self._regex = re.compile("".join(pattern) + r"\Z", re.DOTALL)
        self._groups = [f"v{i}" for i in range(len(self.names))]
        self._json_keys = {key: name.lower() for key, name in _JSON_KEY.findall(template.raw)}
        # what a line of this format gives back, found once (to_request does it per line for JSON)
        self._headers = [
            (name, header[1]) for name in self.names if (header := _header_name(name)) and header[0] == 0
        ]
        if "host" in self.names and "http_host" not in self.names:
            self._headers.append(("host", b"host"))
        self._generic = any(name.startswith("cookie_") for name in self.names)
        # the common case, read straight from the match's groups (no dict per line): a format
        # with $msec and the request line
        index = {name: i for i, name in reversed(list(enumerate(self.names)))}
        self._fast = "msec" in index and "request" in index and not self._generic
        self._at = tuple(
            index.get(name, -1)
            for name in (
                "msec",
                "request_time",
                "upstream_addr",
                "upstream_status",
                "upstream_response_time",
                "request",
                "remote_addr",
                "status",
            )
        )
        self._header_at = [(index[name], header) for name, header in self._headers]
        self._pick = itemgetter(self._at[0], self._at[1], *self._at[5:])
        self._pick_timing = itemgetter(*self._at[:5])

    def _groups_of(self, line: str) -> tuple[str, ...] | None:
        match = self._regex.match(line)
        if match is None:
            return None
        groups = match.groups()
        if "\\x" in line:
            groups = tuple(_unescape(value) for value in groups)
        return (*groups, "-")  # [-1]: a variable the format does not have

    def request(self, line: str, number: int) -> Recorded | None:
        """The line as a request (None: not this format, or no request in it)."""
        if self._fast and line[:1] != "{":
            return self._fast_request(line, number)
        fields = self.fields(line)
        if fields is None:
            return None
        if self._generic or line[:1] == "{":
            return to_request(fields, number)
        method, target = _request_of(fields)
        if method is None:
            return None
        headers = [
            (header, value.encode("latin-1", "replace"))
            for name, header in self._headers
            if (value := fields[name]) != "-"
        ]
        when, second_only = _time_of(fields)
        get = fields.get
        return Recorded(
            number,
            when,
            method,
            target,
            headers,
            get("remote_addr") or "127.0.0.1",
            _status(get("status")),
            _number(get("request_time")),
            second_only,
        )

    def _fast_request(self, line: str, number: int) -> Recorded | None:
        groups = self._groups_of(line)
        if groups is None or groups[self._at[5]] == "-":
            return None
        msec, request_time, request, remote_addr, status = self._pick(groups)
        method, _, rest = request.partition(" ")
        target = rest.rpartition(" ")[0] if rest.endswith(_PROTOCOLS) else rest
        headers = [
            (header, value.encode("latin-1", "replace"))
            for i, header in self._header_at
            if (value := groups[i]) != "-"
        ]
        return Recorded(
            number,
            _number(msec) or 0.0,
            method or "GET",
            target or "/",
            headers,
            remote_addr if remote_addr != "-" else "127.0.0.1",
            _status(status),
            _number(request_time),
            False,
        )

    def timing(self, line: str, number: int) -> Timing | None:
        """What the first pass reads of the line (None: not this format)."""
        if self._fast and line[:1] != "{":
            groups = self._groups_of(line)
            if groups is None or groups[self._at[5]] == "-":
                return None
            msec, request_time, addrs, statuses, times = self._pick_timing(groups)
            return Timing(
                _number(msec) or 0.0, False, _number(request_time), parse_tries(addrs, statuses, times)
            )
        fields = self.fields(line)
        if fields is None:
            return None
        return to_timing(fields, number)

    def fields(self, line: str) -> dict[str, str] | None:
        """The line's variables (None: the line does not match the format)."""
        if line[:1] == "{":
            return self._json_fields(line)
        match = self._regex.match(line)
        if match is None:
            return None
        # "-" (nginx's empty value) stays: to_request and the readers below treat it as missing
        fields = dict(zip(self.names, match.groups(), strict=True))
        if "\\x" in line:
            for name, value in fields.items():
                fields[name] = _unescape(value)
        return fields

    def _json_fields(self, line: str) -> dict[str, str] | None:
        try:
            data = json.loads(line)
        except ValueError:
            return None
        if not isinstance(data, dict):
            return None
        keys = self._json_keys
        return {
            keys.get(key, key): str(value)
            for key, value in data.items()
            if value is not None and value != "" and value != "-"
        }


def to_request(fields: dict[str, str], line: int) -> Recorded | None:
    """A field dict as a request; None when the line lacks the request itself."""
    method, target = _request_of(fields)
    if method is None:
        return None
    headers: list[tuple[bytes, bytes]] = []
    cookies: list[str] = []
    for name, value in fields.items():
        if value == "-":
            continue
        header = _HEADER_NAMES.get(name)
        if header is None:
            header = _HEADER_NAMES[name] = _header_name(name)
        if header:
            if header[0] == 1:
                cookies.append(f"{name[7:]}={value}")
            else:
                headers.append((header[1], value.encode("latin-1", "replace")))
    if fields.get("host", "-") != "-" and "http_host" not in fields:
        headers.append((b"host", fields["host"].encode("latin-1", "replace")))
    if cookies and "http_cookie" not in fields:
        headers.append((b"cookie", "; ".join(cookies).encode("latin-1", "replace")))
    when, second_only = _time_of(fields)
    return Recorded(
        line=line,
        time=when,
        method=method,
        target=target,
        headers=headers,
        remote_addr=fields.get("remote_addr") or "127.0.0.1",
        status=_status(fields.get("status")),
        request_time=_number(fields.get("request_time")),
        second_only=second_only,
    )


_HEADER_NAMES: dict[str, tuple[int, bytes] | tuple[()]] = {}  # variable -> (0, header) | (1, b"") | ()


def _header_name(variable: str) -> tuple[int, bytes] | tuple[()]:
    """What a logged variable gives back of the request's headers: ``$http_x_user_id`` is
    X-User-Id, ``$host`` is Host (unless $http_host is logged too), a ``$cookie_NAME`` a piece
    of Cookie; other variables nothing."""
    if variable.startswith("http_"):
        return 0, variable[5:].replace("_", "-").encode("latin-1")
    if variable.startswith("cookie_"):
        return 1, b""
    return ()


def _request_of(fields: dict[str, str]) -> tuple[str | None, str]:
    request = fields.get("request")
    if request is not None:
        method, _, rest = request.partition(" ")
        target = rest.rpartition(" ")[0] if rest.endswith(_PROTOCOLS) else rest
        return (method or None), (target or "/")
    method = fields.get("request_method")
    target = fields.get("request_uri")
    if target is None and "uri" in fields:
        args = fields.get("args") or fields.get("query_string")
        target = fields["uri"] + (f"?{args}" if args else "")
    if method is None and target is None:
        return None, "/"
    return method or "GET", target or "/"


_TIME_CACHE: dict[str, float] = {}


def _time_of(fields: dict[str, str]) -> tuple[float, bool]:
    msec = _number(fields.get("msec"))
    if msec is not None:
        return msec, False
    for name, parse in (("time_iso8601", _time_iso), ("time_local", _time_local)):
        text = fields.get(name)
        if text is None:
            continue
        when = _TIME_CACHE.get(text)  # consecutive lines share their second
        if when is None:
            try:
                when = parse(text)
            except (ValueError, KeyError, IndexError):
                continue
            if len(_TIME_CACHE) > 4096:
                _TIME_CACHE.clear()
            _TIME_CACHE[text] = when
        return when, True
    return 0.0, False


def format_template(spec: str | None, conf: MainConf | None) -> Template:
    """The format named ``spec`` in the config, or ``spec`` itself as a format string
    (nginx's ``combined`` when None)."""
    if spec is None:
        spec = "combined"
    http = conf.http if conf is not None else None
    if http is not None and spec in http.log_formats:
        return http.log_formats[spec].template
    if spec == "combined":
        return compile_template(COMBINED)
    if "$" not in spec:
        known = ", ".join(sorted(http.log_formats)) if http is not None else "combined"
        raise LogFormatError(f'unknown log format "{spec}" (known: {known})')
    try:
        return compile_template(spec)
    except ValueError as err:
        raise LogFormatError(str(err)) from None


def open_log(path: str) -> IO[str]:
    """A log file as text: ``-`` is standard input, ``.gz`` is read through gzip."""
    if path == "-":
        return io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="surrogateescape")
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors="surrogateescape")
    return open(path, encoding="utf-8", errors="surrogateescape")


def read_requests(
    paths: list[str], parser: LineParser, stats: dict[str, Any] | None = None, first_pass: bool = False
) -> Iterator[Any]:
    """Every request of the logs, in file order: ``Recorded``, or ``Timing`` for the first pass.
    Counts lines and unreadable lines in ``stats``."""
    number = 0
    skipped = 0
    parse = parser.timing if first_pass else parser.request
    for path in paths:
        with open_log(path) as f:
            for raw in f:
                number += 1
                line = raw.rstrip("\n")
                if not line:
                    continue
                request = parse(line, number)
                if request is None:
                    skipped += 1
                    continue
                yield request
    if stats is not None:
        stats["lines"] = number
        stats["skipped"] = skipped


@dataclass(slots=True)
class Timing:
    """What the replay's first pass reads of a line: its tries and its time."""

    time: float
    second_only: bool
    request_time: float | None
    tries: list[tuple[str, int, float | None]]


def to_timing(fields: dict[str, str], _line: int) -> Timing | None:
    if "request" not in fields and "request_uri" not in fields and "uri" not in fields:
        return None
    when, second_only = _time_of(fields)
    return Timing(
        when,
        second_only,
        _number(fields.get("request_time")),
        parse_tries(
            fields.get("upstream_addr"), fields.get("upstream_status"), fields.get("upstream_response_time")
        ),
    )
