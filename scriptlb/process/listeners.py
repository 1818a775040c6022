"""Listening sockets, opened by the master (or the single process) before any worker exists.

Workers inherit the sockets across fork and only ever accept on them. What nginx does, and so
what this module does:

- One socket per distinct ``ListenConf.key``, with SO_REUSEADDR, ``backlog=N``, non-blocking.
  IPv6 sockets are ``IPV6_V6ONLY`` (nginx's ``ipv6only=on`` default), so ``[::]:80`` and
  ``0.0.0.0:80`` coexist.
- ``reuseport``: one socket per *worker* (SO_REUSEPORT), and worker N accepts only on socket N.
  The kernel spreads connections over the sockets; a socket whose worker is restarting keeps
  its queue until the new worker N takes over the very same socket.
- A specific address on a port that also has a wildcard listen (``listen 80`` and
  ``listen 127.0.0.1:80``) is not bound separately (Linux would refuse it); it shares the
  wildcard socket, and the worker picks the server block by the connection's local address.
  So several keys can map to one socket object: a worker serves each distinct socket once.
- ``listen ... udp`` (stream): a datagram socket of its own (no listen()); a specific address
  beside a wildcard one binds separately (SO_REUSEADDR lets UDP do it, the kernel then hands
  each datagram to the most specific socket), as it has no connection to take the address from.
- ``unix:/path``: a stale socket file (nobody accepting on it) is removed before bind; the
  file is chmod 0666 like nginx's, and removed when the master closes the socket for good.
- On reload the new set takes over every socket whose identity (key, worker slot) is still
  configured, so connections queued in it are never dropped; the rest are closed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import socket
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from scriptlb.config.model import ListenConf, ListenKey, MainConf, ServerConf, StreamServerConf

Slot = tuple[ListenKey, int | None]  # (bound key, worker id for reuseport sockets else None)
LogFn = Callable[[str, str], None]  # (level, message)

WILDCARDS = frozenset({"0.0.0.0", "::"})
BIND_TRIES = 5  # nginx retries a busy address 5 times, 500 ms apart
BIND_RETRY_DELAY = 0.5


class ListenError(Exception):
    """A listening socket that cannot be opened; str is nginx's message text."""


def address_text(conf: ListenConf) -> str:
    """nginx's ``addr_text``: ``127.0.0.1:8080``, ``[::1]:8080``, ``unix:/run/lb.sock``."""
    if conf.unix_path is not None:
        return f"unix:{conf.unix_path}"
    if conf.host is not None and ":" in conf.host:
        return f"[{conf.host}]:{conf.port}"
    return f"{conf.host}:{conf.port}"


@dataclass(slots=True)
class Listener:
    conf: ListenConf
    sock: socket.socket
    worker_id: int | None  # the only worker that accepts on it (reuseport), else None


# --------------------------------------------------------------------------- planning


def configured_listens(conf: MainConf) -> dict[ListenKey, ListenConf]:
    """Every distinct listen key in declaration order, options merged the way nginx allows
    them (once per address): the first declaration wins, ``reuseport`` anywhere counts."""
    merged: dict[ListenKey, ListenConf] = {}
    servers: list[ServerConf | StreamServerConf] = [
        *(conf.http.servers if conf.http is not None else ()),
        *(conf.stream.servers if conf.stream is not None else ())]
    for server in servers:
        for listen in server.listens:
            first = merged.get(listen.key)
            if first is None:
                merged[listen.key] = listen
            elif listen.reuseport and not first.reuseport:
                merged[listen.key] = dataclasses.replace(first, reuseport=True)
    return merged


def _wildcard_for(listen: ListenConf, listens: dict[ListenKey, ListenConf]) -> ListenKey | None:
    """The key of the wildcard listen that covers ``listen``, if it must share that socket."""
    if listen.unix_path is not None or listen.host in WILDCARDS or listen.reuseport or listen.udp:
        return None
    wildcard_host = "::" if listen.host is not None and ":" in listen.host else "0.0.0.0"
    wildcard = listens.get((wildcard_host, listen.port, None))
    if wildcard is None or wildcard.reuseport:
        return None
    return wildcard.key


