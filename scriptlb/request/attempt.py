"""One try of a proxied request (nginx's ``u->peer`` plus the try's ``u->state``): ``Attempt``.

Theory of operation
-------------------
The tries loop (``proxy.UpstreamRequest``) makes one ``Attempt`` per try, once the peer is known
(the balancer's, or the address a hook set). The attempt owns everything that belongs to that
try alone: the peer to free (None for a hook-set address, which is not the balancer's), the
address to connect to, the pool key and the pool its connection goes back to, the connection,
the try's statistics index, and the try's ``$upstream_*`` record (an ``Attempt`` *is* a
``TryRecord``: the exchange's ``tries`` list holds the attempts themselves).

A try ends in exactly one place, ``end(outcome, ...)``, whatever ended it:

=============  ==================================================================================
``DONE``       the whole response went to the client; the connection goes back to the pool
``NEXT``       a status listed in ``proxy_next_upstream`` and another try follows
``FAILED``     error / timeout / invalid header (retried or not: the caller decides, with
               ``retry.decide``, from the ``Failure`` that ``end`` hands back)
``BROKEN``     the connection failed after part of the response went to the client
``ABANDONED``  the client side ended the request
``UPGRADED``   the tunnel after a 101 ended; it counts as a success, with the time to the 101
               as the latency sample (a tunnel's life says nothing about the peer's speed)
=============  ==================================================================================

``end`` does, in this order: the response time, the latency observation for balancers that
learn from it, the live statistics (with the connection's bytes of this try and the time to
its header), release-or-close of the connection, and the free (the
balancer's ``free``, or the hook-set peer's own accounting of the tries budget and
``get_last_failure``).

Clocks: the try's times come from ``time.perf_counter`` (sub-millisecond, one call per
timestamp). uvloop's ``loop.time()`` has millisecond resolution, so a peer answering in under a
millisecond would record 0.0 in the statistics' averages; ``$upstream_*_time`` still prints
nginx's whole milliseconds (variables truncate).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Protocol

from scriptlb.logs import errorlog
from scriptlb.request.retry import Failure, is_counted_failure, last_failure_state, last_failure_status
from scriptlb.variables.evaluate import BYTE_COUNTS_READ

if TYPE_CHECKING:
    from scriptlb.config.model import PeerAddr
    from scriptlb.hookrt.api import HookOutcome
    from scriptlb.http.pool import ConnectionPool
    from scriptlb.http.upstream import PoolKey, UpstreamConnection
    from scriptlb.request.runtime import UpstreamRuntime
    from scriptlb.state.peers import Peer
    from scriptlb.state.stats import UpstreamStats


class TriesLoop(Protocol):
    """What ``Attempt.end`` reads of the request's tries loop (``proxy.UpstreamRequest``)."""

    @property
    def upstream(self) -> UpstreamRuntime: ...
    @property
    def balancer_state(self) -> Any: ...  # the balancer's per-request state (tries budget)
    @property
    def exchange(self) -> Any: ...

clock = time.perf_counter  # the tries' clock (see the module docstring)

# how a try ended (Attempt.end)
DONE = 0
NEXT = 1
FAILED = 2
BROKEN = 3
ABANDONED = 4
UPGRADED = 5  # a 101's tunnel ended (its connection belonged to the tunnel, never pooled)


class TryRecord:
    """One try, for the ``$upstream_*`` lists (times in seconds, None when not reached)."""

    __slots__ = ("addr", "bytes_received", "bytes_sent", "connect_time", "header_time", "hook",
                 "response_length", "response_time", "started", "status")

    def __init__(self, addr: str, started: float, hook: HookOutcome | None = None) -> None:
        self.addr = addr
        self.started = started
        self.hook = hook  # the balancer hook run that preceded this try ($balancer_trace)
        self.status: int | None = None
        self.connect_time: float | None = None
        self.header_time: float | None = None
        self.response_time: float | None = None
        # $upstream_bytes_sent / _received / $upstream_response_length: copied from the
        # connection when the try ends (a pooled connection counts its next request afresh)
        self.bytes_sent = self.bytes_received = self.response_length = 0

    def __repr__(self) -> str:
        return f"<TryRecord {self.addr} {self.status}>"


# "balancer_by_python chose unhealthy peer ...": at most 10 lines a second per peer
_CHOSEN_ANYWAY = errorlog.RateLimiter()


def chosen_anyway(upstream: UpstreamRuntime, peer: Peer, outcome: Any, exchange: Any, now: float,
                  action: str) -> None:
    """A hook named a peer the upstream's own methods avoid now (health checks, drain, down,
    max_fails; ``Peer.avoided``): the try goes ahead, as the hook asked, and the trail says so:
    ``outcome.avoided`` for ``$balancer_trace`` (``hook(unhealthy)``) and a warn line,
    rate-limited per peer (a hook may send every request there on purpose, e.g. when every
    peer failed its checks). Warn, as nginx's "upstream server temporarily disabled": what the
    operator's checks decided was overruled, which is worth seeing, but maybe deliberately."""
    reason = peer.avoided(now)
    if reason is None:
        return
    outcome.avoided = reason
    key = f'balancer_by_python chose {reason} peer {peer.name} in upstream "{upstream.name}"'
    _CHOSEN_ANYWAY.log("warn", key, f"balancer_by_python chose {reason} peer {peer.name} while {action}",
                       exchange.conn_id, exchange.log_context(peer.name))


