"""The hook circuit breaker (balancer_by_python_breaker) and balancer_by_python_fallback off,
against synthetic requests (the real-socket side is in test_porting_process.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hook_helpers import block, exchange, upstream

from scriptlb.config import load
from scriptlb.config.errors import ConfigError
from scriptlb.config.model import BreakerConf, HookConf, PythonConf
from scriptlb.hookrt.hooks import CLOSED, OPEN, HookRunner

LOOP = "while True:\n    pass\n"
OK = "balancer.set_current_peer('127.0.0.1:1')\n"


def runner(code: str, logs: list[tuple[str, str]], **settings: object) -> HookRunner:
    up = upstream()
    hook = HookRunner(block(code, timeout=0.002, **settings), up, PythonConf(),
                      log=lambda level, msg, _ex: logs.append((level, msg)))
    up.hook = hook  # type: ignore[attr-defined]  # as the runtime's upstream holds it
    return hook


def run(hook: HookRunner) -> str | None:
    return hook.run(exchange(), hook.upstream).error


def test_overruns_open_the_breaker_which_skips_the_hook_and_logs_once() -> None:
    logs: list[tuple[str, str]] = []
    hook = runner(LOOP, logs, breaker=BreakerConf(fails=3, window=60, cooldown=60))
    assert [run(hook) for _ in range(3)] == ["timeout"] * 3
    assert hook.breaker is not None and hook.breaker.state is OPEN
    assert [run(hook) for _ in range(50)] == ["breaker_open"] * 50  # no budget spent, no log line
    opened = [msg for _, msg in logs if "circuit breaker open" in msg]
    assert len(opened) == 1 and "after 3 failed runs in 60s, skipping the hook for 60s" in opened[0]
    assert len(logs) == 4  # three timeouts, one opening
    assert hook.stats() == {"failures": {"timeout": 3, "breaker_open": 50}, "breaker": "open",
                            "breaker_trips": 1, "breaker_skipped": 50}


def test_after_the_cooldown_one_run_probes_and_success_closes() -> None:
    logs: list[tuple[str, str]] = []
    hook = runner("if ngx.ctx.get('fail'):\n    1/0\n" + OK, logs,
                  breaker=BreakerConf(fails=2, window=60, cooldown=60))
    breaker = hook.breaker
    assert breaker is not None
    for _ in range(2):
        ex = exchange()
        ex.ctx["fail"] = True
        assert hook.run(ex, hook.upstream).error == "runtime_error"
    assert breaker.state is OPEN and run(hook) == "breaker_open"
    breaker.open_until = 0.0  # the cool-off is over
    ex = exchange()
    ex.ctx["fail"] = True
    assert hook.run(ex, hook.upstream).error == "runtime_error"  # the probe failed: open again
    assert breaker.state is OPEN and breaker.trips == 2 and run(hook) == "breaker_open"
    breaker.open_until = 0.0
    assert run(hook) is None  # the probe succeeded
    assert breaker.state is CLOSED
    assert logs[-1][0] == "notice" and "circuit breaker closed" in logs[-1][1]


def test_failures_outside_the_window_do_not_add_up() -> None:
    hook = runner("1/0", [], breaker=BreakerConf(fails=2, window=60, cooldown=60))
    breaker = hook.breaker
    assert breaker is not None
    run(hook)
    breaker.window_start -= 120  # the first failure is two windows old
    run(hook)
    assert breaker.state is CLOSED
    run(hook)
    assert breaker.state is OPEN


def test_breaker_off_keeps_running_a_failing_hook() -> None:
    hook = runner("1/0", [], breaker=None)
    assert [run(hook) for _ in range(30)] == ["runtime_error"] * 30
    assert hook.stats()["breaker"] is None


def test_hooks_read_their_own_figures() -> None:
    hook = runner("ngx.ctx['s'] = upstream.get_hook_stats()\n" + OK, [], breaker=BreakerConf())
    ex = exchange()
    assert hook.run(ex, hook.upstream).error is None
    assert ex.ctx["s"] == {"failures": {}, "breaker": "closed", "breaker_trips": 0, "breaker_skipped": 0}


@pytest.mark.parametrize(("code", "kind"), [("1/0", "runtime_error"), (LOOP, "timeout"),
                                            ("ngx.exit(200)", "exit_error"),
                                            ("ngx.exit(ngx.ERROR)", "exit_error")])
def test_fallback_off_answers_500_for_every_failure(code: str, kind: str) -> None:
    hook = runner(code, [], fallback=False)
    outcome = hook.run(exchange(), hook.upstream)
    assert (outcome.error, outcome.exit_status, outcome.addr) == (kind, 500, None)


def test_fallback_off_still_uses_the_servers_when_no_peer_is_set() -> None:
    hook = runner("x = 1", [], fallback=False)  # OpenResty: round robin over the upstream's servers
    outcome = hook.run(exchange(), hook.upstream)
    assert (outcome.error, outcome.exit_status) == ("no_peer", None)


def test_fallback_off_with_an_open_breaker_answers_500() -> None:
    hook = runner(LOOP, [], fallback=False, breaker=BreakerConf(fails=1, window=60, cooldown=60))
    run(hook)
    outcome = hook.run(exchange(), hook.upstream)
    assert (outcome.error, outcome.exit_status) == ("breaker_open", 500)


def test_fallback_on_is_unchanged() -> None:
    outcome = runner("1/0", []).run(exchange(), upstream())
    assert (outcome.error, outcome.exit_status) == ("runtime_error", None)


def conf(tmp_path: Path, upstream_lines: str) -> str:
    text = f"""
