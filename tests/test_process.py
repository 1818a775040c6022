"""The process model with real processes: `python -m scriptlb` on 127.0.0.1, signals, reloads.

Every process a test starts is killed by a finalizer (the whole tree: master, workers and, for
the daemon test, the detached master). Waits poll a condition with a bounded deadline.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import free_ports, wait_for

pytestmark = pytest.mark.slow

STARTUP_TIMEOUT = 15.0
ROOT = Path(__file__).resolve().parent.parent


def scriptlb_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "scriptlb", *args]


# --------------------------------------------------------------------------- small helpers


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def children(pid: int) -> set[int]:
    """Live child processes of ``pid`` (scans /proc: works without CONFIG_PROC_CHILDREN)."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[1]) == pid:
            found.add(int(entry))
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and all its descendants.

    The parent is frozen first (SIGSTOP) so a master cannot respawn a worker between the scan
    of its children and its own death; a new child would be orphaned and never cleaned up.
    """
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGSTOP)
    for child in children(pid):
        kill_tree(child)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def get(port: int, path: str = "/", timeout: float = 5.0) -> tuple[int, str]:
    """One request on a fresh connection: (status, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def try_get(port: int, path: str = "/") -> tuple[int, str] | None:
    try:
        return get(port, path, timeout=2.0)
    except OSError:
        return None


# --------------------------------------------------------------------------- a slow backend


class SlowBackend:
    """An HTTP/1.0-style backend on 127.0.0.1:0 that waits ``delay`` seconds before answering.

    ``received`` is set when a request head has arrived, so a test can act while the request is
    in flight through scriptlb.
    """

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.received = threading.Event()
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self._sock.settimeout(0.2)
        self.port = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._accept_thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._accept_thread.start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._answer, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5.0)
            head = b""
            with contextlib.suppress(OSError):
                while b"\r\n\r\n" not in head:
                    chunk = conn.recv(4096)
                    if not chunk:
                        return
                    head += chunk
            self.received.set()
            if self._stop.wait(self.delay):
                return
            body = b"slow done\n"
            with contextlib.suppress(OSError):
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                    % (len(body), body)
                )

    def close(self) -> None:
        self._stop.set()
        self._sock.close()
        self._accept_thread.join(2.0)
        for thread in self._threads:
            thread.join(2.0)


@pytest.fixture
def slow_backend() -> Iterator[Callable[[float], SlowBackend]]:
    made: list[SlowBackend] = []

    def make(delay: float) -> SlowBackend:
        backend = SlowBackend(delay)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.close()


# --------------------------------------------------------------------------- scriptlb instances


