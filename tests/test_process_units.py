"""In-process tests of the process model's pieces: listening sockets, the pid file, signal text."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from scriptlb.config.model import HttpConf, ListenConf, MainConf, ServerConf
from scriptlb.process import daemon
from scriptlb.process.listeners import ListenError, ListenerSet, address_text, configured_listens
from scriptlb.process.signals import Received


def main_conf(*listens: ListenConf, workers: int = 2) -> MainConf:
    server = ServerConf(listens=listens, server_names=("",), locations=())
    http = HttpConf(upstreams={}, servers=(server,), log_formats={})
    return MainConf(conf_file="/x.conf", prefix="/", worker_processes=workers, http=http)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def opened() -> Iterator[list[ListenerSet]]:
    """ListenerSets a test opened; all closed afterwards."""
    sets: list[ListenerSet] = []
    yield sets
    for listener_set in sets:
        listener_set.close()


def accepts(sock: socket.socket) -> bool:
    """A connection to ``sock`` lands in its accept queue."""
    with socket.create_connection(sock.getsockname()[:2], timeout=2):
        pass
    sock.settimeout(2)
    try:
        conn, _ = sock.accept()
    finally:
        sock.setblocking(False)
    conn.close()
    return True


def _ss_backlog(port: int) -> int | None:
    """The accept-queue limit ss reports for 127.0.0.1:port (None without ss)."""
    if shutil.which("ss") is None:
        return 7  # nothing to compare against: accept the configured value
    out = subprocess.run(
        ["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, timeout=10, check=True
    ).stdout.split()
    return int(out[2]) if len(out) > 2 else None


# --------------------------------------------------------------------------- listeners


def test_address_text_is_nginx_addr_text() -> None:
    assert address_text(ListenConf("127.0.0.1", 80)) == "127.0.0.1:80"
    assert address_text(ListenConf("::1", 8080)) == "[::1]:8080"
    assert address_text(ListenConf(None, 0, unix_path="/run/lb.sock")) == "unix:/run/lb.sock"


def test_one_socket_per_key_shared_by_all_workers(opened: list[ListenerSet]) -> None:
    port = free_port()
    listeners = ListenerSet.open(main_conf(ListenConf("127.0.0.1", port, backlog=7)), 2)
    opened.append(listeners)
    key = ("127.0.0.1", port, None)
    first, second = listeners.for_worker(0), listeners.for_worker(1)
    assert list(first) == [key] and first[key] is second[key]
    sock = first[key]
    assert _ss_backlog(port) == 7
    assert sock.getblocking() is False
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1
    assert listeners.not_for_worker(0) == []
    assert accepts(sock)


def test_reuseport_gives_each_worker_its_own_socket(opened: list[ListenerSet]) -> None:
    port = free_port()
    listeners = ListenerSet.open(main_conf(ListenConf("127.0.0.1", port, reuseport=True)), 3)
    opened.append(listeners)
    key = ("127.0.0.1", port, None)
    per_worker = [listeners.for_worker(w)[key] for w in range(3)]
    assert len({id(sock) for sock in per_worker}) == 3
    for sock in per_worker:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
    assert set(map(id, listeners.not_for_worker(1))) == {id(per_worker[0]), id(per_worker[2])}


def test_a_specific_address_shares_the_wildcard_socket_of_its_port(opened: list[ListenerSet]) -> None:
    port = free_port()
    conf = main_conf(ListenConf("0.0.0.0", port), ListenConf("127.0.0.1", port))
    listeners = ListenerSet.open(conf, 1)
    opened.append(listeners)
    sockets = listeners.for_worker(0)
    assert sockets[("0.0.0.0", port, None)] is sockets[("127.0.0.1", port, None)]
    assert len(list(listeners.sockets())) == 1


def test_listen_options_merge_per_address() -> None:
    port = free_port()
    conf = main_conf(ListenConf("127.0.0.1", port, backlog=5), ListenConf("127.0.0.1", port, reuseport=True))
    (merged,) = configured_listens(conf).values()
    assert merged.reuseport and merged.backlog == 5


def test_reload_takes_over_kept_sockets_and_closes_dropped_ones(opened: list[ListenerSet]) -> None:
    kept_port, dropped_port, new_port = free_port(), free_port(), free_port()
    old = ListenerSet.open(
        main_conf(ListenConf("127.0.0.1", kept_port), ListenConf("127.0.0.1", dropped_port)), 2
    )
    opened.append(old)
    kept_sock = old.for_worker(0)[("127.0.0.1", kept_port, None)]
    dropped_sock = old.for_worker(0)[("127.0.0.1", dropped_port, None)]

    new = ListenerSet.open(
        main_conf(ListenConf("127.0.0.1", kept_port), ListenConf("127.0.0.1", new_port)), 2, previous=old
    )
    opened.append(new)
    old.close_unused(new)
    assert new.for_worker(0)[("127.0.0.1", kept_port, None)] is kept_sock  # queue preserved
    assert kept_sock.fileno() != -1 and dropped_sock.fileno() == -1
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", dropped_port), timeout=2).close()
    assert accepts(new.for_worker(1)[("127.0.0.1", new_port, None)])


def test_a_failed_open_closes_what_it_opened_and_leaves_the_previous_set_alone(
    opened: list[ListenerSet],
) -> None:
    kept_port, fresh_port = free_port(), free_port()
    old = ListenerSet.open(main_conf(ListenConf("127.0.0.1", kept_port)), 1)
    opened.append(old)
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    busy_port = holder.getsockname()[1]
    logged: list[tuple[str, str]] = []
    conf = main_conf(*(ListenConf("127.0.0.1", port) for port in (kept_port, fresh_port, busy_port)))
    try:
        with pytest.raises(ListenError, match=r"still could not bind\(\)"):
            ListenerSet.open(conf, 1, previous=old, log=lambda *line: logged.append(line), bind_tries=1)
    finally:
        holder.close()
    assert logged == [("emerg", f"bind() to 127.0.0.1:{busy_port} failed (98: Address already in use)")]
    assert accepts(old.for_worker(0)[("127.0.0.1", kept_port, None)])
    with pytest.raises(ConnectionRefusedError):  # the half-opened new socket was closed again
        socket.create_connection(("127.0.0.1", fresh_port), timeout=2).close()


def test_an_address_that_cannot_exist_fails_without_retrying() -> None:
    with pytest.raises(ListenError, match=r"^bind\(\) to 192\.0\.2\.1:\d+ failed \(99: "):
        ListenerSet.open(main_conf(ListenConf("192.0.2.1", free_port())), 1)


def test_unix_listener_replaces_a_stale_file_but_never_a_live_one(
    tmp_path: Path, opened: list[ListenerSet]
) -> None:
    path = tmp_path / "lb.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()
    conf = main_conf(ListenConf(None, 0, unix_path=str(path)))
    listeners = ListenerSet.open(conf, 1)
    opened.append(listeners)
    assert path.stat().st_mode & 0o777 == 0o666

    logged: list[tuple[str, str]] = []
    with pytest.raises(ListenError, match=r"still could not bind\(\)"):  # live: left alone
        ListenerSet.open(conf, 1, bind_tries=1, log=lambda *line: logged.append(line))
    assert logged == [("emerg", f"bind() to unix:{path} failed (98: Address already in use)")]
    assert path.exists()
    listeners.close()
    assert not path.exists()


# --------------------------------------------------------------------------- pid file


def test_pid_file_round_trip_and_owner_check(tmp_path: Path) -> None:
    path = str(tmp_path / "lb.pid")
    daemon.write_pid_file(path)
    assert Path(path).read_text() == f"{os.getpid()}\n"
    assert daemon.read_pid_file(path) == os.getpid()
    daemon.remove_pid_file(path, owner=os.getpid() + 1)  # someone else's now: kept
    assert Path(path).exists()
    daemon.remove_pid_file(path)
    assert not Path(path).exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", 'invalid PID number "" in "{path}"'),
        ("\r\n", 'invalid PID number "" in "{path}"'),
        ("12x\n", 'invalid PID number "12x" in "{path}"'),
        ("-5\n", 'invalid PID number "-5" in "{path}"'),
        ("\u00b2\n", 'invalid PID number "\u00c2\u00b2" in "{path}"'),  # a non-ASCII digit, as bytes
    ],
)
def test_pid_file_errors_are_nginx_messages(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "lb.pid"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(daemon.PidFileError) as err:
        daemon.read_pid_file(str(path))
    assert str(err.value) == message.format(path=path)


def test_missing_pid_file_is_an_open_error(tmp_path: Path) -> None:
    path = tmp_path / "none.pid"
    with pytest.raises(daemon.PidFileError) as err:
        daemon.read_pid_file(str(path))
    assert str(err.value) == f'open() "{path}" failed (2: No such file or directory)'


# --------------------------------------------------------------------------- signal text


def test_signal_lines_are_nginx_text() -> None:
    hup = Received(signal.SIGHUP, 4242)
    assert hup.describe("reconfiguring") == "signal 1 (SIGHUP) received from 4242, reconfiguring"
    assert Received(signal.SIGCHLD, 0).describe() == "signal 17 (SIGCHLD) received"


def test_reload_can_turn_reuseport_on_and_off_without_rebinding(opened: list[ListenerSet]) -> None:
    port = free_port()
    key = ("127.0.0.1", port, None)
    shared = ListenerSet.open(main_conf(ListenConf("127.0.0.1", port)), 2)
    opened.append(shared)
    shared_sock = shared.for_worker(0)[key]

    reuseport = main_conf(ListenConf("127.0.0.1", port, reuseport=True))
    per_worker = ListenerSet.open(reuseport, 2, previous=shared)
    opened.append(per_worker)
    shared.close_unused(per_worker)
    assert per_worker.for_worker(0)[key] is shared_sock  # its queue lives on as worker 0's
    assert per_worker.for_worker(1)[key] is not shared_sock
    assert shared_sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1

    back = ListenerSet.open(main_conf(ListenConf("127.0.0.1", port)), 2, previous=per_worker)
    opened.append(back)
    worker_1_sock = per_worker.for_worker(1)[key]
    per_worker.close_unused(back)
    assert back.for_worker(0)[key] is shared_sock and back.for_worker(1)[key] is shared_sock
    assert worker_1_sock.fileno() == -1
    assert accepts(shared_sock)
