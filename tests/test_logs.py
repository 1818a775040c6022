"""Error log (nginx's line shape, levels, targets, reopen, rate limiting) and access log."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

import pytest

from scriptlb.config.model import ErrorLogConf
from scriptlb.logs import errorlog
from scriptlb.logs.errorlog import ErrorLog, RateLimiter, level_rank, os_error_text, request_context

NOV_22_LOCAL = time.mktime((2026, 11, 22, 10, 0, 0, 0, 0, -1))
LINE = re.compile(r"^2026/11/22 10:00:00 \[(\w+)\] (\d+)#0: (.*)\n$")


class FakeExchange:
    remote_addr = "127.0.0.1"
    server_name = "localhost"
    method = "GET"
    request_uri = "/a?b=1"
    http_version = "1.1"

    def __init__(self, headers: dict[str, str]) -> None:
        self._headers = headers

    def header(self, name_lower: str) -> str | None:
        return self._headers.get(name_lower)


def read_lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


@pytest.fixture
def restore_sink():
    previous = errorlog.current()
    yield
    errorlog.install(previous)


def test_line_shape_is_nginx(tmp_path: Path) -> None:
    path = tmp_path / "error.log"
    log = ErrorLog([ErrorLogConf(str(path), "error")], clock=lambda: NOV_22_LOCAL + 0.5)
    ctx = request_context(FakeExchange({"host": "localhost:8080"}), upstream="http://127.0.0.1:9003/")
    log.log("error", "connect() failed (111: Connection refused) while connecting to upstream", 17, ctx)
    log.log("error", "no conn id")
    log.close()
    assert read_lines(path) == [
        f"2026/11/22 10:00:00 [error] {os.getpid()}#0: *17 connect() failed (111: Connection refused) "
        'while connecting to upstream, client: 127.0.0.1, server: localhost, request: "GET /a?b=1 HTTP/1.1", '
        'upstream: "http://127.0.0.1:9003/", host: "localhost:8080"\n',
        f"2026/11/22 10:00:00 [error] {os.getpid()}#0: no conn id\n",
    ]


def test_request_context_without_upstream_or_host_but_with_referrer() -> None:
    ctx = request_context(FakeExchange({"referer": "http://r/"}))
    assert (
        ctx == ', client: 127.0.0.1, server: localhost, request: "GET /a?b=1 HTTP/1.1", referrer: "http://r/"'
    )


@pytest.mark.parametrize(
    ("target_level", "written"),
    [
        ("emerg", ["emerg"]),
        ("crit", ["emerg", "alert", "crit"]),
        ("error", ["emerg", "alert", "crit", "error"]),
        ("warn", ["emerg", "alert", "crit", "error", "warn"]),
        ("info", ["emerg", "alert", "crit", "error", "warn", "notice", "info"]),
        ("debug", list(errorlog.LEVELS)),
    ],
)
def test_levels_filter_as_nginx(tmp_path: Path, target_level: str, written: list[str]) -> None:
    path = tmp_path / "error.log"
    log = ErrorLog([ErrorLogConf(str(path), target_level)], clock=lambda: NOV_22_LOCAL)
    for level in errorlog.LEVELS:
        log.log(level, f"at {level}")
    log.close()
    assert [LINE.match(line).group(1) for line in read_lines(path)] == written  # type: ignore[union-attr]
    assert log.enabled("debug") is (target_level == "debug")


def test_several_targets_each_with_its_level(tmp_path: Path) -> None:
    errors, everything = tmp_path / "e.log", tmp_path / "all.log"
    log = ErrorLog(
        [ErrorLogConf(str(errors), "error"), ErrorLogConf(str(everything), "info")],
        clock=lambda: NOV_22_LOCAL,
    )
    log.log("info", "i")
    log.log("error", "e")
    log.log("debug", "d")
    log.close()
    assert [line.rsplit(": ", 1)[1] for line in read_lines(errors)] == ["e\n"]
    assert [line.rsplit(": ", 1)[1] for line in read_lines(everything)] == ["i\n", "e\n"]


def test_reopen_follows_a_rotated_file(tmp_path: Path) -> None:
    path = tmp_path / "error.log"
    log = ErrorLog([ErrorLogConf(str(path), "error")], clock=lambda: NOV_22_LOCAL)
    log.log("error", "before")
    path.rename(tmp_path / "error.log.1")
    log.log("error", "still old")
    log.reopen()
    log.log("error", "after")
    log.close()
    assert [line.rsplit(": ", 1)[1] for line in read_lines(tmp_path / "error.log.1")] == [
        "before\n",
        "still old\n",
    ]
    assert [line.rsplit(": ", 1)[1] for line in read_lines(path)] == ["after\n"]


def test_appends_to_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "error.log"
    path.write_text("old line\n")
    log = ErrorLog([ErrorLogConf(str(path), "error")], clock=lambda: NOV_22_LOCAL)
    log.log("error", "new")
    log.close()
    assert read_lines(path)[0] == "old line\n"
    assert len(read_lines(path)) == 2


def test_unopenable_file_raises(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        ErrorLog([ErrorLogConf(str(tmp_path / "missing" / "error.log"), "error")])


def test_default_sink_is_stderr_at_error(capfd: pytest.CaptureFixture[str], restore_sink: None) -> None:
    errorlog.install(ErrorLog())
    errorlog.log_error("warn", "not shown")
    errorlog.log_error("error", "shown", 3, ", client: x")
    err = capfd.readouterr().err
    assert err.endswith(f"[error] {os.getpid()}#0: *3 shown, client: x\n")
    assert "not shown" not in err


def test_install_swaps_the_process_sink(tmp_path: Path, restore_sink: None) -> None:
    path = tmp_path / "error.log"
    mine = ErrorLog([ErrorLogConf(str(path), "info")], clock=lambda: NOV_22_LOCAL)
    errorlog.install(mine)
    assert errorlog.current() is mine
    assert errorlog.enabled("info") and not errorlog.enabled("debug")
    errorlog.log_error("info", "via the sink")
    path.rename(tmp_path / "old.log")
    errorlog.reopen()
    errorlog.log_error("info", "after reopen")
    mine.close()
    assert read_lines(tmp_path / "old.log")[0].endswith("#0: via the sink\n")
    assert read_lines(path)[0].endswith("#0: after reopen\n")


def test_level_rank_and_unknown_level() -> None:
    assert [level_rank(n) for n in ("emerg", "error", "debug")] == [0, 3, 7]
    with pytest.raises(ValueError, match='invalid log level "loud"'):
        level_rank("loud")


def test_os_error_text() -> None:
    assert os_error_text(ConnectionRefusedError(111, "Connection refused")) == "(111: Connection refused)"


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_rate_limiter_suppresses_and_summarizes(tmp_path: Path, restore_sink: None) -> None:
    path = tmp_path / "error.log"
    errorlog.install(ErrorLog([ErrorLogConf(str(path), "error")], clock=lambda: NOV_22_LOCAL))
    clock = FakeClock()
    limiter = RateLimiter(limit=2, interval=1.0, clock=clock)
    written = [limiter.log("error", "hook.py:3", f"failure {i}") for i in range(5)]
    other = limiter.log("error", "other", "another key is limited on its own")
    clock.now = 100.999
    late = limiter.log("error", "hook.py:3", "still the same second")
    clock.now = 101.0
    next_window = limiter.log("error", "hook.py:3", "failure 5")
    errorlog.current().close()
    assert written == [True, True, False, False, False]
    assert (other, late, next_window) == (True, False, True)
    assert [line.split("#0: ", 1)[1] for line in read_lines(path)] == [
        "failure 0\n",
        "failure 1\n",
        "another key is limited on its own\n",
        "hook.py:3: 4 similar messages suppressed\n",
        "failure 5\n",
    ]


def test_rate_limiter_flush_writes_pending_summaries_once(tmp_path: Path, restore_sink: None) -> None:
    path = tmp_path / "error.log"
    errorlog.install(ErrorLog([ErrorLogConf(str(path), "warn")], clock=lambda: NOV_22_LOCAL))
    limiter = RateLimiter(limit=1, interval=1.0, clock=FakeClock())
    for _ in range(3):
        limiter.log("warn", "k", "m")
    limiter.flush()
    limiter.flush()
    errorlog.current().close()
    assert [line.split("#0: ", 1)[1] for line in read_lines(path)] == [
        "m\n",
        "k: 2 similar messages suppressed\n",
    ]


def test_rate_limiter_bounds_its_keys(restore_sink: None, tmp_path: Path) -> None:
    errorlog.install(ErrorLog([ErrorLogConf(str(tmp_path / "e.log"), "error")]))
    clock = FakeClock()
    limiter = RateLimiter(limit=1, interval=1.0, clock=clock, max_keys=8)
    for i in range(100):
        clock.now += 0.1
        limiter.log("error", f"key{i}", "m")
    errorlog.current().close()
    assert len(limiter._windows) <= 8


# --------------------------------------------------------------------------- access log


class FakeTimer:
    def __init__(self, delay: float, callback: object) -> None:
        self.delay = delay
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeLoop:
    """Records call_later so a test can fire the flush timer by hand."""

    def __init__(self) -> None:
        self.timers: list[FakeTimer] = []

    def call_later(self, delay: float, callback: object) -> FakeTimer:
        timer = FakeTimer(delay, callback)
        self.timers.append(timer)
        return timer


class LogExchange:
    def __init__(self, uri: str, status: int = 200) -> None:
        self.uri = uri
        self.status = status
        self.remote_addr = "127.0.0.1"
        self.headers: list[tuple[bytes, bytes]] = []
        self.tries: list[object] = []


def access_conf(path: Path | str, raw: str = "$remote_addr $uri $status $upstream_addr", **kw: Any) -> Any:
    from scriptlb.config.model import AccessLogConf, LogFormat
    from scriptlb.config.templates import compile_template

    return AccessLogConf(
        str(path), LogFormat("test", compile_template(raw), kw.pop("escape", "default")), **kw
    )


def test_access_log_writes_one_line_per_request(tmp_path: Path) -> None:
    from scriptlb.request.accesslog import open_access_log

    path = tmp_path / "access.log"
    log = open_access_log(access_conf(path))
    log.write(LogExchange("/a"))
    log.write(LogExchange("/b\x01", 502))
    assert path.read_bytes() == b"127.0.0.1 /a 200 -\n127.0.0.1 /b\\x01 502 -\n"
    log.close()


def test_access_log_appends_and_encodes_bytes_as_latin1(tmp_path: Path) -> None:
    from scriptlb.request.accesslog import open_access_log

    path = tmp_path / "access.log"
    path.write_bytes(b"old\n")
    log = open_access_log(access_conf(path, "$uri", escape="none"))
    log.write(LogExchange("/\xe9"))
    log.write(LogExchange("/\u20ac"))
    log.close()
    assert path.read_bytes() == b"old\n/\xe9\n/\xe2\x82\xac\n"


def test_buffered_lines_wait_until_the_buffer_is_full(tmp_path: Path) -> None:
    from scriptlb.request.accesslog import open_access_log

    path = tmp_path / "access.log"
    log = open_access_log(access_conf(path, "$uri", buffer=10))
    log.write(LogExchange("/1234"))  # 6 bytes
    log.write(LogExchange("/12"))  # 4 bytes: exactly full, still buffered
    assert path.read_bytes() == b""
    log.write(LogExchange("/x"))  # does not fit: the first two lines go out
    assert path.read_bytes() == b"/1234\n/12\n"
    log.write(LogExchange("/" + "y" * 20))  # larger than the buffer: flushed, then written
    assert path.read_bytes() == b"/1234\n/12\n/x\n/" + b"y" * 20 + b"\n"
    log.close()


def test_flush_timer_writes_buffered_lines(tmp_path: Path) -> None:
    from scriptlb.request.accesslog import open_access_log

    path = tmp_path / "access.log"
    loop = FakeLoop()
    log = open_access_log(access_conf(path, "$uri", buffer=4096, flush=5.0), loop=loop)  # type: ignore[arg-type]
    log.write(LogExchange("/a"))
    log.write(LogExchange("/b"))
    assert [t.delay for t in loop.timers] == [5.0]  # armed once, by the first buffered line
    assert path.read_bytes() == b""
    loop.timers[0].callback()  # type: ignore[operator]
    assert path.read_bytes() == b"/a\n/b\n"
    log.write(LogExchange("/c"))
    assert len(loop.timers) == 2
    log.flush()
    assert loop.timers[1].cancelled
    assert path.read_bytes() == b"/a\n/b\n/c\n"
    log.close()


def test_close_flushes_and_reopen_follows_rotation(tmp_path: Path) -> None:
    from scriptlb.request.accesslog import open_access_log

    path = tmp_path / "access.log"
    log = open_access_log(access_conf(path, "$uri", buffer=4096))
    log.write(LogExchange("/old"))
    path.rename(tmp_path / "access.log.1")
    log.reopen()  # the buffered line belongs to the old file
    log.write(LogExchange("/new"))
    log.close()
    assert (tmp_path / "access.log.1").read_bytes() == b"/old\n"
    assert path.read_bytes() == b"/new\n"


def test_logs_on_one_path_share_a_file(tmp_path: Path) -> None:
    from scriptlb.request.accesslog import LogFile, open_access_log

    path = tmp_path / "access.log"
    files: dict[str, LogFile] = {}
    first = open_access_log(access_conf(path, "one $uri", buffer=4096), files=files)
    second = open_access_log(access_conf(path, "two $uri", buffer=4096), files=files)
    assert first.file is second.file
    first.write(LogExchange("/a"))
    second.write(LogExchange("/b"))
    first.close()
    second.close()
    assert path.read_bytes() == b"one /a\ntwo /b\n"


def test_stdout_target(capfd: pytest.CaptureFixture[str]) -> None:
    from scriptlb.request.accesslog import open_access_log

    log = open_access_log(access_conf("stdout", "$uri"))
    log.write(LogExchange("/out"))
    log.close()
    assert capfd.readouterr().out == "/out\n"


def test_a_broken_exchange_is_reported_not_raised(tmp_path: Path, restore_sink: None) -> None:
    from scriptlb.request.accesslog import open_access_log

    errors = tmp_path / "error.log"
    errorlog.install(ErrorLog([ErrorLogConf(str(errors), "error")]))
    log = open_access_log(access_conf(tmp_path / "access.log", "$uri"))
    for _ in range(5):
        log.write(object())
    log.close()
    errorlog.current().close()
    lines = errors.read_text().splitlines()
    assert len(lines) == 1  # once a minute, not once per request
    assert "[alert]" in lines[0]
    assert 'format "test" failed' in lines[0]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_write_errors_are_reported_once_a_minute(tmp_path: Path, restore_sink: None) -> None:
    from scriptlb.request.accesslog import open_access_log

    errors = tmp_path / "error.log"
    errorlog.install(ErrorLog([ErrorLogConf(str(errors), "error")]))
    log = open_access_log(access_conf("/dev/full", "$uri"))  # every write fails with ENOSPC
    for _ in range(3):
        log.write(LogExchange("/x"))
    log.close()
    errorlog.current().close()
    lines = errors.read_text().splitlines()
    assert len(lines) == 1
    assert lines[0].endswith(
        f'[alert] {os.getpid()}#0: write() to "/dev/full" failed (28: No space left on device)'
    )


def test_runtime_opens_each_access_log_path_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Several access_log directives (server and locations, other formats) on one path: one
    LogFile (one open, one buffer), reopened and closed once, as nginx."""
    import asyncio

    from helpers import load_conf

    from scriptlb.request.accesslog import LogFile
    from scriptlb.request.runtime import Runtime

    opened: list[str] = []
    real_open = LogFile._open

    def counting_open(self: LogFile) -> int:
        opened.append(self.path)
        return real_open(self)

    monkeypatch.setattr(LogFile, "_open", counting_open)
    path = tmp_path / "shared.log"
    conf = load_conf(f"""
        daemon off; master_process off; error_log {tmp_path}/error.log;
        http {{
            log_format short '$uri';
            access_log {path} combined buffer=4k;
            server {{
                listen 127.0.0.1:1;
                location /a {{ access_log {path} short buffer=4k; return 200; }}
                location /b {{
                    access_log {path} combined buffer=4k;
                    access_log {tmp_path}/other.log;
                    return 200;
                }}
                location / {{ return 200; }}
            }}
        }}
    """, tmp_path)
    loop = asyncio.new_event_loop()
    try:
        runtime = Runtime(conf, loop)
        server = next(iter(runtime.servers.values()))
        logs = [log for uri in ("/a", "/b", "/") for log in server.match(uri).access_logs]
        assert len({id(log.file) for log in logs if log.file.path == str(path)}) == 1
        assert sorted(opened) == sorted([str(path), f"{tmp_path}/other.log"])
        runtime.reopen_logs()
        assert sorted(opened[2:]) == sorted([str(path), f"{tmp_path}/other.log"])
        runtime.close()
    finally:
        loop.close()
