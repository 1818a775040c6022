"""The process model: listeners, workers, signals, reload, pid file (nginx's master process).

Theory of operation
-------------------
``run(conf)`` installs the configured error log, opens the listening sockets (a busy port is
reported on the terminal too, exit status 1), then detaches if ``daemon on``, writes the pid
file and either serves in this very process (``master_process off``) or becomes the master:

- The master blocks its signals and takes them one at a time from the pending set
  (``signals.SignalWaiter``), so all work happens in the main loop, never in a handler. The
  master never creates an event loop: workers are forked from a clean interpreter state.
- Each worker is a fork running ``worker.run(conf, listeners, worker_id, worker_count)`` and
  then ``os._exit``. The master tracks workers in a table of ``WorkerProcess`` records.
- Signals, as nginx:
    HUP   reload: load and check the config from the same file; on failure log the ``[emerg]``
          line and keep serving with the old generation. On success take over the listening
          sockets that are still configured, open the new ones, fork a new generation and, a
          moment later, send QUIT to the old workers (they finish in-flight requests and exit).
    QUIT  graceful stop: QUIT every worker, close the master's sockets, wait for all, exit 0.
    TERM, INT  fast stop: TERM every worker, SIGKILL what is still alive after KILL_AFTER.
    USR1  reopen the master's logs and forward USR1 to every worker.
    CHLD  reap. A worker that exits while nobody asked it to (crash, SIGKILL from the sandbox
          watchdog, OOM, SIGSEGV...) is replaced under the same worker id. Workers that die
          right after their start are respawned with a growing, bounded delay so a broken
          worker cannot make the master spin. Exit code 2 is nginx's "fatal, do not respawn".
"""

from __future__ import annotations

import ctypes
import os
import platform
import resource
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import scriptlb
from scriptlb.config.errors import ConfigError, where
from scriptlb.config.model import ListenKey, MainConf
from scriptlb.hookrt import hooks
from scriptlb.logs import errorlog
from scriptlb.ops import cluster
from scriptlb.ops import status as instance_status
from scriptlb.process import daemon, service
from scriptlb.process.listeners import ListenError, ListenerSet, LogFn
from scriptlb.process.signals import (
    COMMAND_SIGNALS,
    WORKER_RETIRING,
    EarlyStop,
    Received,
    SignalWaiter,
    prepare_worker_signals,
    set_master,
)
from scriptlb.state.peer_lists import PeerListStore
from scriptlb.state.shared_dict import remove_files, zone_directory
from scriptlb.state.stats import PeerStats

# worker.run(conf, listeners, worker_id, worker_count)
WorkerEntry = Callable[[MainConf, dict[ListenKey, socket.socket], int, int], None]

RETIRE_DELAY = 0.1  # nginx sleeps 100 ms between starting new workers and QUITting old ones
KILL_AFTER = 1.5  # TERM, then SIGKILL if still alive (nginx: after ~1.5 s of doubling delays)
QUICK_DEATH = 1.0  # a worker dying sooner than this after its start counts as a crash loop
BACKOFF_FIRST = 0.1  # delay before the 2nd quick respawn in a row; doubles up to BACKOFF_MAX
BACKOFF_MAX = 5.0
FATAL_EXIT_CODE = 2  # nginx: a worker exiting with 2 "cannot be respawned"
CLUSTER_PROCESS_ID = -1  # the worker table's id of the cluster process (scriptlb.ops.cluster)


# --------------------------------------------------------------------------- logging


def log(level: str, message: str) -> None:
    """One line in the process's error log (nginx's shape)."""
    errorlog.log_error(level, message)


def _log_to_terminal_too(level: str, message: str) -> None:
    """Startup errors: the error log *and* the terminal, like nginx before it detaches."""
    log(level, message)
    if not any(target.path == errorlog.STDERR for target in errorlog.current().targets):
        _print_error(level, message)


def _open_error_log(conf: MainConf, report: LogFn) -> errorlog.ErrorLog | None:
    """The error log ``conf`` asks for, or None after reporting why it cannot be opened."""
    try:
        return errorlog.ErrorLog(conf.error_log)
    except OSError as err:
        report("emerg", f'open() "{err.filename}" failed {daemon.os_error_text(err)}')
        return None


def _install_error_log(new: errorlog.ErrorLog) -> None:
    errorlog.install(new).close()


