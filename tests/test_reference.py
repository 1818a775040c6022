"""docs/directives.md is generated from the directive table and stays complete."""

from __future__ import annotations

from pathlib import Path

from scriptlb.config.directives import DIRECTIVES
from scriptlb.config.reference import REFERENCE, render

ROOT = Path(__file__).resolve().parent.parent


def test_every_directive_is_documented_and_nothing_else() -> None:
    assert set(REFERENCE) == set(DIRECTIVES)


def test_the_page_is_the_generated_one() -> None:
    # regenerate with: .venv/bin/python -m scriptlb.config.reference > docs/directives.md
    assert (ROOT / "docs" / "directives.md").read_text() == render()
