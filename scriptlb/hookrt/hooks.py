"""balancer_by_python and log_by_python: compile hooks once, run them under a budget.

``HookRunner`` runs an upstream's balancer hook once per try and hands the outcome to the
proxy; ``LogHookRunner`` runs a location's log hook once per finished request. Both share
``_Runner``: the code, the budget, the fuse, ``api.CURRENT`` and the rate-limited error log.

The seam (docs/architecture.md): before every try the exchange calls
``upstream.hook.run(exchange, upstream)``, which never raises and returns a ``HookOutcome``.
A run that raises, exceeds its budget, sets no peer or calls ``ngx.exit`` with an error code
yields an outcome without a peer, so the try falls back to the upstream's balancer; the reason
is logged (rate-limited) with the hook's file:line.

A run executes the hook's top-level code with fresh globals (``balancer``, ``ngx``,
``upstream`` and the shared, read-only builtins), like a Lua chunk. The code object is compiled
when the configuration loads (``precompile``) and cached by source text, so a worker forked
from the master that checked the config does not compile again.
"""

from __future__ import annotations

import ast
import os
import time
import traceback
from bisect import bisect_left
from collections.abc import Callable
from types import CodeType, TracebackType
from typing import Any, Generic, Protocol, TypeVar

from scriptlb.config import load
from scriptlb.config.errors import ConfigError
from scriptlb.config.model import BreakerConf, HookConf, MainConf, PythonConf, Source
from scriptlb.hookrt import api
from scriptlb.hookrt.api import HookOutcome as HookOutcome  # (beside the API that writes it)
from scriptlb.hookrt.api import HookUpstream, LogSink
from scriptlb.logs import errorlog
from scriptlb.request_view import HookedRequest, HookRequest, RequestView
from scriptlb.sandbox import limits, lint
from scriptlb.sandbox.guards import make_builtins
from scriptlb.sandbox.importer import HOOK_DIR_KEY, OWNER_KEY, Importer
from scriptlb.sandbox.limits import HookTimeout
from scriptlb.sandbox.policy import HOOK_FUNCTION, HookCompileError, compile_hook

_Result = TypeVar("_Result")  # what a runner's run() returns for a failed run
_BUDGET = limits.BUDGET
_CONTEXT = api.CURRENT  # (never rebound: runs point its fields at their request)
_clock = limits.clock
# scriptlb_hook_duration_seconds' buckets: hook runs take microseconds to their budget (10 ms)
RUN_BUCKETS = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025)
_BUCKET_0, _BUCKET_1, _BUCKET_2, _BUCKET_3, _BUCKET_4, _BUCKET_5 = RUN_BUCKETS[:6]  # where runs land
_BALANCER = api.BALANCER_PHASE
# the scriptlb package (this file is one level below it): frames from there are host code
_HOST_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


# --------------------------------------------------------------------------- shared runtime


class _Printer:
    """What ``print()`` in a hook becomes: ngx.log(ngx.NOTICE, ...), like print() in ngx_lua."""

    def _call_print(self, *objects: Any, sep: Any = " ", end: str = "\n", **_: Any) -> None:
        api.ngx.log(api.Ngx.NOTICE, api.log_text(objects, sep if type(sep) is str else " "))

    def __call__(self) -> str:  # `printed` reads nothing: output goes to the error log
        return ""


_PRINTER = _Printer()
IMPORTER = Importer()
BUILTINS = make_builtins({"__import__": IMPORTER.__call__, "_print_": lambda _getattr=None: _PRINTER,
                          "_var_": api.hook_variable})
_NAMESPACE = {"ngx": api.ngx}


def _fresh_globals(name: str, hook_dir: str | None = None) -> dict[str, Any]:
    return {"__builtins__": BUILTINS, "__name__": name, OWNER_KEY: {}, HOOK_DIR_KEY: hook_dir,
            "balancer": api.balancer, "ngx": api.ngx, "upstream": api.upstream}


