"""python_shared_dict: OpenResty's return conventions, TTLs on an injected clock, LRU eviction,
persistence across reopen, and atomic incr across real processes."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from scriptlb.state import shared_dict as shared_dict_module
from scriptlb.state.shared_dict import MIN_SIZE, SharedDict

ROOT = Path(__file__).resolve().parent.parent


class Clock:
    """A settable wall clock: expiry and LRU promotion read it."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def shared(tmp_path: Path, clock: Clock):
    d = SharedDict(str(tmp_path), "dogs", 1 << 20, clock=clock)
    yield d
    d.close()


# --------------------------------------------------------------------------- get / set / types


@pytest.mark.parametrize(
    "value",
    ["text", "", "ünïcödé", b"\x00\xffbytes", 0, -7, 2**63 - 1, -(2**63), 2**80, 1.5, -0.25, True, False],
)
def test_values_round_trip_with_their_type(shared: SharedDict, value: object) -> None:
    assert shared.set("k", value) == (True, None, False)
    got, flags = shared.get("k")
    assert got == value
    assert type(got) is type(value)
    assert flags is None


def test_get_absent_is_none_none(shared: SharedDict) -> None:
    assert shared.get("nope") == (None, None)


def test_flags_are_returned_when_not_zero(shared: SharedDict) -> None:
    shared.set("k", "v", 0, 42)
    assert shared.get("k") == ("v", 42)
    shared.set("k", "v")
    assert shared.get("k") == ("v", None)


def test_set_none_deletes(shared: SharedDict) -> None:
    shared.set("k", 1)
    assert shared.set("k", None) == (True, None, False)
    assert shared.get("k") == (None, None)


def test_delete(shared: SharedDict) -> None:
    shared.set("k", 1)
    assert shared.delete("k") is None
    assert shared.get("k") == (None, None)
    assert shared.delete("k") is None  # absent: no error


def test_bad_keys_give_openresty_errors(shared: SharedDict) -> None:
    assert shared.get("") == (None, "empty key")
    assert shared.set("", 1) == (False, "empty key", False)
    long_key = "x" * 600
    assert shared.set(long_key, 1) == (False, "key too long", False)
    assert shared.incr(long_key, 1) == (None, "key too long", False)
    assert shared.ttl("") == (None, "empty key")


def test_bytes_and_str_keys_are_the_same_key(shared: SharedDict) -> None:
    shared.set("ключ", 1)
    assert shared.get("ключ".encode()) == (1, None)


def test_unsupported_value_type_raises(shared: SharedDict) -> None:
    with pytest.raises(TypeError):
        shared.set("k", [1, 2])


# --------------------------------------------------------------------------- add / replace / safe


def test_add_only_when_absent(shared: SharedDict) -> None:
    assert shared.add("k", 1) == (True, None, False)
    assert shared.add("k", 2) == (False, "exists", False)
    assert shared.get("k") == (1, None)
    assert shared.safe_add("k", 3) == (False, "exists")


def test_add_over_expired_key(shared: SharedDict, clock: Clock) -> None:
    shared.set("k", 1, 1)
    clock.advance(2)
    assert shared.add("k", 2) == (True, None, False)
    assert shared.get("k") == (2, None)


def test_replace_only_when_live(shared: SharedDict, clock: Clock) -> None:
    assert shared.replace("k", 1) == (False, "not found", False)
    shared.set("k", 1)
    assert shared.replace("k", 2, 1) == (True, None, False)  # the new exptime replaces the old
    assert shared.get("k") == (2, None)
    clock.advance(5)
    assert shared.replace("k", 3) == (False, "not found", False)


def test_safe_set_ok(shared: SharedDict) -> None:
    assert shared.safe_set("k", "v") == (True, None)
    assert shared.get("k") == ("v", None)


# --------------------------------------------------------------------------- incr


def test_incr_conventions(shared: SharedDict) -> None:
    assert shared.incr("n", 1) == (None, "not found", False)
    assert shared.incr("n", 5, 10) == (15, None, False)
    assert shared.incr("n", -3) == (12, None, False)
    assert shared.incr("n", 0.5) == (12.5, None, False)
    assert shared.get("n") == (12.5, None)
    shared.set("s", "text")
    assert shared.incr("s", 1) == (None, "not a number", False)
    assert shared.incr("s", 1, 0) == (None, "not a number", False)


