"""Which recorded requests the replayed upstream would have served: the config's own server
selection (by Host) and location matching (by URI), as a worker routes a request.

A log may hold requests of every location of a server; only those whose location proxies to
the replayed upstream are replayed (the others are counted). Requests are routed on the
listening socket of the first location proxying to that upstream.
"""

from __future__ import annotations

from scriptlb.config.model import MainConf, ServerConf
from scriptlb.routing.locations import LocationMatcher, ServerSelector, normalize_host
from scriptlb.routing.uri import normalize_uri

_CACHE_MAX = 4096  # (host, path) answers kept: the same few come again and again


class Router:
    """``serves(host, target)``: does the replayed upstream serve this request?"""

    def __init__(self, conf: MainConf, upstream: str) -> None:
        http = conf.http
        assert http is not None
        self.upstream = upstream
        home = next((s for s in http.servers for loc in s.locations
                     if loc.proxy_pass is not None and loc.proxy_pass.upstream == upstream), None)
        self._selector: ServerSelector | None = None
        self._matchers: dict[int, LocationMatcher] = {}
        if home is not None and home.listens:
            self._selector = ServerSelector.for_listen(list(http.servers), home.listens[0].key)
        self._home = home
        self._cache: dict[tuple[str | None, str], bool] = {}
        # one server with one location: every request is the upstream's (the usual config)
        self.everything = (
            home is not None and len(http.servers) == 1 and len(home.locations) == 1
            and home.locations[0].modifier == "" and home.locations[0].pattern == "/"
        )

    def serves(self, host: str | None, target: str) -> bool:
        path = target.partition("?")[0]
        key = (host, path)
        found = self._cache.get(key)
        if found is None:
            found = self._route(host, path)
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()
            self._cache[key] = found
        return found

    def _route(self, host: str | None, path: str) -> bool:
        if self._home is None:
            return True  # no location proxies to it (a config being built): replay everything
        if not path.startswith("/"):
            scheme_end = path.find("://")
            slash = path.find("/", scheme_end + 3) if scheme_end > 0 else -1
            path = path[slash:] if slash != -1 else "/"
        uri = normalize_uri(path)
        if uri is None:
            return False  # nginx answers 400: no try
        server = self._server(host)
        matcher = self._matchers.get(id(server))
        if matcher is None:
            matcher = self._matchers[id(server)] = LocationMatcher(server.locations)
        location = matcher.match(uri)
        return (location is not None and location.return_ is None and location.proxy_pass is not None
                and location.proxy_pass.upstream == self.upstream)

    def _server(self, host: str | None) -> ServerConf:
        assert self._home is not None
        if self._selector is None:
            return self._home
        name = normalize_host(host) if host else None
        return self._selector.select(name)