class Instance:
    """One scriptlb prefix directory: conf/scriptlb.conf, logs/, and the processes started on it."""

    def __init__(self, prefix: Path) -> None:
        self.prefix = prefix
        self.conf = prefix / "conf" / "scriptlb.conf"
        self.pid_file = prefix / "logs" / "scriptlb.pid"
        self.error_log = prefix / "logs" / "error.log"
        self.access_log = prefix / "logs" / "access.log"
        self.conf.parent.mkdir(parents=True, exist_ok=True)
        self.pid_file.parent.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None
        self._masters: set[int] = set()
        self._workers_seen: set[int] = set()  # killed at the end even if orphaned by then

    # ----- config

    def write(
        self,
        port: int,
        text: str = "gen1",
        workers: int = 2,
        main: str = "daemon off;",
        listen_options: str = "",
        backend: int | None = None,
        extra_listens: str = "",
        access_log: bool = False,
    ) -> None:
        access = f"access_log {self.access_log};" if access_log else ""
        slow = f"location /slow {{ proxy_pass http://127.0.0.1:{backend}; }}" if backend else ""
        self.conf.write_text(
            f"""
            {main}
            worker_processes {workers};
            pid {self.pid_file};
            error_log {self.error_log} notice;
            events {{ worker_connections 256; }}
            http {{
                {access}
                server {{
                    listen 127.0.0.1:{port} {listen_options};
                    {extra_listens}
                    location / {{ return 200 "{text} $pid\\n"; }}
                    {slow}
                }}
            }}
            """
        )

    # ----- processes

    def start(self, *args: str) -> subprocess.Popen[bytes]:
        """Start scriptlb on this prefix; stdout/stderr go to files (a full pipe must never
        block it), core dumps are off (a test may kill a worker with SIGSEGV)."""
        old_core = resource.getrlimit(resource.RLIMIT_CORE)
        resource.setrlimit(resource.RLIMIT_CORE, (0, old_core[1]))
        try:
            with open(self.prefix / "stdout", "wb") as out, open(self.prefix / "stderr", "wb") as err:
                self.proc = subprocess.Popen(
                    scriptlb_cmd("-p", str(self.prefix), "-c", str(self.conf), *args),
                    stdout=out,
                    stderr=err,
                    stdin=subprocess.DEVNULL,
                    cwd=self.prefix,
                )
        finally:
            resource.setrlimit(resource.RLIMIT_CORE, old_core)
        self._masters.add(self.proc.pid)
        return self.proc

    def cli(self, *args: str, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
        """Run a scriptlb command on this prefix to completion (``-s reload`` ...)."""
        return subprocess.run(
            scriptlb_cmd("-p", str(self.prefix), "-c", str(self.conf), *args),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.prefix,
            stdin=subprocess.DEVNULL,
        )

    def pid(self) -> int | None:
        """The pid in the pid file, if it holds one."""
        try:
            text = self.pid_file.read_text().strip()
        except FileNotFoundError:
            return None
        return int(text) if text.isdigit() else None

    def wait_ready(self, port: int) -> int:
        """Wait for the pid file and a first 200; the master's pid."""
        pid = wait_for(self.pid, STARTUP_TIMEOUT, "the pid file")
        assert isinstance(pid, int)
        self._masters.add(pid)
        wait_for(lambda: (try_get(port) or (0, ""))[0] == 200, STARTUP_TIMEOUT, "a first 200")
        return pid

    def workers(self) -> set[int]:
        pid = self.pid()
        found = children(pid) if pid else set()
        self._workers_seen |= found
        return found

    def wait_workers(self, count: int, without: int | None = None, what: str = "") -> set[int]:
        """Wait until the master has exactly ``count`` workers (none of them ``without``); one
        /proc snapshot per poll, so the set returned is the set that matched."""

        def matching() -> set[int] | None:
            found = self.workers()
            return found if len(found) == count and without not in found else None

        found = wait_for(matching, what=what or f"{count} workers")
        assert isinstance(found, set)
        return found

    def log_text(self) -> str:
        try:
            return self.error_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, needle: str, timeout: float = 10.0) -> str:
        wait_for(lambda: needle in self.log_text(), timeout, f"{needle!r} in the error log")
        return self.log_text()

    def wait_exit(self, timeout: float = 10.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def kill_all(self) -> None:
        for pid in list(self._masters):
            kill_tree(pid)
        for pid in self._workers_seen:
            if alive(pid):
                kill_tree(pid)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)


@pytest.fixture
def lb(tmp_path: Path) -> Iterator[Instance]:
    instance = Instance(tmp_path)
    yield instance
    instance.kill_all()


def served_by(port: int, attempts: int) -> set[str]:
    """The ``$pid`` values seen over ``attempts`` fresh connections."""
    pids = set()
    for _ in range(attempts):
        status, body = get(port)
        assert status == 200, body
        pids.add(body.split()[-1])
    return pids


# --------------------------------------------------------------------------- tests


def test_master_forks_workers_that_serve_and_owns_the_pid_file(lb: Instance) -> None:
    (port,) = free_ports(1)
    lb.write(port, workers=2, listen_options="reuseport")
    lb.start()
    master = lb.wait_ready(port)
    assert lb.proc is not None and master == lb.proc.pid
    workers = lb.wait_workers(2, what="2 workers")
    # reuseport: the kernel spreads fresh connections over both workers' sockets
    seen: set[str] = set()
    for _ in range(20):
        seen |= served_by(port, 10)
        if len(seen) == 2:
            break
    assert seen == {str(pid) for pid in workers}
    log = lb.log_text()
    for pid in workers:
        assert f"start worker process {pid}" in log
    assert Path(f"/proc/{master}/comm").read_text() == "scriptlb master\n"
    assert {Path(f"/proc/{pid}/comm").read_text() for pid in workers} == {"scriptlb worker\n"}

    os.kill(master, signal.SIGQUIT)
    assert lb.wait_exit() == 0
    assert not lb.pid_file.exists()
    assert not any(alive(pid) for pid in workers)
    assert "signal 3 (SIGQUIT) received" in lb.wait_log(f"{master}#0: exit\n")


