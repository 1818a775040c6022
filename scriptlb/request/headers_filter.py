"""``add_header`` (ngx_http_headers_module): extra response header lines, compiled at load.

A location's list is the innermost level's that has one (nginx's merge: a level's add_header
lines replace the inherited ones). A line is added to responses whose status is one of
``_STATUSES``, or to every response with ``always``; a value that renders empty adds nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from scriptlb.config.model import AddHeaderConf

# nginx: 200, 201, 204, 206, 301, 302, 303, 304, 307 and 308 get the headers without `always`
_STATUSES = frozenset((200, 201, 204, 206, 301, 302, 303, 304, 307, 308))


class AddHeaders:
    """``lines(exchange, status) -> bytes``: the ``Name: value\\r\\n`` lines to add."""

    __slots__ = ("_headers",)

    def __init__(self, confs: tuple[AddHeaderConf, ...]) -> None:
        from scriptlb.variables.evaluate import compile_template_bytes

        self._headers: tuple[tuple[bytes, Callable[[Any], bytes], bool], ...] = tuple(
            (conf.name.encode("latin-1") + b": ", compile_template_bytes(conf.value), conf.always)
            for conf in confs
        )

    def lines(self, exchange: Any, status: int) -> bytes:
        usual = status in _STATUSES
        out = []
        for prefix, render, always in self._headers:
            if always or usual:
                value = render(exchange)
                if value:
                    out.append(prefix + value + b"\r\n")
        return b"".join(out)


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
