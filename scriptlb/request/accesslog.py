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
import zlib
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from scriptlb.config.model import AccessLogConf, LogFileCacheConf
from scriptlb.logs import errorlog
from scriptlb.variables.evaluate import compile_log_format

_STD_STREAMS = {"stdout": 1, "stderr": 2, "/dev/stdout": 1, "/dev/stderr": 2}
_WRITE_ERROR_INTERVAL = 60.0  # nginx: "write() ... failed" at most once a minute per file


class LogFile:
    """One open log destination in append mode, with nginx's optional write buffer."""

    __slots__ = ("_buffer", "_error_time", "_loop", "_timer", "buffer_size", "fd", "flush_interval", "gzip",
                 "path")

    def __init__(
        self,
        path: str,
        buffer_size: int = 0,
        flush_interval: float = 0.0,
        loop: asyncio.AbstractEventLoop | None = None,
        gzip: int = 0,
    ) -> None:
        """Opens the file now; an OSError is the caller's nginx-style ``open() failed``.
        ``gzip``: a compression level; each write is then one gzip member, as nginx's."""
        self.path = path
        self.buffer_size = buffer_size
        self.flush_interval = flush_interval
        self.gzip = gzip
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
        if self.gzip:
            data = gzip_member(data, self.gzip)
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


def gzip_member(data: bytes, level: int) -> bytes:
    """``data`` as one complete gzip member (a compressed log is their concatenation, which
    gunzip and zcat read as one stream)."""
    packer = zlib.compressobj(level, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    return packer.compress(data) + packer.flush()


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


class PathTemplateLog(AccessLog):
    """``access_log PATH_WITH_$VARS``: the path is rendered for each line, and the file opened,
    written and closed then; with ``open_log_file_cache`` descriptors are kept (``FileCache``).
    A file that cannot be opened loses the line, said at crit level as nginx."""

    __slots__ = ("cache", "path", "wrapped")

    def __init__(self, log: AccessLog, path: Callable[[Any], str], cache: FileCache | None) -> None:
        super().__init__(log.render, log.file, log.name)
        self.wrapped = log
        self.path = path
        self.cache = cache

    def write(self, exchange: Any) -> None:
        if isinstance(self.wrapped, ConditionalAccessLog):
            value = self.wrapped.condition(exchange)
            if not value or value == "0":
                return
        try:
            line = self.render(exchange)
        except (AttributeError, KeyError, TypeError, ValueError) as err:
            where = f'access_log format "{self.name}"'
            self._errors.log("alert", where, f"{where} failed: {err!r}")
            return
        path = self.path(exchange)
        data = _encode(line) + b"\n"
        if self.cache is not None:
            self.cache.write(path, data, getattr(exchange, "conn_id", 0))
            return
        fd = _open_for_line(path, getattr(exchange, "conn_id", 0))
        if fd is not None:
            _write_line(fd, path, data)
            os.close(fd)

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()


def _open_for_line(path: str, conn_id: int) -> int | None:
    try:
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as err:
        errorlog.log_error("crit", f'open() "{path}" failed {errorlog.os_error_text(err)}', conn_id)
        return None


def _write_line(fd: int, path: str, data: bytes) -> None:
    try:
        os.write(fd, data)
    except OSError as err:
        errorlog.log_error("alert", f'write() to "{path}" failed {errorlog.os_error_text(err)}')


class _Cached:
    __slots__ = ("checked", "fd", "used", "uses")

    def __init__(self, now: float) -> None:
        self.fd: int | None = None
        self.uses = 0
        self.used = now
        self.checked = now


class FileCache:
    """nginx's open_file_cache for log files: a path used ``min_uses`` times (within
    ``inactive`` of each other) keeps its descriptor, reopened after ``valid``; at most ``max``
    paths are remembered, the least recently used forgotten first (its descriptor closed).
    A kept descriptor goes on writing where the file was opened, even once it moved."""

    def __init__(self, conf: LogFileCacheConf, clock: Callable[[], float] = time.monotonic) -> None:
        self.conf = conf
        self.clock = clock
        self.entries: OrderedDict[str, _Cached] = OrderedDict()

    def write(self, path: str, data: bytes, conn_id: int) -> None:
        now = self.clock()
        self._expire(now)
        entry = self.entries.get(path)
        if entry is not None:
            self.entries.move_to_end(path)
            entry.uses += 1
            entry.used = now
            if entry.fd is not None and now - entry.checked > self.conf.valid:
                os.close(entry.fd)  # (reopened by name: the file may have been rotated)
                entry.fd = None
            if entry.fd is not None:
                _write_line(entry.fd, path, data)
                return
        fd = _open_for_line(path, conn_id)
        if fd is None:
            return  # (nginx remembers no path it could not open)
        _write_line(fd, path, data)
        if entry is None:
            if len(self.entries) >= self.conf.max:
                self._forget(next(iter(self.entries)))
            entry = self.entries[path] = _Cached(now)
            entry.uses = 1
        if entry.uses >= self.conf.min_uses:
            entry.fd, entry.checked = fd, now
        else:
            os.close(fd)

    def _expire(self, now: float) -> None:
        """Paths unused for ``inactive``, least recently used first."""
        while self.entries:
            path, entry = next(iter(self.entries.items()))
            if now - entry.used <= self.conf.inactive:
                return
            self._forget(path)

    def _forget(self, path: str) -> None:
        entry = self.entries.pop(path)
        if entry.fd is not None:
            os.close(entry.fd)

    def close(self) -> None:
        while self.entries:
            self._forget(next(iter(self.entries)))


class _NoFile(LogFile):
    """The file of a log whose path has variables: none is kept open, nothing to flush,
    reopen or close."""

    def __init__(self, path: str) -> None:  # (LogFile's would open the path)
        self.path = path
        self.buffer_size = 0
        self.flush_interval = 0.0
        self.gzip = 0
        self.fd = -1
        self._buffer = bytearray()
        self._timer = None

    def reopen(self) -> None:
        return None

    def close(self) -> None:
        return None


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
    from scriptlb.variables.evaluate import compile_template

    if conf.path_template is not None:
        file: LogFile | None = _NoFile(conf.path)
    else:
        file = files.get(conf.path) if files is not None else None
    if file is None:
        file = LogFile(conf.path, conf.buffer, conf.flush, loop, conf.gzip)
        if files is not None:
            files[conf.path] = file
    extra = {} if lookup is None else {"lookup": lookup}  # another module's variables (stream)
    render = compile_log_format(conf.format.template, conf.format.escape, clock, **extra)
    log = AccessLog(render, file, conf.format.name)
    if conf.condition is not None:
        log = ConditionalAccessLog(render, file, conf.format.name,
                                   compile_template(conf.condition, clock, **extra))
    if conf.path_template is not None:
        cache = FileCache(conf.file_cache) if conf.file_cache is not None else None
        return PathTemplateLog(log, compile_template(conf.path_template, clock, **extra), cache)
    return log
