"""Performance figures live in one document, bench/README.md, which the others refer to: two
copies of a figure drift apart as soon as one is re-measured."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# A measured time or rate: "1.6 µs", "19,060 req/s", "| 125,000/s |". (The sandbox's charges per
# item, in ns, are rules of the budget, not measurements: not matched.)
FIGURE = re.compile(r"\d[\d,.]*\s?(?:µs|us/try|req/s|requests/s)\b|\d[\d,]*/s \|")


def test_figures_are_only_in_bench_readme() -> None:
    documents = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    found = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in documents
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if FIGURE.search(line)
    ]
    assert not found, "move these figures to bench/README.md and refer to it:\n" + "\n".join(found)


def test_bench_readme_has_the_sections_the_others_refer_to() -> None:
    text = (ROOT / "bench" / "README.md").read_text()
    for heading in ("## Headline figures", "## Hook costs", "## Replay speed"):
        assert heading in text