# --------------------------------------------------------------------------- the set


class ListenerSet:
    """The listening sockets of one configuration generation."""

    def __init__(self) -> None:
        self._bound: dict[Slot, Listener] = {}
        self._routes: dict[ListenKey, ListenKey] = {}  # every configured key -> the key actually bound
        self._fresh: set[Slot] = set()  # opened by this set (not taken over from the previous)

    def __repr__(self) -> str:
        names = sorted({address_text(lst.conf) for lst in self._bound.values()})
        return f"<ListenerSet sockets={len(self._bound)} {' '.join(names)}>"

    @classmethod
    def open(
        cls,
        conf: MainConf,
        worker_count: int,
        previous: ListenerSet | None = None,
        log: LogFn | None = None,
        bind_tries: int = BIND_TRIES,
    ) -> ListenerSet:
        """Open (or take over from ``previous``) every socket ``conf`` needs.

        On failure the sockets opened here are closed and ``previous`` is untouched, so a
        reload that cannot bind leaves the running generation exactly as it was.
        """
        new = cls()
        listens = configured_listens(conf)
        try:
            for key, listen in listens.items():
                bound_key = _wildcard_for(listen, listens) or key
                new._routes[key] = bound_key
                if bound_key != key:
                    continue
                for worker_id in range(worker_count) if listen.reuseport else (None,):
                    new._add(listen, worker_id, previous, log, bind_tries)
        except BaseException:
            new._close_fresh()
            raise
        return new

    def _add(
        self,
        listen: ListenConf,
        worker_id: int | None,
        previous: ListenerSet | None,
        log: LogFn | None,
        bind_tries: int,
    ) -> None:
        slot: Slot = (listen.key, worker_id)
        inherited = _inheritable(previous, listen, worker_id) if previous is not None else None
        if inherited is not None:
            if inherited.conf.backlog != listen.backlog and not listen.udp:
                inherited.sock.listen(listen.backlog)  # nginx re-listens to apply a new backlog
            self._bound[slot] = Listener(listen, inherited.sock, worker_id)
            return
        sock = _open_socket(listen, log, bind_tries)
        self._bound[slot] = Listener(listen, sock, worker_id)
        self._fresh.add(slot)

    # ----------------------------------------------------------------------- views

    def for_worker(self, worker_id: int) -> dict[ListenKey, socket.socket]:
        """What ``worker.run`` gets: every configured key -> the socket this worker accepts on."""
        result: dict[ListenKey, socket.socket] = {}
        for key, bound_key in self._routes.items():
            listener = self._bound.get((bound_key, None)) or self._bound.get((bound_key, worker_id))
            if listener is not None:
                result[key] = listener.sock
        return result

    def not_for_worker(self, worker_id: int) -> list[socket.socket]:
        """Other workers' reuseport sockets: a new worker closes its inherited copies."""
        return [
            lst.sock
            for lst in self._bound.values()
            if lst.worker_id is not None and lst.worker_id != worker_id
        ]

    def sockets(self) -> Iterator[socket.socket]:
        for listener in self._bound.values():
            yield listener.sock

    # ----------------------------------------------------------------------- closing

    def close_unused(self, successor: ListenerSet) -> None:
        """After a reload: close the sockets ``successor`` did not take over."""
        kept = {id(sock) for sock in successor.sockets()}
        for listener in self._bound.values():
            if id(listener.sock) not in kept:
                _close(listener, unlink=True)
        self._bound.clear()

    def close(self, unlink: bool = True) -> None:
        """Close every socket. ``unlink=False`` in a process that does not own unix socket
        files (the parent of a daemon, a worker)."""
        for listener in self._bound.values():
            _close(listener, unlink=unlink)
        self._bound.clear()

    def _close_fresh(self) -> None:
        for slot in self._fresh:
            listener = self._bound.pop(slot, None)
            if listener is not None:
                _close(listener, unlink=True)


