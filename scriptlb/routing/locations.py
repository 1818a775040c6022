"""nginx's choice of ``server`` (by Host) and of ``location`` (by URI), precomputed per config.

Location order (ngx_http_core_find_location):
  1. an exact ``= /uri`` location equal to the URI wins at once;
  2. otherwise the longest matching prefix location is remembered; if it is ``^~``, it wins;
  3. otherwise regex locations (``~`` case-sensitive, ``~*`` case-insensitive) are tried in
     declaration order, the first match wins;
  4. otherwise the remembered longest prefix wins (or nothing: the server answers 404).
  Nested locations (ngx_http_core_find_location, recursively): when the chosen prefix location
  has locations inside, they are searched the same way; an exact or regex match inside wins, a
  prefix match inside replaces the outer prefix, and the outer level's regexes are tried next
  (unless the outer prefix was ``^~``); a regex location that matches has its inner locations
  searched too.
  Besides, a URI that lacks only the trailing slash of a location that proxies (``location /dir/
  { proxy_pass ...; }`` and ``GET /dir``) gets nginx's automatic 301 to ``/dir/`` (args kept),
  unless an exact or prefix location equals the URI itself. ``match`` returns a precomputed
  location whose ``return_`` is that redirect, so the caller needs no special case.

Server order (ngx_http_find_virtual_server), among the servers sharing one listening socket:
  exact name, then the longest ``*.example.com`` (or ``.example.com``) wildcard, then the longest
  ``www.example.*`` wildcard, then ``~regex`` names in order, else the ``default_server``, else
  the first server. The first server to claim a name keeps it (nginx: "conflicting server name").
Prefix and name comparisons are case-sensitive for URIs (nginx on Linux) and done on the
lower-cased host for names.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence
from typing import Generic, TypeVar

from scriptlb.config.model import HttpConf, LocationConf, ReturnConf, ServerConf, Template, Var
from scriptlb.config.regex import compile_nginx_regex
from scriptlb.routing.uri import quote_uri

T = TypeVar("T")

ListenKey = tuple[str | None, int, str | None]  # ListenConf.key

# --------------------------------------------------------------------------- locations


class LocationMatcher:
    """All locations of one server, arranged for matching; built once per config load."""

    __slots__ = ("_exact", "_inner", "_prefix", "_prefix_lengths", "_redirects", "_regexes", "named")

    def __init__(self, locations: Iterable[LocationConf], nested: bool = False) -> None:
        self._exact: dict[str, LocationConf] = {}
        self._prefix: dict[str, LocationConf] = {}
        self._regexes: list[tuple[re.Pattern[str], LocationConf]] = []
        self.named: dict[str, LocationConf] = {}  # "@name" locations: reachable only by name
        self._inner: dict[int, LocationMatcher] = {}  # id(location) -> its nested locations
        for loc in locations:
            if loc.nested == nested:  # (a server's list also holds every nested location)
                self._add(loc)
                if loc.inner:
                    self._inner[id(loc)] = LocationMatcher(loc.inner, nested=True)
        # longest first: checking one dict per distinct length finds the longest prefix
        self._prefix_lengths = sorted({len(p) for p in self._prefix}, reverse=True)
        self._redirects = self._auto_redirects()

    def _add(self, loc: LocationConf) -> None:
        modifier = loc.modifier
        if modifier in ("~", "~*"):
            self._regexes.append((compile_nginx_regex(loc.pattern, modifier == "~*"), loc))
        elif loc.pattern.startswith("@"):
            self.named.setdefault(loc.pattern, loc)
        elif modifier == "=":
            self._exact.setdefault(loc.pattern, loc)
        else:  # "" or "^~"
            self._prefix.setdefault(loc.pattern, loc)

    def _auto_redirects(self) -> dict[str, LocationConf]:
        """URI without its trailing slash -> a location answering nginx's 301 to the slash form."""
        redirects: dict[str, LocationConf] = {}
        for loc in (*self._exact.values(), *self._prefix.values()):
            name = loc.pattern
            if loc.proxy_pass is None or len(name) < 2 or not name.endswith("/"):
                continue
            uri = name[:-1]
            if uri in self._exact or uri in self._prefix or uri in redirects:
                continue  # a location equal to the URI is found first: no redirect
            escaped = quote_uri(name)  # (nginx escapes the URI it redirects to)
            target = Template(
                raw=f"{escaped}$is_args$args", parts=(escaped, Var("is_args"), Var("args")), static=None
            )
            redirects[uri] = dataclasses.replace(
                loc, modifier="=", pattern=uri, proxy_pass=None, return_=ReturnConf(301, target, loc.source)
            )
        return redirects

    def match(self, uri: str) -> LocationConf | None:
        """The location nginx would choose for ``uri`` (the decoded, normalized path)."""
        return self._find(uri)[0]

    def _find(self, uri: str) -> tuple[LocationConf | None, bool]:
        """(location, final): final when an exact, regex or redirect match ended the search
        (nginx's NGX_OK/NGX_DONE); else the longest prefix, if any (NGX_AGAIN/NGX_DECLINED)."""
        exact = self._exact.get(uri)
        if exact is not None:
            return exact, True
        prefix = self._longest_prefix(uri)
        if prefix is None or len(prefix.pattern) != len(uri):
            redirect = self._redirects.get(uri)
            if redirect is not None:
                return redirect, True
        noregex = False
        if prefix is not None:
            noregex = prefix.modifier == "^~"
            inner = self._inner.get(id(prefix)) if self._inner else None
            if inner is not None:
                found, final = inner._find(uri)
                if final:
                    return found, True
                if found is not None:
                    prefix = found
        if not noregex:
            for regex, loc in self._regexes:
                if regex.search(uri) is not None:
                    inner = self._inner.get(id(loc)) if self._inner else None
                    if inner is not None:
                        found = inner._find(uri)[0]
                        if found is not None:
                            return found, True
                    return loc, True
        return prefix, False

    def _longest_prefix(self, uri: str) -> LocationConf | None:
        prefixes = self._prefix
        size = len(uri)
        for length in self._prefix_lengths:
            if length <= size:
                loc = prefixes.get(uri[:length])
                if loc is not None:
                    return loc
        return None

    def __repr__(self) -> str:
        return (
            f"<LocationMatcher exact={len(self._exact)} prefix={len(self._prefix)} "
            f"regex={len(self._regexes)}>"
        )