events {{}}
http {{
    upstream u {{
        server 127.0.0.1:1;
        balancer_by_python_block {{ balancer.set_current_peer("127.0.0.1:1") }}
        {upstream_lines}
    }}
    server {{ listen 127.0.0.1:1; location / {{ proxy_pass http://u; }} }}
}}
"""
    path = tmp_path / "x.conf"
    path.write_text(text)
    return str(path)


def hook_of(tmp_path: Path, lines: str) -> HookConf:
    conf_obj = load(conf(tmp_path, lines), str(tmp_path))
    assert conf_obj.http is not None
    hook = conf_obj.http.upstreams["u"].hook
    assert hook is not None
    return hook


def test_directives_set_the_policy(tmp_path: Path) -> None:
    default = hook_of(tmp_path, "")
    assert default.fallback is True and default.breaker == BreakerConf(10, 10.0, 30.0)
    custom = hook_of(tmp_path, "balancer_by_python_fallback off;\n"
                               "balancer_by_python_breaker fails=3 window=5s cooldown=1m;")
    assert custom.fallback is False and custom.breaker == BreakerConf(3, 5.0, 60.0)
    assert hook_of(tmp_path, "balancer_by_python_breaker off;").breaker is None


@pytest.mark.parametrize(("line", "message"), [
    ("balancer_by_python_fallback maybe;", 'it must be "on" or "off"'),
    ("balancer_by_python_breaker fails=0;", 'invalid fails value "0"'),
    ("balancer_by_python_breaker window=x;", 'invalid window value "x"'),
    ("balancer_by_python_breaker often;", 'invalid parameter "often"'),
    ("balancer_by_python_breaker fails=1 fails=2 fails=3 fails=4;", "invalid number of arguments"),
])
def test_bad_directives_name_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        hook_of(tmp_path, line)
    assert message in str(err.value) and f"{tmp_path}/x.conf:7" in str(err.value)


def test_the_breaker_keeps_the_hooks_clock() -> None:
    """A replay's virtual time drives it, and a clock set back does not stretch a cool-off."""
    from scriptlb.hookrt import api

    now = [1000.0]
    api.set_clock(lambda: now[0])
    try:
        hook = runner("1/0", [], breaker=BreakerConf(fails=2, window=10, cooldown=30))
        run(hook)
        now[0] += 11  # outside the window: the first failure does not count
        run(hook)
        assert hook.breaker is not None and hook.breaker.state is CLOSED
        run(hook)
        assert hook.breaker.state is OPEN and run(hook) == "breaker_open"
        now[0] += 29
        assert run(hook) == "breaker_open"
        now[0] -= 3600  # set back an hour: the cool-off ends, one run probes
        assert run(hook) == "runtime_error" and hook.breaker.state is OPEN
    finally:
        api.set_clock(None)
