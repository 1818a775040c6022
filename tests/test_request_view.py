"""The request objects (Exchange, the synthetic and replayed ones, a stream session, the test
doubles) meet scriptlb.request_view's protocols: mypy checks tests/request_view_conformance.py."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT

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
