"""Signal names and the master's synchronous signal wait.

The master never does work inside a signal handler. It blocks the signals it cares about and
collects them one at a time with ``sigtimedwait`` (nginx blocks them too and wakes in
``sigsuspend``; the effect is the same, without any async-signal-safety concerns). A blocked
signal stays pending until the master asks for it, so nothing is lost between two waits, and
``siginfo.si_pid`` gives the sender for nginx's ``received from PID`` log line.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

# `scriptlb -s NAME` -> the signal sent to the master (nginx's names)
COMMAND_SIGNALS: dict[str, signal.Signals] = {
    "stop": signal.SIGTERM,
    "quit": signal.SIGQUIT,
    "reopen": signal.SIGUSR1,
    "reload": signal.SIGHUP,
}

# A worker that begins a graceful exit the master did not ask for (the sandbox's watchdog
# retires it for its memory) tells the master with this signal, so that the replacement starts
# at once, as on a reload, instead of when the old worker has drained and exited. nginx has no
# such case (its workers never retire themselves); a real-time signal is one no operator tool
# sends, and the kernel tells the master which worker sent it (si_pid).
WORKER_RETIRING: signal.Signals = signal.SIGRTMIN

# Everything the master reacts to. USR2 and WINCH are nginx's binary-upgrade and no-accept
# signals; scriptlb does not implement them, but it waits for them so that their default
# action (terminate) cannot kill the master by surprise.
MASTER_SIGNALS: frozenset[signal.Signals] = frozenset(
    {
        signal.SIGHUP,
        signal.SIGQUIT,
        signal.SIGTERM,
        signal.SIGINT,
        signal.SIGUSR1,
        signal.SIGUSR2,
        signal.SIGWINCH,
        signal.SIGCHLD,
        WORKER_RETIRING,
    }
)

_master_pid = 0  # in a worker forked by a master: that master (set_master)


def set_master(pid: int) -> None:
    """In a worker, right after the fork: the master to tell when it retires itself."""
    global _master_pid
    _master_pid = pid


def tell_master_retiring() -> None:
    """A worker starts a graceful exit: have its master start the replacement now. (When the
    master asked for it, on a reload or a stop, the master already knows and ignores this.)
    Nothing is sent without a master, or once the master is gone (this process was
    re-parented)."""
    if _master_pid and os.getppid() == _master_pid:
        with contextlib.suppress(OSError):
            os.kill(_master_pid, WORKER_RETIRING)


@dataclass(frozen=True, slots=True)
class Received:
    """One signal taken from the pending set."""

    signo: signal.Signals
    sender: int  # si_pid; 0 when the kernel sent it or the sender is unknown

    def describe(self, action: str = "") -> str:
        """nginx's ``signal 1 (SIGHUP) received from 123, reconfiguring``."""
        text = f"signal {int(self.signo)} ({self.signo.name}) received"
        if self.sender:
            text += f" from {self.sender}"
        return f"{text}, {action}" if action else text


class SignalWaiter:
    """Blocks a set of signals in this (single-threaded) process and hands them out one by one.

    Use as a context manager: on exit the previous mask is restored, so a caller that returns
    (tests, the parent of a daemon) leaves the process as it found it.
    """

    def __init__(self, signals: Iterable[signal.Signals] = MASTER_SIGNALS) -> None:
        self._signals = frozenset(signals)
        self._previous_mask: set[int | signal.Signals] | None = None
        self._previous_retiring: Any = None

    def __enter__(self) -> SignalWaiter:
        if WORKER_RETIRING in self._signals:
            # A worker's notice may still be pending when the master stops waiting (its
            # workers QUIT, say so, and exit before the master takes it): ignored, it is
            # discarded when the mask is restored instead of killing the master (a real-time
            # signal's default action). Blocked, it still queues for sigtimedwait (Linux).
            self._previous_retiring = signal.signal(WORKER_RETIRING, signal.SIG_IGN)
        self._previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, self._signals)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous_mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, self._previous_mask)
            self._previous_mask = None
        if self._previous_retiring is not None:
            signal.signal(WORKER_RETIRING, self._previous_retiring)
            self._previous_retiring = None

    def wait(self, timeout: float | None) -> Received | None:
        """The next pending signal, waiting at most ``timeout`` seconds (None: forever)."""
        info: signal.struct_siginfo | None
        if timeout is None:
            info = signal.sigwaitinfo(self._signals)
        else:
            info = signal.sigtimedwait(self._signals, max(timeout, 0.0))
        if info is None:
            return None
        return Received(signal.Signals(info.si_signo), info.si_pid)


class EarlyStop(BaseException):
    """Raised in a new worker by QUIT/TERM/INT that arrive before the worker installed its own
    handlers: it has accepted nothing yet, so stopping at once is right for all three."""


def _early_stop(signo: int, frame: object) -> None:
    raise EarlyStop(signo)


def prepare_worker_signals() -> None:
    """In a freshly forked worker, before ``worker.run``: dispositions it can live with, then
    an empty mask (the master's blocked mask is inherited across fork; a worker that kept it
    would never see QUIT).

    Unlike C, Python cannot inherit the worker's real handlers from the master, so there is a
    window between fork and ``worker.run`` installing its own. During it, stop signals stop
    the process cleanly instead of killing it with a core dump (SIGQUIT's default), and the
    signals nginx's workers ignore (HUP, USR2, WINCH) or that mean nothing yet (USR1) are ignored.
    """
    for signo in (signal.SIGQUIT, signal.SIGTERM, signal.SIGINT):
        signal.signal(signo, _early_stop)
    for signo in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH, WORKER_RETIRING):
        signal.signal(signo, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
