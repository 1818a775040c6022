"""Resource bounds of hook code: the per-run CPU budget, size caps, and the worker's hard fuse.

Theory of operation
-------------------
*Budget.* The compiler policy (policy.py) plants a call to ``tick()`` at the top of every loop
body, function body, lambda, comprehension element, ``except`` handler and ``finally`` block.
``tick()`` compares one clock read with the run's deadline, so straight-line code pays nothing
and a loop pays ~60 ns per iteration; no ``sys.settrace`` is involved. Past the deadline it
raises ``HookTimeout``, a ``BaseException`` (``except Exception`` in hook code cannot catch it).
Hook code that catches it anyway (a bare ``except:``) or swallows it (``return`` in
``finally``) gains nothing: the handler and the ``finally`` block start with a tick, which
raises again, and the runner treats a tripped run as a timeout however it ended. Outside a
run the deadline is in the past, so hook code resumed later (a generator finalized after its
run) is stopped at its first tick.

*Size caps.* Work done inside one C call (``'x' * 10**10``, ``10**10**8``) cannot be
interrupted by a tick, so the guards refuse it up front with the caps below.

*Hard fuse.* The last resort for whatever slips through: a watchdog *process* (it must not
need the worker's GIL, which a runaway C call holds) reads a shared stamp the runner writes at
the start and end of each run, and SIGKILLs the worker when one run lasts longer than
``hard_seconds``; the master then replaces the worker.

*Memory.* Hook state that grows without end (a module-level cache fed on every request) is
bounded by the same watchdog: when the worker's resident memory passes ``memory_bytes``
(``python_memory_limit``) it asks the worker to shut down gracefully (SIGQUIT, as ``nginx -s
quit`` does for each worker): the worker stops accepting, finishes its requests and exits, and
the master starts a fresh one; should it pass twice the limit while draining, it is killed.
No address-space limit is set: RLIMIT_AS would cap the proxy too, and a MemoryError in the
request parser or a body buffer fails a client, not the hook.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import resource
import signal
import sys
import time
from typing import Any

# --------------------------------------------------------------------------- size caps

MAX_STR = 1 << 20  # characters of a str / bytes a hook may build
MAX_ITEMS = 1 << 20  # elements of a list / tuple / deque a hook may build
MAX_RANGE = 100_000  # elements of one range(); bigger ones are refused up front
MAX_INT_BITS = 16_384  # bits of an int result of *, **, <<
MAX_POWMOD_BITS = 2_048  # bits of the exponent and modulus of pow(b, e, m)
MAX_FORMAT_WIDTH = 10_000  # width / precision in %-formats, format() and f-string specs
MAX_REPEAT = 32  # itertools.product(repeat=...)


class HookTimeout(BaseException):
    """The run is past its CPU budget. Deliberately not an ``Exception``."""


class SandboxLimitError(Exception):
    """An operation refused up front because of its size (a MemoryError-like refusal)."""


# --------------------------------------------------------------------------- budget


class Budget:
    """The run in progress: its deadline (perf_counter seconds; 0.0 = no run) and whether
    ``tick()`` has stopped it. One per process; the runner writes the fields directly."""

    __slots__ = ("deadline", "tripped")

    def __init__(self) -> None:
        self.deadline = 0.0
        self.tripped = False


BUDGET = Budget()
clock = time.perf_counter


def tick() -> None:
    """Planted by the compiler policy; raises HookTimeout once the run's deadline has passed.
    Outside a run (deadline 0.0: hook code resumed later) it raises without marking a run
    stopped, so ``tripped`` is False whenever no run is in progress and a runner need not
    clear it before each run (it clears it after a run that tripped it)."""
    if clock() > BUDGET.deadline:
        if BUDGET.deadline:
            BUDGET.tripped = True
        raise HookTimeout


# Work done inside one C call runs past the deadline until the call returns: sorting or hashing
# a million items takes tens of milliseconds. The guards of such calls ``charge()`` their
# estimated cost first, and a call that would outlast the remaining budget stops the run
# before it starts, so an overrun is bounded by the cheap calls no guard sees (a few ms).
CHARGE_FLOOR = 4096  # items below which a call is too cheap to check
CHARGE_SLACK = 0.005  # seconds a call may run past the deadline: only longer ones are stopped
BYTE_NS = 0.1  # per character or byte: building str/bytes (memcpy-class work)
COPY_NS = 2.0  # per item: repeat, concatenation, list()/tuple() copies, join
SCAN_NS = 5.0  # per item: sum, count/index, membership
HASH_NS = 25.0  # per item: sort, set/dict building, hashing and comparing walks


def charge(items: int, ns_per_item: float) -> None:
    """Stop the run (HookTimeout) when ``items`` of C work at ``ns_per_item`` would end more than
    CHARGE_SLACK past its deadline. A call estimated under CHARGE_SLACK is never stopped here
    (the budget checks of loops stop a run made of many of them), so straight-line code does
    not depend on the clock. Outside a run (deadline 0.0) nothing is charged: tick() stops
    resumed hook code."""
    if items > CHARGE_FLOOR:
        cost = items * ns_per_item * 1e-9
        deadline = BUDGET.deadline
        if cost > CHARGE_SLACK and deadline and clock() + cost > deadline + CHARGE_SLACK:
            BUDGET.tripped = True
            raise HookTimeout


# --------------------------------------------------------------------------- hard fuse


def _stamp() -> memoryview[float]:
    """One float in a shared anonymous mapping (the watchdog, forked later, sees the writes),
    as a one-item memoryview of doubles: ``stamp[0] = t`` costs about half a ctypes
    ``c_double.value`` store, and the runner makes two per run."""
    return memoryview(mmap.mmap(-1, 8)).cast("d")


# The current run's start (``clock()`` seconds; 0.0 = idle), which the runner writes directly
# (``limits.STAMP[0] = started``: one store, no call, on every run): the worker's fuse mapping
# once install_worker_fuse() armed it, else a private one nobody reads. ``clock`` is
# perf_counter, CLOCK_MONOTONIC on Linux: system-wide, so the watchdog process reads the same
# clock.
STAMP = _stamp()


class WorkerFuse:
    """The per-worker hard fuse: a watchdog process plus an optional address-space limit.

    A run's start goes into ``stamp`` (one float in a shared anonymous mapping; the runner
    writes ``limits.STAMP``, which install_worker_fuse() points here); the watchdog polls it
    and kills the worker when a run overstays.
    """

    def __init__(self, hard_seconds: float = 2.0, poll: float = 0.1, memory_bytes: int = 0) -> None:
        self.hard_seconds = hard_seconds
        self.poll = poll
        self.memory_bytes = memory_bytes  # resident memory above which the worker is retired; 0: off
        self.stamp = _stamp()
        self._pid = 0

    def start(self) -> int:
        """Fork the watchdog; returns its pid. Call in the worker, before serving."""
        worker = os.getpid()
        keep = _error_log_fds()
        pid = os.fork()
        if pid == 0:  # the watchdog: no event loop, no hooks, only this loop
            try:
                # hold none of the worker's sockets or files (listeners must close with it),
                # except the error log's
                _close_all_but(keep)
                self._watch(worker)
            finally:
                os._exit(0)
        self._pid = pid
        return pid

    def run_started(self) -> None:
        self.stamp[0] = clock()

    def run_ended(self) -> None:
        self.stamp[0] = 0.0

    def stop(self) -> None:
        if self._pid:
            with contextlib.suppress(ProcessLookupError, ChildProcessError):
                os.kill(self._pid, signal.SIGKILL)
                os.waitpid(self._pid, 0)
            self._pid = 0

    def _watch(self, worker: int) -> None:
        retiring = False
        stamp = self.stamp
        while os.getppid() == worker:  # the worker died: we were re-parented
            started = stamp[0]
            if started and clock() - started > self.hard_seconds:
                msg = (f"scriptlb: a hook run exceeded the hard limit of {self.hard_seconds}s, "
                       f"killing worker {worker}\n")
                with contextlib.suppress(OSError):
                    os.write(2, msg.encode())
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker, signal.SIGKILL)
                return
            if self.memory_bytes:
                resident = resident_bytes(worker)
                if resident > 2 * self.memory_bytes:  # still growing while it drains: the host first
                    _log("alert", f"worker process {worker} uses {resident >> 20} MiB, twice "
                         "python_memory_limit: killing it")
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(worker, signal.SIGKILL)
                    return
                if resident > self.memory_bytes and not retiring:
                    _log("alert", f"worker process {worker} uses {resident >> 20} MiB, over "
                         f"python_memory_limit ({self.memory_bytes >> 20} MiB): shutting it down "
                         "gracefully, the master starts a fresh one")
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(worker, signal.SIGQUIT)
                    retiring = True
            time.sleep(self.poll)


_PAGE = os.sysconf("SC_PAGE_SIZE")


def resident_bytes(pid: int) -> int:
    """The resident set size of ``pid`` (from /proc; 0 when it cannot be read)."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


