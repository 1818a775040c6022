"""Lexer: nginx's word rules, quoting and escapes, comments, errors, and Python blocks."""

from __future__ import annotations

import pytest

from scriptlb.config.errors import COMMAND_LINE, ConfigError
from scriptlb.config.lexer import Lexer, Statement, unescape


def statements(text: str, file: str = "/c/x.conf") -> list[Statement]:
    lexer = Lexer(text, file)
    out = []
    while True:
        st = lexer.next_statement()
        out.append(st)
        if st.end == "eof":
            return out


def words(text: str) -> list[tuple[str, ...]]:
    return [st.words for st in statements(text) if st.words]


def lex_error(text: str, file: str = "/c/x.conf") -> str:
    with pytest.raises(ConfigError) as info:
        statements(text, file)
    return str(info.value)


# --------------------------------------------------------------------------- words and quoting


def test_bare_words_and_terminators() -> None:
    sts = statements("worker_processes  2;\nevents {\n}\n")
    assert [(s.words, s.end, s.line) for s in sts] == [
        (("worker_processes", "2"), ";", 1),
        (("events",), "{", 2),
        ((), "}", 3),
        ((), "eof", 4),
    ]


def test_comments_are_skipped_to_end_of_line_but_not_inside_words_or_quotes() -> None:
    assert words("# a comment ; {\nfoo a#b '#c'; # trailing\n") == [("foo", "a#b", "#c")]


def test_double_and_single_quotes_keep_spaces_and_specials() -> None:
    assert words("""x "a b;{}" 'c "d" }';""") == [("x", "a b;{}", 'c "d" }')]


def test_empty_quoted_string_is_a_word() -> None:
    assert words('proxy_set_header Connection "";') == [("proxy_set_header", "Connection", "")]


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        (r'"a\"b"', 'a"b'),
        (r"'a\'b'", "a'b"),
        (r'"a\\b"', "a\\b"),
        (r'"line\n"', "line\n"),
        (r'"tab\tx\r"', "tab\tx\r"),
        (r'"\d+\.\w"', r"\d+\.\w"),  # unknown escapes stay verbatim: regexes survive
        (r"bare\"quote", 'bare"quote'),
        (r"a\ b", "a\\ b"),  # an escaped space does not end the word; the backslash stays
    ],
)
def test_escapes_as_nginx(raw: str, value: str) -> None:
    assert words(f"x {raw};") == [("x", value)]


def test_variables_with_braces_stay_in_the_word() -> None:
    assert words("return 200 ${host}x$uri;") == [("return", "200", "${host}x$uri")]


def test_brace_inside_a_bare_word_is_part_of_it() -> None:
    assert words("location ~ ^/a}b {") == [("location", "~", "^/a}b")]


def test_unescape_helper_keeps_lone_trailing_backslash() -> None:
    assert unescape("a\\") == "a\\"


def test_line_numbers_count_newlines_inside_quotes() -> None:
    sts = statements('a "x\ny";\nb;')
    assert [(s.words[0], s.line) for s in sts if s.words] == [("a", 2), ("b", 3)]


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a 1 }\n", '[emerg] unexpected "}" in /c/x.conf:1'),
        ("\n;\n", '[emerg] unexpected ";" in /c/x.conf:2'),
        ("\n\n{\n", '[emerg] unexpected "{" in /c/x.conf:3'),
        ('a "1"x;\n', '[emerg] unexpected "x" in /c/x.conf:1'),
        ("a 1", '[emerg] unexpected end of file, expecting ";" or "}" in /c/x.conf:1'),
        ("a 1\n\n", '[emerg] unexpected end of file, expecting ";" or "}" in /c/x.conf:3'),
        ('a "open\n', '[emerg] unexpected end of file, expecting ";" or "}" in /c/x.conf:2'),
    ],
)
def test_syntax_errors_match_nginx(text: str, message: str) -> None:
    assert lex_error(text) == message


def test_unexpected_close_is_checked_by_parser_not_lexer() -> None:
    # the lexer reports a "}" statement; whether it is unexpected depends on nesting
    assert statements("}")[0].end == "}"


