"""What a hook sees: ``balancer`` (ngx.balancer), the ``ngx`` namespace and ``upstream``.

The three objects are process-wide singletons. A hook run (scriptlb.hookrt.hooks: a balancer run per
try, a log run per finished request) points ``CURRENT`` at its phase, exchange, upstream
runtime and outcome before executing the hook and clears it afterwards, so no object is
allocated per run for the API, and a module imported once per worker (python_package_path)
that kept a reference to ``ngx`` still talks to the request being served. Runs never nest and a
worker runs one at a time. In the log phase the balancer API and ``ngx.exit`` are disabled, as
in OpenResty's log_by_lua.

Conventions (docs/hooks.md): argument errors raise ``TypeError``/``ValueError`` with
OpenResty's message text; refusals are returned as ``(None, "message")``; success is
``(True, None)`` (``set_more_tries`` may return ``(True, "reduced tries due to limit")``).
Only plain values (str, int, float, bool, None, tuples/lists/dicts of them) are returned.
Every public name of these classes is reachable by hook code, so internals start with ``_``.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import operator
import os
import re
import reprlib
import sys
import time
import zlib
from collections.abc import Callable, Iterable, Mapping
from types import FrameType
from typing import TYPE_CHECKING, Literal, NoReturn, Protocol, TypeGuard

from scriptlb.config.model import PeerAddr
from scriptlb.request_view import HookRequest, RequestView, StreamRequest
from scriptlb.sandbox.guards import (
    checked_method,
    expose,
    expose_dynamic,
    readable_names,
    text_size,
    writable,
)
from scriptlb.variables.evaluate import Getter, variable_getter  # imported here: not inside a run's budget

if TYPE_CHECKING:
    from scriptlb.state.peers import Peer, PeerSet
    from scriptlb.state.shared_dict import SharedDict
    from scriptlb.state.stats import UpstreamStats

# What the API functions return to hook code: (True, None) on success, (None, "why") when
# refused (set_more_tries: (True, "reduced tries due to limit")). Their arguments come from hook
# code and are typed ``object``: each function checks what it was given.
Result = tuple[Literal[True] | None, str | None]
Figures = tuple[object, ...]  # a peer's live statistics (scriptlb.stats.FIELDS), None: unrecorded
LogSink = Callable[[str, str, "HookRequest | None"], None]  # (level, message, request or None)

_OK: Result = (True, None)
MAX_MORE_TRIES = 1000  # one set_more_tries grant, when proxy_next_upstream_tries is 0 (unlimited)
MAX_LOG_MESSAGE = 2048  # nginx's NGX_MAX_ERROR_STR
MAX_LOGS_PER_RUN = 100
# the scriptlb package (this file is one level below it): frames from there are host code
_HOST_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


BALANCER_PHASE = "balancer"
LOG_PHASE = "log"


class HookOutcome:
    """What one balancer run decided. Class-level defaults keep a run's allocation to one empty
    object.

    ``plain`` is True while the run did nothing for the tries loop to act on but the peer:
    every API call that sets more than that (more tries, a keepalive override, a local address,
    a rebuilt request, ``ngx.exit``) and every failure clears it, so the tries loop tests one
    flag where it would otherwise test each of those fields on every try.

    ``error`` says why the try falls back: None (fine), "runtime_error", "timeout",
    "compile_error", "no_peer", "exit_error" (``ngx.exit`` with a code below 300) or
    "breaker_open" (skipped: the circuit breaker is open). With ``balancer_by_python_fallback
    off`` every error but "no_peer" comes with ``exit_status`` 500.
    """

    plain: bool = False  # (a run sets it True before the hook runs: hooks.run_try)
    addr: PeerAddr | None = None  # set_current_peer's address; None: fall back
    host: str | None = None  # set_current_peer's host (Host/SNI/pool key)
    more_tries: int = 0  # granted by set_more_tries (clamped), counted only with a peer
    exit_status: int | None = None  # ngx.exit(status >= 300): finish with it, contact no peer
    keepalive: tuple[float, int] | None = None  # enable_keepalive(idle_timeout, max_requests)
    local_addr: str | None = None  # bind_to_local_addr: "ip" or "ip:port", for this and later tries
    recreate: bool = False  # recreate_request() was called
    error: str | None = None
    message: str | None = None  # the logged text of the error, for `scriptlb hook run`
    # for $balancer_trace (read only when the variable is): the run's duration in seconds,
    # and what get_last_failure() returned, if the hook called it
    spent: float = 0.0
    failure_read: bool = False
    failure_seen: tuple[str, int] | None = None
    # set by the tries loop when set_current_peer named a peer the upstream's own methods
    # avoid now: "unhealthy", "draining", "down" or "unavail" (the try goes ahead)
    avoided: str | None = None

    def __repr__(self) -> str:
        fields = ("addr", "host", "more_tries", "exit_status", "keepalive", "local_addr", "error")
        shown = ", ".join(f"{f}={getattr(self, f)!r}" for f in fields if getattr(self, f) not in (None, 0))
        return f"HookOutcome({shown})"


class HookUpstream(Protocol):
    """The upstream a run serves, as ``ngx.upstream`` reads it (``runtime.UpstreamRuntime``;
    ``synthetic.SyntheticUpstream`` offline)."""

    @property
    def name(self) -> str: ...
    @property
    def peers(self) -> PeerSet: ...
    @property
    def stats(self) -> UpstreamStats | None: ...  # None: python_peer_stats off

    def refresh_weights(self) -> object: ...


class RunContext:
    """The run in progress (or none): what the API objects read and write."""

    __slots__ = ("counted", "exchange", "http", "log", "logged", "now", "outcome", "phase", "stream",
                 "upstream")

    def __init__(self) -> None:
        self.exchange: HookRequest | None = None
        # the same request by kind: ngx.var reads http's variables, or the session's own
        self.http: RequestView | None = None
        self.stream: StreamRequest | None = None
        self.upstream: HookUpstream | None = None
        self.outcome: HookOutcome | None = None  # not None while a run is active (LOG_OUTCOME: log phase)
        self.phase = BALANCER_PHASE  # the run's phase: ngx.get_phase(); balancer.* only in "balancer"
        self.log: LogSink | None = None  # the runner's
        self.logged = 0  # ngx.log lines of this run (capped: a loop must not flood the log)
        # the outcome of the run ``logged`` counts for: a balancer run's outcome is its own, so
        # ngx.log starts the count of a new run itself, and a run that logs nothing (the usual)
        # spends nothing on the count (a log run, whose outcome is shared, resets it: _execute)
        self.counted: HookOutcome | None = None
        self.now = 0.0  # the log phase's time (time.time()) for $request_time & co; 0.0 = the clock


class _NoUpstream:
    """``CURRENT.upstream`` of a log run in a location that proxies to no upstream."""

    __slots__ = ()

    def __getattr__(self, name: str) -> NoReturn:
        raise RuntimeError("no upstream")

    def refresh_weights(self) -> NoReturn:
        raise RuntimeError("no upstream")


class _LogOutcome(HookOutcome):
    """A log run's outcome: a run is active, with nothing to decide. The balancer API refuses
    the log phase before it writes; were a write to get through, it fails here instead of
    carrying over to the next log run."""

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise RuntimeError("API disabled in the context of log_by_python")


CURRENT = RunContext()
LOG_OUTCOME: HookOutcome = _LogOutcome()  # CURRENT.outcome of a log run: active, nothing to write
NO_UPSTREAM: HookUpstream = _NoUpstream()
_WORKER = [0, 1]  # ngx.worker.id(), ngx.worker.count()
# What ngx.now(), ngx.time() and the clocked variables read outside the log phase: the wall
# clock, or the virtual clock of an offline replay (scriptlb.replay).
_WALL = [time.time]


def set_clock(clock: Callable[[], float] | None = None) -> None:
    """Make hooks' time ``clock()`` (seconds since the epoch); None restores the wall clock."""
    _WALL[0] = clock or time.time


