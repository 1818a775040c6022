"""Live per-peer statistics shared by every worker of one instance.

Theory of operation
-------------------
One file, ``<directory>/peer_stats``, mapped with ``mmap(MAP_SHARED)`` by every process that
records or reads, holds a fixed-layout record per peer of every upstream. The file outlives the
workers, so a reload (a new generation of workers, the same master and file) keeps the figures
of every peer it keeps, like an nginx shared zone; the master removes the file at a cold start
(``reset``) so a restart begins at zero, as nginx's zones do.

Why not LMDB as ``shared_dict``: recording a try must cost about a microsecond (it runs twice per
try on the proxy's hot path). An LMDB write transaction costs several microseconds, and
serializes every worker on one writer lock. Plain loads and stores on a shared mapping through
``memoryview`` cost tens of nanoseconds each; the design below makes every store that must be
exact single-writer, so no lock is needed on the hot path.

Layout (all fields 8 bytes, native byte order, 8-aligned, so one Python store is one machine
store and a concurrent reader never sees half a value)::

    header   MAGIC, VERSION, SHARDS, RECORD_WORDS, RECORDS, WEIGHT_GENERATION, SHARDS_USED,
             1 reserved
    shards   SHARDS x (owner pid, reserved)
    records  RECORDS x RECORD_WORDS words:
             key (16-byte digest of upstream name, peer name, occurrence), last status,
             last failure time, ewma, peak ewma, ewma stamp, weight override, weight base,
             last selected (a batch's publish time), downtime (seconds unhealthy, ended
             spells), health (state, checks, fails, unhealthy, last passed, run, since: when it
             last became healthy, or unhealthy while it is), header-time ewma and its stamp,
             passive health of a ``zone`` upstream's peer (failures, the last one's time,
             unavailable until: written under the file lock by the worker that saw the try, read
             by every worker),
             then per shard: requests, failures, finished, responses 1xx..5xx, samples
             per response-time bucket (TIME_BUCKETS, +Inf), the samples' sum, bytes sent,
             bytes received, times unavailable, header-time samples and their sum,
             then per shard: responses by status code (CODE_WORDS: 100..599)

The codes sit after every shard's counters, not inside each column, so the readers of the
other figures (a hook's ``get_primary_peers``, per request for some balancers) copy no more
words than before. A shard's code table is 4 KB of a sparse file: only pages a worker wrote
cost memory.

**Exact counters: one shard per process.** Each recording process claims a shard (a column of
``requests, failures, finished`` in every record) when it opens the file, so each of those cells
has exactly one writer and ``+= 1`` needs no atomic instruction. Readers sum the shards;
``active`` is ``requests - finished`` (one store per try start and one per end, the least the
hot path can do). A shard whose owner has died is adopted by the next process that opens the
file: its requests and failures stay (they are history), its tries in flight are settled
(finished := requests: that process's connections died with it). A forked child claims its own
shard (an at-fork hook), so a master that opened the file before forking hands each worker its
own. ``SHARDS`` bounds how many processes may record at the same time (old and new workers
overlap during a reload); the default leaves room for several generations of a typical worker
count, and ``open`` raises ``StatsFull`` beyond it.

**Benign races, on purpose.** ``last status``, ``last failure time`` and the averages are shared
by all writers. Each is a single aligned store, so a reader sees an old or a new value, never a
torn one. Two workers finishing a try on the same peer at the same instant may interleave their
read-modify-write of the averages: one sample is then lost, or an average is stored with the
other's stamp. Both only nudge a smoothed estimate (APISIX keeps its ewma in a shared dict
with the same unlocked get-then-set).

**Averages** (APISIX's ``balancer/ewma.lua``, Finagle's PeakEwma), decayed by time (``fold``,
the one implementation of the average in scriptlb: the built-in ``ewma`` and ``least_time``
methods read these shared figures, and hooks see them in ``get_primary_peers``)::

    w    = exp(-max(now - stamp, 0) / DECAY_TIME)            # DECAY_TIME = 10 s
    ewma = ewma * w + rtt * (1 - w)
    peak = rtt if rtt > peak else peak * w + rtt * (1 - w)   # a slowdown is seen at once
    stamp = now

The first sample of a peer is taken whole. ``rtt``, the round trip, is the ``response_time``
given to ``record_finish`` (the proxy passes the try's ``$upstream_response_time``, which
includes the connect; ``None`` for a try whose time says nothing about the peer, e.g. a refused
connect). A second average, of the time to the response header (``$upstream_header_time``), is
``least_time header``'s. Readers get the stored values and the stamp, and may decay them to
"now" themselves (``decayed``), as APISIX's score does.

**Weights set by hooks** (``upstream.set_peer_weight``) are the one write that needs a lock: it
stores the weight and the configured weight it overrides, then bumps ``WEIGHT_GENERATION``, all
under ``flock`` on the file (rare, and the bump must not be lost). Each worker's upstream keeps
the generation it last applied and compares it per request (one load); when it moved, it calls
``sync_weights`` for its peers. An override is applied only while the peer's configured weight
is still the one it was set against, so a reload that changes a weight in the config wins over
an old override, and one that keeps it keeps the override.

Clock: ``now`` is wall-clock seconds (``time.time()``, as ``ngx.now()``); it must be the same
clock in every process, and positive (a zero stamp means "never").
"""

from __future__ import annotations

import fcntl
import hashlib
import math
import mmap
import os
import struct
import time
import weakref
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import compress
from typing import TYPE_CHECKING, Any, Protocol

from scriptlb.config.model import HttpConf

if TYPE_CHECKING:
    from scriptlb.state.peers import Peer

DECAY_TIME = 10.0  # seconds, APISIX's ewma DECAY_TIME
# what ``read`` / ``figures`` give for a peer, in order (None where nothing was recorded)
FIELDS = ("requests", "failures", "active", "last_status", "last_failure_time", "ewma", "peak_ewma",
          "ewma_time", "weight_override")
DEFAULT_SHARDS = 32
FILE_NAME = "peer_stats"

MAGIC = int.from_bytes(b"SLBSTAT1", "little")
VERSION = 6  # 2: the third counter is "finished" (was "active"); 3: response classes 1xx-5xx;
# 4: bytes, unavail, header time, status codes; 5: the header-time average;
# 6: shared passive health (zone upstreams)

# header words
_MAGIC, _VERSION, _SHARDS, _RECORD_WORDS, _RECORDS, _WEIGHT_GENERATION, _SHARDS_USED = range(7)
WEIGHT_GENERATION = _WEIGHT_GENERATION  # UpstreamStats.words[WEIGHT_GENERATION]: see weights_stale
_HEADER_WORDS = 8
_SHARD_WORDS = 2  # owner pid, reserved

