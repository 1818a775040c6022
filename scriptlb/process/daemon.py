"""Detaching from the terminal and the pid file, as nginx does them.

nginx opens its listening sockets *before* daemonizing, so a port that is taken is reported on
the terminal with exit status 1; only then does it detach and write the pid file. The master
follows the same order (see ``master.run``).
"""

from __future__ import annotations

import os
import select
import sys


class PidFileError(Exception):
    """A pid file that cannot be read or holds no valid pid; str is nginx's message text."""

    def __init__(self, message: str, level: str = "error") -> None:
        super().__init__(message)
        self.level = level


def os_error_text(err: OSError) -> str:
    """nginx's errno rendering: ``(2: No such file or directory)``."""
    return f"({err.errno}: {os.strerror(err.errno or 0)})"


# --------------------------------------------------------------------------- daemon


READY_TIMEOUT = 30.0  # how long `scriptlb` waits for its daemon to report that it started


class Detached:
    """Both ends of a start: ``daemonize`` returns one in each process.

    In the original process ``status`` is what ``scriptlb`` exits with: 0 once the daemon has
    written its pid file (so ``scriptlb -s reload`` right after the start finds it), 1 if the
    daemon failed or died first. nginx's parent exits at once and cannot report either; the
    daemon here sends one byte through a pipe. In the daemon, ``report`` sends that byte.
    """

    def __init__(self, status: int | None, report_fd: int | None) -> None:
        self.status = status  # None in the daemon
        self._report_fd = report_fd

    @property
    def is_daemon(self) -> bool:
        return self.status is None

    def report(self, status: int) -> None:
        """In the daemon: tell the waiting `scriptlb` how the start went (once; later calls
        do nothing)."""
        fd, self._report_fd = self._report_fd, None
        if fd is None:
            return
        try:
            os.write(fd, b"%d" % status)
        except OSError:
            pass  # the original process is gone: nobody to tell
        finally:
            os.close(fd)


def daemonize(stderr_path: str | None = None) -> Detached:
    """Detach: double fork and setsid; see ``Detached`` for what each process gets.

    When the original process returns, the listening sockets opened before this call are
    already accepting connections into their backlog and the pid file exists.

    The daemon keeps the working directory (paths were made absolute against the prefix at load
    time) and the umask (Python creates files with 0666 & ~umask; nginx's umask(0) would make
    logs world-writable). stdin and stdout go to /dev/null; stderr goes to ``stderr_path`` (the
    error log file, like nginx's ngx_log_redirect_stderr, so a Python traceback is not lost) or
    to /dev/null.
    """
    flush_stdio()
    ready_r, ready_w = os.pipe()
    first = os.fork()
    if first:
        os.close(ready_w)
        os.waitpid(first, 0)
        try:
            return Detached(_wait_for_report(ready_r, READY_TIMEOUT), None)
        finally:
            os.close(ready_r)
    os.close(ready_r)
    # intermediate child: a new session without a controlling terminal, then fork again so
    # the daemon is not a session leader and can never acquire a terminal
    os.setsid()
    if os.fork():
        os._exit(0)
    redirect_stdio(stderr_path)
    return Detached(None, ready_w)


def _wait_for_report(fd: int, timeout: float) -> int:
    """The daemon's start status; 1 when it closed the pipe (died) or stayed silent too long."""
    ready, _, _ = select.select([fd], [], [], timeout)
    if not ready:
        sys.stderr.write("scriptlb: [alert] the daemon did not report its start in time\n")
        return 1
    data = os.read(fd, 8)
    if not data:
        sys.stderr.write("scriptlb: [alert] the daemon exited while starting, see the error log\n")
        return 1
    status = int(data)
    if status:
        sys.stderr.write("scriptlb: [alert] the daemon could not start, see the error log\n")
    return status


def redirect_stdio(stderr_path: str | None) -> None:
    """Point fds 0 and 1 at /dev/null and fd 2 at ``stderr_path`` (append) or /dev/null."""
    flush_stdio()
    null = os.open(os.devnull, os.O_RDWR)
    try:
        os.dup2(null, 0)
        os.dup2(null, 1)
        redirect_stderr(stderr_path, fallback_fd=null)
    finally:
        os.close(null)


def redirect_stderr(path: str | None, fallback_fd: int | None = None) -> None:
    """dup2 the file at ``path`` (opened for append) onto fd 2; on failure keep fd 2 as is.

    Also called after USR1: log rotation renamed the old file, and stderr must follow the new one.
    """
    fd = None
    if path is not None:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError:
            fd = None
    if fd is None:
        if fallback_fd is not None:
            os.dup2(fallback_fd, 2)
        return
    try:
        os.dup2(fd, 2)
    finally:
        os.close(fd)


def flush_stdio() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


# --------------------------------------------------------------------------- pid file


def write_pid_file(path: str, pid: int | None = None) -> None:
    """Write ``PID\\n``, replacing what was there (nginx overwrites a stale file without asking)."""
    data = f"{os.getpid() if pid is None else pid}\n".encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def remove_pid_file(path: str, owner: int | None = None) -> None:
    """Delete the pid file, but only if it still names ``owner`` (default: this process).

    A master that exits must not delete the file of another master started after it.
    """
    owner = os.getpid() if owner is None else owner
    try:
        if read_pid_file(path) != owner:
            return
        os.unlink(path)
    except (OSError, PidFileError):
        pass


def read_pid_file(path: str) -> int:
    """The pid in ``path``; raises PidFileError with nginx's message text."""
    try:
        with open(path, "rb") as f:
            raw = f.read(32)  # nginx reads NGX_INT64_LEN + 2 bytes
    except OSError as err:
        raise PidFileError(f'open() "{path}" failed {os_error_text(err)}') from None
    text = raw.rstrip(b"\r\n").decode("latin-1")
    if not (text.isascii() and text.isdigit()) or int(text) <= 0:
        raise PidFileError(f'invalid PID number "{text}" in "{path}"')
    return int(text)