class Attempt(TryRecord):
    """One try: its peer, connection, pool, statistics index and ``$upstream_*`` record."""

    __slots__ = ("conn", "key", "peer", "peer_addr", "pool", "reused", "stats_index", "tls_name")
    # What opening a connection reads (most tries reuse a pooled one), set by the tries loop
    # only when not the usual (unset otherwise; read through connect_addr and pool_key):
    peer_addr: PeerAddr  # the address a hook set (else the peer's)
    # the pool key, what makes two connections interchangeable: the peer's address text (with
    # its port, or ``unix:path``: the usual key, ``addr``), or that with the name the peer is
    # addressed by (a hook's ``set_current_peer`` host; ``https:`` + the TLS server name, so
    # two names on one address never share a connection) and the local address a try binds
    key: PoolKey
    tls_name: str | None  # proxy_pass https://: the name sent / verified

    def __init__(
        self,
        stats: UpstreamStats | None,
        name: str,
        peer: Peer | None,
        pool: ConnectionPool | None,
        reused: UpstreamConnection | None = None,
    ) -> None:
        """``name`` is the address text, ``peer`` the balancer's peer (None for an address a
        hook set), ``pool`` where the connection goes back (None: closed after the response),
        ``reused`` the connection the try got from its pool (None: a new one is opened)."""
        # (TryRecord's fields, assigned here: one constructor call per try)
        self.addr = name
        self.started = clock()
        # (hook: the hook run's HookOutcome, set by the tries loop after a hook ran; unset
        # without one, and $balancer_trace, its only reader, takes None then)
        self.status: int | None = None
        # (a connection from the pool: no connect time)
        self.connect_time: float | None = None if reused is None else 0.0
        self.header_time: float | None = None
        self.response_time: float | None = None
        # (bytes_sent, bytes_received, response_length: set by end() when a request was
        # sent; $upstream_bytes_* read 0 until then)
        self.peer = peer  # the balancer's peer to free; None for a hook-set address
        self.pool = pool
        self.conn: UpstreamConnection | None = reused
        self.reused = reused is not None  # the connection came from the pool
        if stats is not None:
            if peer is not None:
                # stats.start(peer.stats_index), inlined: one call less per try (end finds the
                # index on the peer again)
                stats.started[peer.stats_index] += 1
                if stats.recorder.timer is None:
                    stats.recorder.arm_flush()
            else:  # (a hook-set address: the index of its peer, -1 for none; unset without statistics)
                self.stats_index = stats.start_address(name)

    def connect_addr(self) -> PeerAddr:
        """The address to open a connection to (read before the try ends: end lets go of the peer)."""
        peer = self.peer
        return peer.addr if peer is not None else self.peer_addr

    def pool_key(self) -> PoolKey:
        key: PoolKey = getattr(self, "key", self.addr)
        return key

    def __repr__(self) -> str:
        return f"<Attempt {self.addr} {self.status} conn={self.conn!r}>"

    def connected(self, conn: UpstreamConnection) -> None:
        self.conn = conn
        self.connect_time = clock() - self.started

    def end(self, outcome: int, tries: TriesLoop, failure: Failure | None = None,
            phase: str = "") -> Failure | None:
        """End the try (see the module docstring); returns ``failure`` for the retry decision.
        ``tries`` is the tries loop of the request (its upstream, balancer state, exchange)."""
        upstream = tries.upstream
        self.response_time = elapsed = clock() - self.started  # nginx: every try has one
        conn = self.conn
        self.conn = None
        peer = self.peer
        self.peer = None  # (also what keeps a second end from counting the try again)
        # (a stream session's PeerSide offers the same counts, copied from its StreamAttempt)
        if BYTE_COUNTS_READ[0] and conn is not None and conn.sent:
            self.bytes_sent = conn.sent
            self.bytes_received = conn.received
            self.response_length = conn.body_received
        if outcome != DONE or conn is None:
            return self._end_otherwise(upstream, tries, outcome, conn, peer, elapsed, failure, phase)
        # the usual end: the peer (the balancer's, or an address a hook set) sent the whole
        # response, which went to the client
        if peer is not None and upstream.observe is not None:
            upstream.observe(peer, self.connect_time, self.header_time, elapsed, upstream.loop.time())
        pool = self.pool
        if pool is not None:
            pool.release(conn)
        else:
            conn.close()
        stats = upstream.stats
        if stats is not None:
            if peer is not None:
                index = peer.stats_index
            else:  # (a hook-set address: its peer's index, -1 for none; recorded once)
                index = self.stats_index
                self.stats_index = -1
            if index >= 0:
                # stats.finish(index, status, elapsed, False, sent, received, header_time),
                # inlined: the try as Recorder.finish keeps it, with no call. A peer's list of
                # ended tries is only non-empty while a flush is due (flush empties them all
                # when it runs), so the flush timer needs a look only when the list is empty.
                ended = stats.ended[index]
                if not ended and stats.recorder.timer is None:
                    stats.recorder.arm_flush()
                ended.append((self.status or 0, elapsed, conn.sent, conn.received, self.header_time))
        if peer is None:
            return None  # (a hook-set address: no balancer's peer to free, no budget spent)
        if stats is not None and peer.fails:  # (a success may forgive a zone peer's shared failures)
            disabled = _free_shared(upstream, tries.balancer_state, stats, peer, False)
        else:
            disabled = upstream.balancer.free(tries.balancer_state, peer, False, upstream.loop.time())
        if disabled:
            self._disabled(tries, stats, peer, phase)
        return None

    def _end_otherwise(self, upstream: UpstreamRuntime, tries: TriesLoop, outcome: int,
                       conn: UpstreamConnection | None, peer: Peer | None, elapsed: float,
                       failure: Failure | None, phase: str) -> Failure | None:
        """end for the outcomes other than the usual DONE (a failure, a retried status, a
        broken or abandoned try, a tunnel, a try without a connection)."""
        sample, counted, stats_failed = self._settle_connection(upstream, outcome, conn, peer, elapsed,
                                                                failure)
        stats = upstream.stats  # (an index is only given out with statistics)
        if stats is not None:
            if peer is not None:
                index = peer.stats_index
            else:  # (a hook-set address; unset after a first end that had the balancer's peer)
                index = getattr(self, "stats_index", -1)
                self.stats_index = -1
            if index >= 0:
                status = 0 if outcome == FAILED else (self.status or 0)  # (FAILED: no response)
                if conn is not None:
                    stats.finish(index, status, sample, stats_failed, conn.sent, conn.received,
                                 self.header_time)
                else:
                    stats.finish(index, status, sample, stats_failed)
        if peer is not None:
            if stats is not None and (counted or peer.fails):
                disabled = _free_shared(upstream, tries.balancer_state, stats, peer, counted)
            else:
                disabled = upstream.balancer.free(tries.balancer_state, peer, counted, upstream.loop.time())
            if disabled:
                self._disabled(tries, stats, peer, phase)
        elif failure is not None and tries.balancer_state.tries:
            tries.balancer_state.tries -= 1  # a hook-set peer: the budget is ours to count
        if failure is not None:
            tries.exchange.last_failure = (last_failure_state(failure), last_failure_status(failure))
        return failure

    @staticmethod
    def _disabled(tries: TriesLoop, stats: UpstreamStats | None, peer: Peer, phase: str) -> None:
        """This try's failure reached the peer's max_fails: the statistics count it, and nginx
        says so."""
        if stats is not None:
            stats.recorder.became_unavailable(peer.stats_index)
        exchange = tries.exchange
        errorlog.log_error("warn", f"upstream server temporarily disabled while {phase}",
                           exchange.conn_id, exchange.log_context(peer.name))

    def _settle_connection(self, upstream: UpstreamRuntime, outcome: int, conn: UpstreamConnection | None,
                           peer: Peer | None, elapsed: float, failure: Failure | None
                           ) -> tuple[float | None, bool, bool]:
        """_end_otherwise's first part: the observation, the connection released or closed,
        and the latency sample, whether the try counts as a failure (for max_fails) and
        whether it failed (for the statistics)."""
        if outcome in (DONE, UPGRADED):  # (DONE: a try without a connection)
            # a tunnel's life says nothing about the peer's speed: its sample is the head's time
            sample = elapsed if outcome == DONE else self.header_time
            if upstream.observe is not None and peer is not None and sample is not None:
                upstream.observe(peer, self.connect_time, self.header_time, sample, upstream.loop.time())
            if conn is not None:
                if self.pool is not None:
                    self.pool.release(conn)
                else:
                    conn.close()
            return sample, False, False
        if conn is not None:
            conn.abort()
        if outcome == NEXT:
            assert failure is not None
            counted = is_counted_failure(failure, True)
            if peer is not None and upstream.observe is not None:
                upstream.observe(peer, self.connect_time, self.header_time, elapsed, upstream.loop.time())
            return elapsed, counted, counted
        if outcome == FAILED:
            assert failure is not None
            self.status = last_failure_status(failure)
            # a timeout's duration says the peer is slow; a refused or reset connection's
            # says nothing (it would make a dead peer look like the fastest one)
            return (elapsed if failure is Failure.TIMEOUT else None), True, True
        return None, False, outcome == BROKEN  # BROKEN, ABANDONED


def _free_shared(upstream: UpstreamRuntime, state: Any, stats: UpstreamStats, peer: Peer,
                 counted: bool) -> bool:
    """The balancer's free with live statistics, for a failure or a peer with failures: in a
    zone, the passive health state is every worker's, and it alone says whether the peer is
    now disabled."""
    now = upstream.loop.time()
    fails_before = peer.fails
    disabled: bool = upstream.balancer.free(state, peer, counted, now)
    if (counted or fails_before) and upstream.conf.zone and not upstream.peers.single \
            and upstream.peers.holds(peer):
        disabled = stats.passive_free(peer, counted, fails_before, now)
    return disabled
