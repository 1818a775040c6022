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


def test_the_directives_listed_as_refused_are_unknown() -> None:
    """The "refused on purpose" list names no directive the table accepts (wildcards: none of
    the table's names may match them either)."""
    import fnmatch

    from scriptlb.config.reference import REFUSED

    for names in REFUSED:
        for pattern in (name.strip() for name in names.split(",")):
            accepted = [d for d in DIRECTIVES if fnmatch.fnmatchcase(d, pattern)]
            assert not accepted, (pattern, accepted)
