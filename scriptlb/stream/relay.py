"""Moving bytes between the two sides of a stream session: read gates and rate limits.

Pure bookkeeping kept apart from the protocols: why a side's reading is paused (the other
side's write buffer is full, a rate limit, preread), and nginx's ``limit_rate`` arithmetic.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

# reasons a side does not read (bit flags: reading resumes when none is left)
PEER_FULL = 1  # the other side's write buffer passed proxy_buffer_size
RATE = 2  # proxy_upload_rate / proxy_download_rate: wait for the budget to refill
WAITING = 4  # no upstream connection yet: what was read is held, at most proxy_buffer_size


class ReadGate:
    """Pauses a transport's reading while any reason holds, resumes it when none does."""

    __slots__ = ("reasons", "transport")

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.reasons = 0

    def close(self, reason: int) -> None:
        if not self.reasons:
            try:
                self.transport.pause_reading()
            except (AttributeError, RuntimeError):
                pass  # closing already
        self.reasons |= reason

    def open(self, reason: int) -> None:
        if not self.reasons & reason:
            return
        self.reasons &= ~reason
        if not self.reasons:
            try:
                self.transport.resume_reading()
            except (AttributeError, RuntimeError):
                pass


def rate_budget(rate: int, start_sec: int, passed: int, now: float) -> int:
    """nginx's limit_rate for a stream direction (ngx_stream_proxy_process): ``rate`` bytes per
    whole second since the session's start second, plus one second's worth, less what passed."""
    return rate * (int(now) - start_sec + 1) - passed


class RatedFlow:
    """One direction of a session under ``proxy_upload_rate`` / ``proxy_download_rate``, as
    nginx reads it: at most the budget at a time (the rest is held and the source's reading
    paused), then a pause of ``n / rate`` seconds after passing ``n`` bytes, and while the budget
    is spent a wait for the next whole second that refills it."""

    __slots__ = ("_timer", "after", "clock", "gate", "held", "loop", "passed", "rate", "start_sec", "whole",
                 "write")

    def __init__(self, rate: int, start_sec: int, gate: ReadGate, write: Callable[[bytes], None],
                 loop: Any, clock: Callable[[], float] = time.time) -> None:
        self.rate = rate
        self.start_sec = start_sec
        self.gate = gate
        self.write = write
        self.loop = loop
        self.clock = clock
        self.passed = 0
        self.held: deque[bytes] = deque()
        self._timer: Any = None
        self.after: Callable[[], None] | None = None  # run once what is held has passed (an EOF)
        self.whole = False  # datagrams: a chunk passes whole once the budget is positive (nginx)

    def feed(self, data: bytes) -> None:
        self.held.append(data)
        if self._timer is None:
            self._pump()

    def _pump(self) -> None:
        self._timer = None
        while self.held:
            now = self.clock()
            limit = rate_budget(self.rate, self.start_sec, self.passed, now)
            if limit <= 0:
                # the budget grows only when a second begins (nginx's ngx_time())
                self._wait(max(-limit / self.rate, int(now) + 1 - now) + 0.001)
                return
            chunk = self.held.popleft()
            if len(chunk) > limit and not self.whole:
                self.held.appendleft(chunk[limit:])
                chunk = chunk[:limit]
            self.passed += len(chunk)
            self.write(chunk)
            delay = len(chunk) / self.rate
            if delay >= 0.001:
                self._wait(delay)
                return
        self.gate.open(RATE)
        after, self.after = self.after, None
        if after is not None:
            after()

    def _wait(self, delay: float) -> None:
        self.gate.close(RATE)
        self._timer = self.loop.call_later(delay, self._pump)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.held.clear()
        self.after = None