def test_incr_keeps_flags_and_ttl(shared: SharedDict, clock: Clock) -> None:
    shared.set("n", 1, 10, 7)
    clock.advance(4)
    assert shared.incr("n", 1) == (2, None, False)
    assert shared.get("n") == (2, 7)
    assert shared.ttl("n") == (pytest.approx(6), None)


def test_incr_init_ttl_only_applies_when_created(shared: SharedDict, clock: Clock) -> None:
    assert shared.incr("n", 1, 0, 5) == (1, None, False)
    assert shared.ttl("n") == (pytest.approx(5), None)
    clock.advance(3)
    assert shared.incr("n", 1, 0, 100) == (2, None, False)
    assert shared.ttl("n") == (pytest.approx(2), None)
    clock.advance(3)  # expired: init applies again
    assert shared.incr("n", 1) == (None, "not found", False)
    assert shared.incr("n", 1, 10, 100) == (11, None, False)


def test_incr_big_ints_and_bad_arguments(shared: SharedDict) -> None:
    shared.set("n", 2**63 - 1)
    assert shared.incr("n", 1) == (2**63, None, False)
    assert shared.incr("n", -1) == (2**63 - 1, None, False)
    with pytest.raises(TypeError):
        shared.incr("n", "1")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        shared.incr("n", True)
    with pytest.raises(ValueError):
        shared.incr("n", 1, None, 5)


# --------------------------------------------------------------------------- TTLs


def test_ttl_expiry_on_injected_clock(shared: SharedDict, clock: Clock) -> None:
    shared.set("k", "v", 2.5)
    assert shared.ttl("k") == (pytest.approx(2.5), None)
    clock.advance(2.4)
    assert shared.get("k") == ("v", None)
    clock.advance(0.1)
    assert shared.get("k") == (None, None)
    assert shared.ttl("k") == (None, "not found")
    assert shared.get_stale("k") == ("v", None, True)


def test_get_stale_fresh_and_absent(shared: SharedDict) -> None:
    shared.set("k", "v", 100, 3)
    assert shared.get_stale("k") == ("v", 3, False)
    assert shared.get_stale("absent") == (None, None, False)


def test_ttl_zero_means_never(shared: SharedDict, clock: Clock) -> None:
    shared.set("k", 1)
    assert shared.ttl("k") == (0, None)
    clock.advance(10**6)
    assert shared.get("k") == (1, None)
    assert shared.ttl("absent") == (None, "not found")


def test_expire(shared: SharedDict, clock: Clock) -> None:
    assert shared.expire("k", 5) == (False, "not found")
    shared.set("k", 1)
    assert shared.expire("k", 5) == (True, None)
    assert shared.ttl("k") == (pytest.approx(5), None)
    assert shared.expire("k", 0) == (True, None)
    assert shared.ttl("k") == (0, None)
    shared.expire("k", 1)
    clock.advance(2)
    assert shared.expire("k", 5) == (False, "not found")


def test_get_keys_skips_expired_and_honours_max_count(shared: SharedDict, clock: Clock) -> None:
    for i in range(10):
        shared.set(f"k{i}", i, 5 if i % 2 else 0)
    assert sorted(shared.get_keys()) == [f"k{i}" for i in range(10)]
    assert len(shared.get_keys(3)) == 3
    clock.advance(6)
    assert sorted(shared.get_keys(0)) == [f"k{i}" for i in range(0, 10, 2)]


def test_flush_expired_and_flush_all(shared: SharedDict, clock: Clock) -> None:
    for i in range(10):
        shared.set(f"k{i}", i, 5 if i < 6 else 0)
    clock.advance(6)
    assert shared.flush_expired(2) == 2
    assert shared.flush_expired() == 4
    assert shared.flush_expired() == 0
    assert shared.get_stale("k0") == (None, None, False)  # really removed
    assert len(shared.get_keys(0)) == 4
    shared.flush_all()
    assert shared.get_keys(0) == []
    assert shared.get("k9") == (None, None)


# --------------------------------------------------------------------------- capacity and LRU


