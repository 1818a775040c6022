"""scriptlb.state.stats: shared per-peer statistics.

Averages are checked against the formula with an injected clock; cross-process behaviour with
real processes (``subprocess`` running the recorder, and ``os.fork``) sharing one file.
"""

from __future__ import annotations

import asyncio
import bisect
import math
import os
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from scriptlb.config import load
from scriptlb.state.peers import PeerSet
from scriptlb.state.stats import (
    DECAY_TIME,
    FLUSH_INTERVAL,
    TIME_BUCKETS,
    PeerKey,
    PeerStats,
    Recorder,
    StatsFull,
    UpstreamLayout,
    UpstreamStats,
    decayed,
    layout_of,
    shards_for,
)

T0 = 1_800_000_000.0  # an injected wall clock


def layout(
    upstream: str = "u", names: tuple[str, ...] = ("a:1", "b:1"), weights: tuple[int, ...] = ()
) -> tuple[UpstreamLayout, ...]:
    keys = tuple(PeerKey(upstream, name) for name in names)
    return (UpstreamLayout(upstream, keys, (), (weights or (1,) * len(names), ())),)


@pytest.fixture
def stats(tmp_path: Path):
    opened = PeerStats.open(str(tmp_path), layout())
    yield opened
    opened.close()


# --------------------------------------------------------------------------- one process


def test_a_new_peer_reads_empty(stats: PeerStats) -> None:
    assert stats.snapshot("u", False, 0) == {
        "requests": 0,
        "failures": 0,
        "active": 0,
        "last_status": None,
        "last_failure_time": None,
        "ewma": None,
        "peak_ewma": None,
        "ewma_time": None,
        "weight_override": None,
    }


def test_counters_status_and_failure_time(stats: PeerStats) -> None:
    a = stats.slot("u", False, 0)
    for _ in range(3):
        stats.record_start(a)
    assert stats.read(a)["active"] == 3
    stats.record_finish(a, 200, 0.1, False, T0)
    stats.record_finish(a, 502, None, True, T0 + 1)
    snap = stats.read(a)
    assert (snap["requests"], snap["failures"], snap["active"]) == (3, 1, 1)
    assert (snap["last_status"], snap["last_failure_time"]) == (502, T0 + 1)
    stats.record_finish(a, 0, None, True, T0 + 2)  # no response at all: status 0
    assert stats.read(a)["last_status"] is None and stats.read(a)["last_failure_time"] == T0 + 2
    assert stats.read(stats.slot("u", False, 1))["requests"] == 0  # records do not overlap


def test_ewma_and_peak_follow_the_formula(stats: PeerStats) -> None:
    a = stats.slot("u", False, 0)
    samples = [(T0, 0.100), (T0 + 1, 0.300), (T0 + 4, 0.050), (T0 + 4, 0.070), (T0 + 30, 0.010)]
    ewma = peak = None
    stamp = 0.0
    for now, rtt in samples:
        stats.record_start(a)
        stats.record_finish(a, 200, rtt, False, now)
        if ewma is None or peak is None:
            ewma = peak = rtt
        else:
            w = math.exp(-(now - stamp) / DECAY_TIME)
            ewma = ewma * w + rtt * (1 - w)
            peak = rtt if rtt > peak else peak * w + rtt * (1 - w)
        stamp = now
        snap = stats.read(a)
        assert snap["ewma"] == pytest.approx(ewma, rel=1e-12)
        assert snap["peak_ewma"] == pytest.approx(peak, rel=1e-12)
        assert snap["ewma_time"] == now
    # spot values: the 0.3 s sample after 1 s moves the plain average by 1 - e^-0.1 of the gap
    # and replaces the peak at once
    snap = stats.read(a)
    assert snap["ewma"] < snap["peak_ewma"]


def test_second_sample_numbers(stats: PeerStats) -> None:
    a = stats.slot("u", False, 0)
    stats.record_finish(a, 200, 0.1, False, T0)
    stats.record_finish(a, 200, 0.3, False, T0 + DECAY_TIME)  # one decay time: w = 1/e
    snap = stats.read(a)
    assert snap["ewma"] == pytest.approx(0.1 / math.e + 0.3 * (1 - 1 / math.e))
    assert snap["peak_ewma"] == 0.3
    stats.record_finish(a, 200, 0.1, False, T0 + DECAY_TIME)  # same instant: w = 1, no change
    assert stats.read(a)["ewma"] == pytest.approx(snap["ewma"])
    stats.record_finish(a, 200, 0.1, False, T0)  # a clock step back counts as no time
    assert stats.read(a)["ewma"] == pytest.approx(snap["ewma"])


