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

from scriptlb.config.model import LocationConf
from scriptlb.http.responses import http_date
from scriptlb.routing.uri import quote_uri

# nginx's built-in `types` (used when no mime.types is included) and its default_type
_TYPES = {".html": b"text/html", ".gif": b"image/gif", ".jpg": b"image/jpeg"}
_DEFAULT_TYPE = b"text/plain"
# files larger than this are refused (500) rather than read into memory at once
MAX_FILE = 64 * 1024 * 1024


class StaticFiles:
    """``content(exchange)`` for one location: its root and index files, from the config."""

    __slots__ = ("alias", "index", "prefix", "root", "ssi")

    def __init__(self, conf: LocationConf) -> None:
        self.root = conf.root.rstrip("/") or "/"
        self.index = conf.index
        # alias: the location's prefix is replaced by the alias path (a regex location's
        # alias names the file itself)
        self.alias = conf.alias
        self.prefix = conf.alias_prefix
        self.ssi = conf.ssi  # ssi on: files of its types run their SSI commands

    def __call__(self, exchange: Any) -> None:
        method = exchange.method
        if method not in ("GET", "HEAD"):
            exchange.finish_with_page(405)
            return
        uri = exchange.uri
        alias = self.alias
        if alias is None:
            path = self.root + uri
        elif self.prefix < 0:
            path = alias
        else:
            path = alias + uri[self.prefix:]
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

    def serve(self, exchange: Any, path: str) -> None:
        """A file (or directory: its redirect) try_files found at ``path``."""
        self._file(exchange, path, exchange.uri)

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
            args = exchange.args
            location = quote_uri(uri) + "/" + (f"?{args}" if args else "")
            target = exchange.absolute_location(location.encode("latin-1", "replace"))
            exchange.finish_with_page(301, b"Location: " + target + b"\r\n")
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
        ssi = self.ssi
        if ssi is not None and exchange.method == "GET":
            from scriptlb.request.ssi import applies

            if applies(ssi, content_type):
                self._ssi(exchange, ssi, body, content_type, info)
                return
        headers = (
            b"Content-Type: " + content_type + b"\r\n"
            + b"Last-Modified: " + http_date(info.st_mtime).encode("ascii") + b"\r\n"
            + b'ETag: "%x-%x"\r\n' % (int(info.st_mtime), info.st_size)
            + b"Accept-Ranges: bytes\r\n"
        )
        exchange.respond(200, headers, body)

    def _ssi(self, exchange: Any, ssi: Any, body: bytes, content_type: bytes, info: os.stat_result) -> None:
        """The file's SSI commands run, then the output is the response (no ETag, no ranges;
        Last-Modified only with ssi_last_modified, as nginx)."""
        from scriptlb.request.exchange import Waiting
        from scriptlb.request.ssi import SsiRun, parse

        headers = b"Content-Type: " + content_type + b"\r\n"
        if ssi.last_modified:
            headers += b"Last-Modified: " + http_date(info.st_mtime).encode("ascii") + b"\r\n"

        def done(output: bytes) -> None:
            exchange.upstream_request = None
            if not exchange.conn.closed:
                exchange.respond(200, headers, output)

        run = SsiRun(exchange, ssi, parse(body), done)
        exchange.upstream_request = Waiting(run)  # (the client going away cancels the run)
        run.start()


class TryFiles:
    """``try_files``: ``check(exchange) -> answered``. The first name that exists as a file (as
    a directory for a name written with a trailing "/") becomes the URI and is served by the
    location's static handler (a proxying location proxies the new URI: False); when none
    does, the last argument answers (``=code``) or takes the request elsewhere (a URI, @name).
    """

    __slots__ = ("alias", "conf", "files", "prefix", "root", "static", "target")

    def __init__(self, conf: LocationConf, static: Any) -> None:
        from scriptlb.variables.evaluate import compile_template

        tries = conf.try_files
        assert tries is not None
        self.conf = tries
        self.files = tuple((compile_template(name), test_dir) for name, test_dir in tries.files)
        self.target = compile_template(tries.fallback) if tries.fallback is not None else None
        self.root = conf.root.rstrip("/")
        self.alias = conf.alias.rstrip("/") if conf.alias is not None else None
        self.prefix = conf.alias_prefix
        self.static = static if isinstance(static, StaticFiles) else None

    def __call__(self, exchange: Any) -> bool:
        for render, test_dir in self.files:
            name = render(exchange)
            found = self._lookup(exchange, name, test_dir)
            if found is not None:
                path, uri = found
                exchange.set_uri(uri, exchange.args)
                if self.static is None:
                    return False
                self.static.serve(exchange, path)
                return True
        if self.target is None:
            exchange.finish_with_page(self.conf.code)
        else:
            exchange.internal_redirect(self.target(exchange))
        return True

    def _lookup(self, exchange: Any, name: str, test_dir: bool) -> tuple[str, str] | None:
        """(path, new URI) when ``name`` exists as asked, else None."""
        if "/.." in name or not name.startswith("/"):
            return None  # (never outside the root, whatever a variable brought in)
        alias, prefix, uri = self.alias, self.prefix, name
        if alias is None:
            path = self.root + name
        elif prefix < 0:
            path = alias + name
        else:
            if name[:prefix] == exchange.uri[:prefix]:
                name = name[prefix:]
                uri = exchange.uri[:prefix] + name
            path = alias + ("/" if name[:1] != "/" else "") + name
        try:
            info = os.stat(path)
        except (OSError, ValueError):
            return None
        if stat.S_ISDIR(info.st_mode) != test_dir:
            return None
        return path, uri
