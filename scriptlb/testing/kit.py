"""``HookKit``: a hook (a file, or a config's ``_file``/``_block``) run the way a worker runs it,
without a proxy, against made-up requests, peers, shared dicts and failures.

    kit = HookKit.from_file("hooks/hash_by_uri.py", peers=["127.0.0.1:9001", "127.0.0.1:9002"])
    result = kit.run(uri="/a")                      # one balancer run
    assert result.peer == "127.0.0.1:9002" and result.outcome == "ok"

    walk = kit.request(uri="/a", fail=[502, "timeout"])   # a whole request: tries, retries
    assert [t.peer for t in walk.tries] == [...] and walk.status == 200

    kit.log(status=502, upstream_addr="127.0.0.1:9001")   # a log_by_python hook's run

Everything runs through the proxy's own code: the config loader (a file is wrapped in a small
config), ``HookRunner``/``LogHookRunner`` and the sandbox, the balancing method, the peer
statistics and the shared dicts (``scriptlb.replay.offline``, in a throwaway directory and on a
virtual clock that ``advance`` moves). ``scriptlb hook run`` prints what this returns.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scriptlb.config import load
from scriptlb.hookrt import api
from scriptlb.hookrt.hooks import HookOutcome
from scriptlb.replay.engine import Engine
from scriptlb.replay.logs import Recorded, parse_tries
from scriptlb.replay.model import ERROR, TIMEOUT, PeerModel
from scriptlb.replay.offline import Offline
from scriptlb.replay.synthetic import SyntheticExchange, TryRecord
from scriptlb.sandbox.guards import text_size
from scriptlb.sandbox.limits import MAX_STR

# HookOutcome.error -> HookResult.outcome ("ok" with no peer: the try falls back)
_OUTCOMES = {
    None: "ok",
    "no_peer": "ok",
    "runtime_error": "runtime_error",
    "exit_error": "runtime_error",
    "timeout": "timeout",
    "compile_error": "compile_error",
}
NO_PEER_NOTE = "no peer set: the try falls back to the upstream's balancer"
DEFAULT_PEERS = ("127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003")
Failure = int | str  # a status (502) or "error" / "timeout"


@dataclass
class HookResult:
    """What one balancer run decided (``outcome``: ok, runtime_error, timeout, compile_error,
    exit). ``fallback`` is why the try falls back to the method (None: it does not)."""

    outcome: str
    peer: str | None
    host: str | None
    more_tries: int
    timeouts: dict[str, float]
    exit_status: int | None
    keepalive: tuple[float, int] | None
    ctx: dict[str, Any]
    logs: list[str]
    error: str | None
    fallback: str | None

    def as_dict(self) -> dict[str, Any]:
        """The JSON line of ``scriptlb hook run``."""
        return {
            "outcome": self.outcome,
            "peer": self.peer,
            "host": self.host,
            "more_tries": self.more_tries,
            "timeouts": self.timeouts,
            "exit_status": self.exit_status,
            "keepalive": list(self.keepalive) if self.keepalive else None,
            "ctx": _plain(self.ctx),
            "logs": self.logs,
            "error": self.error,
        }


@dataclass
class TryResult:
    """One try of a walked request: who chose the peer and what the try ended with."""

    peer: str | None  # None: no live upstreams, or the hook ended the request
    chosen_by: str  # "hook", or "fallback(<reason>)", or the method ("round_robin"...)
    status: int | None  # the peer's status, or nginx's 502/504 for error/timeout
    hook: HookResult | None  # the hook's run (None without a hook)

    def as_dict(self) -> dict[str, Any]:
        return {
            "peer": self.peer,
            "chosen_by": self.chosen_by,
            "status": self.status,
            "hook": self.hook.as_dict() if self.hook is not None else None,
        }


@dataclass
class RequestResult:
    """A whole request: its tries in order and the status the client got."""

    tries: list[TryResult]
    status: int
    logs: list[str] = field(default_factory=list)

    @property
    def peers(self) -> list[str | None]:
        return [t.peer for t in self.tries]


@dataclass
class LogResult:
    """A log_by_python run: None, or the kind of error; the lines it logged."""

    outcome: str
    logs: list[str]


class _Scripted(PeerModel):
    """Every peer: the next injected failure for each try, then success."""

    def __init__(self, failures: Sequence[Failure], latency: float) -> None:
        super().__init__(fixed=latency, error_rate=1.0)  # (a rate: the engine asks on every try)
        self.pending = list(failures)

    def failure_at(self, now: float, elapsed: float, rng: Any) -> Failure | None:
        return self.pending.pop(0) if self.pending else None


def _plain(value: Any) -> Any:
    """ngx.ctx as JSON: plain values as they are; anything else, or anything huge, abbreviated."""
    if text_size(value, MAX_STR) > MAX_STR:
        return api.short_text(value)
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return api.short_text(value)
    return value


def _headers(headers: Mapping[str, str] | Iterable[tuple[str, str]] | None) -> list[tuple[bytes, bytes]]:
    items = headers.items() if isinstance(headers, Mapping) else (headers or [])
    return [(str(n).encode("latin-1"), str(v).encode("latin-1")) for n, v in items]


HOOK_CONF = """\
events {{}}
http {{
    {http}
    upstream backend {{
        {servers}
        {balancer}
    }}
    server {{
        listen 127.0.0.1:1;
        location / {{
            proxy_pass http://backend;
            {location}
        }}
    }}
}}
"""


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


class HookKit:
    """One hook, ready to run. Build with ``from_file`` or ``from_conf``; ``close`` when done
    (the fixtures of ``scriptlb.testing.plugin`` do)."""

    def __init__(
        self, conf_file: str, upstream: str | None = None, prefix: str | None = None, check: bool = False
    ) -> None:
        conf = load(os.path.abspath(conf_file), prefix)
        self.offline = Offline(conf, upstream, precompile=check)
        self.upstream = self.offline.upstream
        self._temp: tempfile.TemporaryDirectory[str] | None = None

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike[str],
        *,
        peers: Sequence[str] = DEFAULT_PEERS,
        backup: Sequence[str] = (),
        phase: str = "balancer",
        timeout_ms: float = 10,
        package_path: str | Sequence[str] = (),
        shared_dicts: Mapping[str, str] | None = None,
        method: str = "",
        server_args: str = "",
        proxy: str = "",
    ) -> HookKit:
        """A hook file in a small config of its own: an upstream of ``peers`` (+ ``backup``) with
        ``method`` ("least_conn;", "hash $uri consistent;"...), the hook as its
        ``balancer_by_python_file`` (``phase="balancer"``) or its location's
        ``log_by_python_file`` (``phase="log"``); ``shared_dicts`` as name -> size ("1m");
        ``proxy``: more location directives ("proxy_next_upstream error http_502;")."""
        if phase not in ("balancer", "log"):
            raise ValueError('phase must be "balancer" or "log"')
        hook = os.path.abspath(os.fspath(path))
        paths = [package_path] if isinstance(package_path, str) else list(package_path)
        http = (
            [f"python_package_path {_quoted(';'.join(os.path.abspath(p) for p in paths))};"] if paths else []
        )
        http += [f"python_shared_dict {name} {size};" for name, size in (shared_dicts or {}).items()]
        servers = [f"server {p}{server_args};" for p in peers] + [f"server {p} backup;" for p in backup]
        budget = max(round(timeout_ms), 1)  # the directive takes whole milliseconds
        directive = f"{phase}_by_python_file {_quoted(hook)}; {phase}_by_python_timeout {budget}ms;"
        text = HOOK_CONF.format(
            http="\n    ".join(http),
            servers="\n        ".join(servers),
            balancer=(method + " " + directive) if phase == "balancer" else method,
            location=(directive if phase == "log" else "") + " " + proxy,
        )
        temp = tempfile.TemporaryDirectory(prefix="scriptlb-kit-")
        conf_file = Path(temp.name) / "hook.conf"
        conf_file.write_text(text)
        try:
            kit = cls(str(conf_file), prefix=temp.name)
        except BaseException:
            temp.cleanup()
            raise
        kit._temp = temp
        return kit

    @classmethod
    def from_conf(
        cls, conf_file: str | os.PathLike[str], upstream: str | None = None, prefix: str | None = None
    ) -> HookKit:
        """An upstream's hook (``_file`` or ``_block``, its ``python_package_path``, shared
        dicts, ``balancer_by_python_timeout``) and its location's log hook, from a config."""
        return cls(os.fspath(conf_file), upstream, prefix)

    # ------------------------------------------------------------------ the world

    @property
    def now(self) -> float:
        """The virtual clock (what ``ngx.now()`` returns in the hook)."""
        return self.offline.loop.now

    def advance(self, seconds: float) -> None:
        """Move the virtual clock (timers due run: the statistics' publication)."""
        self.offline.loop.run_until(self.offline.loop.now + seconds)

    @property
    def shared(self) -> dict[str, Any]:
        """The config's ``python_shared_dict`` zones by name (the same objects the hook gets)."""
        return dict(api._SHARED)

    def peer(self, name: str, backup: bool = False) -> Any:
        """The balancer's ``Peer`` named ``name`` (``down``, ``fails``, ``weight``... may be set)."""
        peers = self.upstream.peers.backup if backup else self.upstream.peers.primary
        for peer in peers:
            if peer.name == name:
                return peer
        raise KeyError(name)

    def record(
        self, peer: str, status: int = 200, latency: float | None = 0.010, failed: bool = False
    ) -> None:
        """A finished try in the live peer statistics (what ``get_primary_peers()`` reports:
        requests, failures, ewma...), at the current virtual time."""
        stats = self.upstream.stats
        if stats is None:
            raise RuntimeError(
                "no peer statistics: python_peer_stats is off, or no hook of the config can read them"
            )
        index = stats.start_address(peer)
        if index < 0:
            raise KeyError(peer)
        stats.finish(index, status, latency, failed)
        self.offline.recorder.flush()  # type: ignore[union-attr]

    # ------------------------------------------------------------------ running

    def run(
        self,
        uri: str = "/",
        *,
        method: str = "GET",
        headers: Any = None,
        remote_addr: str = "127.0.0.1",
        last_failure: tuple[str, int] | None = None,
        ctx: Mapping[str, Any] | None = None,
        tries_cap: int | None = None,
    ) -> HookResult:
        """One balancer run for a request (a retry's when ``last_failure`` is ("failed", 502))."""
        hook = self.upstream.hook
        if hook is None:
            raise RuntimeError(f"upstream {self.upstream.name} has no balancer_by_python hook")
        cap = self.offline.proxy.next_upstream_tries if tries_cap is None else tries_cap
        ex = SyntheticExchange(
            method,
            uri,
            _headers(headers),
            len(self.upstream.peers.primary),
            last_failure,
            cap,
            remote_addr,
            self.now,
            self.upstream.name,
        )
        ex.location = self.offline.location
        proxy = self.offline.proxy
        ex.connect_timeout, ex.send_timeout, ex.read_timeout = (
            proxy.connect_timeout,
            proxy.send_timeout,
            proxy.read_timeout,
        )
        if ctx:
            ex.ctx.update(ctx)
        logged = len(self.offline.logs)
        outcome = hook.run(ex, self.upstream)
        return self._result(outcome, ex, self._lines(logged))

    def request(
        self,
        uri: str = "/",
        *,
        method: str = "GET",
        headers: Any = None,
        remote_addr: str = "127.0.0.1",
        fail: Sequence[Failure] = (),
        latency: float = 0.010,
        status: int = 200,
        tries_cap: int | None = None,
    ) -> RequestResult:
        """A whole request through the tries loop: the n-th try fails with ``fail[n]`` (a status,
        "error" or "timeout") while there are any, then the peer answers ``status``. Retries
        follow the location's ``proxy_next_upstream``; the peers' failures count towards
        ``max_fails``; the log hook runs at the end. The clock moves by the tries' ``latency``.
        ``tries_cap`` replaces ``proxy_next_upstream_tries`` (0: no cap)."""
        for failure in fail:
            if failure not in (ERROR, TIMEOUT) and not (isinstance(failure, int) and 100 <= failure <= 999):
                raise ValueError(f'a failure is a status or "error" or "timeout", not {failure!r}')
        engine = Engine(self.offline, {}, _Scripted(fail, latency), tries_cap=tries_cap)
        engine.trace = []
        logged = len(self.offline.logs)
        recorded = Recorded(0, self.now, method, uri, _headers(headers), remote_addr, status, None, False)
        engine.arrive(recorded, self.now)
        self.offline.loop.run_until(self.now)
        while engine.finished is None and self.offline.loop.heap:
            self.offline.loop.run_until(self.offline.loop.heap[0][0])
        ex = engine.finished
        assert ex is not None
        return RequestResult(self._tries(engine, ex, logged), ex.status, self._lines(logged))

    def log(
        self,
        uri: str = "/",
        *,
        method: str = "GET",
        headers: Any = None,
        remote_addr: str = "127.0.0.1",
        status: int = 200,
        upstream_addr: str | None = None,
        upstream_status: str | None = None,
        upstream_response_time: str | None = None,
        request_time: float = 0.0,
        ctx: Mapping[str, Any] | None = None,
    ) -> LogResult:
        """One log_by_python run for a finished request (``upstream_*`` as nginx lists them:
        "127.0.0.1:9001, 127.0.0.1:9002", "502, 200", "0.010, 0.003")."""
        hook = self.offline.log_hook
        if hook is None:
            raise RuntimeError("the location has no log_by_python hook")
        now = self.now
        ex = SyntheticExchange(
            method,
            uri,
            _headers(headers),
            remote_addr=remote_addr,
            start_time=now - request_time,
            upstream_name=self.upstream.name,
        )
        ex.location = self.offline.location
        ex.status = status
        ex.tries = [
            TryRecord(addr, ex.start_time, code or None, duration)
            for addr, code, duration in parse_tries(upstream_addr, upstream_status, upstream_response_time)
        ]
        if ctx:
            ex.ctx.update(ctx)
        logged = len(self.offline.logs)
        error = hook.run(ex, now)
        return LogResult(error or "ok", self._lines(logged))

    # ------------------------------------------------------------------ results

    def _lines(self, since: int) -> list[str]:
        return [f"[{level}] {message}" for level, message in self.offline.logs[since:]]

    def _result(self, outcome: HookOutcome, ex: SyntheticExchange, logs: list[str]) -> HookResult:
        kind = (
            "exit" if outcome.exit_status is not None and outcome.error is None else _OUTCOMES[outcome.error]
        )
        error = NO_PEER_NOTE if outcome.error == "no_peer" else outcome.message
        return HookResult(
            outcome=kind,
            peer=outcome.addr.name if outcome.addr is not None else None,
            host=outcome.host,
            more_tries=outcome.more_tries,
            timeouts={"connect": ex.connect_timeout, "send": ex.send_timeout, "read": ex.read_timeout},
            exit_status=outcome.exit_status,
            keepalive=outcome.keepalive,
            ctx=ex.ctx,
            logs=logs,
            error=error,
            fallback=outcome.error,
        )

    def _tries(self, engine: Engine, ex: Any, logged: int) -> list[TryResult]:
        """The engine's trace of decisions, each with its try's record (an exit has none)."""
        method = self.upstream.conf.method.kind
        records = iter(ex.tries)
        results = []
        before = logged
        assert engine.trace is not None
        for outcome, peer, lines in engine.trace:
            hook = None
            chosen = method
            if outcome is not None:
                hook = self._result(outcome, ex, self._lines(before)[: lines - before])
                chosen = "hook" if outcome.error is None else f"fallback({outcome.error}): {method}"
            before = lines
            exited = hook is not None and hook.outcome == "exit"
            record = None if exited else next(records, None)
            results.append(
                TryResult(
                    peer,
                    "hook(exit)" if exited else chosen,
                    record.status if record is not None else None,
                    hook,
                )
            )
        return results

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        self.offline.close()
        if self._temp is not None:
            self._temp.cleanup()
            self._temp = None

    def __enter__(self) -> HookKit:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
