"""``proxy_store``: a proxied 200 response's body is also written to a file (ngx_http_upstream's
store). ``on`` names the file as the static handler would (root or alias + URI), a string
names it itself (variables allowed). The body goes to a temporary file beside the target,
renamed to it once the peer's response is complete (a reader never sees half a file), and
removed when the response does not complete (the client went away, the peer failed).
``proxy_store_access`` gives the file's permissions.

``body_filters`` builds what a response's body passes through (the store, then
``scriptlb.request.rate``); a location with neither pays nothing.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import Any

from scriptlb.logs import errorlog
from scriptlb.request.rate import ResponseRate


class ResponseStore:
    """One response's body on its way to the file (and on to the client: ``send``)."""

    __slots__ = ("_exchange", "_file", "_next", "_target", "_temp", "mode")
    holds_head = False

    def __init__(self, exchange: Any, target: str, mode: int, next_filter: ResponseRate | None) -> None:
        self._exchange = exchange
        self._target = target
        self._next = next_filter
        self.mode = mode
        directory = os.path.dirname(target) or "."
        os.makedirs(directory, exist_ok=True)  # (nginx creates the path too)
        fd, self._temp = tempfile.mkstemp(prefix=".store-", dir=directory)
        self._file: Any = os.fdopen(fd, "wb")

    @property
    def holding(self) -> bool:
        return self._next is not None and self._next.holding

    def body(self, data: bytes) -> None:
        if self._file is not None:
            try:
                self._file.write(data)
            except OSError as err:
                self._failed(err)
        if self._next is not None:
            self._next.body(data)
        else:
            self._exchange.conn.send_body(data)

    def complete(self, finish: Callable[[], None]) -> None:
        """The peer's body is complete: the file takes its name, then the response ends (after
        what the rate still holds)."""
        file, self._file = self._file, None
        if file is not None:
            try:
                file.close()
                os.chmod(self._temp, self.mode)
                os.replace(self._temp, self._target)
            except OSError as err:
                self._failed(err)
        if self._next is not None:
            self._next.complete(finish)
        else:
            finish()

    def cancel(self) -> None:
        self._discard()
        if self._next is not None:
            self._next.cancel()

    def _discard(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            file.close()
            try:
                os.unlink(self._temp)
            except OSError:
                pass

    def _failed(self, err: OSError) -> None:
        exchange = self._exchange
        errorlog.log_error("crit", f'proxy_store "{self._target}" failed ({err.errno}: {err.strerror})',
                           exchange.conn_id, errorlog.request_context(exchange))
        self._discard()


def store_target(exchange: Any) -> str | None:
    """The file ``proxy_store`` writes for this request, None when there is none."""
    conf = exchange.location.conf
    store = conf.proxy_store
    if store is None:
        return None
    if store.value is not None:
        from scriptlb.variables.evaluate import compile_template

        named: str = compile_template(store.value)(exchange)
        return named or None
    uri: str = exchange.uri
    if conf.alias is None:
        return str(conf.root).rstrip("/") + uri
    return str(conf.alias + uri[conf.alias_prefix:] if conf.alias_prefix >= 0 else conf.alias)


def body_filters(owner: Any, response: Any, headers: bytes) -> Any:
    """What this response's body passes through: SSI (``ssi on`` for its type: the whole of it),
    else proxy_store (a 200 to a GET), then the rates. None: the body goes straight out."""
    exchange = owner.exchange
    conf = exchange.location.conf
    status = response.status
    ssi = conf.ssi
    if ssi is not None and exchange.method == "GET" and not exchange.err_status:
        from scriptlb.request.ssi import SsiBody, applies

        content_type = next((value for name, value in response.headers
                             if name.lower() == b"content-type"), b"")
        if applies(ssi, content_type):
            return SsiBody(owner, ssi, status, headers, response.reason)
    rate = ResponseRate.for_exchange(owner)
    if conf.proxy_store is None or status != 200 or exchange.method != "GET":
        return rate
    target = store_target(exchange)
    if target is None or "/../" in target + "/":
        return rate
    try:
        return ResponseStore(exchange, target, conf.proxy_store.mode, rate)
    except OSError as err:
        errorlog.log_error("crit", f'proxy_store "{target}" failed ({err.errno}: {err.strerror})',
                           exchange.conn_id, errorlog.request_context(exchange))
        return rate