def test_decayed_score_as_apisix() -> None:
    assert decayed(None, None, T0) == 0.0
    assert decayed(0.2, T0, T0 + DECAY_TIME) == pytest.approx(0.2 / math.e)
    assert decayed(0.2, T0, T0 - 5) == 0.2


def test_unknown_peer_is_a_key_error(stats: PeerStats) -> None:
    with pytest.raises(KeyError):
        stats.slot("u", True, 0)


# --------------------------------------------------------------------------- layout


def test_layout_matches_peer_set_order(tmp_path: Path) -> None:
    (tmp_path / "x.conf").write_text(
        "events {}\nhttp {\n upstream u {\n  server 127.0.0.1:2 backup; server 127.0.0.1:1 weight=3;\n"
        "  server 127.0.0.1:1; server 127.0.0.1:3 down;\n }\n"
        " server { listen 127.0.0.1:8080; location / { proxy_pass http://u; }\n"
        "  location /i { proxy_pass http://127.0.0.1:9; } }\n}\n"
    )
    conf = load("x.conf", str(tmp_path))
    assert conf.http is not None
    layouts = {lay.name: lay for lay in layout_of(conf.http)}
    u = layouts["u"]
    peers = PeerSet.from_conf(conf.http.upstreams["u"])
    assert [k.name for k in u.primary] == [p.name for p in peers.primary]
    assert [k.name for k in u.backup] == [p.name for p in peers.backup]
    assert [k.occurrence for k in u.primary] == [0, 1, 0]  # the same address twice: two peers
    assert u.weights == ((3, 1, 1), (1,))
    assert [k.name for k in layouts["127.0.0.1:9"].primary] == ["127.0.0.1:9"]  # implicit upstream
    opened = PeerStats.open(str(tmp_path / "stats"), layout_of(conf.http))
    primary, backup = opened.slots("u")
    assert primary == [opened.slot("u", False, i) for i in range(3)] and backup == [opened.slot("u", True, 0)]
    assert len({*primary, *backup}) == 4
    # a hook-chosen address counts against the first peer with that name, backup last
    assert opened.slot_for_address("u", "127.0.0.1:1") == primary[0]
    assert opened.slot_for_address("u", "127.0.0.1:2") == backup[0]
    assert opened.slot_for_address("u", "127.0.0.1:9") is None
    assert opened.slot_for_address("127.0.0.1:9", "127.0.0.1:9") == opened.slots("127.0.0.1:9")[0][0]
    opened.close()


def test_reload_keeps_the_figures_of_kept_peers(tmp_path: Path) -> None:
    old = PeerStats.open(str(tmp_path), layout(names=("a:1", "b:1")))
    for peer_id, count in ((0, 2), (1, 5)):
        for _ in range(count):
            old.record_start(old.slot("u", False, peer_id))
            old.record_finish(old.slot("u", False, peer_id), 200, 0.2, False, T0)
    # the new generation: a is gone, b moved to id 0, c is new (the old process is still open)
    new = PeerStats.open(str(tmp_path), layout(names=("b:1", "c:1")))
    assert new.snapshot("u", False, 0)["requests"] == 5 and new.snapshot("u", False, 0)["ewma"] == 0.2
    assert new.snapshot("u", False, 1)["requests"] == 0
    new.record_start(new.slot("u", False, 0))
    assert old.snapshot("u", False, 1)["requests"] == 6  # both generations see one record
    old.close()
    new.close()
    assert PeerStats.open(str(tmp_path), layout(names=("a:1",))).snapshot("u", False, 0)["requests"] == 2
    PeerStats.reset(str(tmp_path))
    fresh = PeerStats.open(str(tmp_path), layout(names=("a:1",)))
    assert fresh.snapshot("u", False, 0)["requests"] == 0
    fresh.close()


# --------------------------------------------------------------------------- weights


@dataclass
class FakePeer:
    weight: int
    effective_weight: int


