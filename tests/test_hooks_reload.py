"""Hooks in real processes: a changed hook is picked up by a reload (and, with python_code_cache
off, without one); a reload with a broken hook is refused and the old hook keeps serving."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import answers, free_ports, wait_for

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


CONF = """
daemon off;
master_process on;
worker_processes 1;
error_log {tmp}/error.log info;
pid {tmp}/scriptlb.pid;
events {{}}
http {{
    python_code_cache {cache};
    upstream backend {{
        server 127.0.0.1:{a};
        server 127.0.0.1:{b};
        balancer_by_python_file hooks/pick.py;
    }}
    server {{
        listen 127.0.0.1:{lb};
        location / {{ proxy_pass http://backend; }}
    }}
    server {{ listen 127.0.0.1:{a}; return 200 "A"; }}
    server {{ listen 127.0.0.1:{b}; return 200 "B"; }}
}}
"""


@contextlib.contextmanager
def scriptlb(tmp_path: Path, cache: str = "on") -> Iterator[tuple[subprocess.Popen[bytes], dict[str, int]]]:
    lb, a, b = free_ports(3)
    ports = {"lb": lb, "a": a, "b": b}
    (tmp_path / "conf").mkdir()
    conf = tmp_path / "conf" / "scriptlb.conf"
    conf.write_text(CONF.format(tmp=tmp_path, cache=cache, **ports))
    proc = subprocess.Popen([sys.executable, "-m", "scriptlb", "-p", str(tmp_path), "-c", str(conf)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: answers(lb) is not None, what="scriptlb to serve")
        yield proc, ports
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


FIRST_PEER = "peers = upstream.get_primary_peers()\nbalancer.set_current_peer(peers[0]['name'])\n"


def write_hook(tmp_path: Path, text: str) -> Path:
    (tmp_path / "hooks").mkdir(exist_ok=True)
    hook = tmp_path / "hooks" / "pick.py"
    hook.write_text(text)
    return hook


def to_port(port: int) -> str:
    return f"balancer.set_current_peer('127.0.0.1', {port})\n"


def test_reload_picks_up_a_changed_hook_and_refuses_a_broken_one(tmp_path: Path) -> None:
    hook = write_hook(tmp_path, FIRST_PEER)
    with scriptlb(tmp_path) as (proc, ports):
        assert {answers(ports["lb"]) for _ in range(4)} == {"A"}
        write_hook(tmp_path, to_port(ports["b"]))
        assert {answers(ports["lb"]) for _ in range(4)} == {"A"}  # compiled once: no change yet
        os.kill(proc.pid, signal.SIGHUP)
        # the old worker finishes gracefully: wait until only the new one answers, and until
        # the old one is gone (the master QUITs it 100 ms after the new one starts: before
        # that, four answers from the new one can be luck)
        wait_for(lambda: {answers(ports["lb"]) for _ in range(4)} == {"B"}, what="the reloaded hook")
        log = tmp_path / "error.log"
        wait_for(lambda: "exited with code 0" in log.read_text(), what="the old worker to exit")

        hook.write_text("balancer.set_current_peer(\n")  # broken
        os.kill(proc.pid, signal.SIGHUP)
        wait_for(lambda: "failed to load external Python file" in log.read_text(), what="the refusal")
        assert f'SyntaxError: \'(\' was never closed in {hook}:1' in log.read_text()
        assert {answers(ports["lb"]) for _ in range(4)} == {"B"}  # the old config keeps serving


def test_code_cache_off_picks_up_changes_without_reload(tmp_path: Path) -> None:
    write_hook(tmp_path, FIRST_PEER)
    with scriptlb(tmp_path, cache="off") as (_proc, ports):
        assert answers(ports["lb"]) == "A"
        write_hook(tmp_path, to_port(ports["b"]))
        assert {answers(ports["lb"]) for _ in range(3)} == {"B"}
