"""The safety net under every protocol callback: a bug must never leave a request hanging or
print a traceback.

The request path's entry points (the exchange's calls from the client connection, the upstream
connection's asyncio callbacks and timers, the connect callback) catch what escapes them and
hand it here: one nginx-style ``[alert]`` line with the request's context, and a counter that
says how often it happened (``callback_errors``; tests and, later, the metrics read it). The
caller then finishes the request (502 if nothing was sent, else the client connection is
closed) and cleans its connections up.

Anything that escapes even that (or a callback outside the request path) reaches the loop's
exception handler, which the worker points at ``loop_error``: the same alert, no traceback.
"""

from __future__ import annotations

import asyncio
import os
import re
import traceback
from typing import Any

from scriptlb.logs import errorlog


class Counters:
    """Per-worker counts of what the safety net caught."""

    __slots__ = ("callback_errors", "loop_errors")

    def __init__(self) -> None:
        self.callback_errors = 0  # exceptions escaping a request's callbacks
        self.loop_errors = 0  # ... and ones only the loop's exception handler saw


COUNTERS = Counters()

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def describe(exc: BaseException) -> str:
    """``ZeroDivisionError: division by zero at scriptlb/request/proxy.py:123`` (the innermost frame:
    where to look, without a multi-line traceback in the error log)."""
    # one line, bounded, printable: the text may carry bytes a peer or client sent
    detail = str(exc)[:200].encode("ascii", "backslashreplace").decode("ascii")
    detail = _CONTROL.sub(lambda c: f"\\x{ord(c.group()):02x}", detail)
    text = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
    frames = traceback.extract_tb(exc.__traceback__) if exc.__traceback__ is not None else []
    if frames:
        last = frames[-1]
        text += f" at {_short_path(last.filename)}:{last.lineno}"
    return text


def _short_path(path: str) -> str:
    parts = path.split(os.sep)
    return os.sep.join(parts[-2:])


def report(exc: BaseException, where: str, exchange: Any = None, peer_name: str | None = None) -> None:
    """Count and log one exception that escaped a request's callback ``where``."""
    COUNTERS.callback_errors += 1
    message = f"unexpected {describe(exc)} in {where}"
    if exchange is None:
        errorlog.log_error("alert", message)
        return
    try:
        context = exchange.log_context(peer_name)
    except Exception:  # the context itself may be what is broken
        context = ""
    errorlog.log_error("alert", message, exchange.conn_id, context)


def loop_error(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    """The worker loop's exception handler: an alert line instead of a traceback on stderr."""
    COUNTERS.loop_errors += 1
    exc = context.get("exception")
    message = context.get("message") or "unhandled exception in event loop"
    if exc is not None:
        message = f"{message}: {describe(exc)}"
    errorlog.log_error("alert", message)