def test_weight_override_is_seen_through_the_generation(stats: PeerStats) -> None:
    peers = [FakePeer(1, 1), FakePeer(1, 1)]
    slots = [stats.slot("u", False, 0), stats.slot("u", False, 1)]
    seen = stats.sync_weights(peers, slots)
    assert stats.weight_generation == seen
    stats.set_weight(slots[1], 7)
    assert stats.weight_generation != seen
    seen = stats.sync_weights(peers, slots)
    assert peers == [FakePeer(1, 1), FakePeer(7, 7)]
    assert stats.read(slots[1])["weight_override"] == 7 and stats.weight_generation == seen
    with pytest.raises(ValueError):
        stats.set_weight(slots[0], 0)


def test_a_reload_that_changes_the_configured_weight_drops_the_override(tmp_path: Path) -> None:
    first = PeerStats.open(str(tmp_path), layout(weights=(1, 1)))
    first.set_weight(first.slot("u", False, 0), 9)
    first.set_weight(first.slot("u", False, 1), 9)
    first.close()
    second = PeerStats.open(str(tmp_path), layout(weights=(1, 4)))  # b's weight edited
    peers = [FakePeer(1, 1), FakePeer(4, 4)]
    second.sync_weights(peers, [second.slot("u", False, 0), second.slot("u", False, 1)])
    assert peers == [FakePeer(9, 9), FakePeer(4, 4)]
    second.close()


def test_upstream_stats_binds_real_peers(tmp_path: Path) -> None:
    (tmp_path / "x.conf").write_text(
        "events {}\nhttp {\n upstream u { server 127.0.0.1:1 weight=2; server 127.0.0.1:2;"
        " server 127.0.0.1:3 backup; }\n}\n"
    )
    conf = load("x.conf", str(tmp_path))
    assert conf.http is not None
    stats = PeerStats.open(str(tmp_path / "s"), layout_of(conf.http))
    peers = PeerSet.from_conf(conf.http.upstreams["u"])
    bound = UpstreamStats(Recorder(stats, loop=None), "u")
    assert [bound.slot_of(p) for p in (*peers.primary, *peers.backup)] == [
        stats.slot("u", False, 0),
        stats.slot("u", False, 1),
        stats.slot("u", True, 0),
    ]
    assert bound.refresh_weights(peers.primary, peers.backup)  # first call syncs
    assert not bound.refresh_weights(peers.primary, peers.backup)
    stats.set_weight(bound.slot_of(peers.backup[0]), 6)
    assert bound.refresh_weights(peers.primary, peers.backup)
    assert [(p.weight, p.effective_weight) for p in (*peers.primary, *peers.backup)] == [
        (2, 2),
        (1, 1),
        (6, 6),
    ]
    stats.close()


# --------------------------------------------------------------------------- the recorder


def _recorder(tmp_path: Path) -> tuple[PeerStats, Recorder, list[int], asyncio.AbstractEventLoop]:
    (tmp_path / "x.conf").write_text(
        "events {}\nhttp {\n upstream u { server 127.0.0.1:1; server 127.0.0.1:2; }\n}\n")
    conf = load("x.conf", str(tmp_path))
    assert conf.http is not None
    stats = PeerStats.open(str(tmp_path / "s"), layout_of(conf.http))
    loop = asyncio.new_event_loop()
    recorder = Recorder(stats, loop)
    return stats, recorder, [recorder.index_of(stats.slot("u", False, i)) for i in range(2)], loop


def test_the_recorder_publishes_a_batch_within_the_flush_interval(tmp_path: Path) -> None:
    stats, recorder, (a, b), loop = _recorder(tmp_path)
    slot = stats.slot("u", False, 0)
    recorder.start(a)
    recorder.finish(a, 200, 0.010, False)
    recorder.start(a)  # still in flight
    recorder.start(b)
    recorder.finish(b, 0, None, True)
    assert stats.read(slot)["requests"] == 0  # not published yet
    # this worker's own reads include what it has not published
    own = recorder.unpublished(a, stats.figures(slot))
    assert own[:4] == (2, 0, 1, 200)
    loop.run_until_complete(asyncio.sleep(FLUSH_INTERVAL * 2))  # the armed flush runs
    seen = stats.read(slot)
    assert (seen["requests"], seen["failures"], seen["active"], seen["last_status"]) == (2, 0, 1, 200)
    assert seen["ewma"] == seen["peak_ewma"] == 0.010
    other = stats.read(stats.slot("u", False, 1))
    assert (other["requests"], other["failures"], other["last_status"], other["ewma"]) == (1, 1, None, None)
    assert other["last_failure_time"] is not None
    assert recorder.unpublished(a, stats.figures(slot)) == stats.figures(slot)  # nothing pending
    recorder.finish(a, 200, None, False)  # a try that outlived the flush its start armed
    loop.run_until_complete(asyncio.sleep(FLUSH_INTERVAL * 2))  # its end arms another
    assert stats.read(slot)["active"] == 0
    loop.close()
    stats.close()