def clock() -> float:
    """The hooks' time: the wall clock, or a replay's virtual one (the circuit breaker's too)."""
    return _WALL[0]()


def set_worker(worker_id: int, worker_count: int) -> None:
    """worker.py tells the API which worker this is (ngx.worker.id()/count())."""
    _WORKER[0], _WORKER[1] = worker_id, worker_count


def _current() -> RunContext:
    if CURRENT.outcome is None:
        raise RuntimeError("no request found")
    return CURRENT


def _disabled(phase: str) -> RuntimeError:
    return RuntimeError(f"API disabled in the context of {phase}_by_python")  # OpenResty's words


def _request() -> HookRequest:
    """The request of the run in progress (set with its outcome and upstream, cleared with them)."""
    exchange = CURRENT.exchange
    if exchange is None:
        raise RuntimeError("no request found")
    return exchange


def _run_upstream() -> HookUpstream:
    upstream = CURRENT.upstream
    if upstream is None:
        raise RuntimeError("no request found")
    return upstream


def _refusal(run: RunContext) -> RuntimeError:
    """Why the balancer API refuses this call: no run in progress, or not a balancer run."""
    if run.outcome is None:
        return RuntimeError("no request found")
    return _disabled(run.phase)


def _not_plain(outcome: HookOutcome) -> None:
    """The run does more than set the peer (HookOutcome.plain): from its first such call, the
    fields the tries loop then reads are the instance's own (a class-level default read through
    an instance is a dictionary miss, then a class lookup)."""
    if outcome.plain:
        outcome.plain = outcome.recreate = False
        outcome.more_tries = 0
        outcome.exit_status = outcome.keepalive = outcome.local_addr = None


def _balancer_outcome() -> HookOutcome:
    """The outcome of the current run, which must be a balancer run (balancer.* and ngx.exit)."""
    run = CURRENT  # _current() inlined: these calls are on the balancer's hot path
    outcome = run.outcome
    if outcome is None:
        raise RuntimeError("no request found")
    if run.phase is not BALANCER_PHASE:  # always one of the two constants: identity suffices
        raise _disabled(run.phase)
    return outcome


