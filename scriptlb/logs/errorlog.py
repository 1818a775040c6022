"""nginx-shaped error log: levels, several targets, reopen, and a rate limiter.

A line looks like nginx's (ngx_log_error_core + ngx_http_log_error_handler)::

    2026/11/22 10:00:00 [error] 1234#0: *17 connect() failed (111: Connection refused) while
    connecting to upstream, client: 127.0.0.1, server: localhost, request: "GET / HTTP/1.1",
    upstream: "http://127.0.0.1:9003/", host: "localhost:8080"

(one line). The message carries nginx's " while <action>" part; the request context suffix
(``, client: ...``) comes from ``request_context``. Times are local, as nginx's.

One process-wide sink, like nginx's ``cycle->log``: ``install(ErrorLog(...))`` once the config
is loaded (and again on reload); until then lines go to stderr at level ``error`` so modules
can log before the configuration exists. Writes are unbuffered appends, one ``write`` per line,
so concurrent workers never interleave inside a line.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterable
from typing import Any

from scriptlb.config.model import ErrorLogConf, SyslogConf
from scriptlb.request_view import HookRequest

# nginx's order: a target at level L receives every line at L or more severe
LEVELS: tuple[str, ...] = ("emerg", "alert", "crit", "error", "warn", "notice", "info", "debug")
_RANK = {name: rank for rank, name in enumerate(LEVELS)}
STDERR = "stderr"


def level_rank(level: str) -> int:
    """0 for emerg ... 7 for debug; raises ValueError for an unknown level name."""
    try:
        return _RANK[level]
    except KeyError:
        raise ValueError(f'invalid log level "{level}"') from None


def os_error_text(err: OSError) -> str:
    """nginx's errno suffix: "(111: Connection refused)"."""
    if err.errno is None:
        return f"({err})"
    return f"({err.errno}: {os.strerror(err.errno)})"


class _Target:
    """One ``error_log`` destination: a file descriptor opened for appending, and its level."""

    __slots__ = ("fd", "path", "rank")

    def __init__(self, path: str, level: str) -> None:
        self.path = path
        self.rank = level_rank(level)
        self.fd = 2 if path == STDERR else self._open(path)

    @staticmethod
    def _open(path: str) -> int:
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def write(self, data: bytes) -> None:
        try:
            os.write(self.fd, data)
        except OSError:
            pass  # nginx ignores failed log writes: logging must never break serving

    def reopen(self) -> None:
        """USR1: the file was rotated away; open the path again, then drop the old descriptor."""
        if self.fd == 2:
            return
        fd = self._open(self.path)
        old, self.fd = self.fd, fd
        os.close(old)

    def close(self) -> None:
        if self.fd != 2:
            os.close(self.fd)
            self.fd = -1


class _SyslogTarget:
    """``error_log syslog:...``: each line one UDP (or unix datagram) message with an RFC 3164
    header, as ngx_syslog_writer sends it: ``<PRI>Mmm dd hh:mm:ss HOST TAG: `` then nginx's
    whole line; the severity is the line's level. Sends never block nor raise (a lost datagram
    is lost, as nginx's)."""

    __slots__ = ("address", "conf", "path", "rank", "sock")

    def __init__(self, conf: SyslogConf, path: str, level: str) -> None:
        self.conf = conf
        self.path = path
        self.rank = level_rank(level)
        if conf.unix_path is not None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self.address: Any = conf.unix_path
        else:
            family = socket.AF_INET6 if ":" in (conf.host or "") else socket.AF_INET
            self.sock = socket.socket(family, socket.SOCK_DGRAM)
            self.address = (conf.host, conf.port)
        self.sock.setblocking(False)

    def send(self, level_rank: int, line: bytes) -> None:
        conf = self.conf
        now = time.localtime()
        stamp = f"{time.strftime('%b', now)} {now.tm_mday:2d} {time.strftime('%H:%M:%S', now)}"
        host = f"{_HOSTNAME} " if conf.hostname else ""
        header = f"<{conf.facility * 8 + level_rank}>{stamp} {host}{conf.tag}: ".encode("ascii", "replace")
        try:
            self.sock.sendto(header + line.rstrip(b"\n")[:_SYSLOG_MAX], self.address)
        except OSError:
            pass  # no listener, a full buffer: nginx drops the message too

    @property
    def fd(self) -> int:
        """The socket's descriptor (what a process keeps open to go on logging)."""
        return self.sock.fileno()

    def write(self, data: bytes) -> None:  # (lines without a level: written as errors)
        self.send(_RANK["error"], data)

    def reopen(self) -> None:
        pass

    def close(self) -> None:
        self.sock.close()


_HOSTNAME = socket.gethostname().lower()
_SYSLOG_MAX = 4096  # nginx's NGX_SYSLOG_MAX_STR, less its header


def _target(conf: ErrorLogConf) -> _Target | _SyslogTarget:
    if conf.syslog is not None:
        return _SyslogTarget(conf.syslog, conf.path, conf.level)
    return _Target(conf.path, conf.level)


