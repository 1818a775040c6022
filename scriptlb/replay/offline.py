"""One upstream of a configuration, run outside the proxy, in virtual time.

``Offline`` builds what a worker builds for an upstream (``runtime.UpstreamRuntime``: peers,
balancing method, hook runner; the live peer statistics; the ``python_shared_dict`` zones;
the location's ``log_by_python`` runner) with the same code, but on a ``VirtualLoop`` whose
clock the caller moves and in a throwaway directory. Hooks see the virtual time through
``ngx.now()`` and the statistics' stamps. The replay (``scriptlb.replay``) and the test kit
(``scriptlb.testing``) drive it.

One ``Offline`` at a time per process: the hook API's clock and shared dicts are process-wide,
as they are in a worker.
"""

from __future__ import annotations

import dis
import heapq
import random
import shutil
import tempfile
from collections.abc import Callable
from types import CodeType
from typing import Any

from scriptlb.config.errors import ConfigError
from scriptlb.config.model import HookConf, LocationConf, MainConf, ProxyConf, UpstreamConf
from scriptlb.hookrt import api, hooks
from scriptlb.request.runtime import UpstreamRuntime
from scriptlb.state.shared_dict import SharedDict
from scriptlb.state.stats import PeerStats, Recorder, layout_of

LogLine = tuple[str, str]  # (level, message)


