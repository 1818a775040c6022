"""The retry decision, table-driven: every row is one nginx rule of ngx_http_upstream_next /
ngx_http_upstream_test_next."""

from __future__ import annotations

import pytest

from scriptlb.config.model import NextUpstream, ProxyConf
from scriptlb.request.retry import (
    NON_IDEMPOTENT_METHODS,
    PASS_THROUGH,
    RETRY,
    Failure,
    decide,
    failure_for_status,
    is_counted_failure,
    is_idempotent,
    is_stale_connection,
    is_status_based,
    last_failure_state,
    last_failure_status,
)

NU = NextUpstream
F = Failure
DEFAULT = NU.ERROR | NU.TIMEOUT
ALL_STATUS = NU.HTTP_500 | NU.HTTP_502 | NU.HTTP_503 | NU.HTTP_504 | NU.HTTP_403 | NU.HTTP_404 | NU.HTTP_429
EVERYTHING = DEFAULT | NU.INVALID_HEADER | ALL_STATUS


def conf(mask: NextUpstream = DEFAULT, timeout: float = 0.0, buffering: bool = True) -> ProxyConf:
    return ProxyConf(next_upstream=mask, next_upstream_timeout=timeout, request_buffering=buffering)


# (id, failure, tries_left, elapsed, conf, idempotent, request_sent, expected)
ROWS = [
    # default mask: error and timeout retried, with our own 502/504 when retrying stops
    ("error retried", F.ERROR, 1, 0.0, conf(), True, True, RETRY),
    ("timeout retried", F.TIMEOUT, 2, 0.0, conf(), True, True, RETRY),
    ("error no tries", F.ERROR, 0, 0.0, conf(), True, True, 502),
    ("timeout no tries", F.TIMEOUT, 0, 0.0, conf(), True, True, 504),
    ("negative tries", F.ERROR, -1, 0.0, conf(), True, False, 502),
    ("invalid_header not listed", F.INVALID_HEADER, 3, 0.0, conf(), True, True, 502),
    ("invalid_header listed", F.INVALID_HEADER, 3, 0.0, conf(DEFAULT | NU.INVALID_HEADER), True, True, RETRY),
    # a configured list replaces the default
    ("only http_502: error final", F.ERROR, 3, 0.0, conf(NU.HTTP_502), True, False, 502),
    ("only http_502: timeout final", F.TIMEOUT, 3, 0.0, conf(NU.HTTP_502), True, False, 504),
    ("only http_502: 502 retried", F.HTTP_502, 3, 0.0, conf(NU.HTTP_502), True, True, RETRY),
    # status-based failures: pass the upstream response through when not retrying
    ("500 not listed", F.HTTP_500, 3, 0.0, conf(), True, True, PASS_THROUGH),
    ("500 listed", F.HTTP_500, 3, 0.0, conf(DEFAULT | NU.HTTP_500), True, True, RETRY),
    ("500 listed, last try", F.HTTP_500, 0, 0.0, conf(DEFAULT | NU.HTTP_500), True, True, PASS_THROUGH),
    ("502 not listed", F.HTTP_502, 3, 0.0, conf(), True, True, PASS_THROUGH),
    ("503 listed", F.HTTP_503, 1, 0.0, conf(NU.HTTP_503), True, True, RETRY),
    ("504 listed, last try", F.HTTP_504, 0, 0.0, conf(NU.HTTP_504), True, True, PASS_THROUGH),
    ("403 listed", F.HTTP_403, 1, 0.0, conf(NU.HTTP_403), True, True, RETRY),
    ("404 listed", F.HTTP_404, 1, 0.0, conf(NU.HTTP_404), True, True, RETRY),
    ("404 not listed", F.HTTP_404, 1, 0.0, conf(NU.HTTP_403), True, True, PASS_THROUGH),
    ("429 listed", F.HTTP_429, 1, 0.0, conf(NU.HTTP_429), True, True, RETRY),
    ("429 not listed", F.HTTP_429, 1, 0.0, conf(ALL_STATUS & ~NU.HTTP_429), True, True, PASS_THROUGH),
    # off never retries
    ("off: error", F.ERROR, 3, 0.0, conf(NU.OFF), True, False, 502),
    ("off: timeout", F.TIMEOUT, 3, 0.0, conf(NU.OFF), True, False, 504),
    ("off: 503", F.HTTP_503, 3, 0.0, conf(NU.OFF), True, True, PASS_THROUGH),
    ("off with other bits", F.ERROR, 3, 0.0, conf(NU.OFF | DEFAULT), True, False, 502),
    # no live upstreams: never retried, whatever the mask
    ("nolive", F.NOLIVE, 3, 0.0, conf(EVERYTHING | NU.NON_IDEMPOTENT), True, False, 502),
    # non-idempotent methods once the request was sent
    ("POST sent", F.ERROR, 3, 0.0, conf(), False, True, 502),
    ("POST sent, timeout", F.TIMEOUT, 3, 0.0, conf(), False, True, 504),
    ("POST not sent", F.ERROR, 3, 0.0, conf(), False, False, RETRY),
    ("POST sent, non_idempotent", F.ERROR, 3, 0.0, conf(DEFAULT | NU.NON_IDEMPOTENT), False, True, RETRY),
    ("POST 502 sent", F.HTTP_502, 3, 0.0, conf(NU.HTTP_502), False, True, PASS_THROUGH),
    ("POST 502 non_idem", F.HTTP_502, 3, 0.0, conf(NU.HTTP_502 | NU.NON_IDEMPOTENT), False, True, RETRY),
    ("non_idempotent alone", F.ERROR, 3, 0.0, conf(NU.NON_IDEMPOTENT), False, True, 502),
    # streamed request body (proxy_request_buffering off) cannot be resent once sent
    ("unbuffered sent", F.ERROR, 3, 0.0, conf(buffering=False), True, True, 502),
    ("unbuffered not sent", F.ERROR, 3, 0.0, conf(buffering=False), True, False, RETRY),
    ("unbuffered 503", F.HTTP_503, 3, 0.0, conf(NU.HTTP_503, buffering=False), True, True, PASS_THROUGH),
    # proxy_next_upstream_timeout: measured from the first try, >= stops
    ("within timeout", F.ERROR, 3, 1.999, conf(timeout=2.0), True, False, RETRY),
    ("timeout reached", F.ERROR, 3, 2.0, conf(timeout=2.0), True, False, 502),
    ("timeout passed, timeout kind", F.TIMEOUT, 3, 5.0, conf(timeout=2.0), True, False, 504),
    ("timeout passed, 500", F.HTTP_500, 3, 5.0, conf(NU.HTTP_500, timeout=2.0), True, True, PASS_THROUGH),
    ("no timeout configured", F.ERROR, 3, 1e6, conf(), True, False, RETRY),
]


