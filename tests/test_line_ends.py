"""Bare LF line endings in request heads: accepted as nginx does, never touching a body."""

from __future__ import annotations

from scriptlb.line_ends import HeadLineEnds


def fixed(*reads: bytes) -> bytes:
    ends = HeadLineEnds()
    return b"".join(ends.fix(r, i == 0) for i, r in enumerate(reads))


def test_crlf_heads_are_returned_unchanged() -> None:
    head = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
    ends = HeadLineEnds()
    assert ends.fix(head, True) is head


def test_bare_lf_becomes_crlf() -> None:
    assert fixed(b"GET / HTTP/1.0\nHost: a\n\n") == b"GET / HTTP/1.0\r\nHost: a\r\n\r\n"


def test_mixed_endings_and_a_crlf_split_across_reads() -> None:
    assert fixed(b"GET / HTTP/1.0\r", b"\nHost: a\n", b"\n") == b"GET / HTTP/1.0\r\nHost: a\r\n\r\n"


def test_body_after_a_head_that_announces_one_is_untouched() -> None:
    raw = b"POST / HTTP/1.0\nContent-Length: 4\n\na\nb\n"
    assert fixed(raw) == b"POST / HTTP/1.0\r\nContent-Length: 4\r\n\r\na\nb\n"


def test_pipelined_heads_without_body_are_all_fixed() -> None:
    raw = b"GET /1 HTTP/1.1\nHost: a\n\nGET /2 HTTP/1.1\nHost: a\n\n"
    assert fixed(raw) == raw.replace(b"\n", b"\r\n")


def test_bare_cr_is_left_for_the_parser_to_refuse() -> None:
    assert fixed(b"GET / HTTP/1.0\rHost: a\n\n") == b"GET / HTTP/1.0\rHost: a\r\n\r\n"


def test_body_after_a_head_split_across_reads_is_untouched() -> None:
    head = b"POST / HTTP/1.0\r\nContent-Length: 5\r\n"
    assert fixed(head, b"\na\nb\nc") == head + b"\r\na\nb\nc"


def test_a_new_head_forgets_the_previous_one() -> None:
    ends = HeadLineEnds()
    ends.fix(b"GET / HTTP/1.0\r", True)
    assert ends.fix(b"\nHost: a\n\n", True) == b"\r\nHost: a\r\n\r\n"