IMPORTER.configure((), _fresh_globals, _NAMESPACE)
# what a run's globals provide: a hook rebinding none of them runs as a function (compile_hook)
_BODY_NAMES = frozenset(BUILTINS) | frozenset(_fresh_globals("__hook__"))
_CODE_CACHE: dict[tuple[str, str], CodeType] = {}
_PYTHON_CONF = [PythonConf()]  # the http{} settings of the last precompiled config
# The code of each hook as compiled when the configuration loaded (precompile). Workers forked
# from the master inherit it, so a worker the master respawns later runs the hook the config
# was checked with, even if the file has been edited since (as nginx: only a reload reloads).
_LOADED: dict[HookConf, CodeType] = {}


def configure(python: PythonConf) -> None:
    """Apply http-level hook settings (package path) to this process."""
    _PYTHON_CONF[0] = python
    IMPORTER.configure(python.package_path, _fresh_globals, _NAMESPACE)


# --------------------------------------------------------------------------- compiling


def _read_source(hook: HookConf) -> tuple[str, int]:
    """(source, line of its first line in the file that holds it)."""
    if hook.kind == "file":
        assert hook.path is not None
        with open(hook.path, encoding="utf-8") as f:
            return f.read(), 1
    return hook.code or "", hook.first_line or hook.source.line + 1


def _error_file(hook: HookConf) -> str:
    return hook.path if hook.kind == "file" and hook.path else hook.source.file


def load_code(hook: HookConf) -> CodeType:
    """Compile ``hook`` (cached by source). Raises HookCompileError or OSError."""
    source, first_line = _read_source(hook)
    key = (hook.chunk_name, source)
    code = _CODE_CACHE.get(key)
    if code is None:
        code = compile_hook(source, hook.chunk_name, first_line, _BODY_NAMES)
        if len(_CODE_CACHE) > 256:
            _CODE_CACHE.clear()
        _CODE_CACHE[key] = code
    return code


def _config_error(hook: HookConf, err: Exception, where: str | None = None) -> ConfigError:
    what = (f'failed to load external Python file "{hook.path}"' if hook.kind == "file"
            else "failed to load inlined Python code")
    if isinstance(err, HookCompileError):
        return ConfigError(f"{what}: {err.message}", Source(where or _error_file(hook), err.lineno or 1))
    reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
    return ConfigError(f"{what}: {reason}", hook.source)


_LINT_API = {"balancer": api.balancer, "ngx": api.ngx, "upstream": api.upstream,
             "ngx.balancer": api.balancer, "ngx.upstream": api.upstream, "ngx.req": api.ngx.req,
             "ngx.worker": api.ngx.worker}


def _module_tree(path: str) -> ast.Module | str:
    """A package module's AST for the load-time checks, or its compile error with file:line."""
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
        compile_hook(source, path)
    except HookCompileError as err:
        return f"{err.message} in {path}:{err.lineno}"
    except (OSError, UnicodeDecodeError) as err:
        return f"{err} in {path}:1"
    return ast.parse(source, path)


def lint_hook(hook: HookConf, python: PythonConf) -> None:
    """The load-time checks (scriptlb.sandbox.lint) of a hook that compiled: the first finding
    is a ConfigError at its file:line."""
    source, first_line = _read_source(hook)
    tree = ast.parse(source, hook.chunk_name)
    if first_line != 1:
        ast.increment_lineno(tree, first_line - 1)
    finder = Importer()
    finder.package_path = python.package_path  # the new config's path, without touching IMPORTER
    context = lint.Context(builtins=frozenset(name for name in BUILTINS if not name.startswith("_")),
                           api=_LINT_API, find=finder.find, compile_tree=_module_tree)
    findings = lint.check(tree, _error_file(hook), os.path.dirname(_error_file(hook)), context)
    if findings:
        first = findings[0]
        raise _config_error(hook, HookCompileError(first.message, first.line), first.file)


