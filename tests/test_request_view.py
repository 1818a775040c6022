"""The request objects (Exchange, the synthetic and replayed ones, a stream session, the test
doubles) meet scriptlb.request_view's protocols: mypy checks tests/request_view_conformance.py."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import pytest
from conftest import ROOT
from fake_request import FakeExchange

from scriptlb.config.model import ProxyConf
from scriptlb.replay.engine import ReplayExchange
from scriptlb.replay.logs import Recorded
from scriptlb.replay.synthetic import SyntheticExchange
from scriptlb.request_view import RequestView

CONFORMANCE = "tests/request_view_conformance.py"


def test_request_objects_meet_the_request_view_protocols() -> None:
    # the project's mypy settings (strict), from the checkout: its cache is the one `make test`'s
    # mypy run fills, so only this file and the test modules it imports are checked anew
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", "pyproject.toml", "--no-error-summary",
         "--hide-error-context", CONFORMANCE],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode in (0, 1) and not result.stderr, result.stdout + result.stderr
    # errors inside the test modules it imports (tests are not type-checked) are not findings
    findings = [line for line in result.stdout.splitlines() if line.startswith(CONFORMANCE)]
    assert findings == [], "\n".join(findings)


COOKIE_LINES = [(b"Host", b"a.example"), (b"Cookie", b"a=1"), (b"X-Other", b"x"), (b"cookie", b"b=2")]


def _synthetic() -> RequestView:
    return SyntheticExchange(headers=COOKIE_LINES)


def _replayed() -> RequestView:
    recorded = Recorded(1, 0.0, "GET", "/", COOKIE_LINES, "127.0.0.1", 200, None, False)
    return ReplayExchange(recorded, 0.0, "backend", None, ProxyConf(), 0)


def _variables_double() -> RequestView:
    return FakeExchange(headers=COOKIE_LINES)


@pytest.mark.parametrize("make", [_synthetic, _replayed, _variables_double])
def test_every_request_reads_headers_as_nginx(make: Callable[[], RequestView]) -> None:
    # what the types cannot say: Cookie lines joined with "; ", other headers the first line's
    ex = make()
    assert ex.header("cookie") == "a=1; b=2"
    assert ex.header("host") == "a.example"
    assert ex.header("missing") is None
    assert ex.is_stream is False
