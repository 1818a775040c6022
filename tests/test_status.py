"""scriptlb.ops.status: the instance counters' rows (claim, adopt a dead worker's, sum)."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

from scriptlb.ops.status import WorkerStatus, stub_status_text


class FakeConnection:
    """What WorkerStatus.gauges reads of a ClientConnection."""

    def __init__(self, active: object = None, reading: bool = False) -> None:
        self.active = active
        self.reading_head = reading


def fake_connection(active: object = None, reading: bool = False) -> FakeConnection:
    return FakeConnection(active, reading)


def test_a_dead_workers_counters_stay_and_its_connections_go(tmp_path: Path) -> None:
    pid = os.fork()
    if pid == 0:  # a worker that counted, published and died without closing its row
        try:
            child = WorkerStatus(str(tmp_path))
            child.runtime = SimpleNamespace(requests=7, zone_counts={})
            child.accepted = 3
            child.connection_sets = [{fake_connection(active=object()), fake_connection()}]
            child.publish()
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    status = WorkerStatus(str(tmp_path))
    status.runtime = SimpleNamespace(requests=2, zone_counts={})
    status.accepted = 1
    status.connection_sets = [{fake_connection(reading=True)}]
    totals = status.totals()
    # the dead worker's row was adopted (the first free one): its history is this row's base
    assert (totals["accepted"], totals["handled"], totals["requests"]) == (4, 4, 9)
    assert (totals["active"], totals["reading"], totals["writing"], totals["waiting"]) == (1, 1, 0, 0)
    status.close()


def test_two_live_rows_add_up(tmp_path: Path) -> None:
    first, second = WorkerStatus(str(tmp_path)), WorkerStatus(str(tmp_path))
    # same process: the second claims the same row (its owner is this pid), as a re-open does
    assert first._row == second._row
    first.runtime = SimpleNamespace(requests=5, zone_counts={"z": [0, 0, 4, 0, 1, 0, 0, 0, 0, 0]})
    first.publish()
    assert first.zone_totals() == {"z": [0, 4, 0, 1, 0]}
    first.close()
    second.close()


def test_handled_is_accepted_minus_dropped(tmp_path: Path) -> None:
    status = WorkerStatus(str(tmp_path))
    status.accepted = 5
    status.contexts = [SimpleNamespace(dropped=2), SimpleNamespace(dropped=1)]  # two listeners
    status.publish()
    totals = status.totals()
    assert (totals["accepted"], totals["handled"]) == (5, 2)
    status.close()


def test_stub_status_text_is_nginx_s() -> None:
    figures = {"active": 291, "accepted": 16630948, "handled": 16630948, "requests": 31070465,
               "reading": 6, "writing": 179, "waiting": 106}
    assert stub_status_text(figures) == (
        b"Active connections: 291 \nserver accepts handled requests\n 16630948 16630948 31070465 \n"
        b"Reading: 6 Writing: 179 Waiting: 106 \n"
    )