def test_command_line_end_without_semicolon() -> None:
    assert lex_error("daemon off", COMMAND_LINE) == (
        '[emerg] unexpected end of parameter, expecting ";" in command line'
    )


def test_quote_followed_by_paren_is_accepted() -> None:
    assert words('x "a")b;') == [("x", "a", ")b")]


# --------------------------------------------------------------------------- Python blocks


def python_block(body: str, name: str = "balancer_by_python_block") -> Statement:
    sts = statements(f"upstream u {{\n    {name} {{{body}}}\n}}\n")
    [st] = [s for s in sts if s.end == "python"]
    return st


def test_python_block_body_is_captured_verbatim_and_dedented() -> None:
    st = python_block("\n        x = 1\n        if x:\n            y = 2\n    ")
    assert st.code == "x = 1\nif x:\n    y = 2\n"
    assert st.words == ("balancer_by_python_block",)
    assert st.line == 2  # the line of "{", where nginx reports the directive
    assert st.code_line == 3  # code's first line
    assert st.close_line == 6


def test_python_block_braces_quotes_and_hashes_do_not_end_it() -> None:
    body = '''
        d = {"a": "}", 'b': '{', "c": {"n": [1, (2, 3)]}}  # closing } in a comment
        s = """ } ' " { """
        t = \'\'\'
        }
        \'\'\'
        e = "escaped \\" } quote"
        r = r"raw \\" } still raw"
        f = f"{d['a']} }}"
        b = b'}'
        # { lone brace in a comment
    '''
    st = python_block(body)
    assert st.code is not None
    compiled = compile(st.code, "hook", "exec")  # the captured text is exactly valid Python
    namespace: dict[str, object] = {}
    exec(compiled, namespace)
    assert namespace["d"] == {"a": "}", "b": "{", "c": {"n": [1, (2, 3)]}}
    assert namespace["s"] == " } ' \" { "
    assert namespace["f"] == "} }"
    assert namespace["b"] == b"}"


def test_statements_after_a_python_block_continue_normally() -> None:
    sts = statements("upstream u {\n  balancer_by_python_block {\n    x = {1: 2}\n  }\n  keepalive 2;\n}\n")
    assert [(s.words, s.end, s.line) for s in sts] == [
        (("upstream", "u"), "{", 1),
        (("balancer_by_python_block",), "python", 2),
        (("keepalive", "2"), ";", 5),
        ((), "}", 6),
        ((), "eof", 7),
    ]


def test_one_line_python_block_starts_on_the_brace_line() -> None:
    st = python_block(" x = 1 ")
    assert st.code == "x = 1 "
    assert st.code_line == 2


def test_python_block_only_for_the_by_python_block_suffix() -> None:
    # a "{" after another directive opens a directive block as usual
    assert statements("upstream u {")[0].end == "{"
    assert statements("log_by_python_block {x = '}'}")[0].end == "python"


def test_unterminated_python_block_is_an_eof_error() -> None:
    text = "upstream u {\n  balancer_by_python_block {\n    x = {1: 2\n}\n"
    assert lex_error(text) == '[emerg] unexpected end of file, expecting "}" in /c/x.conf:5'


def test_unterminated_triple_quote_swallows_the_rest() -> None:
    text = 'upstream u {\n  balancer_by_python_block {\n    x = """ }\n}\n}\n'
    assert "unexpected end of file" in lex_error(text)


def test_unterminated_single_quote_ends_at_newline() -> None:
    # Python reports the bad literal later; the block still closes where it should
    st = python_block("\n    x = 'oops\n")
    assert st.code == "x = 'oops\n"


def test_unclosed_paren_does_not_swallow_the_closing_brace() -> None:
    # Python will report "'(' was never closed" at the right line; the config still parses
    st = python_block("\n    x = (1,\n")
    assert st.code == "x = (1,\n"
    assert st.close_line == 4
    with pytest.raises(SyntaxError, match="never closed"):
        compile(st.code, "hook", "exec")


def test_mismatched_closers_inside_braces() -> None:
    st = python_block("\n    d = {'k': [1, 2)}\n    y = 1\n")
    assert st.code == "d = {'k': [1, 2)}\ny = 1\n"
