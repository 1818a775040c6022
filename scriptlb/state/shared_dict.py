"""``python_shared_dict``: ngx.shared.DICT for hooks, shared by every worker of an instance.

Theory of operation
-------------------
Storage is LMDB (a memory-mapped copy-on-write B+tree): reads are lock-free snapshots and write
transactions are serialized across processes by LMDB's own robust mutex, so every method below
is one transaction and therefore atomic across all workers. The files live under the instance
prefix, so the data survives a reload or a worker respawn, like nginx's shared-memory zones.

**One LMDB environment per dict** (``<dir>/<name>/data.mdb``), not one environment with a named
DB per dict: writers on two different dicts never wait for each other (LMDB has one writer lock
per environment), each dict's map is sized from its own ``size`` and can grow on a reload without
touching the others, and a dict's files can be removed alone.

Inside the environment, three named DBs:

``data``  dict key -> record: ``<expires f64><touched f64><flags u32><type 1 byte>`` + payload.
          ``expires`` is absolute wall-clock time (0 = never); ``touched`` is the last LRU
          promotion time. Types: ``s`` str (UTF-8), ``b`` bytes, ``i`` int (i64), ``I`` big int
          (decimal text), ``f`` float (f64), ``T``/``F`` bool. ``None`` is not stored: as in
          OpenResty, setting a key to ``None`` deletes it.
``lru``   ``<touched as big-endian f64><dict key>`` -> empty: the entries ordered oldest first,
          so eviction pops from the front with a cursor.
``meta``  ``used`` -> bytes charged to the entries (see Full, below).

**LRU, cheaply.** nginx moves an entry to the head of its LRU queue on every access. Doing that
literally costs a write transaction per ``get`` and two more B-tree updates per ``incr``. Instead
we use memcached's rule: an entry is promoted at most once per ``PROMOTE_INTERVAL`` (1 s).
New entries go to the head; ``set``/``add``/``replace``/``incr`` of an existing entry promote
it only when its last promotion is older than that; a ``get`` of such an entry only notes the
key in a small per-process list that the process's next write transaction applies (or that is
flushed once it holds ``PENDING_FLUSH`` keys). Eviction order is therefore LRU to within about a
second, and the hot paths stay at one B-tree lookup (get) or one lookup and one update (incr,
and a same-size set of a recently promoted key).

**Expiry** is lazy: reads compare ``expires`` with the injected clock; expired records are removed
by eviction (oldest first, expired or not), ``flush_expired`` or being overwritten.

**Full.** ``size`` is a byte budget: every entry is charged its record, its key (twice: data
and index) and a fixed node overhead, and the running total lives in a third DB (``meta``),
updated in the same transaction as the entry. A write that would exceed the budget evicts the
oldest entries (expired or not) inside its own transaction until it fits, reporting
``forcible=True`` when a live entry went, as nginx's shdict does; ``safe_*`` return
``(False, "no memory")`` instead. Why a budget rather than LMDB's own ``MDB_MAP_FULL``: a map that
is 100% full cannot even delete (copy-on-write needs free pages), so eviction must start before
LMDB runs out; the map is made ``MAP_FACTOR`` times the budget to absorb B-tree overhead.

Return conventions are OpenResty's, with Lua's multiple values as fixed-size tuples; flags of 0
come back as ``None`` (OpenResty returns no flags value then).

Differences from OpenResty, on purpose: keys are at most ``MAX_KEY_BYTES`` (LMDB's key limit, not
65535); ``flush_all`` removes the entries at once (OpenResty only marks them expired, so
``get_stale`` could still see them); ``capacity``/``free_space`` report the byte budget, not
LMDB pages.

Fork safety: LMDB handles must not cross ``fork()``. Environments are cached per process (LMDB
forbids opening one environment twice in a process) and an at-fork hook reopens every live dict
in the child, so a dict created in the master works in its workers; a worker should still
create its dicts after the fork when it can.
"""

from __future__ import annotations

import os
import struct
import time
import weakref
from collections.abc import Callable
from typing import Any

import lmdb

Value = str | bytes | int | float | bool

PROMOTE_INTERVAL = 1.0  # seconds between two LRU promotions of one entry (memcached's rule)
PENDING_FLUSH = 64  # read promotions buffered per process before a write transaction applies them
MAX_KEY_BYTES = 500  # LMDB's default max key size is 511; the lru key adds 8 bytes of time
_SHORT_KEY_CHARS = MAX_KEY_BYTES // 4  # a str this short is at most MAX_KEY_BYTES in UTF-8
MIN_SIZE = 16 * 4096  # as nginx, refuse a zone too small to be useful
ENTRY_OVERHEAD = 40  # LMDB node headers of the data and index rows, and a little page slack
# The LMDB map is larger than the dict's byte budget, so that LMDB itself never fills up: B-tree
# pages may be only 25% full before LMDB merges them, and copy-on-write needs free pages for the
# transaction in flight and the previous snapshot. The file is sparse: unused map costs nothing.
MAP_FACTOR = 4
MAP_SLACK = 1 << 20
_USED_KEY = b"used"  # meta DB: bytes charged to the entries (see _cost), an i64

_HEAD = struct.Struct("<ddIc")
_HEAD_SIZE = _HEAD.size
_TOUCHED_OFFSET = 8  # the header's second field
_INT_RECORD = struct.Struct("<ddIcq")  # header + i64 in one pack: incr's fast path
_FLOAT_RECORD = struct.Struct("<ddIcd")
_I64 = struct.Struct("<q")
_F64 = struct.Struct("<d")
_LRU_TIME = struct.Struct(">d")  # big-endian: byte order == numeric order for times >= 0
_I64_MIN, _I64_MAX = -(1 << 63), (1 << 63) - 1

_NUMBER_KINDS = (b"i", b"I", b"f")