def load_and_check(conf_file: str, prefix: str | None = None, globals_: str | None = None) -> MainConf:
    """``config.load()``, then ``precompile`` every hook, so a hook's syntax or sandbox-policy
    error is a config error too (``scriptlb -t``, a reload, a start)."""
    conf = load(conf_file, prefix, globals_)
    precompile(conf)
    return conf


def precompile(conf: MainConf) -> None:
    """Compile every hook of ``conf`` (balancer_by_python and log_by_python); a syntax or
    policy error is a ConfigError at file:line.

    Only a configuration whose hooks all compile replaces the loaded code (a refused reload
    leaves the running configuration's hooks as they were)."""
    hooks = conf.http.hooks() if conf.http is not None else ()  # balancer, then log hooks
    hooks += conf.stream.hooks() if conf.stream is not None else ()
    if not hooks:
        return
    loaded: dict[HookConf, CodeType] = {}
    python = conf.http.python if conf.http is not None else PythonConf()
    for hook in hooks:
        try:
            loaded[hook] = load_code(hook)
        except (HookCompileError, OSError, UnicodeDecodeError) as err:
            raise _config_error(hook, err) from None
        lint_hook(hook, python)
    if conf.http is not None:
        configure(conf.http.python)
    _LOADED.clear()
    _LOADED.update(loaded)


# --------------------------------------------------------------------------- logging


def errorlog_sink_for(action: str) -> LogSink:
    """A sink writing to the worker's error log with the request's usual context, ending
    as nginx's lines of that phase do: ``... while <action>, client: ...``."""
    suffix = f" while {action}"

    def sink(level: str, message: str, exchange: HookRequest | None) -> None:
        if exchange is None:
            errorlog.log_error(level, message)
            return
        try:
            ctx = errorlog.request_context(exchange)
            conn_id = exchange.conn_id
        except AttributeError:
            ctx, conn_id = "", None
        errorlog.log_error(level, message + suffix, conn_id, ctx)

    return sink


errorlog_sink = errorlog_sink_for("connecting to upstream")  # the balancer phase's default
log_phase_sink = errorlog_sink_for("logging request")  # nginx's action text of the log phase


class _RateLimit:
    """At most ``limit`` lines per ``interval`` per kind; then one "N suppressed" note."""

    __slots__ = ("_windows", "interval", "limit")

    def __init__(self, limit: int = 10, interval: float = 1.0) -> None:
        self.limit = limit
        self.interval = interval
        self._windows: dict[str, list[float]] = {}  # kind -> [window start, written, suppressed]

    def admit(self, kind: str, now: float) -> tuple[bool, int]:
        """(write this line?, lines suppressed in the previous window to report first)."""
        window = self._windows.get(kind)
        suppressed = 0
        if window is None or now - window[0] >= self.interval:
            suppressed = int(window[2]) if window is not None else 0
            window = self._windows[kind] = [now, 0, 0]
        if window[1] >= self.limit:
            window[2] += 1
            return False, 0
        window[1] += 1
        return True, suppressed


def _hook_frame(tb: TracebackType | None) -> str:
    """file:line of the innermost hook-code frame of a traceback."""
    where = "?"
    for frame, lineno in traceback.walk_tb(tb):
        if not frame.f_code.co_filename.startswith(_HOST_DIR):
            where = f"{frame.f_code.co_filename}:{lineno}"
    return where


# --------------------------------------------------------------------------- circuit breaker

CLOSED, OPEN, PROBING = "closed", "open", "probing"
_COUNTED = frozenset({"runtime_error", "timeout", "compile_error"})  # what trips the breaker


