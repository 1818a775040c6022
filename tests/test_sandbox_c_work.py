"""Work inside one C call cannot be stopped by a budget check: the guards charge the estimated
cost of big calls (sort, set, sum, copies, hashing walks) against the remaining budget first, so
a hook looping over a million-item list ends near its budget instead of one C call past it."""

from __future__ import annotations

import statistics
import time

import pytest
from hook_helpers import exchange, run, runner

from scriptlb.sandbox import limits

BUDGET = 0.020
MILLION = "x = list(range(100000)) * 10\n"
# Calls estimated under limits.CHARGE_SLACK (a copy or a repetition of a million items, ~2 ms) are
# left to the loop checks; their page faults make their CPU time too noisy to bound here.
LOOPS = {
    "sort": MILLION + "while True:\n    x.sort()",
    "sorted": MILLION + "while True:\n    y = sorted(x)",
    "set": MILLION + "while True:\n    y = set(x)",
    "sum": MILLION + "while True:\n    y = sum(x)",
    "membership": MILLION + "while True:\n    y = -1 in x",
    "count": MILLION + "while True:\n    y = x.count(-1)",
    "join": "s = ['ab'] * 500000\nwhile True:\n    y = ''.join(s)",
}


@pytest.mark.parametrize("code", LOOPS.values(), ids=LOOPS.keys())
def test_a_loop_of_big_c_calls_ends_near_its_budget(code: str) -> None:
    hook = runner(code, timeout=BUDGET)
    spent = []
    for _ in range(5):
        started = time.process_time()  # CPU time: robust when other processes share the CPUs
        outcome = hook.run(exchange(), hook.upstream)
        spent.append(time.process_time() - started)
        assert outcome.error == "timeout", outcome.message
    # without the charge a sort/set of a million items runs 20-60 ms past the deadline
    assert statistics.median(spent) < 1.5 * BUDGET, spent


def test_small_calls_are_not_charged() -> None:
    result = run("x = list(range(1000))\ny = sorted(x) + list(x)\nz = set(y)\n"
                 "balancer.set_current_peer('127.0.0.1:1')")
    assert result.kind is None, result.outcome.message


def test_charge_outside_a_run_does_nothing() -> None:
    assert limits.BUDGET.deadline == 0.0
    limits.charge(10**9, limits.HASH_NS)  # host code (tests, tools) calling guards directly