def _type_name(value: object) -> str:
    return "nil" if value is None else type(value).__name__


def _bad_type(position: int, func: str, expected: str, value: object) -> TypeError:
    """Lua's argument error text, e.g. bad argument #3 to 'set_current_peer' (string expected, got int)."""
    return TypeError(f"bad argument #{position} to '{func}' ({expected} expected, got {_type_name(value)})")


def _is_number(value: object) -> TypeGuard[int | float]:
    return (type(value) is int or type(value) is float) and value == value  # NaN is not a number


# --------------------------------------------------------------------------- peer addresses

_IPV4 = re.compile(r"([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})")
_UNIX_PATH_MAX = 108  # sizeof(sockaddr_un.sun_path)
# set_current_peer's addr -> its port argument (None or an int) -> the parsed address (an
# address that does not parse is not kept: its call takes the checking path every time)
_PEER_CACHE: dict[str, dict[int | None, PeerAddr]] = {}
_PEER_CACHE_SIZE = [0]  # entries in all of _PEER_CACHE's dicts
_PEER_CACHE_MAX = 4096
_CACHED_ADDR_MAX = 128  # "unix:" + the longest socket path fits


# set_current_peer's host: a DNS name, an IPv4 literal or a bracketed IPv6 one, with an optional
# port; no whitespace, control characters or anything else a request head could be split on
_HOST_NAME = re.compile(r"[A-Za-z0-9._~-]{1,253}(?::[0-9]{1,5})?|\[[0-9A-Fa-f:.]{2,45}\](?::[0-9]{1,5})?")


def _ipv4(text: str) -> str | None:
    match = _IPV4.fullmatch(text)
    if match is None or any(int(octet) > 255 for octet in match.groups()):
        return None
    return ".".join(str(int(octet)) for octet in match.groups())


def _parse_port(text: str) -> int | None:
    """nginx's ngx_atoi over a ``:port`` suffix: digits only, 1..65535."""
    if not text.isdigit() or not text.isascii() or len(text) > 5 or not 1 <= int(text) <= 65535:
        return None
    return int(text)


def _parse_ipv6(addr: str, default_port: int) -> PeerAddr | str:
    end = addr.find("]")
    if end == -1:
        return "invalid host"
    rest = addr[end + 1 :]
    port = default_port
    if rest:
        if rest[0] != ":":
            return "invalid host"
        parsed = _parse_port(rest[1:])
        if parsed is None:
            return "invalid port"
        port = parsed
    inner = addr[1:end]
    if not inner:
        return "no host"
    try:
        return PeerAddr(str(ipaddress.IPv6Address(inner)), port)
    except ValueError:
        return "invalid IPv6 address"


def parse_peer(addr: str, default_port: int) -> PeerAddr | str:
    """``set_current_peer``'s address parsing, as ngx_parse_url with no_resolve: a PeerAddr, or
    nginx's error text. Whitespace and control characters are refused before anything else:
    hook-made text must never reach a socket call, a request head or a log line."""
    if not addr.isprintable() or " " in addr:
        return "invalid address"
    if addr[:5].lower() == "unix:":
        path = addr[5:]
        if not path:
            return "no path in the unix domain socket"
        if len(path.encode()) >= _UNIX_PATH_MAX:
            return "too long path in the unix domain socket"
        return PeerAddr(None, 0, path)
    if addr.startswith("["):
        return _parse_ipv6(addr, default_port)
    if "/" in addr or "?" in addr:
        return "invalid host"
    host, colon, port_text = addr.partition(":")
    port = default_port
    if colon:
        parsed = _parse_port(port_text)
        if parsed is None:
            return "invalid port"
        port = parsed
    if not host:
        return "no host"
    ip = _ipv4(host)
    if ip is None:
        return "no host allowed"
    return PeerAddr(ip, port)


def _parse_argument(addr: object, port: object) -> PeerAddr | str:
    """``set_current_peer``'s address and port arguments, checked and parsed; kept for the
    next call with the same arguments (a port given as none or an int)."""
    if type(addr) is not str:
        raise _bad_type(1, "set_current_peer", "string", addr)
    parsed = parse_peer(addr, _port_argument(port))
    if isinstance(parsed, PeerAddr) and len(addr) <= _CACHED_ADDR_MAX and (port is None or type(port) is int):
        # real addresses are short and few; hook-made junk is not kept, nor kept growing
        if _PEER_CACHE_SIZE[0] >= _PEER_CACHE_MAX:
            _PEER_CACHE.clear()
            _PEER_CACHE_SIZE[0] = 0
        _PEER_CACHE.setdefault(addr, {})[port] = parsed
        _PEER_CACHE_SIZE[0] += 1
    return parsed


