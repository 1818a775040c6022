"""limit_req and limit_conn: nginx's request-rate and concurrency limits, shared by every worker.

Theory of operation
-------------------
Each ``limit_req_zone`` / ``limit_conn_zone`` is an LMDB environment under the instance's zone
directory (the mechanism of ``python_shared_dict``, scriptlb.state.shared_dict): a key's state is one
record, read and updated in one write transaction, and LMDB serializes write transactions
across processes, so every worker of every generation sees and changes the same numbers,
atomically, as nginx's shared-memory zones under their mutex. (The per-worker statistics
shards would not do: a limit needs one current value per key, changed by all workers at once.)
A cold start empties the zones; a reload keeps them (the master's job).

limit_req is nginx's leaky bucket (ngx_http_limit_req_module.c), in thousandths of a request:
``excess = max(0, excess - rate * elapsed_ms / 1000 + 1000)``; above ``burst`` the request is
rejected (``limit_req_status``, 503); above ``delay`` (0 unless ``delay=``; never with
``nodelay``) it waits ``(excess - delay) / rate`` before going on. With several limit_req lines,
each is checked (only the last one charged) and the rest are charged after, the longest delay
winning, as nginx's ngx_http_limit_req_account. limit_conn counts a key's requests in progress
from the preaccess phase to the end of the log phase.

A zone holds about ``size / 64`` (limit_req) or ``size / 32`` (limit_conn) keys, nginx's
figures; when full, limit_req first drops keys idle for a minute whose bucket has drained, as
nginx's expire; still full: "could not allocate node" and the limit's status.
"""

from __future__ import annotations

import hashlib
import os
import struct
import time
from typing import TYPE_CHECKING, Any

from scriptlb.config.model import LimitsConf, LimitZoneConf
from scriptlb.logs import errorlog

if TYPE_CHECKING:
    from collections.abc import Callable

_REQ = struct.Struct("<qq")  # excess (thousandths), last (ms)
_CONN = struct.Struct("<q")  # requests in progress
MAX_KEY = 65535  # nginx's limit for a key's value
LMDB_KEY = 400  # longer keys are stored as a digest (LMDB's key limit)
STALE_MS = 60000  # nginx expires a limit_req key idle for a minute
EXPIRE_SCAN = 16

PASSED, DELAYED, REJECTED = "PASSED", "DELAYED", "REJECTED"
DELAYED_DRY_RUN, REJECTED_DRY_RUN = "DELAYED_DRY_RUN", "REJECTED_DRY_RUN"
_LOWER = {"error": "warn", "warn": "notice", "notice": "info", "info": "debug"}  # nginx's delay level


def _now_ms() -> int:
    return int(time.monotonic() * 1000) if _CLOCK is None else _CLOCK()


_CLOCK: Callable[[], int] | None = None  # tests may pin the clock (milliseconds)


def stream_zone_directory(directory: str) -> str:
    """Where the stream block's zones live: apart from http's, whose names they may share
    (nginx keeps the two blocks' zones apart too)."""
    return os.path.join(directory, "stream")


def zone_path(directory: str, conf: LimitZoneConf) -> str:
    return os.path.join(directory, f"{conf.kind}.{conf.name}")


