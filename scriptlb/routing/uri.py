"""URI helpers of the request path: nginx's URI normalization, request-target splitting, the
re-escaping of a rewritten URI for the peer, and ``bind_to_local_addr``'s address text.

Pure functions on strings; runtime (the upstream request template) and the exchange both use
them, so they live below both.
"""

from __future__ import annotations

import re
from urllib.parse import quote, unquote

_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")


def normalize_uri(path: str) -> str | None:
    """nginx's ngx_http_parse_complex_uri: decode %XX, merge slashes, resolve ``.``/``..``.

    None when the path escapes the root (nginx answers 400).
    """
    if "%" in path:
        if _BAD_ESCAPE.search(path):
            return None  # nginx: "%" not followed by two hex digits is a bad request
        # a byte per character, as nginx: %C3%A9 is two characters, logged \xC3\xA9
        path = unquote(path, encoding="latin-1")
        if "\x00" in path:
            return None  # nginx: a decoded NUL is a bad request
    if "//" not in path and "/." not in path:
        return path
    trailing = path.endswith("/") or path.endswith("/.") or path.endswith("/..")
    segments: list[str] = []
    for segment in path.split("/"):
        if not segment or segment == ".":
            continue
        if segment == "..":
            if not segments:
                return None
            segments.pop()
        else:
            segments.append(segment)
    result = "/" + "/".join(segments)
    if trailing and result != "/":
        result += "/"
    return result


def unsafe_uri_split(uri: str) -> tuple[str, str | None] | None:
    """ngx_http_parse_unsafe_uri (X-Accel-Redirect's value): (path decoded, args), None when
    the path could leave the tree ("..", "/../", a NUL) or is empty."""
    if not uri or uri.startswith("?"):
        return None
    path, sep, args = uri.partition("?")
    if "%" in path:
        path = unquote(path, encoding="latin-1")
    if "\x00" in path or path == ".." or path.startswith("../") or "/../" in path or path.endswith("/.."):
        return None
    return path, (args if sep else None)


def split_target(target: bytes) -> tuple[str, str | None] | None:
    """``/p?a=1`` -> ("/p", "a=1"); absolute-form targets lose scheme and host, and a
    ``#fragment`` is dropped (nginx ends the URI there). None: invalid."""
    text = target.decode("latin-1")
    if "#" in text:
        text = text.partition("#")[0]
    if not text.startswith("/"):
        scheme_end = text.find("://")
        if scheme_end <= 0:
            return None
        rest = text[scheme_end + 3:]
        start = min((i for i in (rest.find("/"), rest.find("?")) if i != -1), default=-1)
        text = "/" if start == -1 else rest[start:]
        if text.startswith("?"):
            text = "/" + text
    path, sep, args = text.partition("?")
    return path, (args if sep else None)


# what nginx's request-line parser lets through as an absolute URI's host[:port] (an IPv6 or
# IPvFuture literal in brackets)
_AUTHORITY = re.compile(rb"(?:\[[0-9A-Za-z:.!$&'()*+,;=_~-]+\]|[A-Za-z0-9._-]*)(?::[0-9]*)?")


def absolute_host(target: bytes) -> bytes | None:
    """An absolute-form target's authority (``http://h:1/p`` -> ``h:1``): nginx takes the
    request's host from it rather than from the Host header (RFC 9112 section 3.2.2).
    None: not a host nginx's request-line parser accepts (a 400)."""
    start = target.find(b"://") + 3
    end = len(target)
    for stop in (b"/", b"?"):
        found = target.find(stop, start)
        if found != -1 and found < end:
            end = found
    authority = target[start:end]
    return authority if _AUTHORITY.fullmatch(authority) else None


def quote_uri(uri: str) -> str:
    """Re-escape a decoded URI for the upstream request line (nginx's ngx_escape_uri)."""
    return quote(uri, safe="/:@!$&'()*+,;=-._~", encoding="latin-1", errors="replace")


def split_local_addr(text: str) -> tuple[str, int]:
    """bind_to_local_addr's "ip", "ip:port", "[v6]:port" or "v6" -> (host, port)."""
    if text.startswith("["):
        host, _, port = text[1:].partition("]")
        return host, int(port.lstrip(":") or 0)
    if text.count(":") == 1:
        host, _, port = text.partition(":")
        return host, int(port)
    return text, 0