def _set_peer(outcome: HookOutcome, addr: object, port: object, host: object) -> Result:
    """``set_current_peer`` past its hot path: arguments not seen before (checked and parsed
    here) or a host name, checked in OpenResty's order."""
    ports = _PEER_CACHE.get(addr) if type(addr) is str else None
    parsed = ports.get(port) if ports is not None and (port is None or type(port) is int) else None
    checked = _parse_argument(addr, port) if parsed is None else parsed
    if host is not None:
        if type(host) is not str:
            raise _bad_type(3, "set_current_peer", "string", host)
        if host and _HOST_NAME.fullmatch(host) is None:
            return None, "invalid host name"  # it would become a Host header and TLS SNI
    if isinstance(checked, str):
        return None, checked
    outcome.addr = checked
    outcome.host = host or None  # a later call without host clears it; "" is nil
    return _OK


def _port_argument(port: object) -> int:
    """Lua: nil/false -> 0, numbers truncated to 16 bits, numeric strings converted."""
    if port is None or port is False:
        return 0
    number: object = port
    if type(port) is str:
        try:
            number = float(port.strip())
        except ValueError:
            number = None
    if not _is_number(number) or math.isinf(number):
        raise _bad_type(2, "set_current_peer", "number", port)
    return int(number) & 0xFFFF


# --------------------------------------------------------------------------- balancer


class NgxBalancer:
    """``ngx.balancer``: the peer of this try and the request's tries and timeouts."""

    __slots__ = ()

    def set_current_peer(self, addr: object, port: object = None, host: object = None) -> Result:
        run = CURRENT
        outcome = run.outcome
        if outcome is None or run.phase is not BALANCER_PHASE:
            raise _refusal(run)
        # the hot path: an address seen before with the same port argument (none or an int),
        # without a host name
        if type(addr) is str and (port is None or type(port) is int) and host is None:
            try:
                parsed = _PEER_CACHE[addr][port]
            except KeyError:  # (not seen yet, or did not parse)
                return _set_peer(outcome, addr, port, host)
            outcome.addr = parsed
            outcome.host = None  # (a later call without host clears an earlier call's)
            return _OK
        return _set_peer(outcome, addr, port, host)

    def set_more_tries(self, count: object) -> Result:
        outcome = _balancer_outcome()
        if not _is_number(count):
            raise _bad_type(1, "set_more_tries", "number", count)
        count = int(count) if math.isfinite(count) else MAX_MORE_TRIES if count > 0 else 0
        exchange = CURRENT.exchange
        assert exchange is not None  # (set with the outcome; _request() costs a call)
        # OpenResty: total = hook runs so far (incl. this one) + u.peer.tries - 1; our
        # exchange appends one TryRecord per earlier try, so runs so far = len(tries) + 1.
        total = len(exchange.tries) + exchange.tries_left
        cap = exchange.tries_cap
        warning = None
        if cap and total + count > cap:
            count = cap - total
            warning = "reduced tries due to limit"
        # OpenResty wraps a negative grant into a huge unsigned one; we clamp (docs' intent)
        _not_plain(outcome)
        outcome.more_tries = min(max(count, 0), MAX_MORE_TRIES)
        return True, warning

    def get_last_failure(self) -> tuple[str | None, int | None]:
        outcome = _balancer_outcome()
        exchange = CURRENT.exchange
        assert exchange is not None  # (set with the outcome)
        failure = exchange.last_failure
        outcome.failure_read = True  # what the hook read, for $balancer_trace
        outcome.failure_seen = failure
        if failure is None:
            return None, None
        return failure[0], failure[1]

    def set_timeouts(self, connect: object = None, send: object = None, read: object = None) -> Result:
        _balancer_outcome()
        values = (("connect", connect), ("send", send), ("read", read))
        seconds: list[tuple[str, float]] = []
        for name, value in values:  # the first bad argument wins, before anything changes
            if value is None:
                continue
            if not (_is_number(value) and 0 < value < math.inf):
                raise ValueError(f"bad {name} timeout")
            seconds.append((name, value))
        exchange = _request()
        for name, value in seconds:
            ms = int(value * 1000)  # millisecond precision; sub-ms values keep the old one
            if ms:
                setattr(exchange, f"{name}_timeout", ms / 1000)
        return _OK

    def enable_keepalive(self, idle_timeout: object = 60, max_requests: object = 100) -> Result:
        outcome = _balancer_outcome()
        if not _is_number(idle_timeout):
            raise _bad_type(1, "enable_keepalive", "number", idle_timeout)
        if idle_timeout < 0:
            raise ValueError("bad argument #1 to 'enable_keepalive' (expected >= 0)")
        if not _is_number(max_requests):
            raise _bad_type(2, "enable_keepalive", "number", max_requests)
        if max_requests < 0:
            raise ValueError("bad argument #2 to 'enable_keepalive' (expected >= 0)")
        if outcome.addr is None:
            return None, "no current peer set"
        _not_plain(outcome)
        outcome.keepalive = (float(idle_timeout), int(max_requests))
        return _OK

    def recreate_request(self) -> Result:
        outcome = _balancer_outcome()
        _not_plain(outcome)
        outcome.recreate = True
        return _OK

    def bind_to_local_addr(self, addr: object) -> Result:
        outcome = _balancer_outcome()
        if type(addr) is not str:  # exactly str: a hook's subclass could override its methods
            raise _bad_type(1, "bind_to_local_addr", "string", addr)
        parsed = parse_peer(addr, 0) if addr[:5].lower() != "unix:" else "unix"
        if isinstance(parsed, str):
            return None, f"invalid addr {addr}"  # every unparsable input (OpenResty's http side is UB)
        _not_plain(outcome)
        outcome.local_addr = parsed.name if parsed.port else parsed.host
        return _OK