@pytest.mark.parametrize(
    ("failure", "tries_left", "elapsed", "proxy", "idempotent", "sent", "expected"),
    [pytest.param(*row[1:], id=row[0]) for row in ROWS],
)
def test_decide(
    failure: Failure,
    tries_left: int,
    elapsed: float,
    proxy: ProxyConf,
    idempotent: bool,
    sent: bool,
    expected: int,
) -> None:
    started = 1000.0
    assert decide(failure, tries_left, started, started + elapsed, proxy, idempotent, sent) == expected


@pytest.mark.parametrize(
    ("status", "failure"),
    [
        (500, F.HTTP_500),
        (502, F.HTTP_502),
        (503, F.HTTP_503),
        (504, F.HTTP_504),
        (403, F.HTTP_403),
        (404, F.HTTP_404),
        (429, F.HTTP_429),
        (200, None),
        (301, None),
        (501, None),
        (505, None),
        (400, None),
        (401, None),
    ],
)
def test_failure_for_status(status: int, failure: Failure | None) -> None:
    assert failure_for_status(status) is failure


# failure -> (status reported, state name, counted when retried, counted when passed through)
ACCOUNTING = {
    F.ERROR: (502, "failed", True, True),
    F.TIMEOUT: (504, "failed", True, True),
    F.INVALID_HEADER: (502, "failed", True, True),
    F.HTTP_500: (500, "failed", True, False),
    F.HTTP_502: (502, "failed", True, False),
    F.HTTP_503: (503, "failed", True, False),
    F.HTTP_504: (504, "failed", True, False),
    F.HTTP_429: (429, "failed", True, False),
    F.HTTP_403: (403, "next", False, False),
    F.HTTP_404: (404, "next", False, False),
    F.NOLIVE: (502, "failed", False, False),
}


def test_accounting_table_covers_every_failure() -> None:
    assert set(ACCOUNTING) == set(Failure)


@pytest.mark.parametrize("failure", list(Failure), ids=lambda f: f.name)
def test_failure_accounting(failure: Failure) -> None:
    status, state, counted_retried, counted_final = ACCOUNTING[failure]
    assert last_failure_status(failure) == status
    assert last_failure_state(failure) == state
    assert is_counted_failure(failure, retried=True) is counted_retried
    assert is_counted_failure(failure, retried=False) is counted_final


def test_failure_values_are_the_next_upstream_bits() -> None:
    for failure in Failure:
        if failure is F.NOLIVE:
            assert not failure & int(~NU(0))  # no keyword sets this bit
        else:
            assert int(NU[failure.name]) == int(failure)


def test_status_based_kinds() -> None:
    assert {f for f in Failure if is_status_based(f)} == {
        F.HTTP_500,
        F.HTTP_502,
        F.HTTP_503,
        F.HTTP_504,
        F.HTTP_403,
        F.HTTP_404,
        F.HTTP_429,
    }


@pytest.mark.parametrize(
    ("method", "idempotent"),
    [
        ("GET", True),
        ("HEAD", True),
        ("PUT", True),
        ("DELETE", True),
        ("OPTIONS", True),
        ("POST", False),
        ("LOCK", False),
        ("PATCH", False),
    ],
)
def test_is_idempotent(method: str, idempotent: bool) -> None:
    assert is_idempotent(method) is idempotent
    assert (method in NON_IDEMPOTENT_METHODS) is not idempotent


# --------------------------------------------------------------------------- stale connections


@pytest.mark.parametrize(("failure", "started", "reused", "streamed", "idempotent", "mask", "stale"), [
    (F.ERROR, False, True, False, True, DEFAULT, True),  # the pooled connection the peer closed
    (F.ERROR, False, False, False, True, DEFAULT, False),  # a fresh connection: a real failure
    (F.ERROR, True, True, False, True, DEFAULT, False),  # a response had begun
    (F.TIMEOUT, False, True, False, True, DEFAULT, False),  # only a plain error is staleness
    (F.INVALID_HEADER, False, True, False, True, DEFAULT, False),
    (F.ERROR, False, True, True, True, DEFAULT, False),  # a streamed body cannot be sent again
    (F.ERROR, False, True, False, False, DEFAULT, False),  # POST: sent once only...
    (F.ERROR, False, True, False, False, DEFAULT | NU.NON_IDEMPOTENT, True),  # ...unless allowed
])
def test_stale_connection_rule(failure: Failure, started: bool, reused: bool, streamed: bool,
                               idempotent: bool, mask: NextUpstream, stale: bool) -> None:
    assert is_stale_connection(failure, started, reused, streamed, idempotent, int(mask)) is stale