def test_reload_switches_to_the_new_config_and_retires_old_workers(lb: Instance) -> None:
    (port,) = free_ports(1)
    lb.write(port, text="gen1", workers=2)
    lb.start()
    master = lb.wait_ready(port)
    old_workers = lb.wait_workers(2, what="2 workers")

    lb.write(port, text="gen2", workers=3)
    result = lb.cli("-s", "reload")
    assert result.returncode == 0, result.stderr
    wait_for(lambda: (try_get(port) or (0, ""))[1].startswith("gen2"), what="gen2 answers")
    wait_for(lambda: not any(alive(pid) for pid in old_workers), what="old workers to exit")
    new_workers = lb.wait_workers(3, what="3 new workers")
    assert not new_workers & old_workers
    assert lb.pid() == master
    log = lb.wait_log("reconfiguring")
    assert "signal 1 (SIGHUP) received from" in log
    for pid in old_workers:
        assert f"worker process {pid} exited with code 0" in lb.wait_log(f"worker process {pid} exited")


def test_broken_config_on_reload_keeps_the_old_one_serving(lb: Instance) -> None:
    (port,) = free_ports(1)
    lb.write(port, text="gen1")
    lb.start()
    lb.wait_ready(port)
    workers = lb.wait_workers(2, what="2 workers")

    good = lb.conf.read_text()
    lb.conf.write_text(good.replace("events", "fooo on;\nevents", 1))
    os.kill(lb.pid() or 0, signal.SIGHUP)
    log = lb.wait_log('unknown directive "fooo"')
    line = next(line for line in log.splitlines() if "fooo" in line)
    assert "[emerg]" in line and f"{lb.conf}:" in line
    assert get(port)[1].startswith("gen1")
    assert lb.workers() == workers  # nothing was restarted


def connect_refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def test_reload_opens_new_listeners_closes_dropped_ones_and_survives_a_busy_port(lb: Instance) -> None:
    port_a, port_b = free_ports(2)
    lb.write(port_a, text="gen1")
    lb.start()
    lb.wait_ready(port_a)

    lb.write(port_a, text="gen2", extra_listens=f"listen 127.0.0.1:{port_b};")
    os.kill(lb.pid() or 0, signal.SIGHUP)
    wait_for(lambda: (try_get(port_b) or (0, ""))[1].startswith("gen2"), what="gen2 on the new port")
    old_gone = lb.wait_workers(2, what="only the 2 new workers")

    holder = socket.socket()  # a port someone else holds: the reload must fail, not the server
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    busy = holder.getsockname()[1]
    try:
        lb.write(port_a, text="gen3", extra_listens=f"listen 127.0.0.1:{busy};")
        os.kill(lb.pid() or 0, signal.SIGHUP)
        lb.wait_log(f"bind() to 127.0.0.1:{busy} failed (98: Address already in use)")
    finally:
        holder.close()
    assert get(port_a)[1].startswith("gen2") and get(port_b)[1].startswith("gen2")
    assert lb.workers() == old_gone  # the failed reload started nothing and stopped nothing

    lb.write(port_b, text="gen4")
    os.kill(lb.pid() or 0, signal.SIGHUP)
    wait_for(lambda: (try_get(port_b) or (0, ""))[1].startswith("gen4"), what="gen4")
    wait_for(lambda: connect_refused(port_a), what="the dropped port to close")


