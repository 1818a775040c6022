"""``error_page`` and ``proxy_intercept_errors``: what an error status turns into.

``error_page code ... [=[response]] uri``: a request that ends with one of the codes (nginx's
own page: 404, 502, 504...; or, with ``proxy_intercept_errors on``, a peer's response of 300
or more) is redirected internally to ``uri`` (another location; ``@name`` a named one) and
answered from there with the original code, ``=response``'s, or (a bare ``=``) whatever the
redirect gives. A URI starting with http:// or https:// is an external redirect (302, or the
``=`` code if it is a redirect code). One redirect per request, as nginx without
``recursive_error_pages``. Parsed and compiled at load; this module decides, the Exchange acts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from scriptlb.config.model import ErrorPageConf

_REDIRECT_CODES = (301, 302, 303, 307, 308)


class ErrorPage:
    """One status's target: ``uri(exchange) -> str`` and the answer's status rule."""

    __slots__ = ("response", "uri")

    def __init__(self, response: int | None, uri: Callable[[Any], str]) -> None:
        self.response = response  # None: the original code; 0: the redirect's own; else this code
        self.uri = uri

    def external(self, uri: str) -> int:
        """The status of an external redirect to ``uri`` (0: an internal one)."""
        if not uri.startswith(("http://", "https://")):
            return 0
        return self.response if self.response in _REDIRECT_CODES else 302


def error_pages(confs: tuple[ErrorPageConf, ...]) -> dict[int, ErrorPage]:
    """status -> ErrorPage; the first error_page naming a code wins, as nginx's lookup."""
    from scriptlb.variables.evaluate import compile_template

    pages: dict[int, ErrorPage] = {}
    for conf in confs:
        page = ErrorPage(conf.response, compile_template(conf.uri))
        for code in conf.codes:
            pages.setdefault(code, page)
    return pages


def split_uri(uri: str) -> tuple[str, str | None]:
    """An internal redirect's path and arguments."""
    path, sep, args = uri.partition("?")
    return path, (args if sep else None)
