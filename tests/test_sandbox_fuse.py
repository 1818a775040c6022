"""The last-resort fuse: a watchdog process kills a worker stuck in one hook run (work inside a
single C call that no tick can interrupt), and retires a worker whose memory passes
python_memory_limit. Each case runs in its own process."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def python(code: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_a_hook_stuck_in_one_c_call_kills_the_worker() -> None:
    started = time.monotonic()
    done = python("""
        import time
        from scriptlb.hookrt import hooks
        from scriptlb.config.model import HookConf, PythonConf, Source
        from scriptlb.replay.synthetic import SyntheticExchange, SyntheticUpstream
        from scriptlb.sandbox import limits

        limits.install_worker_fuse(hard_seconds=0.3)
        hooks.BUILTINS["stuck"] = time.sleep  # stands for a C call the guards did not foresee
        hook = HookConf("block", None, "stuck(10)", Source("t.conf", 1))
        runner = hooks.HookRunner(hook, SyntheticUpstream([]), PythonConf(), log=lambda *a: None)
        print("running", flush=True)
        runner.run(SyntheticExchange("GET", "/", [], 1, None, 0))
        print("survived", flush=True)
    """)
    assert done.returncode == -signal.SIGKILL
    assert done.stdout == "running\n"
    assert "a hook run exceeded the hard limit of 0.3s, killing worker" in done.stderr
    assert time.monotonic() - started < 8


def test_runs_within_the_limit_are_left_alone() -> None:
    done = python("""
        import time
        from scriptlb.sandbox import limits

        fuse = limits.install_worker_fuse(hard_seconds=0.2)
        end = time.monotonic() + 0.8
        while time.monotonic() < end:   # many short runs, and idle time between them
            fuse.run_started()
            time.sleep(0.01)
            fuse.run_ended()
            time.sleep(0.05)
        fuse.stop()
        print("alive")
    """)
    assert (done.returncode, done.stdout) == (0, "alive\n"), done.stderr


def test_the_watchdog_exits_with_its_worker() -> None:
    done = python("""
        from scriptlb.sandbox import limits
        print(limits.install_worker_fuse(hard_seconds=5)._pid)
    """)
    watchdog = int(done.stdout)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _alive(watchdog):
        time.sleep(0.05)
    assert not _alive(watchdog)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def test_memory_limit_retires_the_worker_gracefully_without_capping_it() -> None:
    """Past the limit the watchdog sends SIGQUIT (graceful shutdown); no allocation fails."""
    done = python("""
        import resource, signal, sys, time
        from scriptlb.sandbox import limits

        quit = []
        signal.signal(signal.SIGQUIT, lambda *_: quit.append(1))
        fuse = limits.install_worker_fuse(hard_seconds=5, memory_bytes=200 << 20)
        print(resource.getrlimit(resource.RLIMIT_AS)[0] == resource.RLIM_INFINITY
              or resource.getrlimit(resource.RLIMIT_AS)[0] > (2 << 30))
        block = bytearray(300 << 20)  # touched: resident, between the limit and twice it
        for i in range(0, len(block), 4096):
            block[i] = 1
        deadline = time.monotonic() + 10
        while not quit and time.monotonic() < deadline:
            time.sleep(0.02)
        print("quit" if quit else "not asked")
        fuse.stop()
    """)
    assert (done.returncode, done.stdout) == (0, "True\nquit\n"), done.stderr
    assert "over python_memory_limit (200 MiB): shutting it down gracefully" in done.stderr


def test_deeply_nested_tuples_hash_without_crashing_the_worker() -> None:
    """tuple hashing recurses in C without Python's recursion check; the fuse raises the main
    thread's stack limit so what a hook can build does not overflow it."""
    done = python("""
        from scriptlb.sandbox import limits

        fuse = limits.install_worker_fuse(hard_seconds=30)
        t = ()
        for _ in range(400_000):
            t = (t,)
        print(hash(t) is not None)
        fuse.stop()
    """, timeout=60)
    assert (done.returncode, done.stdout) == (0, "True\n"), done.stderr


def test_the_watchdog_holds_no_file_descriptors_of_the_worker() -> None:
    done = python("""
        import os, socket, time
        from scriptlb.sandbox import limits

        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        fuse = limits.install_worker_fuse(hard_seconds=5)
        time.sleep(0.2)
        print(sorted(int(fd) for fd in os.listdir(f"/proc/{fuse._pid}/fd")))
        fuse.stop()
    """)
    assert done.returncode == 0, done.stderr
    assert all(fd <= 2 for fd in json.loads(done.stdout))


def test_a_worker_growing_past_twice_the_limit_is_killed() -> None:
    done = python("""
        import signal, time
        from scriptlb.sandbox import limits

        signal.signal(signal.SIGQUIT, lambda *_: None)  # a drain that keeps growing
        fuse = limits.install_worker_fuse(hard_seconds=5, memory_bytes=100 << 20)
        blocks = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            block = bytearray(50 << 20)
            for i in range(0, len(block), 4096):
                block[i] = 1
            blocks.append(block)
            if len(blocks) > 8:
                blocks.pop(0)
            time.sleep(0.05)
        print("survived")
    """)
    assert done.returncode == -signal.SIGKILL, done.stdout
    assert "twice python_memory_limit: killing it" in done.stderr

