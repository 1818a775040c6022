"""``limit_rate`` / ``limit_rate_after`` / ``proxy_limit_rate`` on a proxied response's body.

nginx's budget (ngx_http_write_filter, ngx_event_pipe): ``rate * (seconds since the start + 1)``
bytes, less what was sent (past ``limit_rate_after`` for limit_rate). The body the peer sends is
held here while the budget is spent, and the peer is not read meanwhile (so proxy_limit_rate,
which nginx applies to reading, holds the peer back the same way). The request pays for this
only when a rate applies to it (``ResponseRate.for_exchange``, at the response's head).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from scriptlb.config.units import parse_size


def effective_limit_rate(exchange: Any) -> int:
    """``$limit_rate``: a ``set $limit_rate`` value, else the location's limit_rate."""
    values = getattr(exchange, "variables", None)  # (unset until a `set`)
    if values:
        value = values.get("limit_rate")
        if value is not None:
            return int(value)
    return int(exchange.location.conf.limit_rate)


def set_value(text: str) -> str:
    """What ``set $limit_rate TEXT`` stores: the size in bytes, 0 for an invalid one (nginx)."""
    size = parse_size(text)
    return str(size if size is not None else 0)


def _allowance(rate: int, elapsed: float, counted: int) -> float:
    return rate * (elapsed + 1) - counted if rate else float("inf")


def _wait(rate: int, elapsed: float, counted: int) -> float:
    """Seconds until the budget of ``rate`` covers ``counted`` bytes again."""
    return max(counted / rate - 1 - elapsed, 0.0) + 0.001 if rate else 0.0


class ResponseRate:
    """The body of one response, sent to the client within its rates."""

    __slots__ = (
        "_after",
        "_client",
        "_loop",
        "_owner",
        "_peer_rate",
        "_pending",
        "_rate",
        "_sent",
        "_started",
        "_timer",
        "then",
    )
    holds_head = False

    def __init__(self, owner: Any, rate: int, after: int, peer_rate: int) -> None:
        exchange = owner.exchange
        self._owner = owner  # the UpstreamRequest: its connection is paused while bytes wait
        self._client = exchange.conn
        self._loop = exchange.loop
        self._rate, self._after, self._peer_rate = rate, after, peer_rate
        self._started = self._loop.time()
        self._sent = 0
        self._pending: deque[bytes] = deque()
        self._timer: Any = None
        self.then: Callable[[], None] | None = None  # the response's end, once the body is out

    @classmethod
    def for_exchange(cls, owner: Any) -> ResponseRate | None:
        exchange = owner.exchange
        conf = exchange.location.conf
        sets = getattr(exchange, "variables", None)  # (unset until a `set`)
        rate = effective_limit_rate(exchange) if conf.limit_rate or sets else 0
        if not rate and not conf.proxy_limit_rate:
            return None
        return cls(owner, rate, conf.limit_rate_after, conf.proxy_limit_rate)

    @property
    def holding(self) -> bool:
        return bool(self._pending)

    def body(self, data: bytes) -> None:
        self._pending.append(data)
        if self._timer is None:
            self._flush()

    def complete(self, finish: Callable[[], None]) -> None:
        """The peer's body is complete: ``finish`` once the body still held is sent."""
        if self._pending:
            self.then = finish
        else:
            finish()

    def cancel(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
        self._pending.clear()
        self.then = None

    def _budget(self, elapsed: float) -> float:
        limited = max(self._sent - self._after, 0)
        return min(_allowance(self._rate, elapsed, limited), _allowance(self._peer_rate, elapsed, self._sent))

    def _tick(self) -> None:
        try:
            self._flush()
        except Exception as exc:  # (a timer's callback: the request's safety net, not the loop's)
            self._owner.exchange.crashed(exc, "sending to client")

    def _flush(self) -> None:
        self._timer = None
        pending = self._pending
        elapsed = self._loop.time() - self._started
        while pending:
            budget = self._budget(elapsed)
            if budget < 1:
                break
            chunk = pending[0]
            if len(chunk) > budget:
                cut = int(budget)
                pending[0], chunk = chunk[cut:], chunk[:cut]
            else:
                pending.popleft()
            self._sent += len(chunk)
            self._client.send_body(chunk)
        conn = self._owner.connection
        if pending:
            if conn is not None:
                conn.pause_reading()
            limited = max(self._sent - self._after, 0)
            delay = max(_wait(self._rate, elapsed, limited), _wait(self._peer_rate, elapsed, self._sent))
            self._timer = self._loop.call_later(delay, self._tick)
            return
        if conn is not None and not self._client.writing_paused:
            conn.resume_reading()
        then, self.then = self.then, None
        if then is not None:
            then()
