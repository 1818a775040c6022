"""A request and an upstream made up outside the proxy, for running hooks offline.

``scriptlb hook run``, the test kit (``scriptlb.testing``) and the replay (``scriptlb.replay``)
hand these to the same ``HookRunner``/``LogHookRunner`` the proxy uses: ``SyntheticExchange``
has the attributes the hook API and the variables read from the proxy's ``Exchange``
(docs/architecture.md, "Request/exchange"); ``SyntheticUpstream`` is an upstream's peers.
"""

from __future__ import annotations

import time
from typing import Any

from scriptlb.config.model import PeerAddr, UpstreamConf, UpstreamServerConf
from scriptlb.request.headers_filter import request_header
from scriptlb.state.peers import PeerSet


class TryRecord:
    """One try, for the ``$upstream_*`` lists: the proxy's record, with the same fields."""

    __slots__ = ("addr", "bytes_received", "bytes_sent", "connect_time", "header_time", "response_length",
                 "response_time", "started", "status")

    def __init__(
        self, addr: str, started: float, status: int | None = None, response_time: float | None = None
    ) -> None:
        self.addr = addr
        self.started = started
        self.status = status
        self.connect_time: float | None = None
        self.header_time: float | None = None
        self.response_time = response_time
        self.bytes_sent = self.bytes_received = self.response_length = 0


class SyntheticExchange:
    """The exchange attributes hooks and variables read, for one made-up request."""

    __slots__ = (
        "args",
        "body_bytes_sent",
        "bytes_sent",
        "conn_id",
        "conn_requests",
        "connect_timeout",
        "ctx",
        "headers",
        "host",
        "http_version",
        "last_failure",
        "location",
        "method",
        "proxy_host",
        "read_timeout",
        "remote_addr",
        "remote_port",
        "request_length",
        "request_uri",
        "response_headers",
        "scheme",
        "send_timeout",
        "server_addr",
        "server_name",
        "server_port",
        "start_time",
        "status",
        "tries",
        "tries_cap",
        "tries_left",
        "upstream_headers",
        "upstream_name",
        "uri",
    )

    def __init__(
        self,
        method: str = "GET",
        target: str = "/",
        headers: list[tuple[bytes, bytes]] | None = None,
        peers: int = 1,
        last_failure: tuple[str, int] | None = None,
        tries_cap: int = 0,
        remote_addr: str = "127.0.0.1",
        start_time: float | None = None,
        upstream_name: str = "backend",
    ) -> None:
        self.method = method
        self.request_uri = target
        path, sep, query = target.partition("?")
        self.uri = path or "/"
        self.args = query if sep else None
        self.http_version = "1.1"
        self.headers = headers if headers is not None else []
        self.remote_addr, self.remote_port = remote_addr, 40000
        self.server_addr, self.server_port, self.server_name = "127.0.0.1", 80, "localhost"
        self.host = (self.header("host") or "localhost").split(":")[0].lower()
        self.scheme = "http"
        self.start_time = time.time() if start_time is None else start_time
        self.status = self.body_bytes_sent = self.bytes_sent = self.request_length = 0
        self.conn_id, self.conn_requests = 1, 1
        self.upstream_name = upstream_name
        self.upstream_headers: list[tuple[bytes, bytes]] = []
        self.response_headers = b""
        self.proxy_host = upstream_name
        self.ctx: dict[str, Any] = {}
        self.connect_timeout = self.send_timeout = self.read_timeout = 60.0
        self.last_failure = last_failure
        # one earlier try, if it failed (what get_last_failure and set_more_tries count)
        self.tries: list[Any] = [TryRecord("-", self.start_time, last_failure[1])] if last_failure else []
        self.tries_left = max(peers - len(self.tries), 1)
        self.tries_cap = tries_cap
        self.location: Any = None  # a log hook's upstream is its location's (None: no upstream)

    def header(self, name_lower: str) -> str | None:
        """A request header's value (the first; Cookie lines joined with "; " as nginx)."""
        return request_header(self.headers, name_lower)


class SyntheticUpstream:
    """An upstream runtime with ``peers`` (and ``backup`` peers), as the hook API sees it."""

    def __init__(
        self, peers: list[PeerAddr], backup: list[PeerAddr] | None = None, name: str = "backend"
    ) -> None:
        servers = tuple(UpstreamServerConf(name=p.name, addrs=(p,)) for p in peers)
        servers += tuple(UpstreamServerConf(name=p.name, addrs=(p,), backup=True) for p in backup or [])
        self.name = name
        self.conf = UpstreamConf(name=name, servers=servers)
        self.peers = PeerSet.from_conf(self.conf)
        self.stats: Any = None

    def refresh_weights(self) -> None:
        """Weights a hook set apply at once (there is no other worker to tell)."""