# --------------------------------------------------------------------------- ngx namespace


class VarView:
    """``ngx.var``: read-only request variables; a missing one is None."""

    __slots__ = ()
    __iter__ = None  # not iterable (the sequence protocol would probe ngx.var[0], [1], ...)

    def __getitem__(self, name: object) -> str | None:
        return _variable(self, name)

    def __getattribute__(self, name: str) -> object:
        """``ngx.var.NAME`` read other than as written so (``v = ngx.var; v.uri``): straight to
        the variable, with no failed normal lookup first (``__getattr__`` would cost an internal
        AttributeError). Private names are the object's own (no variable name is cached with
        a leading ``_``, see ``_variable_getter``)."""
        if name in _GETTERS:
            return hook_variable(name)
        if name[:1] == "_":
            return object.__getattribute__(self, name)
        return _variable(self, name)


# variable name (as hook code wrote it) -> getter; never a name starting with "_" (VarView)
_GETTERS: dict[str, Getter] = {}


def hook_variable(name: str) -> str | None:
    """``ngx.var.NAME`` as the compiler policy writes it (``_var_("NAME")``, NAME a constant
    from hook code, never private): what ``VarView`` answers for that name, with no attribute
    protocol around it."""
    exchange = CURRENT.http  # (None in a stream session: its variables are its own)
    if exchange is not None:
        try:
            return _GETTERS[name](exchange)
        except AttributeError:  # a variable this exchange cannot provide (as _variable)
            return None
        except KeyError:
            # a name not read yet: _variable finds its getter and keeps it (a getter's own
            # KeyError, were there one, is raised again there: getters only read)
            pass
    return _variable(_VAR_VIEW, name)


def _variable(_view: VarView, name: object) -> str | None:
    """``ngx.var.NAME`` and ``ngx.var[NAME]``."""
    run = CURRENT
    if run.exchange is None:
        raise RuntimeError("no request found")
    stream = run.stream
    if stream is not None:  # a stream session: its own variables
        if type(name) is not str:
            raise TypeError(f"bad variable name (string expected, got {_type_name(name)})")
        return stream.stream_variable(name)
    exchange = run.http
    if exchange is None:
        raise RuntimeError("no request found")
    if type(name) is not str:
        raise TypeError(f"bad variable name (string expected, got {_type_name(name)})")
    getter = _GETTERS.get(name)
    if getter is None:
        getter = _variable_getter(name)
    try:
        return getter(exchange)
    except AttributeError:  # a variable this exchange cannot provide (e.g. a fake one)
        return None


def _clock() -> float:
    """$request_time, $msec...: the log phase's time (the access log's), else the clock."""
    return CURRENT.now or _WALL[0]()


# Variables that are a str attribute of the request (RequestView types them so), whose getter
# would be ``str(value)`` of that str: read with a C attribute getter, without a Python frame
# (``ngx.var.uri`` is what hash-by-URI hooks read on every try).
_TEXT_ATTRIBUTES = {"uri": "uri", "document_uri": "uri", "request_uri": "request_uri"}


def _variable_getter(name: str) -> Getter:
    lowered = name.lower()
    attribute = _TEXT_ATTRIBUTES.get(lowered)
    if attribute is not None:
        getter: Getter = operator.attrgetter(attribute)
    else:
        try:
            getter = variable_getter(lowered, _clock)
        except KeyError:
            getter = _missing_variable
    # names come from hook code: stay bounded; a private name is never one of VarView's
    if len(_GETTERS) < 1024 and len(name) <= 256 and name[:1] != "_":
        _GETTERS[name] = getter
    return getter


def _missing_variable(_exchange: RequestView) -> None:
    return None


_SHARED: dict[str, SharedDict] = {}  # python_shared_dict name -> SharedDict, for ngx.shared


def shared_dicts() -> dict[str, SharedDict]:
    """This worker's shared dicts by name (the metrics read their sizes)."""
    return dict(_SHARED)


def set_shared_dicts(dicts: Mapping[str, SharedDict]) -> None:
    """The worker's ``python_shared_dict`` zones, for ``ngx.shared.NAME`` in hooks. Hook code
    may call only the OpenResty API on them (``scriptlb.state.shared_dict.HOOK_METHODS``)."""
    from scriptlb.state.shared_dict import HOOK_METHODS

    _SHARED.clear()
    _SHARED.update(dicts)
    for shared in dicts.values():
        expose(type(shared), HOOK_METHODS)


class SharedView:
    """``ngx.shared``: ``ngx.shared.NAME`` / ``ngx.shared["NAME"]``, None for an unknown name."""

    __slots__ = ()

    __iter__ = None  # not iterable: the old sequence protocol would call __getitem__(0, 1, ...) forever

    def __getitem__(self, name: object) -> SharedDict | None:
        if type(name) is not str:
            raise TypeError(f"bad shared dict name (string expected, got {_type_name(name)})")
        return _SHARED.get(name)

    def __getattribute__(self, name: str) -> object:  # compiled as a plain read, like ngx.var
        if name[:1] == "_":
            return object.__getattribute__(self, name)
        return _SHARED.get(name)


