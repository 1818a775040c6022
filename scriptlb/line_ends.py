"""Bare LF line endings in request heads, turned into CRLF before the parser sees them.

nginx (and RFC 9112 section 2.2) accept a request line and header lines ended by a bare LF;
llhttp refuses them and has no leniency for the request line. scriptlb re-frames every request
it forwards (its own head, its own body framing), so accepting them here adds no smuggling
surface: the parser still sees one unambiguous head. A bare CR and every other control byte
stay the parser's to refuse. Only heads are touched: the caller hands over only reads that
carry a head, and within a read the bytes after a head that announces a body are left alone.
"""

from __future__ import annotations

CR = 13
LF = 10

# header names that announce a body after the head (lower case, with the colon)
_BODY_HEADERS = (b"content-length:", b"transfer-encoding:")


class HeadLineEnds:
    """One connection's position in the head being received, across reads."""

    __slots__ = ("line_start", "prev", "seen_line")

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """A new head begins (the previous request was parsed to its end)."""
        self.prev = 0            # the last byte received of this head (0: none yet)
        self.line_start = True   # the current line holds nothing yet (a lone CR at most)
        self.seen_line = False   # the request line has begun (blank lines before it are skipped)

    def fix(self, data: bytes) -> bytes:
        """``data`` with every bare LF of the head(s) it carries preceded by a CR."""
        if data.count(b"\n") == data.count(b"\r\n") and not (data[:1] == b"\n" and self.prev != CR):
            self._note_tail(data)  # CRLF everywhere, the common case: nothing to copy
            return data
        out: list[bytes] = []
        self._rewrite(data, out)
        return b"".join(out)

    def _note_tail(self, data: bytes) -> None:
        if not data:
            return
        self.prev = data[-1]
        tail = data[data.rfind(b"\n") + 1:]
        self.line_start = tail.strip(b"\r") == b"" and (self.line_start or b"\n" in data)
        if data.strip(b"\r\n"):
            self.seen_line = True

    def _rewrite(self, data: bytes, out: list[bytes]) -> None:
        pos = 0
        size = len(data)
        announces_body = False
        while pos < size:
            lf = data.find(b"\n", pos)
            if lf == -1:
                out.append(data[pos:])
                self._note_tail(data[pos:])
                return
            line = data[pos:lf]
            before = data[lf - 1] if lf > pos else self.prev
            out.append(line)
            out.append(b"\n" if before == CR else b"\r\n")
            pos = lf + 1
            blank = self.line_start and line in (b"", b"\r")
            self.line_start = True
            self.prev = LF
            if not blank:
                self.seen_line = True
                announces_body = announces_body or line[:18].lower().startswith(_BODY_HEADERS)
            elif self.seen_line:
                # the head ends here; a body's bytes are never rewritten
                if announces_body:
                    out.append(data[pos:])
                    return
                self.seen_line = False