class _BadKey(Exception):
    """An invalid key: the public method returns OpenResty's error value instead."""


def _key_bytes(key: str | bytes) -> bytes:
    k = key.encode() if isinstance(key, str) else key
    if not isinstance(k, bytes):
        raise TypeError(f"shared dict key must be str or bytes, not {type(key).__name__}")
    if not k:
        raise _BadKey("empty key")
    if len(k) > MAX_KEY_BYTES:
        raise _BadKey("key too long")
    return k


def _record(value: Value, expires: float, touched: float, flags: int) -> bytes:
    """Encode a value with its header; the type byte keeps str/bytes/int/float/bool apart."""
    if value is True or value is False:
        return _HEAD.pack(expires, touched, flags, b"T" if value else b"F")
    if isinstance(value, int):
        if _I64_MIN <= value <= _I64_MAX:
            return _INT_RECORD.pack(expires, touched, flags, b"i", value)
        return _HEAD.pack(expires, touched, flags, b"I") + str(value).encode()
    if isinstance(value, float):
        return _FLOAT_RECORD.pack(expires, touched, flags, b"f", value)
    if isinstance(value, str):
        return _HEAD.pack(expires, touched, flags, b"s") + value.encode()
    if isinstance(value, bytes):
        return _HEAD.pack(expires, touched, flags, b"b") + value
    raise TypeError(f"bad value type: {type(value).__name__} (str, bytes, int, float, bool or None)")


def _decode(kind: bytes, raw: bytes) -> Value:
    if kind == b"i":
        return _I64.unpack_from(raw, _HEAD_SIZE)[0]
    if kind == b"s":
        return raw[_HEAD_SIZE:].decode()
    if kind == b"f":
        return _F64.unpack_from(raw, _HEAD_SIZE)[0]
    if kind == b"b":
        return raw[_HEAD_SIZE:]
    if kind == b"T":
        return True
    if kind == b"F":
        return False
    if kind == b"I":
        return int(raw[_HEAD_SIZE:])
    raise ValueError(f"corrupt shared dict record type {kind!r}")


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# --------------------------------------------------------------------------- environments

# realpath -> (pid, env, data db, lru db, meta db). One open per process and path (an LMDB
# rule); the pid makes a forked child open its own handle instead of using its parent's.
_ENVS: dict[str, tuple[int, lmdb.Environment, Any, Any, Any]] = {}


def _open(path: str, size: int) -> tuple[lmdb.Environment, Any, Any, Any]:
    cached = _ENVS.get(path)
    pid = os.getpid()
    if cached is not None and cached[0] == pid:
        return cached[1:]
    os.makedirs(path, exist_ok=True)
    env = lmdb.open(
        path,
        map_size=map_size(size),
        max_dbs=5,  # data, lru, meta, and a synced dict's own and dirty (SyncedSharedDict)
        # Like nginx's shared memory, the data must outlive a worker, not a power cut: commits go
        # to the page cache only. writemap writes records straight into the shared mapping,
        # which makes a write transaction ~3x cheaper than with a private buffer. The price: an
        # OS crash may leave the file corrupt, so a cold start should remove_files() first
        # (nginx starts with empty zones anyway); reloads and worker respawns keep the data.
        sync=False,
        metasync=False,
        writemap=True,
        readahead=False,
        max_spare_txns=1,  # reuse the read transaction handle: begin() of a reader gets cheaper
    )
    # A worker killed mid-read leaves its reader slot behind, pinning an old snapshot so that
    # freed pages are never reused; clear the slots of dead processes whenever one opens.
    env.reader_check()
    data = env.open_db(b"data")
    lru = env.open_db(b"lru")
    meta = env.open_db(b"meta")
    _ENVS[path] = (pid, env, data, lru, meta)
    return env, data, lru, meta


# What a hook may call on ``ngx.shared.NAME`` (the sandbox's attribute allow-list): the
# OpenResty API, not close() or the internals.
HOOK_METHODS = frozenset(
    {
        "get",
        "get_stale",
        "set",
        "safe_set",
        "add",
        "safe_add",
        "replace",
        "delete",
        "incr",
        "get_keys",
        "ttl",
        "expire",
        "flush_all",
        "flush_expired",
        "capacity",
        "free_space",
    }
)

# Every dict of this process, so a forked child reopens their environments before first use.
_LIVE: weakref.WeakSet[SharedDict] = weakref.WeakSet()


# A parent's handles, kept alive forever in a forked child: deallocating one would run
# mdb_env_close, which clears reader slots by the *opening* process's pid, i.e. the parent's.
_INHERITED: list[object] = []


def _reopen_all_after_fork() -> None:
    _INHERITED.extend(_ENVS.values())
    _ENVS.clear()
    for shared in list(_LIVE):
        shared._reopen_after_fork()


os.register_at_fork(after_in_child=_reopen_all_after_fork)


def open_environment(path: str, size: int) -> tuple[lmdb.Environment, Any]:
    """This process's handle on the zone at ``path`` (reopened after a fork) and its ``data``
    DB: for other zones kept the same way (scriptlb.request.limits)."""
    env, data, _lru, _meta = _open(path, size)
    return env, data


def map_size(size: int) -> int:
    """The LMDB map behind a zone of ``size`` bytes (address space; the file stays sparse)."""
    return MAP_FACTOR * size + MAP_SLACK


def zone_directory(prefix: str) -> str:
    """Where an instance keeps its ``python_shared_dict`` zones: under the prefix, so workers of
    every generation (reloads, respawns) open the same files."""
    return os.path.join(prefix, "shared_dicts")


def remove_files(directory: str, name: str) -> None:
    """Delete a dict's files (a cold start that wants nginx's "empty after restart" semantics)."""
    path = os.path.join(directory, name)
    for file_name in ("data.mdb", "lock.mdb"):
        try:
            os.unlink(os.path.join(path, file_name))
        except FileNotFoundError:
            pass


