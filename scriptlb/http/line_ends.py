"""Bare LF line endings in request heads, turned into CRLF before the parser sees them.

nginx (and RFC 9112 section 2.2) accept a request line and header lines ended by a bare LF;
llhttp refuses them and has no leniency for the request line. scriptlb re-frames every request
it forwards (its own head, its own body framing), so accepting them here adds no smuggling
surface: the parser still sees one unambiguous head. A bare CR and every other control byte
stay the parser's to refuse. Only heads are touched: the caller hands over only reads that
carry a head, and within a read the bytes after a head that announces a body are left alone.

No state of its own: the connection already keeps the head's previous read (for its timeout
log line), which says how the current line began.
"""

from __future__ import annotations

import re

CR = 13
LF = 10

# header names that announce a body after the head (lower case, with the colon)
_BODY_HEADERS = (b"content-length:", b"transfer-encoding:")


# the most of a read rewritten (a longer head is refused by the head limits anyway); the
# rest of the read is passed on as it came
REWRITE_MAX = 32 * 1024  # (its copy stays below malloc's mmap threshold: no heap growth)
_BARE_LF = re.compile(rb"(?<!\r)\n")


def crlf_head(data: bytes, before: bytes) -> bytes:
    """``data`` with every bare LF of the head(s) it carries preceded by a CR. ``before``: the
    bytes of this head read earlier (b"" when ``data`` begins it). The caller calls this only
    when ``data`` has an LF that is not part of a CRLF: a read with CRLF everywhere (the
    common case) costs one search and nothing else."""
    fixed, end = crlf_head_part(data, before)
    return fixed + data[end:]


def crlf_head_part(data: bytes, before: bytes) -> tuple[bytes, int]:
    """The rewritten head part of ``data`` and where it ends in ``data`` (what follows, a
    body, is to be used as it came: the caller can pass it on without copying it here)."""
    end = _rewritten_end(data, before[-2:])
    first = 1 if data[:1] == b"\n" and before[-1:] == b"\r" else 0  # a CRLF split by the read
    fixed = _BARE_LF.sub(b"\r\n", data[first:end] if first or end < len(data) else data)
    return (b"\n" + fixed if first else fixed), end


def _rewritten_end(data: bytes, tail: bytes) -> int:
    """Where the rewriting stops: after the first head that announces a body (or whose
    beginning came in an earlier read: it may have), else the end of ``data``."""
    # where the earlier reads left the current line: empty (or a lone CR) at its start
    line_start = not tail or tail[-1] == LF or tail in (b"\r", b"\n\r")
    # an earlier read of this head: the parser had begun a request (its line has begun)
    seen_line = bool(tail)
    whole_head = not tail
    announces_body = False
    pos = 0
    size = min(len(data), REWRITE_MAX)
    while pos < size:
        lf = data.find(b"\n", pos, size)
        if lf == -1:
            return size
        line = data[pos:lf]
        pos = lf + 1
        blank = line_start and line in (b"", b"\r")
        line_start = True
        if not blank:
            seen_line = True
            announces_body = announces_body or line[:18].lower().startswith(_BODY_HEADERS)
        elif seen_line:
            if announces_body or not whole_head:
                return pos  # a body's bytes are never rewritten
            seen_line = False
            whole_head = True
    return size