# --------------------------------------------------------------------------- servers


# the usual Host ("Example.com", "example.com.:8080"): valid, and its name is group 1
_PLAIN_HOST = re.compile(r"([A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)\.?(?::[0-9]*)?")


def normalize_host(raw: str) -> str | None:
    """nginx's ngx_http_validate_host: lower-case, drop the port and one trailing dot.

    Returns None for a host nginx rejects with 400 ("client sent invalid host header"):
    "..", a "/", a space or control character, or nothing left. Statement for statement as
    nginx: the checks run over the whole value, port included; a "[literal]" ends at its "]".
    """
    plain = _PLAIN_HOST.fullmatch(raw)
    if plain is not None:
        return plain.group(1).lower()
    return _validate_host(raw)


def _validate_host(raw: str) -> str | None:
    """The character-by-character state machine, for hosts the fast path does not cover."""
    size = len(raw)
    host_len = size
    dot_pos = size  # nginx starts it past the end, so a leading "." is fine
    state = _USUAL
    for i, ch in enumerate(raw):
        if ch == ".":
            if dot_pos == i - 1:
                return None
            dot_pos = i
        elif ch == ":":
            if state == _USUAL:
                host_len = i
                state = _REST
        elif ch == "[":
            if i == 0:
                state = _LITERAL
        elif ch == "]":
            if state == _LITERAL:
                host_len = i + 1
                state = _REST
        elif ch == "/" or ch <= " " or ch == "\x7f":
            return None  # a path separator, NUL, space or another control character
    if dot_pos == host_len - 1:
        host_len -= 1
    if host_len <= 0:
        return None
    return raw[:host_len].lower()


_USUAL, _LITERAL, _REST = range(3)  # ngx_http_validate_host's states