def test_capacity_and_free_space(tmp_path: Path) -> None:
    d = SharedDict(str(tmp_path), "cap", 1 << 20)
    try:
        assert d.capacity() == 1 << 20
        before = d.free_space()
        assert 0 < before <= 1 << 20
        for i in range(200):
            d.set(f"key{i}", "x" * 200)
        assert d.free_space() < before
    finally:
        d.close()


def test_too_small_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="too small"):
        SharedDict(str(tmp_path), "tiny", 1024)


def fill(d: SharedDict, prefix: str, count: int, size: int = 400) -> None:
    for i in range(count):
        ok, err, _ = d.set(f"{prefix}{i}", "x" * size)
        assert ok, err


def test_set_evicts_least_recently_used_when_full(tmp_path: Path, clock: Clock) -> None:
    d = SharedDict(str(tmp_path), "small", MIN_SIZE, clock=clock)
    try:
        forcible_seen = False
        for i in range(400):  # ~160 KB of values into a 64 KB dict
            clock.advance(0.01)
            ok, err, forcible = d.set(f"k{i}", "x" * 400)
            assert (ok, err) == (True, None)
            forcible_seen = forcible_seen or forcible
        assert forcible_seen
        assert d.get("k0") == (None, None)  # the oldest went first
        assert d.get("k399")[0] == "x" * 400  # the newest stayed
        kept = sorted(int(k[1:]) for k in d.get_keys(0))
        # what survived is a suffix of the insertion order: strictly least recently used first
        assert kept == list(range(kept[0], 400))
    finally:
        d.close()


def test_safe_set_does_not_evict(tmp_path: Path, clock: Clock) -> None:
    d = SharedDict(str(tmp_path), "small", MIN_SIZE, clock=clock)
    try:
        results = [d.safe_set(f"k{i}", "x" * 400) for i in range(400)]
        assert results[0] == (True, None)
        assert results[-1] == (False, "no memory")
        assert d.get("k0")[0] == "x" * 400  # nothing was evicted
        assert d.safe_add("new", "x" * 400) == (False, "no memory")
    finally:
        d.close()


def test_value_larger_than_the_dict_is_no_memory(tmp_path: Path) -> None:
    d = SharedDict(str(tmp_path), "small", MIN_SIZE)
    try:
        d.set("a", 1)
        assert d.set("huge", b"x" * (2 * MIN_SIZE)) == (False, "no memory", False)
        assert d.get("a") == (1, None)  # nothing was evicted for a value that could never fit
    finally:
        d.close()


def test_recent_reads_protect_an_entry_from_eviction(tmp_path: Path, clock: Clock) -> None:
    d = SharedDict(str(tmp_path), "small", MIN_SIZE, clock=clock)
    try:
        fill(d, "old", 40)
        clock.advance(5)  # past the promotion interval: a read now promotes
        assert d.get("old0")[0] is not None  # the oldest entry, read (promotion is noted)
        # ~139 entries fit: 120 more evict about 20 old ones, oldest first, but not the one read
        for i in range(120):
            clock.advance(0.01)
            d.set(f"new{i}", "x" * 400)
        assert d.get("old1") == (None, None)
        assert d.get("old0")[0] == "x" * 400
    finally:
        d.close()


def test_incr_counter_survives_churn(tmp_path: Path, clock: Clock) -> None:
    d = SharedDict(str(tmp_path), "small", MIN_SIZE, clock=clock)
    try:
        d.set("hits", 0)
        for i in range(300):
            clock.advance(0.5)
            d.incr("hits", 1)  # promoted at most once a second, still always recent
            d.set(f"filler{i}", "x" * 400)
        assert d.get("hits") == (300, None)
    finally:
        d.close()


# --------------------------------------------------------------------------- persistence, processes


def test_data_survives_reopen(tmp_path: Path) -> None:
    d = SharedDict(str(tmp_path), "persist", 1 << 20)
    d.set("k", "v", 0, 9)
    d.close()
    again = SharedDict(str(tmp_path), "persist", 1 << 20)
    try:
        assert again.get("k") == ("v", 9)
    finally:
        again.close()


def test_remove_files_gives_an_empty_dict(tmp_path: Path) -> None:
    d = SharedDict(str(tmp_path), "cold", 1 << 20)
    d.set("k", 1)
    d.close()
    shared_dict_module.remove_files(str(tmp_path), "cold")
    again = SharedDict(str(tmp_path), "cold", 1 << 20)
    try:
        assert again.get("k") == (None, None)
    finally:
        again.close()