class TimerHandle:
    """``loop.call_later``'s handle: ``cancel()`` stops it."""

    __slots__ = ("args", "callback", "cancelled")

    def __init__(self, callback: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.callback = callback
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def run(self) -> None:
        if not self.cancelled:
            self.callback(*self.args)


class VirtualLoop:
    """The parts of an event loop the upstream's objects use (``time``, ``call_later``), on a
    clock that only moves when ``advance``/``run_until`` move it. Events are kept in one heap
    with the caller's own (``at``)."""

    def __init__(self, start: float) -> None:
        self.now = start
        self.heap: list[tuple[float, int, Callable[..., Any], Any]] = []
        self._seq = 0

    def time(self) -> float:
        return self.now

    def at(self, when: float, callback: Callable[[Any], Any], arg: Any) -> None:
        """Run ``callback(arg)`` at ``when`` (never in the past)."""
        self._seq += 1
        heapq.heappush(self.heap, (when if when > self.now else self.now, self._seq, callback, arg))

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> TimerHandle:
        handle = TimerHandle(callback, args)
        self.at(self.now + max(delay, 0.0), _run_handle, handle)
        return handle

    def call_soon(self, callback: Callable[..., Any], *args: Any) -> TimerHandle:
        return self.call_later(0.0, callback, *args)

    def run_until(self, when: float) -> None:
        """Run every event due up to ``when``, then set the clock to ``when``."""
        heap = self.heap
        pop = heapq.heappop
        while heap and heap[0][0] <= when:
            at, _, callback, arg = pop(heap)
            self.now = at
            callback(arg)
        if when > self.now:
            self.now = when

    def run_all(self) -> None:
        heap = self.heap
        while heap:
            at, _, callback, arg = heapq.heappop(heap)
            self.now = at
            callback(arg)


def _run_handle(handle: TimerHandle) -> None:
    handle.run()


class LocationView:
    """What a log hook reads of its location: the upstream it proxies to."""

    __slots__ = ("conf", "upstream")

    def __init__(self, conf: LocationConf | None, upstream: Any) -> None:
        self.conf = conf
        self.upstream = upstream


class Offline:
    """An upstream (and the location proxying to it) of ``conf``, in virtual time."""

    def __init__(
        self,
        conf: MainConf,
        upstream: str | None = None,
        start: float = 1_000_000_000.0,
        seed: int = 1,
        peer_stats: bool | None = None,
        precompile: bool = True,
    ) -> None:
        http = conf.http
        if http is None or not http.upstreams:
            raise ValueError(f"{conf.conf_file}: no upstream to run")
        self.conf = conf
        self.upstream_conf = pick_upstream(conf, upstream)
        self.location_conf = proxying_location(conf, self.upstream_conf.name)
        self.proxy: ProxyConf = self.location_conf.proxy if self.location_conf is not None else ProxyConf()
        self.loop = VirtualLoop(start)
        self.logs: list[LogLine] = []
        self.directory = tempfile.mkdtemp(prefix="scriptlb-offline-")
        self._closed = False
        try:
            if peer_stats is None:  # only hooks can read them: kept only when one may
                peer_stats = http.python.peer_stats and any(_may_read_statistics(h) for h in http.hooks())
            self._build(http, seed, peer_stats, precompile)
        except BaseException:
            self.close()
            raise

    def _build(self, http: Any, seed: int, peer_stats: bool, precompile: bool) -> None:
        try:
            hooks.precompile(self.conf)  # ConfigError at file:line, as `scriptlb -t`
        except ConfigError:
            if precompile:
                raise
            # a hook that does not compile fails each run instead (what a test wants to see);
            # no code compiled earlier in this process for the same hook may stand in for it
            hooks.configure(http.python)
            for hook in http.hooks():
                hooks._LOADED.pop(hook, None)
        api.set_clock(self.loop.time)
        api.set_shared_dicts(
            {
                name: SharedDict(self.directory, name, zone.size, clock=self.loop.time)
                for name, zone in http.shared_dicts.items()
            }
        )
        self.stats: PeerStats | None = None
        recorder = None
        if peer_stats:
            self.stats = PeerStats.open(self.directory, layout_of(http))
            recorder = Recorder(self.stats, self.loop, clock=self.loop.time)
        self.recorder = recorder
        # a VirtualLoop for the asyncio loop: it has what the tries loop calls (time, call_later)
        self.upstream = UpstreamRuntime(self.upstream_conf, self.loop, http.python, recorder)  # type: ignore[arg-type]
        rng = getattr(self.upstream.balancer, "_rng", None)
        if isinstance(rng, random.Random):
            rng.seed(seed)  # methods that draw (ewma, random) draw the same on every run
        if self.upstream.hook is not None:
            self.upstream.hook.log = self._log
        self.location = LocationView(self.location_conf, self.upstream)
        self.log_hook: hooks.LogHookRunner | None = None
        if self.location_conf is not None and self.location_conf.log_hook is not None:
            self.log_hook = hooks.LogHookRunner(self.location_conf.log_hook, http.python, log=self._log)

    def _log(self, level: str, message: str, _exchange: Any) -> None:
        if len(self.logs) < 100_000:
            self.logs.append((level, message))

    def close(self) -> None:
        """Put the hook API's clock and shared dicts back and remove the directory."""
        if self._closed:
            return
        self._closed = True
        api.set_clock(None)
        api.set_shared_dicts({})
        recorder = getattr(self, "recorder", None)
        if recorder is not None:
            recorder.timer = None  # (its virtual timer dies with the loop)
        stats: PeerStats | None = getattr(self, "stats", None)  # (None too if __init__ failed early)
        if stats is not None:
            stats.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> Offline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# What a hook needs to reach the peer statistics: ``upstream`` (or ``ngx.upstream``), or a
# name built at run time (getattr, vars), or a module that might do either.
_STATISTICS_NAMES = frozenset({"upstream", "getattr", "_getattr_", "vars", "__import__"})


def _may_read_statistics(hook: HookConf) -> bool:
    """False only when the hook's code cannot reach the statistics (the replay then keeps
    none: unobservable, they would cost half of its time for a cheap hook)."""
    try:
        code = hooks.load_code(hook)
    except Exception:  # it fails every run; what it would read does not matter, be safe anyway
        return True
    return _code_may_read(code)


def _code_may_read(code: CodeType) -> bool:
    if not _STATISTICS_NAMES.isdisjoint(code.co_names):
        return True
    for const in code.co_consts:
        if isinstance(const, str) and "upstream" in const:
            return True
        if isinstance(const, CodeType) and _code_may_read(const):
            return True
    return any(instruction.opname == "IMPORT_NAME" for instruction in dis.get_instructions(code))


def pick_upstream(conf: MainConf, name: str | None) -> UpstreamConf:
    """The upstream called ``name``; without a name, the only one, or the one with a hook, or
    the one the first proxying location uses."""
    http = conf.http
    assert http is not None
    upstreams = http.upstreams
    if name is not None:
        if name not in upstreams:
            known = ", ".join(sorted(upstreams)) or "none"
            raise ValueError(f'{conf.conf_file}: no upstream "{name}" (known: {known})')
        return upstreams[name]
    explicit = [u for u in upstreams.values() if not u.implicit]
    if len(explicit) == 1:
        return explicit[0]
    hooked = [u for u in explicit if u.hook is not None]
    if len(hooked) == 1:
        return hooked[0]
    location = next((loc for s in http.servers for loc in s.locations
                     if loc.proxy_pass is not None and loc.proxy_pass.upstream), None)
    if location is not None and location.proxy_pass is not None:
        return upstreams[location.proxy_pass.upstream]
    raise ValueError(f"{conf.conf_file}: several upstreams, name one with --upstream")


def proxying_location(conf: MainConf, upstream: str) -> LocationConf | None:
    """The first location that proxies to ``upstream`` (its proxy_* settings and log hook)."""
    http = conf.http
    assert http is not None
    for server in http.servers:
        for location in server.locations:
            if location.proxy_pass is not None and location.proxy_pass.upstream == upstream:
                return location
    return None
