"""Connection and request counters of the whole instance (stub_status, ``$connections_*``,
the API's ``/connections`` and ``/http/requests``, the metrics), shared by every worker.

Theory of operation
-------------------
One file, ``<zone directory>/status``, mapped by every worker (``mmap``, 8-byte words): a
header, then one row per worker process::

    header  MAGIC, VERSION, ROWS, ROWS_USED, 4 reserved
    row     owner pid, accepted, handled, requests, active, reading, writing, worker id + 1
            (0: unknown), the row's counters when its owner claimed it (accepted, handled,
            requests), reserved, then MAX_ZONES x 5: responses 1xx..5xx per status_zone
            (sorted names)

A worker claims a free row (or one whose owner died) and is its only writer. It counts in
plain Python integers (an accepted connection: one increment in the protocol factory; a
request: one in ``Exchange.__init__``) and publishes its row every ``PUBLISH_INTERVAL``:
its counters (on top of what the row's earlier owners counted: history is kept across
reloads and crashes, as nginx's shared counters are) and its gauges, computed by looking at
its open connections then (nothing per request). A reader sums the counters of every row and
the gauges of the rows whose owner is alive, with its own live values in place of its row:
another worker's figures are at most ``PUBLISH_INTERVAL`` old. The API's ``/workers`` reads
the live rows one by one: each worker's own counts (its row's minus what the row held when it
claimed it), as nginx Plus reports them per worker process.

The master removes the file at a cold start (with the other shared zones); a reload keeps it.
Zone counters are each worker's own (a row's next owner starts them at 0, readers sum live
rows only): they restart when workers do, which Prometheus counters allow (a reset), and
keeping them across a reload that renames zones would mix them up.
"""

from __future__ import annotations

import mmap
import os
import struct
from array import array
from collections.abc import Iterable
from typing import Any

from scriptlb.state.stats import _alive, _locked

FILE_NAME = "status"
MAGIC = int.from_bytes(b"SLBSTAT2", "little")
VERSION = 2  # 2: worker id and the claim-time counters in each row
PUBLISH_INTERVAL = 0.1  # seconds
DEFAULT_ROWS = 64

_HEADER_WORDS = 8
MAX_ZONES = 16  # status_zone names counted (the first 16, sorted)
_ZONES = 12  # row word of the first zone's 1xx
_ROW_WORDS = _ZONES + 5 * MAX_ZONES
_MAGIC, _VERSION, _ROWS, _ROWS_USED = range(4)
# row words
_OWNER, _ACCEPTED, _HANDLED, _REQUESTS, _ACTIVE, _READING, _WRITING, _WORKER_ID, _BASE = range(9)
COUNTERS = ("accepted", "handled", "requests")
GAUGES = ("active", "reading", "writing")
_WORD = 8
_NO_ZONES = array("q", [0] * (5 * MAX_ZONES))


class StatusFull(RuntimeError):
    """Every row is owned by a live process."""


def rows_for(worker_processes: int) -> int:
    """Room for several generations of workers overlapping during reloads."""
    return max(DEFAULT_ROWS, 4 * worker_processes)


