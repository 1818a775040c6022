"""Bare LF line endings in request heads, turned into CRLF before the parser sees them.

nginx (and RFC 9112 section 2.2) accept a request line and header lines ended by a bare LF;
llhttp refuses them and has no leniency for the request line. scriptlb re-frames every request
it forwards (its own head, its own body framing), so accepting them here adds no smuggling
surface: the parser still sees one unambiguous head. A bare CR and every other control byte
stay the parser's to refuse. Only heads are touched: the caller hands over only reads that
carry a head, and within a read the bytes after a head that announces a body are left alone.

The common read (CRLF everywhere) costs two ``bytes.count`` calls and one slice: the only
state kept across reads is the head's last two bytes.
"""

from __future__ import annotations

CR = 13
LF = 10

# header names that announce a body after the head (lower case, with the colon)
_BODY_HEADERS = (b"content-length:", b"transfer-encoding:")


class HeadLineEnds:
    """One connection's position in the head being received: its last two bytes so far."""

    __slots__ = ("tail",)

    def __init__(self) -> None:
        self.tail = b""

    def fix(self, data: bytes, new_head: bool) -> bytes:
        """``data`` with every bare LF of the head(s) it carries preceded by a CR.
        ``new_head``: no byte of the head being received came before ``data``."""
        if new_head:
            self.tail = b""
        if data.count(b"\n") == data.count(b"\r\n"):  # (a leading bare LF makes them differ)
            self.tail = (self.tail + data)[-2:] if len(data) < 2 else data[-2:]
            return data
        return self._rewrite(data)

    def _rewrite(self, data: bytes) -> bytes:
        tail = self.tail
        prev = tail[-1] if tail else 0
        # where the previous reads left the current line: empty (or a lone CR) at its start
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
            before = data[lf - 1] if lf > pos else prev
            out.append(line)
            out.append(b"\n" if before == CR else b"\r\n")
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
        self.tail = (tail + data)[-2:]
        return b"".join(out)