class SharedDict:
    """One ``python_shared_dict NAME SIZE``: an LMDB environment in ``<directory>/<name>/``.

    ``clock`` returns wall-clock seconds; it must agree across processes (expiry times are
    stored absolute), so the default is ``time.time``. Inject another in tests.
    """

    __slots__ = (
        "__weakref__",
        "_clock",
        "_data",
        "_env",
        "_lru",
        "_meta",
        "_path",
        "_pending",
        "name",
        "size",
    )

    def __init__(
        self, directory: str, name: str, size: int, *, clock: Callable[[], float] = time.time
    ) -> None:
        if size < MIN_SIZE:
            raise ValueError(f'shared dict "{name}" is too small: {size} bytes (minimum {MIN_SIZE})')
        self.name = name
        self.size = size
        self._path = os.path.realpath(os.path.join(directory, name))
        self._clock = clock
        self._pending: dict[bytes, None] = {}  # keys read while due for LRU promotion
        self._env, self._data, self._lru, self._meta = _open(self._path, size)
        _LIVE.add(self)

    def _reopen_after_fork(self) -> None:
        self._env, self._data, self._lru, self._meta = _open(self._path, self.size)
        self._pending.clear()

    # ------------------------------------------------------------------ reads

    def _read_txn(self) -> lmdb.Transaction:
        try:
            return self._env.begin(db=self._data)
        except lmdb.MapResizedError:
            self._env.set_mapsize(0)  # another process reopened the dict larger (a reload)
            return self._env.begin(db=self._data)

    def _read(self, k: bytes) -> bytes | None:
        with self._read_txn() as txn:
            return txn.get(k)

    def _read_after_resize(self, k: bytes) -> bytes | None:
        self._env.set_mapsize(0)
        return self._read(k)

    def get(self, key: str | bytes) -> tuple[Value | None, Any]:
        """``value, flags``; ``(None, None)`` when absent or expired; ``(None, err)`` on a bad key."""
        try:
            k = _key_bytes(key)
        except _BadKey as err:
            return None, str(err)
        try:
            with self._env.begin(db=self._data) as txn:
                raw = txn.get(k)
        except lmdb.MapResizedError:
            raw = self._read_after_resize(k)
        if raw is None:
            return None, None
        expires, touched, flags, kind = _HEAD.unpack_from(raw)
        now = self._clock()
        if expires and expires <= now:
            return None, None
        if touched < now - PROMOTE_INTERVAL:
            self._note_read(k)
        return _decode(kind, raw), flags or None

    def get_stale(self, key: str | bytes) -> tuple[Value | None, Any, bool]:
        """``value, flags, stale``: like ``get`` but also returns an expired, not yet removed value."""
        try:
            k = _key_bytes(key)
        except _BadKey as err:
            return None, str(err), False
        raw = self._read(k)
        if raw is None:
            return None, None, False
        expires, _touched, flags, kind = _HEAD.unpack_from(raw)
        stale = bool(expires) and expires <= self._clock()
        return _decode(kind, raw), flags or None, stale

    def ttl(self, key: str | bytes) -> tuple[float | None, str | None]:
        """Remaining seconds (0 = never expires), or ``(None, "not found")``."""
        try:
            k = _key_bytes(key)
        except _BadKey as err:
            return None, str(err)
        raw = self._read(k)
        if raw is None:
            return None, "not found"
        expires = _HEAD.unpack_from(raw)[0]
        if not expires:
            return 0, None
        remaining = expires - self._clock()
        if remaining <= 0:
            return None, "not found"
        return remaining, None

    def get_keys(self, max_count: int = 1024) -> list[str | bytes]:
        """Up to ``max_count`` live keys (0 = all), in key order. Keys that decode as UTF-8 come
        back as str, others as bytes."""
        now = self._clock()
        keys: list[str | bytes] = []
        with self._read_txn() as txn:
            for k, raw in txn.cursor():
                expires = _HEAD.unpack_from(raw)[0]
                if expires and expires <= now:
                    continue
                keys.append(_key_out(k))
                if max_count and len(keys) >= max_count:
                    break
        return keys

    def capacity(self) -> int:
        """The dict's size in bytes, as configured."""
        return self.size

    def free_space(self) -> int:
        """Bytes of the size not charged to any entry (expired entries count until removed)."""
        with self._read_txn() as txn:
            return max(0, self.size - self._used(txn))

    # ------------------------------------------------------------------ writes

    def set(
        self, key: str | bytes, value: Value | None, exptime: float = 0, flags: int = 0
    ) -> tuple[bool, str | None, bool]:
        """``ok, err, forcible``; evicts least recently used entries when the dict is full."""
        return self._store(key, value, exptime, flags, _SET, safe=False)

    def safe_set(
        self, key: str | bytes, value: Value | None, exptime: float = 0, flags: int = 0
    ) -> tuple[bool, str | None]:
        """Like ``set`` but never evicts: ``(False, "no memory")`` when full."""
        ok, err, _ = self._store(key, value, exptime, flags, _SET, safe=True)
        return ok, err

    def add(
        self, key: str | bytes, value: Value | None, exptime: float = 0, flags: int = 0
    ) -> tuple[bool, str | None, bool]:
        """Like ``set`` but only when the key is absent or expired: else ``(False, "exists", False)``."""
        return self._store(key, value, exptime, flags, _ADD, safe=False)

    def safe_add(
        self, key: str | bytes, value: Value | None, exptime: float = 0, flags: int = 0
    ) -> tuple[bool, str | None]:
        """Like ``add`` but never evicts: ``(False, "no memory")`` when full."""
        ok, err, _ = self._store(key, value, exptime, flags, _ADD, safe=True)
        return ok, err

    def replace(
        self, key: str | bytes, value: Value | None, exptime: float = 0, flags: int = 0
    ) -> tuple[bool, str | None, bool]:
        """Like ``set`` but only when the key is live: else ``(False, "not found", False)``."""
        return self._store(key, value, exptime, flags, _REPLACE, safe=False)

    def delete(self, key: str | bytes) -> None:
        """Remove the key (no error when absent), like ``set(key, None)``."""
        self._store(key, None, 0, 0, _SET, safe=False)

    def incr(
        self,
        key: str | bytes,
        value: int | float,
        init: int | float | None = None,
        init_ttl: float | None = None,
    ) -> tuple[int | float | None, str | None, bool]:
        """``new_value, err, forcible``. An absent/expired key is ``(None, "not found", False)``
        unless ``init`` is given: it then starts at ``init + value`` with ``init_ttl`` (the TTL
        of an existing key is kept). A non-number is ``(None, "not a number", False)``."""
        if not _is_number(value):
            raise TypeError(f"cannot add value of type {type(value).__name__}")
        if init is not None and not _is_number(init):
            raise TypeError(f"bad init value type {type(init).__name__}")
        if init_ttl is not None and (init is None or init_ttl < 0):
            raise ValueError('bad "init_ttl" argument' if init is not None else "init_ttl needs init")
        # short str keys cannot exceed MAX_KEY_BYTES in UTF-8: skip the full check on the hot path
        if type(key) is str and 0 < len(key) <= _SHORT_KEY_CHARS:
            k = key.encode()
        else:
            try:
                k = _key_bytes(key)
            except _BadKey as err:
                return None, str(err), False
        try:  # the fast path of _in_write_txn, inlined: incr is the hot write
            with self._env.begin(db=self._data, write=True) as txn:
                return self._incr_in(txn, k, value, init, init_ttl)
        except (lmdb.MapResizedError, lmdb.MapFullError):
            return self._in_write_txn(self._incr_in, k, value, init, init_ttl)  # type: ignore[return-value]

    def expire(self, key: str | bytes, exptime: float) -> tuple[bool, str | None]:
        """Set a live key's TTL (0 = never expires): ``(True, None)`` or ``(False, "not found")``."""
        if exptime < 0:
            raise ValueError('bad "exptime" argument')
        try:
            k = _key_bytes(key)
        except _BadKey as err:
            return False, str(err)
        ok, err, _ = self._in_write_txn(self._expire_in, k, exptime)
        return ok, err

    def flush_all(self) -> None:
        """Remove every entry."""
        self._in_write_txn(self._flush_all_in)
        self._pending.clear()

    def flush_expired(self, max_count: int = 0) -> int:
        """Remove expired entries (at most ``max_count``; 0 = all) and return how many."""
        removed, _, _ = self._in_write_txn(self._flush_expired_in, max_count)
        return removed or 0

    def close(self) -> None:
        """Close this process's handle of the dict, shared by every ``SharedDict`` object of the
        same path in this process (tests; workers just exit)."""
        _LIVE.discard(self)
        cached = _ENVS.pop(self._path, None)
        if cached is not None and cached[0] == os.getpid():
            cached[1].close()

    # ------------------------------------------------------------------ write transactions

    def _in_write_txn(self, apply: Callable[..., tuple[Any, Any, bool]], *args: Any) -> tuple[Any, Any, bool]:
        """Run ``apply(txn, *args)`` in one write transaction: the unit of atomicity across workers.

        The byte budget keeps LMDB itself from filling up, so ``MapFullError`` only comes from
        pathological page fragmentation; it is reported as "no memory" rather than raised."""
        try:
            with self._env.begin(db=self._data, write=True) as txn:
                return apply(txn, *args)
        except lmdb.MapResizedError:
            self._env.set_mapsize(0)  # another process reopened the dict larger (a reload)
            with self._env.begin(db=self._data, write=True) as txn:
                return apply(txn, *args)
        except lmdb.MapFullError:
            return None, "no memory", False

    def _store(
        self, key: str | bytes, value: Value | None, exptime: float, flags: int, op: int, safe: bool
    ) -> tuple[bool, str | None, bool]:
        if type(key) is str and 0 < len(key) <= _SHORT_KEY_CHARS:
            k = key.encode()
        else:
            try:
                k = _key_bytes(key)
            except _BadKey as err:
                return False, str(err), False
        if exptime < 0:
            raise ValueError('bad "exptime" argument')  # a Lua error in OpenResty too
        now = self._clock()
        record = None
        if value is not None:
            record = _record(value, now + exptime if exptime > 0 else 0.0, now, flags)
        try:  # the fast path of _in_write_txn, inlined
            with self._env.begin(db=self._data, write=True) as txn:
                return self._store_op(txn, k, record, op, safe, now)
        except (lmdb.MapResizedError, lmdb.MapFullError):
            ok, err, forcible = self._in_write_txn(self._store_op, k, record, op, safe, now)
            return bool(ok), err, forcible

    def _store_in(
        self, txn: lmdb.Transaction, k: bytes, record: bytes | None, op: int, safe: bool, now: float
    ) -> tuple[bool, str | None, bool]:
        if self._pending:
            self._promote_pending(txn, now)
        old = txn.get(k)
        if op != _SET:
            live = old is not None and not _expired(old, now)
            if op == _ADD and live:
                return False, "exists", False
            if op == _REPLACE and not live:
                return False, "not found", False
        # _cost() inlined: the key's share cancels out when an entry is overwritten
        if record is None:
            growth = -(len(old) + 2 * len(k) + ENTRY_OVERHEAD) if old is not None else 0
        elif old is None:
            growth = len(record) + 2 * len(k) + ENTRY_OVERHEAD
        else:
            growth = len(record) - len(old)
        forcible = False
        if growth:
            used_raw = txn.get(_USED_KEY, db=self._meta)
            used = _I64.unpack(used_raw)[0] if used_raw is not None else 0
            if used + growth > self.size:
                if safe:
                    return False, "no memory", False
                room = self._make_room(txn, k, used, growth)
                if room is None:
                    return False, "no memory", False
                used, forcible = room
            txn.put(_USED_KEY, _I64.pack(used + growth), db=self._meta)
        if old is None:
            if record is not None:
                txn.put(k, record)
                txn.put(_LRU_TIME.pack(now) + k, b"", db=self._lru)
            return True, None, forcible
        old_touched = _HEAD.unpack_from(old)[1]
        if record is None:
            txn.delete(k)
            txn.delete(_LRU_TIME.pack(old_touched) + k, db=self._lru)
        elif old_touched >= now - PROMOTE_INTERVAL:
            # promoted less than a second ago: keep its index row (memcached's rule, as incr)
            patched = bytearray(record)
            _F64.pack_into(patched, _TOUCHED_OFFSET, old_touched)
            txn.put(k, patched)
        else:
            txn.delete(_LRU_TIME.pack(old_touched) + k, db=self._lru)
            txn.put(k, record)
            txn.put(_LRU_TIME.pack(now) + k, b"", db=self._lru)
        return True, None, forcible

    # What a public set/add/replace/delete runs in its transaction; a synced dict also notes the
    # key for its sync process there (_store_in itself is also the internal, unnoted write).
    _store_op = _store_in
    _noting = False  # a synced dict notes increments (_note_incr) in incr's own transaction

    def _note_incr(self, txn: lmdb.Transaction, k: bytes, value: int | float,
                   init: int | float | None) -> None:
        raise NotImplementedError

    def _incr_in(
        self,
        txn: lmdb.Transaction,
        k: bytes,
        value: int | float,
        init: int | float | None,
        init_ttl: float | None,
    ) -> tuple[int | float | None, str | None, bool]:
        now = self._clock()
        if self._pending:
            self._promote_pending(txn, now)
        old = txn.get(k)
        if old is None or _expired(old, now):
            if init is None:
                return None, "not found", False
            new = init + value
            expires = now + init_ttl if init_ttl else 0.0
            ok, err, forcible = self._store_in(txn, k, _record(new, expires, now, 0), _SET, False, now)
            if ok and self._noting:
                self._note_incr(txn, k, value, init)
            return (new if ok else None), err, forcible
        expires, touched, flags, kind = _HEAD.unpack_from(old)
        if kind not in _NUMBER_KINDS:
            return None, "not a number", False
        new = _decode(kind, old) + value  # type: ignore[operator]
        if kind == b"i" and type(new) is int and _I64_MIN <= new <= _I64_MAX:
            if touched < now - PROMOTE_INTERVAL:  # memcached's rule: promote at most once a second
                txn.delete(_LRU_TIME.pack(touched) + k, db=self._lru)
                txn.put(_LRU_TIME.pack(now) + k, b"", db=self._lru)
                touched = now
            # same record size: the byte budget does not change
            txn.put(k, _INT_RECORD.pack(expires, touched, flags, b"i", new))
            if self._noting:
                self._note_incr(txn, k, value, None)
            return new, None, False
        # the type changed size (big int, float): account it like a set that keeps ttl and flags
        ok, err, forcible = self._store_in(txn, k, _record(new, expires, now, flags), _SET, False, now)
        if ok and self._noting:
            self._note_incr(txn, k, value, None)
        return (new if ok else None), err, forcible

    def _expire_in(self, txn: lmdb.Transaction, k: bytes, exptime: float) -> tuple[bool, str | None, bool]:
        raw = txn.get(k)
        now = self._clock()
        if raw is None or _expired(raw, now):
            return False, "not found", False
        _expires, touched, flags, kind = _HEAD.unpack_from(raw)
        new_expires = now + exptime if exptime > 0 else 0.0
        txn.put(k, _HEAD.pack(new_expires, touched, flags, kind) + raw[_HEAD_SIZE:])
        return True, None, False

    def _flush_all_in(self, txn: lmdb.Transaction) -> tuple[None, None, bool]:
        txn.drop(self._data, delete=False)
        txn.drop(self._lru, delete=False)
        txn.put(_USED_KEY, _I64.pack(0), db=self._meta)
        return None, None, False

    def _flush_expired_in(self, txn: lmdb.Transaction, max_count: int) -> tuple[int, None, bool]:
        now = self._clock()
        expired: list[tuple[bytes, bytes]] = []
        for k, raw in txn.cursor():
            if _expired(raw, now):
                expired.append((k, raw))
                if max_count and len(expired) >= max_count:
                    break
        used = self._used(txn)
        for k, raw in expired:
            used -= self._remove(txn, k, raw)
        if expired:
            txn.put(_USED_KEY, _I64.pack(used), db=self._meta)
        return len(expired), None, False

    # ------------------------------------------------------------------ budget and LRU

    def _used(self, txn: lmdb.Transaction) -> int:
        raw = txn.get(_USED_KEY, db=self._meta)
        return _I64.unpack(raw)[0] if raw is not None else 0

    def _remove(self, txn: lmdb.Transaction, k: bytes, raw: bytes) -> int:
        """Delete an entry and its LRU index row; returns the bytes it was charged."""
        txn.delete(k)
        txn.delete(_LRU_TIME.pack(_HEAD.unpack_from(raw)[1]) + k, db=self._lru)
        return _cost(k, raw)

    def _make_room(self, txn: lmdb.Transaction, k: bytes, used: int, growth: int) -> tuple[int, bool] | None:
        """Evict least recently used entries (never ``k``) until ``growth`` more bytes fit, inside
        the caller's transaction. Returns the new used count and whether a live entry went, or
        None (and evicts nothing) when even an empty dict could not take the growth."""
        own = txn.get(k)
        if growth + (_cost(k, own) if own is not None else 0) > self.size:
            return None
        now = self._clock()
        forcible = False
        cursor = txn.cursor(db=self._lru)
        cursor.first()
        while used + growth > self.size:
            lru_key = cursor.key()
            if not lru_key:
                return None  # index exhausted (cannot happen while the accounting holds)
            victim = lru_key[_LRU_TIME.size :]
            if victim == k:
                cursor.next()
                continue
            raw = txn.get(victim)
            cursor.delete()  # the index row; the cursor moves to the next oldest
            if raw is None:
                continue
            forcible = forcible or not _expired(raw, now)
            txn.delete(victim)
            used -= _cost(victim, raw)
        return used, forcible

    def _note_read(self, k: bytes) -> None:
        pending = self._pending
        pending[k] = None
        if len(pending) >= PENDING_FLUSH:
            self._in_write_txn(self._flush_pending_in)

    def _flush_pending_in(self, txn: lmdb.Transaction) -> tuple[None, None, bool]:
        self._promote_pending(txn, self._clock())
        return None, None, False

    def _promote_pending(self, txn: lmdb.Transaction, now: float) -> None:
        """Apply the LRU promotions of keys this process read since its last write."""
        lru = self._lru
        for k in self._pending:
            raw = txn.get(k)
            if raw is None:
                continue
            expires, touched, flags, kind = _HEAD.unpack_from(raw)
            if touched >= now - PROMOTE_INTERVAL or (expires and expires <= now):
                continue
            txn.delete(_LRU_TIME.pack(touched) + k, db=lru)
            txn.put(_LRU_TIME.pack(now) + k, b"", db=lru)
            txn.put(k, _HEAD.pack(expires, now, flags, kind) + raw[_HEAD_SIZE:])
        self._pending.clear()

    def __repr__(self) -> str:
        return f"<SharedDict {self.name} size={self.size} path={self._path}>"