class Breaker:
    """The hook's circuit breaker (``balancer_by_python_breaker``), one per runner per worker.

    A hook that keeps failing costs every request its budget (a runaway loop: 10 ms of CPU per
    try) and then the fallback anyway. After ``fails`` failed runs within ``window`` seconds the
    breaker opens: runs are skipped (straight to the fallback, or 500 with fallback off) for
    ``cooldown`` seconds. Then it lets one run through (runs never overlap in a worker, so that
    is "one request at a time"): success closes it, failure opens it for another cool-off.
    """

    __slots__ = ("conf", "failures", "open_until", "skipped", "state", "trips", "window_start")

    def __init__(self, conf: BreakerConf) -> None:
        self.conf = conf
        self.state = CLOSED
        self.failures = 0  # failed runs in the current window
        self.window_start = 0.0
        self.open_until = 0.0
        self.trips = 0  # times it opened
        self.skipped = 0  # runs skipped while open

    def admits(self, now: float) -> bool:
        """Called only while not CLOSED: False while cooling off, else the probe goes ahead.
        ``now`` is the hooks' clock (a replay's virtual time); a clock set back past the
        opening ends the cool-off rather than stretching it."""
        if self.open_until - self.conf.cooldown <= now < self.open_until:
            self.skipped += 1
            return False
        self.state = PROBING
        return True

    def failed(self, now: float) -> bool:
        """Count a failed run; True when this failure opened the breaker."""
        if self.state is not PROBING:
            if now - self.window_start > self.conf.window:
                self.window_start, self.failures = now, 0
            self.failures += 1
            if self.failures < self.conf.fails:
                return False
        self.state, self.open_until, self.failures = OPEN, now + self.conf.cooldown, 0
        self.trips += 1
        return True

    def succeeded(self) -> None:
        self.state, self.failures = CLOSED, 0


# --------------------------------------------------------------------------- the runners


