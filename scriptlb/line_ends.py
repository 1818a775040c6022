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

CR = 13
LF = 10

# header names that announce a body after the head (lower case, with the colon)
_BODY_HEADERS = (b"content-length:", b"transfer-encoding:")


def crlf_head(data: bytes, before: bytes) -> bytes:
    """``data`` with every bare LF of the head(s) it carries preceded by a CR. ``before``: the
    bytes of this head read earlier (b"" when ``data`` begins it). The caller calls this only
    when ``data.count(b"\n") != data.count(b"\r\n")``: a read with CRLF everywhere (the
    common case) costs two counts and nothing else."""
    tail = before[-2:]
    prev = tail[-1] if tail else 0
    # where the earlier reads left the current line: empty (or a lone CR) at its start
    line_start = not tail or tail[-1] == LF or tail in (b"\r", b"\n\r")
    # an earlier read of this head: the parser had begun a request (its line has begun)
    seen_line = bool(tail)
    out: list[bytes] = []
    pos = 0
    size = len(data)
    announces_body = False
    whole_head = not tail  # this head began in this read (else: did it announce a body?)
    while pos < size:
        lf = data.find(b"\n", pos)
        if lf == -1:
            out.append(data[pos:])
            break
        line = data[pos:lf]
        before_lf = data[lf - 1] if lf > pos else prev
        out.append(line)
        out.append(b"\n" if before_lf == CR else b"\r\n")
        pos = lf + 1
        blank = line_start and line in (b"", b"\r")
        line_start = True
        prev = LF
        if not blank:
            seen_line = True
            announces_body = announces_body or line[:18].lower().startswith(_BODY_HEADERS)
        elif seen_line:
            # the head ends here; a body's bytes are never rewritten (nor whatever follows
            # a head whose beginning came in an earlier read: it may have announced one)
            if announces_body or not whole_head:
                out.append(data[pos:])
                break
            seen_line = False
            whole_head = True
    return b"".join(out)
