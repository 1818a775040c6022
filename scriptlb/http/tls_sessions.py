"""``ssl_session_cache shared:NAME:SIZE``: session IDs every worker can resume, as nginx's
shared-memory session cache.

A zone is an LMDB shared dict (``scriptlb.state.shared_dict``) under the instance prefix, so
every worker of every generation (reloads, respawns) opens the same files (a cold start
empties them, as nginx starts with empty zones; the directory is the owner's alone, 0700,
since a session holds its master secret); sessions are kept
as OpenSSL serialises them, by session ID, for ``ssl_session_timeout``, the least recently
used going first when the zone is full. Contexts of several servers naming one zone share it.

It is used when ``ssl_session_tickets off``: with tickets on (the default) a session is in
the client's ticket, readable by every worker with no shared state and no work per handshake,
so the zone would only add a write to every full handshake (as it does in nginx) for the rare
client that resumes by ID alone (see docs/tls.md).
"""

from __future__ import annotations

import os

from scriptlb.config.units import parse_size
from scriptlb.state.shared_dict import MIN_SIZE, SharedDict, remove_files

_OPEN: dict[tuple[str, str], SharedDict] = {}  # (directory, zone name): opened once per process


def sessions_directory(prefix: str) -> str:
    """Where an instance keeps its ``ssl_session_cache shared:`` zones."""
    return os.path.join(prefix, "ssl_session_caches")


def shared_zone(session_cache: str) -> tuple[str, int] | None:
    """(name, size in bytes) of ssl_session_cache's ``shared:NAME:SIZE`` word, if any."""
    for word in session_cache.split():
        if word.startswith("shared:") and word.count(":") == 2:
            _, name, size = word.split(":")
            return name, parse_size(size) or 0
    return None


class SharedSessions:
    """One zone as tls_native's SessionStore."""

    __slots__ = ("_dict",)

    def __init__(self, shared: SharedDict) -> None:
        self._dict = shared

    def put(self, session_id: bytes, data: bytes, timeout: float) -> None:
        self._dict.set(session_id, data, max(1.0, timeout))

    def get(self, session_id: bytes) -> bytes | None:
        value = self._dict.get(session_id)[0]
        return value if isinstance(value, bytes) else None

    def remove(self, session_id: bytes) -> None:
        self._dict.delete(session_id)


def shared_sessions(directory: str, name: str, size: int) -> SharedSessions:
    """The zone ``name`` of ``directory``, opened once per process."""
    shared = _OPEN.get((directory, name))
    if shared is None:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        os.chmod(directory, 0o700)
        shared = _OPEN[(directory, name)] = SharedDict(directory, name, max(size, MIN_SIZE))
    return SharedSessions(shared)


def clear_zones(prefix: str) -> None:
    """A cold start: every zone's sessions go (a reload keeps them)."""
    directory = sessions_directory(prefix)
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        remove_files(directory, name)