class WorkerStatus:
    """This worker's counters and its row in the shared file.

    ``accepted`` and ``requests`` are plain attributes the worker increments; ``connections``
    are the worker's open client connections (sets, one per listener), looked at on publish.
    """

    def __init__(self, directory: str, rows: int = DEFAULT_ROWS, worker_id: int = -1) -> None:
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.realpath(os.path.join(directory, FILE_NAME))
        self.accepted = 0  # incremented by the worker's protocol factory
        self.runtime: Any = None  # its ``requests`` counts this worker's requests
        self.connection_sets: list[set[Any]] = []
        self.contexts: list[Any] = []  # the worker's listeners: their ``dropped`` counts
        self._timer: Any = None
        with _locked(self.path) as fd:
            _init_file(fd, rows)
        fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        try:
            self._map = mmap.mmap(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)
        self._q = memoryview(self._map).cast("q")
        self.rows = self._q[_ROWS]
        self._row = self._claim(worker_id)
        at = self._row + _ACCEPTED
        # what the row's earlier owners counted; this worker's counts go on top
        self._base = self._q[at : at + len(COUNTERS)].tolist()

    # ----------------------------------------------------------------- rows

    def _claim(self, worker_id: int) -> int:
        pid = os.getpid()
        with _locked(self.path):
            q = self._q
            for row in range(self.rows):
                at = _HEADER_WORDS + row * _ROW_WORDS
                owner = q[at + _OWNER]
                if owner == 0 or owner == pid or not _alive(owner):
                    for gauge in (_ACTIVE, _READING, _WRITING):
                        q[at + gauge] = 0  # a dead owner's connections died with it
                    q[at + _ZONES : at + _ROW_WORDS] = _NO_ZONES
                    q[at + _WORKER_ID] = worker_id + 1
                    q[at + _BASE : at + _BASE + len(COUNTERS)] = q[at + _ACCEPTED : at + _REQUESTS + 1]
                    q[at + _OWNER] = pid
                    if q[_ROWS_USED] <= row:
                        q[_ROWS_USED] = row + 1
                    return at
        raise StatusFull(f"all {self.rows} status rows of {self.path} are in use")

    # ----------------------------------------------------------------- this worker

    def gauges(self) -> tuple[int, int, int]:
        """(active, reading, writing) of this worker's client connections, now."""
        active = reading = writing = 0
        for connections in self.connection_sets:
            for conn in connections:
                active += 1
                if conn.active is not None:
                    writing += 1
                elif conn.reading_head:
                    reading += 1
        return active, reading, writing

    def own(self) -> tuple[int, ...]:
        """This worker's row as it would publish it now."""
        base = self._base
        requests = self.runtime.requests if self.runtime is not None else 0
        handled = self.accepted - sum(context.dropped for context in self.contexts)
        return (base[0] + self.accepted, base[1] + handled, base[2] + requests, *self.gauges())

    def zone_names(self) -> list[str]:
        return sorted(self.runtime.zone_counts)[:MAX_ZONES] if self.runtime is not None else []

    def publish(self) -> None:
        q, at = self._q, self._row + _ACCEPTED
        for offset, value in enumerate(self.own()):
            q[at + offset] = value
        if self.runtime is not None:
            counts = self.runtime.zone_counts
            for index, name in enumerate(self.zone_names()):
                first = self._row + _ZONES + 5 * index
                q[first : first + 5] = array("q", counts[name][1:6])

    def start(self, loop: Any) -> None:
        """Publish now and every ``PUBLISH_INTERVAL`` until ``close``."""
        self.publish()
        self._timer = loop.call_later(PUBLISH_INTERVAL, self._tick, loop)

    def _tick(self, loop: Any) -> None:
        self.publish()
        self._timer = loop.call_later(PUBLISH_INTERVAL, self._tick, loop)

    def close(self) -> None:
        """Final counters, no connections, and the row given back."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.publish()
        q, at = self._q, self._row
        for gauge in (_ACTIVE, _READING, _WRITING):
            q[at + gauge] = 0
        with _locked(self.path):
            if q[at + _OWNER] == os.getpid():
                q[at + _OWNER] = 0
        self._q.release()
        self._map.close()

    # ----------------------------------------------------------------- readers

    def totals(self) -> dict[str, int]:
        """The instance's figures: accepted, handled, requests, active, reading, writing,
        waiting (nginx's stub_status set), this worker's live, the others' as published."""
        q = self._q
        sums = [0] * (len(COUNTERS) + len(GAUGES))
        for row in range(q[_ROWS_USED]):
            at = _HEADER_WORDS + row * _ROW_WORDS
            if at == self._row:
                values: Iterable[int] = self.own()
            else:
                values = q[at + _ACCEPTED : at + _WRITING + 1].tolist()
                owner = q[at + _OWNER]
                if owner == 0 or not _alive(owner):
                    values = [*list(values)[: len(COUNTERS)], 0, 0, 0]
            for index, value in enumerate(values):
                sums[index] += value
        figures = dict(zip(COUNTERS + GAUGES, sums, strict=True))
        figures["waiting"] = max(0, figures["active"] - figures["reading"] - figures["writing"])
        return figures

    def workers(self) -> list[dict[str, Any]]:
        """nginx Plus's ``/workers``: per live worker process (this one live, the others as
        published), its id, pid, connections and requests since it started, by worker id."""
        q = self._q
        result = []
        for row in range(q[_ROWS_USED]):
            at = _HEADER_WORDS + row * _ROW_WORDS
            owner = q[at + _OWNER]
            if at != self._row and (owner == 0 or not _alive(owner)):
                continue
            values = self.own() if at == self._row else tuple(q[at + _ACCEPTED : at + _WRITING + 1].tolist())
            base = q[at + _BASE : at + _BASE + len(COUNTERS)].tolist()
            accepted, handled, requests = (values[i] - base[i] for i in range(len(COUNTERS)))
            active, reading, writing = values[len(COUNTERS):]
            result.append({
                "id": q[at + _WORKER_ID] - 1, "pid": owner,
                "connections": {"accepted": accepted, "dropped": accepted - handled,
                                "active": reading + writing, "idle": max(0, active - reading - writing)},
                "http": {"requests": {"total": requests, "current": writing}},
            })
        result.sort(key=lambda worker: (worker["id"], worker["pid"]))
        return result

    def reset_workers(self, worker_id: int | None = None) -> bool:
        """nginx Plus's ``DELETE /workers[/ID]``: the live workers' (or one id's) counters
        start again from zero in ``workers()`` (their rows' claim-time words move to what they
        published; the instance totals are untouched: what another worker counted since its
        last publish, at most ``PUBLISH_INTERVAL`` ago, stays). False when no such worker lives."""
        q = self._q
        found = False
        with _locked(self.path):
            for row in range(q[_ROWS_USED]):
                at = _HEADER_WORDS + row * _ROW_WORDS
                owner = q[at + _OWNER]
                if owner == 0 or (at != self._row and not _alive(owner)):
                    continue
                if worker_id is not None and q[at + _WORKER_ID] - 1 != worker_id:
                    continue
                found = True
                current = self.own()[: len(COUNTERS)] if at == self._row else \
                    tuple(q[at + _ACCEPTED : at + _REQUESTS + 1].tolist())
                for offset, value in enumerate(current):
                    q[at + _BASE + offset] = value
        return found

    def zone_totals(self) -> dict[str, list[int]]:
        """Responses 1xx..5xx per status_zone, summed over the live workers."""
        names = self.zone_names()
        totals = {name: list(self.runtime.zone_counts[name][1:6]) for name in names}
        q = self._q
        for row in range(q[_ROWS_USED]):
            at = _HEADER_WORDS + row * _ROW_WORDS
            owner = q[at + _OWNER]
            if at == self._row or owner == 0 or not _alive(owner):
                continue
            for index, name in enumerate(names):
                first = at + _ZONES + 5 * index
                for cls, value in enumerate(q[first : first + 5].tolist()):
                    totals[name][cls] += value
        return totals


def reset(directory: str) -> None:
    """Forget everything (the master's cold start)."""
    try:
        os.unlink(os.path.join(directory, FILE_NAME))
    except FileNotFoundError:
        pass


def _init_file(fd: int, rows: int) -> None:
    head = os.pread(fd, 2 * _WORD, 0)
    if len(head) == 2 * _WORD:
        if struct.unpack("=qq", head) != (MAGIC, VERSION):
            raise ValueError(f"{os.readlink(f'/proc/self/fd/{fd}')} is not a status file")
        return
    os.ftruncate(fd, (_HEADER_WORDS + rows * _ROW_WORDS) * _WORD)
    os.pwrite(fd, struct.pack("=4q", MAGIC, VERSION, rows, 0), 0)


# --------------------------------------------------------------------------- stub_status


def stub_status_text(figures: dict[str, int]) -> bytes:
    """nginx's page, byte for byte (ngx_http_stub_status_handler, trailing spaces included)."""
    return (
        f"Active connections: {figures['active']} \n"
        "server accepts handled requests\n"
        f" {figures['accepted']} {figures['handled']} {figures['requests']} \n"
        f"Reading: {figures['reading']} Writing: {figures['writing']} Waiting: {figures['waiting']} \n"
    ).encode("ascii")


def stub_status(exchange: Any) -> None:
    """The ``stub_status;`` location's content handler."""
    if exchange.method not in ("GET", "HEAD"):
        exchange.finish_with_page(405)
        return
    status = exchange.runtime.status
    figures = status.totals() if status is not None else dict.fromkeys((*COUNTERS, *GAUGES, "waiting"), 0)
    exchange.respond(200, b"Content-Type: text/plain\r\n", stub_status_text(figures))
