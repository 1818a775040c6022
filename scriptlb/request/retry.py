"""The retry decision of one failed try: nginx's ``ngx_http_upstream_next`` and
``ngx_http_upstream_test_next``, as pure functions of the facts the proxy already holds.

Theory of operation
-------------------
A try ends in one of the ``Failure`` kinds (or succeeds). The proxy frees the peer, then asks
``decide``: ``RETRY`` (0) starts the next try; anything else finishes the request, either with our
own error page (502/504) or, for status-based failures (``http_500``, ``http_404``...), with the
upstream's response that is already in hand (``PASS_THROUGH``).

nginx retries only when all of these hold (otherwise it finalizes):
  * the failure kind is listed in ``proxy_next_upstream`` (``off`` lists nothing; "no live
    upstreams" is never listed);
  * a try is left after this one;
  * a POST/LOCK/PATCH whose request was (even partly) sent also needs ``non_idempotent``;
  * a request whose body is streamed (``proxy_request_buffering off``) was not sent yet;
  * ``proxy_next_upstream_timeout`` (from the first try's start) has not expired.

Failure kinds also decide the peer's accounting: ``is_counted_failure`` says whether the free is
nginx's ``NGX_PEER_FAILED`` (counts towards ``max_fails``) or ``NEXT``/0 (does not).
"""

from __future__ import annotations

from scriptlb.config.model import NextUpstream, ProxyConf
from scriptlb.http.upstream import Failure as Failure  # defined where a try's failure is detected

RETRY = 0  # decide(): start the next try
PASS_THROUGH = -1  # decide(): send the upstream response we hold (status-based failures)

# nginx: ngx_http_upstream_next adds NGX_HTTP_UPSTREAM_FT_NON_IDEMPOTENT for these methods
NON_IDEMPOTENT_METHODS = frozenset({"POST", "LOCK", "PATCH"})


_STATUS_FAILURE: dict[int, Failure] = {
    500: Failure.HTTP_500,
    502: Failure.HTTP_502,
    503: Failure.HTTP_503,
    504: Failure.HTTP_504,
    403: Failure.HTTP_403,
    404: Failure.HTTP_404,
    429: Failure.HTTP_429,
}

# ngx_http_upstream_next's switch: what the client gets when retrying stops, what
# $upstream_status records for the try and what get_last_failure() reports (nginx >= 1.13.7)
_FAILURE_STATUS: dict[Failure, int] = {
    Failure.ERROR: 502,
    Failure.TIMEOUT: 504,
    Failure.INVALID_HEADER: 502,
    Failure.HTTP_500: 500,
    Failure.HTTP_502: 502,
    Failure.HTTP_503: 503,
    Failure.HTTP_504: 504,
    Failure.HTTP_403: 403,
    Failure.HTTP_404: 404,
    Failure.HTTP_429: 429,
    Failure.NOLIVE: 502,
}

# failures detected on a complete response header: the response itself can go to the client
_STATUS_BASED = frozenset(_STATUS_FAILURE.values())

# always freed as NGX_PEER_FAILED, whether or not nginx moves on
_ALWAYS_COUNTED = frozenset({Failure.ERROR, Failure.TIMEOUT, Failure.INVALID_HEADER})

# freed as NGX_PEER_NEXT: moving on after a 403/404 says nothing about the peer's health
_NEXT_STATE = frozenset({Failure.HTTP_403, Failure.HTTP_404})

_OFF = int(NextUpstream.OFF)
_NON_IDEMPOTENT = int(NextUpstream.NON_IDEMPOTENT)


def failure_for_status(status: int) -> Failure | None:
    """The status-based failure kind of an upstream response status, if it is one."""
    return _STATUS_FAILURE.get(status)


def is_idempotent(method: str) -> bool:
    """nginx's notion: everything but POST, LOCK and PATCH may be resent after being sent."""
    return method not in NON_IDEMPOTENT_METHODS


def is_status_based(failure: Failure) -> bool:
    return failure in _STATUS_BASED


def may_retry(
    failure: Failure,
    tries_left: int,
    started: float,
    now: float,
    conf: ProxyConf,
    method_idempotent: bool,
    request_sent: bool,
) -> bool:
    """True when nginx would start another try after this failure (see the module docstring).

    ``tries_left`` is the budget after this try, i.e. nginx's ``u->peer.tries`` once the peer
    was freed (status-based failures are decided before the free: pass ``state.tries - 1``).
    ``started`` is when the request's first try began, in the clock of ``now``.
    """
    if failure is Failure.NOLIVE or tries_left <= 0:
        return False
    mask = int(conf.next_upstream)
    if mask & _OFF:
        return False
    needed = int(failure)
    if request_sent and not method_idempotent:
        needed |= _NON_IDEMPOTENT
    if mask & needed != needed:
        return False
    if request_sent and not conf.request_buffering:
        return False  # a streamed body is gone: it cannot be sent to another peer
    timeout = conf.next_upstream_timeout
    return not (timeout and now - started >= timeout)


def decide(
    failure: Failure,
    tries_left: int,
    started: float,
    now: float,
    conf: ProxyConf,
    method_idempotent: bool,
    request_sent: bool,
) -> int:
    """``RETRY`` (0), or the final outcome: ``PASS_THROUGH`` (-1) for status-based failures,
    else the status of our own error page (502, or 504 for a timeout)."""
    if may_retry(failure, tries_left, started, now, conf, method_idempotent, request_sent):
        return RETRY
    if failure in _STATUS_BASED:
        return PASS_THROUGH
    return _FAILURE_STATUS[failure]


def is_stale_connection(
    failure: Failure,
    response_started: bool,
    reused: bool,
    body_streamed: bool,
    method_idempotent: bool,
    next_upstream: int,
) -> bool:
    """A reused keep-alive connection the peer had already closed: nginx sends the request
    again on a new connection without counting a try. Only for a plain error before any
    response byte, when the request can be sent again: its body is not streamed (gone once
    sent) and it is idempotent, or ``non_idempotent`` allows it."""
    if not reused or failure is not Failure.ERROR or response_started or body_streamed:
        return False
    return method_idempotent or bool(next_upstream & _NON_IDEMPOTENT)


def is_counted_failure(failure: Failure, retried: bool) -> bool:
    """Whether the peer is freed as FAILED (counts towards max_fails, lowers its weight).

    error/timeout/invalid_header always count; http_5xx/http_429 count only when nginx moved on
    to another peer (a response passed through is a success for accounting); http_403/http_404
    never count (NEXT); "no live upstreams" has no peer to free.
    """
    if failure in _ALWAYS_COUNTED:
        return True
    if failure in _NEXT_STATE or failure is Failure.NOLIVE:
        return False
    return retried


def last_failure_status(failure: Failure) -> int:
    """The try's status in $upstream_status and in the hook's get_last_failure()."""
    return _FAILURE_STATUS[failure]


def last_failure_state(failure: Failure) -> str:
    """get_last_failure()'s state name: "next" for http_403/http_404, else "failed"."""
    return "next" if failure in _NEXT_STATE else "failed"
