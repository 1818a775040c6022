"""``$balancer_trace`` and the ``X-Balancer-Trace`` response header: who chose each try's peer.

Theory of operation
-------------------
The tries loop builds nothing for the trace: each try's record (an ``attempt.Attempt``, or
the ``TryRecord`` of "no live upstreams") keeps the ``HookOutcome`` of the hook run that
preceded it (``None`` without a hook), and the outcome already holds the run's duration, why it
fell back, and what ``get_last_failure()`` returned if the hook called it. A hook that ends the
request with ``ngx.exit(status)`` leaves its outcome on the upstream request (``hook_exit``).
The text is built from these only when ``$balancer_trace`` is read (an access log, a log hook's
``ngx.var``, the trace header), so a request that nobody traces pays nothing for it.

The format, one entry per try joined with ", " like ``$upstream_addr``, four fields each::

    WHO PEER TIME LAST
    hook 127.0.0.1:8081 12us -
    hook(retry) 127.0.0.1:8082 9us last=failed/502
    fallback(runtime_error) 127.0.0.1:8081 40us -
    round_robin 127.0.0.1:8081 - -

WHO: ``hook`` (the hook set the peer of the first try), ``hook(retry)`` (of a later try),
with the state of a peer the upstream's own methods would have avoided after a comma or alone
(``hook(unhealthy)``, ``hook(retry,draining)``: ``unhealthy`` (active health checks, a
``mandatory`` check not passed yet included), ``draining``, ``down`` or ``unavail``
(``max_fails``); the try went ahead to it, and a warn line says so),
``fallback(REASON)`` (the hook ran but the upstream's method chose: REASON is
``runtime_error``, ``timeout``, ``no_peer``, ``exit`` (``ngx.exit`` below 300) or
``compile_error``), or the method's name when no hook ran (``round_robin``, ``hash``,
``least_conn``, ``ewma``...). PEER: what ``$upstream_addr`` shows for the try (the upstream's
name for "no live upstreams"). TIME: the hook run's duration in whole microseconds, ``-``
without a hook. LAST: ``last=STATE/STATUS`` or ``last=none`` when the hook called
``get_last_failure()``, ``-`` when it did not. A request the hook ended with ``ngx.exit(N)``
gets one more entry, ``exit(N) - TIME LAST``, after its tries (there are none, usually).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

HEADER = b"X-Balancer-Trace"
_HEADER_LOWER = b"x-balancer-trace"
_REASONS = {"exit_error": "exit"}  # HookOutcome.error -> the trace's word, when they differ


def _method_name(ex: Any) -> str:
    upstream = getattr(getattr(ex, "location", None), "upstream", None)
    conf = getattr(upstream, "conf", None)
    return conf.method.kind if conf is not None else "-"


def _last(outcome: Any) -> str:
    if not outcome.failure_read:
        return "-"
    seen = outcome.failure_seen
    return f"last={seen[0]}/{seen[1]}" if seen is not None else "last=none"


def _entry(record: Any, retry: bool, method: str) -> str:
    outcome = getattr(record, "hook", None)  # (records of the offline tools have no such field)
    if outcome is None:
        return f"{method} {record.addr} - -"
    error = outcome.error
    if error is not None:
        who = f"fallback({_REASONS.get(error, error)})"
    else:
        notes = [note for note in ("retry" if retry else None, outcome.avoided) if note]
        who = f"hook({','.join(notes)})" if notes else "hook"
    return f"{who} {record.addr} {int(outcome.spent * 1e6)}us {_last(outcome)}"


def render(ex: Any) -> str | None:
    """``$balancer_trace`` of an exchange; None ("not found") when no try and no hook ran."""
    method = _method_name(ex)
    entries = [_entry(record, index > 0, method) for index, record in enumerate(ex.tries)]
    ended = getattr(getattr(ex, "upstream_request", None), "hook_exit", None)
    if ended is not None:
        entries.append(f"exit({ended.exit_status}) - {int(ended.spent * 1e6)}us {_last(ended)}")
    return ", ".join(entries) if entries else None


def _without_peer_trace(headers: bytes) -> bytes:
    """The peer's headers without any X-Balancer-Trace of its own: only ours is one."""
    lines = headers.split(b"\r\n")
    kept = [line for line in lines if line.split(b":", 1)[0].strip().lower() != _HEADER_LOWER]
    return b"\r\n".join(kept)


class TraceHeader:
    """``balancer_trace_header on`` in a location: the trace goes back to a client that asked
    (``X-Balancer-Trace: 1``) from an address in ``balancer_trace_allow``; to nobody else."""

    __slots__ = ("allowed",)

    def __init__(self, allowed: Callable[[Any], bool]) -> None:
        # the matcher of balancer_trace_allow's addresses, built by the caller with the access
        # phase's address_matcher (the request layer owns address matching)
        self.allowed = allowed

    def asked(self, ex: Any) -> bool:
        """The client sent ``X-Balancer-Trace: 1`` (its first such header) from an allowed
        address. (One pass over the request's headers, in line: this runs for every response
        of the location.)"""
        for name, value in ex.headers:
            if len(name) == 16 and name.lower() == _HEADER_LOWER:
                return value.strip() == b"1" and self.allowed(ex)
        return False

    def headers(self, ex: Any, headers: bytes) -> bytes:
        """The response's header lines (``Name: value\\r\\n``...) with the peer's own
        X-Balancer-Trace removed and ours added when the client may have it."""
        if _HEADER_LOWER in headers.lower():
            headers = _without_peer_trace(headers)
        if not self.asked(ex):
            return headers
        text = render(ex) or "-"
        # (peer names and words are ASCII; a control character would split the header)
        value = "".join(c if " " <= c <= "~" else "?" for c in text).encode("ascii")
        return headers + HEADER + b": " + value + b"\r\n"