class _Runner(Generic[_Result]):
    """What every phase's runner shares: the compiled code (or ``python_code_cache off``'s
    reload per run), and one run under the budget and the fuse with ``api.CURRENT`` pointing at
    the request; a failure is reported (escaped, rate-limited per kind) through ``_fail``."""

    phase = ""  # api.RunContext.phase of a run: what ngx.get_phase() says, what the API allows
    directive = ""  # the name in error messages: "balancer_by_python", "log_by_python"

    def __init__(self, conf: HookConf, python: PythonConf | None, log: LogSink) -> None:
        self.conf = conf
        self.python = python or _PYTHON_CONF[0]
        if python is not None:
            configure(python)
        self.timeout = conf.timeout
        self.chunk = conf.chunk_name
        self.log: LogSink = log
        self._limit = _RateLimit()
        limits.quiet_unraisable_stops()  # a generator finalized past the budget: no stderr noise
        self._globals = _fresh_globals("__hook__", os.path.dirname(_error_file(conf)))
        # for the metrics (scriptlb.ops.metrics): failures by kind, durations per bucket
        self.failures: dict[str, int] = {}
        self.durations = [0] * (len(RUN_BUCKETS) + 1)
        self.duration_sum = 0.0
        self.last_spent = 0.0  # the duration (seconds) of the last run through _execute
        self._call: Callable[[], object] | None = None  # what a run calls (code cache on)
        self._compile_error: str | None = None
        self.breaker = Breaker(conf.breaker) if conf.breaker is not None else None
        self._tripped = False  # the breaker is open or probing (one test on the hot path)
        self._cached = self.python.code_cache  # (one attribute read per run)
        if self._cached:
            self._call = self._callable(self._load())
        # what a balancer run calls without the checks of _execute: the compiled hook while the
        # code is cached and the breaker closed, else None (the run takes the general path)
        self._ready: Callable[[], object] | None = self._call

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.chunk} timeout={self.timeout}>"

    def _load(self) -> CodeType | None:
        if self.python.code_cache:
            code = _LOADED.get(self.conf)
            if code is not None:
                return code
        try:
            code = load_code(self.conf)
        except (HookCompileError, OSError, UnicodeDecodeError) as err:
            self._compile_error = str(_config_error(self.conf, err)).removeprefix("[emerg] ")
            return None
        self._compile_error = None
        return code

    def _execute(self, exchange: HookedRequest, upstream: HookUpstream,
                 outcome: HookOutcome) -> _Result | None:
        """Run the hook once. None when it ran to its end; otherwise what ``_fail`` returned
        for the error (already logged). Never raises (except KeyboardInterrupt-like stops).

        Every balancer try and log run goes through here: what does not change per run (the
        code, the phase, the sink) is read off the runner, and the run allocates nothing but
        its globals' copy (a Lua chunk's fresh environment)."""
        if self._tripped and not self._admitted():
            return self._skip(outcome, exchange)
        call = self._call if self._cached else self._reload()
        if call is None:
            self.last_spent = 0.0
            return self._failed(outcome, "compile_error", self._compile_error or "cannot load hook", exchange)
        context = _CONTEXT
        context.exchange = exchange
        if exchange.is_stream:
            context.stream, context.http = exchange, None
        else:
            context.http, context.stream = exchange, None
        context.upstream = upstream
        context.phase = self.phase
        context.outcome = outcome
        context.log = self.log
        context.logged = 0
        context.counted = outcome  # (LOG_OUTCOME is every log run's: start the count here)
        budget = _BUDGET
        budget.tripped = False  # (False between runs already: see limits.tick)
        stamp = limits.STAMP  # the hard fuse's stamp (a worker's own mapping)
        stamp[0] = started = _clock()
        budget.deadline = started + self.timeout
        failure: BaseException | None = None
        try:
            call()
        except (Exception, HookTimeout) as err:
            failure = err
        finally:
            self._ended(started)
            stopped, budget.tripped = budget.tripped, False
        if stopped or failure is not None:
            return self._failed_run(outcome, failure, stopped, exchange)
        if self._tripped:  # the probe succeeded
            self._closed()
        return None

    def _ended(self, started: float) -> None:
        """After a run, however it ended: no deadline, no fuse stamp, no request in the API;
        its duration counted (``last_spent``, the histogram)."""
        _BUDGET.deadline = 0.0
        limits.STAMP[0] = 0.0
        context = _CONTEXT
        context.exchange = context.http = context.stream = None
        context.upstream = context.outcome = None
        context.phase = _BALANCER  # (between runs: a balancer run need not set it)
        self.last_spent = spent = _clock() - started
        self.duration_sum += spent
        self.durations[bisect_left(RUN_BUCKETS, spent)] += 1

    @property
    def runs(self) -> int:
        """Runs that started (the durations' histogram counts each once)."""
        return sum(self.durations)

    def _reload(self) -> Callable[[], object] | None:
        """``python_code_cache off``: modules and the hook are read again for every run."""
        IMPORTER.forget()
        return self._callable(self._load())

    def _callable(self, code: CodeType | None) -> Callable[[], object] | None:
        """What a run calls: the hook's function (compiled as one, see compile_hook), defined
        in the runner's globals, which no run can change; or else the module body, executed
        in a fresh copy of them."""
        if code is None:
            return None
        base = self._globals
        if code.co_names == (HOOK_FUNCTION,):  # (hook code cannot spell the name)
            exec(code, base)
            function: Callable[[], object] = base.pop(HOOK_FUNCTION)
            return function
        return lambda: exec(code, base.copy())

    def _admitted(self) -> bool:
        """The breaker is open or probing: may this run go ahead (the probe)?"""
        breaker = self.breaker
        return breaker is None or breaker.admits(api.clock())

    def _closed(self) -> None:
        breaker = self.breaker
        if breaker is not None:
            breaker.succeeded()
        self._tripped = False
        self._ready = self._call if self._cached else None
        self._emit("notice", f"{self.directive} {self.chunk}: circuit breaker closed, "
                   "the hook runs again", None)

    def _failed_run(self, outcome: HookOutcome, failure: BaseException | None, stopped: bool,
                    exchange: HookRequest) -> _Result:
        where = _hook_frame(failure.__traceback__) if failure is not None else self.chunk
        if stopped:
            ms = round(self.timeout * 1000)
            return self._failed(outcome, "timeout", f"{self.directive} timed out after {ms}ms at {where}",
                                exchange)
        assert failure is not None
        detail = api.exception_text(failure)  # KeyError(huge key) must not build the key's text
        text = f"{type(failure).__name__}: {detail}" if detail else type(failure).__name__
        return self._failed(outcome, "runtime_error", f"failed to run {self.directive}: {where}: {text}",
                            exchange)

    def _failed(self, outcome: HookOutcome, kind: str, message: str, exchange: HookRequest) -> _Result:
        """A run that failed: ``_fail`` (which counts it), then the breaker's count."""
        result = self._fail(outcome, kind, message, exchange)
        breaker = self.breaker
        if breaker is not None and kind in _COUNTED and breaker.failed(api.clock()):
            self._tripped = True
            self._ready = None
            conf = breaker.conf
            self._emit("error", f"{self.directive} {self.chunk}: circuit breaker open after {conf.fails} "
                       f"failed runs in {conf.window:g}s, skipping the hook for {conf.cooldown:g}s "
                       "(then one request at a time)", None)
        return result

    def _skip(self, outcome: HookOutcome, exchange: HookRequest) -> _Result:
        """A run the open breaker skips: counted (outcome "breaker_open" in the metrics), no log
        line (the opening said it); the subclass says what its run() returns for it."""
        raise NotImplementedError

    def _count_skip(self) -> None:
        self.last_spent = 0.0
        self.failures["breaker_open"] = self.failures.get("breaker_open", 0) + 1

    def stats(self) -> dict[str, object]:
        """This worker's figures of the hook: failed (or skipped) runs by kind, and the
        breaker's state."""
        breaker = self.breaker
        return {"failures": dict(self.failures),
                "breaker": None if breaker is None else breaker.state,
                "breaker_trips": 0 if breaker is None else breaker.trips,
                "breaker_skipped": 0 if breaker is None else breaker.skipped}

    def _fail(self, outcome: HookOutcome, kind: str, message: str, exchange: HookRequest | None,
              level: str = "error") -> _Result:
        """Log why a run failed; the subclass says what its run() returns for it."""
        raise NotImplementedError

    def _report(self, kind: str, message: str, exchange: HookRequest | None, level: str) -> str:
        """Log ``message`` (escaped: exception text is hook-made), rate-limited per kind;
        returns the escaped text."""
        self.failures[kind] = self.failures.get(kind, 0) + 1
        message = api.escape_log(message[:api.MAX_LOG_MESSAGE])
        write, suppressed = self._limit.admit(kind, time.monotonic())
        if suppressed:
            self._emit(level, f"{self.chunk}: {suppressed} similar messages suppressed", None)
        if write:
            self._emit(level, message, exchange)
        return message

    def _emit(self, level: str, message: str, exchange: HookRequest | None) -> None:
        try:
            self.log(level, message, exchange)
        except Exception:  # a failing log sink must not fail the request: run() never raises
            pass


