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
        from scriptlb.variables import compile_template_bytes

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