def test_a_try_not_published_yet_is_a_selection_for_its_worker(tmp_path: Path) -> None:
    """The worker's own view (the API's ``selected``) counts a try it has not published, as
    its requests and responses do: a peer with requests and no "selected" was one batch late."""
    stats, recorder, (a, _), loop = _recorder(tmp_path)
    slot = stats.slot("u", False, 0)
    assert recorder.unpublished_selected(a, stats.selected(slot)) is None  # never chosen
    before = time.time()
    recorder.start(a)
    assert stats.selected(slot) is None  # not published yet
    unpublished = recorder.unpublished_selected(a, stats.selected(slot))
    assert unpublished is not None and unpublished >= before
    loop.run_until_complete(asyncio.sleep(FLUSH_INTERVAL * 2))  # the armed flush runs
    published = stats.selected(slot)
    assert published is not None and published >= before
    assert recorder.unpublished_selected(a, published) == published  # nothing pending
    loop.close()
    stats.close()


class NoFlushLoop:
    """Enough of a loop (and of its timer handle) for a Recorder whose flushes the test makes."""

    def call_later(self, delay: float, callback: object) -> NoFlushLoop:
        return self

    def cancel(self) -> None:
        pass


def test_a_batch_of_ended_tries_tallies_as_the_tries_one_by_one(tmp_path: Path) -> None:
    """The recorder folds a peer's ended tries in a batch (transposed, summed, sorted into
    buckets): the published figures equal those of a recorder made to tally after every try,
    samples on the bucket edges, unmeasured ones and a mix of statuses included."""
    (tmp_path / "x.conf").write_text(
        "events {}\nhttp {\n upstream u { server 127.0.0.1:1; server 127.0.0.1:2; }\n}\n")
    conf = load("x.conf", str(tmp_path))
    assert conf.http is not None
    samples = [0.005, 0.0051, None, 0.0, 0.01, 2.4, 10.0, 10.5, 0.3, None, 0.005, 0.049]
    statuses = [200, 200, 0, 404, 200, 502, 200, 200, 999, 0, 101, 200]
    published = []
    for one_by_one in (True, False):
        stats = PeerStats.open(str(tmp_path / f"s{one_by_one}"), layout_of(conf.http))
        recorder = Recorder(stats, NoFlushLoop(), clock=lambda: T0)
        a = recorder.index_of(stats.slot("u", False, 0))
        slot = stats.slot("u", False, 0)
        for i, (status, sample) in enumerate(zip(statuses, samples, strict=True)):
            recorder.start(a)
            header = None if sample is None else sample / 2
            recorder.finish(a, status, sample, status == 0, 10 * i, 7 * i, header)
            if one_by_one:
                recorder.unpublished(a, stats.figures(slot))  # a reader: tallies the one try
        recorder.flush()
        published.append((stats.figures(slot), stats.histogram(slot), stats.codes(slot),
                          stats.classes(slot), stats.traffic(slot), stats.averages(slot)))
        stats.close()
    assert published[0] == published[1]
    figures, (buckets, total), codes, _, traffic, _ = published[1]
    measured = [s for s in samples if s is not None]
    expected = [0] * len(buckets)
    for sample in measured:
        expected[bisect.bisect_left(TIME_BUCKETS, sample)] += 1
    assert buckets == expected and total == sum(measured)
    assert codes == {200: 6, 404: 1, 502: 1, 101: 1}  # 0 and 999: not kept
    assert figures[:4] == (12, 2, 0, 200)
    assert traffic[:4] == [10 * 66, 7 * 66, 0, len(measured)]


