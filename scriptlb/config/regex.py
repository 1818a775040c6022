"""nginx's regexes (PCRE syntax) compiled with Python's ``re``.

The loader compiles every regex once to reject a bad one with its file:line, and the run-time
matchers (locations, server names, maps, rewrite, stream maps) compile them the same way, so
what loads is what runs.
"""

from __future__ import annotations

import re

# PCRE's named group "(?<name>" is Python's "(?P<name>" (lookbehinds "(?<=" "(?<!" stay)
_PCRE_NAMED_GROUP = re.compile(r"\(\?<(?=[A-Za-z_])")

# PCRE's \Q...\E: the characters between are literal (to the end when \E is missing)
_PCRE_QUOTED = re.compile(r"\\Q(.*?)(?:\\E|$)", re.DOTALL)


# PCRE's Unicode classes Python's ``re`` lacks, as the nearest class it has
_PCRE_CLASSES = {r"\p{N}": r"\d", r"\p{Nd}": r"\d", r"\p{L}": r"[^\W\d_]"}


def compile_nginx_regex(pattern: str, caseless: bool = False) -> re.Pattern[str]:
    """Compile a PCRE-style nginx regex with Python's ``re``; raises ``re.error``.

    The config builder calls this at load time so a bad regex is a config error.
    """
    if "\\Q" in pattern:
        pattern = _PCRE_QUOTED.sub(lambda m: re.escape(m.group(1)), pattern)
    if "\\p{" in pattern:
        for pcre, python in _PCRE_CLASSES.items():
            pattern = pattern.replace(pcre, python)
    return re.compile(_PCRE_NAMED_GROUP.sub("(?P<", pattern), re.IGNORECASE if caseless else 0)
