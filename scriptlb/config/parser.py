"""Generic directive tree: statements -> ``Node``s, with ``include`` expanded in place.

The parser knows nothing about what directives mean (that is ``directives.py``); it only
knows nginx's block structure and ``include``, which nginx also handles before any module sees
the directive: an included file's directives are parsed in the includer's context, and a file
must be balanced on its own (a stray ``}`` in it is "unexpected").
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field

from scriptlb.config.errors import COMMAND_LINE, ConfigError
from scriptlb.config.lexer import Lexer, Statement
from scriptlb.config.model import Source

_MAX_INCLUDE_DEPTH = 32  # nginx recurses until it runs out of descriptors; we stop earlier


@dataclass(frozen=True, slots=True)
class Node:
    """One directive: ``name args... ;``, ``name args... { children }`` or a Python block."""

    name: str
    args: tuple[str, ...]
    source: Source  # where nginx reports errors for it: the line of its ";" or "{"
    children: tuple[Node, ...] | None = None  # None: not a block
    close: Source | None = None  # the closing "}" of a block (nginx's line for post-block checks)
    code: str | None = None  # a *_by_python_block's dedented body
    code_line: int = 0  # conf line of the code's first line


@dataclass(slots=True)
class ParseResult:
    nodes: tuple[Node, ...]
    files: list[str] = field(default_factory=list)  # every file read, in order (for -T)


def read_file(path: str, cause: Source | None) -> str:
    """A config file's text; a failure is nginx's ``open() "/p" failed (2: ...)``."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            return f.read()
    except OSError as e:
        reason = f"({e.errno}: {e.strerror})" if e.errno else f"({e})"
        raise ConfigError(f'open() "{path}" failed {reason}', cause) from None


class Parser:
    def __init__(self, conf_dir: str) -> None:
        self.conf_dir = conf_dir  # includes are relative to the main file's directory, as nginx's
        self.files: list[str] = []
        self._depth = 0

    def parse_file(self, path: str, cause: Source | None = None) -> tuple[Node, ...]:
        text = read_file(path, cause)
        if path not in self.files:
            self.files.append(path)
        self._depth += 1
        try:
            nodes, _ = self._block(Lexer(text, path), in_block=False)
        finally:
            self._depth -= 1
        return tuple(nodes)

    def parse_params(self, params: str) -> tuple[Node, ...]:
        """``-g`` directives: main-context simple directives, errors "in command line"."""
        lexer = Lexer(params, COMMAND_LINE)
        nodes: list[Node] = []
        while True:
            st = lexer.next_statement()
            if st.end == "eof":
                return tuple(nodes)
            if st.end != ";":
                raise ConfigError("block directives are not supported in -g option", _cmdline())
            nodes.append(Node(st.words[0], st.words[1:], _cmdline()))

    # ------------------------------------------------------------------ internals

    def _block(self, lexer: Lexer, in_block: bool) -> tuple[list[Node], int]:
        nodes: list[Node] = []
        while True:
            st = lexer.next_statement()
            if st.end == "eof":
                if in_block:
                    raise lexer.error('unexpected end of file, expecting "}"')
                return nodes, st.line
            if st.end == "}":
                if not in_block:
                    raise lexer.error('unexpected "}"')
                return nodes, st.line
            source = Source(lexer.file, st.line)
            if st.words[0] == "include":
                nodes.extend(self._include(st, source))
            else:
                nodes.append(self._node(lexer, st, source))

    def _node(self, lexer: Lexer, st: Statement, source: Source) -> Node:
        name, args = st.words[0], st.words[1:]
        if st.end == "{":
            children, close_line = self._block(lexer, in_block=True)
            return Node(name, args, source, tuple(children), Source(lexer.file, close_line))
        if st.end == "python":
            close = Source(lexer.file, st.close_line)
            return Node(name, args, source, (), close, st.code, st.code_line)
        return Node(name, args, source)

    def _include(self, st: Statement, source: Source) -> list[Node]:
        if st.end != ";":
            raise ConfigError('directive "include" is not terminated by ";"', source)
        if len(st.words) != 2:
            raise ConfigError('invalid number of arguments in "include" directive', source)
        if self._depth >= _MAX_INCLUDE_DEPTH:
            raise ConfigError(f"include depth exceeds {_MAX_INCLUDE_DEPTH} (recursive include?)", source)
        pattern = os.path.join(self.conf_dir, st.words[1])
        if glob.has_magic(pattern):
            # nginx: a pattern matching nothing is fine; matches are read in sorted order
            paths = sorted(p for p in glob.glob(pattern) if not os.path.isdir(p))
        else:
            paths = [pattern]
        nodes: list[Node] = []
        for path in paths:
            nodes.extend(self.parse_file(os.path.normpath(path), source))
        return nodes


def _cmdline() -> Source:
    return Source(COMMAND_LINE, 0)


def parse(conf_file: str, params: str | None = None) -> ParseResult:
    """Parse ``-g`` params (first, as nginx does) and then the main file, includes expanded."""
    parser = Parser(os.path.dirname(conf_file))
    cmdline = parser.parse_params(params) if params else ()
    nodes = parser.parse_file(conf_file)
    return ParseResult(cmdline + nodes, parser.files)