class HookRunner(_Runner[HookOutcome]):
    """One upstream's balancer_by_python hook in one worker: ``run()`` per try."""

    phase = api.BALANCER_PHASE
    directive = "balancer_by_python"

    def __init__(self, conf: HookConf, upstream: HookUpstream | None = None, python: PythonConf | None = None,
                 log: LogSink | None = None) -> None:
        self.upstream = upstream
        super().__init__(conf, python, log or errorlog_sink)

    def run(self, exchange: HookedRequest, upstream: HookUpstream | None = None) -> HookOutcome:
        """Run the hook for this try. Never raises (except KeyboardInterrupt-like stops)."""
        if upstream is None or exchange.is_stream:  # (a stream session's variables are its own)
            outcome = HookOutcome()
            outcome.plain = True
            return self._run_checked(exchange, upstream, outcome)
        ran = run_try(_Try(exchange, upstream), self)
        assert ran is not None  # (_Try hands every outcome back as it is)
        return ran

    def _run_checked(self, exchange: HookedRequest, upstream: HookUpstream | None,
                     outcome: HookOutcome) -> HookOutcome:
        """A run through ``_execute``: the breaker open or probing, ``python_code_cache off``,
        a compile error, or no upstream given."""
        if upstream is None:
            upstream = self.upstream or api.NO_UPSTREAM
        failed = self._execute(exchange, upstream, outcome)
        outcome.spent = self.last_spent
        if failed is not None:
            return failed
        return self._checked(outcome, exchange)

    def _checked(self, outcome: HookOutcome, exchange: HookedRequest) -> HookOutcome:
        """What a run that ended set: a peer (the usual), ngx.exit's status or nothing."""
        status = outcome.exit_status
        if status is None and outcome.addr is not None:  # a peer was set: the usual run
            return outcome
        if status is not None and not 300 <= status <= 999:
            what = "falling back" if self.conf.fallback else "answering 500"
            return self._failed(outcome, "exit_error",
                                f"{self.chunk}: ngx.exit({status}) in a balancer hook, {what}", exchange)
        if outcome.addr is None and status is None:
            return self._fail(outcome, "no_peer", f"{self.chunk}: python balancer: no peer set, "
                              "falling back", exchange, level="warn")
        return outcome

    def _fail(self, outcome: HookOutcome, kind: str, message: str, exchange: HookRequest | None,
              level: str = "error") -> HookOutcome:
        """Reset the outcome to "fall back" and log why (rate-limited per kind)."""
        self._reset(outcome, kind)
        outcome.message = self._report(kind, message, exchange, level)
        return outcome

    def _reset(self, outcome: HookOutcome, kind: str) -> None:
        """Nothing the failed run set counts. With ``balancer_by_python_fallback off`` a failure
        answers 500 as OpenResty does; a run that sets no peer still uses the upstream's own
        servers (OpenResty's round robin over them) either way."""
        outcome.addr = outcome.host = outcome.exit_status = outcome.keepalive = outcome.local_addr = None
        outcome.more_tries = 0
        outcome.recreate = outcome.plain = False
        outcome.error = kind
        if kind != "no_peer" and not self.conf.fallback:
            outcome.exit_status = 500

    def _skip(self, outcome: HookOutcome, exchange: HookRequest) -> HookOutcome:
        self._count_skip()
        self._reset(outcome, "breaker_open")
        outcome.message = f"{self.chunk}: circuit breaker open, hook skipped"
        return outcome