@pytest.mark.parametrize(
    ("listen_options", "worker_counts"),
    [
        ("", (2, 3, 1, 2, 3, 2)),  # one shared socket; the worker count changes too
        # one socket per worker slot, taken over by the new worker of the same slot. (A slot that
        # disappears when worker_processes shrinks takes its queued connections with it, in nginx
        # too, so the count stays put here.)
        ("reuseport", (2, 2, 2, 2, 2, 2)),
    ],
    ids=["shared-socket", "reuseport"],
)
def test_no_failed_request_while_reloading_under_load(
    lb: Instance, listen_options: str, worker_counts: tuple[int, ...]
) -> None:
    (port,) = free_ports(1)
    lb.write(port, text="gen0", workers=worker_counts[0], listen_options=listen_options)
    lb.start()
    lb.wait_ready(port)

    errors: list[str] = []
    counts = {"fresh": 0, "keepalive": 0, "keepalive_retries": 0}
    stop = threading.Event()

    def fresh_connections() -> None:
        while not stop.is_set():
            try:
                status, body = get(port)
            except OSError as err:
                errors.append(f"fresh: {err!r}")
                continue
            if status != 200:
                errors.append(f"fresh: {status} {body!r}")
            counts["fresh"] += 1

    def keepalive_connection() -> None:
        conn: http.client.HTTPConnection | None = None
        reused = False
        while not stop.is_set():
            if conn is None:
                conn, reused = http.client.HTTPConnection("127.0.0.1", port, timeout=5), False
            try:
                conn.request("GET", "/")
                response = conn.getresponse()
                body = response.read().decode()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as err:
                conn.close()
                conn = None
                # The server may close an idle keep-alive connection (an old worker retiring)
                # just as a request is sent on it: every HTTP client retries that case once on
                # a new connection (RFC 9112 9.3.1). On a fresh connection it is an error.
                if reused:
                    counts["keepalive_retries"] += 1
                else:
                    errors.append(f"keepalive: {err!r} on a new connection")
                continue
            except OSError as err:
                errors.append(f"keepalive: {err!r}")
                conn.close()
                conn = None
                continue
            if response.status != 200:
                errors.append(f"keepalive: {response.status} {body!r}")
            counts["keepalive"] += 1
            reused = True
            if response.will_close:
                conn.close()
                conn = None
        if conn is not None:
            conn.close()

    threads = [
        threading.Thread(target=fresh_connections, daemon=True),
        threading.Thread(target=fresh_connections, daemon=True),
        threading.Thread(target=keepalive_connection, daemon=True),
        threading.Thread(target=keepalive_connection, daemon=True),
    ]
    for thread in threads:
        thread.start()
    try:
        for generation, workers in enumerate(worker_counts[1:], start=1):
            before = dict(counts)
            lb.write(port, text=f"gen{generation}", workers=workers, listen_options=listen_options)
            os.kill(lb.pid() or 0, signal.SIGHUP)
            wait_for(
                lambda g=generation: (try_get(port) or (0, ""))[1].startswith(f"gen{g}"),
                what=f"gen{generation} answers",
            )
            # traffic kept flowing on both kinds of connection through this reload
            wait_for(
                lambda b=before: all(counts[kind] > b[kind] + 50 for kind in ("fresh", "keepalive")),
                what="requests after the reload",
            )
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
    assert errors == []
    assert counts["fresh"] > 250 and counts["keepalive"] > 250


def test_quit_lets_an_in_flight_request_finish(lb: Instance, slow_backend) -> None:
    backend = slow_backend(1.0)
    (port,) = free_ports(1)
    lb.write(port, backend=backend.port, workers=1)
    lb.start()
    master = lb.wait_ready(port)

    result: list[object] = []
    client = threading.Thread(target=lambda: result.append(get(port, "/slow", timeout=10)), daemon=True)
    client.start()
    assert backend.received.wait(5), "the request did not reach the backend"
    os.kill(master, signal.SIGQUIT)
    client.join(10)
    assert result == [(200, "slow done\n")]
    assert lb.wait_exit() == 0
    assert not lb.pid_file.exists()
    log = lb.log_text()
    assert "signal 3 (SIGQUIT) received" in log and "shutting down" in log