def test_codes_bytes_unavail_and_header_times_add_up_over_batches(tmp_path: Path) -> None:
    stats, recorder, (a, _), loop = _recorder(tmp_path)
    slot = stats.slot("u", False, 0)
    for status, header in ((200, 0.002), (404, 0.004), (200, None), (0, None), (999, 0.006)):
        recorder.start(a)
        recorder.finish(a, status, None, status == 0, 100, 40 if status else 0, header)
        if status == 0:
            recorder.became_unavailable(a)
        if status == 404:
            recorder.flush()  # two batches: the shared words add up
    assert recorder.unpublished_codes(a, stats.codes(slot)) == {200: 2, 404: 1}  # 999: not kept
    recorder.flush()
    assert stats.codes(slot) == {200: 2, 404: 1}
    sent, received, unavail, samples, total = stats.traffic(slot)
    assert (sent, received, unavail, samples) == (500, 160, 1, 3)
    assert abs(total - 0.012) < 1e-9
    assert stats.classes(slot) == [0, 2, 0, 1, 0]
    loop.close()
    stats.close()


def test_a_batch_moves_the_averages_as_its_samples_one_by_one_would(tmp_path: Path) -> None:
    stats, _, _, loop = _recorder(tmp_path)
    one_by_one, batched = stats.slot("u", False, 0), stats.slot("u", False, 1)
    for target in (one_by_one, batched):
        stats.record_finish(target, 200, 0.100, False, 1000.0)  # both start at 100 ms
    samples = [0.010, 0.012, 0.011, 0.013, 0.009]
    for i, sample in enumerate(samples):  # five samples 10 ms apart
        stats.record_finish(one_by_one, 200, sample, False, 1000.01 + i * 0.01)
    stats.publish(batched, 0, 5, 0, 200, 0.0, 5, sum(samples), max(samples), 1000.05)
    exact, batch = stats.read(one_by_one), stats.read(batched)
    assert batch["ewma"] == pytest.approx(exact["ewma"], rel=0.01)  # within 1% after 50 ms
    assert batch["peak_ewma"] == pytest.approx(exact["peak_ewma"], rel=0.01)
    loop.close()
    stats.close()


# --------------------------------------------------------------------------- processes

RECORDER = textwrap.dedent(
    """
    import sys
    from scriptlb.state.stats import PeerKey, PeerStats, UpstreamLayout
    directory, count, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    lay = (UpstreamLayout("u", (PeerKey("u", "a:1"), PeerKey("u", "b:1")), (), ((1, 1), ())),)
    stats = PeerStats.open(directory, lay)
    a = stats.slot("u", False, 0)
    print("ready", flush=True)
    sys.stdin.readline()  # start together
    for i in range(count):
        stats.record_start(a)
        if mode == "finish":
            stats.record_finish(a, 200 if i % 4 else 502, 0.01, i % 4 == 0, 1.8e9 + i)
    if mode == "set_weight":
        stats.set_weight(stats.slot("u", False, 1), 5)
    print("done", flush=True)
    if mode == "finish":
        stats.close()
    """
)


def start_recorders(
    directory: Path, count: int, mode: str, processes: int = 2
) -> list[subprocess.Popen[str]]:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RECORDER, str(directory), str(count), mode],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(processes)
    ]
    for proc in procs:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    return procs


def finish(procs: list[subprocess.Popen[str]]) -> None:
    for proc in procs:
        out, _ = proc.communicate(timeout=30)
        assert out == "done\n" and proc.returncode == 0