class HookTries(Protocol):
    """An HTTP request's tries loop as ``run_try`` sees it: ``proxy.UpstreamRequest``, or
    ``_Try`` (``HookRunner.run``)."""

    @property
    def exchange(self) -> RequestView: ...
    @property
    def upstream(self) -> HookUpstream: ...

    def apply_hook_outcome(self, outcome: HookOutcome) -> HookOutcome | None:
        """What a run that did more than set the peer changes for this and later tries; None
        when that ended the request (ngx.exit)."""


class _Try:
    """``HookRunner.run``'s arguments as ``run_try``'s tries loop, which hands every outcome back."""

    __slots__ = ("exchange", "upstream")

    def __init__(self, exchange: RequestView, upstream: HookUpstream) -> None:
        self.exchange = exchange
        self.upstream = upstream

    @staticmethod
    def apply_hook_outcome(outcome: HookOutcome) -> HookOutcome:
        return outcome


def run_try(tries: HookTries, runner: HookRunner) -> HookOutcome | None:
    """Run ``runner``'s hook before a try of an HTTP request's ``tries``. Never raises (except
    KeyboardInterrupt-like stops). A plain outcome (the usual run: it set the peer and nothing
    else) comes back as it is; any other through ``tries.apply_hook_outcome``.

    The HTTP tries loop takes this function as its own method, so the usual run (code cached,
    breaker closed, the hook sets a peer) is written out here, in the one frame between the
    loop and the hook's code: it runs before every try of every request. It does what
    ``_execute`` does, in the same order; every other case goes through ``_run_checked``."""
    outcome = HookOutcome()
    # what the tries loop reads first after every run (the API calls that set more than the
    # peer clear it), as the instance's own: a read of a class-level default is a dictionary
    # miss, then a class lookup, every time
    outcome.plain = True
    try:
        call = runner._ready
    except AttributeError:  # another runner behind the seam (a stand-in): its own run()
        ran = runner.run(tries.exchange, tries.upstream)
        if not hasattr(ran, "plain"):  # an outcome of its own making: every field is read
            ran.plain = False
        return tries.apply_hook_outcome(ran)
    if call is None:
        return tries.apply_hook_outcome(runner._run_checked(tries.exchange, tries.upstream, outcome))
    context = _CONTEXT
    context.exchange = context.http = tries.exchange  # (stream stays None: it is between runs)
    context.upstream = tries.upstream
    # (the phase is the balancer's between runs: see _ended; ngx.log counts its lines per
    # outcome: see RunContext.counted)
    context.outcome = outcome
    context.log = runner.log
    stamp = limits.STAMP
    stamp[0] = started = _clock()
    _BUDGET.deadline = started + runner.timeout  # (its tripped flag is False between runs: see limits.tick)
    try:
        call()
    except BaseException as err:
        runner._ended(started)
        stopped, _BUDGET.tripped = _BUDGET.tripped, False
        if not isinstance(err, (Exception, HookTimeout)):
            raise
        outcome.spent = runner.last_spent
        return tries.apply_hook_outcome(runner._failed_run(outcome, err, stopped, tries.exchange))
    _BUDGET.deadline = 0.0
    stamp[0] = 0.0
    context.exchange = context.http = None
    context.upstream = context.outcome = None
    outcome.spent = spent = _clock() - started
    runner.duration_sum += spent
    # the histogram's bucket: bisect_left(RUN_BUCKETS, spent), its usual answers compared
    # here (bisect's generic comparisons cost more than the run's own bookkeeping)
    runner.durations[0 if spent <= _BUCKET_0 else 1 if spent <= _BUCKET_1 else 2 if spent <= _BUCKET_2
                     else 3 if spent <= _BUCKET_3 else 4 if spent <= _BUCKET_4 else 5 if spent <= _BUCKET_5
                     else bisect_left(RUN_BUCKETS, spent)] += 1
    if _BUDGET.tripped:  # it caught the timeout (a bare except) and ended anyway
        _BUDGET.tripped = False
        return tries.apply_hook_outcome(runner._failed_run(outcome, None, True, tries.exchange))
    if outcome.addr is not None:
        if outcome.plain:
            return outcome
        if outcome.exit_status is None:  # (what _checked would pass as it is)
            return tries.apply_hook_outcome(outcome)
    return tries.apply_hook_outcome(runner._checked(outcome, tries.exchange))