# record words (offsets from a slot)
_KEY = 0  # two words
_LAST_STATUS = 2
_LAST_FAILURE = 3
_EWMA = 4
_PEAK = 5
_STAMP = 6
_WEIGHT = 7  # override; 0 = none
_WEIGHT_BASE = 8  # the configured weight the override was set against
_SELECTED = 9  # when a batch with tries started on it was last published (nginx Plus's "selected")
_DOWNTIME = 10  # seconds spent unhealthy (the health checker's, ended spells only)
# active health checks (scriptlb.ops.health): written by the one process checking the peer
_HEALTH = 11  # seven words, HEALTH_FIELDS
_HEADER_EWMA = 18  # the time-to-header average (least_time header) and its stamp
_HEADER_STAMP = 19
# passive health of a ``zone`` upstream's peer, one state for every worker (nginx's zone keeps
# the peers' fails/checked in shared memory): failures in the window, the last failure's time
# (a float word), and until when the peer is unavailable (a float word). Under the file lock.
_PASSIVE_FAILS, _PASSIVE_FAILED_AT, _PASSIVE_UNTIL = 20, 21, 22
_FIXED_WORDS = 23
HEALTH_FIELDS = ("state", "checks", "fails", "unhealthy", "last_passed", "run", "since")
UP, UNHEALTHY, CHECKING = 0, 1, 2  # the "state" word
# per-shard words (offsets from a slot's shard column)
_REQUESTS, _FAILURES, _FINISHED = 0, 1, 2
_CLASSES = 3  # five words: responses 1xx..5xx (the API's and the metrics' "responses")
_BUCKETS = 8  # len(TIME_BUCKETS) + 1 words: samples per response-time bucket (the last: +Inf)
# Prometheus's default buckets (seconds), for scriptlb_upstream_server_response_time_seconds
TIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BUCKET_SLOTS = len(TIME_BUCKETS) + 1
# nginx Plus's "sent", "received", "unavail", and header_time's samples: right after the
# buckets, so a flush adds classes, buckets and these with one slice read and one slice write
_SENT = _BUCKETS + BUCKET_SLOTS
_RECEIVED, _UNAVAIL, _HEADER_SAMPLES = _SENT + 1, _SENT + 2, _SENT + 3
_TIME_SUM = _HEADER_SAMPLES + 1  # the response-time samples' sum (a float word)
_HEADER_SUM = _TIME_SUM + 1  # the header-time samples' sum (a float word, next to the other)
TRAFFIC_FIELDS = ("sent", "received", "unavail", "header_samples", "header_sum")
_TALLY_WORDS = _TIME_SUM - _CLASSES  # Recorder.flush's integer words
_COUNTER_WORDS = _HEADER_SUM + 1
FIRST_CODE, CODE_WORDS = 100, 500  # the shared per-code counters: statuses 100..599

_WORD = 8


def shards_for(worker_processes: int) -> int:
    """Shards for an instance of this many workers: room for the old and new generations of
    a reload twice over (workers still draining when the next reload comes)."""
    return max(DEFAULT_SHARDS, 4 * worker_processes)


class StatsFull(RuntimeError):
    """Every shard is owned by a live process: this one cannot record."""


class PeerLike(Protocol):
    """What ``sync_weights`` changes: ``scriptlb.state.peers.Peer`` has these."""

    weight: int
    effective_weight: int


# --------------------------------------------------------------------------- layout

Slots = dict[tuple[str, bool, int], int]  # (upstream, is_backup, Peer.id) -> slot


@dataclass(frozen=True, slots=True)
class PeerKey:
    """A peer's identity across reloads: its upstream, its address name, and which
    occurrence of that name it is in the upstream (primary list first, then backup)."""

    upstream: str
    name: str
    occurrence: int = 0

    def digest(self) -> bytes:
        text = f"{self.upstream}\0{self.name}\0{self.occurrence}".encode("utf-8", "surrogateescape")
        return hashlib.blake2b(text, digest_size=16).digest()


@dataclass(frozen=True, slots=True)
class UpstreamLayout:
    """One upstream's peers in ``PeerSet`` order: index = ``Peer.id`` of each list."""

    name: str
    primary: tuple[PeerKey, ...]
    backup: tuple[PeerKey, ...]
    weights: tuple[tuple[int, ...], tuple[int, ...]]  # configured weights (primary, backup)


def layout_of(http: HttpConf) -> tuple[UpstreamLayout, ...]:
    """Every peer of every upstream, as ``PeerSet.from_conf`` lists them."""
    return tuple(_upstream_layout(u.name, u.servers) for u in http.upstreams.values())


def stream_layout_of(stream: Any) -> tuple[UpstreamLayout, ...]:
    """The stream block's upstreams, named ``stream:NAME`` (apart from http's of that name)."""
    if stream is None:
        return ()
    return tuple(_upstream_layout("stream:" + u.name, u.servers)
                 for u in stream.upstreams.values() if not u.implicit)


def _upstream_layout(name: str, servers: Iterable[Any]) -> UpstreamLayout:
    primary: list[PeerKey] = []
    backup: list[PeerKey] = []
    weights: tuple[list[int], list[int]] = ([], [])
    seen: dict[str, int] = {}
    ordered = [s for s in servers if not s.backup] + [s for s in servers if s.backup]
    for server in ordered:
        for addr in server.addrs:
            occurrence = seen.get(addr.name, 0)
            seen[addr.name] = occurrence + 1
            (backup if server.backup else primary).append(PeerKey(name, addr.name, occurrence))
            weights[server.backup].append(server.weight)
    return UpstreamLayout(name, tuple(primary), tuple(backup), (tuple(weights[0]), tuple(weights[1])))


# --------------------------------------------------------------------------- the shared file


_OPEN: weakref.WeakSet[PeerStats] = weakref.WeakSet()