def _error_log_fds() -> list[int]:
    from scriptlb.logs import errorlog

    return sorted(t.fd for t in errorlog.current().targets if t.fd > 2)


def _close_all_but(keep: list[int]) -> None:
    start = 3
    for fd in keep:
        os.closerange(start, fd)
        start = fd + 1
    os.closerange(start, os.sysconf("SC_OPEN_MAX"))


def _log(level: str, message: str) -> None:
    from scriptlb.logs import errorlog

    with contextlib.suppress(Exception):
        errorlog.log_error(level, message)


_FUSE: WorkerFuse | None = None


def quiet_unraisable_stops() -> None:
    """Keep "Exception ignored in: <generator ...>" noise out of stderr for HookTimeout: a
    generator closed while being deallocated cannot propagate the stop (the run still ends as a
    timeout). Other unraisable exceptions go to the previous hook. Idempotent."""
    previous = sys.unraisablehook
    if getattr(previous, "_scriptlb_quiet", False):
        return

    def hook(unraisable: Any) -> None:
        if not isinstance(unraisable.exc_value, HookTimeout):
            previous(unraisable)

    hook._scriptlb_quiet = True  # type: ignore[attr-defined]  # a mark on the function: installed once
    sys.unraisablehook = hook


def install_worker_fuse(hard_seconds: float = 2.0, memory_bytes: int = 0,
                        stack_bytes: int = 512 << 20) -> WorkerFuse:
    """Arm the hard fuse in this worker (worker.py calls it after the fork, on the main thread).

    ``memory_bytes`` > 0: the watchdog retires the worker gracefully once its resident memory
    passes it (see the module's docstring). ``stack_bytes`` raises the main thread's stack limit:
    a few C routines recurse without Python's recursion check (hashing a tuple nested 150 000
    deep overflows the default 8 MiB stack and crashes the worker); 512 MiB pushes that past
    what a hook can build within its budgets.
    """
    global _FUSE, STAMP
    _raise_stack_limit(stack_bytes)
    quiet_unraisable_stops()
    fuse = WorkerFuse(hard_seconds, memory_bytes=max(memory_bytes, 0))
    fuse.start()
    _FUSE = fuse
    STAMP = fuse.stamp
    return fuse


def _raise_stack_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_STACK)
    if soft == resource.RLIM_INFINITY or 0 < wanted <= soft:
        return
    if hard != resource.RLIM_INFINITY:
        wanted = min(wanted, hard)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_STACK, (wanted, hard))


def current_fuse() -> WorkerFuse | None:
    return _FUSE