class LogHookRunner(_Runner[str]):
    """One log_by_python hook in one worker (shared by the locations inheriting it): ``run()``
    once per finished request, after its access log lines are written."""

    phase = api.LOG_PHASE
    directive = "log_by_python"

    def __init__(self, conf: HookConf, python: PythonConf | None = None, log: LogSink | None = None) -> None:
        super().__init__(conf, python, log or log_phase_sink)

    def run(self, exchange: RequestView, now: float = 0.0) -> str | None:
        """Run the hook for this finished request: None, or the kind of error ("runtime_error",
        "timeout", "compile_error"; already logged). Never raises (except KeyboardInterrupt-like
        stops) and changes nothing the client sees.

        ``now`` (time.time(), 0.0 = read the clock) is the log phase's time, so $request_time,
        $msec... read by the hook equal the access log's."""
        location = getattr(exchange, "location", None)
        upstream = getattr(location, "upstream", None)
        context = api.CURRENT
        context.now = now
        try:
            return self._execute(exchange, api.NO_UPSTREAM if upstream is None else upstream,
                                 api.LOG_OUTCOME)
        finally:
            context.now = 0.0

    def _fail(self, outcome: HookOutcome, kind: str, message: str, exchange: HookRequest | None,
              level: str = "error") -> str:
        self._report(kind, message, exchange, level)
        return kind

    def _skip(self, outcome: HookOutcome, exchange: HookRequest) -> str:
        self._count_skip()
        return "breaker_open"