class Worker:
    """``ngx.worker``."""

    __slots__ = ()

    def id(self) -> int:
        return _WORKER[0]

    def count(self) -> int:
        return _WORKER[1]

    def pid(self) -> int:
        return os.getpid()


ArgValue = str | bool  # ngx.req.get_uri_args: "a=1" -> "1", a bare "a" -> True


class Req:
    """``ngx.req``: read-only views of the client request."""

    __slots__ = ()

    def get_headers(self, max_headers: int = 100, raw: bool = False) -> dict[str, str | list[str]]:
        exchange = _request()
        headers: dict[str, str | list[str]] = {}
        for count, (name, value) in enumerate(exchange.headers):
            if max_headers and count >= max_headers:
                break
            key = name.decode("latin-1")
            if not raw:
                key = key.lower()
            text = value.decode("latin-1")
            previous = headers.get(key)
            if previous is None:
                headers[key] = text
            elif isinstance(previous, list):
                previous.append(text)
            else:
                headers[key] = [previous, text]
        return headers

    def get_method(self) -> str:
        return str(_request().method)

    def get_uri_args(self, max_args: int = 100) -> dict[str, ArgValue | list[ArgValue]]:
        args = _request().args or ""
        result: dict[str, ArgValue | list[ArgValue]] = {}
        for count, part in enumerate(p for p in args.split("&") if p):
            if max_args and count >= max_args:
                break
            key, eq, value = part.partition("=")
            item: ArgValue = value if eq else True
            previous = result.get(key)
            if previous is None:
                result[key] = item
            elif isinstance(previous, list):
                previous.append(item)
            else:
                result[key] = [previous, item]
        return result


_LEVEL_NAMES = ("emerg", "emerg", "alert", "crit", "error", "warn", "notice", "info", "debug")


def _text_bytes(value: object, func: str) -> bytes:
    if type(value) is bytes:
        return value
    if type(value) is not str:
        raise _bad_type(1, func, "string", value)
    try:
        return value.encode("latin-1")  # request text is latin-1 decoded bytes: hash the bytes
    except UnicodeEncodeError:
        return value.encode("utf-8")


class _ShortRepr(reprlib.Repr):
    """reprlib's bounded repr, also for what it would hand to the builtin repr (which could be
    huge): exceptions (their args) and dict subclasses (Counter, OrderedDict, defaultdict)."""

    def repr1(self, x: object, level: int) -> str:
        if isinstance(x, BaseException):
            return f"{type(x).__name__}{self.repr1(x.args, level)}"
        if isinstance(x, dict) and type(x) is not dict:
            return f"{type(x).__name__}({self.repr_dict(x, level)})"
        return super().repr1(x, level)


_crc32 = zlib.crc32
_SHORT = _ShortRepr()
_SHORT.maxstring = _SHORT.maxother = MAX_LOG_MESSAGE


def short_text(value: object) -> str:
    """``str(value)``, or a bounded abbreviation when its full text would be long (a container
    of big strings can have a terabyte of text)."""
    if type(value) is str:
        return value
    if text_size(value, MAX_LOG_MESSAGE) > MAX_LOG_MESSAGE:
        return _SHORT.repr(value)
    return str(value)


def exception_text(err: BaseException) -> str:
    """``str(err)``, or a bounded rendering of its args when that would be long."""
    if text_size(err.args, MAX_LOG_MESSAGE) > MAX_LOG_MESSAGE:
        args = err.args
        return _SHORT.repr(args[0] if len(args) == 1 else args)
    return str(err)


def log_text(parts: Iterable[object], sep: str = "") -> str:
    """The message of ngx.log/print: the parts' text joined, cut at MAX_LOG_MESSAGE."""
    pieces: list[str] = []
    length = 0
    for part in parts:
        piece = short_text(part)
        pieces.append(piece)
        length += len(piece) + len(sep)
        if length >= MAX_LOG_MESSAGE:
            break
    return sep[:MAX_LOG_MESSAGE].join(pieces)[:MAX_LOG_MESSAGE]


# Control characters (newline, carriage return, escape...) in hook-made text are written as
# \xNN, as nginx escapes client data in its logs: a hook cannot forge a second error-log line.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _escape_control(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02X}" if code < 256 else f"\\u{code:04X}"


def escape_log(text: str) -> str:
    """``text`` with control characters escaped (one error-log line stays one line)."""
    if text.isprintable():
        return text
    return _CONTROL.sub(_escape_control, text)


