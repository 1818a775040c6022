"""Bare LF line endings in request heads: accepted as nginx does, never touching a body."""

from __future__ import annotations

from scriptlb.http.line_ends import crlf_head


def fixed(*reads: bytes) -> bytes:
    out = b""
    for read in reads:
        out += read if read.count(b"\n") == read.count(b"\r\n") else crlf_head(read, out)
    return out


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


def test_a_head_begun_earlier_ends_the_rewriting_at_its_end() -> None:
    # (whether it announced a body is unknown: what follows is left alone)
    assert crlf_head(b"Host: a\n\nx\ny", b"GET / HTTP/1.0\r\n") == b"Host: a\r\n\r\nx\ny"
