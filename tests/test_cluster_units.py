"""The cluster features without servers: their directives, and the synced zone's bookkeeping
(what a hook's writes note for the sync process, how the cluster's state is applied)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from test_config_directives import error, http

from scriptlb.config.model import DictSyncConf, DiscoveryConf, ResolverConf
from scriptlb.ops import cluster
from scriptlb.state.shared_dict import ClusterState, SharedDict, SyncedSharedDict

# --------------------------------------------------------------------------- directives


def test_shared_dict_sync_parameters(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("secret\n")
    conf = http(tmp_path, "python_shared_dict a 1m sync=rediss://r.example:6380/2 sync_interval=20ms "
                          "sync_prefix=blue: sync_password_file=pw;\npython_shared_dict b 1m;")
    assert conf.http is not None
    assert conf.http.shared_dicts["a"].sync == DictSyncConf("rediss://r.example:6380/2", 0.02, "blue:",
                                                            str(tmp_path / "pw"))
    assert conf.http.shared_dicts["b"].sync is None
    default = http(tmp_path, "python_shared_dict a 1m sync=redis://127.0.0.1:6379/0;").http
    assert default is not None and default.shared_dicts["a"].sync == DictSyncConf(
        "redis://127.0.0.1:6379/0", 0.05, "scriptlb:a:")
    assert cluster.needed(load_main(tmp_path, "python_shared_dict a 1m sync=redis://h:1/0;"))
    assert not cluster.needed(load_main(tmp_path, "python_shared_dict a 1m;"))


def load_main(tmp_path: Path, body: str):
    return http(tmp_path, body)


DICT = "python_shared_dict a 1m "
UPSTREAM = "upstream u { zone u; "


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (DICT + "sync=http://h/0;", 'invalid sync URL "http://h/0" (redis://HOST:PORT/DB or rediss://...)'),
        (DICT + "sync_interval=1s;", '"sync_*" parameters need "sync=" in python_shared_dict "a"'),
        (DICT + "sync=redis://h:1/0 sync_interval=0;", 'invalid sync_interval "0"'),
        (DICT + "sync=redis://h:1/0 color=red;", 'invalid parameter "color=red"'),
        (DICT + "sync=redis://h:1/0 sync=redis://h:2/0;", 'invalid parameter "sync=redis://h:2/0"'),
        (UPSTREAM + "discovery prefix=/x/; }", '"discovery" needs "etcd=" and "prefix="'),
        (UPSTREAM + "discovery etcd=https://e:1 prefix=/x/; }", 'invalid etcd URL "https://e:1" (http://HOST:PORT)'),
        (UPSTREAM + "discovery etcd=http://e:1 prefix=/x/ ttl=1; }", 'invalid parameter "ttl=1"'),
        ("resolver dns.example;", 'invalid resolver address "dns.example" (an IP address is needed)'),
        ("resolver 127.0.0.1:0;", 'invalid port in resolver "127.0.0.1:0"'),
        ("resolver 127.0.0.1 valid=1x;", 'invalid parameter "valid=1x"'),
        ("resolver 127.0.0.1 ipv4=off ipv6=off;", '"ipv4" and "ipv6" cannot both be "off"'),
        ("upstream u { server a.test service=http; }",
         'service parameter requires "resolve" in upstream "a.test"'),
        (UPSTREAM + "server a.test:80 service=http resolve; }",
         'service upstream "a.test:80" may not have port'),
    ],
)
def test_cluster_directive_errors(tmp_path: Path, body: str, message: str) -> None:
    assert error(tmp_path, f"http {{\n{body}\n}}\n") == f"[emerg] {message} in x.conf:2"


def test_run_time_membership_needs_zone_and_resolver(tmp_path: Path) -> None:
    assert "requires upstream \"u\" to be in shared memory" in error(
        tmp_path, "http {\nresolver 127.0.0.1;\nupstream u { server a.test resolve; }\n}\n")
    assert error(tmp_path, "http {\nupstream u { zone u; server a.test resolve; }\n}\n") == (
        "[emerg] no resolver defined to resolve a.test in x.conf:2")
    etcd_only = "http {\nupstream u { discovery etcd=http://e:1 prefix=/x/; }\n}\n"
    assert "requires upstream" in error(tmp_path, etcd_only)


def test_resolver_inherited_and_membership_upstreams(tmp_path: Path) -> None:
    conf = http(tmp_path, "\n".join([
        "resolver 127.0.0.1:5353 [::1] valid=5s ipv6=off; resolver_timeout 2s;",
        "upstream d { zone d; server app.test:8080 resolve weight=3; server 127.0.0.1:9 backup; }",
        "upstream e { zone e; discovery etcd=http://127.0.0.1:2379 prefix=/s/e/ timeout=500ms; }",
        "upstream s { server 127.0.0.1:9; }"]))
    http_conf = conf.http
    assert http_conf is not None
    d, e, s = http_conf.upstreams["d"], http_conf.upstreams["e"], http_conf.upstreams["s"]
    assert d.resolver == ResolverConf((("127.0.0.1", 5353), ("::1", 53)), 5.0, True, False, 2.0)
    assert [(x.name, x.resolve, x.addrs == (), x.weight) for x in d.servers[:2]] == [
        ("app.test:8080", True, True, 3), ("127.0.0.1:9", False, False, 1)]
    assert d.servers[-1].down  # the placeholder until DNS answers
    assert e.discovery == DiscoveryConf("http://127.0.0.1:2379", "/s/e/", 0.5)
    assert [x.down for x in e.servers] == [True]
    assert s.discovery is None and not any(x.resolve for x in s.servers)
    assert cluster.feeds_peer_lists(http_conf)


# --------------------------------------------------------------------------- synced zone


@pytest.fixture
def synced(tmp_path: Path):
    zone = SyncedSharedDict(str(tmp_path), "s", 1 << 20)
    yield zone
    zone.close()


def test_writes_are_noted_and_collected_once(synced: SyncedSharedDict) -> None:
    synced.incr("c", 1, 10)
    synced.incr("c", 2)
    synced.set("v", "text", 30, 7)
    synced.set("n", 5)
    synced.delete("gone")
    assert synced.pending() == 4
    pushes = {p.key: p for p in synced.collect()}
    assert synced.pending() == 0 and synced.collect() == []
    counter = pushes[b"c"]
    assert (counter.op, counter.gen, counter.payload, counter.base) == (b"c", b"", b"3", b"10")
    assert (pushes[b"v"].op, pushes[b"v"].payload, pushes[b"v"].flags) == (b"v", b"stext", 7)
    assert 29_000 < pushes[b"v"].pttl <= 30_000
    assert (pushes[b"n"].op, pushes[b"n"].payload) == (b"b", b"5")
    assert pushes[b"gone"].op == b"d"
    synced.requeue(list(pushes.values()))
    assert synced.pending() == 4  # a failed push is taken again


def test_an_increment_after_a_local_set_stays_a_set(synced: SyncedSharedDict) -> None:
    synced.set("k", 5)
    synced.incr("k", 1)
    [push] = synced.collect()
    assert (push.op, push.payload) == (b"b", b"6")


def test_apply_adds_the_other_nodes_and_keeps_local_increments(synced: SyncedSharedDict) -> None:
    synced.incr("c", 1, 0)
    synced.collect()
    state = ClusterState(b"c", {b"_g": b"7", b"_b": b"0", b"n:me": b"1", b"n:other": b"10"}, 5000)
    synced.incr("c", 1)  # after the push, before its reply
    synced.apply([state], b"me")
    assert synced.get("c")[0] == 12  # 10 from the other node + this node's 2
    assert 4 < synced.ttl("c")[0] <= 5
    [push] = synced.collect()
    assert (push.gen, push.payload) == (b"7", b"2")  # the generation learned, the own total


def test_apply_values_deletes_and_a_new_generation(synced: SyncedSharedDict) -> None:
    synced.apply([ClusterState(b"v", {b"_g": b"1", b"_v": b"shello", b"_f": b"3"}, -1)], b"me")
    assert synced.get("v") == ("hello", 3)
    synced.set("v", "mine")
    synced.apply([ClusterState(b"v", {b"_g": b"2", b"_v": b"stheirs"}, -1)], b"me")
    assert synced.get("v")[0] == "mine"  # a local set not pushed yet wins until its push returns
    synced.collect()
    synced.apply([ClusterState(b"v", {b"_g": b"3", b"_d": b"1"}, 60000)], b"me")
    assert synced.get("v") == (None, None)
    synced.incr("c", 4, 0)
    synced.collect()
    synced.apply([ClusterState(b"c", {b"_g": b"5", b"_b": b"0", b"n:me": b"4"}, -1)], b"me")
    synced.apply([ClusterState(b"c", {b"_g": b"6", b"_b": b"100"}, -1)], b"me")  # set elsewhere
    assert synced.get("c")[0] == 100  # increments of the old generation went with it


def test_restore_pushes_every_key_redis_knew(synced: SyncedSharedDict) -> None:
    synced.apply([ClusterState(b"c", {b"_g": b"5", b"_b": b"2", b"n:me": b"4", b"n:x": b"1"}, -1),
                  ClusterState(b"v", {b"_g": b"6", b"_v": b"sval"}, -1)], b"me")
    assert synced.get("c")[0] == 3  # only this zone's own total counts as this node's: 0
    synced.incr("c", 4)
    restore = {p.key: (p.op, p.gen, p.payload, p.base) for p in synced.restore_pushes()}
    assert restore == {b"c": (b"c", b"5", b"4", b"2"), b"v": (b"v", b"6", b"sval", b"")}


def test_a_plain_zone_notes_nothing(tmp_path: Path) -> None:
    zone = SharedDict(str(tmp_path), "p", 1 << 20)
    try:
        zone.incr("c", 1, 0)
        synced = SyncedSharedDict(str(tmp_path), "p", 1 << 20)
        assert synced.pending() == 0
    finally:
        zone.close()


def test_foreign_or_malformed_hashes_are_skipped(synced: SyncedSharedDict) -> None:
    """Redis is shared: a hash no node wrote must not stop the merge of the others."""
    synced.apply([
        ClusterState(b"x" * 600, {b"_g": b"1", b"_b": b"1"}, -1),
        ClusterState(b"bad", {b"_g": b"1", b"_b": b"one"}, -1),
        ClusterState(b"kind", {b"_g": b"1", b"_v": b"?junk"}, -1),
        ClusterState(b"utf", {b"_g": b"1", b"_v": b"s\xff"}, -1),
        ClusterState(b"good", {b"_g": b"1", b"_b": b"2", b"n:x": b"3"}, -1),
    ], b"me")
    assert synced.get_keys(0) == ["good"] and synced.get("good")[0] == 5


def test_float_increments_and_a_value_incremented_after_a_merge(synced: SyncedSharedDict) -> None:
    synced.incr("f", 0.5, 0)
    synced.collect()
    fields = {b"_g": b"2", b"_b": b"0", b"n:me": b"0.5", b"n:y": b"1.25"}
    synced.apply([ClusterState(b"f", fields, -1)], b"me")
    assert synced.get("f")[0] == 1.75
    synced.incr("f", 0.25)
    [push] = synced.collect()
    assert (push.op, push.gen, push.payload) == (b"c", b"2", b"0.75")


# --------------------------------------------------------------------------- the sync loop


class _RedisCancellingItsCaller:
    """Just what DictSync calls of a redis client, answering at once, without I/O. The script
    call cancels the task that made it, as a stopping node does, in the step the call ends;
    ``lose`` also catches that cancel and answers, as Python 3.11's wait_for inside redis-py
    did."""

    def __init__(self, lose: bool) -> None:
        self.lose = lose
        self.script_calls = 0
        self.caller: asyncio.Task[None] | None = None  # the sync's task

    def register_script(self, text: str) -> object:
        async def script(keys: list[bytes], args: list[object]) -> list[object]:
            self.script_calls += 1
            assert self.caller is not None
            self.caller.cancel()
            if self.lose:
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.sleep(0)
            return [b"1-0", []]

        return script

    async def ping(self) -> bool:
        return True

    async def xrevrange(self, name: bytes, count: int) -> list[object]:
        return []

    async def scan_iter(self, match: bytes, count: int) -> AsyncIterator[bytes]:
        for key in ():
            yield key

    async def aclose(self) -> None:
        pass


@pytest.mark.parametrize("lose", [False, True], ids=["delivered", "lost by the client"])
def test_a_cancel_as_a_redis_call_ends_stops_the_sync(synced: SyncedSharedDict, lose: bool) -> None:
    """A cancelled sync task ends, even when the cancel comes in the step its Redis call
    answers (asyncio.wait_for on Python 3.11 loses such a cancel), even when the client lost
    it: the task ran on, and the test awaiting it hung."""
    from scriptlb.state.dict_sync import DictSync

    client = _RedisCancellingItsCaller(lose)
    sync = DictSync(synced, DictSyncConf("redis://127.0.0.1:1/0", 0.01, "t:"), lambda conf: client)

    async def scenario() -> None:
        task = client.caller = asyncio.create_task(sync.run())
        done, _ = await asyncio.wait([task], timeout=5)
        assert done, f"the sync ran on after its cancel ({client.script_calls} rounds)"
        assert task.cancelled()

    asyncio.run(scenario())
    assert client.script_calls == 1


def test_a_cancel_lost_in_a_dns_lookup_stops_the_membership(tmp_path: Path) -> None:
    """dnspython's queries are asyncio.wait_for calls: a cancel lost in one (Python 3.11) must
    still end the membership's loop, or the cluster process never stops."""
    from scriptlb.ops.resolver import DnsMembership
    from scriptlb.state.peer_lists import PeerListStore

    conf = http(tmp_path, "resolver 127.0.0.1:1; upstream u { zone u; server app.test:8080 resolve; }")
    assert conf.http is not None
    upstream = conf.http.upstreams["u"]
    membership = DnsMembership(upstream, upstream.resolver, PeerListStore(str(tmp_path)))
    lookups = []

    async def lookup_losing_the_cancel(line: object) -> tuple[list[object], float]:
        lookups.append(line)
        assert caller is not None
        caller.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(0)
        return [], 0.01

    membership.lookup = lookup_losing_the_cancel  # type: ignore[method-assign]
    caller: asyncio.Task[None] | None = None

    async def scenario() -> None:
        nonlocal caller
        caller = asyncio.create_task(membership.run())
        done, _ = await asyncio.wait([caller], timeout=5)
        assert done, f"the membership ran on after its cancel ({len(lookups)} lookups)"
        assert caller.cancelled()

    asyncio.run(scenario())
    assert len(lookups) == 1