def test_reload_lets_the_old_workers_finish_in_flight_requests(lb: Instance, slow_backend) -> None:
    backend = slow_backend(1.0)
    (port,) = free_ports(1)
    lb.write(port, text="gen1", backend=backend.port, workers=1)
    lb.start()
    lb.wait_ready(port)
    (old_worker,) = lb.wait_workers(1, what="the worker")

    result: list[object] = []
    client = threading.Thread(target=lambda: result.append(get(port, "/slow", timeout=10)), daemon=True)
    client.start()
    assert backend.received.wait(5), "the request did not reach the backend"
    lb.write(port, text="gen2", backend=backend.port, workers=1)
    os.kill(lb.pid() or 0, signal.SIGHUP)
    wait_for(lambda: (try_get(port) or (0, ""))[1].startswith("gen2"), what="gen2 answers")
    assert alive(old_worker)  # still finishing the slow request
    client.join(10)
    assert result == [(200, "slow done\n")]
    wait_for(lambda: not alive(old_worker), what="the old worker to exit after its last request")


def test_term_stops_at_once_without_waiting_for_requests(lb: Instance, slow_backend) -> None:
    backend = slow_backend(30.0)
    (port,) = free_ports(1)
    lb.write(port, backend=backend.port, workers=2)
    lb.start()
    master = lb.wait_ready(port)
    workers = lb.wait_workers(2)

    outcome: list[object] = []

    def slow_request() -> None:
        try:
            outcome.append(get(port, "/slow", timeout=20))
        except (OSError, http.client.HTTPException) as err:
            outcome.append(err)

    client = threading.Thread(target=slow_request, daemon=True)
    client.start()
    assert backend.received.wait(5)
    started = time.monotonic()
    os.kill(master, signal.SIGTERM)
    assert lb.wait_exit(timeout=10) == 0
    assert time.monotonic() - started < 5
    client.join(10)
    assert outcome and not isinstance(outcome[0], tuple), outcome  # the request was cut short
    assert not any(alive(pid) for pid in workers)
    assert not lb.pid_file.exists()


def test_usr1_reopens_logs_after_rotation(lb: Instance) -> None:
    (port,) = free_ports(1)
    lb.write(port, access_log=True)
    lb.start()
    lb.wait_ready(port)
    wait_for(lambda: lb.access_log.exists(), what="the access log")

    rotated_error, rotated_access = lb.error_log.with_suffix(".log.1"), lb.access_log.with_suffix(".log.1")
    lb.error_log.rename(rotated_error)
    lb.access_log.rename(rotated_access)
    result = lb.cli("-s", "reopen")
    assert result.returncode == 0, result.stderr
    # nginx logs "reopening logs" just before reopening: it lands in the rotated file
    wait_for(lambda: "reopening logs" in rotated_error.read_text(), what="reopening logs")
    assert "signal 10 (SIGUSR1) received" in rotated_error.read_text()
    wait_for(lb.error_log.exists, what="a new error log")
    os.kill(lb.pid() or 0, signal.SIGHUP)  # the master's next lines go to the new file
    lb.wait_log("reconfiguring")
    assert "reconfiguring" not in rotated_error.read_text()

    def new_access_line() -> bool:
        get(port, "/after-reopen")
        return lb.access_log.exists() and "/after-reopen" in lb.access_log.read_text()

    wait_for(new_access_line, what="an access line in the new access log")
    assert "/after-reopen" not in rotated_access.read_text()


@pytest.mark.parametrize("signo", [signal.SIGKILL, signal.SIGSEGV])
def test_a_worker_that_dies_is_replaced(lb: Instance, signo: signal.Signals) -> None:
    (port,) = free_ports(1)
    lb.write(port, workers=2)
    lb.start()
    lb.wait_ready(port)
    workers = lb.wait_workers(2, what="2 workers")

    victim = min(workers)
    os.kill(victim, signo)
    replaced = lb.wait_workers(2, without=victim, what="a replacement")
    assert (replaced - workers) and (workers - {victim}) <= replaced
    log = lb.wait_log(f"worker process {victim} exited on signal {int(signo)}")
    new_pid = next(iter(replaced - workers))
    assert f"start worker process {new_pid}" in lb.wait_log(f"start worker process {new_pid}")
    assert "[alert]" in next(line for line in log.splitlines() if f"{victim} exited" in line)
    assert get(port)[0] == 200


