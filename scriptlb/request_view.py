"""What a request offers to the code that reads it: variables, logs and hooks.

The proxy's ``Exchange`` is one implementation; the offline tools have others (the made-up
request of ``scriptlb.replay.synthetic``, the replay's, a stream session for the hook API), and tests
have small doubles. These protocols are the contract they all meet, checked by mypy (and by
tests/test_request_view.py, which type-checks each implementation against them), instead of a
list of attribute names kept in sync by hand.

Members a reader may only find on some implementations (``location``, ``request``, ``conn``,
``sent_head``, the rewrite module's ``variables``/``captures``) are not part of the contract:
readers fetch them with ``getattr`` and a default.

It imports nothing of scriptlb, so every layer may read it (the error log is the lowest that does).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol

Header = tuple[bytes, bytes]  # (name as received, value), in arrival order


class TryView(Protocol):
    """One try of the request, as ``$upstream_*`` and the hook API read it."""

    @property
    def addr(self) -> str: ...  # the peer's address text ("-"/the upstream name: no peer)
    @property
    def status(self) -> int | None: ...  # None: no response
    @property
    def started(self) -> float: ...
    @property
    def connect_time(self) -> float | None: ...
    @property
    def header_time(self) -> float | None: ...
    @property
    def response_time(self) -> float | None: ...


class HookRequest(Protocol):
    """What the hook API and the error log read on any request, an http exchange or a
    stream session (where the http-only fields are empty)."""

    # written by hooks: ngx.ctx (replaced by its Lua-style view on first use) and set_timeouts
    ctx: dict[str, object]
    connect_timeout: float
    send_timeout: float
    read_timeout: float

    @property
    def is_stream(self) -> bool: ...  # a stream session (the protocols below say which)
    @property
    def method(self) -> str: ...
    @property
    def request_uri(self) -> str: ...
    @property
    def http_version(self) -> str: ...
    @property
    def args(self) -> str | None: ...  # the query string (None: no "?")
    @property
    def headers(self) -> Sequence[Header]: ...
    @property
    def remote_addr(self) -> str: ...
    @property
    def server_name(self) -> str: ...
    @property
    def conn_id(self) -> int: ...
    @property
    def start_time(self) -> float: ...
    # the tries loop's state (set_more_tries, get_last_failure)
    @property
    def tries(self) -> Sequence[TryView]: ...
    @property
    def tries_left(self) -> int: ...
    @property
    def tries_cap(self) -> int: ...
    @property
    def last_failure(self) -> tuple[str, int] | None: ...  # (kind, status) of the last try

    def header(self, name_lower: str) -> str | None:
        """A request header's value: the first line's; Cookie lines joined with "; " (nginx)."""


class RequestView(HookRequest, Protocol):
    """An http request as variables, access logs and log hooks read it (``Exchange``)."""

    @property
    def is_stream(self) -> Literal[False]: ...

    @property
    def uri(self) -> str: ...  # decoded and normalized, without the query
    @property
    def host(self) -> str: ...  # $host: the Host header's name, else the server's
    @property
    def scheme(self) -> str: ...
    @property
    def remote_port(self) -> int: ...
    @property
    def server_addr(self) -> str: ...
    @property
    def server_port(self) -> int: ...
    @property
    def conn_requests(self) -> int: ...
    @property
    def request_length(self) -> int: ...
    # the response
    @property
    def status(self) -> int: ...  # 0: none yet
    @property
    def body_bytes_sent(self) -> int: ...
    @property
    def bytes_sent(self) -> int: ...
    @property
    def response_headers(self) -> bytes: ...  # the head sent to the client ($sent_http_*)
    # the upstream side
    @property
    def upstream_name(self) -> str | None: ...
    @property
    def upstream_headers(self) -> Sequence[Header]: ...  # the peer's response headers
    @property
    def proxy_host(self) -> str: ...


class StreamRequest(HookRequest, Protocol):
    """A stream session as the hook API reads it: ``ngx.var`` reads its own variables."""

    @property
    def is_stream(self) -> Literal[True]: ...

    def stream_variable(self, name: str) -> str | None: ...


HookedRequest = RequestView | StreamRequest  # what a hook runs for