class HostnameTable(Generic[T]):
    """nginx's combined hostname hash: exact names, ``*.example.com`` / ``.example.com`` head
    wildcards and ``www.example.*`` tail wildcards, looked up in that order, the longest
    wildcard winning; the first value added for a name stays (nginx warns about the rest)."""

    __slots__ = ("_exact", "_head", "_tail")

    def __init__(self) -> None:
        self._exact: dict[str, T] = {}
        self._head: dict[str, T] = {}  # "*.example.com" stored as ".example.com"
        self._tail: dict[str, T] = {}  # "www.example.*" stored as "www.example."

    def __len__(self) -> int:
        return len(self._exact) + len(self._head) + len(self._tail)

    def add(self, name: str, value: T) -> None:
        """``name`` lower-cased already."""
        if name.startswith("*."):
            self._head.setdefault(name[1:], value)
        elif name.startswith("."):
            # nginx: ".example.com" is both "example.com" and "*.example.com"
            self._exact.setdefault(name[1:], value)
            self._head.setdefault(name, value)
        elif name.endswith(".*"):
            self._tail.setdefault(name[:-1], value)
        else:
            self._exact.setdefault(name, value)

    def exact(self, host: str) -> T | None:
        return self._exact.get(host)

    def find(self, host: str) -> T | None:
        """The value for ``host`` (lower-case): exact, longest head, longest tail, or None."""
        value = self._exact.get(host)
        if value is not None:
            return value
        value = self._match_head(host)
        return value if value is not None else self._match_tail(host)

    def _match_head(self, host: str) -> T | None:
        """Longest "*.suffix": try each dot of the host from the left."""
        if not self._head:
            return None
        dot = host.find(".")
        while dot != -1:
            value = self._head.get(host[dot:])
            if value is not None:
                return value
            dot = host.find(".", dot + 1)
        return None

    def _match_tail(self, host: str) -> T | None:
        """Longest "prefix.*": try each dot of the host from the right (a tail must remain)."""
        if not self._tail:
            return None
        dot = host.rfind(".")
        while dot > 0:
            value = self._tail.get(host[: dot + 1])
            if value is not None:
                return value
            dot = host.rfind(".", 0, dot)
        return None


def is_hostname_wildcard(name: str) -> bool:
    return name.startswith(("*.", ".")) or name.endswith(".*")


class ServerSelector:
    """The virtual servers of one listening socket, selected by the request's host."""

    __slots__ = ("_names", "_regexes", "default")

    def __init__(self, servers: Sequence[ServerConf], default: ServerConf | None = None) -> None:
        if not servers:
            raise ValueError("a listening socket needs at least one server")
        self.default = default if default is not None else servers[0]
        self._names: HostnameTable[ServerConf] = HostnameTable()
        self._regexes: list[tuple[re.Pattern[str], ServerConf]] = []
        for server in servers:
            for name in server.server_names:
                self._add(name, server)

    def _add(self, name: str, server: ServerConf) -> None:
        if name.startswith("~"):
            pattern = name[1:]
            # nginx compiles a server_name regex caselessly when it has an upper-case letter
            caseless = any("A" <= ch <= "Z" for ch in pattern)
            self._regexes.append((compile_nginx_regex(pattern, caseless), server))
            return
        self._names.add(name.lower(), server)

    @classmethod
    def for_listen(cls, servers: Sequence[ServerConf], key: ListenKey) -> ServerSelector:
        """The selector for one listening socket: its servers in order, its default_server."""
        on_key = [s for s in servers if any(listen.key == key for listen in s.listens)]
        default = next(
            (s for s in on_key if any(lc.key == key and lc.default_server for lc in s.listens)), None
        )
        return cls(on_key, default)

    def select(self, host: str | None) -> ServerConf:
        """``host`` already normalized (see ``normalize_host``); None/"" when there is none."""
        if not host:
            server = self._names.exact("")
            return server if server is not None else self.default
        server = self._names.find(host)
        if server is not None:
            return server
        for regex, candidate in self._regexes:
            if regex.search(host) is not None:
                return candidate
        return self.default

    def __repr__(self) -> str:
        names = len(self._names) + len(self._regexes)
        return f"<ServerSelector names={names} default={self.default.server_names}>"


def selectors_by_listen(http: HttpConf) -> dict[ListenKey, ServerSelector]:
    """One ServerSelector per listening socket of the http block."""
    keys = dict.fromkeys(listen.key for server in http.servers for listen in server.listens)
    return {key: ServerSelector.for_listen(http.servers, key) for key in keys}