_SET, _ADD, _REPLACE = 0, 1, 2


def _expired(raw: bytes, now: float) -> bool:
    expires = _HEAD.unpack_from(raw)[0]
    return bool(expires) and expires <= now


def _cost(k: bytes, record: bytes) -> int:
    """Bytes an entry is charged against the dict's size: its record, its key twice (data and
    LRU index) and LMDB's per-node overhead, i.e. what it occupies in full B-tree pages."""
    return len(record) + 2 * len(k) + ENTRY_OVERHEAD


def _key_out(k: bytes) -> str | bytes:
    try:
        return k.decode()
    except UnicodeDecodeError:
        return k


# --------------------------------------------------------------------------- cluster sync
#
# A ``python_shared_dict ... sync=redis://...`` zone is a SyncedSharedDict: the same LMDB zone,
# read the same way (``get`` never leaves the node), whose writes also note the key in two
# more named DBs, inside the writing transaction:
#
# ``dirty``  key -> ``c`` (incremented) or ``v`` (set, added, replaced, deleted, expire changed):
#            what the node's sync process must push (``collect`` takes and clears them).
# ``own``    key -> ``<base><others><gen>``: the cluster generation the local value belongs to
#            (empty until Redis named one), the generation's base (the value set, or incr's
#            ``init``) and the other nodes' totals, as of the last merge. This node's own
#            cumulative increments are then ``value - base - others``: a hook's incr changes
#            only the value (no second B-tree on the hot path), a merge rewrites base and
#            others and adds this node's total back. The cluster value of a counter is ``base +
#            sum of every node's own``: each node only ever *replaces* its own total in Redis,
#            so a push repeated after an outage cannot count twice.
#
# The Redis side (scriptlb.state.dict_sync) stamps every set/delete with a new generation: last
# writer wins, and increments made in an older generation are dropped with it.