INCR_SCRIPT = textwrap.dedent(
    """
    import sys
    from scriptlb.state.shared_dict import SharedDict
    d = SharedDict(sys.argv[1], "counters", 1 << 20)
    sys.stdout.write("ready\\n"); sys.stdout.flush()
    sys.stdin.readline()  # start together
    for _ in range(int(sys.argv[2])):
        new, err, _ = d.incr("n", 1, 0)
        assert err is None, err
    """
)


def test_two_processes_incr_leave_exactly_2n(tmp_path: Path) -> None:
    n = 5000
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", INCR_SCRIPT, str(tmp_path), str(n)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline() == "ready\n"
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.close()
        for p in procs:
            assert p.wait(timeout=40) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            for stream in (p.stdin, p.stdout):
                if stream is not None:
                    stream.close()
    d = SharedDict(str(tmp_path), "counters", 1 << 20)
    try:
        assert d.get("n") == (2 * n, None)
    finally:
        d.close()


def test_forked_child_reopens_and_shares(tmp_path: Path) -> None:
    d = SharedDict(str(tmp_path), "forked", 1 << 20)
    try:
        d.set("n", 0)
        pid = os.fork()
        if pid == 0:  # child: uses the object created by the parent
            code = 0
            try:
                for _ in range(500):
                    d.incr("n", 1)
            except BaseException:
                code = 1
            os._exit(code)
        for _ in range(500):
            d.incr("n", 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert d.get("n") == (1000, None)
    finally:
        d.close()


def test_hook_methods_are_the_openresty_api() -> None:
    assert all(callable(getattr(SharedDict, name)) for name in shared_dict_module.HOOK_METHODS)
    assert "close" not in shared_dict_module.HOOK_METHODS


def test_a_read_only_process_still_promotes_what_it_reads(tmp_path: Path, clock: Clock) -> None:
    writer = SharedDict(str(tmp_path), "small", MIN_SIZE, clock=clock)
    try:
        fill(writer, "old", 70)
        clock.advance(5)
        # 64 reads of stale entries fill the pending list, which then flushes in one write txn
        for i in range(shared_dict_module.PENDING_FLUSH):
            assert writer.get(f"old{i}")[0] is not None
        assert not writer._pending
        # 139 entries of 471 charged bytes fit in 64 KiB: 75 more evict exactly 6, which must be
        # the six old entries nobody read
        for i in range(75):
            clock.advance(0.01)
            writer.set(f"new{i}", "x" * 400)
        assert [i for i in range(70) if writer.get(f"old{i}")[0] is None] == list(range(64, 70))
    finally:
        writer.close()


def invariants(d: SharedDict) -> None:
    """The byte budget and the LRU index agree with the entries, and the budget holds."""
    env = d._env
    with env.begin() as txn:
        records = dict(txn.cursor(db=d._data))
        lru_rows = [k for k, _ in txn.cursor(db=d._lru)]
        used_raw = txn.get(b"used", db=d._meta)
    used = int.from_bytes(used_raw, "little", signed=True) if used_raw else 0
    assert used == sum(shared_dict_module._cost(k, raw) for k, raw in records.items())
    assert used <= d.size
    expected_rows = sorted(
        shared_dict_module._LRU_TIME.pack(shared_dict_module._HEAD.unpack_from(raw)[1]) + k
        for k, raw in records.items()
    )
    assert sorted(lru_rows) == expected_rows


def test_random_operations_keep_the_accounting_exact(tmp_path: Path, clock: Clock) -> None:
    rng = random.Random(2024)
    d = SharedDict(str(tmp_path), "fuzz", MIN_SIZE, clock=clock)
    keys = [f"key{i}" for i in range(60)]
    try:
        for step in range(3000):
            clock.advance(rng.choice([0.0, 0.001, 0.3, 1.5]))
            key = rng.choice(keys)
            op = rng.randrange(10)
            value: object = rng.choice(["x" * rng.randrange(0, 900), 7, 2**70, 1.5, True, b"\x00" * 50])
            if op == 0:
                d.set(key, value, rng.choice([0, 0.5, 3]))
            elif op == 1:
                d.safe_set(key, value)
            elif op == 2:
                d.add(key, value, rng.choice([0, 2]))
            elif op == 3:
                d.replace(key, value)
            elif op == 4:
                d.delete(key)
            elif op == 5:
                d.incr(key, rng.choice([1, -2, 0.5, 2**64]), rng.choice([None, 0]))
            elif op == 6:
                d.expire(key, rng.choice([0, 1]))
            elif op == 7:
                d.flush_expired(rng.choice([0, 3]))
            else:
                d.get(key)
            if step % 50 == 0:
                invariants(d)
        invariants(d)
    finally:
        d.close()


CHURN_SCRIPT = textwrap.dedent(
    """
    import random, sys
    from scriptlb.state.shared_dict import SharedDict
    d = SharedDict(sys.argv[1], "churn", 64 * 1024)
    rng = random.Random(int(sys.argv[2]))
    sys.stdout.write("ready\\n"); sys.stdout.flush()
    sys.stdin.readline()
    for i in range(3000):
        key = "k%d" % rng.randrange(300)
        if rng.random() < 0.7:
            d.set(key, "x" * rng.randrange(600))
        else:
            d.incr("n" + key, 1, 0)
    """
)


def test_two_processes_evicting_keep_the_budget_consistent(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHURN_SCRIPT, str(tmp_path), str(seed)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        for seed in (1, 2)
    ]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline() == "ready\n"
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.close()
        for p in procs:
            assert p.wait(timeout=40) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            for stream in (p.stdin, p.stdout):
                if stream is not None:
                    stream.close()
    d = SharedDict(str(tmp_path), "churn", 64 * 1024)
    try:
        invariants(d)
        assert d.free_space() < 64 * 1024 // 4  # it really was filled, so eviction ran
    finally:
        d.close()


def test_negative_exptime_is_an_error(shared: SharedDict) -> None:
    with pytest.raises(ValueError, match="exptime"):
        shared.set("k", 1, -1)
    with pytest.raises(ValueError, match="exptime"):
        shared.expire("k", -1)
    with pytest.raises(ValueError, match="init_ttl"):
        shared.incr("k", 1, 0, -1)


def lru_order(d: SharedDict) -> list[str]:
    with d._env.begin() as txn:
        return [k[8:].decode() for k, _ in txn.cursor(db=d._lru)]


def test_overwrites_promote_at_most_once_a_second(shared: SharedDict, clock: Clock) -> None:
    shared.set("a", "1")
    clock.advance(0.1)
    shared.set("b", "1")
    clock.advance(0.4)
    shared.set("a", "2")  # promoted 0.5 s ago: keeps its place
    shared.incr("n", 1, 0)
    assert lru_order(shared) == ["a", "b", "n"]
    clock.advance(1.0)
    shared.set("a", "3")  # now it moves to the head
    assert lru_order(shared) == ["b", "n", "a"]
    assert shared.get("a") == ("3", None)


GROW_SCRIPT = textwrap.dedent(
    """
    import sys
    from scriptlb.state.shared_dict import SharedDict
    d = SharedDict(sys.argv[1], "grown", int(sys.argv[2]))
    for i in range(int(sys.argv[3])):
        ok, err, _ = d.set("big%d" % i, b"x" * 4000)
        assert ok, err
    """
)


def test_a_dict_grown_by_another_process_stays_usable(tmp_path: Path) -> None:
    """A reload may reopen a dict with a larger size while old workers still use it: their
    handle must adopt the larger map (LMDB's MDB_MAP_RESIZED) instead of failing."""
    small = MIN_SIZE  # this process maps 4 * 64 KiB + 1 MiB
    d = SharedDict(str(tmp_path), "grown", small)
    try:
        d.set("mine", 1)
        big = 16 << 20
        subprocess.run(
            [sys.executable, "-c", GROW_SCRIPT, str(tmp_path), str(big), "1000"],  # ~4 MB of data
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
            check=True,
            timeout=40,
        )
        assert d.get("big999") == (b"x" * 4000, None)
        assert d.get_stale("big0")[0] == b"x" * 4000
        assert d.ttl("big1") == (0, None)
        assert len(d.get_keys(0)) == 1001
        assert d.incr("mine", 1) == (2, None, False)  # a write: our small budget evicts to fit
        assert d.free_space() >= 0
    finally:
        d.close()
