"""Keep-alive pool of idle upstream connections, one per upstream and worker (nginx's
``ngx_http_upstream_keepalive_module``).

Theory of operation
-------------------
* Capacity is the upstream's ``keepalive N``: at most N idle connections for the whole upstream,
  all peers together. When a release would exceed it, the least recently released connection is
  closed (nginx's LRU cache).
* Connections are keyed by ``(peer address name, host name)``: the host part is empty today and
  becomes the TLS/SNI name later, so two names on one address never share a connection.
* ``acquire`` hands out the most recently released connection of a key (it is the least likely
  to have been closed by the peer).
* Expiry (``keepalive_timeout``) is swept by one timer per pool, not checked per request; the
  sweep runs only while the pool holds connections.
* An idle connection that the peer closes, or that receives unexpected bytes, removes itself
  through ``UpstreamConnection.on_idle_lost``. A peer may still close a connection in the instant
  we reuse it; the proxy's tries loop handles that race ("stale connection", retried on a fresh
  connection without consuming a try).
"""

from __future__ import annotations

import asyncio

from scriptlb.http.upstream import ACTIVE, PoolKey, UpstreamConnection

# The sweep checks expiry at this fraction of keepalive_timeout (bounded below and above), so a
# connection outlives its timeout by at most this slack.
_SWEEP_MIN = 0.05
_SWEEP_MAX = 1.0
_KEEP_NONE = float("-inf")


class ConnectionPool:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        max_idle: int,
        idle_timeout: float = 60.0,
        max_requests: int = 1000,
        max_age: float = 3600.0,
    ) -> None:
        self.loop = loop
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self.max_requests = max_requests
        self.max_age = max_age  # keepalive_time: a connection older than this is not kept
        # every idle connection and when it was released, least recently released first (LRU
        # order for eviction: a dict keeps insertion order, and costs less per insert and
        # delete than an OrderedDict)
        self._idle: dict[UpstreamConnection, float] = {}
        # per key, a stack of idle connections (most recent last)
        self._by_key: dict[PoolKey, list[UpstreamConnection]] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self._forget_lost = self._forget  # (one bound method, not one per release)
        self.closed = False
        # the oldest a connection may be to be kept: release's one test of its age and of
        # whether the pool keeps any (-inf, which every age exceeds, when it is closed or has
        # no room: keepalive 0)
        self._age_limit = max_age if max_idle > 0 else _KEEP_NONE
        # counters, for tests and the status page (none per request: they would cost every one)
        self.evicted = 0
        self.expired = 0

    def __repr__(self) -> str:
        return (
            f"<ConnectionPool idle={len(self._idle)}/{self.max_idle} timeout={self.idle_timeout}s "
            f"evicted={self.evicted} expired={self.expired}>"
        )

    def __len__(self) -> int:
        return len(self._idle)

    def acquire(self, key: PoolKey) -> UpstreamConnection | None:
        """An idle connection to ``key``, now ACTIVE and out of the pool, or None."""
        # (an emptied stack stays under its key until the next sweep: the usual one-connection
        # key is then looked up once here and once in release, and no list is made per request;
        # a subscript costs less than get, and the KeyError comes only for a key not seen since)
        try:
            stack = self._by_key[key]
        except KeyError:
            return None
        while stack:
            conn = stack.pop()
            del self._idle[conn]
            # (conn.is_alive(), inlined: once per request; a pooled connection is IDLE, so it
            # has a transport: any other way out of the pool goes through _forget)
            if not conn.transport.is_closing():  # type: ignore[union-attr]
                # (on_idle_lost stays: it is called only while the connection is IDLE)
                conn.state = ACTIVE
                return conn
            conn.on_idle_lost = None
            conn.close()  # closing under us (its connection_lost is still to come)
        return None

    def release(self, conn: UpstreamConnection) -> bool:
        """Keep ``conn`` for a later request if it is reusable; else close it. True if kept."""
        now = conn.last_read  # (the response's last read: this loop tick, usually)
        if now - conn.connected_at > self._age_limit or not conn.park(self.max_requests):
            conn.close()
            return False
        conn.on_idle_lost = self._forget_lost
        idle = self._idle
        if len(idle) >= self.max_idle:
            self._evict_oldest()  # (conn is not among them yet)
        idle[conn] = now
        try:  # (a subscript and a rare KeyError: cheaper than get and a test for None)
            self._by_key[conn.key].append(conn)
        except KeyError:
            self._by_key[conn.key] = [conn]  # (setdefault would build a list for every release)
        if self._sweeper is None:
            self._schedule_sweep()
        return True

    def close(self) -> None:
        """Close every idle connection and keep no more (worker shutdown)."""
        self.closed = True
        self._age_limit = _KEEP_NONE
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in list(self._idle):
            self._forget(conn)
            conn.close()
        self._by_key.clear()  # (the emptied stacks)

    # ------------------------------------------------------------------ internals

    def _forget(self, conn: UpstreamConnection) -> None:
        conn.on_idle_lost = None
        if conn in self._idle:
            del self._idle[conn]
            stack = self._by_key.get(conn.key)
            if stack is not None:
                stack.remove(conn)
                if not stack:
                    del self._by_key[conn.key]

    def _evict_oldest(self) -> None:
        oldest = next(iter(self._idle))
        self._forget(oldest)
        oldest.close()
        self.evicted += 1

    def _schedule_sweep(self) -> None:
        period = min(max(self.idle_timeout / 4, _SWEEP_MIN), _SWEEP_MAX)
        self._sweeper = self.loop.call_later(period, self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        deadline = self.loop.time() - self.idle_timeout
        # LRU order is release order, so expired connections are all at the front
        for conn, idle_since in list(self._idle.items()):
            if idle_since > deadline:
                break
            self._forget(conn)
            conn.close()
            self.expired += 1
        by_key = self._by_key
        if len(by_key) > len(self._idle):  # (some stacks are empty: acquire leaves them)
            self._by_key = {key: stack for key, stack in by_key.items() if stack}
        if self._idle and not self.closed:
            self._schedule_sweep()