_NUMBER = struct.Struct("<cq")  # i: an i64; f: the same 8 bytes hold an f64
_DIRTY_COUNTER, _DIRTY_VALUE = b"c", b"v"
_VALUE_KINDS = (b"s", b"b", b"T", b"F")  # what a set of a non-number pushes as ``_v``


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode()
        return True
    except UnicodeDecodeError:
        return False


def number_text(value: int | float) -> bytes:
    """A number as Redis keeps it (decimal text; exact for any int)."""
    return (repr(value) if isinstance(value, float) else str(value)).encode()


def parse_number(text: bytes | str) -> int | float:
    raw = text.decode() if isinstance(text, bytes) else text
    try:
        return int(raw)
    except ValueError:
        return float(raw)


def _pack_number(value: int | float) -> bytes:
    if isinstance(value, int) and _I64_MIN <= value <= _I64_MAX:
        return _NUMBER.pack(b"i", value)
    return b"f" + _F64.pack(float(value))


def _unpack_number(raw: bytes, offset: int) -> int | float:
    kind, bits = _NUMBER.unpack_from(raw, offset)
    return bits if kind == b"i" else _F64.unpack_from(raw, offset + 1)[0]


def pack_own(gen: bytes, base: int | float, others: int | float) -> bytes:
    """``<base><others><gen>``: what the last merge said about the rest of the cluster."""
    return _pack_number(base) + _pack_number(others) + gen


