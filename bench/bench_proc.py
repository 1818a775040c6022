"""Process control and /proc sampling for the benchmark harness.

Every process the harness starts goes through ``Procs.start``: it runs in its own process group
(``start_new_session``), optionally pinned with ``taskset``, with its output in a log file. The
harness calls ``Procs.stop_all`` in a ``finally`` block, from ``atexit`` and from its SIGINT/SIGTERM
handlers, so nothing it started outlives it. Only process groups the harness created are
signalled, never processes found by name.

The /proc readers work on any Linux process (the smoke test samples its own process):
``tree_pids`` (a PID and its descendants), ``cpu_seconds`` (utime+stime of a tree) and
``rss_kib`` (VmRSS or VmHWM, summed over a tree).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import resource
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- /proc sampling


def _read_stat(pid: int) -> tuple[int, int, int] | None:
    """(ppid, utime, stime) in clock ticks, or None if the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # the command name (field 2) may contain spaces and parentheses: split after the last ')'
    rest = data[data.rindex(b")") + 2 :].split()
    # rest[0] is field 3 (state); ppid is field 4, utime 14, stime 15
    return int(rest[1]), int(rest[11]), int(rest[12])


def children_map() -> dict[int, list[int]]:
    """ppid -> [pid, ...] for every process visible in /proc."""
    out: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        st = _read_stat(int(name))
        if st is not None:
            out.setdefault(st[0], []).append(int(name))
    return out


def tree_pids(root: int) -> list[int]:
    """``root`` and all its descendants (those alive now), root first."""
    kids = children_map()
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid in out:
            continue
        if _read_stat(pid) is None:
            continue
        out.append(pid)
        todo.extend(kids.get(pid, ()))
    return out


def cpu_ticks(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        st = _read_stat(pid)
        if st is not None:
            total += st[1] + st[2]
    return total


def cpu_seconds(root: int) -> float:
    """utime+stime of ``root``'s process tree, in seconds (exited children are not counted)."""
    return cpu_ticks(tree_pids(root)) / CLK_TCK


def cpu_split(root: int) -> tuple[float, float]:
    """(user, system) CPU seconds of ``root``'s process tree."""
    user = system = 0
    for pid in tree_pids(root):
        st = _read_stat(pid)
        if st is not None:
            user += st[1]
            system += st[2]
    return user / CLK_TCK, system / CLK_TCK


def status_kib(pid: int, key: str) -> int:
    """A ``kB`` field of /proc/PID/status (``VmRSS``, ``VmHWM``), 0 if absent."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_kib(root: int, key: str = "VmRSS") -> int:
    """Sum of ``key`` over ``root``'s process tree, in KiB."""
    return sum(status_kib(pid, key) for pid in tree_pids(root))


def core_ticks(cpus: set[int]) -> tuple[int, int]:
    """(busy, steal) clock ticks summed over ``cpus`` from /proc/stat (busy excludes idle and
    iowait; steal is time the hypervisor gave to others)."""
    busy = steal = 0
    with open("/proc/stat") as f:
        for line in f:
            if not line.startswith("cpu") or line.startswith("cpu "):
                continue
            parts = line.split()
            if int(parts[0][3:]) not in cpus:
                continue
            v = [int(x) for x in parts[1:]]
            # user nice system idle iowait irq softirq steal guest guest_nice
            busy += v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)
            steal += v[7] if len(v) > 7 else 0
    return busy, steal


# --------------------------------------------------------------------------- networking helpers


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports on 127.0.0.1 that were free a moment ago."""
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def port_open(port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


def http_get(port: int, path: str = "/", timeout: float = 2.0) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request with Connection: close; (status, lower-cased headers, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode())
        buf = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1]) if lines and len(lines[0].split()) > 1 else 0
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers, body


def stub_status(port: int) -> dict[str, int]:
    """nginx stub_status counters: active, accepts, handled, requests (the poll itself counts as
    one accepted connection and one request)."""
    return parse_stub_status(http_get(port, "/status")[2])


def parse_stub_status(body: bytes) -> dict[str, int]:
    # "Active connections: A \nserver accepts handled requests\n B C D \nReading: ..."
    nums = [int(x) for x in body.split() if x.isdigit()]
    return {"active": nums[0], "accepts": nums[1], "handled": nums[2], "requests": nums[3]}


# --------------------------------------------------------------------------- process control


def raise_nofile() -> None:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def nofile_limit(hard: bool = False) -> int:
    soft, hard_ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return hard_ if hard else soft


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, n: int = 15) -> str:
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])


@dataclass
class Procs:
    """Every process group the harness started; ``stop_all`` ends them (TERM, then KILL)."""

    logdir: Path
    procs: list[Proc] = field(default_factory=list)
    taskset: str | None = field(default_factory=lambda: shutil.which("taskset"))

    def start(self, name: str, argv: list[str], cpus: str | None = None, cwd: str | None = None,
              env: dict[str, str] | None = None) -> Proc:
        if cpus is not None and self.taskset:
            argv = [self.taskset, "-c", cpus, *argv]
        self.logdir.mkdir(parents=True, exist_ok=True)
        log = self.logdir / f"{name}.log"
        with open(log, "wb") as out:
            p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                 cwd=cwd, env=env, start_new_session=True)
        proc = Proc(name, p, log)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc, timeout: float = 5.0) -> None:
        if proc.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        # the group may still hold workers after the leader exited: KILL what is left of it
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(2.0)
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in list(reversed(self.procs)):
            self.stop(proc)


_REGISTRY: list[Procs] = []


def install_cleanup(procs: Procs) -> None:
    """Stop ``procs`` at interpreter exit and turn SIGTERM/SIGHUP into SystemExit (so ``finally``
    blocks run); SIGINT already raises KeyboardInterrupt."""
    _REGISTRY.append(procs)
    atexit.register(procs.stop_all)

    def _exit(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _exit)
    # a shell without job control starts background jobs with SIGINT ignored: take it back
    signal.signal(signal.SIGINT, signal.default_int_handler)


def wait_port(port: int, proc: Proc | None = None, timeout: float = 10.0) -> bool:
    """Wait until 127.0.0.1:port accepts; False if ``proc`` died or the time ran out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_open(port):
            return True
        if proc is not None and not proc.alive():
            return False
        time.sleep(0.05)
    return False
