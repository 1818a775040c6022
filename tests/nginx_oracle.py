"""A real nginx as the tests' oracle: where the binary is, and one process serving a config in
a test's directory, stopped (QUIT, then KILL) whatever happens in the test.

Readiness is the pid file: nginx writes it after binding its listening sockets, so a connect
that follows is queued even before the first accept, and no probe connection shows up in the
logs a test may read.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
READY_TIMEOUT = 15.0  # a loaded machine: only a failing start waits this long


@contextlib.contextmanager
def nginx_process(prefix: Path, conf_text: str) -> Iterator[Path]:
    """nginx (``master_process off`` in ``conf_text``) serving ``prefix/nginx.conf``; yields
    ``prefix`` once it listens. A start that fails raises with nginx's error log."""
    assert NGINX is not None
    (prefix / "logs").mkdir(parents=True, exist_ok=True)
    (prefix / "nginx.conf").write_text(conf_text)
    pid_file = prefix / "nginx.pid"
    pid_file.unlink(missing_ok=True)
    proc = subprocess.Popen([NGINX, "-p", f"{prefix}/", "-c", str(prefix / "nginx.conf")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while not pid_file.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                log = prefix / "logs" / "error.log"
                raise RuntimeError(log.read_text() if log.exists() else "nginx did not start")
            time.sleep(0.02)
        yield prefix
    finally:
        proc.send_signal(signal.SIGQUIT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main_conf(prefix: Path, body: str, head: str = "", error_level: str = "error",
              worker_connections: int = 128) -> str:
    """The main context of a test nginx: one process, its pid file and logs under ``prefix``,
    then ``body`` (an ``http { }`` or ``stream { }`` block); ``head``: ``load_module`` lines."""
    return f"""{head}
daemon off; master_process off; worker_processes 1; pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log {error_level};
events {{ worker_connections {worker_connections}; }}
{body}
"""


def http_conf(prefix: Path, http_block: str, head: str = "") -> str:
    """``main_conf`` with an http block whose temp paths are under ``prefix`` (nginx's defaults
    are in its install prefix, which a test cannot write)."""
    return main_conf(prefix, f"""http {{
    access_log off;
    client_body_temp_path {prefix}/body; proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fcgi; uwsgi_temp_path {prefix}/uwsgi; scgi_temp_path {prefix}/scgi;
    {http_block}
}}""", head)


@contextlib.contextmanager
def nginx_running(tmp_path: Path, http_block: str) -> Iterator[Path]:
    """A real nginx (one process) serving ``http_block``; yields its prefix directory once
    every listening socket is bound."""
    with nginx_process(tmp_path, http_conf(tmp_path, http_block)) as prefix:
        yield prefix
