"""Running one hook against a synthetic request, for the hook and sandbox unit tests."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from typing import Any

from scriptlb.config.model import HookConf, PeerAddr, PythonConf, Source
from scriptlb.hookrt.hooks import HookOutcome, HookRunner
from scriptlb.replay.synthetic import SyntheticExchange, SyntheticUpstream

CONF = "/t/scriptlb.conf"


@dataclass
class Run:
    outcome: HookOutcome
    exchange: SyntheticExchange
    upstream: SyntheticUpstream
    logs: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ctx(self) -> dict[str, Any]:
        return self.exchange.ctx

    @property
    def kind(self) -> str | None:
        return self.outcome.error


def block(code: str, timeout: float = 0.010, **settings: Any) -> HookConf:
    """A balancer_by_python_block whose body starts on line 2 of CONF; without its circuit
    breaker unless ``breaker=`` says (tests that fail a hook many times test one thing each)."""
    settings.setdefault("breaker", None)
    return HookConf("block", None, textwrap.dedent(code), Source(CONF, 1), timeout=timeout, first_line=2,
                    **settings)


def runner(code: str, timeout: float = 0.010, python: PythonConf | None = None,
           logs: list[tuple[str, str]] | None = None, peers: int = 2) -> HookRunner:
    sink = logs if logs is not None else []
    return HookRunner(block(code, timeout), upstream(peers), python or PythonConf(),
                      log=lambda level, msg, _ex: sink.append((level, msg)))


def upstream(peers: int = 2, backup: int = 0) -> SyntheticUpstream:
    return SyntheticUpstream([PeerAddr("127.0.0.1", 9001 + i) for i in range(peers)])


def exchange(uri: str = "/", headers: dict[str, str] | None = None, peers: int = 2,
             last_failure: tuple[str, int] | None = None, tries_cap: int = 0,
             method: str = "GET") -> SyntheticExchange:
    raw = [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    return SyntheticExchange(method, uri, raw, peers, last_failure, tries_cap)


def run(code: str, timeout: float = 0.010, python: PythonConf | None = None, peers: int = 2,
        **request: Any) -> Run:
    """Run ``code`` once as a balancer_by_python_block against a synthetic request."""
    logs: list[tuple[str, str]] = []
    hook = runner(code, timeout, python, logs, peers)
    ex = exchange(peers=peers, **request)
    up = hook.upstream
    outcome = hook.run(ex, up)
    return Run(outcome, ex, up, logs)


def value(expr: str, **request: Any) -> Any:
    """The value of one API expression in a hook, or ``("TypeError"|"ValueError", message)``."""
    code = f"""
    try:
        ngx.ctx["value"] = {expr}
    except TypeError as err:
        ngx.ctx["value"] = ("TypeError", str(err))
    except ValueError as err:
        ngx.ctx["value"] = ("ValueError", str(err))
    balancer.set_current_peer("127.0.0.1", 1)
    """
    result = run(code, **request)
    assert result.kind is None, result.outcome.message
    return result.ctx["value"]
