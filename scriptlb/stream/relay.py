"""Moving bytes between the two sides of a stream session: read gates and rate limits.

Pure bookkeeping kept apart from the protocols: why a side's reading is paused (the other
side's write buffer is full, a rate limit, preread), and nginx's ``limit_rate`` arithmetic.
"""

from __future__ import annotations

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


def rate_delay(rate: int, started: float, received: int, now: float) -> float:
    """nginx's limit_rate for a stream direction: the budget is ``rate`` bytes per second since
    the session started plus one second's worth; past it, reading waits (seconds, 0 = read on)."""
    if rate <= 0:
        return 0.0
    limit = rate * (now - started + 1) - received
    if limit > 0:
        return 0.0
    return -limit / rate + 0.001
