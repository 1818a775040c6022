"""Merge a ``python_shared_dict ... sync=redis://`` zone with Redis: one task per zone, in the
node's cluster process (``scriptlb.ops.cluster``), never in a worker or a hook.

Theory of operation
-------------------
Hooks read and write the local LMDB zone only (``SyncedSharedDict``); its writes note the key.
Every ``sync_interval`` this task takes the noted keys (``collect``) and runs ONE Lua script in
Redis that pushes them, appends their names to the dict's change stream, reads the names other
nodes appended since this node's last stream id, and returns the current state of every key
pushed or changed elsewhere, which ``apply`` writes into the zone. One round trip per round.

Redis keeps, per dict key, a hash ``PREFIX k:KEY``::

    _g   generation: a number from ``PREFIX gen`` (INCR), new with every set or delete
    _b   the generation's base number (a number set, or incr's init), or
    _v   a non-number value (type byte + payload, as the zone stores it)
    _f   flags (absent = 0)          _d   tombstone of a delete (kept ``TOMBSTONE_MS``)
    n:NODE  that node's cumulative increments in this generation

A counter is ``_b + sum(n:*)``. A node only ever *replaces* its own ``n:NODE`` with its local
total, so repeating a push (after a timeout, an outage, a reconnect) cannot count twice: a
G-counter per generation. Sets and deletes are last-writer-wins in the order Redis runs them
(Redis's clock), and increments pushed for an older generation are ignored.

After a (re)connection the node first pushes every key it holds in ``restore`` mode, which
recreates only what Redis lacks (a Redis restarted without its data loses nothing the nodes
still hold), then reads every key back (SCAN) and continues from the stream's last id.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from scriptlb.config.model import DictSyncConf
from scriptlb.logs import errorlog
from scriptlb.state.shared_dict import ClusterState, Push, SyncedSharedDict

BATCH = 400  # keys per script call (7 arguments each; Lua's unpack limit is far above)
STREAM_MAXLEN = 100_000  # change stream entries kept: minutes of history for a lagging node
READ_COUNT = 1000  # stream entries read per round
TOMBSTONE_MS = 60_000  # how long a delete outranks late increments of the deleted generation
BACKOFF_FIRST, BACKOFF_MAX = 0.1, 5.0
TIMEOUT = 2.0  # seconds for one Redis call before the node counts Redis as unavailable
SWEEP_EVERY = 10.0  # seconds between two sweeps of the own totals of keys gone locally

SCRIPT = """
local node, last_id, restore, prefix = ARGV[1], ARGV[2], ARGV[3] == '1', ARGV[4]
local tomb_ms, maxlen = tonumber(ARGV[5]), ARGV[6]
local mine = 'n:' .. node
local touched, order = {}, {}
local function note(k)
  if not touched[k] then touched[k] = true; order[#order + 1] = k end
end
local function finish(rk, flags, pttl)
  if flags ~= '0' then redis.call('HSET', rk, '_f', flags) end
  if pttl > 0 then redis.call('PEXPIRE', rk, pttl) end
end
local i = 7
while i <= #ARGV do
  local k, op, gen, payload, base = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  local flags, pttl = ARGV[i + 5], tonumber(ARGV[i + 6])
  i = i + 7
  local rk = prefix .. 'k:' .. k
  local cur = redis.call('HGET', rk, '_g')
  if op == 'c' then
    if cur then
      if (gen == '' or gen == cur) and redis.call('HEXISTS', rk, '_d') == 0 then
        redis.call('HSET', rk, mine, payload)
      end
    elseif gen == '' or restore then
      local g = gen
      if g == '' then g = tostring(redis.call('INCR', prefix .. 'gen')) end
      redis.call('HSET', rk, '_g', g, '_b', base, mine, payload)
      finish(rk, flags, pttl)
    end
  elseif not (restore and cur) then
    redis.call('DEL', rk)
    local g = gen
    if g == '' or not restore then g = tostring(redis.call('INCR', prefix .. 'gen')) end
    if op == 'd' then
      redis.call('HSET', rk, '_g', g, '_d', '1')
      redis.call('PEXPIRE', rk, tomb_ms)
    else
      redis.call('HSET', rk, '_g', g, op == 'b' and '_b' or '_v', payload)
      finish(rk, flags, pttl)
    end
  end
  note(k)
end
local log = prefix .. 'log'
if #order > 0 then
  local entry = {'XADD', log, 'MAXLEN', '~', maxlen, '*', 'n', node}
  for _, k in ipairs(order) do entry[#entry + 1] = 'k'; entry[#entry + 1] = k end
  redis.call(unpack(entry))
end
local new_last = last_id
if last_id ~= '' then
  local entries = redis.call('XRANGE', log, '(' .. last_id, '+', 'COUNT', READ_COUNT)
  for _, e in ipairs(entries) do
    new_last = e[1]
    local f = e[2]
    if f[2] ~= node then
      for j = 3, #f, 2 do note(f[j + 1]) end
    end
  end
end
local out = {}
for _, k in ipairs(order) do
  local rk = prefix .. 'k:' .. k
  out[#out + 1] = k
  out[#out + 1] = redis.call('HGETALL', rk)
  out[#out + 1] = redis.call('PTTL', rk)
end
return {new_last, out}
""".replace("READ_COUNT", str(READ_COUNT))


def redis_client(conf: DictSyncConf) -> Any:
    """A redis-py asyncio client for ``sync=`` (rediss:// is TLS; the password comes from
    ``sync_password_file`` when given, read here, in the cluster process)."""
    import redis.asyncio as aioredis

    password = None
    if conf.password_file is not None:
        with open(conf.password_file, encoding="utf-8") as f:
            password = f.read().strip()
    kwargs: dict[str, Any] = {"socket_timeout": TIMEOUT, "socket_connect_timeout": TIMEOUT}
    if password is not None:
        kwargs["password"] = password
    return aioredis.Redis.from_url(conf.url, **kwargs)


def public_url(url: str) -> str:
    """The URL without credentials, for the error log."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def states_of(flat: list[Any]) -> list[ClusterState]:
    """The script's ``key, HGETALL, PTTL`` triples as states."""
    states = []
    for at in range(0, len(flat), 3):
        pairs = flat[at + 1]
        fields = {pairs[j]: pairs[j + 1] for j in range(0, len(pairs), 2)}
        states.append(ClusterState(flat[at], fields, int(flat[at + 2])))
    return states


class DictSync:
    """The merge loop of one synced zone (see the module docstring)."""

    def __init__(self, shared: SyncedSharedDict, conf: DictSyncConf,
                 client_factory: Callable[[DictSyncConf], Any] = redis_client) -> None:
        self.shared = shared
        self.conf = conf
        self.node = shared.node_id()
        self.prefix = conf.prefix.encode()
        self._client_factory = client_factory
        self._client: Any = None
        self._script: Any = None
        self._last_id = b""
        self.connected = False
        self.reachable: bool | None = None  # unknown until the first connection
        self.on_state: Callable[[bool, str], None] | None = None  # (up, error) at each change
        self.rounds = 0
        self._stopping = False
        self._last_sweep = time.monotonic()

    # ----------------------------------------------------------------- the loop

    async def run(self) -> None:
        backoff = BACKOFF_FIRST
        while not self._stopping:
            try:
                if not self.connected:
                    await self._connect()
                    backoff = BACKOFF_FIRST
                await self.round()
                raise_lost_cancel()
                await asyncio.sleep(self.conf.interval)
            except asyncio.CancelledError:
                raise
            except Exception as err:
                self._lost(err)
                raise_lost_cancel()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)

    def stop(self) -> None:
        self._stopping = True

    async def final_round(self) -> None:
        """A stopping node pushes what its hooks wrote since the last round."""
        if self.connected and self.shared.pending():
            await self.round()

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def _where(self) -> str:
        return f'shared dict "{self.shared.name}": Redis {public_url(self.conf.url)}'

    def _lost(self, err: Exception) -> None:
        """Logged once per change of state: at the first failure, not at every retry."""
        if self.reachable is not False:
            if self.on_state is not None:
                self.on_state(False, f"{err.__class__.__name__}: {err}")
            errorlog.log_error(
                "error", f"{self._where()} unavailable ({err.__class__.__name__}: {err}), "
                "serving local values, retrying")
        self.reachable = False
        self.connected = False
        self._last_id = b""

    async def _connect(self) -> None:
        if self._client is None:
            self._client = self._client_factory(self.conf)
            self._script = self._client.register_script(SCRIPT)
        await self._client.ping()
        merged = await self._resync()
        was_down = self.reachable is False
        if self.reachable is not True and self.on_state is not None:
            self.on_state(True, "")
        self.connected = self.reachable = True
        if was_down:
            errorlog.log_error("notice", f"{self._where()} reachable again, merged {merged} keys")

    # ----------------------------------------------------------------- rounds

    async def round(self) -> None:
        """One merge: push noted keys, pull other nodes' changes (repeats while keys remain)."""
        while True:
            # a read transaction first: no write transaction (and no commit every other process
            # then sees) when no hook wrote since the last round
            pushes = self.shared.collect(BATCH) if self.shared.pending() else []
            try:
                last_id, flat = await self._run_script(pushes, self._last_id, restore=False)
            except BaseException:
                self.shared.requeue(pushes)
                raise
            self._last_id = last_id
            self.shared.apply(states_of(flat), self.node)
            self.rounds += 1
            if len(pushes) < BATCH:
                break
        if time.monotonic() - self._last_sweep > SWEEP_EVERY:
            self._last_sweep = time.monotonic()
            self.shared.sweep_own()

    async def _run_script(self, pushes: list[Push], last_id: bytes, restore: bool) -> tuple[bytes, list[Any]]:
        args: list[Any] = [self.node, last_id, b"1" if restore else b"0", self.prefix, TOMBSTONE_MS,
                           STREAM_MAXLEN]
        for push in pushes:
            args.extend(push.args())
        async with asyncio.timeout(TIMEOUT):  # (not wait_for: see raise_lost_cancel)
            result = await self._script(keys=[], args=args)
        return result[0], result[1]

    async def _resync(self) -> int:
        """After a (re)connection: restore what Redis may have lost, then read everything."""
        restore = self.shared.restore_pushes()
        for at in range(0, len(restore), BATCH):
            await self._run_script(restore[at : at + BATCH], b"", restore=True)
        client = self._client
        newest = await client.xrevrange(self.prefix + b"log", count=1)
        last_id = newest[0][0] if newest else b"0-0"
        merged = 0
        keys: list[bytes] = []
        async for rkey in client.scan_iter(match=_glob_escape(self.prefix) + b"k:*", count=500):
            keys.append(rkey)
            if len(keys) >= BATCH:
                merged += await self._pull(keys)
                keys = []
        if keys:
            merged += await self._pull(keys)
        self._last_id = last_id
        return merged

    async def _pull(self, rkeys: list[bytes]) -> int:
        pipe = self._client.pipeline(transaction=False)
        for rkey in rkeys:
            pipe.hgetall(rkey)
            pipe.pttl(rkey)
        async with asyncio.timeout(TIMEOUT):
            replies = await pipe.execute()
        skip = len(self.prefix) + 2
        states = [ClusterState(rkey[skip:], replies[2 * i], int(replies[2 * i + 1]))
                  for i, rkey in enumerate(rkeys)]
        self.shared.apply(states, self.node)
        return len(states)


def raise_lost_cancel() -> None:
    """Raise the cancel of this task if a library lost it: for a loop of the cluster process,
    before it sleeps. On Python 3.11, asyncio.wait_for returns the result of a call
    that ends in the same step as a cancel of its caller and drops the cancel; redis-py wraps
    every command's write in one (with ``socket_timeout``), dnspython every DNS query, so a
    cancelled sync task went on merging, and whoever awaited its end waited for ever. The
    request stays counted (``Task.cancelling``) until someone takes it back."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _glob_escape(text: bytes) -> bytes:
    out = bytearray()
    for byte in text:
        if byte in b"*?[]\\":
            out.append(0x5C)
        out.append(byte)
    return bytes(out)