def _inheritable(previous: ListenerSet, listen: ListenConf, worker_id: int | None) -> Listener | None:
    """The previous generation's socket that can serve this slot, if any.

    The same slot keeps its socket. A listen that gains ``reuseport`` turns the old shared
    socket into worker 0's (SO_REUSEPORT set on it, nginx's ``add_reuseport``) and binds the
    other slots beside it. One that loses ``reuseport`` keeps worker 0's socket as the shared
    one; the other slots close, and their queued connections with them, as when
    ``worker_processes`` shrinks (nginx too).
    """
    same = previous._bound.get((listen.key, worker_id))
    if same is not None:
        return same
    if listen.reuseport and worker_id == 0:
        shared = previous._bound.get((listen.key, None))
        if shared is not None:
            shared.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        return shared
    if not listen.reuseport:
        return previous._bound.get((listen.key, 0))
    return None


def _close(listener: Listener, unlink: bool) -> None:
    listener.sock.close()
    path = listener.conf.unix_path
    if unlink and path is not None:
        with contextlib.suppress(OSError):
            os.unlink(path)


# --------------------------------------------------------------------------- one socket


def _open_socket(listen: ListenConf, log: LogFn | None, tries: int) -> socket.socket:
    """Bind and listen, retrying a busy address like nginx (``still could not bind()``).

    Every failure is a ListenError with nginx's wording, so neither a start nor a reload can
    be taken down by an unexpected OSError (EMFILE, EACCES...).
    """
    name = address_text(listen)
    if listen.unix_path is not None:
        _remove_stale_unix_socket(listen.unix_path)
    for attempt in range(max(tries, 1)):
        if attempt:
            time.sleep(BIND_RETRY_DELAY)
        try:
            sock = _new_socket(listen)
        except OSError as err:
            raise ListenError(f"socket() {name} failed {_errno_text(err)}") from None
        try:
            sock.bind(_sockaddr(listen))
        except OSError as err:
            sock.close()
            message = f"bind() to {name} failed {_errno_text(err)}"
            if err.errno != errno.EADDRINUSE:
                raise ListenError(message) from None
            if log is not None:
                log("emerg", message)
            continue
        try:
            _start_listening(sock, listen)
        except OSError as err:
            sock.close()
            message = f"listen() to {name}, backlog {listen.backlog} failed {_errno_text(err)}"
            raise ListenError(message) from None
        return sock
    raise ListenError("still could not bind()")


def _errno_text(err: OSError) -> str:
    """nginx's ``(98: Address already in use)``."""
    return f"({err.errno}: {os.strerror(err.errno or 0)})"


def _new_socket(listen: ListenConf) -> socket.socket:
    if listen.unix_path is not None:
        return socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ipv6 = listen.host is not None and ":" in listen.host
    kind = socket.SOCK_DGRAM if listen.udp else socket.SOCK_STREAM
    sock = socket.socket(socket.AF_INET6 if ipv6 else socket.AF_INET, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if listen.reuseport:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    # (accepted connections inherit the listening socket's buffer sizes)
    if listen.sndbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, listen.sndbuf)
    if listen.rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, listen.rcvbuf)
    if ipv6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    return sock


def _sockaddr(listen: ListenConf) -> str | tuple[str, int]:
    if listen.unix_path is not None:
        return listen.unix_path
    return (listen.host or "0.0.0.0", listen.port)


def _start_listening(sock: socket.socket, listen: ListenConf) -> None:
    if listen.unix_path is not None:
        os.chmod(listen.unix_path, 0o666)  # nginx: any local user may connect
    if not listen.udp:
        sock.listen(listen.backlog)
    sock.setblocking(False)


def _remove_stale_unix_socket(path: str) -> None:
    """Remove a socket file left by a process that died, but never a live one: a connect()
    that is refused proves nobody is accepting on it."""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return
    except OSError:
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        with contextlib.suppress(OSError):
            os.unlink(path)
    except OSError:
        pass
    finally:
        probe.close()
