"""``add_header`` (ngx_http_headers_module): extra response header lines, compiled at load.

A location's list is the innermost level's that has one (nginx's merge: a level's add_header
lines replace the inherited ones). A line is added to responses whose status is one of
``_STATUSES``, or to every response with ``always``; a value that renders empty adds nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from email.utils import formatdate, parsedate_to_datetime
from typing import Any

from scriptlb.config.model import AddHeaderConf, ExpiresConf

# nginx: 200, 201, 204, 206, 301, 302, 303, 304, 307 and 308 get the headers without `always`
_STATUSES = frozenset((200, 201, 204, 206, 301, 302, 303, 304, 307, 308))


class AddHeaders:
    """``lines(exchange, status, headers) -> bytes``: the ``Name: value\r\n`` lines to add to
    ``headers``."""

    __slots__ = ("_always", "_headers", "_sees_sent", "_sent")

    def __init__(self, confs: tuple[AddHeaderConf, ...], trailers: bool = False) -> None:
        from scriptlb.variables.evaluate import compile_template_bytes

        self._headers: tuple[tuple[bytes, Callable[[Any], bytes], bool], ...] = tuple(
            (conf.name.encode("latin-1") + b": ", compile_template_bytes(conf.value), conf.always)
            for conf in confs
        )
        # a value reading $sent_http_* ($sent_trailer_*) sees the lines added before it (nginx
        # adds them in order)
        family = "sent_trailer_" if trailers else "sent_http_"
        self._sees_sent = any(name.startswith(family) for conf in confs
                              for name in conf.value.variables)
        self._sent = "sent_trailers" if trailers else "response_headers"  # the exchange's attribute
        self._always = any(conf.always for conf in confs)

    def applies(self, status: int) -> bool:
        """Whether a response of ``status`` gets at least one line."""
        return self._always or status in _STATUSES

    def lines(self, exchange: Any, status: int, headers: bytes = b"") -> bytes:
        usual = status in _STATUSES
        out: list[bytes] = []
        sees_sent = self._sees_sent
        for prefix, render, always in self._headers:
            if always or usual:
                if sees_sent:
                    setattr(exchange, self._sent, headers + b"".join(out))
                value = render(exchange)
                if value:
                    out.append(prefix + value + b"\r\n")
        return b"".join(out)


def response_headers_filter(add: tuple[AddHeaderConf, ...], expires: ExpiresConf | None
                            ) -> Callable[[Any, int, bytes], bytes]:
    """``apply(exchange, status, headers) -> headers``: ``expires``, then ``add_header``'s lines
    (nginx's headers filter order)."""
    adder = AddHeaders(add) if add else None
    if expires is None:
        assert adder is not None
        lines = adder.lines
        return lambda exchange, status, headers: headers + lines(exchange, status, headers)
    set_expires = Expires(expires)

    def apply(exchange: Any, status: int, headers: bytes) -> bytes:
        if status in _STATUSES:
            headers = set_expires(exchange, headers)
        return headers if adder is None else headers + adder.lines(exchange, status, headers)

    return apply


_EPOCH = b"Thu, 01 Jan 1970 00:00:01 GMT"
_MAX = b"Thu, 31 Dec 2037 23:55:55 GMT"
_DAY = 24 * 60 * 60


class Expires:
    """``expires``: the response's Expires and (one) Cache-Control, replacing the ones it had
    (ngx_http_set_expires)."""

    __slots__ = ("conf", "value")

    def __init__(self, conf: ExpiresConf) -> None:
        from scriptlb.variables.evaluate import compile_template

        self.conf = conf
        self.value = compile_template(conf.value) if conf.value is not None else None

    def __call__(self, exchange: Any, headers: bytes) -> bytes:
        kind, seconds = self.conf.kind, self.conf.seconds
        if self.value is not None:
            from scriptlb.config.directives import parse_expires

            parsed = parse_expires(self.value(exchange), kind == "modified")
            if isinstance(parsed, str) or parsed[0] == "off":
                return headers  # (nginx: an invalid value leaves the response alone)
            kind, seconds = parsed
        expires, cache_control = _expiry(kind, seconds, headers)
        kept = [line for line in headers.split(b"\r\n")
                if line and line.partition(b":")[0].strip().lower() not in (b"expires", b"cache-control")]
        kept += [b"Expires: " + expires, b"Cache-Control: " + cache_control]
        return b"\r\n".join(kept) + b"\r\n"


def _expiry(kind: str, seconds: int, headers: bytes) -> tuple[bytes, bytes]:
    """(Expires, Cache-Control) values."""
    if kind == "epoch":
        return _EPOCH, b"no-cache"
    if kind == "max":
        return _MAX, b"max-age=315360000"
    now = int(time.time())
    if seconds == 0 and kind != "daily":
        return _date(now), b"max-age=0"
    if kind == "daily":
        at = _next_time(now, seconds)
        max_age = at - now
    else:
        modified = _last_modified(headers) if kind == "modified" else None
        if modified is None:
            at, max_age = now + seconds, seconds
        else:
            at = modified + seconds
            max_age = at - now
    if seconds < 0 or max_age < 0:
        return _date(at), b"no-cache"
    return _date(at), b"max-age=%d" % max_age


def _date(when: int) -> bytes:
    return formatdate(when, usegmt=True).encode("ascii")


def _next_time(now: int, seconds: int) -> int:
    """ngx_next_time: the next moment (local time) at ``seconds`` past midnight."""
    local = time.localtime(now)
    midnight = time.mktime((local.tm_year, local.tm_mon, local.tm_mday, 0, 0, 0, 0, 0, -1))
    at = int(midnight) + seconds
    return at if at > now else at + _DAY


def _last_modified(headers: bytes) -> int | None:
    for line in headers.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"last-modified":
            try:
                return int(parsedate_to_datetime(value.strip().decode("latin-1")).timestamp())
            except (TypeError, ValueError):
                return None
    return None


# headers scriptlb writes itself: proxy_pass_header cannot bring the peer's back
_OURS = frozenset((b"server", b"date", b"content-length", b"transfer-encoding", b"connection"))


def response_filter(hide: tuple[str, ...], passed: tuple[str, ...]) -> Callable[[bytes, Any], bytes]:
    """``filter(lines, peer_headers) -> lines``: proxy_hide_header drops the named headers of
    the peer's response; proxy_pass_header lets through one nginx hides by default (X-Accel-*)."""
    hidden = frozenset(name.encode("latin-1") for name in hide)
    wanted = frozenset(name.encode("latin-1") for name in passed) - _OURS

    def apply(lines: bytes, peer_headers: Any) -> bytes:
        out = []
        if hidden:
            for line in lines.split(b"\r\n"):
                if line and line.partition(b":")[0].strip().lower() not in hidden:
                    out.append(line + b"\r\n")
        else:
            out.append(lines)
        if wanted:
            present = b"\n" + lines.lower()
            for name, value in peer_headers:
                lower = name.lower()
                if lower in wanted and b"\n" + lower + b":" not in present:
                    out.append(name + b": " + value + b"\r\n")
        return b"".join(out)

    return apply


def with_kept(kept: bytes, headers: bytes, kept_wins: bool) -> bytes:
    """Headers an internal redirect carried, before the final response's own; one Content-Type:
    the carried one (``kept_wins``: a response that has no type of its own in nginx, ``return``
    or a file) or the response's."""
    if not kept:
        return headers
    if kept_wins:
        if b"content-type:" in kept.lower():
            headers = _without(headers, b"content-type")
    elif b"content-type:" in headers.lower():
        kept = _without(kept, b"content-type")
    return kept + headers


def _without(lines: bytes, name: bytes) -> bytes:
    return b"".join(line + b"\r\n" for line in lines.split(b"\r\n")
                    if line and line.partition(b":")[0].strip().lower() != name)


def request_header(headers: list[tuple[bytes, bytes]], name_lower: str) -> str | None:
    """A request header's value as variables and hooks read it: the first line of that name,
    except Cookie, whose lines are joined with "; " (as nginx's $http_cookie)."""
    wanted = name_lower.encode("latin-1")
    found: list[bytes] = []
    for name, value in headers:
        if len(name) == len(wanted) and name.lower() == wanted:
            if wanted != b"cookie":
                return value.decode("latin-1")
            found.append(value)
    return b"; ".join(found).decode("latin-1") if found else None
