"""The balancer run written out in one frame (HookRunner.run): what it records is what the
general path (_execute) records: the duration histogram's bucket, the budget's stop, the
request kind the API sees."""

from __future__ import annotations

from bisect import bisect_left

import pytest
from hook_helpers import exchange, runner

from scriptlb.hookrt import api, hooks
from scriptlb.sandbox import limits

PICK = 'balancer.set_current_peer("127.0.0.1", 1)\nngx.ctx["phase"] = ngx.get_phase()\n'
SPENT = sorted({bound * factor for bound in hooks.RUN_BUCKETS for factor in (0.5, 1.0, 1.0000001, 2.0)})


@pytest.mark.parametrize("spent", SPENT)
def test_histogram_bucket_is_bisects(spent: float, monkeypatch: pytest.MonkeyPatch) -> None:
    hook = runner(PICK)
    ticks = iter([100.0, 100.0 + spent])
    monkeypatch.setattr(hooks, "_clock", lambda: next(ticks))
    outcome = hook.run(exchange(), hook.upstream)
    assert outcome.error is None, outcome.message
    expected = [0] * (len(hooks.RUN_BUCKETS) + 1)
    expected[bisect_left(hooks.RUN_BUCKETS, outcome.spent)] = 1
    assert hook.durations == expected
    assert hook.duration_sum == outcome.spent


def test_a_swallowed_stop_is_a_timeout_and_the_next_run_is_clean() -> None:
    hook = runner("""
        try:
            while True:
                pass
        except BaseException:
            pass
        balancer.set_current_peer("127.0.0.1", 1)
    """, timeout=0.01)
    stopped = hook.run(exchange(), hook.upstream)
    assert stopped.error == "timeout" and stopped.addr is None
    assert limits.BUDGET.tripped is False and limits.BUDGET.deadline == 0.0
    fine = runner(PICK)
    outcome = fine.run(exchange(), fine.upstream)
    assert outcome.error is None and outcome.addr is not None


def test_a_tick_outside_a_run_stops_without_marking_the_next_run() -> None:
    with pytest.raises(limits.HookTimeout):
        limits.tick()  # (hook code resumed after its run: deadline 0.0)
    assert limits.BUDGET.tripped is False
    hook = runner(PICK)
    assert hook.run(exchange(), hook.upstream).error is None


class _OtherRequest:
    """An HTTP request of another class (the runner remembers the last one's class)."""

    is_stream = False

    def __init__(self) -> None:
        self.ctx: dict[str, object] = {}
        self.uri = "/other"


def test_the_api_sees_each_request_as_its_kind() -> None:
    hook = runner('ngx.ctx["uri"] = ngx.var.uri\nok, err = balancer.set_current_peer("127.0.0.1", 1)')
    first, other = exchange(uri="/first"), _OtherRequest()
    for request in (first, other, first):
        outcome = hook.run(request, hook.upstream)  # type: ignore[arg-type]  # (a stand-in request)
        assert outcome.error is None, outcome.message
        assert api.CURRENT.http is None and api.CURRENT.stream is None and api.CURRENT.exchange is None
    assert first.ctx["uri"] == "/first" and other.ctx["uri"] == "/other"