def unpack_own(raw: bytes) -> tuple[bytes, int | float, int | float]:
    """``(gen, base, others)``."""
    return raw[2 * _NUMBER.size :], _unpack_number(raw, 0), _unpack_number(raw, _NUMBER.size)


def own_total(record: bytes, own_raw: bytes) -> tuple[bytes, int | float, int | float]:
    """``(gen, own, base)`` of a live number: this node's increments are what the value holds
    beyond the base and the other nodes' totals of the last merge."""
    gen, base, others = unpack_own(own_raw)
    return gen, _decode(record[_HEAD_SIZE - 1 : _HEAD_SIZE], record) - base - others, base  # type: ignore[operator]


class Push:
    """One key's local state, as the sync process sends it to Redis."""

    __slots__ = ("base", "flags", "gen", "key", "op", "payload", "pttl")

    def __init__(self, key: bytes, op: bytes, gen: bytes, payload: bytes, base: bytes, flags: int,
                 pttl: int) -> None:
        self.key = key
        self.op = op  # c: counter (own total), b: number set, v: other value set, d: delete
        self.gen = gen
        self.payload = payload
        self.base = base
        self.flags = flags
        self.pttl = pttl  # milliseconds left, 0 = never expires

    def args(self) -> list[bytes]:
        return [self.key, self.op, self.gen, self.payload, self.base, str(self.flags).encode(),
                str(self.pttl).encode()]

    def __repr__(self) -> str:
        return f"<Push {self.key!r} {self.op!r} gen={self.gen!r} {self.payload!r}>"


