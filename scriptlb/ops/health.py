"""Active health checks (nginx Plus's ``health_check`` + ``match``).

Theory of operation
-------------------
**One checker per peer across all workers.** Every worker lists the checked peers of the
instance in the same order (upstream, then statistics slot) and checks those at positions
``worker_id`` modulo the worker count; a worker that dies is respawned under the same id
and takes its peers back. Each checked peer has one asyncio task in its worker: at most one
connection per peer at a time, each check bounded by the location's
``proxy_connect_timeout``/``proxy_read_timeout`` and by ``MAX_RESPONSE`` bytes read.

**State in the shared statistics.** The checker writes the peer's health words in the
statistics file (``stats.HEALTH_FIELDS``: state up/unhealthy/checking, checks, fails,
transitions to unhealthy, last result, the current run of passes or fails, healthy since).
Every worker's ``HealthView`` reads them every ``VIEW_INTERVAL`` (nothing on the request
path) and sets each peer's ``unhealthy`` and ``down`` (``down`` is what every balancing method
already skips), and ramps the weight of a recovered peer over its ``slow_start``. Hooks see
``healthy``/``state`` in ``get_primary_peers()``; a hook that picks an unhealthy peer anyway
gets it, and the trail says so (``hook(unhealthy)`` in ``$balancer_trace``, a warn line: see
``attempt.chosen_anyway``).

``mandatory`` peers start "checking" (not chosen) until their first pass, checked at once;
without ``persistent`` a reload puts them back in that state; with it, a peer that was up
before the reload stays up (nginx Plus: "the initial up state ... if the server was considered
healthy before reload"), any other starts "checking" again. Transitions are logged in nginx
Plus's words: ``peer is unhealthy while checking status code, health check "" of peer
127.0.0.1:9001 in upstream "backend"`` (warn) and ``peer is healthy while ...`` (notice);
each failed check logs its own cause at error level (``connect() failed (111: ...) while
connecting to upstream, health check ...``).

When an upstream has several ``health_check`` lines (several locations), the first is used.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from typing import Any

import httptools

from scriptlb.config.model import HealthCheckConf, MatchConf
from scriptlb.logs import errorlog
from scriptlb.state.stats import CHECKING, UNHEALTHY, UP

VIEW_INTERVAL = 0.1  # seconds between two readings of the health words in every worker
MAX_RESPONSE = 64 * 1024  # bytes of a check's response read at most (head + body)
_READING = "while reading response header from upstream"


def checked_upstreams(runtime: Any) -> list[Any]:
    return [u for u in runtime.upstreams.values() if u.conf.health_checks and u.stats is not None]


def _peers(upstream: Any) -> list[Any]:
    return [*upstream.peers.primary, *upstream.peers.backup]


# --------------------------------------------------------------------------- every worker


class HealthView:
    """Applies the shared health state to this worker's peers (every ``VIEW_INTERVAL``)."""

    def __init__(self, runtime: Any) -> None:
        self.runtime = runtime
        self._timer: Any = None
        self._ramps: dict[int, tuple[Any, int]] = {}  # id(peer) -> (peer, full weight)

    def start(self, loop: Any) -> None:
        self.apply()
        self._timer = loop.call_later(VIEW_INTERVAL, self._tick, loop)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _tick(self, loop: Any) -> None:
        try:
            self.apply()
        finally:
            self._timer = loop.call_later(VIEW_INTERVAL, self._tick, loop)

    def apply(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        for upstream in checked_upstreams(self.runtime):
            stats = upstream.stats
            for peer in _peers(upstream):
                words = stats.stats.health(stats.slot_of(peer))
                unhealthy = words[0] in (UNHEALTHY, CHECKING)
                peer.unhealthy = unhealthy
                peer.down = peer.config_down or unhealthy
                self._slow_start(peer, words[6], now)

    def _slow_start(self, peer: Any, since: float, now: float) -> None:
        """A recovered peer's weight grows from 1 to its own over ``slow_start`` seconds."""
        ramp = self._ramps.get(id(peer))
        elapsed = now - since
        if peer.slow_start and since and not peer.unhealthy and elapsed < peer.slow_start:
            if ramp is None:
                ramp = self._ramps[id(peer)] = (peer, peer.weight)
            full = ramp[1]
            peer.weight = max(1, int(full * elapsed / peer.slow_start))
            peer.effective_weight = min(peer.effective_weight, peer.weight)
        elif ramp is not None:
            del self._ramps[id(peer)]
            peer.weight = ramp[1]

    @staticmethod
    def figures(upstream: Any, peer: Any) -> dict[str, Any]:
        """nginx Plus's ``health_checks`` object of one peer."""
        words = upstream.stats.stats.health(upstream.stats.slot_of(peer))
        result: dict[str, Any] = {"checks": int(words[1]), "fails": int(words[2]), "unhealthy": int(words[3])}
        if words[4]:
            result["last_passed"] = words[4] == 1
        return result

    @staticmethod
    def downtime(upstream: Any, peer: Any, now: float) -> float:
        """Seconds the peer has been unhealthy, the current spell included."""
        stats, slot = upstream.stats.stats, upstream.stats.slot_of(peer)
        words = stats.health(slot)
        current = now - words[6] if words[0] == UNHEALTHY and words[6] else 0.0
        downtime: float = stats.downtime(slot)
        return downtime + max(current, 0.0)

    @staticmethod
    def state(upstream: Any, peer: Any) -> str:
        words = upstream.stats.stats.health(upstream.stats.slot_of(peer))
        return {UP: "up", UNHEALTHY: "unhealthy", CHECKING: "checking"}.get(int(words[0]), "up")


# --------------------------------------------------------------------------- the checkers


class HealthChecker:
    """This worker's share of the checks: one task per owned peer."""

    def __init__(self, runtime: Any, worker_id: int, worker_count: int) -> None:
        self.runtime = runtime
        self.worker_id = worker_id
        self.worker_count = max(1, worker_count)
        self._tasks: dict[tuple[str, int], asyncio.Task[None]] = {}

    def sync(self, loop: Any, first: bool = False) -> None:
        """Start tasks for the peers this worker owns now, stop the others' (after a run-time
        server list change too)."""
        targets = []
        for upstream in checked_upstreams(self.runtime):
            for peer in _peers(upstream):
                targets.append((upstream.name, upstream.stats.slot_of(peer), upstream, peer))
        targets.sort(key=lambda t: (t[0], t[1]))
        wanted = {}
        for position, (name, slot, upstream, peer) in enumerate(targets):
            if position % self.worker_count == self.worker_id:
                wanted[(name, slot)] = (upstream, peer)
        for key in list(self._tasks):
            if key not in wanted:
                self._tasks.pop(key).cancel()
        for key, (upstream, peer) in wanted.items():
            if key not in self._tasks:
                check = upstream.conf.health_checks[0]
                probe = PeerProbe(upstream, peer, key[1], check)
                self._tasks[key] = loop.create_task(probe.run(first))

    def stop(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        self._tasks.clear()


def check_delay(check: HealthCheckConf) -> float:
    """Time to the next check: ``interval``, plus a random part of ``jitter`` (nginx Plus: "the
    time within which each health check will be randomly delayed"), so that the checks of many
    peers, or of several instances, do not hit together."""
    return check.interval + random.random() * check.jitter


class PeerProbe:
    """Checks one peer for ever (a task), keeping its health words."""

    def __init__(self, upstream: Any, peer: Any, slot: int, check: HealthCheckConf) -> None:
        self.upstream = upstream
        self.peer = peer
        self.slot = slot
        self.check = check
        self.stats = upstream.stats.stats
        self.label = (f', health check "{check.match.name if check.match else ""}" of peer {peer.name} '
                      f'in upstream "{upstream.name}"')

    async def run(self, first: bool) -> None:
        words = self.stats.health(self.slot)
        check = self.check
        waiting = False
        if check.mandatory and not (check.persistent and words[1] and words[0] == UP):
            words[0], words[5] = CHECKING, 0  # not chosen until it passes
            self.stats.set_health(self.slot, words)
            waiting = True
        while True:
            if not waiting:  # a peer held back until its first pass is checked at once
                await asyncio.sleep(check_delay(check))
            waiting = False
            try:
                failure = await self.probe()
            except Exception as err:  # a bug must not end this peer's checks for good
                failure = f"health check failed ({err!r})"
            words = self.record(self.stats.health(self.slot), failure)
            self.stats.set_health(self.slot, words)

    def record(self, words: list[float], failure: str | None) -> list[float]:
        """One check's result folded into the peer's words; transitions logged."""
        check = self.check
        words[1] += 1
        if failure is not None:
            errorlog.log_error("error", failure + self.label)
            words[2] += 1
            words[4] = 2
            words[5] = min(words[5], 0) - 1
            if words[0] != UNHEALTHY and -words[5] >= check.fails:
                words[0] = UNHEALTHY
                words[3] += 1
                words[6] = time.time()  # the spell's start, for downtime
                errorlog.log_error("warn", f"peer is unhealthy while {self._phase(failure)}{self.label}")
        else:
            words[4] = 1
            words[5] = max(words[5], 0) + 1
            if words[0] != UP and words[5] >= check.passes:
                now = time.time()
                if words[0] == UNHEALTHY and words[6]:
                    self.stats.add_downtime(self.slot, now - words[6])
                words[0] = UP
                words[6] = now
                errorlog.log_error("notice", f"peer is healthy while checking status code{self.label}")
        return words

    @staticmethod
    def _phase(failure: str) -> str:
        return failure.split(" while ", 1)[1] if " while " in failure else "checking status code"

    # ----------------------------------------------------------------- one check

    async def probe(self) -> str | None:
        """None when the peer passes, else what failed (nginx's wording)."""
        check, addr = self.check, self.peer.addr
        port = check.port or addr.port
        try:
            if addr.unix_path is not None:
                connecting = asyncio.open_unix_connection(addr.unix_path)
            else:
                connecting = asyncio.open_connection(addr.host, port)
            # (not wait_for: on Python 3.11 it can lose a cancel that comes as the call ends)
            async with asyncio.timeout(check.connect_timeout):
                reader, writer = await connecting
        except TimeoutError:
            return "upstream timed out (110: Connection timed out) while connecting to upstream"
        except OSError as err:
            return f"connect() failed {errorlog.os_error_text(err)} while connecting to upstream"
        try:
            async with asyncio.timeout(check.read_timeout):
                return await self._exchange(reader, writer)
        except TimeoutError:
            return f"upstream timed out (110: Connection timed out) {_READING}"
        except OSError as err:
            return f"recv() failed {errorlog.os_error_text(err)} {_READING}"
        finally:
            writer.close()

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> str | None:
        check = self.check
        match = check.match
        if check.type == "tcp":
            return await _tcp_exchange(reader, writer, match)
        host = check.host or self.peer.name
        writer.write(f"GET {check.uri} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: scriptlb health check\r\n"
                     "Connection: close\r\n\r\n".encode("latin-1", "replace"))
        await writer.drain()
        response = _Response()
        parser = httptools.HttpResponseParser(response)
        size = 0
        while not response.done and size < MAX_RESPONSE:
            data = await reader.read(65536)
            if not data:
                break
            size += len(data)
            try:
                parser.feed_data(data)
            except httptools.HttpParserError:
                return "upstream sent invalid header while reading response header from upstream"
        if not response.head_done:
            return "upstream prematurely closed connection while reading response header from upstream"
        response.status = parser.get_status_code()
        return response_failure(response, match)


class _Response:
    def __init__(self) -> None:
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self.body = b""
        self.head_done = False
        self.done = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("latin-1").lower(), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self.head_done = True

    def on_body(self, data: bytes) -> None:
        if len(self.body) < MAX_RESPONSE:
            self.body += data[: MAX_RESPONSE - len(self.body)]

    def on_message_complete(self) -> None:
        self.done = True


def response_failure(response: Any, match: MatchConf | None) -> str | None:
    """Does the response pass? Without ``match``: a 2xx or 3xx status; with one: each of its
    conditions (a block without ``status`` accepts any status). None, or why not."""
    if match is None:
        return None if 200 <= response.status < 400 else "checking status code"
    if match.statuses and not _status_ok(response.status, match.statuses):
        return "checking status code"
    return None if _rest_ok(response, match) else "checking response"


def _status_ok(status: int, rules: tuple[tuple[bool, int, int], ...]) -> bool:
    """nginx Plus: positive ranges list what passes (any of them), ``!`` ranges what fails."""
    positive = [r for r in rules if not r[0]]
    if positive and not any(low <= status <= high for _, low, high in positive):
        return False
    return not any(low <= status <= high for negated, low, high in rules if negated)


def _rest_ok(response: Any, match: MatchConf) -> bool:
    headers = response.headers
    for name, operator, value in match.headers:
        found = [v for n, v in headers if n == name]
        if operator == "present" and not found:
            return False
        if operator == "absent" and found:
            return False
        if operator == "=" and value not in found:
            return False
        if operator == "!=" and value in found:
            return False
        if operator == "~" and not any(re.search(value, v) for v in found):
            return False
        if operator == "!~" and any(re.search(value, v) for v in found):
            return False
    body = response.body.decode("latin-1")
    return all(bool(re.search(regex, body)) != negated for negated, regex in match.bodies)


async def _tcp_exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        match: MatchConf | None) -> str | None:
    """type=tcp: a connection passes; with ``send``/``expect`` the reply must match."""
    if match is None:
        return None
    if match.send:
        writer.write(match.send.encode("latin-1", "replace"))
        await writer.drain()
    if match.expect is None:
        return None
    data = b""
    while len(data) < MAX_RESPONSE:
        chunk = await reader.read(65536)
        if not chunk:
            break
        data += chunk
        if re.search(match.expect, data.decode("latin-1")):
            return None
    return "checking response"