class ErrorLog:
    """The error-log targets of one configuration."""

    __slots__ = ("_clock", "_stamp", "_stamp_second", "max_rank", "targets")

    def __init__(self, confs: Iterable[ErrorLogConf] = (), clock: Callable[[], float] = time.time) -> None:
        """Opens every file now (an OSError here is nginx's ``[emerg] open() failed``)."""
        self.targets: list[_Target | _SyslogTarget] = [_target(c) for c in confs]
        if not self.targets:
            self.targets.append(_Target(STDERR, "error"))
        self.max_rank = max(t.rank for t in self.targets)
        self._clock = clock
        self._stamp_second = -1
        self._stamp = ""

    def enabled(self, level: str) -> bool:
        """Whether any target takes ``level``: skip building debug messages otherwise."""
        return _RANK[level] <= self.max_rank

    def log(self, level: str, msg: str, conn_id: int | None = None, ctx: str = "") -> None:
        rank = _RANK[level]
        if rank > self.max_rank:
            return
        data = self.format(level, msg, conn_id, ctx).encode("utf-8", "backslashreplace")
        for target in self.targets:
            if rank <= target.rank:
                if isinstance(target, _SyslogTarget):
                    target.send(rank, data)
                else:
                    target.write(data)

    def format(self, level: str, msg: str, conn_id: int | None = None, ctx: str = "") -> str:
        conn = f"*{conn_id} " if conn_id is not None else ""
        return f"{self._timestamp()} [{level}] {os.getpid()}#0: {conn}{msg}{ctx}\n"

    def _timestamp(self) -> str:
        now = self._clock()
        second = int(now)
        if second != self._stamp_second:
            self._stamp_second = second
            self._stamp = time.strftime("%Y/%m/%d %H:%M:%S", time.localtime(second))
        return self._stamp

    def reopen(self) -> None:
        for target in self.targets:
            try:
                target.reopen()
            except OSError as err:
                self.log("alert", f'open() "{target.path}" failed {os_error_text(err)}')

    def close(self) -> None:
        for target in self.targets:
            target.close()

    def __repr__(self) -> str:
        return "<ErrorLog " + ", ".join(f"{t.path} {LEVELS[t.rank]}" for t in self.targets) + ">"


# --------------------------------------------------------------------------- the process sink


class _Sink:
    """Holds the process's current ErrorLog (nginx's cycle->log); swapped by ``install``."""

    __slots__ = ("log",)

    def __init__(self) -> None:
        self.log = ErrorLog()


_SINK = _Sink()


def install(error_log: ErrorLog) -> ErrorLog:
    """Make ``error_log`` the process's error log; returns the previous one (caller closes it)."""
    previous, _SINK.log = _SINK.log, error_log
    return previous


def current() -> ErrorLog:
    return _SINK.log


class using:
    """``with using(log):`` the lines written inside go to ``log``, not the process's error log
    (nginx's connection log: a stream server's own error_log); synchronous code only."""

    __slots__ = ("log", "previous")

    def __init__(self, log: ErrorLog) -> None:
        self.log = log
        self.previous: ErrorLog | None = None

    def __enter__(self) -> ErrorLog:
        self.previous, _SINK.log = _SINK.log, self.log
        return self.log

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None and _SINK.log is self.log:
            _SINK.log = self.previous


def log_error(level: str, msg: str, conn_id: int | None = None, ctx: str = "") -> None:
    """Write one line to the process's error log (if its level passes the filter)."""
    _SINK.log.log(level, msg, conn_id, ctx)


def enabled(level: str) -> bool:
    return _SINK.log.enabled(level)


def reopen() -> None:
    """USR1: reopen every error-log file."""
    _SINK.log.reopen()


def request_context(exchange: HookRequest, upstream: str | None = None) -> str:
    """nginx's suffix for a request: ``, client: ..., server: ..., request: "...",
    upstream: "...", host: "..."`` (``upstream`` is the full URL, e.g. "http://10.0.0.1:80/x").
    """
    parts = [f", client: {exchange.remote_addr}, server: {exchange.server_name}"]
    method = exchange.method
    if method:
        parts.append(f', request: "{method} {exchange.request_uri} HTTP/{exchange.http_version}"')
    if upstream is not None:
        parts.append(f', upstream: "{upstream}"')
    host = exchange.header("host")
    if host is not None:
        parts.append(f', host: "{host}"')
    referer = exchange.header("referer")
    if referer is not None:
        parts.append(f', referrer: "{referer}"')
    return "".join(parts)


# --------------------------------------------------------------------------- rate limiting


class RateLimiter:
    """At most ``limit`` lines per ``interval`` seconds per key, then one summary line.

    For messages a client can trigger at will (a hook failing on every request): the first
    ``limit`` lines of each window are written, the rest counted; the next line written for
    that key (or ``flush``) is preceded by "<key>: N similar messages suppressed".
    """

    __slots__ = ("_clock", "_windows", "interval", "limit", "max_keys")

    def __init__(
        self,
        limit: int = 10,
        interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 4096,
    ) -> None:
        self.limit = limit
        self.interval = interval
        self.max_keys = max_keys  # bounds memory when keys come from data
        self._clock = clock
        # key -> [window start, lines written in the window, lines suppressed, level]
        self._windows: dict[str, list[Any]] = {}

    def log(self, level: str, key: str, msg: str, conn_id: int | None = None, ctx: str = "") -> bool:
        """Log through the process sink unless over the limit; returns whether it was written."""
        now = self._clock()
        window = self._windows.get(key)
        if window is None or now - window[0] >= self.interval:
            if window is not None and window[2]:
                log_error(window[3], f"{key}: {window[2]} similar messages suppressed")
            if window is None and len(self._windows) >= self.max_keys:
                self._evict(now)
            window = self._windows[key] = [now, 0, 0, level]
        if window[1] >= self.limit:
            window[2] += 1
            window[3] = level
            return False
        window[1] += 1
        log_error(level, msg, conn_id, ctx)
        return True

    def flush(self) -> None:
        """Write the pending "suppressed" summaries (a timer or shutdown calls this)."""
        for key, window in self._windows.items():
            if window[2]:
                log_error(window[3], f"{key}: {window[2]} similar messages suppressed")
                window[2] = 0

    def _evict(self, now: float) -> None:
        expired = [k for k, w in self._windows.items() if now - w[0] >= self.interval and not w[2]]
        for key in expired or list(self._windows)[: len(self._windows) // 2]:
            del self._windows[key]