class LimitZone:
    """One zone's environment, opened in each process on first use."""

    def __init__(self, conf: LimitZoneConf, directory: str) -> None:
        self.conf = conf
        self.path = zone_path(directory, conf)
        self.capacity = max(conf.size // (64 if conf.kind == "limit_req" else 32), 16)
        self.rate = conf.rate
        self._pid = 0
        self._env: Any = None
        self._db: Any = None

    def _txn(self) -> Any:
        if self._pid != os.getpid():
            from scriptlb.state.shared_dict import open_environment

            self._env, self._db = open_environment(self.path, self.conf.size)
            self._pid = os.getpid()
        return self._env.begin(write=True, db=self._db)

    def _room(self, txn: Any, now: int) -> bool:
        if txn.stat(self._db)["entries"] < self.capacity:
            return True
        if self.conf.kind != "limit_req":
            return False
        freed = False
        cursor = txn.cursor(self._db)
        for seen, (key, raw) in enumerate(cursor):
            if seen >= EXPIRE_SCAN:
                break
            excess, last = _REQ.unpack(raw)
            ms = now - last
            if ms >= STALE_MS and excess - self.rate * ms // 1000 <= 0:
                txn.delete(key, db=self._db)
                freed = True
        return freed

    def _leak(self, excess: int, last: int, now: int) -> tuple[int, int]:
        """nginx's bucket: (new excess, elapsed ms) for one more request at ``now``."""
        ms = now - last
        if ms < -60000:
            ms = 1
        elif ms < 0:
            ms = 0
        return max(excess - self.rate * ms // 1000 + 1000, 0), ms

    def req_lookup(self, key: bytes, burst: int, account: bool) -> tuple[int, bool] | None:
        """(excess, over burst) for one request, charged when ``account``; None: zone full."""
        now = _now_ms()
        with self._txn() as txn:
            raw = txn.get(key)
            if raw is None:
                if not self._room(txn, now):
                    return None
                txn.put(key, _REQ.pack(0, now))
                return 0, False
            previous, last = _REQ.unpack(raw)
            excess, ms = self._leak(previous, last, now)
            if excess > burst:
                return excess, True
            if account:
                txn.put(key, _REQ.pack(excess, now if ms else _REQ.unpack(raw)[1]))
            return excess, False

    def req_account(self, key: bytes) -> int:
        """Charge a request checked earlier (nginx's ngx_http_limit_req_account); its excess."""
        now = _now_ms()
        with self._txn() as txn:
            raw = txn.get(key)
            old_excess, last = _REQ.unpack(raw) if raw is not None else (0, now)
            excess, ms = self._leak(old_excess, last, now)
            txn.put(key, _REQ.pack(excess, now if ms else last))
            return excess

    def conn_acquire(self, key: bytes, limit: int) -> bool | None:
        """Count one more request for ``key`` unless it has ``limit``; None: zone full."""
        with self._txn() as txn:
            raw = txn.get(key)
            count = _CONN.unpack(raw)[0] if raw is not None else 0
            if raw is None and not self._room(txn, 0):
                return None
            if count >= limit:
                return False
            txn.put(key, _CONN.pack(count + 1))
            return True

    def conn_release(self, key: bytes) -> None:
        with self._txn() as txn:
            raw = txn.get(key)
            count = _CONN.unpack(raw)[0] - 1 if raw is not None else 0
            if count > 0:
                txn.put(key, _CONN.pack(count))
            elif raw is not None:
                txn.delete(key)


class LimitState:
    """One request's outcome ($limit_req_status, $limit_conn_status) and what it holds."""

    __slots__ = ("conn_status", "held", "req_status", "timer")

    def __init__(self) -> None:
        self.req_status = ""
        self.conn_status = ""
        self.held: list[tuple[LimitZone, bytes]] = []  # limit_conn counts to give back
        self.timer: Any = None  # a delayed request's wake-up

    def release(self) -> None:
        held, self.held = self.held, []
        for zone, key in held:
            try:
                zone.conn_release(key)
            except Exception as exc:  # (an LMDB error must not break the log phase)
                errorlog.log_error("alert", f"limit_conn release failed: {exc!r}")


def _key_bytes(value: str) -> bytes:
    raw = value.encode("latin-1", "replace")
    return raw if len(raw) <= LMDB_KEY else b"#" + hashlib.sha256(raw).digest()


def _account(pending: list[tuple[LimitZone, bytes, Any]], chosen: tuple[LimitZone, Any],
             excess: int) -> tuple[int, int, LimitZone]:
    """nginx's ngx_http_limit_req_account: charge the limits only checked so far; the longest
    delay wins. Returns (delay in ms, its excess, its zone)."""
    zone, limit = chosen
    max_delay = 0 if excess <= limit.delay else (excess - limit.delay) * 1000 // zone.rate
    for other, key, other_limit in pending:
        other_excess = other.req_account(key)
        if other_excess <= other_limit.delay:
            continue
        delay = (other_excess - other_limit.delay) * 1000 // other.rate
        if delay > max_delay:
            max_delay, excess, zone = delay, other_excess, other
    return max_delay, excess, zone


class LimitPhase:
    """A location's limit_req and limit_conn lines, compiled (nginx's preaccess phase)."""

    def __init__(self, conf: LimitsConf, zones: dict[str, LimitZone],
                 compile_key: Callable[[Any], Callable[[Any], str]]) -> None:
        self.conf = conf
        self.reqs = [(zones[r.zone], compile_key(zones[r.zone].conf.key), r) for r in conf.reqs]
        self.conns = [(zones[c.zone], compile_key(zones[c.zone].conf.key), c) for c in conf.conns]

    def run(self, exchange: Any) -> tuple[int, float]:
        """(status to answer with, or 0; seconds to wait first, or 0)."""
        state = exchange.limit = LimitState()
        if self.reqs:
            status, delay = self._requests(exchange, state)
            if status:
                return status, 0.0
        else:
            delay = 0.0
        if self.conns:
            status = self._connections(exchange, state)
            if status:
                return status, 0.0
        return 0, delay

    def _key(self, exchange: Any, getter: Callable[[Any], str], zone: LimitZone) -> bytes | int | None:
        value = getter(exchange) or ""
        if not value:
            return None
        if len(value) > MAX_KEY:
            errorlog.log_error("error", f'the value of the "{zone.conf.key.raw}" key is more than 65535 '
                               f'bytes: "{value[:64]}..."', exchange.conn_id, exchange.log_context(None))
            return 500
        return _key_bytes(value)

    def _requests(self, exchange: Any, state: LimitState) -> tuple[int, float]:
        conf = self.conf
        pending: list[tuple[LimitZone, bytes, Any]] = []  # checked, charged after (nginx: AGAIN)
        excess, chosen, charged = 0, None, False
        last = len(self.reqs) - 1
        for i, (zone, getter, limit) in enumerate(self.reqs):
            key = self._key(exchange, getter, zone)
            if key is None:
                continue
            if isinstance(key, int):
                return key, 0.0
            chosen = (zone, limit)
            found = zone.req_lookup(key, limit.burst, i == last)
            if found is None:
                errorlog.log_error("alert", "could not allocate node in limit_req zone "
                                   f'"{zone.conf.name}"', exchange.conn_id, exchange.log_context(None))
                state.req_status = REJECTED
                return conf.req_status, 0.0
            excess, busy = found
            if busy:
                dry = ", dry run" if conf.req_dry_run else ""
                errorlog.log_error(conf.req_log_level, f"limiting requests{dry}, excess: "
                                   f'{excess // 1000}.{excess % 1000:03d} by zone "{zone.conf.name}"',
                                   exchange.conn_id, exchange.log_context(None))
                if conf.req_dry_run:
                    state.req_status = REJECTED_DRY_RUN
                    return 0, 0.0
                state.req_status = REJECTED
                return conf.req_status, 0.0
            if i == last:
                charged = True
            else:
                pending.append((zone, key, limit))
        if chosen is None:
            return 0, 0.0  # (every key empty: nothing limited, no status)
        if not charged:
            excess = 0  # (nginx: the last lookup only checked)
        delay_ms, excess, zone = _account(pending, chosen, excess)
        if not delay_ms:
            state.req_status = PASSED
            return 0, 0.0
        dry = ", dry run" if conf.req_dry_run else ""
        errorlog.log_error(_LOWER[conf.req_log_level], f"delaying request{dry}, excess: "
                           f'{excess // 1000}.{excess % 1000:03d}, by zone "{zone.conf.name}"',
                           exchange.conn_id, exchange.log_context(None))
        if conf.req_dry_run:
            state.req_status = DELAYED_DRY_RUN
            return 0, 0.0
        state.req_status = DELAYED
        return 0, delay_ms / 1000

    def _connections(self, exchange: Any, state: LimitState) -> int:
        conf = self.conf
        for zone, getter, limit in self.conns:
            key = self._key(exchange, getter, zone)
            if key is None:
                continue
            if isinstance(key, int):
                state.release()
                return key
            taken = zone.conn_acquire(key, limit.conn)
            if taken:
                state.held.append((zone, key))
                continue
            if taken is None:
                errorlog.log_error("alert", "could not allocate node in limit_conn zone "
                                   f'"{zone.conf.name}"', exchange.conn_id, exchange.log_context(None))
            else:
                dry = ", dry run," if conf.conn_dry_run else ""  # (nginx's words, commas and all)
                errorlog.log_error(conf.conn_log_level,
                                   f'limiting connections{dry} by zone "{zone.conf.name}"',
                                   exchange.conn_id, exchange.log_context(None))
            if conf.conn_dry_run and taken is not None:
                state.conn_status = REJECTED_DRY_RUN
                continue
            state.release()
            state.conn_status = REJECTED
            return conf.conn_status
        state.conn_status = state.conn_status or PASSED
        return 0