def listen_backlog(port: int) -> int | None:
    """The accept-queue limit of the socket listening on 127.0.0.1:port (ss's Send-Q)."""
    out = subprocess.run(
        ["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, timeout=10, check=True
    ).stdout.split()
    return int(out[2]) if len(out) > 2 else None


@pytest.mark.skipif(not shutil.which("ss"), reason="needs ss (iproute2)")
def test_listen_backlog_is_applied(lb: Instance) -> None:
    """``listen ... backlog=N`` as nginx; a worker must not listen() again with another value."""
    (port,) = free_ports(1)
    lb.write(port, listen_options="backlog=37")
    lb.start()
    lb.wait_ready(port)
    lb.wait_workers(2)
    assert get(port)[0] == 200  # the workers have started serving
    assert listen_backlog(port) == 37


def test_a_specific_address_and_a_wildcard_on_one_port(lb: Instance) -> None:
    """nginx binds only *:port and picks the server block by the connection's local address."""
    (port,) = free_ports(1)
    lb.write(port)  # for the paths; replaced below
    lb.conf.write_text(
        f"""
        daemon off;
        worker_processes 2;
        pid {lb.pid_file};
        error_log {lb.error_log} notice;
        events {{ worker_connections 64; }}
        http {{
            server {{ listen {port}; location / {{ return 200 "wildcard\\n"; }} }}
            server {{ listen 127.0.0.1:{port}; location / {{ return 200 "specific\\n"; }} }}
        }}
        """
    )
    lb.start()
    lb.wait_ready(port)
    assert get(port) == (200, "specific\n")  # to 127.0.0.1

    conn = http.client.HTTPConnection("127.0.0.2", port, timeout=5)  # any other local address
    try:
        conn.request("GET", "/")
        response = conn.getresponse()
        assert (response.status, response.read().decode()) == (200, "wildcard\n")
    finally:
        conn.close()


def test_workers_stop_when_the_master_is_killed(lb: Instance) -> None:
    """Not nginx (its workers outlive a SIGKILLed master): orphans would hold the port."""
    (port,) = free_ports(1)
    lb.write(port, workers=2)
    lb.start()
    master = lb.wait_ready(port)
    workers = lb.wait_workers(2, what="2 workers")
    os.kill(master, signal.SIGKILL)
    wait_for(lambda: not any(alive(pid) for pid in workers), what="the orphaned workers to exit")
    wait_for(lambda: connect_refused(port), what="the port to be free")


def test_master_process_off_serves_from_one_process(lb: Instance) -> None:
    (port,) = free_ports(1)
    lb.write(port, main="daemon off; master_process off;", workers=4)
    lb.start()
    pid = lb.wait_ready(port)
    assert lb.proc is not None and pid == lb.proc.pid
    assert served_by(port, 5) == {str(pid)}
    assert children(pid) == set()
    os.kill(pid, signal.SIGHUP)  # not supported here: a warning, and it keeps serving
    lb.wait_log('reloading is not supported with "master_process off"')
    assert get(port)[0] == 200
    os.kill(pid, signal.SIGQUIT)
    assert lb.wait_exit() == 0
    assert not lb.pid_file.exists()


def test_daemon_detaches_and_stops_on_s_stop(lb: Instance) -> None:
    (port,) = free_ports(1)
    lb.write(port, main="daemon on;", workers=2)
    started = lb.cli(timeout=15)  # returns once detached
    assert started.returncode == 0, started.stderr
    assert lb.pid() is not None  # the command returns only after the daemon wrote its pid file
    master = lb.wait_ready(port)
    assert alive(master)
    with open(f"/proc/{master}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ppid, session = int(fields[1]), int(fields[3])
    assert session != os.getsid(0) and session != master  # own session, not its leader
    assert ppid != os.getpid()
    workers = wait_for(lambda: len(children(master)) == 2 and children(master), what="2 workers")

    stopped = lb.cli("-s", "stop")
    assert stopped.returncode == 0, stopped.stderr
    wait_for(lambda: not alive(master), what="the daemon to exit")
    assert not any(alive(pid) for pid in workers)
    assert not lb.pid_file.exists()
    assert try_get(port) is None


def test_a_daemon_that_cannot_start_fails_the_command(lb: Instance) -> None:
    (port,) = free_ports(1)
    lb.write(port, main="daemon on;")
    # a missing directory would be created: a regular file where the directory should be
    (lb.prefix / "not-a-dir").write_text("")
    missing = lb.prefix / "not-a-dir" / "scriptlb.pid"
    lb.conf.write_text(lb.conf.read_text().replace(f"pid {lb.pid_file};", f"pid {missing};"))
    result = lb.cli(timeout=15)
    assert result.returncode == 1
    assert "the daemon could not start" in result.stderr
    assert f'open() "{missing}" failed (20: Not a directory)' in lb.log_text()
    wait_for(lambda: connect_refused(port), what="the port to be closed again")


def test_s_signal_reports_nginx_errors(lb: Instance) -> None:
    (port,) = free_ports(1)
    lb.write(port)
    missing = lb.cli("-s", "reload")
    assert missing.returncode == 1
    assert f'[error] open() "{lb.pid_file}" failed (2: No such file or directory)' in missing.stderr

    lb.pid_file.write_text("\n")
    invalid = lb.cli("-s", "quit")
    assert invalid.returncode == 1
    assert f'invalid PID number "" in "{lb.pid_file}"' in invalid.stderr

    gone = subprocess.Popen(["true"])
    gone.wait()
    lb.pid_file.write_text(f"{gone.pid}\n")
    dead = lb.cli("-s", "reopen")
    assert dead.returncode == 1
    assert f"[alert] kill({gone.pid}, {int(signal.SIGUSR1)}) failed (3: No such process)" in dead.stderr


def test_busy_port_fails_the_start_with_nginx_message(lb: Instance) -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    port = holder.getsockname()[1]
    try:
        lb.write(port)
        result = lb.cli(timeout=20)
    finally:
        holder.close()
    assert result.returncode == 1
    assert f"bind() to 127.0.0.1:{port} failed (98: Address already in use)" in result.stderr + lb.log_text()
    assert "still could not bind()" in result.stderr + lb.log_text()
    assert not lb.pid_file.exists()


def ipv6_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


def raw_get(family: socket.AddressFamily, address: object) -> bytes:
    """GET / over any socket family, HTTP/1.0 so the server closes; the whole response."""
    client = socket.socket(family, socket.SOCK_STREAM)
    client.settimeout(5)
    try:
        client.connect(address)
        client.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        data = b""
        while chunk := client.recv(4096):
            data += chunk
    finally:
        client.close()
    return data


def test_unix_and_ipv6_listeners_and_a_stale_socket_file(lb: Instance) -> None:
    port, port6 = free_ports(2)
    path = lb.prefix / "lb.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))  # bound and closed without unlink: what a crashed server leaves
    stale.close()
    listens = f"listen unix:{path};"
    if ipv6_available():
        listens += f" listen [::1]:{port6};"
    lb.write(port, extra_listens=listens)
    lb.start()
    master = lb.wait_ready(port)

    assert raw_get(socket.AF_UNIX, str(path)).startswith(b"HTTP/1.1 200 ")
    assert stat_mode(path) & 0o777 == 0o666
    if ipv6_available():
        assert raw_get(socket.AF_INET6, ("::1", port6)).startswith(b"HTTP/1.1 200 ")
    os.kill(master, signal.SIGQUIT)
    assert lb.wait_exit() == 0
    assert not path.exists()  # the master removes its unix socket files on exit


def stat_mode(path: Path) -> int:
    return path.stat().st_mode


# --------------------------------------------------------------------------- stand-in workers
# Behaviours the real worker cannot be made to show on demand (crash at start, ignore TERM,
# exit with nginx's fatal code) come from a stand-in worker entry run by the real master code
# in a real process.


class StandIn:
    """``master.run`` in a child process with ``worker_entry`` = the given function body."""

    def __init__(self, tmp_path: Path, body: str, workers: int = 1) -> None:
        self.error_log = tmp_path / "error.log"
        self.pid_file = tmp_path / "x.pid"
        script = tmp_path / "standin.py"
        script.write_text(
            "import os, signal, sys, time\n"
            "from scriptlb.process import master\n"
            "from scriptlb.config.model import ErrorLogConf, MainConf\n"
            f"conf = MainConf(conf_file={str(tmp_path / 'x.conf')!r}, prefix={str(tmp_path)!r},\n"
            f"                worker_processes={workers}, daemon=False, pid={str(self.pid_file)!r},\n"
            f"                error_log=(ErrorLogConf({str(self.error_log)!r}, 'notice'),))\n"
            "def entry(conf, listeners, worker_id, worker_count):\n"
            + "".join(f"    {line}\n" for line in body.splitlines())
            + "sys.exit(master.run(conf, worker_entry=entry))\n"
        )
        self.proc = subprocess.Popen(
            [sys.executable, str(script)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        wait_for(self.pid_file.exists, what="the pid file")

    def log(self) -> str:
        return self.error_log.read_text()

    def kill(self) -> None:
        kill_tree(self.proc.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)


@pytest.fixture
def standin(tmp_path: Path) -> Iterator[Callable[..., StandIn]]:
    started: list[StandIn] = []

    def start(body: str, workers: int = 1) -> StandIn:
        started.append(StandIn(tmp_path, body, workers))
        return started[-1]

    yield start
    for instance in started:
        instance.kill()


def test_a_worker_that_dies_at_start_is_respawned_with_backoff(standin: Callable[..., StandIn]) -> None:
    """The master keeps respawning a worker that dies at once, slowly, and still obeys QUIT."""
    master = standin("os._exit(1)")
    time.sleep(1.5)  # the observation window itself: how many spawns fit in 1.5 s
    master.proc.send_signal(signal.SIGQUIT)
    assert master.proc.wait(10) == 0
    log = master.log()
    spawns = log.count("start worker process ")
    assert 3 <= spawns <= 12, log  # immediate respawns would be hundreds
    assert "worker #0 died 3 times in a row within 1s of its start, respawning in 0.2s" in log
    assert "exited with code 1" in log


def test_fast_stop_kills_a_worker_that_ignores_term(
    standin: Callable[..., StandIn], tmp_path: Path
) -> None:
    master = standin(
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "open(f'{conf.prefix}/ignoring-{os.getpid()}', 'w').close()\n"
        "time.sleep(60)",
        workers=2,
    )
    wait_for(lambda: len(list(tmp_path.glob("ignoring-*"))) == 2, what="2 workers ignoring TERM")
    started = time.monotonic()
    master.proc.send_signal(signal.SIGTERM)
    assert master.proc.wait(10) == 0
    assert 1.0 < time.monotonic() - started < 5.0  # TERM, a grace period, then SIGKILL
    assert master.log().count("exited on signal 9") == 2
    assert not master.pid_file.exists()


def test_exit_code_2_is_fatal_and_not_respawned(standin: Callable[..., StandIn]) -> None:
    master = standin("sys.exit(2)")
    log = wait_for(lambda: "cannot be respawned" in master.log() and master.log(), what="the fatal line")
    assert isinstance(log, str)
    assert "exited with fatal code 2 and cannot be respawned" in log
    time.sleep(0.3)  # an observation window: a respawn would happen at once
    assert master.log().count("start worker process ") == 1
    master.proc.send_signal(signal.SIGQUIT)
    assert master.proc.wait(10) == 0


def test_signals_before_the_worker_installs_its_handlers(standin: Callable[..., StandIn]) -> None:
    """Between fork and worker.run's own handlers: HUP is ignored (as nginx workers do) and QUIT
    stops the worker cleanly (its default action would be a core dump)."""
    master = standin("time.sleep(60)", workers=2)
    wait_for(lambda: master.log().count("start worker process ") == 2, what="2 workers")
    log = master.log()
    workers = [int(line.rsplit(" ", 1)[1]) for line in log.splitlines() if "start worker process " in line]
    os.kill(workers[0], signal.SIGHUP)
    os.kill(workers[0], signal.SIGUSR1)
    master.proc.send_signal(signal.SIGQUIT)
    assert master.proc.wait(10) == 0
    log = master.log()
    assert all(f"worker process {pid} exited with code 0" in log for pid in workers), log
    assert "exited on signal" not in log
