"""The static content handler: a location without proxy_pass, return or another content handler
answers from the files under its ``root`` (ngx_http_static_module + ngx_http_index_module).

GET and HEAD only (405 otherwise, as nginx); a URI ending in "/" is answered by the first
``index`` file that exists (403 when the directory exists and none does: no autoindex), a
directory asked without its "/" is redirected (301) to it. Files are read whole: the static
handler serves test fixtures, error pages and small assets beside a load balancer, not bulk
downloads.
"""

from __future__ import annotations

import os
import stat
from typing import Any

from scriptlb.http.responses import http_date

# nginx's built-in `types` (used when no mime.types is included) and its default_type
_TYPES = {".html": b"text/html", ".gif": b"image/gif", ".jpg": b"image/jpeg"}
_DEFAULT_TYPE = b"text/plain"
# files larger than this are refused (500) rather than read into memory at once
MAX_FILE = 64 * 1024 * 1024


class StaticFiles:
    """``content(exchange)`` for one location: its root and index files, from the config."""

    __slots__ = ("index", "root")

    def __init__(self, root: str, index: tuple[str, ...]) -> None:
        self.root = root.rstrip("/") or "/"
        self.index = index

    def __call__(self, exchange: Any) -> None:
        method = exchange.method
        if method not in ("GET", "HEAD"):
            exchange.finish_with_page(405)
            return
        uri = exchange.uri
        path = self.root + uri
        if uri.endswith("/"):
            self._index(exchange, path)
            return
        self._file(exchange, path, uri)

    def _index(self, exchange: Any, directory: str) -> None:
        for name in self.index:
            path = directory + name
            if os.path.isfile(path):
                self._file(exchange, path, exchange.uri + name)
                return
        exchange.finish_with_page(403 if os.path.isdir(directory) else 404)

    def _file(self, exchange: Any, path: str, uri: str) -> None:
        try:
            info = os.stat(path)
        except FileNotFoundError:
            exchange.finish_with_page(404)
            return
        except NotADirectoryError:
            exchange.finish_with_page(404)
            return
        except PermissionError:
            exchange.finish_with_page(403)
            return
        if stat.S_ISDIR(info.st_mode):
            location = f"http://{exchange.host}:{exchange.server_port}{uri}/"
            exchange.finish_with_page(301, f"Location: {location}\r\n".encode("latin-1"))
            return
        if info.st_size > MAX_FILE:
            exchange.finish_with_page(500)
            return
        try:
            with open(path, "rb") as f:
                body = f.read()
        except OSError:
            exchange.finish_with_page(403)
            return
        content_type = _TYPES.get(os.path.splitext(path)[1], _DEFAULT_TYPE)
        headers = (
            b"Content-Type: " + content_type + b"\r\n"
            + b"Last-Modified: " + http_date(info.st_mtime).encode("ascii") + b"\r\n"
            + b'ETag: "%x-%x"\r\n' % (int(info.st_mtime), info.st_size)
            + b"Accept-Ranges: bytes\r\n"
        )
        exchange.respond(200, headers, body)