def _error_log_file(conf: MainConf) -> str | None:
    """The file a daemon's stderr goes to: the first error_log that is a file."""
    for entry in conf.error_log:
        if entry.path not in ("stderr", "stdout") and entry.syslog is None:
            return entry.path
    return None


def _load_config(conf: MainConf, globals_: str | None) -> MainConf:
    """Load and check (hooks compiled) the config again from the same file, prefix and -g
    directives, as ``scriptlb -t`` would; raises ConfigError."""
    return hooks.load_and_check(conf.conf_file, conf.prefix, globals_)


def _default_worker_entry() -> WorkerEntry:
    from scriptlb.process import worker

    return worker.run


# --------------------------------------------------------------------------- entry points


def run(conf: MainConf, globals_: str | None = None, worker_entry: WorkerEntry | None = None) -> int:
    """Serve ``conf`` until told to stop; the process exit status.

    0 after a stop by signal; 1 when the error log, a listening socket or the pid file cannot
    be opened. With ``daemon on`` the calling process returns as soon as the daemon has written
    its pid file (0) or failed to (1), and the daemon carries on.

    ``globals_`` is the ``-g`` text, re-applied on every reload. ``worker_entry`` replaces
    ``worker.run`` (tests).
    """
    entry = worker_entry or _default_worker_entry()  # imported before any fork
    service.make_log_dirs(conf)
    error_log = _open_error_log(conf, _log_to_terminal_too)
    if error_log is None:
        return 1
    _install_error_log(error_log)
    worker_count = conf.worker_processes if conf.master_process else 1
    try:
        listeners = ListenerSet.open(conf, worker_count, log=_log_to_terminal_too)
    except ListenError as err:
        _log_to_terminal_too("emerg", str(err))
        return 1
    _clear_shared_zones(conf)
    detached = daemon.daemonize(stderr_path=_error_log_file(conf)) if conf.daemon else None
    if detached is not None and not detached.is_daemon:
        listeners.close(unlink=False)  # the daemon owns them now
        return detached.status or 0
    if not conf.master_process:
        return _run_single(conf, listeners, entry, detached)
    with SignalWaiter() as waiter:
        started = _create_pid_file(conf.pid)
        if detached is not None:
            detached.report(0 if started else 1)
        if not started:
            listeners.close()
            return 1
        _set_process_name("master")
        _log_startup(conf)
        master = Master(conf, listeners, waiter, globals_, entry)
        return master.serve()


def _clear_shared_zones(conf: MainConf) -> None:
    """A cold start begins with empty shared dicts and peer statistics, as nginx's shared zones
    do; a reload keeps them (it never comes here). Called only once the listeners are ours, so
    a second instance that fails to bind never wipes the running one's data."""
    if conf.http is None and conf.stream is None:
        return
    directory = zone_directory(conf.prefix)
    PeerStats.reset(directory)
    instance_status.reset(directory)
    PeerListStore.reset(directory)
    for name in (conf.http.shared_dicts if conf.http is not None else ()):
        remove_files(directory, name)
    for zone in (conf.http.limit_zones.values() if conf.http is not None else ()):
        remove_files(directory, f"{zone.kind}.{zone.name}")  # (scriptlb.request.limits.zone_path)
    from scriptlb.request.limits import stream_zone_directory

    for zone in (conf.stream.limit_zones.values() if conf.stream is not None else ()):
        remove_files(stream_zone_directory(directory), f"{zone.kind}.{zone.name}")
    from scriptlb.http.tls_sessions import clear_zones

    clear_zones(conf.prefix)


def send_signal(conf: MainConf, name: str) -> int:
    """``scriptlb -s NAME``: signal the master named in the pid file; the exit status.

    Errors are printed as nginx prints them, e.g.
    ``scriptlb: [error] open() "/p/logs/scriptlb.pid" failed (2: No such file or directory)``.
    """
    signo = COMMAND_SIGNALS.get(name)
    if signo is None:
        _print_error("emerg", f'invalid option: "-s {name}"')
        return 1
    if conf.pid is None:
        _print_error("emerg", 'no "pid" file is configured')
        return 1
    try:
        pid = daemon.read_pid_file(conf.pid)
    except daemon.PidFileError as err:
        _print_error(err.level, str(err))
        return 1
    try:
        os.kill(pid, signo)
    except OSError as err:
        _print_error("alert", f"kill({pid}, {int(signo)}) failed {daemon.os_error_text(err)}")
        return 1
    return 0