class ClusterState:
    """One key as Redis holds it: the fields of its hash and its time to live."""

    __slots__ = ("fields", "key", "pttl")

    def __init__(self, key: bytes, fields: dict[bytes, bytes], pttl: int) -> None:
        self.key = key
        self.fields = fields
        self.pttl = pttl


class SyncedSharedDict(SharedDict):
    """A shared dict whose writes are noted for the node's sync process (see above)."""

    __slots__ = ("_dirty", "_own")

    def __init__(self, directory: str, name: str, size: int, *,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__(directory, name, size, clock=clock)
        self._open_sync_dbs()

    def _open_sync_dbs(self) -> None:
        self._own = self._env.open_db(b"own")
        self._dirty = self._env.open_db(b"dirty")

    def _reopen_after_fork(self) -> None:
        super()._reopen_after_fork()
        self._open_sync_dbs()

    # ------------------------------------------------------------------ hook side

    def _store_op(self, txn: lmdb.Transaction, k: bytes, record: bytes | None, op: int, safe: bool,
                  now: float) -> tuple[bool, str | None, bool]:
        result = self._store_in(txn, k, record, op, safe, now)
        if result[0]:
            txn.put(k, _DIRTY_VALUE, db=self._dirty)
            txn.delete(k, db=self._own)  # a set starts a new generation: no increments in it yet
        return result

    _noting = True

    def _note_incr(self, txn: lmdb.Transaction, k: bytes, value: int | float,
                   init: int | float | None) -> None:
        """In incr's transaction: add ``value`` to this node's own total (``init`` given: the key
        was created by this incr, a new lifetime with that base)."""
        if init is not None:
            txn.put(k, pack_own(b"", init, 0), db=self._own)  # a new lifetime
        dirty = self._dirty
        if txn.get(k, db=dirty) is not None:
            return  # noted since the last merge (the common case: one read, no page copied)
        if init is None and txn.get(k, db=self._own) is None:
            txn.put(k, _DIRTY_VALUE, db=dirty)  # a value only set here: pushed as a set
        else:
            txn.put(k, _DIRTY_COUNTER, db=dirty)

    def _expire_in(self, txn: lmdb.Transaction, k: bytes, exptime: float) -> tuple[bool, str | None, bool]:
        result = super()._expire_in(txn, k, exptime)
        if result[0]:
            txn.put(k, _DIRTY_VALUE, db=self._dirty)
        return result

    def _flush_all_in(self, txn: lmdb.Transaction) -> tuple[None, None, bool]:
        for k in txn.cursor().iternext(keys=True, values=False):
            txn.put(k, _DIRTY_VALUE, db=self._dirty)  # pushed as deletes
        txn.drop(self._own, delete=False)
        return super()._flush_all_in(txn)

    # ------------------------------------------------------------------ sync process side

    def node_id(self) -> bytes:
        """This node's name in the counters' hashes: random, made once per zone lifetime (a cold
        start empties the zone and so takes a new name, leaving the old totals counted)."""
        with self._env.begin(db=self._meta, write=True) as txn:
            node = txn.get(b"node")
            if node is None:
                node = os.urandom(6).hex().encode()
                txn.put(b"node", node)
            return node

    def pending(self) -> int:
        with self._env.begin() as txn:
            return txn.stat(self._dirty)["entries"]

    def collect(self, max_count: int = 500) -> list[Push]:
        """Take up to ``max_count`` noted keys and their pushes (one write transaction)."""
        try:
            with self._env.begin(db=self._data, write=True) as txn:
                return self._collect_in(txn, max_count)
        except lmdb.MapResizedError:
            self._env.set_mapsize(0)
            with self._env.begin(db=self._data, write=True) as txn:
                return self._collect_in(txn, max_count)

    def _collect_in(self, txn: lmdb.Transaction, max_count: int) -> list[Push]:
        now = self._clock()
        pushes = []
        taken = []
        for k, op in txn.cursor(db=self._dirty):
            taken.append(k)
            push = self._push_of(txn, k, op, now)
            if push is not None:
                pushes.append(push)
            if len(taken) >= max_count:
                break
        for k in taken:
            txn.delete(k, db=self._dirty)
        return pushes

    def _push_of(self, txn: lmdb.Transaction, k: bytes, op: bytes, now: float) -> Push | None:
        raw = txn.get(k)
        own_raw = txn.get(k, db=self._own)
        if raw is None or _expired(raw, now):
            if own_raw is not None:
                txn.delete(k, db=self._own)
            return Push(k, b"d", b"", b"", b"", 0, 0) if op == _DIRTY_VALUE else None
        expires, _touched, flags, kind = _HEAD.unpack_from(raw)
        pttl = max(1, int((expires - now) * 1000)) if expires else 0
        if op == _DIRTY_COUNTER and own_raw is not None and kind in _NUMBER_KINDS:
            gen, own, base = own_total(raw, own_raw)
            return Push(k, b"c", gen, number_text(own), number_text(base), flags, pttl)
        if own_raw is not None:
            txn.delete(k, db=self._own)  # a set starts a new generation: no own total yet
        if kind in _NUMBER_KINDS:
            return Push(k, b"b", b"", number_text(_decode(kind, raw)), b"", flags, pttl)  # type: ignore[arg-type]
        return Push(k, b"v", b"", kind + raw[_HEAD_SIZE:], b"", flags, pttl)

    def requeue(self, pushes: list[Push]) -> None:
        """Note again keys whose push did not reach Redis (pushes are whole states: idempotent)."""
        with self._env.begin(write=True) as txn:
            for push in pushes:
                if push.op == b"c":
                    txn.put(push.key, _DIRTY_COUNTER, db=self._dirty, overwrite=False)
                else:
                    txn.put(push.key, _DIRTY_VALUE, db=self._dirty)

    def restore_pushes(self) -> list[Push]:
        """Every live key as a push, for a Redis that may have lost them (``restore`` mode
        recreates only what Redis does not hold)."""
        now = self._clock()
        pushes = []
        with self._env.begin(db=self._data) as txn:
            for k, raw in txn.cursor():
                if _expired(raw, now):
                    continue
                own_raw = txn.get(k, db=self._own)
                if own_raw is None:
                    continue  # a local set not pushed yet: its dirty mark pushes it
                expires, _touched, flags, kind = _HEAD.unpack_from(raw)
                pttl = max(1, int((expires - now) * 1000)) if expires else 0
                if kind in _NUMBER_KINDS:
                    gen, own, base = own_total(raw, own_raw)
                    pushes.append(Push(k, b"c", gen, number_text(own), number_text(base), flags, pttl))
                else:
                    gen = unpack_own(own_raw)[0]
                    pushes.append(Push(k, b"v", gen, kind + raw[_HEAD_SIZE:], b"", flags, pttl))
        return pushes

    def apply(self, states: list[ClusterState], node: bytes) -> None:
        """Take the cluster's state of these keys (one write transaction). A key noted dirty
        again since its push keeps its local value until its own push comes back."""
        if not states:
            return
        try:
            with self._env.begin(db=self._data, write=True) as txn:
                self._apply_in(txn, states, b"n:" + node)
        except lmdb.MapResizedError:
            self._env.set_mapsize(0)
            with self._env.begin(db=self._data, write=True) as txn:
                self._apply_in(txn, states, b"n:" + node)

    def _apply_in(self, txn: lmdb.Transaction, states: list[ClusterState], own_field: bytes) -> None:
        now = self._clock()
        for state in states:
            if not 0 < len(state.key) <= MAX_KEY_BYTES:
                continue  # not written by a node (Redis is shared): never wedge the merge on it
            try:
                self._apply_one(txn, state, own_field, now)
            except (ValueError, struct.error, lmdb.BadValsizeError):
                continue  # a malformed hash (idem)

    def _apply_one(self, txn: lmdb.Transaction, state: ClusterState, own_field: bytes, now: float) -> None:
        k, fields = state.key, state.fields
        dirty = txn.get(k, db=self._dirty)
        own_raw = txn.get(k, db=self._own)
        local = txn.get(k)
        gen = fields.get(b"_g", b"")
        if not fields or b"_d" in fields:
            stale_counter = dirty == _DIRTY_COUNTER and own_raw is not None and unpack_own(own_raw)[0]
            if dirty is None or stale_counter:
                # deleted (or expired) in the cluster: increments of that generation go too
                self._store_in(txn, k, None, _SET, False, now)
                txn.delete(k, db=self._own)
                txn.delete(k, db=self._dirty)
            return
        expires = now + state.pttl / 1000 if state.pttl > 0 else 0.0
        flags = int(fields.get(b"_f", b"0"))
        if b"_v" in fields:
            value = fields[b"_v"]
            if value[:1] not in _VALUE_KINDS or (value[:1] == b"s" and not _is_utf8(value[1:])):
                raise ValueError("not a value a node pushed")
            if dirty is None:
                record = _HEAD.pack(expires, now, flags, value[:1]) + value[1:]
                self._store_in(txn, k, record, _SET, False, now)
                txn.put(k, pack_own(gen, 0, 0), db=self._own)
            return
        base = parse_number(fields.get(b"_b", b"0"))
        others = sum(parse_number(v) for f, v in fields.items() if f[:2] == b"n:" and f != own_field)
        own = 0
        if own_raw is not None and local is not None and not _expired(local, now) \
                and local[_HEAD_SIZE - 1 : _HEAD_SIZE] in _NUMBER_KINDS:
            own_gen, own_value, _ = own_total(local, own_raw)
            if own_gen in (b"", gen):
                own = own_value
        if dirty == _DIRTY_VALUE:
            return  # a local set, not yet pushed, wins for now
        txn.put(k, pack_own(gen, base, others), db=self._own)
        self._store_in(txn, k, _record(base + others + own, expires, now, flags), _SET, False, now)

    def sweep_own(self, max_count: int = 10000) -> int:
        """Forget the own totals of keys gone from the zone (expired or evicted)."""
        now = self._clock()
        removed = 0
        with self._env.begin(db=self._data, write=True) as txn:
            gone = [k for k in txn.cursor(db=self._own).iternext(values=False)
                    if (raw := txn.get(k)) is None or _expired(raw, now)][:max_count]
            for k in gone:
                if txn.get(k, db=self._dirty) is None:
                    txn.delete(k, db=self._own)
                    removed += 1
        return removed
