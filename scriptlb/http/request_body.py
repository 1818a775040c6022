"""A request body as nginx keeps it: ``client_body_buffer_size`` bytes in memory, the rest in a
temporary file under ``client_body_temp_path``.

The client connection appends what it parses (``RequestBody.append``); the proxy either takes
what arrived as it goes (``take``, a streamed body: kept in memory, the connection's
back-pressure bounds it) or, once the body is complete, takes it whole (``buffered``): bytes
when it stayed in memory, else a ``SpooledBody`` that every try sends again from the file
(``SpooledBody.send``), a block at a time as the peer's socket takes it.

Files: created on the first byte beyond the memory buffer, unlinked as soon as they are open
(``client_body_in_file_only on`` keeps them, as nginx does), closed when the request ends
(``close``, called by the client connection) or with the object. A failure to create or write
one is ``BodyFileError`` (nginx answers 500 and logs at crit).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from typing import Protocol

from scriptlb.config.model import ClientBodyConf
from scriptlb.logs.errorlog import os_error_text

# the most read from a body file per write to the peer
SEND_BLOCK = 64 * 1024

_file_numbers = itertools.count(1)


class BodyFileError(OSError):
    """A body file could not be created or written; ``str()`` is nginx's log text."""


class BodyWriter(Protocol):
    """What ``SpooledBody.send`` needs from an upstream connection."""

    on_writable: Callable[[], None] | None

    @property
    def write_buffer_full(self) -> bool: ...

    def write_body(self, data: bytes, last: bool) -> None: ...


class SpooledBody:
    """A complete body in a file (the memory part written there too): what each try sends."""

    __slots__ = ("_fd", "size")

    def __init__(self, fd: int, size: int) -> None:
        self._fd = fd
        self.size = size

    def __len__(self) -> int:
        return self.size

    def send(self, conn: BodyWriter) -> None:
        """Write the body to ``conn`` (its head already sent), pacing on its write buffer."""
        offset = 0

        def pump() -> None:
            nonlocal offset
            while offset < self.size and not conn.write_buffer_full:
                if self._fd < 0:
                    conn.on_writable = None  # the request ended: nothing more to send
                    return
                block = os.pread(self._fd, min(SEND_BLOCK, self.size - offset), offset)
                if not block:
                    break  # (the file cannot shrink under us; belt and braces)
                offset += len(block)
                conn.write_body(block, last=False)
            if offset >= self.size or self._fd < 0:
                conn.on_writable = None
                conn.write_body(b"", last=True)

        conn.on_writable = pump
        pump()

    def close(self) -> None:
        self._fd = -1  # the descriptor belongs to the RequestBody, which closes it


class RequestBody:
    """The body of one request as it arrives (see the module docstring)."""

    __slots__ = ("_chunks", "_conf", "_fd", "_in_memory", "_kept", "_path", "_spooled", "_written")

    def __init__(self, conf: ClientBodyConf | None = None) -> None:
        self._conf = conf  # None: memory only (a streamed or discarded body)
        self._chunks: list[bytes] = []
        self._in_memory = 0
        self._fd = -1
        self._written = 0  # bytes in the file
        self._path = ""
        self._spooled: SpooledBody | None = None
        # $request_body: the complete in-memory body buffered() handed out, or a streamed body's
        # first part (None: nothing taken yet)
        self._kept: bytes | None = None

    def __iter__(self) -> Iterator[bytes]:
        """The chunks held in memory and not taken yet."""
        return iter(self._chunks)

    def __bool__(self) -> bool:
        return bool(self._chunks) or self._written > 0

    @property
    def in_file(self) -> bool:
        return self._fd >= 0

    @property
    def file_path(self) -> str:
        """The temporary file's name (it exists on disk only with client_body_in_file_only on)."""
        return self._path

    def append(self, data: bytes) -> None:
        if self._fd >= 0:
            self._write(data)
            return
        self._chunks.append(data)
        self._in_memory += len(data)
        conf = self._conf
        if conf is not None and (self._in_memory > conf.buffer_size or conf.in_file_only != "off"):
            self._spill()

    def take(self) -> bytes:
        """What arrived and was not taken yet, joined (streamed bodies: memory only)."""
        chunks = self._chunks
        if not chunks:
            return b""
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._in_memory = 0
        if self._kept is None:
            # a streamed body's $request_body is what came with the first read (nginx's
            # rb->bufs when proxying starts): the whole body when it came with the head
            self._kept = data
        return data

    def buffered(self) -> bytes | SpooledBody:
        """The complete body: bytes, or the file that holds it."""
        if self._fd < 0:
            self._kept = self.take()
            return self._kept
        if self._spooled is None:
            self._spooled = SpooledBody(self._fd, self._written)
        return self._spooled

    @property
    def kept(self) -> bytes | None:
        """The complete body when it was buffered in memory ($request_body), else None."""
        return self._kept if self._fd < 0 and self._kept else None  # (b"": no body, not found)

    def clear(self) -> None:
        """Drop what arrived so far (a body nobody reads: ``return``)."""
        self._chunks.clear()
        self._in_memory = 0

    def close(self) -> None:
        """The request is over: close (and so free) the file."""
        self.clear()
        if self._spooled is not None:
            self._spooled.close()
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __del__(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)

    # ------------------------------------------------------------------ the file

    def _spill(self) -> None:
        conf = self._conf
        assert conf is not None
        directory = conf.temp_path
        path = os.path.join(directory, f"{os.getpid():05d}{next(_file_numbers):010d}")
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as err:
            raise BodyFileError(f'open() "{path}" failed {os_error_text(err)}') from None
        if conf.in_file_only != "on":
            os.unlink(path)  # nobody else needs its name: the file goes with its descriptor
        self._fd = fd
        self._path = path
        chunks = self._chunks
        self._chunks = []
        self._in_memory = 0
        for chunk in chunks:
            self._write(chunk)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
                self._written += written
        except OSError as err:
            raise BodyFileError(f'write() "{self._path}" failed {os_error_text(err)}') from None


EMPTY_BODY = RequestBody()  # the body of every request that has none (never appended to)
