"""access_log writer (ngx_http_log_module): one rendered line per request, optional buffering.

Each ``access_log`` directive becomes an ``AccessLog``: a compiled ``log_format`` and a
``LogFile``. Several logs naming the same path share one ``LogFile`` when the caller passes a
``files`` dict, as nginx opens each path once.

Buffering (``buffer=SIZE [flush=TIME]``) follows nginx: lines collect in memory and are written
when the next line would not fit, when the oldest buffered line is ``flush`` seconds old (a
timer on the event loop), on ``reopen`` (USR1) and on ``close`` (worker exit). Without a buffer
every line is one ``write`` in append mode, so lines from several workers never interleave.
A failed write is reported to the error log at most once a minute, like nginx.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import Any

from scriptlb.config.model import AccessLogConf
from scriptlb.logs import errorlog
from scriptlb.variables.evaluate import compile_log_format

_STD_STREAMS = {"stdout": 1, "stderr": 2, "/dev/stdout": 1, "/dev/stderr": 2}
_WRITE_ERROR_INTERVAL = 60.0  # nginx: "write() ... failed" at most once a minute per file


class LogFile:
    """One open log destination in append mode, with nginx's optional write buffer."""

    __slots__ = ("_buffer", "_error_time", "_loop", "_timer", "buffer_size", "fd", "flush_interval", "path")

    def __init__(
        self,
        path: str,
        buffer_size: int = 0,
        flush_interval: float = 0.0,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        """Opens the file now; an OSError is the caller's nginx-style ``open() failed``."""
        self.path = path
        self.buffer_size = buffer_size
        self.flush_interval = flush_interval
        self.fd = _STD_STREAMS.get(path, -1)
        if self.fd == -1:
            self.fd = self._open()
        self._buffer = bytearray()
        self._loop = loop
        self._timer: asyncio.TimerHandle | None = None
        self._error_time = -_WRITE_ERROR_INTERVAL

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def write(self, data: bytes) -> None:
        if not self.buffer_size:
            self._write(data)
            return
        if len(self._buffer) + len(data) > self.buffer_size:
            self.flush()
            if len(data) > self.buffer_size:
                self._write(data)  # a line larger than the whole buffer goes out at once
                return
        if not self._buffer:
            self._arm_flush_timer()
        self._buffer += data

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._buffer:
            data = bytes(self._buffer)
            self._buffer.clear()
            self._write(data)

    def reopen(self) -> None:
        """USR1: write what is buffered to the old file, then open the path again."""
        self.flush()
        if self.path in _STD_STREAMS:
            return
        try:
            fd = self._open()
        except OSError as err:
            errorlog.log_error("alert", f'open() "{self.path}" failed {errorlog.os_error_text(err)}')
            return
        old, self.fd = self.fd, fd
        os.close(old)

    def close(self) -> None:
        self.flush()
        if self.fd > 2:
            os.close(self.fd)
        self.fd = -1

    def _arm_flush_timer(self) -> None:
        if not self.flush_interval:
            return
        loop = self._loop
        if loop is None:
            try:
                loop = self._loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # no event loop (tools, tests): the buffer flushes when full or closed
        self._timer = loop.call_later(self.flush_interval, self._on_flush_timer)

    def _on_flush_timer(self) -> None:
        self._timer = None
        self.flush()

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                written = os.write(self.fd, view)
                view = view[written:]
        except OSError as err:
            now = time.monotonic()
            if now - self._error_time >= _WRITE_ERROR_INTERVAL:
                self._error_time = now
                errorlog.log_error("alert", f'write() to "{self.path}" failed {errorlog.os_error_text(err)}')

    def __repr__(self) -> str:
        return f"<LogFile {self.path} fd={self.fd} buffered={len(self._buffer)}/{self.buffer_size}>"


def _encode(line: str) -> bytes:
    """Exchange strings are latin-1 text (a character per byte); anything wider goes as UTF-8."""
    try:
        return line.encode("latin-1")
    except UnicodeEncodeError:
        return line.encode("utf-8", "surrogateescape")


class AccessLog:
    """One ``access_log`` directive: its compiled format and its file."""

    __slots__ = ("_errors", "file", "name", "render")

    def __init__(self, render: Callable[[Any], str], file: LogFile, name: str = "") -> None:
        self.render = render
        self.file = file
        self.name = name  # the log_format's name, for messages
        # a broken format fails on every request: say so once a minute, not once per request
        self._errors = errorlog.RateLimiter(limit=1, interval=_WRITE_ERROR_INTERVAL)

    def write(self, exchange: Any) -> None:
        """Log one finished request (called once per request, in the log phase)."""
        try:
            line = self.render(exchange)
        except (AttributeError, KeyError, TypeError, ValueError) as err:
            # a bug in a variable must not break serving; say which format failed and why
            where = f'access_log "{self.file.path}" format "{self.name}"'
            self._errors.log("alert", where, f"{where} failed: {err!r}")
            return
        self.file.write(_encode(line) + b"\n")

    def flush(self) -> None:
        self.file.flush()

    def reopen(self) -> None:
        self.file.reopen()

    def close(self) -> None:
        self.file.close()

    def __repr__(self) -> str:
        return f"<AccessLog {self.name} -> {self.file!r}>"


class ConditionalAccessLog(AccessLog):
    """``access_log ... if=condition``: a request is logged unless the condition renders
    empty or "0" (a class of its own: unconditional logs pay nothing for it)."""

    __slots__ = ("condition",)

    def __init__(self, render: Callable[[Any], str], file: LogFile, name: str,
                 condition: Callable[[Any], str]) -> None:
        super().__init__(render, file, name)
        self.condition = condition

    def write(self, exchange: Any) -> None:
        value = self.condition(exchange)
        if value and value != "0":
            super().write(exchange)


class PhaseClock:
    """The access logs' clock in locations with a log hook: the log phase's time while it runs
    (the exchange sets ``frozen``), so the hook's ``$request_time``, ``$msec``... equal the
    line's; the plain clock otherwise. One per runtime, passed to the logs that need it."""

    __slots__ = ("frozen",)

    def __init__(self) -> None:
        self.frozen = 0.0  # 0.0: not in a log phase

    def __call__(self) -> float:
        return self.frozen or time.time()


def open_access_log(
    conf: AccessLogConf,
    loop: asyncio.AbstractEventLoop | None = None,
    files: dict[str, LogFile] | None = None,
    clock: Callable[[], float] = time.time,
    lookup: Callable[..., Any] | None = None,
) -> AccessLog:
    """Build the writer of one ``access_log``; ``files`` shares one LogFile per path.

    ``loop`` runs the ``flush=`` timer (default: the running loop at the first buffered line).
    """
    file = files.get(conf.path) if files is not None else None
    if file is None:
        file = LogFile(conf.path, conf.buffer, conf.flush, loop)
        if files is not None:
            files[conf.path] = file
    if lookup is None:
        render = compile_log_format(conf.format.template, conf.format.escape, clock)
    else:  # another module's variables (stream)
        render = compile_log_format(conf.format.template, conf.format.escape, clock, lookup)
    if conf.condition is not None:
        from scriptlb.variables.evaluate import compile_template

        return ConditionalAccessLog(render, file, conf.format.name, compile_template(conf.condition, clock))
    return AccessLog(render, file, conf.format.name)