def hook_location() -> str:
    """file:line of the innermost hook (or hook module) frame calling into the API."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_HOST_DIR):
        frame = frame.f_back
    if frame is None:
        return "?"
    return f"{frame.f_code.co_filename}:{frame.f_lineno}"


class Ctx(dict[str, object]):
    """``ngx.ctx``: the request's dict, also read and written as attributes the Lua way
    (``ngx.ctx.tries = 0``; a missing name reads as None, like Lua's nil). The names of dict
    methods (``get``, ``items``...) read as the methods; ``ngx.ctx["get"]`` reaches such a key."""

    __slots__ = ()

    def __setattr__(self, name: str, value: object) -> None:
        self[name] = value

    def __delattr__(self, name: str) -> None:
        self.pop(name, None)


def _ctx_attribute(ctx: Ctx, name: str) -> object:
    """What ``ngx.ctx.NAME`` reads in a hook (after the dict methods exposed like dict's)."""
    method = checked_method(ctx, name)
    return ctx.get(name) if method is None else method


def _request_ctx(exchange: HookRequest) -> Ctx:
    ctx = exchange.ctx
    if type(ctx) is not Ctx:  # the exchange starts with a plain dict; hooks get the Lua-style view
        ctx = exchange.ctx = Ctx(ctx)
    return ctx


class Ngx:
    """The ``ngx`` namespace."""

    # the namespaces are the instance's slots, not class attributes: ``ngx.var`` on every run
    # is then a slot read (a class attribute read through an instance is a full lookup)
    __slots__ = ("req", "shared", "var", "worker")

    OK, ERROR, AGAIN, DONE, DECLINED = 0, -1, -2, -4, -5
    STDERR, EMERG, ALERT, CRIT, ERR, WARN, NOTICE, INFO, DEBUG = range(9)
    HTTP_OK, HTTP_CREATED, HTTP_NO_CONTENT = 200, 201, 204
    HTTP_MOVED_PERMANENTLY, HTTP_MOVED_TEMPORARILY = 301, 302
    HTTP_BAD_REQUEST, HTTP_UNAUTHORIZED, HTTP_FORBIDDEN, HTTP_NOT_FOUND = 400, 401, 403, 404
    HTTP_NOT_ALLOWED, HTTP_TOO_MANY_REQUESTS = 405, 429
    HTTP_INTERNAL_SERVER_ERROR, HTTP_BAD_GATEWAY = 500, 502
    HTTP_SERVICE_UNAVAILABLE, HTTP_GATEWAY_TIMEOUT = 503, 504

    def __init__(self) -> None:
        self.var = VarView()
        self.shared = SharedView()
        self.worker = Worker()
        self.req = Req()

    @property
    def ctx(self) -> Ctx:
        return _request_ctx(_request())

    @property
    def balancer(self) -> NgxBalancer:
        return balancer

    @property
    def upstream(self) -> Upstream:
        return upstream

    def log(self, level: object, *parts: object) -> None:
        run = _current()
        log = run.log
        if log is None:
            raise RuntimeError("no request found")
        if type(level) is not int or not 0 <= level <= 8:
            raise ValueError("bad log level")
        if run.counted is not run.outcome:  # this run's first line
            run.counted = run.outcome
            run.logged = 0
        run.logged += 1
        if run.logged > MAX_LOGS_PER_RUN:
            if run.logged == MAX_LOGS_PER_RUN + 1:
                log("warn", f"[python] {hook_location()}: more than {MAX_LOGS_PER_RUN} log lines "
                    "in one run, dropping the rest", run.exchange)
            return
        message = escape_log(log_text(parts))
        log(_LEVEL_NAMES[level], f"[python] {hook_location()}: {message}", run.exchange)

    def exit(self, status: object) -> None:
        """Asynchronous, as in balancer_by_lua: records the status; the hook keeps running."""
        outcome = _balancer_outcome()
        if type(status) is not int:
            raise _bad_type(1, "exit", "number", status)
        if status in (self.AGAIN, self.DONE):
            raise ValueError("bad argument to 'ngx.exit': does not accept NGX_AGAIN or NGX_DONE")
        if status == self.OK:
            return
        _not_plain(outcome)
        outcome.exit_status = status  # >= 300 ends the request; anything else -> fallback

    def now(self) -> float:
        return round(_WALL[0](), 3)

    def time(self) -> int:
        return int(_WALL[0]())

    def get_phase(self) -> str:
        return CURRENT.phase

    def crc32_short(self, value: object) -> int:
        if type(value) is str and value.isascii():  # the hot path of hash-by-URI hooks
            return _crc32(value.encode())  # (ASCII: the same bytes, with no codec lookup)
        return _crc32(_text_bytes(value, "crc32_short"))

    def crc32_long(self, value: object) -> int:
        if type(value) is str and value.isascii():  # as crc32_short (same bytes either way)
            return _crc32(value.encode())
        return _crc32(_text_bytes(value, "crc32_long"))

    def md5(self, value: object) -> str:
        return hashlib.md5(_text_bytes(value, "md5"), usedforsecurity=False).hexdigest()

    def md5_bin(self, value: object) -> bytes:
        return hashlib.md5(_text_bytes(value, "md5_bin"), usedforsecurity=False).digest()


# --------------------------------------------------------------------------- upstream


def _peer_dict(peer: Peer, figures: Figures) -> dict[str, object]:
    """One peer as lua-upstream-nginx-module reports it, plus its live statistics."""
    requests, failures, active, last_status, last_failure, ewma, peak, stamp, override = figures
    return {"id": peer.id, "name": peer.name, "weight": peer.weight, "backup": peer.backup,
            "down": peer.down, "fails": peer.fails, "max_fails": peer.max_fails,
            "fail_timeout": peer.fail_timeout, "current_weight": peer.current_weight,
            "effective_weight": peer.effective_weight, "conns": peer.conns, "max_conns": peer.max_conns,
            "requests": requests, "failures": failures, "active": active, "last_status": last_status,
            "last_failure_time": last_failure, "ewma": ewma, "peak_ewma": peak, "ewma_time": stamp,
            "weight_override": override, "healthy": not peer.unhealthy,
            "state": "down" if peer.config_down else "unhealthy" if peer.unhealthy else "up"}


MAX_PEER_WEIGHT = 100  # set_peer_weight's ceiling: a consistent-hash ring has 160 points per weight
_NO_FIGURES = (None,) * 9  # the live statistics' values while python_peer_stats is off


def _peer_dicts(upstream: HookUpstream, is_backup: bool) -> list[dict[str, object]]:
    """lua-upstream-nginx-module's fields plus the peer's live statistics, shared by all
    workers (``scriptlb.state.stats.FIELDS``; None while ``python_peer_stats`` is off). One dict
    display per peer: this runs on every try of hooks that read their peers."""
    peers = upstream.peers.backup if is_backup else upstream.peers.primary
    stats = upstream.stats
    if stats is None:
        return [_peer_dict(peer, _NO_FIGURES) for peer in peers]
    figures = stats.figures
    return [_peer_dict(peer, figures(peer)) for peer in peers]


def _peer_of(upstream: HookUpstream, is_backup: object, peer_id: object) -> Peer | None:
    group = upstream.peers.backup if is_backup else upstream.peers.primary
    if type(peer_id) is not int or not 0 <= peer_id < len(group):
        return None
    return group[peer_id]


class Upstream:
    """This upstream's peers, like lua-upstream-nginx-module (``ngx.upstream``)."""

    __slots__ = ()

    def get_primary_peers(self) -> list[dict[str, object]]:
        return _peer_dicts(_run_upstream(), False)

    def get_backup_peers(self) -> list[dict[str, object]]:
        return _peer_dicts(_run_upstream(), True)

    def set_peer_weight(self, is_backup: object, peer_id: object, weight: object) -> Result:
        """The peer's round-robin weight in every worker, from their next request on (what the
        fastest-first post patched lua-upstream-nginx-module for). It lasts until a reload
        changes that server's configured weight, or a restart."""
        upstream_rt = _run_upstream()
        peer = _peer_of(upstream_rt, is_backup, peer_id)
        if peer is None:
            return None, "bad peer id"
        if type(weight) is not int or not 1 <= weight <= MAX_PEER_WEIGHT:
            return None, f"bad weight (an integer from 1 to {MAX_PEER_WEIGHT} expected)"
        stats = upstream_rt.stats
        if stats is None:
            return None, "peer statistics are off (python_peer_stats)"
        stats.stats.set_weight(stats.slot_of(peer), weight)
        upstream_rt.refresh_weights()  # this worker at once: the hook may read the peers again
        return _OK

    def set_peer_down(self, is_backup: object, peer_id: object, down: object) -> Result:
        peer = _peer_of(_run_upstream(), is_backup, peer_id)
        if peer is None:
            return None, "bad peer id"
        peer.down = peer.config_down = bool(down)  # config_down: what health checks restore
        if not down:
            peer.fails = 0  # as lua-upstream-nginx-module: bringing a peer up forgets failures
        return _OK

    def current_upstream_name(self) -> str:
        return str(_run_upstream().name)

    def get_hook_stats(self) -> dict[str, object] | None:
        """This worker's figures of the upstream's balancer hook (failed runs by kind, circuit
        breaker state, trips and skipped runs), or None when it has no hook."""
        hook = getattr(_run_upstream(), "hook", None)  # (an offline upstream may have none)
        return None if hook is None else hook.stats()


balancer = NgxBalancer()
ngx = Ngx()
_VAR_VIEW = ngx.var
upstream = Upstream()

_public = [name for name in dir(Ngx) if not name.startswith("_")]
expose(Ngx, _public)
expose(NgxBalancer, ["set_current_peer", "set_more_tries", "get_last_failure", "set_timeouts",
                  "enable_keepalive", "recreate_request", "bind_to_local_addr"])
expose(Worker, ["id", "count", "pid"])
expose(Req, ["get_headers", "get_method", "get_uri_args"])
expose(Upstream, ["get_primary_peers", "get_backup_peers", "set_peer_down", "set_peer_weight",
                  "current_upstream_name", "get_hook_stats"])
expose(Ctx, readable_names(dict))
expose_dynamic(Ctx, _ctx_attribute)
writable(Ctx)
expose_dynamic(VarView, _variable)
expose_dynamic(SharedView, lambda _view, name: _SHARED.get(name))