@pytest.mark.integration  # real processes
def test_two_processes_leave_exact_totals(tmp_path: Path) -> None:
    count = 50_000
    finish(start_recorders(tmp_path, count, "finish"))
    reader = PeerStats.open(str(tmp_path), layout())
    snap = reader.snapshot("u", False, 0)
    assert (snap["requests"], snap["failures"], snap["active"]) == (2 * count, 2 * count // 4, 0)
    assert snap["last_status"] in (200, 502) and snap["ewma"] == pytest.approx(0.01)
    reader.close()


@pytest.mark.integration  # real processes
def test_a_dead_process_keeps_its_history_and_loses_its_active_tries(tmp_path: Path) -> None:
    watcher = PeerStats.open(str(tmp_path), layout())
    a = watcher.slot("u", False, 0)
    finish(start_recorders(tmp_path, 3, "start-only", processes=1))  # exits mid-try, never closes
    assert (watcher.read(a)["requests"], watcher.read(a)["active"]) == (3, 3)
    # the next process takes the first shard not owned by a live one: the dead process's
    finish(start_recorders(tmp_path, 2, "finish", processes=1))
    assert (watcher.read(a)["requests"], watcher.read(a)["active"]) == (5, 0)
    watcher.close()


@pytest.mark.integration  # real processes
def test_a_weight_set_in_another_process_reaches_this_one(stats: PeerStats, tmp_path: Path) -> None:
    seen = stats.weight_generation
    finish(start_recorders(tmp_path, 0, "set_weight", processes=1))
    assert stats.weight_generation != seen
    assert stats.snapshot("u", False, 1)["weight_override"] == 5


@pytest.mark.integration  # real processes
def test_no_free_shard(tmp_path: Path) -> None:
    first = PeerStats.open(str(tmp_path), layout(), shards=1)
    again = PeerStats.open(str(tmp_path), layout())  # the same process: the shard it has
    again.record_start(again.slot("u", False, 0))
    assert first.snapshot("u", False, 0)["active"] == 1
    again.close()
    proc = subprocess.run(
        [sys.executable, "-c", RECORDER, str(tmp_path), "0", "finish"],
        input="go\n",
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 1 and "StatsFull: all 1 statistics shards" in proc.stderr
    first.close()


@pytest.mark.integration  # real processes
def test_a_forked_child_records_in_its_own_shard(stats: PeerStats) -> None:
    a = stats.slot("u", False, 0)
    stats.record_start(a)
    pid = os.fork()
    if pid == 0:  # the child: the parent's object, a shard of its own
        code = 0
        try:
            for _ in range(1000):
                stats.record_start(a)
                stats.record_finish(a, 200, None, False, T0)
            stats.close()
        except BaseException:
            code = 1
        os._exit(code)
    assert wait_child(pid) == 0
    snap = stats.read(a)
    assert (snap["requests"], snap["active"]) == (1001, 1)  # the parent's try is still open


def wait_child(pid: int) -> int:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail("child did not finish")


@pytest.mark.integration  # real processes
def test_a_forked_child_without_a_free_shard_records_privately(tmp_path: Path) -> None:
    only = PeerStats.open(str(tmp_path), layout(), shards=1)
    a = only.slot("u", False, 0)
    pid = os.fork()
    if pid == 0:  # no shard left: the child must not write into its parent's
        code = 0
        try:
            only.record_start(a)
            code = 0 if only.read(a)["requests"] == 1 else 2
        except BaseException:
            code = 1
        os._exit(code)
    assert wait_child(pid) == 0
    assert only.read(a)["requests"] == 0
    only.close()


def test_open_refuses_a_foreign_file(tmp_path: Path) -> None:
    (tmp_path / "peer_stats").write_bytes(b"x" * 64)
    with pytest.raises(ValueError, match="is not a peer statistics file"):
        PeerStats.open(str(tmp_path), layout())


def test_stats_full_is_a_runtime_error() -> None:
    assert issubclass(StatsFull, RuntimeError)


def test_shards_leave_room_for_overlapping_generations() -> None:
    assert (shards_for(1), shards_for(8), shards_for(64)) == (32, 32, 256)


def test_shared_passive_health_disables_once_and_forgives_after_the_window(tmp_path: Path) -> None:
    """A zone upstream's passive state: failures from any process add up, the one that
    reaches max_fails disables the peer (once per spell), a success forgives them only once
    fail_timeout has passed since the last failure."""
    first = PeerStats.open(str(tmp_path), layout())
    second = PeerStats.open(str(tmp_path), layout())  # another worker's view of the same file
    slot = first.slot("u", False, 0)
    try:
        assert first.passive_failure(slot, 3, 10.0, 100.0) == (False, 1)
        assert second.passive_failure(slot, 3, 10.0, 101.0) == (False, 2)
        assert first.passive_failure(slot, 3, 10.0, 102.0) == (True, 3)  # disabled: count it
        assert second.passive_failure(slot, 3, 10.0, 103.0) == (False, 4)  # already disabled
        second.passive_success(slot, 10.0, 104.0)  # within the window: kept
        assert first.passive(slot) == (4, 103.0)
        first.passive_success(slot, 10.0, 113.5)  # 10.5 s after the last failure: forgiven
        assert second.passive(slot) == (0, 103.0)
        assert second.passive_failure(slot, 3, 10.0, 114.0) == (False, 1)
        assert first.passive(first.slot("u", False, 1)) == (0, 0.0)  # the other peer untouched
    finally:
        first.close()
        second.close()