def _print_error(level: str, message: str) -> None:
    sys.stderr.write(f"scriptlb: [{level}] {message}\n")
    sys.stderr.flush()


def _create_pid_file(path: str | None) -> bool:
    if path is None:
        return True
    try:
        daemon.write_pid_file(path)
    except OSError as err:
        log("emerg", f'open() "{path}" failed {daemon.os_error_text(err)}')
        return False
    return True


# --------------------------------------------------------------------------- single process


def _run_single(
    conf: MainConf, listeners: ListenerSet, entry: WorkerEntry, detached: daemon.Detached | None
) -> int:
    """``master_process off``: this process is the only worker (nginx's single process cycle).

    The worker handles QUIT/TERM/INT/USR1 itself. HUP only logs a warning: reloading in place
    would need the worker's cooperation (nginx re-inits the cycle inside its single process).
    """
    prepare_worker_signals()  # before the pid file exists, so no HUP can find us unprepared
    signal.signal(signal.SIGHUP, _single_process_hup)
    _log_startup(conf)
    started = _create_pid_file(conf.pid)
    if detached is not None:
        detached.report(0 if started else 1)
    if not started:
        listeners.close()
        return 1
    code = 0
    try:
        entry(conf, listeners.for_worker(0), 0, 1)
    except EarlyStop:
        pass
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        listeners.close()
        if conf.pid is not None:
            daemon.remove_pid_file(conf.pid)
    log("notice", "exit")
    return code


def _single_process_hup(signo: int, frame: object) -> None:
    log("notice", Received(signal.SIGHUP, 0).describe("reconfiguring"))
    log("warn", 'reloading is not supported with "master_process off", the configuration is unchanged')


# --------------------------------------------------------------------------- master


@dataclass(slots=True)
class WorkerProcess:
    pid: int
    worker_id: int
    generation: int
    started: float  # time.monotonic()
    exiting: bool = False  # asked to stop (reload or shutdown): its exit is expected
    quit_sent: bool = False


