"""The keep-alive pool with stand-in connections: capacity and LRU eviction, keys, reuse order,
expiry by the sweep timer, connections that die while idle."""

from __future__ import annotations

import asyncio
import time

from helpers import run_loop_until

from scriptlb.http.pool import ConnectionPool
from scriptlb.http.upstream import ConnState


class FakeTransport:
    def __init__(self, conn: FakeConn) -> None:
        self.conn = conn

    def is_closing(self) -> bool:
        return self.conn.closing


class FakeConn:
    def __init__(self, key: tuple, reusable: bool = True, age: float = 0.0) -> None:
        self.key = key
        self.reusable = reusable
        self.connected_at = time.monotonic() - age  # (the loop's clock: asyncio's is monotonic)
        self.last_read = time.monotonic()
        self.state = ConnState.ACTIVE
        self.on_idle_lost: object = None
        self.closed = False
        self.closing = False  # the transport is closing (peer closed, connection_lost pending)
        self.transport = FakeTransport(self)

    def park(self, max_requests: int) -> bool:
        if not self.reusable:
            return False
        self.state = ConnState.IDLE
        return True

    def close(self) -> None:
        self.state = ConnState.CLOSED
        self.closed = True

    def die_while_idle(self) -> None:
        """What UpstreamConnection does when the peer closes an idle connection."""
        self.close()
        callback = self.on_idle_lost
        if callable(callback):
            callback(self)


A = ("127.0.0.1:1", "")
B = ("127.0.0.1:2", "")


def test_release_and_acquire_most_recent_first(loop: asyncio.AbstractEventLoop) -> None:
    pool = ConnectionPool(loop, max_idle=4)
    first, second = FakeConn(A), FakeConn(A)
    assert pool.release(first) and pool.release(second)  # type: ignore[arg-type]
    assert pool.acquire(A) is second and second.state is ConnState.ACTIVE
    assert pool.acquire(A) is first
    assert pool.acquire(A) is None
    assert len(pool) == 0


def test_keys_do_not_mix(loop: asyncio.AbstractEventLoop) -> None:
    pool = ConnectionPool(loop, max_idle=4)
    conn = FakeConn(A)
    pool.release(conn)  # type: ignore[arg-type]
    assert pool.acquire(B) is None
    assert pool.acquire(("127.0.0.1:1", "other.name")) is None
    assert pool.acquire(A) is conn


def test_capacity_evicts_the_least_recently_released(loop: asyncio.AbstractEventLoop) -> None:
    pool = ConnectionPool(loop, max_idle=2)
    conns = [FakeConn(A), FakeConn(B), FakeConn(A)]
    for conn in conns:
        pool.release(conn)  # type: ignore[arg-type]
    assert conns[0].closed and not conns[1].closed and not conns[2].closed
    assert len(pool) == 2 and pool.evicted == 1
    assert pool.acquire(A) is conns[2] and pool.acquire(A) is None


def test_unreusable_or_disabled_pool_closes(loop: asyncio.AbstractEventLoop) -> None:
    pool = ConnectionPool(loop, max_idle=2)
    conn = FakeConn(A, reusable=False)
    assert not pool.release(conn) and conn.closed  # type: ignore[arg-type]
    off = ConnectionPool(loop, max_idle=0)
    conn = FakeConn(A)
    assert not off.release(conn) and conn.closed  # type: ignore[arg-type]


def test_connection_dying_while_idle_leaves_the_pool(loop: asyncio.AbstractEventLoop) -> None:
    pool = ConnectionPool(loop, max_idle=4)
    dying, alive = FakeConn(A), FakeConn(A)
    pool.release(alive)  # type: ignore[arg-type]
    pool.release(dying)  # type: ignore[arg-type]
    dying.die_while_idle()
    assert len(pool) == 1 and pool.acquire(A) is alive


def test_sweep_closes_expired_connections(loop: asyncio.AbstractEventLoop) -> None:
    pool = ConnectionPool(loop, max_idle=4, idle_timeout=0.1)
    old = FakeConn(A)
    pool.release(old)  # type: ignore[arg-type]

    run_loop_until(loop, lambda: old.closed, what="the idle timeout")
    assert old.closed and len(pool) == 0 and pool.expired == 1
    assert pool.acquire(A) is None


def test_close_empties_the_pool_and_refuses_more(loop: asyncio.AbstractEventLoop) -> None:
    pool = ConnectionPool(loop, max_idle=4)
    conn = FakeConn(A)
    pool.release(conn)  # type: ignore[arg-type]
    pool.close()
    assert conn.closed and len(pool) == 0
    later = FakeConn(A)
    assert not pool.release(later) and later.closed  # type: ignore[arg-type]
    assert "idle=0/4" in repr(pool)


def test_connection_closing_under_the_pool_is_skipped(loop: asyncio.AbstractEventLoop) -> None:
    pool = ConnectionPool(loop, max_idle=4)
    good, closing = FakeConn(A), FakeConn(A)
    pool.release(good)  # type: ignore[arg-type]
    pool.release(closing)  # type: ignore[arg-type]
    closing.closing = True
    assert pool.acquire(A) is good and closing.closed and len(pool) == 0


def test_a_connection_older_than_keepalive_time_is_closed_when_released(
        loop: asyncio.AbstractEventLoop) -> None:
    """The upstream keepalive_time (ngx_http_upstream_keepalive_module): checked when the
    connection comes back, whatever its requests or idle time."""
    pool = ConnectionPool(loop, max_idle=4, max_age=10.0)
    old, young = FakeConn(A, age=11.0), FakeConn(A, age=9.0)
    assert not pool.release(old) and old.closed  # type: ignore[arg-type]
    assert pool.release(young) and not young.closed  # type: ignore[arg-type]
    assert pool.acquire(A) is young and pool.acquire(A) is None
