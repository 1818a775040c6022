"""nginx's config tokenizer, statement by statement, with nginx's exact quirks and messages.

Theory of operation: like nginx's ``ngx_conf_read_token``, the lexer does not hand out single
tokens but whole *statements*: the words of one directive plus what ended it (``;``, ``{``, a
``}`` that closes the enclosing block, or the end of the file). That is the level at which nginx
reports syntax errors ("unexpected "}"" only makes sense knowing whether words were read), so
the port keeps nginx's state flags (``last_space``, ``need_space``, quoting, ``$`` variables)
and its escape rules.

One extension: a directive whose name ends in ``_by_python_block`` opens a block of *Python*,
not of directives. Its body is captured verbatim up to the brace that closes it, skipping
Python string literals, comments and brackets so that ``{``, ``}``, quotes and ``#`` inside
Python code never end the block early (see ``_scan_python``).
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass

from scriptlb.config.errors import COMMAND_LINE, ConfigError
from scriptlb.config.model import Source

PYTHON_BLOCK_SUFFIX = "_by_python_block"

_SPACE = " \t\r\n"

# nginx unescapes these after a backslash (in quoted and bare words alike); any other
# backslash sequence is kept verbatim, which is what keeps regexes like "\d+" intact.
_ESCAPES = {'"': '"', "'": "'", "\\": "\\", "t": "\t", "r": "\r", "n": "\n"}


@dataclass(frozen=True, slots=True)
class Statement:
    """One directive as read: its words and what terminated it.

    ``end`` is ``";"``, ``"{"`` (a block of directives follows), ``"python"`` (a Python block
    was captured into ``code``), ``"}"`` (the enclosing block ends; no words) or ``"eof"``.
    ``line`` is where the terminator was read: nginx reports directive errors at that line.
    """

    words: tuple[str, ...]
    end: str
    line: int
    code: str | None = None  # dedented body of a *_by_python_block
    code_line: int = 0  # conf line of the code's first line
    close_line: int = 0  # line of the brace closing a Python block


class Lexer:
    """Reads statements from one file's text (or a ``-g`` string when ``file`` is COMMAND_LINE)."""

    def __init__(self, text: str, file: str) -> None:
        self.text = text
        self.file = file
        self.pos = 0
        self.line = 1

    def error(self, message: str) -> ConfigError:
        line = 0 if self.file == COMMAND_LINE else self.line
        return ConfigError(message, Source(self.file, line))

    # ------------------------------------------------------------------ directives

    def next_statement(self) -> Statement:
        """The next statement; raises ConfigError with nginx's text on a syntax error."""
        text, n = self.text, len(self.text)
        words: list[str] = []
        start = 0
        last_space, need_space, sharp_comment = True, False, False
        quoted, d_quoted, s_quoted, variable = False, False, False, False

        while True:
            if self.pos >= n:
                if words or not last_space:
                    if self.file == COMMAND_LINE:
                        raise self.error('unexpected end of parameter, expecting ";"')
                    raise self.error('unexpected end of file, expecting ";" or "}"')
                return Statement((), "eof", self.line)

            ch = text[self.pos]
            self.pos += 1
            if ch == "\n":
                self.line += 1
                sharp_comment = False
            if sharp_comment:
                continue
            if quoted:
                quoted = False
                continue

            if need_space:  # right after a closing quote
                if ch in _SPACE:
                    last_space, need_space = True, False
                    continue
                if ch in ";{":
                    return self._finish(words, ch)
                if ch == ")":
                    last_space, need_space = True, False
                else:
                    raise self.error(f'unexpected "{ch}"')

            if last_space:  # between words: ch may start a new word
                start = self.pos - 1
                if ch in _SPACE:
                    continue
                if ch in ";{":
                    if not words:
                        raise self.error(f'unexpected "{ch}"')
                    return self._finish(words, ch)
                if ch == "}":
                    if words:
                        raise self.error('unexpected "}"')
                    return Statement((), "}", self.line)
                if ch == "#":
                    sharp_comment = True
                    continue
                last_space = False
                if ch == "\\":
                    quoted = True
                elif ch == '"':
                    start += 1
                    d_quoted = True
                elif ch == "'":
                    start += 1
                    s_quoted = True
                elif ch == "$":
                    variable = True
                continue

            # inside a word
            if ch == "{" and variable:  # "${name}" keeps its brace
                continue
            variable = False
            if ch == "\\":
                quoted = True
                continue
            if ch == "$":
                variable = True
                continue
            found = False
            if d_quoted:
                if ch == '"':
                    d_quoted, need_space, found = False, True, True
            elif s_quoted:
                if ch == "'":
                    s_quoted, need_space, found = False, True, True
            elif ch in _SPACE or ch in ";{":
                last_space, found = True, True
            if found:
                words.append(unescape(text[start : self.pos - 1]))
                if ch in ";{":
                    return self._finish(words, ch)

    def _finish(self, words: list[str], terminator: str) -> Statement:
        if terminator == "{" and words[0].endswith(PYTHON_BLOCK_SUFFIX):
            return self._python_block(words)
        return Statement(tuple(words), terminator, self.line)

    # ------------------------------------------------------------------ Python blocks

    def _python_block(self, words: list[str]) -> Statement:
        brace_line = self.line
        body = self._scan_python()
        close_line = self.line
        first, newline, rest = body.partition("\n")
        if newline and not first.strip():
            # the usual layout: nothing after "{" on its line; code starts on the next one
            code, code_line = textwrap.dedent(rest), brace_line + 1
        else:
            code, code_line = textwrap.dedent(body), brace_line
        return Statement(tuple(words), "python", brace_line, code, code_line, close_line)

    def _scan_python(self) -> str:
        """Consume Python source up to the brace closing the block; return the body text.

        Only three things can hide a ``}``: a string literal, a comment and an open ``{``.
        String prefixes (r, b, f, u) need no special case: in every kind of literal a backslash
        keeps the next character from ending it, and an f-string's ``{}`` sit inside the literal.
        A ``}`` closes the block when no ``{`` is open, even if a ``(`` or ``[`` is: that code is
        broken anyway, and Python's compiler then names the unclosed bracket and its line,
        which says more than the config's "unexpected end of file".
        """
        text, n = self.text, len(self.text)
        begin = i = self.pos
        open_brackets: list[str] = []
        while i < n:
            ch = text[i]
            if ch == "#":
                end = text.find("\n", i)
                i = n if end < 0 else end
                continue
            if ch in "\"'":
                i = _skip_string(text, i)
                continue
            if ch in "([{":
                open_brackets.append(ch)
            elif ch in ")]":
                if open_brackets and open_brackets[-1] == _OPENER[ch]:
                    open_brackets.pop()
            elif ch == "}":
                if "{" not in open_brackets:
                    self.line += text.count("\n", begin, i)
                    self.pos = i + 1
                    return text[begin:i]
                while open_brackets.pop() != "{":
                    pass
            i += 1
        self.line += text.count("\n", begin, n)
        self.pos = n
        raise self.error('unexpected end of file, expecting "}"')


_OPENER = {")": "(", "]": "["}


def _skip_string(text: str, i: int) -> int:
    """Index just past the string literal starting with the quote at ``i``."""
    n = len(text)
    quote = text[i]
    if text.startswith(quote * 3, i):
        j = i + 3
        while j < n:
            if text[j] == "\\":
                j += 2
            elif text.startswith(quote * 3, j):
                return j + 3
            else:
                j += 1
        return n
    j = i + 1
    while j < n:
        ch = text[j]
        if ch == "\\":
            j += 2
        elif ch == quote:
            return j + 1
        elif ch == "\n":  # unterminated: Python's compiler will report it at this line
            return j
        else:
            j += 1
    return n


def unescape(raw: str) -> str:
    """nginx's word copy: ``\\"`` ``\\'`` ``\\\\`` ``\\t`` ``\\r`` ``\\n``; other escapes stay."""
    if "\\" not in raw:
        return raw
    out: list[str] = []
    i, n = 0, len(raw)
    while i < n:
        ch = raw[i]
        if ch == "\\" and i + 1 < n and raw[i + 1] in _ESCAPES:
            out.append(_ESCAPES[raw[i + 1]])
            i += 2
            continue
        out.append(ch)
        i += 1
    return "".join(out)