class Master:
    """The supervising process. All state changes happen in ``serve``'s loop."""

    def __init__(
        self,
        conf: MainConf,
        listeners: ListenerSet,
        waiter: SignalWaiter,
        globals_: str | None,
        worker_entry: WorkerEntry,
    ) -> None:
        self.conf = conf
        self.listeners = listeners
        self._daemonized = conf.daemon  # a reload cannot change it (nginx ignores it too)
        self._waiter = waiter
        self._globals = globals_
        self._worker_entry = worker_entry
        # the worker table
        self.generation = 0
        self.workers: dict[int, WorkerProcess] = {}
        # timers (time.monotonic() deadlines)
        self._respawn_at: dict[int, float] = {}  # worker id -> when to fork its replacement
        self._quick_deaths: dict[int, int] = {}  # worker id -> quick deaths in a row
        self._retire_at: float | None = None  # when to QUIT the previous generation
        self._kill_at: float | None = None  # fast stop: when to SIGKILL the survivors
        # shutdown
        self.stopping: str | None = None  # None | "quit" | "terminate"

    def __repr__(self) -> str:
        return (
            f"<Master generation={self.generation} workers={sorted(self.workers)} "
            f"stopping={self.stopping}>"
        )

    # ----------------------------------------------------------------------- main loop

    def serve(self) -> int:
        try:
            self._start_workers()
            # systemd (Type=notify): the sockets are open and the workers forked
            service.notify(f"READY=1\nMAINPID={os.getpid()}")
            while not (self.stopping and not self.workers):
                received = self._waiter.wait(self._next_timeout())
                if received is not None:
                    self._on_signal(received)
                self._reap()
                self._run_timers()
        except BaseException:
            # a bug in the master must not leave orphan workers serving an unsupervised config
            log("alert", "master process failed:\n" + traceback.format_exc().rstrip())
            self._signal_workers(signal.SIGKILL, only_running=False)
            raise
        finally:
            self._exit()
        return 0

    def _next_timeout(self) -> float | None:
        deadlines = [*self._respawn_at.values(), self._retire_at, self._kill_at]
        pending = [d for d in deadlines if d is not None]
        if not pending:
            return None
        return max(min(pending) - time.monotonic(), 0.0)

    def _exit(self) -> None:
        self.listeners.close()
        if self.conf.pid is not None:
            daemon.remove_pid_file(self.conf.pid)
        log("notice", "exit")

    # ----------------------------------------------------------------------- signals

    _ACTIONS = {
        signal.SIGHUP: "reconfiguring",
        signal.SIGQUIT: "shutting down",
        signal.SIGTERM: "exiting",
        signal.SIGINT: "exiting",
        signal.SIGUSR1: "reopening logs",
        signal.SIGUSR2: "ignoring",
        signal.SIGWINCH: "ignoring",
        signal.SIGCHLD: "",
    }

    def _on_signal(self, received: Received) -> None:
        signo = received.signo
        if signo == WORKER_RETIRING:
            self._replace_retiring(received.sender)
            return
        log("notice", received.describe(self._ACTIONS.get(received.signo, "")))
        if signo in (signal.SIGTERM, signal.SIGINT):
            self._terminate()
        elif signo == signal.SIGQUIT:
            self._quit()
        elif signo == signal.SIGHUP and not self.stopping:
            self._reload()
        elif signo == signal.SIGUSR1:
            self._reopen()
        # SIGCHLD: the loop reaps after every wake-up anyway

    def _terminate(self) -> None:
        if self.stopping == "terminate":
            return
        service.notify("STOPPING=1")
        self.stopping = "terminate"
        self._respawn_at.clear()
        self._retire_at = None
        self._signal_workers(signal.SIGTERM, only_running=False)
        self._kill_at = time.monotonic() + KILL_AFTER
        self.listeners.close()

    def _quit(self) -> None:
        if self.stopping:
            return
        service.notify("STOPPING=1")
        self.stopping = "quit"
        self._respawn_at.clear()
        self._retire_at = None
        self.listeners.close()  # nginx closes the master's copies at once; workers close theirs
        self._send_quit(list(self.workers.values()))

    def _reopen(self) -> None:
        log("notice", "reopening logs")
        errorlog.reopen()
        if self._daemonized:
            daemon.redirect_stderr(_error_log_file(self.conf))
        self._signal_workers(signal.SIGUSR1, only_running=False)

    def _signal_workers(self, signo: signal.Signals, only_running: bool) -> None:
        for proc in list(self.workers.values()):
            if only_running and proc.exiting:
                continue
            self._kill(proc, signo)

    def _kill(self, proc: WorkerProcess, signo: signal.Signals) -> None:
        try:
            os.kill(proc.pid, signo)
        except ProcessLookupError:
            pass  # already dead; the reap reports it
        except OSError as err:
            log("alert", f"kill({proc.pid}, {int(signo)}) failed {daemon.os_error_text(err)}")
        if signo != signal.SIGUSR1:
            proc.exiting = True

    def _send_quit(self, procs: list[WorkerProcess]) -> None:
        for proc in procs:
            if not proc.quit_sent:
                proc.quit_sent = True
                self._kill(proc, signal.SIGQUIT)

    def _replace_retiring(self, pid: int) -> None:
        """A worker began a graceful exit of its own (retired for its memory): its replacement
        starts now, as on a reload, while it finishes its requests. Its exit is then expected.
        A worker the master stopped itself (reload, shutdown) is already ``exiting``."""
        proc = self.workers.get(pid)
        if proc is None or proc.exiting or self.stopping or proc.generation != self.generation:
            return
        proc.exiting = True
        log("notice", f"worker process {pid} is shutting down on its own, starting its replacement")
        quick = time.monotonic() - proc.started < QUICK_DEATH
        self._schedule_respawn(proc.worker_id, quick)

    # ----------------------------------------------------------------------- reload

    def _reload(self) -> None:
        log("notice", "reconfiguring")
        monotonic_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        service.notify(f"RELOADING=1\nMONOTONIC_USEC={monotonic_usec}")
        try:
            self._reconfigure()
        finally:
            service.notify("READY=1")  # done, whether the new config was taken or refused

    def _reconfigure(self) -> None:
        new_conf = self._load_new_config()
        if new_conf is None:
            return
        new_error_log = _open_error_log(new_conf, log)
        if new_error_log is None:
            return
        try:
            new_listeners = ListenerSet.open(
                new_conf, new_conf.worker_processes, previous=self.listeners, log=log, bind_tries=1
            )
        except (ListenError, OSError) as err:  # OSError: a setsockopt()/listen() on a kept socket
            new_error_log.close()
            log("emerg", str(err))
            return
        _install_error_log(new_error_log)
        if self._daemonized:  # stderr follows the error log, as nginx's ngx_log_redirect_stderr
            daemon.redirect_stderr(_error_log_file(new_conf))
        self._move_pid_file(new_conf.pid)
        old = [p for p in self.workers.values() if not p.exiting]
        for proc in old:
            proc.exiting = True  # from now on their exit is expected, never respawned
        self.listeners.close_unused(new_listeners)
        self.conf, self.listeners = new_conf, new_listeners
        self.generation += 1
        self._respawn_at.clear()
        self._quick_deaths.clear()
        self._start_workers()
        # let the new workers start before the old ones stop accepting
        self._retire_at = time.monotonic() + RETIRE_DELAY

    def _load_new_config(self) -> MainConf | None:
        try:
            return _load_config(self.conf, self._globals)
        except ConfigError as err:
            log(err.level, f"{err.message}{where(err.source)}")
        except Exception:
            # the loader must never take the master down with it: the old workers keep serving
            log("alert", "reload failed:\n" + traceback.format_exc().rstrip())
        return None

    def _move_pid_file(self, new_path: str | None) -> None:
        old_path = self.conf.pid
        if new_path == old_path:
            return
        if new_path is not None:
            _create_pid_file(new_path)
        if old_path is not None:
            daemon.remove_pid_file(old_path)

    # ----------------------------------------------------------------------- children

    def _start_workers(self) -> None:
        log("notice", "start worker processes")
        try:
            service.hand_over(self.conf)
        except OSError as err:
            log("alert", f"giving files to the worker user failed {daemon.os_error_text(err)}")
        _warn_if_threaded()
        for worker_id in range(self.conf.worker_processes):
            self._spawn(worker_id)
        if cluster.needed(self.conf):
            self._spawn(CLUSTER_PROCESS_ID)

    def _spawn(self, worker_id: int) -> None:
        master_pid = os.getpid()
        try:
            pid = os.fork()
        except OSError as err:
            log("alert", f'fork() failed while spawning "worker process" {daemon.os_error_text(err)}')
            self._schedule_respawn(worker_id, quick=True)
            return
        if pid == 0:
            try:
                self._become_worker(worker_id, master_pid)  # never returns...
            finally:
                os._exit(1)  # ...and a child must never get back into the master's loop
        self.workers[pid] = WorkerProcess(pid, worker_id, self.generation, time.monotonic())
        role = "cluster" if worker_id == CLUSTER_PROCESS_ID else "worker"
        log("notice", f"start {role} process {pid}")

    def _become_worker(self, worker_id: int, master_pid: int) -> None:
        """The child side of the fork: run the worker, then leave without running any of the
        master's cleanup (atexit handlers, finally blocks up the stack, socket finalizers)."""
        code = 0
        try:
            prepare_worker_signals()
            set_master(master_pid)
            _stop_with_master(master_pid)
            if worker_id == CLUSTER_PROCESS_ID:
                self.listeners.close(unlink=False)  # it serves no client
                service.drop_privileges(self.conf)
                _set_process_name("cluster")
                cluster.run(self.conf)
                return
            for sock in self.listeners.not_for_worker(worker_id):
                sock.close()
            service.drop_privileges(self.conf)
            _set_process_name("worker")
            self._worker_entry(
                self.conf, self.listeners.for_worker(worker_id), worker_id, self.conf.worker_processes
            )
        except EarlyStop:
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            code = 1
            try:
                log("alert", "worker process failed:\n" + traceback.format_exc().rstrip())
            except BaseException:
                pass
        finally:
            try:
                daemon.flush_stdio()
            finally:  # even if a late signal interrupts the flush
                os._exit(code)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self._on_exit(pid, status)

    def _on_exit(self, pid: int, status: int) -> None:
        proc = self.workers.pop(pid, None)
        name = "worker process" if proc is not None else "unknown process"
        if proc is not None and proc.worker_id == CLUSTER_PROCESS_ID:
            name = "cluster process"
        if os.WIFSIGNALED(status):
            core = " (core dumped)" if os.WCOREDUMP(status) else ""
            log("alert", f"{name} {pid} exited on signal {os.WTERMSIG(status)}{core}")
        else:
            log("notice", f"{name} {pid} exited with code {os.waitstatus_to_exitcode(status)}")
        if proc is None or proc.exiting or self.stopping or proc.generation != self.generation:
            return
        if os.WIFEXITED(status) and os.WEXITSTATUS(status) == FATAL_EXIT_CODE:
            log("alert", f"{name} {pid} exited with fatal code {FATAL_EXIT_CODE} and cannot be respawned")
            return
        quick = time.monotonic() - proc.started < QUICK_DEATH
        self._schedule_respawn(proc.worker_id, quick)

    def _schedule_respawn(self, worker_id: int, quick: bool) -> None:
        """Replace a dead worker: at once, unless it keeps dying right after its start."""
        deaths = self._quick_deaths.get(worker_id, 0) + 1 if quick else 0
        self._quick_deaths[worker_id] = deaths
        if deaths <= 1:
            self._respawn_at[worker_id] = time.monotonic()
            return
        delay = min(BACKOFF_FIRST * 2 ** (deaths - 2), BACKOFF_MAX)
        log(
            "warn",
            f"worker #{worker_id} died {deaths} times in a row within "
            f"{QUICK_DEATH:g}s of its start, respawning in {delay:g}s",
        )
        self._respawn_at[worker_id] = time.monotonic() + delay

    # ----------------------------------------------------------------------- timers

    def _run_timers(self) -> None:
        now = time.monotonic()
        for worker_id, due in list(self._respawn_at.items()):
            if due <= now:
                del self._respawn_at[worker_id]
                self._spawn(worker_id)
        if self._retire_at is not None and self._retire_at <= now:
            self._retire_at = None
            self._send_quit([p for p in self.workers.values() if p.generation != self.generation])
        if self._kill_at is not None and self._kill_at <= now:
            self._kill_at = None
            self._signal_workers(signal.SIGKILL, only_running=False)


PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15


def _prctl(option: int, arg: int | bytes) -> None:
    """Linux prctl(2), best effort: a missing libc symbol or an error changes nothing."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(option, arg, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _set_process_name(role: str) -> None:
    """Name the process in ``ps -o comm``/top (PR_SET_NAME, 15 bytes).

    nginx rewrites its whole argv ("nginx: worker process"); Python cannot do that cheaply,
    but the short name is what top and ``ps -o comm`` show.
    """
    _prctl(PR_SET_NAME, f"scriptlb {role}".encode()[:15])


def _warn_if_threaded() -> None:
    """fork() copies only the calling thread: a lock another thread holds stays locked forever
    in the child. The master must stay single-threaded; say so loudly if something (a config
    loader, a hook compiler) started a thread in it."""
    others = [t.name for t in threading.enumerate() if t is not threading.current_thread()]
    if others:
        log("alert", f"the master process runs threads ({', '.join(others)}); forked workers may hang")


def _stop_with_master(master_pid: int) -> None:
    """Have the kernel send this worker QUIT if the master dies (PR_SET_PDEATHSIG).

    A deliberate difference from nginx, whose workers outlive a master killed with SIGKILL:
    orphans would keep serving an unsupervised config and hold the ports, so the next master
    could not bind them. QUIT still lets their in-flight requests finish. The parent check
    covers a master that died between fork() and prctl().
    """
    _prctl(PR_SET_PDEATHSIG, int(signal.SIGQUIT))
    if os.getppid() != master_pid:
        raise EarlyStop(signal.SIGQUIT)


def _log_startup(conf: MainConf) -> None:
    """nginx's notice lines at start (ngx_os_status), and its warning when worker_connections
    cannot fit in the open-files limit."""
    log("notice", f"scriptlb/{scriptlb.version()}")
    log("notice", f"built with Python {platform.python_version()}")
    uname = os.uname()
    log("notice", f"OS: {uname.sysname} {uname.release}")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    log("notice", f"getrlimit(RLIMIT_NOFILE): {_rlimit_text(soft)}:{_rlimit_text(hard)}")
    if soft != resource.RLIM_INFINITY and conf.worker_connections > soft:
        log("warn", f"{conf.worker_connections} worker_connections exceed open file resource limit: {soft}")


def _rlimit_text(value: int) -> str:
    return "infinity" if value == resource.RLIM_INFINITY else str(value)