class PeerStats:
    """This process's view of the instance's peer statistics. Build with ``open``."""

    __slots__ = (
        "__weakref__",
        "_by_address",
        "_d",
        "_map",
        "_mine",
        "_mine_codes",
        "_q",
        "_slots",
        "_weights",
        "path",
        "shards",
    )

    def __init__(
        self, path: str, mapping: mmap.mmap, slots: Slots, weights: dict[int, int], names: dict[int, str]
    ) -> None:
        self.path = path
        self._map = mapping
        self._q = memoryview(mapping).cast("q")  # int64 view
        self._d = memoryview(mapping).cast("d")  # float64 view of the same words
        self.shards = self._q[_SHARDS]
        self._slots = slots  # (upstream, is_backup, id) -> slot
        self._weights = weights  # slot -> configured weight
        # (upstream, address) -> slot of its first peer, primary before backup
        self._by_address: dict[tuple[str, str], int] = {}
        for (upstream, _, _), slot in sorted(slots.items(), key=lambda item: item[0][1]):
            self._by_address.setdefault((upstream, names[slot]), slot)
        self._mine = 0  # word offset of this process's counters inside a record
        self._mine_codes = 0  # ... and of its status-code counters

    # ----------------------------------------------------------------- opening

    @classmethod
    def open(
        cls, directory: str, layout: Sequence[UpstreamLayout], shards: int = DEFAULT_SHARDS
    ) -> PeerStats:
        """Map ``<directory>/peer_stats``, creating it or adding records for new peers, and
        claim a shard for this process. Peers already in the file keep their figures.
        ``shards`` only applies when the file is created. Raises ``StatsFull``."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.realpath(os.path.join(directory, FILE_NAME))
        with _locked(path) as fd:
            _init_header(fd, shards)
            slots, weights, names = _allocate(fd, layout)
        stats = cls(path, _map_file(path), slots, weights, names)
        stats._claim_shard()
        _OPEN.add(stats)
        return stats

    @staticmethod
    def reset(directory: str) -> None:
        """Forget everything: the master's cold start (not a reload) calls this."""
        try:
            os.unlink(os.path.join(directory, FILE_NAME))
        except FileNotFoundError:
            pass

    def close(self) -> None:
        """Give the shard back (its counts stay; kept while another object of this process
        uses the file) and unmap. The object is unusable after."""
        _OPEN.discard(self)
        owner_word = _HEADER_WORDS + _SHARD_WORDS * self._shard_index()
        shared = any(other.path == self.path for other in _OPEN)  # same process, same shard
        with _locked(self.path):
            if not shared and self._q[owner_word] == os.getpid():
                self._q[owner_word] = 0
        self._q.release()
        self._d.release()
        self._map.close()

    def _claim_shard(self) -> None:
        """Take a free shard, or one whose owner is dead (settling its tries in flight)."""
        pid = os.getpid()
        with _locked(self.path) as fd:
            shard = self._free_shard(pid)
            if shard is None:
                raise StatsFull(f"all {self.shards} statistics shards of {self.path} are in use")
            self._mine = _FIXED_WORDS + _COUNTER_WORDS * shard
            self._mine_codes = _FIXED_WORDS + _COUNTER_WORDS * self.shards + CODE_WORDS * shard
            owner_word = _HEADER_WORDS + _SHARD_WORDS * shard
            if self._q[owner_word] != pid:
                _settle_column(fd, self._mine)
                self._q[owner_word] = pid
            # readers sum the columns of the shards ever used only (usually 1-4 of 32)
            if self._q[_SHARDS_USED] <= shard:
                self._q[_SHARDS_USED] = shard + 1

    def _free_shard(self, pid: int) -> int | None:
        """This process's shard if it has one, else the first free or orphaned one."""
        free = None
        for shard in range(self.shards):
            owner = self._q[_HEADER_WORDS + _SHARD_WORDS * shard]
            if owner == pid:
                return shard
            if free is None and (owner == 0 or not _alive(owner)):
                free = shard
        return free

    def _detach(self) -> None:
        """Keep working on private memory: figures recorded from now on are not shared.
        For a forked child that found no free shard (better than corrupting another's)."""
        private = bytearray(self._map)
        self._q = memoryview(private).cast("q")
        self._d = memoryview(private).cast("d")

    # ----------------------------------------------------------------- the proxy's side

    def slot(self, upstream: str, is_backup: bool, peer_id: int) -> int:
        """The slot of ``Peer.id`` in an upstream's primary or backup list (KeyError if the
        peer was not in this process's layout). Look it up once per peer, not per try."""
        return self._slots[(upstream, is_backup, peer_id)]

    def slots(self, upstream: str) -> tuple[list[int], list[int]]:
        """(primary, backup) slots of an upstream, indexed by ``Peer.id``: what a worker's
        upstream keeps for ``record_*`` and ``sync_weights``."""
        primary: list[int] = []
        backup: list[int] = []
        for (name, is_backup, _), slot in self._slots.items():  # in Peer.id order
            if name == upstream:
                (backup if is_backup else primary).append(slot)
        return primary, backup

    def slot_for_address(self, upstream: str, address: str) -> int | None:
        """The slot of the upstream's first peer named ``address`` (``PeerAddr.name``), for a
        try to a hook-chosen address (``set_current_peer``); None if no peer has it."""
        return self._by_address.get((upstream, address))

    def record_start(self, slot: int) -> None:
        """A try to this peer starts: requests += 1 (and so active += 1)."""
        self._q[slot + self._mine] += 1

    def record_finish(
        self, slot: int, status: int, response_time: float | None, failed: bool, now: float
    ) -> None:
        """A try ends (every try that ``record_start`` counted, whatever its outcome).

        ``status``: the peer's status, 0 when there was no response; ``failed``: the try
        counts as a failure (``retry.is_counted_failure``); ``response_time``: the sample for
        the averages, or None; ``now``: wall clock (``time.time()``)."""
        sampled = response_time is not None
        self.publish(slot, 0, 1, 1 if failed else 0, status, now, 1 if sampled else 0,
                     response_time or 0.0, response_time or 0.0, now)

    def publish_tallies(self, slot: int, tallies: list[int], total: float, header_total: float = 0.0) -> None:
        """Add one process's responses by class 1xx..5xx, response-time samples per bucket,
        bytes sent and received, times unavailable and header-time samples (``tallies``: the
        five, ``BUCKET_SLOTS``, then the four, contiguous words), and the two samples' sums.
        Only the words with something to add are touched: a word of the shared map costs
        several times a list item to read and write."""
        at = slot + self._mine + _CLASSES
        q = self._q
        # (most are 0: a batch's responses fall in one class and a few buckets)
        for offset in compress(range(len(tallies)), tallies):
            q[at + offset] += tallies[offset]
        if total or header_total:
            d, at = self._d, slot + self._mine + _TIME_SUM
            d[at] += total
            d[at + 1] += header_total

    def publish_counts(self, slot: int, codes: dict[int, int], buckets: list[int], at: int,
                       traffic: tuple[int, int, int, int], total: float, header_total: float) -> None:
        """``publish_tallies`` and ``publish_codes`` in one, for ``Recorder.flush``: a batch's
        responses per status code (each also counted in its class 1xx..5xx; codes outside
        100..599 are not kept), its samples per response-time bucket
        (``buckets[at:at + BUCKET_SLOTS]``), ``traffic`` (bytes sent and received, times
        unavailable, header-time samples) and the two samples' sums. Only the words with
        something to add are touched (a word of the map costs several list items to add to)."""
        q = self._q
        mine = slot + self._mine
        code_words = slot + self._mine_codes - FIRST_CODE
        for code, count in codes.items():
            if FIRST_CODE <= code < FIRST_CODE + CODE_WORDS:
                q[mine + _CLASSES + code // 100 - 1] += count
                q[code_words + code] += count
        bucket_words = mine + _BUCKETS - at
        for bucket in compress(range(at, at + BUCKET_SLOTS), buckets[at : at + BUCKET_SLOTS]):
            q[bucket_words + bucket] += buckets[bucket]
        for offset in compress(range(4), traffic):  # (_SENT, _RECEIVED, _UNAVAIL, _HEADER_SAMPLES)
            q[mine + _SENT + offset] += traffic[offset]
        if total or header_total:
            d, at = self._d, mine + _TIME_SUM
            d[at] += total
            d[at + 1] += header_total

    def publish_codes(self, slot: int, codes: Iterable[tuple[int, int]]) -> None:
        """Add one process's responses per status code ((code, count); codes outside
        100..599 are not kept)."""
        q = self._q
        at = slot + self._mine_codes - FIRST_CODE
        for code, count in codes:
            if FIRST_CODE <= code < FIRST_CODE + CODE_WORDS:
                q[at + code] += count

    def traffic(self, slot: int) -> list[float]:
        """``TRAFFIC_FIELDS`` of one peer, every process's published ones."""
        q = self._q
        first = slot + _FIXED_WORDS
        width = _COUNTER_WORDS * q[_SHARDS_USED]
        counters = q[first : first + width].tolist()
        values: list[float] = [sum(counters[w::_COUNTER_WORDS]) for w in (_SENT, _RECEIVED, _UNAVAIL,
                                                                            _HEADER_SAMPLES)]
        values.append(sum(self._d[first : first + width].tolist()[_HEADER_SUM::_COUNTER_WORDS]))
        return values

    def codes(self, slot: int) -> dict[int, int]:
        """Responses per status code of one peer (only codes seen), every process's published."""
        q = self._q
        first = slot + _FIXED_WORDS + _COUNTER_WORDS * self.shards
        table = q[first : first + CODE_WORDS * q[_SHARDS_USED]].tolist()
        result: dict[int, int] = {}
        for shard in range(q[_SHARDS_USED]):
            base = shard * CODE_WORDS
            for offset in range(CODE_WORDS):
                count = table[base + offset]
                if count:
                    code = FIRST_CODE + offset
                    result[code] = result.get(code, 0) + count
        return result

    def publish_classes(self, slot: int, classes: Sequence[int]) -> None:
        """Add one process's responses by class (``classes[c]``: how many ``c``xx, c = 1..5)."""
        self.publish_tallies(slot, [*classes[1:6], *[0] * (_TALLY_WORDS - 5)], 0.0)

    def selected(self, slot: int) -> float | None:
        """When the peer was last chosen, to the statistics' batching (50 ms); None: never."""
        return self._d[slot + _SELECTED] or None

    def downtime(self, slot: int) -> float:
        return self._d[slot + _DOWNTIME]

    def add_downtime(self, slot: int, seconds: float) -> None:
        """The peer's checker, when an unhealthy spell ends (its only writer)."""
        self._d[slot + _DOWNTIME] += seconds

    def passive_failure(self, slot: int, max_fails: int, fail_timeout: float, now: float) -> tuple[bool, int]:
        """A counted failure of a ``zone`` upstream's peer, whichever worker saw it: nginx's
        ``fails++`` on the shared peer. Returns whether it made the peer unavailable
        (``max_fails`` reached while it was not already: the one time the instance counts
        ``unavail`` and logs "upstream server temporarily disabled"), and the failures now.
        ``now``: the workers' common monotonic clock (the event loops')."""
        q, d = self._q, self._d
        with _locked(self.path):
            fails = q[slot + _PASSIVE_FAILS] + 1
            q[slot + _PASSIVE_FAILS] = fails
            d[slot + _PASSIVE_FAILED_AT] = now
            if fails >= max_fails and d[slot + _PASSIVE_UNTIL] <= now:
                d[slot + _PASSIVE_UNTIL] = now + fail_timeout
                return True, fails
        return False, fails

    def passive_success(self, slot: int, fail_timeout: float, now: float) -> None:
        """A try of the peer went well: its failures are forgiven once ``fail_timeout`` has
        passed since the last one (nginx: a success after the window reopened resets fails)."""
        q, d = self._q, self._d
        if q[slot + _PASSIVE_FAILS] and now - d[slot + _PASSIVE_FAILED_AT] > fail_timeout:
            with _locked(self.path):
                if now - d[slot + _PASSIVE_FAILED_AT] > fail_timeout:
                    q[slot + _PASSIVE_FAILS] = 0

    def passive(self, slot: int) -> tuple[int, float]:
        """(failures in the window, the last failure's time) of a ``zone`` upstream's peer."""
        return self._q[slot + _PASSIVE_FAILS], self._d[slot + _PASSIVE_FAILED_AT]

    def health(self, slot: int) -> list[float]:
        """The peer's health-check words (``HEALTH_FIELDS``; ``since`` is a time)."""
        q, d = self._q, self._d
        at = slot + _HEALTH
        values: list[float] = list(q[at : at + 6].tolist())
        values.append(d[at + 6])
        return values

    def set_health(self, slot: int, values: Sequence[float]) -> None:
        """Store the health words (the peer's one checker; readers see each word whole)."""
        q, d = self._q, self._d
        at = slot + _HEALTH
        for offset in range(6):
            q[at + offset] = int(values[offset])
        d[at + 6] = float(values[6])

    def publish_times(self, slot: int, buckets: Sequence[int], total: float) -> None:
        """Add one process's response-time samples: per bucket, and their sum."""
        self.publish_tallies(slot, [0] * 5 + list(buckets) + [0] * (_TALLY_WORDS - 5 - BUCKET_SLOTS), total)

    def histogram(self, slot: int) -> tuple[list[int], float]:
        """(samples per bucket, not cumulative; their sum) of one peer, every process's."""
        used = self._q[_SHARDS_USED]
        first = slot + _FIXED_WORDS
        counters = self._q[first : first + _COUNTER_WORDS * used].tolist()
        sums = self._d[first : first + _COUNTER_WORDS * used].tolist()
        buckets = [sum(counters[_BUCKETS + b :: _COUNTER_WORDS]) for b in range(BUCKET_SLOTS)]
        return buckets, sum(sums[_TIME_SUM::_COUNTER_WORDS])

    def classes(self, slot: int) -> list[int]:
        """Responses 1xx..5xx of one peer, every process's published ones."""
        q = self._q
        first = slot + _FIXED_WORDS
        counters = q[first : first + _COUNTER_WORDS * q[_SHARDS_USED]].tolist()
        return [sum(counters[_CLASSES + c :: _COUNTER_WORDS]) for c in range(5)]

    def publish(self, slot: int, started: int, finished: int, failures: int, status: int,
                failure_time: float, samples: int, sample_sum: float, sample_max: float,
                now: float, header_samples: int = 0, header_sum: float = 0.0) -> None:
        """Add a batch of one process's tries on one peer (``Recorder.flush``): counts, the
        last status (when any finished), the last failure time (when any failed), and the
        batch's samples folded into the averages as one sample of their mean at ``now``
        (the decay over the batch's span is the same as sample by sample), the peak moving to
        the batch's maximum when that is above it; the header times likewise."""
        q, d = self._q, self._d
        mine = slot + self._mine
        if started:
            q[mine + _REQUESTS] += started
            d[slot + _SELECTED] = now
        if finished:
            q[mine + _FINISHED] += finished
            q[slot + _LAST_STATUS] = status
        if failures:
            q[mine + _FAILURES] += failures
            d[slot + _LAST_FAILURE] = failure_time
        if header_samples:
            mean = header_sum / header_samples
            d[slot + _HEADER_EWMA], _ = fold(d[slot + _HEADER_EWMA], 0.0, d[slot + _HEADER_STAMP] or None,
                                             mean, 0.0, now)
            d[slot + _HEADER_STAMP] = now
        if samples:
            stamp = d[slot + _STAMP] or None
            d[slot + _EWMA], d[slot + _PEAK] = fold(d[slot + _EWMA], d[slot + _PEAK], stamp,
                                                    sample_sum / samples, sample_max, now)
            d[slot + _STAMP] = now

    def averages(self, slot: int) -> tuple[float, float, float | None, float, float | None]:
        """(ewma, peak ewma, their stamp, header-time ewma, its stamp) of one peer, as stored
        (stamps None: never measured): what the latency-driven methods read per request."""
        d = self._d
        return (d[slot + _EWMA], d[slot + _PEAK], d[slot + _STAMP] or None, d[slot + _HEADER_EWMA],
                d[slot + _HEADER_STAMP] or None)

    # ----------------------------------------------------------------- weights

    @property
    def weight_generation(self) -> int:
        """Bumped by every ``set_weight``: compare with the last value applied (one load)."""
        return self._q[_WEIGHT_GENERATION]

    def set_weight(self, slot: int, weight: int) -> None:
        """``upstream.set_peer_weight``: every worker's balancer takes ``weight`` for this
        peer at its next request (see ``sync_weights``)."""
        if weight < 1:
            raise ValueError("weight must be a positive integer")
        with _locked(self.path):
            self._q[slot + _WEIGHT_BASE] = self._weights[slot]
            self._q[slot + _WEIGHT] = weight
            self._q[_WEIGHT_GENERATION] += 1  # after the weight: a reader that sees it sees both

    def weight_override(self, slot: int) -> int | None:
        """The hook-set weight in force for this peer, or None (none, or set against another
        configured weight: the config changed since)."""
        weight = self._q[slot + _WEIGHT]
        if not weight or self._q[slot + _WEIGHT_BASE] != self._weights[slot]:
            return None
        return weight

    def sync_weights(self, peers: Sequence[PeerLike], slots: Sequence[int]) -> int:
        """Apply the overrides to one list of a worker's peers (``slots[i]`` is ``peers[i]``'s
        slot); returns the generation applied. As nginx Plus' API does, a changed weight also
        resets the smooth round robin's effective weight to it."""
        generation = self.weight_generation
        for peer, slot in zip(peers, slots, strict=True):
            weight = self.weight_override(slot)
            if weight is None:
                weight = self._weights[slot]
            if peer.weight != weight:
                peer.weight = weight
                peer.effective_weight = weight
        return generation

    # ----------------------------------------------------------------- the hooks' side

    def snapshot(self, upstream: str, is_backup: bool, peer_id: int) -> dict[str, Any]:
        """Plain values for hooks (``get_primary_peers``' new fields)."""
        return self.read(self.slot(upstream, is_backup, peer_id))

    def read(self, slot: int) -> dict[str, Any]:
        return dict(zip(FIELDS, self.figures(slot), strict=True))

    def figures(self, slot: int) -> tuple[Any, ...]:
        """The values of ``FIELDS`` for one peer (a tuple: the hook API builds its own dict)."""
        q, d = self._q, self._d
        first = slot + _FIXED_WORDS
        counters = q[first : first + _COUNTER_WORDS * q[_SHARDS_USED]].tolist()  # one copy
        requests = sum(counters[_REQUESTS::_COUNTER_WORDS])
        active = requests - sum(counters[_FINISHED::_COUNTER_WORDS])
        stamp = d[slot + _STAMP]
        weight = q[slot + _WEIGHT]
        return (
            requests,
            sum(counters[_FAILURES::_COUNTER_WORDS]),
            active if active > 0 else 0,
            q[slot + _LAST_STATUS] or None,
            d[slot + _LAST_FAILURE] or None,
            d[slot + _EWMA] if stamp else None,
            d[slot + _PEAK] if stamp else None,
            stamp or None,
            weight if weight and q[slot + _WEIGHT_BASE] == self._weights[slot] else None,
        )

    def __repr__(self) -> str:
        return f"<PeerStats {self.path} peers={len(self._slots)} shard={self._shard_index()}>"

    def _shard_index(self) -> int:
        return (self._mine - _FIXED_WORDS) // _COUNTER_WORDS


FLUSH_INTERVAL = 0.05  # seconds: how far behind one worker's tries may look to the others
_NO_BUCKETS = [0] * BUCKET_SLOTS

# One ended try as ``Recorder.finish`` keeps it until its peer's next ``tally``: (status, latency
# sample, bytes sent, bytes received, time to the response header); None: not measured.
EndedTry = tuple[int, float | None, int, int, float | None]


def _known_sum(values: tuple[Any, ...], start: float) -> tuple[tuple[Any, ...], float]:
    """The values that are not None (a try without a response header, or whose time says
    nothing about the peer) and ``start`` plus their sum. sum raises at the first None: only
    then are the Nones left out, so a batch without any, the usual, is not searched for them
    (a comparison per try)."""
    try:
        return values, sum(values, start)
    except TypeError:
        known = tuple(v for v in values if v is not None)
        return known, sum(known, start)


class Recorder:
    """One worker's tries, gathered in plain lists and published to the shared file in batches
    (``PeerStats.publish``) at most ``FLUSH_INTERVAL`` after the first unpublished one, and
    before the worker exits.

    Why batches: in CPython a store into the shared map costs several times a list store, and
    recording every try straight into the map (start, end, the averages' read-modify-write)
    was a visible share of a proxied request's instructions (the figures: bench/README.md,
    ``bench/instructions.py``). Gathered here, a try's start adds one to a list cell and its
    end appends one tuple to its peer's ``ended`` list; ``tally`` folds a peer's ended tries
    into its figures a batch at a time (transposed with ``zip``, then ``sum``, ``sorted`` and
    ``bisect`` over whole columns), before the flush or any reader of that peer uses them: a
    dozen figures updated per try, one Python store each, cost several times that. A busy
    peer is published 20 times a second. Other workers see this worker's tries up to
    ``FLUSH_INTERVAL`` late; this worker's own reads (``UpstreamStats.figures``, ``average``)
    tally first and add what it has not published yet, so a hook always sees its own worker's
    tries. A worker killed outright loses its last batch.

    A peer's ``ended`` list is non-empty only while a flush is due (``finish`` arms one after
    appending, ``flush`` tallies every peer's): the tries loop, which appends a try that went
    well itself, looks at the flush timer only when it finds that list empty.

    Indexes are dense (``index_of(slot)``): ``Peer.stats_index`` holds a peer's."""

    __slots__ = (
        "_clock", "_loop", "_slots", "buckets", "codes", "ended", "failure_time", "failures", "finished",
        "header_samples", "header_sum", "index", "received", "sample_max", "sample_sum", "samples", "sent",
        "started", "stats", "status", "timer", "unavail",
    )

    def __init__(self, stats: PeerStats, loop: Any, clock: Callable[[], float] = time.time) -> None:
        self.stats = stats
        self._loop = loop
        self._clock = clock  # wall-clock seconds (an offline replay passes its virtual clock)
        # the scheduled flush; None: none is due (the tries loop reads it: see UpstreamStats.started)
        self.timer: Any = None
        self._slots: list[int] = []  # index -> slot
        self.index: dict[int, int] = {}  # slot -> index
        # per index: the tries ended since its last tally, in the order they ended
        self.ended: list[list[EndedTry]] = []
        # per index, the figures not published yet (of the ended tries: once tallied)
        self.started: list[int] = []
        self.finished: list[int] = []
        self.failures: list[int] = []
        self.status: list[int] = []
        self.failure_time: list[float] = []
        self.samples: list[int] = []
        self.sample_sum: list[float] = []
        self.sample_max: list[float] = []
        # responses by status (0: none), a dict: a peer answers few distinct codes, so a flush
        # reads one or two items (the parser's statuses bound it to 1000 keys)
        self.codes: list[dict[int, int]] = []
        self.sent: list[int] = []  # bytes
        self.received: list[int] = []
        self.unavail: list[int] = []  # times max_fails made the peer unavailable
        self.header_samples: list[int] = []
        self.header_sum: list[float] = []
        self.buckets: list[int] = []  # BUCKET_SLOTS per index: samples per response-time bucket

    def now(self) -> float:
        """The statistics' clock (wall-clock seconds; an offline run's virtual time)."""
        return self._clock()

    def index_of(self, slot: int) -> int:
        index = self.index.get(slot)
        if index is None:
            index = self.index[slot] = len(self._slots)
            self._slots.append(slot)
            for column in (self.started, self.finished, self.failures, self.status, self.samples, self.sent,
                           self.received, self.unavail, self.header_samples):
                column.append(0)
            for float_column in (self.failure_time, self.sample_sum, self.sample_max, self.header_sum):
                float_column.append(0.0)
            self.ended.append([])
            self.codes.append({})
            self.buckets.extend([0] * BUCKET_SLOTS)
        return index

    def start(self, index: int) -> None:
        """A try to the peer at ``index`` starts (the http tries loop inlines this)."""
        self.started[index] += 1
        if self.timer is None:
            self.arm_flush()

    def arm_flush(self) -> None:
        """Schedule the flush of what was recorded since the last one (none is due)."""
        self.timer = self._loop.call_later(FLUSH_INTERVAL, self.flush)

    def finish(self, index: int, status: int, sample: float | None, failed: bool, sent: int = 0,
               received: int = 0, header_time: float | None = None) -> None:
        """A started try ends: its status (0: no response; 0..999), its time as a latency
        sample (None: it says nothing about the peer), whether it failed, the bytes sent to
        and received from the peer, and its time to the response header (None: none came).
        Kept as one tuple until the peer's next ``tally``; a failure's time is taken now."""
        self.ended[index].append((status, sample, sent, received, header_time))
        if failed:
            self.failures[index] += 1
            self.failure_time[index] = self._clock()
        if self.timer is None:  # (a long try may end after the flush its start armed)
            self.timer = self._loop.call_later(FLUSH_INTERVAL, self.flush)

    def became_unavailable(self, index: int) -> None:
        """A failure of a try to the peer at ``index`` reached its max_fails (rare)."""
        self.unavail[index] += 1
        if self.timer is None:
            self.arm_flush()

    def tally(self, index: int) -> None:
        """Fold the peer's tries ended since its last tally into its unpublished figures: the
        same figures as adding each try as it ended (the sums run in the order they ended; the
        last status is the last try's)."""
        tries = self.ended[index]
        if not tries:
            return
        self.ended[index] = []
        if len(tries) == 1:  # (a reader after every try, as ewma's: a batch's machinery costs more)
            status, sample, sent_one, received_one, header_time = tries[0]
            self.finished[index] += 1
            self.status[index] = status
            codes = self.codes[index]
            codes[status] = codes.get(status, 0) + 1
            self.sent[index] += sent_one
            self.received[index] += received_one
            if header_time is not None:
                self.header_samples[index] += 1
                self.header_sum[index] += header_time
            if sample is not None:
                self.samples[index] += 1
                self.sample_sum[index] += sample
                if sample > self.sample_max[index]:
                    self.sample_max[index] = sample
                self.buckets[index * BUCKET_SLOTS + bisect_left(TIME_BUCKETS, sample)] += 1
            return
        statuses, samples, sent, received, headers = zip(*tries, strict=True)
        count = len(statuses)
        self.finished[index] += count
        self.status[index] = statuses[-1]
        _count_codes(self.codes[index], statuses)
        self.sent[index] += sum(sent)
        self.received[index] += sum(received)
        headers, header_sum = _known_sum(headers, self.header_sum[index])
        if headers:
            self.header_samples[index] += len(headers)
            self.header_sum[index] = header_sum
        samples, sample_sum = _known_sum(samples, self.sample_sum[index])
        if samples:
            self.samples[index] += len(samples)
            self.sample_sum[index] = sample_sum
            ordered = sorted(samples)
            if ordered[-1] > self.sample_max[index]:
                self.sample_max[index] = ordered[-1]
            _count_buckets(self.buckets, index * BUCKET_SLOTS, ordered)

    def flush(self) -> None:
        """Publish every peer's unpublished tries (a scheduled flush is then not needed: an
        explicit one, at worker exit, must leave no timer to run after the file is closed)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        now = self._clock()
        publish = self.stats.publish
        started, finished, failures, samples = self.started, self.finished, self.failures, self.samples
        ended = self.ended
        for index, slot in enumerate(self._slots):
            if ended[index]:
                self.tally(index)
            elif not (started[index] or finished[index] or self.unavail[index]):
                continue
            publish(slot, started[index], finished[index], failures[index], self.status[index],
                    self.failure_time[index], samples[index], self.sample_sum[index],
                    self.sample_max[index], now, self.header_samples[index], self.header_sum[index])
            bt = index * BUCKET_SLOTS
            codes = self.codes[index]
            traffic = (self.sent[index], self.received[index], self.unavail[index],
                       self.header_samples[index])
            self.stats.publish_counts(slot, codes, self.buckets, bt, traffic,
                                      self.sample_sum[index] if samples[index] else 0.0,
                                      self.header_sum[index])
            codes.clear()
            self.buckets[bt : bt + BUCKET_SLOTS] = _NO_BUCKETS
            started[index] = finished[index] = failures[index] = samples[index] = 0
            self.sent[index] = self.received[index] = self.unavail[index] = self.header_samples[index] = 0
            self.sample_sum[index] = self.sample_max[index] = self.header_sum[index] = 0.0

    def unpublished_histogram(
        self, index: int, histogram: tuple[list[int], float]
    ) -> tuple[list[int], float]:
        """``PeerStats.histogram`` with this worker's unpublished samples added."""
        self.tally(index)
        at = index * BUCKET_SLOTS
        buckets = [count + self.buckets[at + b] for b, count in enumerate(histogram[0])]
        return buckets, histogram[1] + (self.sample_sum[index] if self.samples[index] else 0.0)

    def unpublished_selected(self, index: int, selected: float | None) -> float | None:
        """``PeerStats.selected`` for this worker: a try it started and has not published yet
        makes it now (its batch would be stamped with the time it is published, and the other
        figures this worker reports already count that try)."""
        return self._clock() if self.started[index] else selected

    def unpublished_classes(self, index: int, classes: list[int]) -> list[int]:
        """``PeerStats.classes`` with this worker's unpublished responses added."""
        self.tally(index)
        mine = _classes(self.codes[index])
        return [count + mine[c] for c, count in enumerate(classes)]

    def unpublished_codes(self, index: int, codes: dict[int, int]) -> dict[int, int]:
        """``PeerStats.codes`` with this worker's unpublished responses added."""
        self.tally(index)
        result = dict(codes)
        for code, count in self.codes[index].items():
            if FIRST_CODE <= code < FIRST_CODE + CODE_WORDS:
                result[code] = result.get(code, 0) + count
        return result

    def unpublished_traffic(self, index: int, traffic: list[float]) -> list[float]:
        """``PeerStats.traffic`` with this worker's unpublished tries added."""
        self.tally(index)
        mine = (self.sent[index], self.received[index], self.unavail[index], self.header_samples[index],
                self.header_sum[index])
        return [a + b for a, b in zip(traffic, mine, strict=True)]

    def unpublished(self, index: int, figures: tuple[Any, ...]) -> tuple[Any, ...]:
        """``PeerStats.figures`` with this worker's unpublished tries added."""
        if self.ended[index]:
            self.tally(index)
        started, finished, failures = self.started[index], self.finished[index], self.failures[index]
        if not (started or finished):
            return figures
        requests, failed, active, last_status, last_failure, *averages = figures
        if finished:
            last_status = self.status[index] or None
        if failures:
            last_failure = self.failure_time[index]
        active = max(0, active + started - finished)
        return (requests + started, failed + failures, active, last_status, last_failure, *averages)


def _count_codes(codes: dict[int, int], statuses: tuple[int, ...]) -> None:
    """Add a batch's statuses to a peer's counts by status: a batch is usually one status
    throughout (counted at C speed), else each is added."""
    first = statuses[0]
    if statuses.count(first) == len(statuses):
        codes[first] = codes.get(first, 0) + len(statuses)
        return
    for status in statuses:
        codes[status] = codes.get(status, 0) + 1


def _count_buckets(buckets: list[int], at: int, ordered: list[float]) -> None:
    """Add sorted samples to the response-time buckets at ``buckets[at:at + BUCKET_SLOTS]``
    (a sample's bucket is ``bisect_left(TIME_BUCKETS, sample)``): a batch within one bucket
    (the usual) in one step, else one bisect of the batch per bucket edge it spans."""
    low = bisect_left(TIME_BUCKETS, ordered[0])
    high = bisect_left(TIME_BUCKETS, ordered[-1])
    counted = 0
    for bucket in range(low, high):  # (samples up to the bucket's edge, minus those below it)
        upto = bisect_right(ordered, TIME_BUCKETS[bucket])
        buckets[at + bucket] += upto - counted
        counted = upto
    buckets[at + high] += len(ordered) - counted


def _classes(codes: dict[int, int]) -> list[int]:
    """Responses 1xx..5xx among one peer's counts by status."""
    classes = [0, 0, 0, 0, 0]
    for code, count in codes.items():
        if 100 <= code < 600:
            classes[code // 100 - 1] += count
    return classes


class UpstreamStats:
    """One upstream's peers in the live statistics: what a worker's upstream runtime holds.

    ``start``/``finish`` (the recorder's, bound once) take a ``Peer.stats_index``, which
    ``assign_indexes`` gives each peer; ``refresh_weights(peers)`` is the per-request check for
    hook-set weights (one load when nothing changed). Balancers that cache weights (``hash``'s
    total) recompute them when it returns True; round robin and its kin read them live."""

    __slots__ = ("backup", "ended", "finish", "generation", "name", "primary", "recorder", "start", "started",
                 "stats", "words")

    def __init__(self, recorder: Recorder, upstream: str) -> None:
        stats = self.stats = recorder.stats
        self.recorder = recorder
        self.name = upstream
        self.primary, self.backup = stats.slots(upstream)
        self.generation = -1  # never applied: the first refresh syncs
        # the tries loop's calls, bound once: a try pays no lookup or wrapper for them
        self.start = recorder.start
        self.finish = recorder.finish
        # the recorder's per-peer count of tries started: the http tries loop inlines ``start``
        # (``started[index] += 1``, then ``recorder.arm_flush()`` when ``recorder.timer`` is None)
        self.started = recorder.started
        # ... and its per-peer lists of ended tries: the tries loop inlines ``finish`` for a
        # try that went well (the tuple appended to ``ended[index]``; ``recorder.arm_flush()``
        # when that list was empty and ``recorder.timer`` is None)
        self.ended = recorder.ended
        self.words = stats._q  # for weights_stale's one load

    def passive_free(self, peer: Any, failed: bool, fails_before: int, now: float) -> bool:
        """A try of a ``zone`` upstream's peer ended (after the worker's balancer freed it):
        the failure goes into the peer's shared passive state; a success forgives earlier
        failures as nginx does. True when this failure disabled the peer for every worker."""
        if not peer.max_fails:
            return False
        slot = self.slot_of(peer)
        if failed:
            disabled, fails = self.stats.passive_failure(slot, peer.max_fails, peer.fail_timeout, now)
            if fails > peer.fails:  # other workers' failures count here at once, not at the next sync
                peer.fails = fails
            return disabled
        if fails_before:
            self.stats.passive_success(slot, peer.fail_timeout, now)
        return False

    def sync_passive(self, peers: Iterable[Any]) -> None:
        """Give this worker's peers the shared passive state (every worker, periodically):
        failures any worker counted, the last one's time as their window's start."""
        passive = self.stats.passive
        for peer in peers:
            fails, failed_at = passive(self.slot_of(peer))
            peer.fails = fails
            if fails:
                peer.accessed = failed_at
                if failed_at > peer.checked:
                    peer.checked = failed_at

    def rebind(self) -> None:
        """Follow the recorder to its new ``PeerStats`` (reopened with records for run-time
        peers: ``Runtime.replace_servers``) and re-read this upstream's slots."""
        stats = self.stats = self.recorder.stats
        self.primary, self.backup = stats.slots(self.name)
        self.words = stats._q
        self.generation = -1  # weights: re-read on the next request

    def weights_stale(self) -> bool:
        """Has a hook set a weight since ``refresh_weights`` last ran? (Callers on the hot
        path inline this: ``stats.words[WEIGHT_GENERATION] != stats.generation``.)"""
        return self.words[WEIGHT_GENERATION] != self.generation

    def assign_indexes(self, primary: Sequence[Peer], backup: Sequence[Peer]) -> None:
        """Give each ``Peer`` its ``stats_index`` (what the tries loop records under)."""
        for peers, slots in ((primary, self.primary), (backup, self.backup)):
            for peer, slot in zip(peers, slots, strict=True):
                peer.stats_index = self.recorder.index_of(slot)

    def slot_of(self, peer: Peer) -> int:
        """The slot of a ``Peer`` of this upstream (by its list and ``id``)."""
        return (self.backup if peer.backup else self.primary)[peer.id]

    def figures(self, peer: Peer) -> tuple[Any, ...]:
        """The peer's ``FIELDS`` values: every worker's published tries and this one's all."""
        return self.recorder.unpublished(peer.stats_index, self.stats.figures(self.slot_of(peer)))

    def histogram(self, peer: Peer) -> tuple[list[int], float]:
        """The peer's response-time samples per bucket and their sum (all workers')."""
        return self.recorder.unpublished_histogram(peer.stats_index, self.stats.histogram(self.slot_of(peer)))

    def selected(self, peer: Peer) -> float | None:
        """When the peer was last chosen (None: never), as every worker published it or this
        one chose it since."""
        return self.recorder.unpublished_selected(peer.stats_index, self.stats.selected(self.slot_of(peer)))

    def classes(self, peer: Peer) -> list[int]:
        """The peer's responses 1xx..5xx: every worker's published and this one's all."""
        return self.recorder.unpublished_classes(peer.stats_index, self.stats.classes(self.slot_of(peer)))

    def codes(self, peer: Peer) -> dict[int, int]:
        """The peer's responses per status code (100..599): every worker's."""
        return self.recorder.unpublished_codes(peer.stats_index, self.stats.codes(self.slot_of(peer)))

    def traffic(self, peer: Peer) -> list[float]:
        """The peer's ``TRAFFIC_FIELDS``: every worker's published and this one's all."""
        return self.recorder.unpublished_traffic(peer.stats_index, self.stats.traffic(self.slot_of(peer)))

    def start_address(self, address: str) -> int:
        """A try to a hook-chosen address starts: it counts for the upstream's first peer with
        that address. Returns the index for ``finish``; -1 (nothing recorded) for an address
        that is not one of its peers."""
        slot = self.stats.slot_for_address(self.name, address)
        if slot is None:
            return -1
        index = self.recorder.index_of(slot)
        self.recorder.start(index)
        return index

    def average(self, peer: Any, header: bool = False,
                peak: bool = False) -> tuple[float, float | None, float]:
        """A time average of the peer as every worker published it, with this worker's
        unpublished samples folded in: (average, its stamp (None: never measured), now on the
        statistics' clock). The round trip's average (its peak average with ``peak``), or the
        time to the response header's with ``header``: what ``ewma`` and ``least_time`` read."""
        recorder = self.recorder
        index = peer.stats_index
        if recorder.ended[index]:
            recorder.tally(index)
        ewma, peak_ewma, stamp, header_ewma, header_stamp = self.stats.averages(self.slot_of(peer))
        now = recorder.now()
        if header:
            value, stamp = header_ewma, header_stamp
            count, total, maximum = recorder.header_samples[index], recorder.header_sum[index], 0.0
        else:
            value = peak_ewma if peak else ewma
            count, total = recorder.samples[index], recorder.sample_sum[index]
            maximum = recorder.sample_max[index]
        if count:
            mean, highest = fold(value, value, stamp, total / count, maximum, now)
            value, stamp = (highest if peak else mean), now
        return value, stamp, now

    def refresh_weights(self, primary: Sequence[PeerLike], backup: Sequence[PeerLike]) -> bool:
        """Apply weights set since the last call; True when anything was re-read."""
        if self.stats.weight_generation == self.generation:
            return False
        self.generation = self.stats.sync_weights(primary, self.primary)
        self.stats.sync_weights(backup, self.backup)
        return True


def fold(value: float, peak: float, stamp: float | None, mean: float, maximum: float, now: float,
         decay: float = DECAY_TIME) -> tuple[float, float]:
    """The averages (ewma, peak ewma) after samples of mean ``mean`` and maximum ``maximum``
    arrived at ``now``, the last ones at ``stamp`` (None: never, the samples are taken whole).

    The weight of the past decays with the time since ``stamp`` (not with the number of
    samples), so a peer that answers seldom is not judged on old figures; the peak jumps to a
    sample above it (a slowdown is seen at once) and decays like the average otherwise."""
    if stamp is None:
        return mean, maximum
    weight = math.exp(-(now - stamp) / decay) if now > stamp else 1.0
    rest = mean * (1.0 - weight)
    return value * weight + rest, maximum if maximum > peak else peak * weight + rest


def decayed(value: float | None, stamp: float | None, now: float, decay: float = DECAY_TIME) -> float:
    """An average decayed towards 0 for the time since its last sample (APISIX's score): a
    peer not used for a while looks faster, and is tried again."""
    if not value or stamp is None:
        return 0.0
    return value * math.exp(-max(now - stamp, 0.0) / decay)


# --------------------------------------------------------------------------- file helpers


@contextmanager
def _locked(path: str) -> Iterator[int]:
    """An exclusive ``flock`` on a fresh descriptor: locks belong to the open file, so a
    descriptor inherited across fork would be shared with the parent, not exclude it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)  # releases the lock


def _map_file(path: str) -> mmap.mmap:
    """The whole file, shared. Mapped through its own descriptor: ``mmap`` keeps a dup of the
    one it is given, and a dup of a locked descriptor would hold the ``flock`` for ever."""
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        return mmap.mmap(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def _records_start(shards: int) -> int:
    return _HEADER_WORDS + _SHARD_WORDS * shards


def _init_header(fd: int, shards: int) -> None:
    head = os.pread(fd, _HEADER_WORDS * _WORD, 0)
    if len(head) == _HEADER_WORDS * _WORD:
        magic, version = struct.unpack_from("=qq", head)
        if (magic, version) != (MAGIC, VERSION):
            raise ValueError(f"{os.readlink(f'/proc/self/fd/{fd}')} is not a peer statistics file")
        return
    if shards < 1:
        raise ValueError("shards must be positive")
    record_words = _FIXED_WORDS + (_COUNTER_WORDS + CODE_WORDS) * shards
    os.ftruncate(fd, _records_start(shards) * _WORD)
    os.pwrite(fd, struct.pack("=6q", MAGIC, VERSION, shards, record_words, 0, 0), 0)


def _allocate(fd: int, layout: Sequence[UpstreamLayout]) -> tuple[Slots, dict[int, int], dict[int, str]]:
    """Slots for every peer of ``layout`` (existing records by key, new ones appended), and
    each slot's configured weight and address name."""
    header = struct.unpack("=6q", os.pread(fd, 6 * _WORD, 0))
    shards, record_words, records = header[_SHARDS], header[_RECORD_WORDS], header[_RECORDS]
    first = _records_start(shards)
    by_key: dict[bytes, int] = {}
    for index in range(records):
        slot = first + index * record_words
        by_key[os.pread(fd, 16, slot * _WORD)] = slot
    slots: dict[tuple[str, bool, int], int] = {}
    weights: dict[int, int] = {}
    names: dict[int, str] = {}
    for upstream in layout:
        for is_backup, keys in ((False, upstream.primary), (True, upstream.backup)):
            for peer_id, key in enumerate(keys):
                digest = key.digest()
                slot = by_key.get(digest)
                if slot is None:
                    slot = first + records * record_words
                    records += 1
                    os.ftruncate(fd, (slot + record_words) * _WORD)  # zero-filled
                    os.pwrite(fd, digest, slot * _WORD)
                    by_key[digest] = slot
                slots[(upstream.name, is_backup, peer_id)] = slot
                weights[slot] = upstream.weights[is_backup][peer_id]
                names[slot] = key.name
    os.pwrite(fd, struct.pack("=q", records), _RECORDS * _WORD)
    return slots, weights, names


def _settle_column(fd: int, offset: int) -> None:
    """In every record, mark a shard's tries as all finished (finished := requests), through
    the file, so records added after this process mapped it are covered too."""
    shards, record_words, records = struct.unpack("=3q", os.pread(fd, 3 * _WORD, _SHARDS * _WORD))
    first = _records_start(shards)
    for index in range(records):
        at = (first + index * record_words + offset) * _WORD
        requests = os.pread(fd, _WORD, at + _REQUESTS * _WORD)
        os.pwrite(fd, requests, at + _FINISHED * _WORD)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive, and not ours to take
    return True


def _claim_after_fork() -> None:
    """A forked child must not record in its parent's shard: claim its own, or detach."""
    for stats in list(_OPEN):
        try:
            stats._claim_shard()
        except StatsFull:
            _OPEN.discard(stats)
            stats._detach()


os.register_at_fork(after_in_child=_claim_after_fork)
